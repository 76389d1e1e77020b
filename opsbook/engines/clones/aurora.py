"""Aurora copy-on-write clones of an AWS environment's database for another environment, through
boto3 (like ``opsbook.engines.snapshots.aws``).

**The clone.** ``RestoreDBClusterToPointInTime`` with ``RestoreType='copy-on-write'`` and
``UseLatestRestorableTime``: the new cluster shares the source cluster's storage pages and a page is
copied only when either side changes it, so it is ready in minutes whatever the size (AWS's "fast
database cloning"). A clone has no instance: one writer instance (the target's
``aws_env_db_instance_class``) is added. It goes into the *target's* private subnets (its subnet
group, role ``db-subnets``) behind the target's ``sg-db``, and is tagged like every opsbook resource
(``opsbook:env`` = the target, ``opsbook:managed-by``, ``opsbook:role`` = ``db-clone-<id>``, unique
per clone so two clones never claim one role) plus ``opsbook:record`` (the refresh's record) and
``opsbook:clone-of`` (source env and cluster). ``invoke env.destroy`` of the target deletes them.
With ``--snapshot ID`` the cluster is restored from that cluster snapshot of the source instead
(``RestoreDBClusterFromSnapshot``: a restore, not a copy-on-write clone).

**Switching** a target to a clone is publishing its writer endpoint in the target's SSM parameter
``/opsbook/<env>/db-address`` (what provisioning publishes and the inventory's ``bl_api_db_address``
reads); the previous value is returned so a failed refresh can put it back. Old clones are deleted
by :meth:`AuroraClones.prune`, never the one published.

**Refused, not pretended:**

- an RDS (non-Aurora) source: copy-on-write cloning does not exist for an RDS instance. A refresh
  from it would restore the source's newest snapshot into a new instance instead (its data loads
  lazily from S3, so the first reads are slow and the time to a warm copy grows with the size); that
  path is not built, and :meth:`AuroraClones.check` says so before anything is made;
- a source in another AWS account than the target (prod and staging are, by design): the target's
  credentials can clone the source cluster only once its owner shares it with the target's account
  through AWS RAM; that sharing is not built;
- reaching the clone's data (masking it, verifying the masking, setting the service role's
  password): the clone lives in private subnets that only the target's app hosts reach. The port
  forward through an app host that opsbook uses for the service database (``opsbook_db_reach: ssh``,
  :mod:`opsbook.engines.tunnel`) would reach it, but it is not wired to clones: moto, which stands in
  for AWS in tests, has no data plane, so no test here could show the clone masked, the leak scan
  run or the credentials changed on Aurora. :data:`DATA_PATH_NOT_BUILT` says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from opsbook.core.errors import OpsbookError
from opsbook.engines import aws
from opsbook.engines.snapshots.aws import AwsSnapshots, rds_name
from opsbook.engines.snapshots.base import PathNotBuilt

ROLE_PREFIX = "db-clone-"
TAG_RECORD = "opsbook:record"
TAG_CLONE_OF = "opsbook:clone-of"
ENGINE = "aurora-postgresql"
WAIT_DELAY = 10
WAIT_TIMEOUT = 2 * 3600

RDS_NOT_BUILT = (
    "{source}'s database {db} is an RDS instance, and copy-on-write cloning exists only for Aurora clusters. A "
    "refresh from it would restore its newest snapshot (`invoke snapshot.list --env {source}`) into a new instance "
    "in {target}'s subnets instead: a restore whose data loads lazily from S3, so the time to a warm copy grows with "
    "the database's size. That path is not built. Nothing was changed.")
CROSS_ACCOUNT_NOT_BUILT = (
    "{source} lives in AWS account {source_account} and {target} in {target_account}: {target}'s credentials can "
    "clone {source}'s cluster only once {source_account} shares it with {target_account} through AWS RAM "
    "(ram:CreateResourceShare of the cluster), and that sharing is not built. Nothing was changed.")
DATA_PATH_NOT_BUILT = (
    "masking, verifying and re-keying an Aurora clone need a connection to it, and the clone lives in {target}'s "
    "private subnets behind sg-db, which admits {target}'s app hosts only. opsbook's port forward through an app host "
    "(opsbook_db_reach: ssh, used for the service database) is not wired to clones, because moto, standing in for AWS "
    "in tests, has no data plane to show it working: that path is not built, so a refresh of an AWS environment is "
    "refused before anything is made (staging must never serve an unmasked copy). Nothing was changed. What exists "
    "and is tested against moto: the clone, its tags and wait, publishing its endpoint in "
    "/opsbook/{target}/db-address, and deleting old clones.")


class AuroraCloneError(OpsbookError):
    """An Aurora clone could not be made, published or deleted; the message says what was left."""


@dataclass
class AuroraClone:
    """A clone cluster (and its writer instance) made for a target environment."""

    id: str
    arn: str
    instance: str
    endpoint: str
    source_env: str
    source_cluster: str
    restore: str                    # copy-on-write | snapshot <id>
    status: str = "creating"
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def clone_id(target: str, now: datetime | None = None) -> str:
    """`opsbook-staging-clone-20260130-101500123-3fa9`: RDS rules (a letter first; letters, digits, single
    hyphens; at most 63), sortable by time."""
    return rds_name(f"opsbook-{target}-clone", now, limit=63)


def restore_request(source_arn: str, cid: str, *, subnet_group: str, security_group: str,
                    tags: list[dict[str, str]], snapshot: str | None = None) -> tuple[str, dict[str, Any]]:
    """(RDS API call, its parameters) that make clone `cid`: copy-on-write from the source cluster's
    latest restorable time, or a restore of one of its cluster snapshots."""
    common = {"DBClusterIdentifier": cid, "DBSubnetGroupName": subnet_group, "VpcSecurityGroupIds": [security_group],
              "Tags": tags}
    if snapshot:
        return "restore_db_cluster_from_snapshot", {**common, "SnapshotIdentifier": snapshot, "Engine": ENGINE}
    return "restore_db_cluster_to_point_in_time", {**common, "SourceDBClusterIdentifier": source_arn,
                                                   "RestoreType": "copy-on-write", "UseLatestRestorableTime": True}


class AuroraClones:
    """Clones of `source`'s Aurora cluster for `target` (see the module's docstring)."""

    def __init__(self, source, target, *, wait_delay: float = WAIT_DELAY, wait_timeout: float = WAIT_TIMEOUT,
                 log: Callable[[str], None] = print):
        self.source, self.target = source, target
        self.st, self.tt = aws.target(source), aws.target(target)
        self.wait_delay, self.wait_timeout = wait_delay, wait_timeout
        self.log = log
        self._source_db: aws.Resource | None = None

    @property
    def rds(self):
        """The target's RDS client: the clone is made, and lives, in the target's account."""
        return aws.client(self.tt, "rds")

    # -- before anything -------------------------------------------------------------------------
    def source_database(self) -> aws.Resource:
        if self._source_db is None:
            self._source_db = AwsSnapshots(self.source).database()
        return self._source_db

    def check(self) -> aws.Resource:
        """Refuse, before anything is made, what this path cannot do: a source in another account, an
        RDS instance as the source. Returns the source cluster."""
        if self.st.account_id != self.tt.account_id:
            raise PathNotBuilt(CROSS_ACCOUNT_NOT_BUILT.format(
                source=self.source.name, target=self.target.name, source_account=self.st.account_id,
                target_account=self.tt.account_id))
        db = self.source_database()
        if db.kind != "db-cluster":
            raise PathNotBuilt(RDS_NOT_BUILT.format(source=self.source.name, db=db.id, target=self.target.name))
        return db

    def placement(self) -> tuple[str, str]:
        """The target's database subnet group and sg-db, where its clones go (provisioning made them)."""
        found = {r.role: r for r in aws.find(self.tt) if r.role in ("db-subnets", "sg-db")}
        missing = [role for role in ("db-subnets", "sg-db") if role not in found]
        if missing:
            raise AuroraCloneError(f"{self.target.name} has no {' and no '.join(missing)} tagged for it, so a clone "
                                   f"has nowhere to go. Nothing was changed. Provision it first (`invoke provision "
                                   f"--env {self.target.name}`).")
        return found["db-subnets"].id, found["sg-db"].id

    # -- making ----------------------------------------------------------------------------------------
    def _tags(self, cid: str, record_id: str, source_cluster: str) -> list[dict[str, str]]:
        tags = {aws.TAG_ENV: self.target.name, aws.TAG_MANAGED_BY: aws.MANAGED_BY,
                aws.TAG_ROLE: ROLE_PREFIX + cid.rsplit("clone-", 1)[-1], TAG_RECORD: record_id,
                TAG_CLONE_OF: f"{self.source.name}/{source_cluster}"}
        return [{"Key": k, "Value": v} for k, v in tags.items()]

    def clone(self, *, record_id: str, snapshot: str | None = None, progress: list[dict[str, Any]] | None = None
              ) -> AuroraClone:
        """Make a clone (copy-on-write, or from `snapshot`), add its writer, wait until both are available.
        On failure, whatever was made of it is deleted; the target's database is untouched."""
        db = self.check()
        if snapshot:
            AwsSnapshots(self.source).describe(snapshot)   # refuses an unknown id, naming it
        subnets, sg = self.placement()
        cid = clone_id(self.target.name)
        tags = self._tags(cid, record_id, db.id)
        source_arn = self.rds.describe_db_clusters(DBClusterIdentifier=db.id)["DBClusters"][0]["DBClusterArn"]
        call, params = restore_request(source_arn, cid, subnet_group=subnets, security_group=sg, tags=tags,
                                       snapshot=snapshot)
        t0 = time.monotonic()
        getattr(self.rds, call)(**params)
        self.log(f"{self.target.name}: clone {cid} of {self.source.name}'s {db.id} requested "
                 f"({'from snapshot ' + snapshot if snapshot else 'copy-on-write, latest restorable time'})")
        try:
            instance = f"{cid}-1"
            self.rds.create_db_instance(
                DBInstanceIdentifier=instance, DBClusterIdentifier=cid, Engine=ENGINE,
                DBInstanceClass=str(self.target.var("aws_env_db_instance_class", "db.r6g.large")),
                DBSubnetGroupName=subnets, Tags=tags)
            samples = progress if progress is not None else []
            self._wait(cid, instance, samples)
            raw = self.rds.describe_db_clusters(DBClusterIdentifier=cid)["DBClusters"][0]
        except Exception as e:
            self.discard(cid)
            raise AuroraCloneError(f"clone {cid} of {self.source.name}'s {db.id} did not become available ({e}); what "
                                   f"was made of it was deleted. {self.target.name}'s database was not changed. Rerun "
                                   f"the refresh.") from e
        c = AuroraClone(id=cid, arn=raw["DBClusterArn"], instance=instance, endpoint=raw["Endpoint"],
                        source_env=self.source.name, source_cluster=db.id,
                        restore=f"snapshot {snapshot}" if snapshot else "copy-on-write", status=raw["Status"])
        c.seconds["available"] = round(time.monotonic() - t0, 1)
        self.log(f"{self.target.name}: clone {cid} available after {c.seconds['available']:.0f} s at {c.endpoint}")
        return c

    def _wait(self, cid: str, instance: str, samples: list[dict[str, Any]]) -> None:
        """Look every `wait_delay` s until the cluster and its writer are available; a failed state or
        `wait_timeout` ends it."""
        t0 = time.monotonic()
        while True:
            cluster = self.rds.describe_db_clusters(DBClusterIdentifier=cid)["DBClusters"][0].get("Status", "?")
            writer = self.rds.describe_db_instances(DBInstanceIdentifier=instance)["DBInstances"][0].get(
                "DBInstanceStatus", "?")
            elapsed = round(time.monotonic() - t0, 1)
            samples.append({"seconds": elapsed, "cluster": cluster, "writer": writer})
            if cluster == "available" and writer == "available":
                return
            if {cluster, writer} & {"failed", "inaccessible-encryption-credentials", "incompatible-restore",
                                    "incompatible-parameters", "storage-full", "deleting"}:
                raise AuroraCloneError(f"cluster {cluster}, writer {writer}")
            if elapsed > self.wait_timeout:
                raise AuroraCloneError(f"still cluster {cluster}, writer {writer} after {elapsed:.0f} s")
            self.log(f"{self.target.name}: clone {cid}: cluster {cluster}, writer {writer} after {elapsed:.0f} s")
            time.sleep(self.wait_delay)

    def set_master_password(self, c: AuroraClone, password: str) -> None:
        """The clone's master (admin) password becomes the target's own (the source's no longer opens it)."""
        self.rds.modify_db_cluster(DBClusterIdentifier=c.id, MasterUserPassword=password, ApplyImmediately=True)

    # -- switching -------------------------------------------------------------------------------------
    @property
    def parameter(self) -> str:
        return f"/opsbook/{self.target.name}/db-address"

    def published(self) -> str | None:
        from botocore.exceptions import ClientError

        try:
            return aws.client(self.tt, "ssm").get_parameter(Name=self.parameter)["Parameter"]["Value"]
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") == "ParameterNotFound":
                return None
            raise

    def publish(self, address: str) -> str | None:
        """Make `address` the target's database address (its SSM parameter); returns the previous one."""
        ssm = aws.client(self.tt, "ssm")
        previous = self.published()
        if previous is None:
            tags = {aws.TAG_ENV: self.target.name, aws.TAG_MANAGED_BY: aws.MANAGED_BY, aws.TAG_ROLE: "db-address"}
            ssm.put_parameter(Name=self.parameter, Value=address, Type="String",
                              Description=f"opsbook {self.target.name}: the service database's address",
                              Tags=[{"Key": k, "Value": v} for k, v in tags.items()])
        else:
            ssm.put_parameter(Name=self.parameter, Value=address, Type="String", Overwrite=True)
        self.log(f"{self.target.name}: {self.parameter} = {address} (was {previous})")
        return previous

    # -- listing and deleting --------------------------------------------------------------------------
    def clones(self) -> list[dict[str, Any]]:
        """The target's clones (clusters tagged for it with a db-clone- role), oldest first."""
        out = []
        for page in self.rds.get_paginator("describe_db_clusters").paginate():
            for c in page["DBClusters"]:
                tags = {t["Key"]: t["Value"] for t in c.get("TagList") or []}
                if (tags.get(aws.TAG_ENV) == self.target.name and tags.get(aws.TAG_MANAGED_BY) == aws.MANAGED_BY
                        and tags.get(aws.TAG_ROLE, "").startswith(ROLE_PREFIX)):
                    out.append({"id": c["DBClusterIdentifier"], "endpoint": c.get("Endpoint"),
                                "status": c.get("Status"), "record": tags.get(TAG_RECORD),
                                "clone_of": tags.get(TAG_CLONE_OF)})
        return sorted(out, key=lambda c: c["id"])

    def discard(self, cid: str) -> None:
        """Delete one of the target's clones (its tags, re-read here, must say so) and its instances."""
        from botocore.exceptions import ClientError

        try:
            raw = self.rds.describe_db_clusters(DBClusterIdentifier=cid)["DBClusters"][0]
        except ClientError:
            return
        tags = {t["Key"]: t["Value"] for t in raw.get("TagList") or []}
        if not (tags.get(aws.TAG_ENV) == self.target.name and tags.get(aws.TAG_ROLE, "").startswith(ROLE_PREFIX)
                and tags.get(aws.TAG_MANAGED_BY) == aws.MANAGED_BY):
            raise AuroraCloneError(f"{cid} is not a clone opsbook made for {self.target.name} (its tags do not say "
                                   f"so); opsbook never deletes it. Nothing was deleted.")
        for member in raw.get("DBClusterMembers") or []:
            self.rds.delete_db_instance(DBInstanceIdentifier=member["DBInstanceIdentifier"], SkipFinalSnapshot=True)
        self.rds.delete_db_cluster(DBClusterIdentifier=cid, SkipFinalSnapshot=True)
        self.log(f"{self.target.name}: deleted clone {cid}")

    def prune(self, keep: int, serving: str) -> list[str]:
        """Delete all but the `keep` newest clones, never the one `serving` (published)."""
        ids = [c["id"] for c in self.clones()]
        kept = {serving} | set(ids[-max(keep, 1):])
        gone = [cid for cid in ids if cid not in kept]
        for cid in gone:
            self.discard(cid)
        return gone
