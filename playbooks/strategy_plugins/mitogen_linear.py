"""The `mitogen_linear` strategy (Mitogen for Ansible, the `mitogen` package in pyproject.toml), found
here because Ansible loads the strategy plugins beside a playbook. Only playbooks/provision-aws.yml asks
for it (its play says why); every other playbook keeps Ansible's own strategy."""

from ansible_mitogen.plugins.strategy.mitogen_linear import StrategyModule

__all__ = ["StrategyModule"]
