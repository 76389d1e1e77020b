"""App hosts: the service runs the release `current` points at, and listens where it should."""

import json

import pytest

testinfra_hosts = ["ansible://app"]

ROOT = "/srv/bl-api"


def test_service_user_exists(host):
    user = host.user("blapi")
    assert user.exists
    assert user.shell == "/usr/sbin/nologin"


@pytest.mark.converges
def test_release_layout(host):
    for d in ("releases", "shared"):
        f = host.file(f"{ROOT}/{d}")
        assert f.is_directory
        assert f.user == "root"
    current = host.file(f"{ROOT}/current")
    assert current.is_symlink
    assert current.linked_to.startswith(f"{ROOT}/releases/")


def test_environment_file_is_private(host):
    f = host.file(f"{ROOT}/shared/bl-api.env")
    assert f.exists
    assert f.mode == 0o640
    assert f.user == "root"
    assert f.group == "blapi"


@pytest.mark.converges
def test_service_running_and_enabled(host):
    svc = host.service("bl-api")
    assert svc.is_running
    assert svc.is_enabled


@pytest.mark.converges
def test_service_listens_on_its_port(host):
    assert host.socket("tcp://0.0.0.0:8000").is_listening


def test_postgres_does_not_run_here(host):
    assert not host.socket("tcp://0.0.0.0:5432").is_listening


@pytest.mark.converges
def test_serves_the_release_current_points_at(host):
    release = host.file(f"{ROOT}/current").linked_to.rsplit("/", 1)[-1]
    out = host.check_output("curl -fsS --max-time 3 http://127.0.0.1:8000/version")
    assert json.loads(out)["version"] == release


@pytest.mark.converges
def test_health(host):
    out = host.check_output("curl -fsS --max-time 3 http://127.0.0.1:8000/ping")
    assert json.loads(out)["status"] == "ok"
