"""Settings read for one host, where a wrong answer sends commands to the wrong machine or grows a
file on every run."""

from __future__ import annotations

from opsbook.core.inventory import load
from opsbook.engines.clones.btrfs import rewrite_auto_conf


def test_an_inventory_host_does_not_inherit_the_implicit_localhosts_local_connection():
    # Ansible gives its implicit localhost `ansible_connection: local`; a lab host is reached over SSH.
    # (Once inherited, the clone path took every lab host for this machine and ran there.)
    lab = load("lab")
    for host in ("db1", "db2"):
        assert lab.host_var(host, "ansible_connection", "ssh") == "ssh"
    assert load("lab-staging").host_var("stg-db1", "ansible_connection", "ssh") == "ssh"


def test_rewriting_a_standbys_settings_again_changes_nothing():
    once = rewrite_auto_conf("max_connections = '200'\n", {"primary_slot_name": "s", "port": "5499"})
    assert rewrite_auto_conf(once, {"primary_slot_name": "s", "port": "5499"}) == once
    moved = rewrite_auto_conf(once, {"port": "5500"})
    assert moved.count("# set by opsbook's clone machinery") == 1
    assert "port = '5500'" in moved
    assert "port = '5499'" not in moved
    assert "max_connections = '200'" in moved
