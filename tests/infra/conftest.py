"""testinfra suites: run by `invoke check --env E` against that environment's inventory
(`--ansible-inventory=inventories/E --connection=ansible`). Each module names the group it
checks in `testinfra_hosts`; paths, ports, users, unit names and other values a check needs
come from the same inventory (the `hostvars` fixture), so the checks hold for any environment."""

from pathlib import Path
from typing import Any

import pytest
import testinfra.utils.ansible_runner as _testinfra_ansible

HERE = Path(__file__).parent


def _plain(value: Any) -> Any:
    """{"__ansible_unsafe": "x"} -> "x", everywhere in `value`."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# testinfra 10 reads `ansible-inventory --list` with plain json.loads. Since ansible-core 2.19 that
# command writes every value an inventory plugin supplied (the aws_ec2 plugin's ansible_host) as
# {"__ansible_unsafe": "10.0.1.5"}, which testinfra then takes for a host address (KeyError on
# every host of an AWS environment). Until testinfra reads that form itself, it gets the plain values.
_read_inventory = _testinfra_ansible.get_ansible_inventory
_testinfra_ansible.get_ansible_inventory = lambda config, inventory_file: _plain(_read_inventory(config,
                                                                                                 inventory_file))


def pytest_collection_modifyitems(config, items):
    # This hook sees the whole session's items: only the host checks below this folder need an
    # inventory, and `invoke check` gives them one.
    if not config.getoption("ansible_inventory", default=None):
        skip = pytest.mark.skip(reason="host checks need --ansible-inventory (run them with `invoke check`)")
        for item in items:
            if HERE in Path(item.fspath).parents:
                item.add_marker(skip)
        return
    # opsbook checks a large fleet in several processes, each on its share of the hosts
    # (opsbook.engines.hostchecks.shards): this one keeps only its hosts' checks.
    import os

    from opsbook.engines.hostchecks import SHARD_VARIABLE

    share = os.environ.get(SHARD_VARIABLE)
    if share:
        wanted = {f"ansible://{name}" for name in share.split(",")}
        keep, drop = [], []
        for item in items:
            host = getattr(item, "callspec", None) and item.callspec.params.get("_testinfra_host")
            (keep if host is None or host.backend.get_pytest_id() in wanted else drop).append(item)
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


class InventoryVars(dict):
    """A host's inventory variables, as `ansible-inventory --list` gives them: the inventory's
    group_vars and host_vars only (role defaults are not in it), and values as written, not
    templated. A check may only read a variable that the inventory sets to a literal value; a
    missing or templated one fails the check with a message that says where to define it."""

    def __init__(self, variables, host):
        super().__init__(variables)
        self.host = host

    def __missing__(self, name):
        where = [f"group_vars/{g}/" for g in self.get("group_names", []) if g != "all"] + ["group_vars/all/"]
        pytest.fail(
            f"{self.host}: the inventory does not define {name!r}, and the host checks read it from the "
            f"inventory (role defaults are not visible to them): set it in {' or '.join(where)}",
            pytrace=False,
        )

    def __getitem__(self, name):
        value = super().__getitem__(name)
        if isinstance(value, str) and "{{" in value:
            pytest.fail(
                f"{self.host}: {name!r} is templated in the inventory ({value!r}); the host checks "
                f"read inventory values without templating them: set it to a literal value",
                pytrace=False,
            )
        return value


@pytest.fixture
def hostvars(host):
    """The inventory's variables for the host under test (see InventoryVars: literal values only)."""
    variables = host.ansible.get_variables()
    return InventoryVars(variables, variables.get("inventory_hostname", "the host under test"))


@pytest.fixture(scope="session")
def inventory(pytestconfig):
    """The opsbook environment whose inventory the checks run against: the one opsbook names in
    OPSBOOK_ENV_NAME when it reads that inventory (a purpose environment reads the inventory of the
    one it is like), else the inventory directory's name."""
    import os

    from opsbook.core.inventory import ENV_NAME_VARIABLE, load

    given = Path(pytestconfig.getoption("ansible_inventory")).resolve()
    named = os.environ.get(ENV_NAME_VARIABLE)
    if named:
        env = load(named)
        if env.path.resolve() == given:
            return env
    return load(given.name)
