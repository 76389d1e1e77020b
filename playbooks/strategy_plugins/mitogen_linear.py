"""The `mitogen_linear` strategy (Mitogen for Ansible, the `mitogen` package in pyproject.toml), found
here because Ansible loads the strategy plugins beside a playbook. The provisioning plays ask for it
(provision-aws.yml and provision-app.yml say why); the release's own plays (stage, switch, rotation,
mark good) keep Ansible's own strategy."""

from ansible_mitogen.plugins.strategy.mitogen_linear import StrategyModule

__all__ = ["StrategyModule"]
