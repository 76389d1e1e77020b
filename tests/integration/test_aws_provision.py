"""`invoke provision` and `invoke env.destroy` of an AWS environment against a real moto server:
from nothing, again with changed=0, a record in the environment's bucket, no secret on disk or in a
record, and a destroy that deletes exactly what is tagged for the environment. Refusals (two
resources for one role, prod without a reason or its name typed back) change nothing."""

from __future__ import annotations

import json
import subprocess

import boto3
import pytest

from opsbook.core.inventory import Env
from opsbook.core.paths import ROOT
from opsbook.engines import aws as awsenv
from opsbook.engines import database
from opsbook.engines.ansible import ansible_env
from opsbook.engines.records.store import store_for
from opsbook.operations import aws_env, provision
from tests.fixtures.aws_env import LOCK_IN_A_TABLE
from tests.infra.conftest import _plain  # importing it also applies its fix to testinfra's inventory reading

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


def _ways_in(env: Env) -> dict[str, str | None]:
    """host -> the ansible_ssh_common_args `ansible-inventory --list` gives it (None: none), run as opsbook
    runs Ansible."""
    proc = subprocess.run(["ansible-inventory", "-i", str(env.path), "--list"], env=ansible_env(env),
                          capture_output=True, text=True, check=True, timeout=120)
    return {host: _plain(hostvars.get("ansible_ssh_common_args"))
            for host, hostvars in json.loads(proc.stdout)["_meta"]["hostvars"].items()}


def _testinfra_ssh_args(env: Env, host: str, monkeypatch) -> str:
    """The SSH arguments testinfra would use for `host`, reading the inventory as `invoke check` has it
    read (tests/infra/conftest.py's fix applied): nothing is connected to."""
    from testinfra.utils.ansible_runner import AnsibleRunner

    for name, value in ansible_env(env).items():
        monkeypatch.setenv(name, value)
    return AnsibleRunner(str(env.path)).get_host(host).backend.ssh_extra_args


def _check_the_lock_home(env: Env, lock: awsenv.Resource, aws: str) -> None:
    """The lock's home: its own bucket, or a DynamoDB table keyed as the lock engine expects, on demand,
    without point-in-time recovery, tagged like everything else."""
    if env.var("opsbook_lock_backend") != "dynamodb":
        assert (lock.kind, lock.id) == ("s3-bucket", env.var("opsbook_lock_bucket"))
        return
    ddb = boto3.client("dynamodb", endpoint_url=aws)
    table_name = env.var("opsbook_lock_table")
    assert (lock.kind, lock.id) == ("dynamodb-table", table_name)
    table = ddb.describe_table(TableName=table_name)["Table"]
    assert table["KeySchema"] == [{"AttributeName": "lock_id", "KeyType": "HASH"}]
    assert table["AttributeDefinitions"] == [{"AttributeName": "lock_id", "AttributeType": "S"}]
    assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    assert ddb.describe_continuous_backups(TableName=table_name)["ContinuousBackupsDescription"][
        "PointInTimeRecoveryDescription"]["PointInTimeRecoveryStatus"] == "DISABLED"
    tags = {x["Key"]: x["Value"] for x in ddb.list_tags_of_resource(ResourceArn=table["TableArn"])["Tags"]}
    assert tags == {"opsbook:env": env.name, "opsbook:managed-by": "opsbook", "opsbook:role": "lock"}


# The release lock in each of its AWS homes: staging's inventory keeps it in an S3 bucket, and the prod
# case is given a DynamoDB table instead (opsbook_lock_backend: dynamodb), so that both are provisioned.
# Staging has its bastion (the inventory's aws_env_bastion), turned off in a third run; the prod case has
# none from the start. moto runs no SSH server: the rules, the inventory's ProxyJump and the removal are
# what is checked, not a connection.
@pytest.mark.slow   # two or three full Ansible runs (~45 tasks each) and a destroy: 3-5 minutes on a busy machine
@pytest.mark.parametrize(("base", "overrides"), [("staging", {}),
                                                 ("prod", {**LOCK_IN_A_TABLE, "aws_env_bastion": False})],
                         ids=["staging-rds-s3-lock-bastion", "prod-aurora-dynamodb-lock-no-bastion"])
def test_provision_from_nothing_then_changed_0_then_destroy_leaves_other_envs_alone(aws_inventory, aws, base,
                                                                                   overrides, monkeypatch):
    env = aws_inventory(base, **overrides)
    lock_table = env.var("opsbook_lock_backend") == "dynamodb"
    bastion_on = bool(env.var("aws_env_bastion"))
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
                      "app", "db-subnets", "db", "db-address"} | ({"sg-bastion", "bastion"} if bastion_on else set())
    assert expected_roles <= set(found), expected_roles - set(found)
    assert bastion_on or not {"sg-bastion", "bastion"} & set(found)
    assert all(r.env == env.name for r in awsenv.find(t))

    # Security groups: clients -> lb on 80; lb -> app on the service port only; app -> db on 5432 only. With
    # a bastion: the operators' networks -> bastion on 22 only; bastion -> app hosts on 22 only; the
    # database (RDS/Aurora, no sshd) admits no SSH.
    sg = {role: r.id for role, r in found.items() if role.startswith("sg-")}
    assert _ingress(ec2, sg["sg-lb"]) == [("tcp", 80, 80, (), ("0.0.0.0/0",))]
    lb_to_app = ("tcp", 8000, 8000, (sg["sg-lb"],), ())
    if bastion_on:
        assert _ingress(ec2, sg["sg-bastion"]) == [("tcp", 22, 22, (), tuple(env.var("aws_env_operator_cidrs")))]
        assert _ingress(ec2, sg["sg-app"]) == [("tcp", 22, 22, (sg["sg-bastion"],), ()), lb_to_app]
    else:
        assert _ingress(ec2, sg["sg-app"]) == [lb_to_app]
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
    # The bastion: in the first public subnet, behind its own group, with a public address.
    jump = None
    if bastion_on:
        bastion = ec2.describe_instances(InstanceIds=[found["bastion"].id])["Reservations"][0]["Instances"][0]
        assert bastion["SubnetId"] == found["subnet-public-0"].id
        assert [g["GroupId"] for g in bastion["SecurityGroups"]] == [sg["sg-bastion"]]
        jump = f"admin@{bastion['PublicIpAddress']}"
    # The app hosts' group carries the environment's tags (and the way in), each propagated to the instances
    # it starts.
    asg = boto3.client("autoscaling", endpoint_url=aws).describe_auto_scaling_groups(
        AutoScalingGroupNames=[group.id])["AutoScalingGroups"][0]
    assert {x["Key"]: (x["Value"], x["PropagateAtLaunch"]) for x in asg["Tags"]} == {
        "opsbook:env": (env.name, True), "opsbook:managed-by": ("opsbook", True), "opsbook:role": ("app", True),
        **({"opsbook:ssh-jump": (jump, True)} if jump else {})}
    # The inventory reaches each app host through the bastion (ProxyJump), and lists no bastion; testinfra
    # reads the same; without a bastion there is no ProxyJump.
    app_hosts = sorted(i["InstanceId"] for i in asg["Instances"])
    assert len(app_hosts) == env.var("aws_env_app_desired")
    assert _ways_in(env) == dict.fromkeys(app_hosts, f"-o ProxyJump={jump}" if jump else None)
    if jump:
        assert f"-o ProxyJump={jump}" in _testinfra_ssh_args(env, app_hosts[0], monkeypatch)
    # The records bucket: versioned, encrypted, no public access.
    s3 = boto3.client("s3", endpoint_url=aws)
    bucket = found["records"].id
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    assert s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert all(s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"].values())
    _check_the_lock_home(env, found["lock"], aws)
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

    if bastion_on:
        # Turned off in the inventory: the next converge terminates the bastion, deletes its group, takes
        # the SSH rule out of the app hosts' group, and the hosts lose their way in.
        (env.path / "group_vars" / "all" / "zz-no-bastion.yml").write_text("aws_env_bastion: false\n")
        off = provision.provision(Env(env.name, path=env.path))
        assert off["changed"] > 0, off["recap"]
        now = {r.role: r for r in awsenv.find(t)}
        assert not {"bastion", "sg-bastion"} & set(now), now.keys()
        assert ec2.describe_instances(InstanceIds=[found["bastion"].id])["Reservations"][0]["Instances"][0][
            "State"]["Name"] == "terminated"
        assert _ingress(ec2, sg["sg-app"]) == [lb_to_app]
        asg = boto3.client("autoscaling", endpoint_url=aws).describe_auto_scaling_groups(
            AutoScalingGroupNames=[group.id])["AutoScalingGroups"][0]
        assert "opsbook:ssh-jump" not in {x["Key"] for x in asg["Tags"]}
        assert _ways_in(env) == dict.fromkeys(app_hosts)

    deleted = aws_env.destroy(env, reason="test teardown", confirm=env.name)   # prod asks for both
    assert {r.role for r in deleted} >= expected_roles - {"bastion", "sg-bastion"}
    assert awsenv.find(t) == []
    assert ec2.describe_vpcs(VpcIds=[other_vpc])["Vpcs"], "another environment's VPC was deleted"
    if lock_table:
        tables = boto3.client("dynamodb", endpoint_url=aws).list_tables()["TableNames"]
        assert env.var("opsbook_lock_table") not in tables


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
    directory can be made (under a regular file: even root gets ENOTDIR): no AnsiballZ_*.py holding
    the arguments (the generated values) can be written there. The play runs its modules in memory
    (Mitogen, which then takes its working directories from the system's temporary directories, here
    kept to the test too; without Mitogen, pipelining: arguments on stdin). The controller's own
    temporary directory is kept to the test, and everything under it is searched for the values
    afterwards."""
    from opsbook.engines import ansible

    env = aws_inventory("staging")
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    local = tmp_path / "ansible-local"
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setenv("ANSIBLE_REMOTE_TEMP", str(blocker / "tmp"))
    monkeypatch.setenv("ANSIBLE_LOCAL_TEMP", str(local))
    monkeypatch.setenv("ANSIBLE_SYSTEM_TMPDIRS", str(system_tmp))
    monkeypatch.setenv("TMPDIR", str(system_tmp))
    recap = ansible.run_playbook(env, "provision-aws.yml", extra_vars={"opsbook_env_name": env.name},
                                 tags="aws_env_secrets")
    assert recap["localhost"]["changed"] == 1   # one loop task, two secrets
    sm = boto3.client("secretsmanager", endpoint_url=aws)
    values = [sm.get_secret_value(SecretId=f"opsbook/{env.name}/{n}")["SecretString"]
              for n in ("bl_api_db_password", "opsbook_db_admin_password")]
    for path in (p for p in tmp_path.rglob("*") if p.is_file()):
        data = path.read_bytes().decode(errors="replace")
        assert not any(v in data for v in values), f"a generated secret is in {path}"
