"""`invoke provision` and `invoke env.destroy` of an AWS environment against a real moto server:
from nothing, again with changed=0, a record in the environment's bucket, no secret on disk or in a
record, and a destroy that deletes exactly what is tagged for the environment. Refusals (two
resources for one role, prod without a reason or its name typed back) change nothing."""

from __future__ import annotations

import subprocess

import boto3
import pytest

from opsbook.core.inventory import Env
from opsbook.core.paths import ROOT
from opsbook.engines import aws as awsenv
from opsbook.engines import database
from opsbook.engines.records.store import store_for
from opsbook.operations import aws_env, provision
from tests.fixtures.aws_env import LOCK_IN_A_TABLE

pytestmark = pytest.mark.moto


def _tag_spec(kind: str, env: str, role: str) -> list[dict]:
    return [{"ResourceType": kind, "Tags": [{"Key": "opsbook:env", "Value": env},
                                            {"Key": "opsbook:managed-by", "Value": "opsbook"},
                                            {"Key": "opsbook:role", "Value": role}]}]


def _ingress(ec2, group_id: str) -> list[tuple]:
    sg = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
    return sorted((p["IpProtocol"], p.get("FromPort"), p.get("ToPort"),
                   tuple(sorted(g["GroupId"] for g in p.get("UserIdGroupPairs", []))),
                   tuple(sorted(r["CidrIp"] for r in p.get("IpRanges", []))))
                  for p in sg["IpPermissions"])


def _working_tree_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return [line for line in out.splitlines() if line]


# The release lock in each of its AWS homes: staging's inventory keeps it in an S3 bucket, and the prod
# case is given a DynamoDB table instead (opsbook_lock_backend: dynamodb), so that both are provisioned.
@pytest.mark.slow   # two full Ansible runs (33 tasks each) and a destroy: 2-4 minutes on a busy 2-core machine
@pytest.mark.parametrize(("base", "lock"), [("staging", {}), ("prod", LOCK_IN_A_TABLE)],
                         ids=["staging-rds-s3-lock", "prod-aurora-dynamodb-lock"])
def test_provision_from_nothing_then_changed_0_then_destroy_leaves_other_envs_alone(aws_inventory, aws, base, lock):
    env = aws_inventory(base, **lock)
    ec2 = boto3.client("ec2", endpoint_url=aws)
    # Another environment's VPC, tagged like ours but for another env: provisioning and destroy ignore it.
    other = f"other-{env.name[-6:]}"
    other_vpc = ec2.create_vpc(CidrBlock="10.99.0.0/16",
                               TagSpecifications=_tag_spec("vpc", other, "vpc"))["Vpc"]["VpcId"]

    first = provision.provision(env)
    assert first["outcome"] == "succeeded"
    assert first["changed"] > 10, first["recap"]
    t = awsenv.target(env)
    found = {r.role: r for r in awsenv.find(t)}
    expected_roles = {"vpc", "subnet-public-0", "subnet-public-1", "subnet-private-0", "subnet-private-1", "igw",
                      "route-public", "sg-lb", "sg-app", "sg-db", "iam-app", "profile-app", "records", "lock",
                      "secret-bl_api_db_password", "secret-opsbook_db_admin_password", "tg-app", "alb", "lt-app",
                      "app", "db-subnets", "db", "db-address"}
    assert expected_roles <= set(found), expected_roles - set(found)
    assert all(r.env == env.name for r in awsenv.find(t))

    # Security groups: clients -> lb on 80; lb -> app on the service port only; app -> db on 5432 only.
    sg = {role: found[role].id for role in ("sg-lb", "sg-app", "sg-db")}
    assert _ingress(ec2, sg["sg-lb"]) == [("tcp", 80, 80, (), ("0.0.0.0/0",))]
    assert _ingress(ec2, sg["sg-app"]) == [("tcp", 8000, 8000, (sg["sg-lb"],), ())]
    assert _ingress(ec2, sg["sg-db"]) == [("tcp", 5432, 5432, (sg["sg-app"],), ())]
    # Subnets in two zones; the ALB's target group checks /ping.
    zones = {found[f"subnet-{kind}-{i}"].extra["az"] for kind in ("public", "private") for i in (0, 1)}
    assert len(zones) == 2
    tg = boto3.client("elbv2", endpoint_url=aws).describe_target_groups(
        TargetGroupArns=[found["tg-app"].id])["TargetGroups"][0]
    assert (tg["HealthCheckPath"], tg["Port"]) == ("/ping", 8000)
    # The app hosts' group scales on average CPU (what the scaling check's Auto Scaling section reads).
    group = next(r for r in awsenv.find(t) if r.kind == "autoscaling-group")
    policies = boto3.client("autoscaling", endpoint_url=aws).describe_policies(
        AutoScalingGroupName=group.id)["ScalingPolicies"]
    assert [(p["PolicyType"], p["TargetTrackingConfiguration"]["PredefinedMetricSpecification"]
             ["PredefinedMetricType"], p["TargetTrackingConfiguration"]["TargetValue"]) for p in policies] == [
        ("TargetTrackingScaling", "ASGAverageCPUUtilization", 50.0)]
    # ... and carries the environment's tags, each propagated to the instances it starts.
    asg = boto3.client("autoscaling", endpoint_url=aws).describe_auto_scaling_groups(
        AutoScalingGroupNames=[group.id])["AutoScalingGroups"][0]
    assert {x["Key"]: (x["Value"], x["PropagateAtLaunch"]) for x in asg["Tags"]} == {
        "opsbook:env": (env.name, True), "opsbook:managed-by": ("opsbook", True), "opsbook:role": ("app", True)}
    # The records bucket: versioned, encrypted, no public access.
    s3 = boto3.client("s3", endpoint_url=aws)
    bucket = found["records"].id
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    assert s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert all(s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"].values())
    # The lock's home: its own bucket, or a DynamoDB table keyed as the lock engine expects, on demand,
    # without point-in-time recovery, tagged like everything else.
    ddb = boto3.client("dynamodb", endpoint_url=aws)
    if lock:
        table_name = env.var("opsbook_lock_table")
        assert (found["lock"].kind, found["lock"].id) == ("dynamodb-table", table_name)
        table = ddb.describe_table(TableName=table_name)["Table"]
        assert table["KeySchema"] == [{"AttributeName": "lock_id", "KeyType": "HASH"}]
        assert table["AttributeDefinitions"] == [{"AttributeName": "lock_id", "AttributeType": "S"}]
        assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
        assert ddb.describe_continuous_backups(TableName=table_name)["ContinuousBackupsDescription"][
            "PointInTimeRecoveryDescription"]["PointInTimeRecoveryStatus"] == "DISABLED"
        tags = {x["Key"]: x["Value"] for x in ddb.list_tags_of_resource(ResourceArn=table["TableArn"])["Tags"]}
        assert tags == {"opsbook:env": env.name, "opsbook:managed-by": "opsbook", "opsbook:role": "lock"}
    else:
        assert (found["lock"].kind, found["lock"].id) == ("s3-bucket", env.var("opsbook_lock_bucket"))
    # The database in the private subnets, behind sg-db: staging one RDS PostgreSQL instance, prod an
    # Aurora PostgreSQL cluster with two instances.
    rds = boto3.client("rds", endpoint_url=aws)
    if env.var("aws_env_db_kind") == "rds":
        db = rds.describe_db_instances(DBInstanceIdentifier=found["db"].id)["DBInstances"][0]
        assert db["Engine"] == "postgres"
    else:
        db = rds.describe_db_clusters(DBClusterIdentifier=found["db"].id)["DBClusters"][0]
        assert db["Engine"] == "aurora-postgresql"
        assert len(db["DBClusterMembers"]) == 2
        assert {"db-instance-1", "db-instance-2"} <= set(found)
    assert [g["VpcSecurityGroupId"] for g in db["VpcSecurityGroups"]] == [sg["sg-db"]]
    assert db["StorageEncrypted"]
    # Its address, published in SSM Parameter Store, is what the inventory (and so the app hosts'
    # DATABASE_URL and opsbook's admin connection) uses.
    endpoint = db["Endpoint"]["Address"] if isinstance(db["Endpoint"], dict) else db["Endpoint"]   # instance, cluster
    published = boto3.client("ssm", endpoint_url=aws).get_parameter(Name=f"/opsbook/{env.name}/db-address")
    assert published["Parameter"]["Value"] == endpoint
    assert Env(env.name, path=env.path).var("bl_api_db_address") == endpoint
    assert database.address(Env(env.name, path=env.path)) == endpoint

    second = provision.provision(env)
    assert second["changed"] == 0, second["recap"]
    assert second["after"] == first["after"]

    # Both runs left a record in the environment's bucket; no secret value is in a record or a file.
    ledger = [e for e in store_for(env).ledger() if e["runbook"] == "provision"]
    assert [e["figures"]["changed"] for e in ledger] == [first["changed"], 0]
    assert all(e["outcome"] == "succeeded" and e["figures"]["account"] == t.account_id for e in ledger)
    sm = boto3.client("secretsmanager", endpoint_url=aws)
    values = [sm.get_secret_value(SecretId=found[f"secret-{n}"].id)["SecretString"]
              for n in ("bl_api_db_password", "opsbook_db_admin_password")]
    assert all(len(v) == 32 for v in values)
    # The inventory's vault_ variables read them through Secrets Manager lookups (what redaction hides).
    assert Env(env.name, path=env.path).secret_values() == dict(
        zip(("vault_bl_api_db_password", "vault_opsbook_db_admin_password"), values, strict=True))
    store = store_for(env)
    for key in store.keys(""):
        blob = store.get(key).decode(errors="replace")
        assert not any(v in blob for v in values), f"a secret value is in record {key}"
    for rel in _working_tree_files() + [str(p) for p in env.path.rglob("*") if p.is_file()]:
        path = ROOT / rel
        if path.is_file():
            text = path.read_bytes().decode(errors="replace")
            assert not any(v in text for v in values), f"a secret value is in {path}"

    deleted = aws_env.destroy(env, reason="test teardown", confirm=env.name)   # prod asks for both
    assert {r.role for r in deleted} >= expected_roles
    assert awsenv.find(t) == []
    assert ec2.describe_vpcs(VpcIds=[other_vpc])["Vpcs"], "another environment's VPC was deleted"
    if lock:
        assert env.var("opsbook_lock_table") not in ddb.list_tables()["TableNames"]


def test_two_resources_for_one_role_are_refused_naming_both_and_nothing_changes(aws_inventory, aws):
    env = aws_inventory("staging")
    ec2 = boto3.client("ec2", endpoint_url=aws)
    vpcs = [ec2.create_vpc(CidrBlock=cidr, TagSpecifications=_tag_spec("vpc", env.name, "vpc"))["Vpc"]["VpcId"]
            for cidr in ("10.40.0.0/16", "10.41.0.0/16")]
    with pytest.raises(awsenv.AmbiguousResources) as e:
        provision.provision(env)
    assert all(v in str(e.value) for v in vpcs)
    assert "role vpc" in str(e.value)
    assert "Nothing was changed" in str(e.value)
    assert sorted(r.id for r in awsenv.find(awsenv.target(env))) == sorted(vpcs)


def test_destroying_prod_needs_a_reason_and_its_name_typed_back(aws_inventory, aws):
    env = aws_inventory("prod")
    assert env.var("opsbook_confirm") is True
    t = awsenv.target(env)
    ec2 = boto3.client("ec2", endpoint_url=aws)
    vpc = ec2.create_vpc(CidrBlock="10.50.0.0/16", TagSpecifications=_tag_spec("vpc", env.name, "vpc"))["Vpc"]["VpcId"]
    boto3.client("s3", endpoint_url=aws).create_bucket(Bucket=env.var("opsbook_lock_bucket"))   # the lock's home

    with pytest.raises(aws_env.DestroyRefused, match=r"needs --reason.*Nothing was deleted"):
        aws_env.destroy(env, confirm=env.name)
    with pytest.raises(aws_env.DestroyRefused, match=r"'staging'\) is not .*Nothing was deleted"):
        aws_env.destroy(env, reason="test", ask=lambda _prompt: "staging")
    with pytest.raises(aws_env.DestroyRefused, match=rf"no terminal to ask: pass --confirm {env.name}"):
        aws_env.destroy(env, reason="test")     # pytest's stdin is not a terminal
    assert [r.id for r in awsenv.find(t)] == [vpc]
    assert aws_env.destroy(env, dry_run=True) == []
    assert [r.id for r in awsenv.find(t)] == [vpc]

    deleted = aws_env.destroy(env, reason="decommissioned in a test", ask=lambda _prompt: env.name)
    assert [r.id for r in deleted] == [vpc]
    assert awsenv.find(t) == []


def test_generated_secrets_never_reach_a_file_not_even_ansibles_temporary_ones(aws_inventory, aws, tmp_path,
                                                                               monkeypatch):
    """The secrets layer alone, with Ansible's temporary directory for module files placed where no
    directory can be made (under a regular file: even root gets ENOTDIR): the run only succeeds if
    every module gets its arguments (the generated values) on stdin. The controller's own temporary
    directory is kept to the test and searched for the values afterwards."""
    from opsbook.engines import ansible

    env = aws_inventory("staging")
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    local = tmp_path / "ansible-local"
    monkeypatch.setenv("ANSIBLE_REMOTE_TEMP", str(blocker / "tmp"))
    monkeypatch.setenv("ANSIBLE_LOCAL_TEMP", str(local))
    recap = ansible.run_playbook(env, "provision-aws.yml", extra_vars={"opsbook_env_name": env.name},
                                 tags="aws_env_secrets")
    assert recap["localhost"]["changed"] == 1   # one loop task, two secrets
    sm = boto3.client("secretsmanager", endpoint_url=aws)
    values = [sm.get_secret_value(SecretId=f"opsbook/{env.name}/{n}")["SecretString"]
              for n in ("bl_api_db_password", "opsbook_db_admin_password")]
    for path in (p for p in tmp_path.rglob("*") if p.is_file()):
        data = path.read_bytes().decode(errors="replace")
        assert not any(v in data for v in values), f"a generated secret is in {path}"
