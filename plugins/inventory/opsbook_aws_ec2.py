"""opsbook_aws_ec2: the amazon.aws.aws_ec2 inventory plugin, without its deprecation warning.

Why this file exists: amazon.aws 10.1.2 (the newest in the ansible 12 package; Galaxy is not reachable
here) templates every list and dict value of its templatable options (`regions`, `filters`) with
`templar.template(..., disable_lookups=False)`, and ansible-core 2.19 deprecates that argument, so every
inventory read printed "[DEPRECATION WARNING]: Passing `disable_lookups` to `template` is deprecated",
whether or not a value held a template (`regions: [us-east-1]` alone does it). The argument has had no
effect since 2.19, and no setting silences one deprecation without silencing all of them
(`deprecation_warnings`). Upstream removed the argument (amazon.aws PR #2864, marked for backport to
10 and 11); once the ansible package ships that, point `plugin:` in inventories/*/aws_ec2.yml back at
amazon.aws.aws_ec2 and delete this file.

Everything else is amazon.aws.aws_ec2 itself: its options (its DOCUMENTATION, which is where Ansible
reads a plugin's options from), its queries and its constructed features (compose, groups). Only
TemplatedOptions.get differs: the same templating, called without the deprecated argument.
"""

from __future__ import annotations

from ansible_collections.amazon.aws.plugins.inventory.aws_ec2 import DOCUMENTATION as _AWS_EC2_DOCUMENTATION
from ansible_collections.amazon.aws.plugins.inventory.aws_ec2 import InventoryModule as _AwsEc2

DOCUMENTATION = _AWS_EC2_DOCUMENTATION.replace("name: aws_ec2\n", "name: opsbook_aws_ec2\n", 1)


class InventoryModule(_AwsEc2):
    NAME = "opsbook_aws_ec2"

    class TemplatedOptions(_AwsEc2.TemplatedOptions):
        def get(self, *args):
            value = self.original_options.get(*args)
            if not value or not self.templar or args[0] not in self.TEMPLATABLE_OPTIONS:
                return value
            if isinstance(value, dict):
                return {k: self.templar.template(variable=v) for k, v in value.items()}
            if isinstance(value, list):
                return [self.templar.template(variable=v) for v in value]
            if not self.templar.is_template(value):
                return value
            return self.templar.template(variable=value)
