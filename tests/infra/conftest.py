"""testinfra suites: run by `invoke check --env E` against that environment's inventory
(`--ansible-inventory=inventories/E --connection=ansible`). Each module names the group it
checks in `testinfra_hosts`; values a check needs come from the same inventory."""

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    # This hook sees the whole session's items: only the host checks below this folder need an
    # inventory, and `invoke check` gives them one.
    if not config.getoption("ansible_inventory", default=None):
        skip = pytest.mark.skip(reason="host checks need --ansible-inventory (run them with `invoke check`)")
        for item in items:
            if HERE in Path(item.fspath).parents:
                item.add_marker(skip)


@pytest.fixture
def hostvars(host):
    """The inventory's variables for the host under test (rendered by Ansible)."""
    return host.ansible.get_variables()


@pytest.fixture(scope="session")
def inventory(pytestconfig):
    """The opsbook environment whose inventory the checks run against."""
    from opsbook.core.inventory import load

    return load(Path(pytestconfig.getoption("ansible_inventory")).resolve().name)
