"""`invoke snapshot`, `snapshot.list` and `snapshot.drill` of AWS environments against a real moto
server: an RDS DB snapshot (staging's kind) and an Aurora cluster snapshot (prod's), tagged with the
env, the record and the reason, a record in the environment's bucket that says no manifest was
taken, retention that deletes only opsbook's own older snapshots (never the newest, never a
release's safety point, never one opsbook did not take), and a drill that says NOT VERIFIED and
fails. The database is created here with the tags provisioning gives it (roles/aws_env): a full
provisioning is test_aws_provision's business and takes minutes."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import boto3
import pytest

from opsbook.engines.records.store import store_for
from opsbook.engines.snapshots import base
from opsbook.engines.snapshots.aws import NO_MANIFEST, AwsSnapshots
from opsbook.operations import snapshot as snapshots

pytestmark = [pytest.mark.moto, pytest.mark.kernel]


def _tags(env: str, role: str) -> list[dict[str, str]]:
    return [{"Key": "opsbook:env", "Value": env}, {"Key": "opsbook:managed-by", "Value": "opsbook"},
            {"Key": "opsbook:role", "Value": role}]


def _stores(aws, env) -> None:
    """The buckets `invoke provision` creates for the records and the lock."""
    s3 = boto3.client("s3", endpoint_url=aws)
    for bucket in (f"opsbook-records-{env.name}", f"opsbook-locks-{env.name}"):
        s3.create_bucket(Bucket=bucket)


def _database(aws, env) -> str:
    """The environment's database as roles/aws_env makes it: an RDS instance or an Aurora cluster
    tagged opsbook:role=db."""
    rds = boto3.client("rds", endpoint_url=aws)
    name = f"opsbook-{env.name}"
    if env.var("aws_env_db_kind") == "aurora":
        rds.create_db_cluster(DBClusterIdentifier=name, Engine="aurora-postgresql", EngineVersion="15.4",
                              MasterUsername="opsbook", MasterUserPassword="not-a-secret-1", Tags=_tags(env.name, "db"))
    else:
        rds.create_db_instance(DBInstanceIdentifier=name, Engine="postgres", EngineVersion="15.4",
                               DBInstanceClass="db.t4g.medium", AllocatedStorage=20, MasterUsername="opsbook",
                               MasterUserPassword="not-a-secret-1", Tags=_tags(env.name, "db"))
    return name


@pytest.mark.parametrize("base_env", ["staging", "prod"], ids=["staging-rds", "prod-aurora"])
def test_a_snapshot_is_tagged_waited_for_and_recorded_without_a_manifest(aws_inventory, aws, base_env):
    env = aws_inventory(base_env)
    _stores(aws, env)
    db = _database(aws, env)
    lines: list[str] = []
    data = snapshots.take(env, reason="before the 2.0 migration (ticket #42)", out=lines.append)

    snap = data["snapshot"]
    assert data["outcome"] == "succeeded"
    assert snap["kind"] == ("aurora" if base_env == "prod" else "rds")
    assert snap["source"] == db
    assert snap["status"] == "available"
    assert snap["engine"] == ("aurora-postgresql" if base_env == "prod" else "postgres")
    assert snap["created"]
    assert snap["record_id"] == data["record"]
    assert snap["ours"]
    assert data["progress"][-1]["status"] == "available"
    # The tags AWS holds are the state: env, managed-by, role, the record and the reason.
    rds = boto3.client("rds", endpoint_url=aws)
    if base_env == "prod":
        arn = rds.describe_db_cluster_snapshots(DBClusterSnapshotIdentifier=snap["id"])["DBClusterSnapshots"][0][
            "DBClusterSnapshotArn"]
    else:
        arn = rds.describe_db_snapshots(DBSnapshotIdentifier=snap["id"])["DBSnapshots"][0]["DBSnapshotArn"]
    tags = {t["Key"]: t["Value"] for t in rds.list_tags_for_resource(ResourceName=arn)["TagList"]}
    assert tags == {"opsbook:env": env.name, "opsbook:managed-by": "opsbook", "opsbook:role": "snapshot",
                    "opsbook:record": data["record"], "opsbook:reason": "before the 2.0 migration -ticket -42-"}

    # The record: in the environment's bucket, succeeded, the snapshot's figures and the plain
    # statement that no manifest was taken and why.
    entry = store_for(env).entry(data["record"])
    assert entry["runbook"] == "snapshot"
    assert entry["outcome"] == "succeeded"
    assert entry["figures"]["snapshot"] == snap["id"]
    assert entry["figures"]["manifest"] == "none: " + NO_MANIFEST
    notebook = store_for(env).get(entry["notebook"]).decode()
    assert "not reachable from the controller" in notebook
    assert snap["id"] in notebook

    # snapshot.list names it with its age, size and the record that took it.
    listed: list[str] = []
    snapshots.list_snapshots(env, out=listed.append)
    row = next(line for line in listed if snap["id"] in line)
    assert f"record {data['record']}" in row
    assert "available" in row


def test_retention_deletes_only_opsbooks_older_snapshots_and_keeps_the_safety_point(aws_inventory, aws):
    env = aws_inventory("staging", opsbook_snapshot_keep=2)
    _stores(aws, env)
    db = _database(aws, env)
    rds = boto3.client("rds", endpoint_url=aws)
    # An operator's own manual snapshot of the database: listed, never deleted.
    rds.create_db_snapshot(DBSnapshotIdentifier=f"{env.name}-by-hand", DBInstanceIdentifier=db)
    path = AwsSnapshots(env)
    taken = []
    for i, reason in enumerate(("first", "second", "third")):
        taken.append(path.take(record_id=f"20260101T00000{i}Z-snapshot-aaaaa{i}", reason=reason, log=lambda _m: None))
        time.sleep(1.1)   # AWS (and moto) give a snapshot's time to the second; retention orders by it
    first, second, third = taken
    # A release record that points at the oldest as its safety point, written through the real store.
    store_for(env).write_record({"id": "20260101T000003Z-release-dddddd", "runbook": "release", "env": env.name,
                                 "start": "2026-01-01T00:00:03+00:00", "outcome": "succeeded",
                                 "figures": {"kind": "release", "version": "1.0.0", "snapshot": first.id}},
                                b"{}", b"<html></html>")

    data = snapshots.take(env, reason="nightly", out=lambda _m: None)   # four of opsbook's now; keep 2
    deleted = [d["id"] for d in data["retention"]["deleted"]]
    assert deleted == [second.id]                                # beyond the two newest, not protected
    assert "safety point of release record 20260101T000003Z-release-dddddd" in data["retention"]["kept"][first.id]
    left = {s.id for s in path.list()}
    assert {first.id, third.id, data["snapshot"]["id"], f"{env.name}-by-hand"} <= left
    assert second.id not in left


def test_opsbook_never_deletes_a_snapshot_it_did_not_take(aws_inventory, aws):
    env = aws_inventory("staging")
    _stores(aws, env)
    db = _database(aws, env)
    rds = boto3.client("rds", endpoint_url=aws)
    rds.create_db_snapshot(DBSnapshotIdentifier=f"{env.name}-manual", DBInstanceIdentifier=db)
    path = AwsSnapshots(env)
    theirs = path.describe(f"{env.name}-manual")
    assert not theirs.ours
    forged = base.Snapshot(**{**theirs.to_dict(), "ours": True})   # even when a caller says it is ours
    with pytest.raises(base.SnapshotError, match=r"not taken by opsbook.*Nothing was deleted"):
        path.delete(forged, log=lambda _m: None)
    assert path.describe(f"{env.name}-manual").status == "available"


def test_a_drill_of_an_aws_snapshot_says_not_verified_and_fails_with_a_record(aws_inventory, aws):
    env = aws_inventory("staging")
    _stores(aws, env)
    _database(aws, env)
    # moto takes the instance's automated snapshot as it creates it, usually in the same second as ours
    # below (snapshot times are to the second): the drill still picks ours, the newest, by default.
    taken = snapshots.take(env, reason="to drill", out=lambda _m: None)
    with pytest.raises(snapshots.DrillNotPassed, match="NOT VERIFIED") as refused:
        snapshots.drill(env, out=lambda _m: None)
    assert "The drill did not pass" in str(refused.value)
    drills = [e for e in store_for(env).ledger() if e["runbook"] == "restore_drill"]
    assert len(drills) == 1
    assert drills[0]["outcome"] == "failed"
    assert drills[0]["figures"]["snapshot"] == taken["snapshot"]["id"]
    assert drills[0]["figures"]["passed"] is False
    assert drills[0]["figures"]["verdict"] == "NOT VERIFIED"


def test_a_lab_whose_database_host_keeps_no_backups_is_refused_before_anything(tmp_path, monkeypatch):
    """No SSH, no lock, no record: the inventory alone says there is nothing to snapshot into."""
    import shutil

    from opsbook.core.inventory import INVENTORY_PATH_VARIABLE, Env
    from opsbook.core.paths import ROOT

    root = tmp_path / "inventories"
    shutil.copytree(ROOT / "inventories" / "lab", root / "nobackups")
    (root / "nobackups" / "group_vars" / "db" / "zz-test.yml").write_text("postgres_backup: none\n")
    (root / "nobackups" / "group_vars" / "all" / "zz-test.yml").write_text(
        f"opsbook_record_store: {tmp_path / 'records'}\n")
    monkeypatch.setenv(INVENTORY_PATH_VARIABLE, str(root))
    env = Env("nobackups")
    for call in (lambda: snapshots.take(env, reason="r"), lambda: snapshots.list_snapshots(env),
                 lambda: snapshots.drill(env)):
        with pytest.raises(base.PathNotBuilt, match=r"database host db1 has postgres_backup: none, so its WAL is not "
                                                    r"archived .* Nothing was done. Set postgres_backup: pgbackrest"):
            call()
    assert not (tmp_path / "records").exists()


def test_retention_rules_on_their_own():
    now = datetime(2026, 1, 31, tzinfo=UTC)

    def snap(sid: str, days: float, ours: bool = True, status: str = "available") -> base.Snapshot:
        return base.Snapshot(id=sid, kind="rds", source="db", status=status,
                             created=(now - timedelta(days=days)).isoformat(), size_gb=20, engine="postgres",
                             engine_version="15.4", ours=ours)

    snaps = [snap("new", 0.1), snap("mid", 3), snap("old", 10), snap("older", 20), snap("theirs", 30, ours=False),
             snap("making", 40, status="creating")]
    by_age = base.retention(snaps, keep=None, max_age=timedelta(days=7), now=now)
    assert [s.id for s in by_age.delete] == ["old", "older"]
    by_count = base.retention(snaps, keep=1, max_age=None, protected={"older": "rel-1"}, now=now)
    assert [s.id for s in by_count.delete] == ["mid", "old"]
    assert base.retention([snap("only", 100)], keep=1, max_age=timedelta(days=1), now=now).delete == []   # the newest
    assert base.retention(snaps, keep=None, max_age=None, now=now).delete == []
    assert json.dumps(by_count.keep)   # the reasons kept go into the record
    # Newest first; times are to the second, and of two in the same second opsbook's comes first,
    # whichever order the service listed them in.
    same = [snap("rds:opsbook-staging-auto", 1, ours=False), snap("opsbook-staging-1", 1), snap("older", 2)]
    want = ["opsbook-staging-1", "rds:opsbook-staging-auto", "older"]
    assert [s.id for s in base.newest_first(same)] == want
    assert [s.id for s in base.newest_first(reversed(same))] == want


@pytest.mark.slow   # four invoke processes (each loads Ansible's inventory): about a minute on 2 cores
def test_the_tasks_as_an_operator_runs_them(aws_inventory, aws, monkeypatch):
    """`invoke snapshot --dry-run`, `invoke snapshot`, `snapshot.list` and `snapshot.drill` through the
    command line (the account guard included: moto's account is the copy's), and the lab refused."""
    from opsbook.core.inventory import INVENTORY_PATH_VARIABLE
    from tests.fixtures.lab import invoke

    env = aws_inventory("staging")
    _stores(aws, env)
    _database(aws, env)
    monkeypatch.setenv(INVENTORY_PATH_VARIABLE, str(env.path.parent))

    dry = invoke("snapshot", "--env", env.name, "--dry-run", check=True)
    assert f"dry run: would take a rds snapshot of {env.name}'s database opsbook-{env.name}" in dry.stdout
    assert not [s for s in AwsSnapshots(env).list() if s.ours], "a dry run takes nothing"

    taken = invoke("snapshot", "--env", env.name, "--reason", "before the drill", check=True)
    ours = [s for s in AwsSnapshots(env).list() if s.ours]
    assert len(ours) == 1
    assert f"record {ours[0].record_id} stored" in taken.stdout

    listed = invoke("snapshot.list", "--env", env.name, check=True)
    assert ours[0].id in listed.stdout
    assert f"record {ours[0].record_id}" in listed.stdout

    drilled = invoke("snapshot.drill", "--env", env.name)
    assert drilled.returncode == 1
    assert "NOT VERIFIED" in drilled.stderr

