"""The inventory's numeric settings are checked when a task loads its environment: a value opsbook cannot
use is refused with every such setting listed, before anything is touched."""

from __future__ import annotations

import pytest
import yaml
from invoke import Context

from opsbook.core import settings
from opsbook.core.inventory import INVENTORY_PATH_VARIABLE, Env
from tasks import load_env


def _inventory(tmp_path, monkeypatch, values: dict, name: str = "settings-check") -> str:
    root = tmp_path / name
    (root / "group_vars" / "all").mkdir(parents=True)
    (root / "hosts.yml").write_text(yaml.safe_dump({"all": {"hosts": {"h1": {"ansible_host": "127.0.0.1"}}}}))
    (root / "group_vars" / "all" / "main.yml").write_text(yaml.safe_dump({"opsbook_env_kind": "lab", **values}))
    monkeypatch.setenv(INVENTORY_PATH_VARIABLE, str(tmp_path))
    return name


def test_values_opsbook_can_use_pass(tmp_path, monkeypatch):
    name = _inventory(tmp_path, monkeypatch, {
        "opsbook_release_gate_seconds": 0, "opsbook_release_health_timeout": 0.5, "opsbook_release_keep": 1,
        "opsbook_lock_lease_seconds": "20", "opsbook_probe_rate": 20, "opsbook_snapshot_keep": 3.0,
        "opsbook_refresh_keep": "{{ 1 + 1 }}"})   # rendered as the inventory renders it
    settings.check(Env(name))
    settings.check(Env(_inventory(tmp_path, monkeypatch, {}, "settings-none")))   # nothing set: the defaults


def test_every_setting_opsbook_cannot_use_is_listed_and_the_task_refused(tmp_path, monkeypatch):
    name = _inventory(tmp_path, monkeypatch, {
        "opsbook_release_gate_seconds": "abc", "opsbook_release_keep": -1, "opsbook_lock_lease_seconds": 0,
        "opsbook_probe_rate": float("nan"), "opsbook_snapshot_keep": 2.5, "opsbook_release_drain_timeout": True,
        "opsbook_release_health_timeout": 10})
    with pytest.raises(settings.SettingsInvalid) as refused:
        settings.check(Env(name))
    message = str(refused.value)
    for said in ("opsbook_release_gate_seconds is 'abc' (a number of seconds, 0 or more is needed)",
                 "opsbook_release_keep is -1 (a whole number, 1 or more is needed)",
                 "opsbook_lock_lease_seconds is 0 (a number of seconds, above 0 is needed)",
                 "opsbook_probe_rate is nan (a number of requests per second, above 0 is needed)",
                 "opsbook_snapshot_keep is 2.5 (a whole number, 1 or more is needed)",
                 "opsbook_release_drain_timeout is True"):
        assert said in message, message
    assert "health_timeout" not in message
    assert message.startswith(f"{name}'s inventory ({tmp_path / name}) sets what opsbook cannot use: ")
    assert message.endswith("Nothing was changed. Fix the inventory (`group_vars/`), then run the task again.")
    # Every task loads its environment through load_env (inside the task's operator_errors, which makes
    # this an `error: ...` line and exit 1): refused there, before it does anything.
    with pytest.raises(settings.SettingsInvalid, match="opsbook_release_gate_seconds is 'abc'"):
        load_env(Context(), name)


def test_a_value_the_inventory_cannot_render_is_an_operator_error(tmp_path, monkeypatch):
    """An inventory copied elsewhere keeps the lab's relative lookups (`../../.lab/secrets/...`): a release
    from it ended in Ansible's raw AnsibleTemplatePluginRuntimeError traceback."""
    from opsbook.core.errors import OpsbookError

    name = _inventory(tmp_path, monkeypatch, {
        "vault_password": "{{ lookup('ansible.builtin.file', inventory_dir ~ '/../no-such-secret') }}"})
    with pytest.raises(OpsbookError) as refused:
        Env(name).var("vault_password")
    message = str(refused.value)
    assert message.startswith(f"{name}'s inventory: vault_password cannot be read (")
    assert "no-such-secret" in message
    assert message.endswith(f"Nothing was changed. Fix it in {tmp_path / name}/group_vars/ (a lookup's path is "
                            f"relative to the inventory's directory).")
