"""The database reached through an app host (`opsbook_db_reach: ssh`, engines/tunnel.py) when no app host
takes the forward: a refusal that names each host's SSH error, not a hang and not a guess. (The forward
that works, through a bastion to a database that admits only the app hosts, is seen end to end in
tests/integration/test_aws_lab_release.py.)"""

from __future__ import annotations

import shutil
import socket
import time

import pytest
import yaml

from opsbook.core.inventory import INVENTORY_PATH_VARIABLE, Env
from opsbook.core.paths import INVENTORIES
from opsbook.engines import database, tunnel


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]   # nothing listens once the socket is closed


def test_no_app_host_takes_the_forward_so_the_database_cannot_be_reached(tmp_path, monkeypatch):
    path = tmp_path / "tunnelled"
    shutil.copytree(INVENTORIES / "lab", path)
    ports = [_closed_port(), _closed_port()]
    (path / "hosts.yml").write_text(yaml.safe_dump({"all": {"children": {"app": {"hosts": {
        f"app{i}": {"ansible_host": "127.0.0.1", "ansible_port": port} for i, port in enumerate(ports, 1)}}}}}))
    (path / "group_vars" / "all" / "zz.yml").write_text(yaml.safe_dump({
        "opsbook_db_reach": "ssh", "bl_api_db_address": "10.89.7.11"}))
    monkeypatch.setenv(INVENTORY_PATH_VARIABLE, str(tmp_path))
    env = Env("tunnelled")
    command = tunnel.ssh_command(env, "app1", "127.0.0.1:1:10.89.7.11:5432")
    assert command[command.index("-p") + 1] == str(ports[0])
    # ssh takes the first value of an option: its own control settings come before the inventory's.
    assert command.index("ControlPath=none") < command.index("ControlPath=/tmp/opsbook-ssh-%C")

    started = time.monotonic()
    with pytest.raises(database.DatabaseUnreachable) as refused, database.Admin(env):
        pass
    message = str(refused.value)
    assert time.monotonic() - started < 30
    assert "cannot be reached" in message
    assert "10.89.7.11:5432" in message
    assert "app1:" in message
    assert "app2:" in message
    assert "Connection refused" in message
    assert "Nothing was changed" in message
