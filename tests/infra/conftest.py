"""testinfra suites: run by `invoke check --env E` against that environment's inventory
(`--ansible-inventory=inventories/E --connection=ansible`). Each module names the group it
checks in `testinfra_hosts`; values a check needs come from the same inventory."""

import pytest


def pytest_collection_modifyitems(config, items):
    if not config.getoption("ansible_inventory", default=None):
        skip = pytest.mark.skip(reason="host checks need --ansible-inventory (run them with `invoke check`)")
        for item in items:
            item.add_marker(skip)


@pytest.fixture
def hostvars(host):
    """The inventory's variables for the host under test (rendered by Ansible)."""
    return host.ansible.get_variables()


@pytest.fixture(scope="session")
def inventory(pytestconfig):
    """The opsbook environment whose inventory the checks run against."""
    from pathlib import Path

    from opsbook.inventory import load

    return load(Path(pytestconfig.getoption("ansible_inventory")).resolve().name)
