"""Guards around every statement the engine runs: timeouts with retries and backoff, the
blocking-session preflight, the backfill throttle and the contract gate."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from opsbook.engines.migrations.spec import MigrationError

APP_NAME = "opsbook-migrate"  # every engine connection says so; guards and the sampler skip it


@dataclass
class Settings:
    """How careful the engine is. Defaults fit an OLTP table taking steady writes."""

    lock_timeout_ms: int = 2000  # how long one DDL statement may wait for its lock
    ddl_statement_timeout_ms: int = 15_000  # catalog-only DDL (ADD COLUMN, ADD CONSTRAINT NOT VALID)
    long_statement_timeout_ms: int = 6 * 3600 * 1000  # CREATE INDEX CONCURRENTLY, VALIDATE
    batch_statement_timeout_ms: int = 30_000  # one backfill batch
    retries: int = 5  # attempts after the first, per step, on lock timeouts
    backoff_s: float = 0.5  # first wait between attempts; doubles, with jitter
    backoff_max_s: float = 10.0
    # Preflight: sessions that would block or be blocked by our DDL.
    max_transaction_age_s: float = 60.0  # refuse while a transaction is older than this
    max_idle_in_transaction_s: float = 10.0
    # Backfill throttle: before each batch, wait while any signal is over its limit (None: off).
    max_active_sessions: int | None = 50
    max_replication_lag_s: float | None = 10.0
    max_canary_ms: float | None = 250.0
    canary_sql: str = "SELECT 1"
    throttle_sleep_s: float = 1.0
    max_throttle_wait_s: float = 600.0  # give up (checkpointed) after throttling this long in a row
    batch_pause_s: float = 0.0  # breathing room between batches
    sample_interval_s: float = 0.2  # lock-wait sampler

    # The knobs are defined here and nowhere else: the migrate runbook takes them as one `settings`
    # mapping (a missing name keeps the default above) and `invoke migrate --param NAME=VALUE`
    # sets one by its field name.
    @classmethod
    def knobs(cls) -> dict[str, str]:
        """Every knob's name -> its type as written above (`int`, `float`, `int | None`, ...)."""
        return {f.name: str(f.type) for f in fields(cls)}

    @classmethod
    def from_mapping(cls, given: dict[str, Any] | None) -> Settings:
        """Settings from a mapping of knob names; refuses unknown names and wrong types. For a knob
        that can be off (typed `... | None`), None or 0 turns it off."""
        knobs = cls.knobs()
        values: dict[str, Any] = {}
        problems = []
        for name, value in (given or {}).items():
            kind = knobs.get(name)
            if kind is None:
                problems.append(f"unknown migration setting {name!r}")
                continue
            optional = kind.endswith("| None")
            base = kind.split("|")[0].strip()
            converted = None if value is None else _knob_value(base, value)
            if converted is _BAD:
                problems.append(f"{name} must be {base}, got {value!r}")
                continue
            if converted is None or (optional and converted == 0):
                if not optional:
                    problems.append(f"{name} cannot be turned off")
                    continue
                converted = None
            values[name] = converted
        if problems:
            raise MigrationError("; ".join(problems) + f". Nothing was run. Settings are: {', '.join(knobs)}.")
        return cls(**values)


_BAD = object()


def _knob_value(base: str, value: Any) -> Any:
    """A knob's value converted to its type (`int`, `float`, `str`), or _BAD."""
    if isinstance(value, bool) or not isinstance(value, int | float | str) or base not in ("int", "float", "str"):
        return _BAD
    try:
        if base == "int":
            number = float(value)
            return int(number) if number.is_integer() else _BAD
        return float(value) if base == "float" else str(value)
    except ValueError:
        return _BAD


def backoff_delays(s: Settings) -> list[float]:
    return [
        min(s.backoff_max_s, s.backoff_s * 2**i) * (0.75 + random.random() / 2)  # noqa: S311 - jitter
        for i in range(s.retries)
    ]


def is_lock_failure(e: BaseException) -> bool:
    import psycopg.errors as pe

    return isinstance(e, pe.LockNotAvailable | pe.DeadlockDetected | pe.SerializationFailure)


def with_retries(
    attempt: Callable[[], Any],
    s: Settings,
    *,
    what: str,
    on_retry: Callable[[int, BaseException], None] | None = None,
    before_retry: Callable[[], None] | None = None,
    retry_on: Callable[[BaseException], bool] = is_lock_failure,
) -> tuple[Any, int]:
    """Run `attempt` until it stops failing on locks, at most 1 + retries times.
    Returns (result, attempts). Non-lock errors raise at once."""
    delays = backoff_delays(s)
    for n in range(len(delays) + 1):
        try:
            return attempt(), n + 1
        except Exception as e:
            if not retry_on(e) or n == len(delays):
                raise
            if on_retry:
                on_retry(n + 1, e)
            time.sleep(delays[n])
            if before_retry:
                before_retry()
    raise AssertionError(what)  # pragma: no cover


# --- preflight --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Session:
    pid: int
    user: str
    state: str
    age_s: float
    query: str
    application: str = ""

    def __str__(self) -> str:
        q = " ".join(self.query.split())[:120]
        app = self.application or "no app name"
        return f"pid {self.pid} user {self.user} ({app}) {self.state} for {self.age_s:.0f}s: {q}"


BLOCKERS_SQL = """
SELECT pid, usename, state, extract(epoch FROM now() - coalesce(xact_start, state_change))::float8,
       coalesce(query, ''), coalesce(application_name, '')
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND backend_type = 'client backend' AND coalesce(application_name, '') <> %(app)s
  AND (   (state LIKE 'idle in transaction%%' AND now() - state_change > make_interval(secs => %(idle)s))
       OR (xact_start IS NOT NULL AND now() - xact_start > make_interval(secs => %(age)s)))
ORDER BY xact_start NULLS LAST
"""


def blocking_sessions(
    conn, s: Settings, table: str | None = None, older_than_s: float | None = None
) -> list[Session]:
    """Long transactions and idle-in-transaction sessions; with `table`, only those holding a lock
    on it, and any transaction older than `older_than_s` counts."""
    sql = BLOCKERS_SQL
    age = s.max_transaction_age_s if older_than_s is None else older_than_s
    idle = s.max_idle_in_transaction_s if older_than_s is None else older_than_s
    params: dict[str, Any] = {"app": APP_NAME, "idle": idle, "age": age}
    if table:
        sql = sql.replace(
            "ORDER BY", "AND pid IN (SELECT pid FROM pg_locks WHERE relation = to_regclass(%(t)s))\nORDER BY"
        )
        params["t"] = table
    rows = conn.execute(sql, params).fetchall()
    return [Session(*r) for r in rows]


def lock_holders(conn, table: str | None, *, with_snapshots: bool = False) -> list[Session]:
    """Sessions holding any lock on `table` right now (to name in a lock-timeout report). With
    `with_snapshots`, also every session of this database holding a snapshot: before it marks an
    index valid, CREATE INDEX CONCURRENTLY waits for every one older than its build ("waiting for
    old snapshots"), whether or not it holds a lock on the table."""
    if not table:
        return []
    rows = conn.execute(
        """SELECT DISTINCT a.pid, a.usename, a.state,
                  extract(epoch FROM now() - coalesce(a.xact_start, a.state_change))::float8,
                  coalesce(a.query, ''), coalesce(a.application_name, '')
           FROM pg_locks l JOIN pg_stat_activity a USING (pid)
           WHERE l.relation = to_regclass(%s) AND l.granted AND a.pid <> pg_backend_pid()
             AND coalesce(a.application_name, '') <> %s""",
        (table, APP_NAME),
    ).fetchall()
    holders = [Session(*r) for r in rows]
    if with_snapshots:
        rows = conn.execute(
            """SELECT pid, usename, state, extract(epoch FROM now() - coalesce(xact_start, state_change))::float8,
                      coalesce(query, ''), coalesce(application_name, '')
               FROM pg_stat_activity
               WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_xmin IS NOT NULL
                 AND backend_type = 'client backend' AND coalesce(application_name, '') NOT LIKE %s""",
            (APP_NAME + "%",),
        ).fetchall()
        seen = {h.pid for h in holders}
        holders += [Session(*r) for r in rows if r[0] not in seen]
    return holders


def refuse_blockers(conn, s: Settings) -> None:
    refuse_blockers_found(blocking_sessions(conn, s), s)


def refuse_blockers_found(found: list[Session], s: Settings) -> None:
    if found:
        names = "\n  ".join(str(x) for x in found)
        raise MigrationError(
            f"refusing to start: {len(found)} session(s) hold transactions open long enough to block or be "
            f"blocked by schema changes (older than {s.max_transaction_age_s:.0f}s, or idle in transaction "
            "over "
            f"{s.max_idle_in_transaction_s:.0f}s):\n  {names}\n"
            "Nothing was changed. Let them finish or end them (pg_terminate_backend(pid)), then rerun."
        )


# --- throttle ---------------------------------------------------------------------------------
@dataclass
class Signals:
    active_sessions: int
    replication_lag_s: float | None
    canary_ms: float

    def over(self, s: Settings) -> list[str]:
        out = []
        if s.max_active_sessions is not None and self.active_sessions > s.max_active_sessions:
            out.append(f"{self.active_sessions} active sessions > {s.max_active_sessions}")
        if (
            s.max_replication_lag_s is not None
            and self.replication_lag_s is not None
            and self.replication_lag_s > s.max_replication_lag_s
        ):
            out.append(f"replication lag {self.replication_lag_s:.1f}s > {s.max_replication_lag_s}s")
        if s.max_canary_ms is not None and self.canary_ms > s.max_canary_ms:
            out.append(f"canary query {self.canary_ms:.0f}ms > {s.max_canary_ms}ms")
        return out


def read_signals(conn, s: Settings) -> Signals:
    active = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND backend_type = 'client backend' "
        "AND pid <> pg_backend_pid() AND coalesce(application_name, '') <> %s",
        (APP_NAME,),
    ).fetchone()[0]
    lag = conn.execute(
        "SELECT max(extract(epoch FROM greatest(write_lag, flush_lag, replay_lag)))::float8 FROM "
        "pg_stat_replication"
    ).fetchone()[0]
    t0 = time.perf_counter()
    conn.execute(s.canary_sql).fetchall()
    return Signals(active, lag, (time.perf_counter() - t0) * 1000)


# --- contract gate ----------------------------------------------------------------------------
def parse_version(v: str):
    try:
        from packaging.version import Version

        return Version(v)
    except ImportError:  # pragma: no cover - packaging ships with pip's environments
        return tuple(
            int(p) for p in v.split("+", maxsplit=1)[0].split("-", maxsplit=1)[0].split(".") if p.isdigit()
        )


@dataclass(frozen=True)
class GateRefusal:
    migration: str
    requires: str
    hosts: dict[str, str] = field(default_factory=dict)  # host -> the older version it serves


def contract_gate(requires: str, fleet_versions: dict[str, str | None] | None) -> dict[str, str]:
    """Hosts (host -> version) that serve a version older than `requires`. Unknown versions count
    as old: a host we cannot read may well still use the old schema."""
    if fleet_versions is None:
        return {"<fleet unknown>": "no fleet versions were given"}
    if not fleet_versions:
        # Fails closed: an environment whose fleet cannot be listed may still run old versions.
        return {"<no app hosts>": "no app host was found to ask; the gate cannot tell what runs"}
    need = parse_version(requires)
    reasons = getattr(fleet_versions, "reasons", {})  # opsbook.fleet.FleetVersions says why a host is unknown
    old = {}
    for host, v in sorted(fleet_versions.items()):
        if v is None:
            old[host] = f"unknown ({reasons.get(host, 'no version known')})"
            continue
        try:
            if parse_version(str(v)) < need:
                old[host] = str(v)
        except Exception:  # noqa: BLE001 - any unreadable version blocks the contract
            old[host] = f"{v} (unreadable)"
    return old
