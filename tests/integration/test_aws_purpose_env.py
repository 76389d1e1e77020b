"""Purpose environments (`invoke env.create --name N --like staging`, `env.list`, `env.destroy`):
short-lived environments shaped like staging, with their own tagged resources, owner and TTL,
read through staging's inventory under their own name. Refusals change nothing; the whole life
(create, converge again with changed=0, list, expire, destroy) runs against a real moto server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import boto3
import pytest

from opsbook.core.inventory import Env, UnknownEnvironment, load, purpose_parts
from opsbook.engines import aws as awsenv
from opsbook.engines.records.store import store_for
from opsbook.operations import aws_env, provision
from tests.fixtures.aws_env import LOCK_IN_A_TABLE


# --- names, settings and refusals: no AWS call is made -------------------------------------------
def test_a_purpose_environment_is_its_like_inventory_read_under_its_own_name():
    env = load("staging-loadtest")
    assert (env.path.name, env.like, env.kind) == ("staging", "staging", "aws")
    # Everything that names something of the environment is its own; the rest is staging's.
    assert env.var("opsbook_record_store") == "s3://opsbook-records-staging-loadtest/records"
    assert env.var("opsbook_lock_bucket") == "opsbook-locks-staging-loadtest"
    assert env.var("opsbook_lock_key") == "opsbook/locks/release-staging-loadtest.json"
    assert env.var("opsbook_aws_secret_prefix") == "opsbook/staging-loadtest/"
    assert env.var("opsbook_aws_account_id") == load("staging").var("opsbook_aws_account_id")
    # ... and staging itself is unchanged by it.
    assert load("staging").var("opsbook_record_store") == "s3://opsbook-records-staging/records"
    assert load("staging").like is None
    assert purpose_parts("prod-pr12") == ("prod", "pr12")
    assert purpose_parts("staging") is None


@pytest.mark.parametrize("name", ["lab-preview", "staging-", "staging-Loadtest", "nowhere-x", "staging--x",
                                  "staging-a-name-far-too-long"])
def test_names_that_are_no_environment_are_refused(name):
    with pytest.raises(UnknownEnvironment, match="Nothing was changed"):
        Env(name)


@pytest.mark.parametrize(("like", "name", "ttl", "says"), [
    ("lab", "x", "1h", "lab environment"),
    ("staging", "Bad_Name", "1h", "lowercase letters"),
    ("staging", "much-too-long-a-name", "1h", "at most 21 characters"),
    ("staging", "ok", "8 hours", "is not a duration"),
    ("staging", "ok", "-1h", "is not a duration"),
    ("staging", "ok", "0h", "is not a duration"),
    ("staging", "ok", "8d", "longer than staging's limit"),
    ("staging", "ok", "99999999999d", "is not a duration"),
], ids=["like-the-lab", "bad-name", "too-long", "ttl-words", "ttl-negative", "ttl-zero", "ttl-over-limit",
        "ttl-past-any-date"])
def test_create_refuses_bad_input_before_asking_aws_anything(like, name, ttl, says, monkeypatch):
    def no_aws(*_args, **_kwargs):
        raise AssertionError("AWS was asked before the input was checked")

    monkeypatch.setattr(awsenv, "check_account", no_aws)
    monkeypatch.setattr(awsenv, "client", no_aws)
    with pytest.raises(provision.OpsbookError, match=says) as e:
        provision.create(load(like), name, ttl)
    assert "Nothing was created" in str(e.value)


def test_an_activated_purpose_environment_is_still_one(monkeypatch):
    """tasks.load_env reads an AWS environment again once its profile and endpoint are in the process
    environment (aws.activate): it must stay the purpose environment, or a converge would lose its tags."""
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_URL", "AWS_ENDPOINT_URL"):
        monkeypatch.setenv(name, "changed-by-this-test")   # so activate re-reads, and teardown restores
    env = awsenv.activate(load("staging-loadtest"))
    assert (env.name, env.like) == ("staging-loadtest", "staging")


def test_ttls():
    assert provision.parse_ttl("90m") == timedelta(minutes=90)
    assert provision.parse_ttl("8h") == timedelta(hours=8)
    assert provision.parse_ttl("2d") == timedelta(days=2)


# --- the whole life, against moto ------------------------------------------------------------------
def _tags(ec2, resource_id: str) -> dict[str, str]:
    out = ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [resource_id]}])["Tags"]
    return {t["Key"]: t["Value"] for t in out}


@pytest.mark.moto
@pytest.mark.slow   # two Ansible runs of the aws_env role against moto and a destroy: 2-4 minutes
def test_create_list_converge_expire_destroy(aws_inventory, aws):
    like = aws_inventory("staging", **LOCK_IN_A_TABLE)   # its lock in a DynamoDB table of its own
    ec2 = boto3.client("ec2", endpoint_url=aws)
    now = datetime.now(UTC).replace(microsecond=0)

    data = provision.create(like, "pr1", "2h", now=now)
    env = Env(f"{like.name}-pr1", path=like.path, like=like.name)
    assert data["outcome"] == "succeeded"
    assert data["purpose"]["owner"].startswith("arn:aws:")
    t = awsenv.target(env)
    found = awsenv.find(t)
    assert {"vpc", "alb", "app", "db", "records", "lock", "bastion", "sg-bastion"} <= {r.role for r in found}
    # Every resource is the purpose environment's own, with its owner and expiry; nothing of `like`.
    assert awsenv.find(awsenv.target(like)) == []
    vpc = next(r for r in found if r.role == "vpc")
    tags = _tags(ec2, vpc.id)
    assert tags[awsenv.TAG_ENV] == env.name
    assert tags[awsenv.TAG_LIKE] == like.name
    assert tags[awsenv.TAG_CREATED] == now.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert tags[awsenv.TAG_EXPIRES] == (now + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    subnet = next(r for r in found if r.role == "subnet-private-0")
    assert _tags(ec2, subnet.id)[awsenv.TAG_OWNER] == tags[awsenv.TAG_OWNER]
    # The purpose tags reach the app hosts' Auto Scaling group, which propagates each of them at launch, and
    # so the instances it started; and the lock's table.
    ours = {k: tags[k] for k in (awsenv.TAG_ENV, awsenv.TAG_MANAGED_BY, *awsenv.PURPOSE_TAGS)}
    group = next(r for r in found if r.kind == "autoscaling-group")
    asg = boto3.client("autoscaling", endpoint_url=aws).describe_auto_scaling_groups(
        AutoScalingGroupNames=[group.id])["AutoScalingGroups"][0]
    bastion = next(r for r in found if r.role == "bastion")   # staging's inventory has one; so has this
    address = ec2.describe_instances(InstanceIds=[bastion.id])["Reservations"][0]["Instances"][0]["PublicIpAddress"]
    assert {x["Key"]: (x["Value"], x["PropagateAtLaunch"]) for x in asg["Tags"]} == {
        **{k: (v, True) for k, v in ours.items()}, awsenv.TAG_ROLE: ("app", True),
        "opsbook:ssh-jump": (f"admin@{address}", True)}
    assert ours.items() <= _tags(ec2, bastion.id).items()
    assert len(asg["Instances"]) == 2
    for instance in asg["Instances"]:
        assert ours.items() <= _tags(ec2, instance["InstanceId"]).items(), instance["InstanceId"]
    ddb = boto3.client("dynamodb", endpoint_url=aws)
    table = next(r for r in found if r.role == "lock")
    assert (table.kind, table.id) == ("dynamodb-table", f"opsbook-locks-{env.name}")
    arn = ddb.describe_table(TableName=table.id)["Table"]["TableArn"]
    assert ours.items() <= {x["Key"]: x["Value"] for x in ddb.list_tags_of_resource(ResourceArn=arn)["Tags"]}.items()
    assert env.var("opsbook_record_store") == f"s3://opsbook-records-{env.name}/records"
    assert [e["runbook"] for e in store_for(env).ledger()] == ["provision"]   # its record, in its own bucket

    # Made again: refused, nothing created. Converged: changed=0, and it keeps its tags.
    with pytest.raises(provision.CreateRefused, match=r"already exists.*Nothing was created"):
        provision.create(like, "pr1", "2h")
    again = provision.provision(env)
    assert again["changed"] == 0, again["recap"]
    assert _tags(ec2, vpc.id) == tags

    listed = aws_env.environments_text([like], now=now + timedelta(minutes=30))
    line = next(x for x in listed.splitlines() if x.startswith(env.name))
    assert like.name in line
    assert tags[awsenv.TAG_OWNER] in line
    assert "1h30m" in line
    assert "EXPIRED" not in line
    later = aws_env.environments_text([like], now=now + timedelta(hours=3))
    assert "EXPIRED 1h00m ago" in later
    assert f"invoke env.destroy --env {env.name}" in later

    aws_env.destroy(env)
    assert awsenv.find(t) == []
    assert ec2.describe_instances(InstanceIds=[bastion.id])["Reservations"][0]["Instances"][0]["State"][
        "Name"] == "terminated"
    assert env.name not in aws_env.environments_text([like])
    # Gone: converging it is refused (nothing says it was created), rather than making it again untagged.
    with pytest.raises(provision.OpsbookError, match=r"nothing in account .* says it was created"):
        provision.provision(env)
