"""End to end without AWS: `invoke release --env E` where E is an AWS environment whose control plane
is the moto server and whose instances are the lab's real hosts (moto keeps the private address an
instance is created with). The release goes through the aws_ec2 inventory plugin (hosts found by
their tags in moto), the account guard (STS), secrets from Secrets Manager, the DynamoDB lock and
the S3 record store, to real hosts over SSH, under the probe, with zero failed requests.

E is built for the run, outside the repository (OPSBOOK_INVENTORY_PATH), from the lab's inventory:
its hosts.yml replaced by an aws_ec2.yml, its secrets read from Secrets Manager instead of .lab/,
its lock and records in moto. Its database is a managed one, as in AWS: no db host in the inventory,
its address read from SSM Parameter Store (bl_api_db_address, as `invoke provision` publishes an RDS
endpoint), where the lab's db1 answers. Load balancing stays haproxy on lb1 (moto's ALB forwards
nothing).
"""

from __future__ import annotations

import shutil
import uuid

import boto3
import pytest
import yaml

from opsbook.core.inventory import INVENTORY_PATH_VARIABLE, load
from opsbook.core.paths import INVENTORIES
from opsbook.engines import database
from opsbook.engines import fleet as fleets
from opsbook.engines.records.store import store_for
from tests.fixtures.aws_env import MOTO_ACCOUNT
from tests.fixtures.lab import haproxy_status, invoke

pytestmark = [pytest.mark.lab, pytest.mark.moto, pytest.mark.slow]

REGION = "us-east-1"


def _make_environment(root, name: str, endpoint: str, lab) -> None:
    """inventories-like directory `root/name`: the lab's inventory, its hosts found in moto by tags."""
    path = root / name
    shutil.copytree(INVENTORIES / "lab", path)
    (path / "hosts.yml").write_text(yaml.safe_dump({"all": {"children": {"lb": {}, "app": {}, "db": {}}}}))
    (path / "aws_ec2.yml").write_text(yaml.safe_dump({
        "plugin": "amazon.aws.aws_ec2",
        "regions": [REGION],
        "filters": {"tag:opsbook:env": name, "tag:opsbook:managed-by": "opsbook",
                    "instance-state-name": "running"},
        "hostnames": ["tag:Name"],            # the lab's names, which its haproxy backend knows
        "compose": {"ansible_host": "private_ip_address"},
        "groups": {g: f"tags.get('opsbook:role') == '{g}'" for g in ("app", "lb", "db")},
    }))
    secret = ("{{{{ lookup('amazon.aws.secretsmanager_secret', opsbook_aws_secret_prefix ~ '{}', "
              "region=opsbook_aws_region) }}}}")
    (path / "group_vars" / "all" / "zz-aws.yml").write_text(yaml.safe_dump({
        "opsbook_env_kind": "aws",
        "opsbook_aws_account_id": MOTO_ACCOUNT,
        "opsbook_aws_region": REGION,
        "opsbook_aws_profile": "",
        "opsbook_aws_endpoint_url": endpoint,
        "opsbook_aws_secret_prefix": f"opsbook/{name}/",
        "opsbook_record_store": f"s3://opsbook-records-{name}/records",
        "opsbook_lock_backend": "dynamodb",
        "opsbook_lock_table": f"opsbook-locks-{name}",
        "bl_api_db_address": ("{{ lookup('amazon.aws.ssm_parameter', '/opsbook/' ~ opsbook_env_name ~ '/db-address', "
                              "region=opsbook_aws_region) }}"),
        "vault_bl_api_db_password": secret.format("bl_api_db_password"),
        "vault_opsbook_db_admin_password": secret.format("opsbook_db_admin_password"),
    }))

    # The control plane: the lab's hosts as instances, the secrets, the lock table, the records bucket.
    ec2 = boto3.client("ec2", endpoint_url=endpoint, region_name=REGION)
    vpc = ec2.create_vpc(CidrBlock="10.89.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=lab.var("opsbook_lab_subnet"))["Subnet"]["SubnetId"]
    for host in lab.hosts():
        role = next((g for g in ("app", "lb", "db") if g in host.groups), None)
        if role in (None, "db"):   # the database is a managed one (below); db2 is the lab's staging database
            continue
        ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType="t3.small", SubnetId=subnet,
                          PrivateIpAddress=host.address, TagSpecifications=[{"ResourceType": "instance", "Tags": [
                              {"Key": "opsbook:env", "Value": name}, {"Key": "opsbook:managed-by", "Value": "opsbook"},
                              {"Key": "opsbook:role", "Value": role}, {"Key": "Name", "Value": host.name}]}])
    boto3.client("ssm", endpoint_url=endpoint, region_name=REGION).put_parameter(
        Name=f"/opsbook/{name}/db-address", Value=lab.host("db1").address, Type="String",
        Tags=[{"Key": "opsbook:env", "Value": name}, {"Key": "opsbook:managed-by", "Value": "opsbook"},
              {"Key": "opsbook:role", "Value": "db-address"}])
    sm = boto3.client("secretsmanager", endpoint_url=endpoint, region_name=REGION)
    for var, value in lab.secret_values().items():   # the lab's databases know these passwords
        sm.create_secret(Name=f"opsbook/{name}/{var.removeprefix('vault_')}", SecretString=value)
    boto3.client("dynamodb", endpoint_url=endpoint, region_name=REGION).create_table(
        TableName=f"opsbook-locks-{name}", KeySchema=[{"AttributeName": "lock_id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "lock_id", "AttributeType": "S"}], BillingMode="PAY_PER_REQUEST")
    boto3.client("s3", endpoint_url=endpoint, region_name=REGION).create_bucket(Bucket=f"opsbook-records-{name}")


def test_a_release_to_an_aws_environment_of_real_hosts(lab_env, fleet, aws, monkeypatch, tmp_path):
    _, b = fleet   # the lab serves the other one; this environment's release brings b
    name = f"awslab-{uuid.uuid4().hex[:6]}"
    _make_environment(tmp_path, name, aws, lab_env)
    monkeypatch.setenv(INVENTORY_PATH_VARIABLE, str(tmp_path))
    monkeypatch.setenv("AWS_URL", aws)
    env = load(name)
    assert env.kind == "aws"
    assert sorted(h.name for h in env.hosts("app")) == sorted(h.name for h in lab_env.hosts("app"))
    assert {h.address for h in env.hosts()} < {h.address for h in lab_env.hosts()}
    assert env.hosts("db") == []
    assert database.address(env) == lab_env.host("db1").address

    proc = invoke("release", "--env", name, "--version", b)
    out = proc.stdout + proc.stderr
    failing = [line for line in out.splitlines() if line.startswith(("FAILED", "E  ", "fatal:", "ERROR"))]
    assert proc.returncode == 0, "\n".join(failing[:80]) + "\n...\n" + out[-3000:]

    # The lab's real hosts serve b, each UP in haproxy; the record is in the environment's bucket
    # (moto's S3), with the probe's figures: no failed request, no lost acknowledged write.
    assert set(fleets.served_versions(lab_env).values()) == {b}
    assert all(haproxy_status(h.name) == "UP" for h in lab_env.hosts("app"))
    releases = [e for e in store_for(env).ledger() if e["runbook"] == "release"]
    assert [e["outcome"] for e in releases] == ["succeeded"]
    figures = releases[0]["figures"]
    assert figures["version"] == b
    assert figures["requests"] > 0, figures
    # Its configuration (a new inventory) differs from the one the hosts were converged to: the release
    # converged them under the probe, and not one request failed for it.
    assert set(figures["converged"]) >= {h.name for h in lab_env.hosts("app")}, figures
    assert figures["failed_requests"] == 0, figures
    assert figures["missing_acknowledged_writes"] == 0, figures
    # The lock was taken and released in DynamoDB: free again.
    assert "free" in invoke("lock", "--env", name, check=True).stdout
    # The lab's own records did not get this release: it belongs to the other environment.
    assert not any(e["id"] == releases[0]["id"] for e in store_for(lab_env).ledger())
