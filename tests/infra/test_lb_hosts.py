"""Load balancers: haproxy in front of every app host, with its runtime API for draining.

The port (lb_http_port), the backend (lb_backend_name), the admin socket (lb_admin_socket) and the
ports that must stay closed (bl_api_db_port, bl_api_port) come from the inventory
(group_vars/all/)."""

import shlex

import pytest

from opsbook.engines.fleet import stat_rows

testinfra_hosts = ["ansible://lb"]


def test_haproxy_running_and_enabled(host):
    svc = host.service("haproxy")
    assert svc.is_running
    assert svc.is_enabled


def test_listens_on_http(host, hostvars):
    assert host.socket(f"tcp://0.0.0.0:{hostvars['lb_http_port']}").is_listening


def test_admin_socket_is_not_world_accessible(host, hostvars):
    sock = host.file(hostvars["lb_admin_socket"])
    assert sock.is_socket
    assert sock.mode & 0o007 == 0


def test_config_is_valid(host):
    host.run_test("haproxy -c -f /etc/haproxy/haproxy.cfg")


@pytest.mark.converges
def test_every_app_host_is_a_backend_and_up(host, hostvars):
    stat = host.check_output(f"echo 'show stat' | socat stdio {shlex.quote(hostvars['lb_admin_socket'])}")
    rows = stat_rows(stat)
    servers = {
        r["svname"]: r["status"]
        for r in rows
        if r["pxname"] == hostvars["lb_backend_name"] and r["svname"] not in ("FRONTEND", "BACKEND")
    }
    assert set(servers) == set(hostvars["groups"]["app"])
    assert all(status == "UP" for status in servers.values()), servers


def test_no_database_or_service_here(host, hostvars):
    assert not host.socket(f"tcp://0.0.0.0:{hostvars['bl_api_db_port']}").is_listening
    assert not host.socket(f"tcp://0.0.0.0:{hostvars['bl_api_port']}").is_listening
