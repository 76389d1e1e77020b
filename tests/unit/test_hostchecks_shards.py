"""A large fleet's host checks run in several processes, each on its share of the hosts: every check of
every host runs once, in exactly one share. Collected (pytest --collect-only) through the real check
command against the lab's inventory: the shares are what the processes would run, no host is reached."""

from __future__ import annotations

import re
import shutil

import pytest
import yaml

from opsbook.core.inventory import INVENTORY_PATH_VARIABLE, load
from opsbook.core.paths import INVENTORIES
from opsbook.engines import hostchecks

CHECK_ID = re.compile(r"^tests/infra/\S+::\S+\[ansible://[^\]]+\]$", re.M)


def _collected(capsys, env) -> list[str]:
    capsys.readouterr()
    hostchecks.Background(env, ["--collect-only"]).wait()
    return CHECK_ID.findall(capsys.readouterr().out)


def test_a_fleet_of_six_hosts_is_checked_in_one_process():
    assert hostchecks.shards(load("lab")) == [[]]


def test_a_larger_fleet_is_shared_round_robin_and_every_group_is_in_each_share(tmp_path, monkeypatch):
    root = tmp_path / "inventories"
    shutil.copytree(INVENTORIES / "lab", root / "bigfleet")
    hosts = yaml.safe_load((root / "bigfleet" / "hosts.yml").read_text())
    app = hosts["all"]["children"]["app"]["hosts"]
    template = next(iter(app.values()))
    for i in range(4, 10):
        app[f"app{i}"] = {**template, "ansible_host": f"10.89.7.{100 + i}"}
    (root / "bigfleet" / "hosts.yml").write_text(yaml.safe_dump(hosts))
    monkeypatch.setenv(INVENTORY_PATH_VARIABLE, str(root))
    env = load("bigfleet")
    names = sorted(h.name for h in env.hosts())
    assert len(names) == 12
    shares = hostchecks.shards(env)
    assert len(shares) == 2
    assert sorted(n for s in shares for n in s) == names
    assert all(any(n.startswith("app") for n in s) for s in shares)


def test_every_check_of_every_host_is_in_exactly_one_share(capsys, monkeypatch):
    env = load("lab")
    monkeypatch.setenv(hostchecks.SHARD_VARIABLE, "lb1")   # left in the operator's shell: not obeyed
    whole = _collected(capsys, env)
    assert len({i.split("[")[1] for i in whole}) == len(env.hosts())   # one process: every host
    monkeypatch.setattr(hostchecks, "HOSTS_PER_PROCESS", 2)
    assert len(hostchecks.shards(env)) == 3
    shared = _collected(capsys, env)
    assert sorted(shared) == sorted(whole)
    assert len(shared) == len(set(shared))


def test_a_share_with_no_check_of_the_kind_asked_is_not_a_failure_but_all_empty_is(capsys, monkeypatch):
    """Only app and lb hosts have checks a release converges (-m converges); a share of db hosts has none."""
    env = load("lab")
    monkeypatch.setattr(hostchecks, "shards", lambda _env: [["db1", "db2"], ["app1", "lb1"]])
    hostchecks.Background(env, ["--collect-only", "-m", "converges"]).wait()
    monkeypatch.setattr(hostchecks, "shards", lambda _env: [["db1"], ["db2"]])
    with pytest.raises(hostchecks.HostChecksFailed, match="pytest exit 5"):
        hostchecks.Background(env, ["--collect-only", "-m", "converges"]).wait()
