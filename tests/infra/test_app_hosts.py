"""App hosts: the service runs the release `current` points at, and listens where it should.

Paths, the user, the unit and the ports come from the inventory: app_root, app_user and
app_service (group_vars/app/), bl_api_port and bl_api_db_port (group_vars/all/)."""

import json

import pytest

testinfra_hosts = ["ansible://app"]


def test_service_user_exists(host, hostvars):
    user = host.user(hostvars["app_user"])
    assert user.exists
    assert user.shell == "/usr/sbin/nologin"


@pytest.mark.converges
def test_release_layout(host, hostvars):
    root = hostvars["app_root"]
    for d in ("releases", "shared"):
        f = host.file(f"{root}/{d}")
        assert f.is_directory
        assert f.user == "root"
    current = host.file(f"{root}/current")
    assert current.is_symlink
    assert current.linked_to.startswith(f"{root}/releases/")


def test_environment_file_is_private(host, hostvars):
    f = host.file(f"{hostvars['app_root']}/shared/{hostvars['app_service']}.env")
    assert f.exists
    assert f.mode == 0o640
    assert f.user == "root"
    assert f.group == hostvars["app_user"]


@pytest.mark.converges
def test_service_running_and_enabled(host, hostvars):
    svc = host.service(hostvars["app_service"])
    assert svc.is_running
    assert svc.is_enabled


@pytest.mark.converges
def test_service_listens_on_its_port(host, hostvars):
    assert host.socket(f"tcp://0.0.0.0:{hostvars['bl_api_port']}").is_listening


def test_postgres_does_not_run_here(host, hostvars):
    assert not host.socket(f"tcp://0.0.0.0:{hostvars['bl_api_db_port']}").is_listening


@pytest.mark.converges
def test_serves_the_release_current_points_at(host, hostvars):
    release = host.file(f"{hostvars['app_root']}/current").linked_to.rsplit("/", 1)[-1]
    out = host.check_output(f"curl -fsS --max-time 3 http://127.0.0.1:{hostvars['bl_api_port']}/version")
    assert json.loads(out)["version"] == release


@pytest.mark.converges
def test_health(host, hostvars):
    out = host.check_output(f"curl -fsS --max-time 3 http://127.0.0.1:{hostvars['bl_api_port']}/ping")
    assert json.loads(out)["status"] == "ok"
