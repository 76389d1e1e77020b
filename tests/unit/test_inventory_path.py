"""Inventories outside the repository (OPSBOOK_INVENTORY_PATH): found by name like the repository's
own, the repository's winning a name both hold; an inventory's fingerprint does not need it to
live in the repository."""

from __future__ import annotations

import shutil

import pytest

from opsbook.core.inventory import INVENTORY_PATH_VARIABLE, Env, UnknownEnvironment, environments
from opsbook.core.paths import INVENTORIES
from opsbook.engines import ansible


def test_an_inventory_on_the_path_is_an_environment_and_the_repositorys_win(tmp_path, monkeypatch):
    shutil.copytree(INVENTORIES / "lab", tmp_path / "elsewhere")
    shutil.copytree(INVENTORIES / "lab", tmp_path / "staging")   # the repository's staging wins
    assert "elsewhere" not in environments()
    monkeypatch.setenv(INVENTORY_PATH_VARIABLE, f"{tmp_path}:/nonexistent")
    assert {"elsewhere", "lab", "staging", "prod"} <= set(environments())
    env = Env("elsewhere")
    assert env.path == tmp_path / "elsewhere"
    assert env.kind == "lab"
    assert Env("staging").path == INVENTORIES / "staging"
    # A host's configuration fingerprint reads the inventory wherever it lives, and sees its changes.
    before = ansible.fingerprint(env)
    (tmp_path / "elsewhere" / "group_vars" / "all" / "zz.yml").write_text("opsbook_release_keep: 4\n")
    assert ansible.fingerprint(env) != before


def test_an_unknown_environment_hints_a_new_inventory_only_for_a_directory_name():
    with pytest.raises(UnknownEnvironment, match=r"Pick one of those with --env, or add inventories/nope/\.$"):
        Env("nope")
    for odd in ("../lab", "lab/", "a b"):
        with pytest.raises(UnknownEnvironment) as refused:
            Env(odd)
        assert str(refused.value).endswith("Pick one of those with --env."), refused.value
