"""Database access for an environment: the admin connection and what an operation asks the
service database before it acts (applied migration phases, pending migrations, the schema floor).

An operation opens one :class:`Admin` session and asks all its questions on that connection
(a release's plan used to connect three times).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opsbook.core.errors import OpsbookError
from opsbook.core.inventory import Env
from opsbook.engines import migrations
from opsbook.engines.migrations import guards


class DatabaseUnreachable(OpsbookError):
    """The environment's database refused or did not answer."""


def address(env: Env, host: str | None = None) -> str:
    """Where the environment's service database answers: `host`'s address when given; else a managed
    database's (bl_api_db_address: RDS or Aurora, published by provisioning in SSM Parameter Store);
    else the address of the inventory host named by bl_api_db_host."""
    if host:
        return env.host(host).address
    try:
        managed = env.var("bl_api_db_address", "")
    except Exception as e:  # noqa: BLE001 - Ansible's lookup errors are of many kinds; all mean the same here
        raise OpsbookError(
            f"the address of {env.name}'s database (bl_api_db_address) could not be read: {e}. Nothing was "
            f"changed. If the environment was never provisioned, run `invoke provision --env {env.name}`.") from None
    return managed or env.host(env.var("bl_api_db_host")).address


def endpoint(env: Env, host: str | None = None) -> tuple[str, int]:
    """(address, port) where opsbook itself connects to the environment's service database: the
    database's own, or, where its security group admits the app hosts only (`opsbook_db_reach: ssh`,
    a managed database in private subnets), a local port forwarded over SSH through an app host."""
    where, port = address(env, host), int(env.var("bl_api_db_port"))
    if host is None and env.var("opsbook_db_reach", "direct") == "ssh":
        from opsbook.engines import tunnel

        return "127.0.0.1", tunnel.forward(env, where, port)
    return where, port


def admin_conninfo(env: Env, host: str | None = None) -> str:
    """libpq conninfo for the admin role on the environment's service database."""
    from psycopg.conninfo import make_conninfo

    where, port = endpoint(env, host)
    return make_conninfo(
        host=where,
        port=port,
        dbname=env.var("bl_api_db_name"),
        user=env.var("opsbook_db_admin_user"),
        password=env.var("opsbook_db_admin_password"),
        connect_timeout=5,
        application_name="opsbook",
    )


@dataclass(frozen=True)
class Pending:
    """What a set of migration files would still do to a database."""

    expand: list[str]            # migrations whose expand phase has not run
    contracts: list[str]         # contracts whose expand ran and which still wait (described)
    contract_done: set[str]      # migrations whose contract phase has run


class Admin:
    """One admin connection to an environment's service database, for the questions an operation
    asks before it acts. Use as a context manager; raises DatabaseUnreachable when it cannot connect."""

    def __init__(self, env: Env):
        self.env = env
        self.conn: Any = None

    def __enter__(self) -> Admin:
        import psycopg

        from opsbook.engines.tunnel import TunnelFailed

        try:
            self.conn = psycopg.connect(admin_conninfo(self.env), autocommit=True)
        except psycopg.Error as e:
            raise DatabaseUnreachable(f"{self.env.name}'s database does not answer: {str(e).strip()}") from e
        except TunnelFailed as e:
            raise DatabaseUnreachable(f"{self.env.name}'s database cannot be reached: {e}") from e
        return self

    def __exit__(self, *exc: object) -> None:
        if self.conn is not None:
            self.conn.close()

    def applied_phases(self) -> set[tuple[str, str]]:
        return migrations.applied_phases(self.conn)

    def pending(self, mig_dir: Path) -> Pending:
        done = self.applied_phases()
        expand = [m.id for m in migrations.load_migrations(mig_dir) if (m.id, "expand") not in done]
        contracts = [str(c) for c in migrations.pending_contracts(self.conn, mig_dir)]
        return Pending(expand, contracts, {m for m, phase in done if phase == "contract"})

    def schema_floor(self, mig_dir: Path) -> dict[str, str]:
        """migration -> the lowest app version its applied contract allows (contract_requires_version)."""
        done = {m for m, phase in self.applied_phases() if phase == "contract"}
        return {m.id: m.contract_requires_version for m in migrations.load_migrations(mig_dir)
                if m.id in done and m.contract_requires_version}

    def blocking_sessions(self) -> list:
        """Long or idle-in-transaction sessions that would block a migration's DDL."""
        return guards.blocking_sessions(self.conn, guards.Settings())


def refuse_below(floor: dict[str, str], version: str, env_name: str) -> None:
    """Refuse `version` when it is older than what an applied contract requires: it would meet a
    schema it cannot use."""
    from packaging.version import InvalidVersion, Version

    try:
        target = Version(version)
    except InvalidVersion:
        return
    blocking = [f"{m} (needs >= {need})" for m, need in floor.items() if target < Version(need)]
    if blocking:
        raise OpsbookError(f"{version} is older than the schema of {env_name} allows: contract(s) "
                           f"{', '.join(blocking)} already ran, so {version} would fail against it. Nothing "
                           f"was changed. Release or roll back to a version at or above those.")


# --- activity: what the database did, for load measurements --------------------------------------
ACTIVITY_SQL = """
SELECT d.xact_commit + d.xact_rollback, d.xact_rollback, d.blks_hit, d.blks_read, d.deadlocks,
       (SELECT wal_bytes FROM pg_stat_wal)::bigint,
       (SELECT count(*) FROM pg_locks WHERE NOT granted),
       (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'active'),
       (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database())
FROM pg_stat_database d WHERE d.datname = current_database()
"""


def activity(conn) -> dict[str, int]:
    """Cumulative counters of the connection's database (pg_stat_database, pg_stat_wal) and the
    moment's lock waits (pg_locks, not granted) and sessions. Read-only, one round trip; sample it
    twice and subtract (`activity_between`)."""
    row = conn.execute(ACTIVITY_SQL).fetchone()
    names = ("xacts", "rollbacks", "blks_hit", "blks_read", "deadlocks", "wal_bytes", "lock_waits",
             "active_sessions", "sessions")
    return {n: int(v or 0) for n, v in zip(names, row, strict=True)}


def activity_between(samples: list[tuple[float, dict[str, int]]], start: float, end: float) -> dict | None:
    """Rates over [start, end] from timestamped activity samples (epoch seconds): transactions/s,
    rollbacks, buffer hit ratio, WAL bytes/s, deadlocks, and the most and mean lock waits seen."""
    inside = [(t, s) for t, s in samples if start <= t <= end]
    before = [(t, s) for t, s in samples if t <= start]
    after = [(t, s) for t, s in samples if t >= end]
    first = before[-1] if before else (inside[0] if inside else None)
    last = after[0] if after else (inside[-1] if inside else None)
    if first is None or last is None or last[0] <= first[0]:
        return None
    dt = last[0] - first[0]
    a, b = first[1], last[1]
    hits, reads = b["blks_hit"] - a["blks_hit"], b["blks_read"] - a["blks_read"]
    waits = [s["lock_waits"] for _t, s in inside] or [a["lock_waits"]]
    return {
        "xact_per_s": round((b["xacts"] - a["xacts"]) / dt, 1),
        "rollbacks": b["rollbacks"] - a["rollbacks"],
        "buffer_hit_ratio": round(hits / (hits + reads), 4) if hits + reads else None,
        "wal_mb_per_s": round((b["wal_bytes"] - a["wal_bytes"]) / dt / 1e6, 2),
        "deadlocks": b["deadlocks"] - a["deadlocks"],
        "lock_waits_max": max(waits),
        "lock_waits_mean": round(sum(waits) / len(waits), 2),
        "active_sessions_max": max([s["active_sessions"] for _t, s in inside] or [0]),
    }


def count_missing(conninfo: str, uuids: list[str]) -> dict[str, int]:
    """Of `uuids` (response uuids a service acknowledged), how many are present in course_events and how
    many are missing: loaded with COPY into a temporary table and anti-joined on the primary key."""
    import psycopg

    with psycopg.connect(conninfo, autocommit=False, application_name="opsbook-scale-check") as conn:
        conn.execute("CREATE TEMPORARY TABLE opsbook_acknowledged (u uuid PRIMARY KEY) ON COMMIT DROP")
        with conn.cursor().copy("COPY opsbook_acknowledged (u) FROM STDIN") as copy:
            for u in uuids:
                copy.write_row((u,))
        missing = conn.execute(
            "SELECT count(*) FROM opsbook_acknowledged a "
            "WHERE NOT EXISTS (SELECT 1 FROM course_events e WHERE e.event_uuid = a.u)").fetchone()[0]
        conn.rollback()
    return {"acknowledged": len(uuids), "present": len(uuids) - int(missing), "missing": int(missing)}


def events_in_courses(conninfo: str, courses: list[str]) -> int:
    """How many record_response events the courses hold (every event but each course's create_course)."""
    import psycopg

    with psycopg.connect(conninfo, autocommit=True, application_name="opsbook-scale-check") as conn:
        return int(conn.execute(
            "SELECT count(*) FROM course_events WHERE course_uuid = ANY(%s::uuid[]) AND sequence_number > 0",
            [courses]).fetchone()[0])
