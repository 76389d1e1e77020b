"""Snapshots of an AWS environment's database: RDS DB snapshots (``aws_env_db_kind: rds``, one
instance) or Aurora cluster snapshots (``aurora``), through boto3 and its waiters.

The database is the one resource tagged ``opsbook:role=db`` for the environment (``aws.find``):
an RDS instance or an Aurora cluster. A snapshot opsbook takes is tagged like every resource it
makes (``opsbook:env``, ``opsbook:managed-by=opsbook``, ``opsbook:role=snapshot``) plus the record
that took it (``opsbook:record``) and the operator's reason (``opsbook:reason``): the tags are the
state, so `list` needs no other catalogue, and retention only ever deletes what carries them.

**No manifest and no restore drill from here.** A snapshot is taken by the control plane; reading
the data (the manifest of row counts and checksums, or a restored copy to compare with it) needs
a connection to a Postgres server, and the environment's database sits in private subnets behind
``sg-db``, which admits the app hosts' security group on 5432 and nothing else. The controller
reaches the live database only through a port forward via an app host (``opsbook_db_reach: ssh``,
:mod:`opsbook.engines.tunnel`), and the live database is not the snapshot: a manifest must be read
from the snapshot's own data, that is from a copy restored from it into a scratch instance or cluster
in the environment's private subnets, under a security group that admits only the drill's runner
(moto, which stands in for AWS in tests, has no data plane, so that cannot be shown here). Until that
is built, the record says so and a drill says NOT VERIFIED.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from opsbook.core import facts
from opsbook.engines import aws
from opsbook.engines.snapshots.base import DrillVerdict, Snapshot, SnapshotError, newest_first

TAG_RECORD = "opsbook:record"
TAG_REASON = "opsbook:reason"
ROLE = "snapshot"
WAIT_DELAY = 10            # seconds between two looks at a snapshot being made
WAIT_TIMEOUT = 3 * 3600    # a snapshot not available after this long is reported, not waited for

NO_MANIFEST = (
    "no manifest was taken: the database is not reachable from the controller (it lives in the "
    "environment's private subnets behind sg-db, which admits the app hosts only; in tests, moto has no "
    "data plane). The manifest needs a path to the database: restore this snapshot into a scratch "
    "instance in the private subnets, admitted only to the drill's runner, and read it from inside the VPC "
    "(an app host over SSM or SSH). That path is not built yet.")

DRILL_NOT_VERIFIED = (
    "the snapshot was not restored and its data was not read: from this controller an AWS database "
    "(and a copy restored from its snapshot) is not reachable, so no manifest can be recomputed or compared "
    "and pg_amcheck cannot run (in tests, moto has no data plane). What was checked: the snapshot exists and "
    "is {status}. To verify it, restore it into a scratch instance in the environment's private subnets and "
    "run the drill from inside the VPC (not built yet).")

_TAG_VALUE_BAD = re.compile(r"[^\w\s.:/=+\-@]")


def tag_value(text: str) -> str:
    """A tag value AWS accepts (letters, digits, spaces and _ . : / = + - @; at most 256 characters)."""
    return _TAG_VALUE_BAD.sub("-", text)[:256]


def rds_name(prefix: str, now: datetime | None = None, limit: int = 255) -> str:
    """`<prefix>-20260130-101500123-3fa9`: an identifier by RDS rules (a letter first; letters, digits
    and single hyphens; at most `limit`), sortable by when it was made (facts.time_key), unique enough
    for an operator to quote. Snapshots and clones are named by it."""
    now = now or datetime.now(UTC)
    text = f"{prefix}-{facts.time_key(now)}-{secrets.token_hex(2)}"
    return re.sub(r"-+", "-", re.sub(r"[^A-Za-z0-9-]", "-", text))[:limit].rstrip("-")


def snapshot_id(env_name: str, now: datetime | None = None) -> str:
    """`opsbook-staging-20260130-101500123-3fa9` (rds_name; at most 255)."""
    return rds_name(f"opsbook-{env_name}", now)


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="seconds")
    return str(value)


class AwsSnapshots:
    """take / list / delete / drill for one AWS environment (see the module's docstring)."""

    manifest_note = NO_MANIFEST   # what a snapshot record says about the manifest

    def __init__(self, env, *, wait_delay: float = WAIT_DELAY, wait_timeout: float = WAIT_TIMEOUT):
        self.env = env
        self.t = aws.target(env)
        self.wait_delay = wait_delay
        self.wait_timeout = wait_timeout
        self._db: aws.Resource | None = None

    # -- the database ------------------------------------------------------------------------
    @property
    def rds(self):
        return aws.client(self.t, "rds")

    def database(self) -> aws.Resource:
        """The environment's database: the one RDS instance or Aurora cluster tagged opsbook:role=db."""
        if self._db is None:
            found = [r for r in aws.find(self.t) if r.role == "db" and r.kind in ("db-instance", "db-cluster")]
            aws.check_unique(found, self.env.name)
            if not found:
                raise SnapshotError(
                    f"{self.env.name} has no database: nothing in {self.t.describe()} is tagged "
                    f"{aws.TAG_ENV}={self.env.name} with {aws.TAG_ROLE}=db. Nothing was done. Provision it first "
                    f"(`invoke provision --env {self.env.name}`).")
            self._db = found[0]
        return self._db

    @property
    def kind(self) -> str:
        return "aurora" if self.database().kind == "db-cluster" else "rds"

    def in_use(self) -> dict[str, str]:
        """Nothing: a drill of an AWS snapshot restores nothing from here (it says NOT VERIFIED)."""
        return {}

    def can_take(self) -> tuple[bool, str]:
        """Whether a snapshot can be taken now: the database is `available` and no snapshot of it is
        being made (RDS refuses a second one meanwhile). (False, why) otherwise."""
        db = self.database()
        if self.kind == "aurora":
            status = self.rds.describe_db_clusters(DBClusterIdentifier=db.id)["DBClusters"][0].get("Status")
        else:
            found = self.rds.describe_db_instances(DBInstanceIdentifier=db.id)["DBInstances"]
            status = found[0].get("DBInstanceStatus")
        if status != "available":
            return False, f"its database {db.id} is {status}, not available"
        making = [s.id for s in self.list() if s.status == "creating" and s.source == db.id]
        if making:
            return False, f"snapshot {making[0]} of {db.id} is still being made"
        return True, ""

    def _tags(self, record_id: str, reason: str) -> list[dict[str, str]]:
        tags = {aws.TAG_ENV: self.env.name, aws.TAG_MANAGED_BY: aws.MANAGED_BY, aws.TAG_ROLE: ROLE,
                TAG_RECORD: record_id, TAG_REASON: tag_value(reason or "-")}
        return [{"Key": k, "Value": v} for k, v in tags.items()]

    # -- describing ----------------------------------------------------------------------------
    def _snapshot(self, raw: dict[str, Any]) -> Snapshot:
        tags = {t["Key"]: t["Value"] for t in raw.get("TagList") or []}
        cluster = "DBClusterSnapshotIdentifier" in raw
        return Snapshot(
            id=raw["DBClusterSnapshotIdentifier" if cluster else "DBSnapshotIdentifier"],
            kind="aurora" if cluster else "rds",
            source=raw.get("DBClusterIdentifier" if cluster else "DBInstanceIdentifier") or "",
            status=str(raw.get("Status", "unknown")),
            created=_iso(raw.get("SnapshotCreateTime")),
            size_gb=raw.get("AllocatedStorage"),
            engine=raw.get("Engine"),
            engine_version=raw.get("EngineVersion"),
            ours=tags.get(aws.TAG_ENV) == self.env.name and tags.get(aws.TAG_MANAGED_BY) == aws.MANAGED_BY,
            record_id=tags.get(TAG_RECORD),
            reason=tags.get(TAG_REASON),
        )

    def describe(self, sid: str) -> Snapshot:
        from botocore.exceptions import ClientError

        try:
            if self.kind == "aurora":
                raw = self.rds.describe_db_cluster_snapshots(DBClusterSnapshotIdentifier=sid)["DBClusterSnapshots"]
            else:
                raw = self.rds.describe_db_snapshots(DBSnapshotIdentifier=sid)["DBSnapshots"]
        except ClientError as e:
            if "NotFound" in e.response.get("Error", {}).get("Code", ""):
                raise SnapshotError(f"no snapshot {sid!r} of {self.env.name} ({self.t.describe()}). Nothing was done. "
                                    f"`invoke snapshot.list --env {self.env.name}` lists its snapshots.") from None
            raise
        return self._snapshot(raw[0])

    def list(self) -> list[Snapshot]:
        """Every snapshot of the environment, newest first: those of its database (opsbook's, AWS's
        automated ones, an operator's manual ones) and those tagged for it whose database is gone."""
        db = self.database()
        if self.kind == "aurora":
            pages = self.rds.get_paginator("describe_db_cluster_snapshots").paginate()
            raws = [s for p in pages for s in p["DBClusterSnapshots"]]
        else:
            pages = self.rds.get_paginator("describe_db_snapshots").paginate()
            raws = [s for p in pages for s in p["DBSnapshots"]]
        snaps = [self._snapshot(r) for r in raws]
        mine = [s for s in snaps if s.source == db.id or s.ours]
        return newest_first(mine)

    # -- taking --------------------------------------------------------------------------------
    def take(self, *, record_id: str, reason: str, log: Callable[[str], None] = print,
             progress: list[dict[str, Any]] | None = None) -> Snapshot:
        """Snapshot the database, tagged with the env, the record and the reason; wait until it is
        available (boto3's waiter, one attempt at a time so progress is shown between looks).
        `progress` (a list) receives the samples seen: seconds, status, percent."""
        db = self.database()
        sid = snapshot_id(self.env.name)
        tags = self._tags(record_id, reason)
        if self.kind == "aurora":
            self.rds.create_db_cluster_snapshot(DBClusterSnapshotIdentifier=sid, DBClusterIdentifier=db.id, Tags=tags)
            waiter, args = self.rds.get_waiter("db_cluster_snapshot_available"), {"DBClusterSnapshotIdentifier": sid}
        else:
            self.rds.create_db_snapshot(DBSnapshotIdentifier=sid, DBInstanceIdentifier=db.id, Tags=tags)
            waiter, args = self.rds.get_waiter("db_snapshot_available"), {"DBSnapshotIdentifier": sid}
        log(f"{self.env.name}: {self.kind} snapshot {sid} of {db.id} requested (record {record_id})")
        self._wait(waiter, args, sid, log, progress if progress is not None else [])
        snap = self.describe(sid)
        log(f"{self.env.name}: snapshot {sid} is {snap.status} ({snap.size_gb} GB, {snap.engine} "
            f"{snap.engine_version}, taken {snap.created})")
        return snap

    def _wait(self, waiter, args: dict[str, str], sid: str, log: Callable[[str], None],
              progress: list[dict[str, Any]]) -> None:
        from botocore.exceptions import WaiterError

        t0 = time.monotonic()
        while True:
            try:
                waiter.wait(**args, WaiterConfig={"Delay": 1, "MaxAttempts": 1})
            except WaiterError as e:
                last = e.last_response or {}
                items = last.get("DBClusterSnapshots") or last.get("DBSnapshots") or [{}]
                status, pct = items[0].get("Status", "?"), items[0].get("PercentProgress")
                if "Max attempts exceeded" not in str(e.kwargs.get("reason", "")):   # a failure state, not slowness
                    raise SnapshotError(
                        f"snapshot {sid} of {self.env.name} did not become available: it is {status} ({e}). The "
                        f"database was not changed. Look at it in the RDS console or with `aws rds describe-db-"
                        f"{'cluster-' if self.kind == 'aurora' else ''}snapshots`; take another with `invoke snapshot "
                        f"--env {self.env.name}`.") from None
            else:
                progress.append({"seconds": round(time.monotonic() - t0, 1), "status": "available", "percent": 100})
                return
            elapsed = time.monotonic() - t0
            progress.append({"seconds": round(elapsed, 1), "status": status, "percent": pct})
            log(f"{self.env.name}: snapshot {sid} {status}, {pct if pct is not None else '?'}% after {elapsed:.0f} s")
            if elapsed > self.wait_timeout:
                raise SnapshotError(
                    f"snapshot {sid} of {self.env.name} is still {status} after {elapsed:.0f} s; opsbook stopped "
                    f"waiting (the snapshot goes on in AWS). The database was not changed. `invoke snapshot.list --env "
                    f"{self.env.name}` shows when it is available.")
            time.sleep(self.wait_delay)

    # -- deleting --------------------------------------------------------------------------------
    def delete(self, snapshot: Snapshot, *, log: Callable[[str], None] = print) -> None:
        """Delete one of opsbook's own snapshots of this environment (re-read here: its tags decide)."""
        now = self.describe(snapshot.id)
        if not now.ours:
            raise SnapshotError(f"snapshot {snapshot.id} was not taken by opsbook for {self.env.name} (its tags do "
                                f"not say so); opsbook never deletes it. Nothing was deleted.")
        if now.kind == "aurora":
            self.rds.delete_db_cluster_snapshot(DBClusterSnapshotIdentifier=snapshot.id)
        else:
            self.rds.delete_db_snapshot(DBSnapshotIdentifier=snapshot.id)
        log(f"{self.env.name}: deleted snapshot {snapshot.id} (taken {snapshot.created}, record {snapshot.record_id})")

    # -- drilling ----------------------------------------------------------------------------------
    def drill(self, snapshot_id: str | None = None, *, log: Callable[[str], None] = print) -> DrillVerdict:
        """Never passes from here: the snapshot is found and its state read, and the verdict says
        NOT VERIFIED with why (see the module's docstring)."""
        if snapshot_id:
            snap = self.describe(snapshot_id)
        else:
            snaps = [s for s in self.list() if s.status == "available"]
            if not snaps:
                return DrillVerdict(snapshot="", verified=False, passed=False,
                                    problem=f"{self.env.name} has no available snapshot to drill.")
            snap = snaps[0]
        log(f"{self.env.name}: drilling snapshot {snap.id} ({snap.status}, taken {snap.created})")
        return DrillVerdict(snapshot=snap.id, verified=False, passed=False,
                            problem=DRILL_NOT_VERIFIED.format(status=snap.status), details=snap.to_dict())
