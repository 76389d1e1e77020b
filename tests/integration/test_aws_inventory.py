"""The AWS inventories: hosts come from the amazon.aws.aws_ec2 inventory plugin by tags (against a
real moto server), grouped app / lb / db by their opsbook:role tag, only the environment's own; the
plugin's configuration agrees with the environment's group_vars."""

from __future__ import annotations

import json
import subprocess

import boto3
import pytest
import yaml

from opsbook.core.inventory import Env
from opsbook.core.paths import INVENTORIES
from opsbook.engines.ansible import ansible_env

pytestmark = pytest.mark.moto


def _run(ec2, subnet: str, env: str, role: str, address: str) -> str:
    return ec2.run_instances(
        ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType="t3.small", SubnetId=subnet,
        PrivateIpAddress=address,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [
            {"Key": "opsbook:env", "Value": env}, {"Key": "opsbook:managed-by", "Value": "opsbook"},
            {"Key": "opsbook:role", "Value": role}, {"Key": "Name", "Value": f"{env}-{role}"}]}],
    )["Instances"][0]["InstanceId"]


def test_aws_ec2_plugin_groups_the_environments_instances_by_role(aws_inventory, aws):
    env = aws_inventory("staging")
    ec2 = boto3.client("ec2", endpoint_url=aws)
    vpc = ec2.create_vpc(CidrBlock="10.60.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.60.1.0/24")["Subnet"]["SubnetId"]
    apps = {_run(ec2, subnet, env.name, "app", f"10.60.1.{i}") for i in (21, 22)}
    db = _run(ec2, subnet, env.name, "db", "10.60.1.11")
    lb = _run(ec2, subnet, env.name, "lb", "10.60.1.10")
    stranger = _run(ec2, subnet, f"other-{env.name}", "app", "10.60.1.31")   # another environment's host
    stopped = _run(ec2, subnet, env.name, "app", "10.60.1.32")
    ec2.stop_instances(InstanceIds=[stopped])

    fresh = Env(env.name, path=env.path)   # parses the inventory now that the instances exist
    assert {h.name for h in fresh.hosts("app")} == apps
    assert [h.name for h in fresh.hosts("db")] == [db]
    assert [h.name for h in fresh.hosts("lb")] == [lb]
    assert {h.address for h in fresh.hosts("app")} == {"10.60.1.21", "10.60.1.22"}   # ansible_host: private IP
    names = {h.name for h in fresh.hosts()}
    assert stranger not in names
    assert stopped not in names
    # The environment's variables still come from group_vars (the plugin adds hosts, not settings).
    assert fresh.var("opsbook_lb_kind") == "alb"


@pytest.mark.parametrize("name", ["staging", "prod"])
def test_the_plugin_configuration_agrees_with_group_vars(name):
    plugin = yaml.safe_load((INVENTORIES / name / "aws_ec2.yml").read_text())
    group_vars = yaml.safe_load((INVENTORIES / name / "group_vars" / "all" / "aws.yml").read_text())
    assert plugin["plugin"] == "opsbook_aws_ec2"   # amazon.aws.aws_ec2 without a deprecation warning
    assert plugin["regions"] == [group_vars["opsbook_aws_region"]]
    assert _filter(plugin, None) == name
    assert set(plugin["groups"]) == {"app", "lb", "db"}


def _filter(plugin: dict, env_name: str | None) -> str:
    """The plugin's opsbook:env filter as the plugin renders it (its filters are templated) with
    OPSBOOK_ENV_NAME set to `env_name` (None: unset)."""
    import os

    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar, trust_as_template

    before = os.environ.pop("OPSBOOK_ENV_NAME", None)
    try:
        if env_name is not None:
            os.environ["OPSBOOK_ENV_NAME"] = env_name
        return Templar(loader=DataLoader()).template(trust_as_template(plugin["filters"]["tag:opsbook:env"]))
    finally:
        os.environ.pop("OPSBOOK_ENV_NAME", None)
        if before is not None:
            os.environ["OPSBOOK_ENV_NAME"] = before


@pytest.mark.parametrize("name", ["staging", "prod"])
def test_the_plugin_finds_the_environment_opsbook_names_and_never_another_inventorys(name):
    plugin = yaml.safe_load((INVENTORIES / name / "aws_ec2.yml").read_text())
    other = "prod" if name == "staging" else "staging"
    assert _filter(plugin, name) == name
    assert _filter(plugin, f"{name}-loadtest") == f"{name}-loadtest"       # one of its purpose environments
    assert _filter(plugin, other) == name                                   # another inventory's name: its own
    assert _filter(plugin, f"{other}-loadtest") == name
    assert _filter(plugin, f"{name}x") == name


def test_each_environment_names_its_own_account():
    accounts = {name: yaml.safe_load((INVENTORIES / name / "group_vars" / "all" / "aws.yml").read_text())
                ["opsbook_aws_account_id"] for name in ("staging", "prod")}
    assert all(len(a) == 12 and a.isdigit() for a in accounts.values())
    assert accounts["staging"] != accounts["prod"]


def _inventory_list(env: Env) -> subprocess.CompletedProcess:
    """`ansible-inventory --list` on the environment's inventory, as opsbook runs Ansible (its ansible.cfg,
    the environment's name, region and endpoint in the process environment)."""
    return subprocess.run(["ansible-inventory", "-i", str(env.path), "--list"], env=ansible_env(env),
                          capture_output=True, text=True, check=False, timeout=120)


def test_listing_the_inventory_prints_no_deprecation_warning(aws_inventory, aws):
    """amazon.aws 10.1.2's aws_ec2 plugin passes ansible-core 2.19's deprecated `disable_lookups` when it
    templates `regions` and `filters`, which printed a deprecation warning on every read of an AWS
    inventory; the inventories use opsbook_aws_ec2 (plugins/inventory/), the same plugin without it."""
    env = aws_inventory("staging")
    ec2 = boto3.client("ec2", endpoint_url=aws)
    vpc = ec2.create_vpc(CidrBlock="10.61.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.61.1.0/24")["Subnet"]["SubnetId"]
    app = _run(ec2, subnet, env.name, "app", "10.61.1.21")
    other = _run(ec2, subnet, f"other-{env.name}", "app", "10.61.1.22")

    proc = _inventory_list(env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DEPRECATION" not in proc.stderr, proc.stderr[-3000:]
    assert "deprecat" not in proc.stderr.lower(), proc.stderr[-3000:]
    listed = json.loads(proc.stdout)
    # The same behaviour: the templated filter (OPSBOOK_ENV_NAME) picks this environment's host only.
    assert listed["app"]["hosts"] == [app]
    assert other not in listed["_meta"]["hostvars"]

    # The collection's own plugin on the same inventory still warns: when this fails, the ansible package
    # ships the fixed amazon.aws, and plugins/inventory/opsbook_aws_ec2.py can go.
    upstream = env.path / "aws_ec2.yml"
    upstream.write_text(upstream.read_text().replace("plugin: opsbook_aws_ec2", "plugin: amazon.aws.aws_ec2"))
    proc = _inventory_list(env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Passing `disable_lookups` to `template` is deprecated" in proc.stderr
    assert json.loads(proc.stdout)["app"]["hosts"] == [app]
