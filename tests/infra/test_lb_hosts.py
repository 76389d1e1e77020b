"""Load balancers: haproxy in front of every app host, with its runtime API for draining."""

import pytest

testinfra_hosts = ["ansible://lb"]


def test_haproxy_running_and_enabled(host):
    svc = host.service("haproxy")
    assert svc.is_running
    assert svc.is_enabled


def test_listens_on_http(host):
    assert host.socket("tcp://0.0.0.0:80").is_listening


def test_admin_socket_is_not_world_accessible(host):
    sock = host.file("/run/haproxy/admin.sock")
    assert sock.is_socket
    assert sock.mode & 0o007 == 0


def test_config_is_valid(host):
    host.run_test("haproxy -c -f /etc/haproxy/haproxy.cfg")


@pytest.mark.converges
def test_every_app_host_is_a_backend_and_up(host, hostvars):
    stat = host.check_output("echo 'show stat' | socat stdio /run/haproxy/admin.sock")
    rows = [line.split(",") for line in stat.splitlines() if line and not line.startswith("#")]
    servers = {r[1]: r[17] for r in rows if r[0] == "bl_api" and r[1] not in ("FRONTEND", "BACKEND")}
    assert set(servers) == set(hostvars["groups"]["app"])
    assert all(status == "UP" for status in servers.values()), servers


def test_no_database_or_service_here(host):
    assert not host.socket("tcp://0.0.0.0:5432").is_listening
    assert not host.socket("tcp://0.0.0.0:8000").is_listening
