"""Aurora copy-on-write clones against a real moto server: prod's Aurora cluster cloned for staging
(both AWS environments copied from the repository's inventories onto moto's one account), tagged
for staging, its writer added and waited for, published in staging's SSM parameter, old clones
pruned; refusals (an RDS source, another account, an unknown snapshot, a cluster opsbook did not
make) change nothing. moto keeps the control plane only: it accepts RestoreType and ignores it, so
that the request asks for copy-on-write is checked on the request itself."""

from __future__ import annotations

import boto3
import pytest

from opsbook.engines.clones import aurora
from opsbook.engines.snapshots.base import PathNotBuilt, SnapshotError

pytestmark = pytest.mark.moto


def _tags(env: str, role: str) -> list[dict[str, str]]:
    return [{"Key": "opsbook:env", "Value": env}, {"Key": "opsbook:managed-by", "Value": "opsbook"},
            {"Key": "opsbook:role", "Value": role}]


def _source_cluster(url: str, env) -> str:
    """prod's database as roles/aws_env makes it: an Aurora cluster and its writer, tagged role db."""
    rds = boto3.client("rds", endpoint_url=url)
    name = f"opsbook-{env.name}"
    rds.create_db_cluster(DBClusterIdentifier=name, Engine="aurora-postgresql", EngineVersion="15.4",
                          MasterUsername="opsbook", MasterUserPassword="not-a-secret-1", Tags=_tags(env.name, "db"))
    rds.create_db_instance(DBInstanceIdentifier=f"{name}-1", DBClusterIdentifier=name, Engine="aurora-postgresql",
                           DBInstanceClass="db.r6g.large", Tags=_tags(env.name, "db-instance-1"))
    return name


def _placement(url: str, env) -> tuple[str, str]:
    """staging's private subnets, its database subnet group and sg-db, and its published address."""
    ec2 = boto3.client("ec2", endpoint_url=url)
    vpc = ec2.create_vpc(CidrBlock="10.40.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.40.1{i}.0/24", AvailabilityZone=f"us-east-1{z}")
               ["Subnet"]["SubnetId"] for i, z in ((0, "a"), (1, "b"))]
    sg = ec2.create_security_group(GroupName=f"{env.name}-db", Description="db", VpcId=vpc,
                                   TagSpecifications=[{"ResourceType": "security-group",
                                                       "Tags": _tags(env.name, "sg-db")}])["GroupId"]
    group = f"opsbook-{env.name}-db"
    boto3.client("rds", endpoint_url=url).create_db_subnet_group(
        DBSubnetGroupName=group, DBSubnetGroupDescription="db", SubnetIds=subnets, Tags=_tags(env.name, "db-subnets"))
    boto3.client("ssm", endpoint_url=url).put_parameter(
        Name=f"/opsbook/{env.name}/db-address", Value="opsbook-staging.provisioned.example", Type="String",
        Tags=_tags(env.name, "db-address"))
    return group, sg


@pytest.fixture
def pair(aws_inventory, aws):
    prod, staging = aws_inventory("prod"), aws_inventory("staging")
    cluster = _source_cluster(aws, prod)
    group, sg = _placement(aws, staging)
    return prod, staging, cluster, group, sg


def _clusters(url: str) -> set[str]:
    clusters = boto3.client("rds", endpoint_url=url).describe_db_clusters()["DBClusters"]
    return {c["DBClusterIdentifier"] for c in clusters}


def test_a_clone_is_made_in_the_targets_subnets_tagged_waited_for_published_and_pruned(pair, aws):
    prod, staging, cluster, group, sg = pair
    clones = aurora.AuroraClones(prod, staging, wait_delay=0.1, log=lambda _m: None)
    progress: list[dict] = []
    first = clones.clone(record_id="20260101T000000Z-staging_refresh-aaaaaa", progress=progress)

    rds = boto3.client("rds", endpoint_url=aws)
    raw = rds.describe_db_clusters(DBClusterIdentifier=first.id)["DBClusters"][0]
    tags = {t["Key"]: t["Value"] for t in raw["TagList"]}
    assert tags == {"opsbook:env": staging.name, "opsbook:managed-by": "opsbook",
                    "opsbook:role": "db-clone-" + first.id.rsplit("clone-", 1)[1],
                    "opsbook:record": "20260101T000000Z-staging_refresh-aaaaaa",
                    "opsbook:clone-of": f"{prod.name}/{cluster}"}
    assert raw["DBSubnetGroup"] == group
    assert [g["VpcSecurityGroupId"] for g in raw["VpcSecurityGroups"]] == [sg]
    assert raw["Engine"] == "aurora-postgresql"
    assert [m["DBInstanceIdentifier"] for m in raw["DBClusterMembers"]] == [first.instance]
    assert first.status == "available"
    assert first.restore == "copy-on-write"
    assert first.endpoint == raw["Endpoint"]
    assert progress[-1] == {"seconds": progress[-1]["seconds"], "cluster": "available", "writer": "available"}

    # Switching staging to it: its SSM parameter names the clone's endpoint; the previous value comes back.
    assert clones.publish(first.endpoint) == "opsbook-staging.provisioned.example"
    ssm = boto3.client("ssm", endpoint_url=aws)
    assert ssm.get_parameter(Name=f"/opsbook/{staging.name}/db-address")["Parameter"]["Value"] == first.endpoint
    kept = {t["Key"]: t["Value"] for t in ssm.list_tags_for_resource(
        ResourceType="Parameter", ResourceId=f"/opsbook/{staging.name}/db-address")["TagList"]}
    assert kept["opsbook:role"] == "db-address"
    clones.set_master_password(first, "staging-admin-password")

    # A second clone, then pruning to one: the published one stays, whatever its age.
    second = clones.clone(record_id="20260101T000100Z-staging_refresh-bbbbbb")
    assert [c["id"] for c in clones.clones()] == sorted([first.id, second.id])
    assert clones.prune(keep=1, serving=first.id) == []            # first is served, second is the newest
    clones.publish(second.endpoint)
    assert clones.prune(keep=1, serving=second.id) == [first.id]
    assert first.id not in _clusters(aws)
    assert {cluster, second.id} <= _clusters(aws)                  # prod's own cluster untouched


def test_the_request_asks_for_copy_on_write_at_the_latest_restorable_time():
    call, params = aurora.restore_request("arn:src", "opsbook-staging-clone-x", subnet_group="g", security_group="sg",
                                          tags=[])
    assert call == "restore_db_cluster_to_point_in_time"
    assert params["RestoreType"] == "copy-on-write"
    assert params["UseLatestRestorableTime"] is True
    assert params["SourceDBClusterIdentifier"] == "arn:src"
    call, params = aurora.restore_request("arn:src", "c", subnet_group="g", security_group="sg", tags=[],
                                          snapshot="snap-1")
    assert (call, params["SnapshotIdentifier"]) == ("restore_db_cluster_from_snapshot", "snap-1")
    assert "RestoreType" not in params


def test_a_clone_from_a_named_snapshot_and_an_unknown_snapshot_refused(pair, aws):
    prod, staging, cluster, _, _ = pair
    rds = boto3.client("rds", endpoint_url=aws)
    rds.create_db_cluster_snapshot(DBClusterSnapshotIdentifier="prod-nightly", DBClusterIdentifier=cluster)
    clones = aurora.AuroraClones(prod, staging, wait_delay=0.1, log=lambda _m: None)
    before = _clusters(aws)
    with pytest.raises(SnapshotError, match=r"no snapshot 'prod-nightly-typo' of .*Nothing was done"):
        clones.clone(record_id="r", snapshot="prod-nightly-typo")
    assert _clusters(aws) == before
    made = clones.clone(record_id="r", snapshot="prod-nightly")
    assert made.restore == "snapshot prod-nightly"
    assert made.status == "available"


def test_an_rds_source_is_refused_saying_what_would_happen_instead(aws_inventory, aws):
    staging_src, target = aws_inventory("staging"), aws_inventory("staging")
    rds = boto3.client("rds", endpoint_url=aws)
    rds.create_db_instance(DBInstanceIdentifier=f"opsbook-{staging_src.name}", Engine="postgres",
                           DBInstanceClass="db.t4g.medium", AllocatedStorage=20, MasterUsername="opsbook",
                           MasterUserPassword="not-a-secret-1", Tags=_tags(staging_src.name, "db"))
    before = _clusters(aws)
    with pytest.raises(PathNotBuilt, match=r"is an RDS instance, and copy-on-write cloning exists only for Aurora.*"
                                           r"restore its newest snapshot.*not built. Nothing was changed"):
        aurora.AuroraClones(staging_src, target, log=lambda _m: None).clone(record_id="r")
    assert _clusters(aws) == before


def test_a_source_in_another_account_is_refused_before_any_call(aws_inventory, aws):
    prod = aws_inventory("prod", opsbook_aws_account_id="123098765432")
    staging = aws_inventory("staging")
    with pytest.raises(PathNotBuilt, match=r"account 123098765432 .* through AWS RAM .* not built"):
        aurora.AuroraClones(prod, staging, log=lambda _m: None).check()


def test_opsbook_never_deletes_a_cluster_it_did_not_clone(pair, aws):
    prod, staging, cluster, _, _ = pair
    clones = aurora.AuroraClones(prod, staging, log=lambda _m: None)
    with pytest.raises(aurora.AuroraCloneError, match=r"not a clone opsbook made.*Nothing was deleted"):
        clones.discard(cluster)
    assert cluster in _clusters(aws)
