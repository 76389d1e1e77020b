"""`invoke provision --hosts`: only names the inventory has get through, before anything runs."""

from __future__ import annotations

import pytest

from opsbook.core.errors import OpsbookError
from opsbook.core.inventory import load
from opsbook.operations.provision import _limit


def test_hosts_and_groups_of_the_inventory_become_the_limit():
    env = load("lab")
    assert _limit(env, "db") == "db"
    assert _limit(env, " db1, app2 ") == "db1,app2"


@pytest.mark.parametrize("hosts", ["nope", "db1,nope", "db1;rm -rf /", "all:!db", ",", "*"])
def test_anything_else_is_refused_naming_what_exists(hosts):
    with pytest.raises(OpsbookError) as e:
        _limit(load("lab"), hosts)
    assert "Nothing was changed" in str(e.value)
    assert "db1" in str(e.value)   # it lists what the inventory has
