"""The online migration engine: plan what would run, then run it step by step under guards.

Ledger tables (created on first use):
- `opsbook_migrations(migration, phase, checksum, applied_at)`: a phase that completed.
- `opsbook_migration_steps(migration, phase, step, key, checksum, applied_at)`: each completed step,
  written in the same transaction as the step where the step is transactional, so a rerun after a
  failure continues with the first step not recorded (every generated step is also idempotent).
- `opsbook_backfill_progress(...)`: the keyset checkpoint of each backfill, written in each batch's
  transaction, so a killed backfill resumes with the next unprocessed key.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opsbook.engines.migrations import guards, linting, spec
from opsbook.engines.migrations.guards import APP_NAME, Settings
from opsbook.engines.migrations.measure import BatchStat, LockSampler, RunResult, StepResult, ThrottleEvent
from opsbook.engines.migrations.spec import (
    BACKFILL,
    DROP_INDEX,
    INDEX,
    PHASES,
    RAW_NOTX,
    TX,
    VALIDATE,
    Migration,
    MigrationError,
    Step,
)

ADVISORY_LOCK = 0x6F707362   # pg_try_advisory_lock key of the migration engine ("opsb")

LEDGER_DDL = (
    """CREATE TABLE IF NOT EXISTS opsbook_migrations (
        migration  text NOT NULL,
        phase      text NOT NULL,
        checksum   text NOT NULL,
        applied_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (migration, phase))""",
    """CREATE TABLE IF NOT EXISTS opsbook_migration_steps (
        migration  text NOT NULL,
        phase      text NOT NULL,
        step       integer NOT NULL,
        key        text NOT NULL,
        checksum   text NOT NULL,
        seconds    double precision,
        attempts   integer,
        applied_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (migration, phase, step))""",
    """CREATE TABLE IF NOT EXISTS opsbook_backfill_progress (
        migration    text NOT NULL,
        phase        text NOT NULL,
        step         integer NOT NULL,
        last_key     text,
        batches      integer NOT NULL DEFAULT 0,
        rows_scanned bigint NOT NULL DEFAULT 0,
        rows_updated bigint NOT NULL DEFAULT 0,
        updated_at   timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (migration, phase, step))""",
)

LEFT_BEHIND = {
    TX: "That step was rolled back (nothing of it remains).",
    VALIDATE: "The VALIDATE was rolled back; the constraint stays NOT VALID, guarding new rows only.",
    INDEX: "No index of that step remains valid or invalid (an invalid one is dropped, or named above).",
    BACKFILL: "Its batches committed so far stay, with their checkpoint; the failed batch was rolled back.",
    RAW_NOTX: "That step ran outside a transaction: check what it did before rerunning.",
    DROP_INDEX: "The index was not dropped (or is left invalid; the rerun drops it).",
}
Progress = Callable[[str, dict[str, Any]], None]


def step_checksum(step: Step) -> str:
    return hashlib.sha256("\n".join((step.key, *step.sql)).encode()).hexdigest()


class _Blocked(Exception):
    """Sessions that would make CREATE INDEX CONCURRENTLY wait (and leave an invalid index)."""

    def __init__(self, sessions: list[guards.Session]):
        super().__init__("; ".join(str(s) for s in sessions))
        self.sessions = sessions


def _lock_failure(e: BaseException) -> bool:
    return isinstance(e, _Blocked) or guards.is_lock_failure(e)


# --- plan -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedStep:
    migration: str
    phase: str
    index: int
    key: str
    kind: str
    sql: tuple[str, ...]
    done: bool


@dataclass
class Plan:
    phase: str
    steps: list[PlannedStep] = field(default_factory=list)
    refused: dict[str, dict[str, str]] = field(default_factory=dict)  # migration -> {host: version}
    not_expanded: list[str] = field(default_factory=list)  # contract asked before expand
    findings: list[linting.Finding] = field(default_factory=list)
    requires: dict[str, str] = field(default_factory=dict)  # migration -> contract_requires_version
    gated: bool = False   # the contract gate was decided (a plan made only to show the steps is not)

    @property
    def blocking_hosts(self) -> list[str]:
        return sorted({h for hosts in self.refused.values() for h in hosts})

    @property
    def blocking_versions(self) -> dict[str, str]:
        return {h: v for hosts in self.refused.values() for h, v in hosts.items()}

    @property
    def gate_allows(self) -> bool:
        return not (self.refused or self.not_expanded)

    def gate_verdict(self) -> str:
        """The contract gate's verdict in one sentence an operator can act on (the only wording of
        it: the dry run, the runbook, the engine's refusal and the records all use this)."""
        if self.phase != "contract":
            return "contract gate: not applicable (expand keeps every version working)"
        if self.not_expanded:
            return (f"contract gate: REFUSED: the expand phase of {', '.join(self.not_expanded)} has not run. "
                    "Nothing was changed; run the expand phase (and release) first.")
        if self.refused:
            why = "; ".join(
                f"{m} needs >= {self.requires.get(m, '?')} but " + ", ".join(f"{h} serves {v}" for h, v in hs.items())
                for m, hs in self.refused.items()
            )
            return (f"contract gate: REFUSED, blocked by {', '.join(self.blocking_hosts)}: refusing the contract "
                    f"phase ({why}). Nothing was changed. Finish rolling the fleet to the new version, then "
                    "rerun the contract.")
        return "contract gate: allowed: no app host serves a version older than a pending contract needs"

    @property
    def pending(self) -> list[PlannedStep]:
        return [s for s in self.steps if not s.done]

    def text(self) -> str:
        lines = [
            f"phase {self.phase}: {len(self.pending)} step(s) to run, "
            f"{len(self.steps) - len(self.pending)} already done"
        ]
        for s in self.steps:
            mark = "done" if s.done else "todo"
            lines.append(f"  [{mark}] {s.migration} #{s.index} {s.key} ({s.kind})")
            if not s.done:
                lines += [f"      {line}" for sql in s.sql for line in sql.splitlines()]
        if self.gated:
            lines.append(self.gate_verdict())
        return "\n".join(lines)


def _applied(conn) -> dict[tuple[str, str], str]:
    if conn is None or conn.execute("SELECT to_regclass('opsbook_migrations')").fetchone()[0] is None:
        return {}
    return {
        (m, p): c for m, p, c in conn.execute("SELECT migration, phase, checksum FROM opsbook_migrations")
    }


def applied_phases(conn) -> set[tuple[str, str]]:
    """(migration, phase) pairs applied to the database `conn` is connected to. Read-only."""
    return set(_applied(conn))


def _steps_done(conn) -> dict[tuple[str, str, int], str]:
    if conn is None or conn.execute("SELECT to_regclass('opsbook_migration_steps')").fetchone()[0] is None:
        return {}
    return {
        (m, p, s): c
        for m, p, s, c in conn.execute("SELECT migration, phase, step, checksum FROM opsbook_migration_steps")
    }


def _build_plan(conn, migrations: list[Migration], phase: str, fleet_versions, gate: bool = True) -> Plan:
    applied, done = _applied(conn), _steps_done(conn)
    p = Plan(phase, gated=gate and phase == "contract")
    for m in migrations:
        if (m.id, phase) in applied:
            continue
        steps = spec.compile_phase(m, phase)
        if phase == "contract":
            if conn is not None and (m.id, "expand") not in applied:
                p.not_expanded.append(m.id)
                continue
            if gate and steps and m.contract_requires_version:
                old = guards.contract_gate(m.contract_requires_version, fleet_versions)
                if old:
                    p.refused[m.id] = old
                    p.requires[m.id] = m.contract_requires_version
        for i, s in enumerate(steps, 1):
            recorded = done.get((m.id, phase, i))
            if recorded is not None and recorded != step_checksum(s):
                raise MigrationError(
                    f"{m.path.name}: {phase} step {i} {s.key!r} was applied with different SQL than the file "
                    "says now. Nothing was run. Restore that step as it was (steps after the last applied "
                    "one "
                    "may change), finish the phase, then change things in a new migration."
                )
            p.steps.append(PlannedStep(m.id, phase, i, s.key, s.kind, s.sql, recorded is not None))
    return p


def plan(
    conninfo: str | None, directory: Path, phase: str = "expand", fleet_versions: dict[str, str | None] | None = None,
    *, gate: bool = True,
) -> Plan:
    """What `run` would do: every step of every pending migration with the SQL it runs, marked done
    or to do (without a database everything is to do), lint findings, and contract refusals."""
    if phase not in PHASES:
        raise MigrationError(f"unknown phase {phase!r}; phases are {', '.join(PHASES)}")
    migrations = spec.load_migrations(directory)
    if conninfo is None:
        p = _build_plan(None, migrations, phase, fleet_versions, gate)
    else:
        import psycopg

        with psycopg.connect(conninfo, autocommit=True, application_name=APP_NAME) as conn:
            p = _build_plan(conn, migrations, phase, fleet_versions, gate)
    todo = {s.migration for s in p.pending}
    for m in migrations:
        if m.id in todo:
            p.findings += linting.lint_migration(m, (phase,))
    return p


# --- run --------------------------------------------------------------------------------------
class _Runner:
    def __init__(self, conn, conninfo: str, s: Settings, result: RunResult, progress: Progress, t0: float):  # noqa: PLR0917 - private, called once
        self.conn, self.conninfo, self.s, self.result, self.progress, self.t0 = (
            conn,
            conninfo,
            s,
            result,
            progress,
            t0,
        )

    def now(self) -> float:
        return time.monotonic() - self.t0

    def timeouts(self, lock_ms: int, stmt_ms: int, local: bool = True) -> None:
        scope = "LOCAL " if local else ""
        self.conn.execute(f"SET {scope}lock_timeout = {int(lock_ms)}")
        self.conn.execute(f"SET {scope}statement_timeout = {int(stmt_ms)}")

    def record(self, m: Migration, phase: str, i: int, step: Step, seconds: float, attempts: int) -> None:  # noqa: PLR0917 - the ledger row, in order
        self.conn.execute(
            "INSERT INTO opsbook_migration_steps (migration, phase, step, key, checksum, seconds, attempts) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (m.id, phase, i, step.key, step_checksum(step), seconds, attempts),
        )

    def retrying(
        self, attempt: Callable[[], Any], step: Step, before_retry: Callable[[], None] | None = None
    ):
        def on_retry(n: int, e: BaseException) -> None:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.result.lock_retries.append({"t": self.now(), "step": step.key, "attempt": n, "error": msg})
            self.progress("retry", {"step": step.key, "attempt": n, "error": msg})

        try:
            return guards.with_retries(
                attempt,
                self.s,
                what=step.key,
                on_retry=on_retry,
                before_retry=before_retry,
                retry_on=_lock_failure,
            )
        except Exception as e:
            if not _lock_failure(e):
                raise
            holders = e.sessions if isinstance(e, _Blocked) else guards.lock_holders(
                self.conn, step.table, with_snapshots=step.kind == INDEX)
            whose = f"Sessions holding locks on {step.table or 'the object'}"
            if step.kind == INDEX and not isinstance(e, _Blocked):
                whose += " or a snapshot (CREATE INDEX CONCURRENTLY waits for both)"
            names = "\n  ".join(str(h) for h in holders) or "(none seen now; the conflict was transient)"
            raise _LockGaveUp(
                f"could not get the lock for step {step.key!r} in {self.s.retries + 1} attempts "
                f"(lock_timeout {self.s.lock_timeout_ms}ms each, backoff up to {self.s.backoff_max_s}s). "
                f"{whose}:\n  {names}"
            ) from e

    # step kinds ----------------------------------------------------------------------------
    def run_tx(self, m: Migration, phase: str, i: int, step: Step) -> int:
        con = step.args.get("constraint")

        def attempt() -> None:
            t = time.monotonic()
            with self.conn.transaction():
                self.timeouts(self.s.lock_timeout_ms, self.s.ddl_statement_timeout_ms)
                exists = (
                    con
                    and self.conn.execute(
                        "SELECT 1 FROM pg_constraint WHERE conname = %s AND conrelid = to_regclass(%s)",
                        (con, step.table),
                    ).fetchone()
                )
                if not exists:
                    for sql in step.sql:
                        self.conn.execute(sql)
                self.record(m, phase, i, step, time.monotonic() - t, 1)

        return self.retrying(attempt, step)[1]

    def run_validate(self, m: Migration, phase: str, i: int, step: Step) -> int:
        import psycopg.errors as pe

        def attempt() -> None:
            t = time.monotonic()
            with self.conn.transaction():
                self.timeouts(self.s.lock_timeout_ms, self.s.long_statement_timeout_ms)
                self.conn.execute(step.sql[0])
                self.record(m, phase, i, step, time.monotonic() - t, 1)

        try:
            return self.retrying(attempt, step)[1]
        except (pe.CheckViolation, pe.ForeignKeyViolation, pe.NotNullViolation) as e:
            raise MigrationError(
                f"{m.id} {phase} step {i} {step.key!r}: existing rows break the constraint: {e}. "
                f"The constraint {step.args['constraint']} stays in place NOT VALID (it already guards new "
                "rows); "
                "fix the existing rows, then rerun to validate it."
            ) from e

    def index_state(self, name: str) -> str | None:
        row = self.conn.execute(
            "SELECT indisvalid AND indisready FROM pg_index WHERE indexrelid = to_regclass(%s)", (name,)
        ).fetchone()
        return None if row is None else ("valid" if row[0] else "invalid")

    def drop_invalid_index(self, name: str, wait_s: float | None = None) -> None:
        """Drop `name` if it is invalid. DROP INDEX CONCURRENTLY waits for every transaction holding a
        lock on the table: for lock_timeout, or up to `wait_s` (its wait blocks no reads or writes,
        only other DDL and vacuum of the table)."""
        if self.index_state(name) == "invalid":
            lock_ms = self.s.lock_timeout_ms if wait_s is None else max(self.s.lock_timeout_ms, int(wait_s * 1000))
            self.progress("drop_invalid_index", {"index": name} | ({} if wait_s is None else {"wait_up_to_s": wait_s}))
            self.timeouts(lock_ms, self.s.long_statement_timeout_ms, local=False)
            self.conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")

    def run_index(self, m: Migration, phase: str, i: int, step: Step) -> int:
        name = step.args["name"]

        def attempt() -> None:
            t = time.monotonic()
            self.drop_invalid_index(name)
            if self.index_state(name) != "valid":
                # CREATE INDEX CONCURRENTLY waits for every open writer on the table; one that stays open
                # makes it time out after it has created an invalid index. Do not start while one exists.
                # (A writer that begins just before the build, or an old snapshot, still can: see below.)
                blockers = guards.blocking_sessions(
                    self.conn, self.s, step.table, self.s.lock_timeout_ms / 1000
                )
                if blockers:
                    raise _Blocked(blockers)
                self.timeouts(self.s.lock_timeout_ms, self.s.long_statement_timeout_ms, local=False)
                self.conn.execute(step.sql[0])
            self.record(m, phase, i, step, time.monotonic() - t, 1)

        try:
            return self.retrying(attempt, step)[1]
        except Exception as e:
            # A build that failed in the middle (a lock timeout while it waits for a writer that began
            # just before it) leaves its index INVALID, and dropping it waits for that same writer: wait
            # for it as long as the engine lets a transaction run beside it (max_transaction_age_s).
            wait_s = self.s.max_transaction_age_s
            try:
                self.drop_invalid_index(name, wait_s)
            except Exception as cleanup:  # noqa: BLE001 - reported in the message below
                try:
                    ready = self.conn.execute(
                        "SELECT indisready FROM pg_index WHERE indexrelid = to_regclass(%s)", (name,)
                    ).fetchone()
                except Exception:  # noqa: BLE001 - unknown: the message assumes the costlier case
                    ready = None
                cost = "writes do not maintain it" if ready == (False,) else f"every write to {step.table} maintains it"
                raise MigrationError(
                    f"{m.id} {phase} step {i} {step.key!r} failed ({e}). Its CREATE INDEX CONCURRENTLY had "
                    f"already created {name}, which is left INVALID: dropping it waits for the same "
                    f"sessions, still open after {wait_s:.0f}s more ({cleanup}). No query uses {name}; "
                    f"{cost}. Nothing else of the step was applied and it is not recorded. End or wait "
                    f"out the sessions named above, then rerun (it drops {name} first), or run "
                    f"DROP INDEX CONCURRENTLY {name}."
                ) from e
            raise
        finally:
            self.timeouts(self.s.lock_timeout_ms, self.s.ddl_statement_timeout_ms, local=False)

    def run_notx(self, m: Migration, phase: str, i: int, step: Step) -> int:
        def attempt() -> None:
            t = time.monotonic()
            self.timeouts(self.s.lock_timeout_ms, self.s.long_statement_timeout_ms, local=False)
            for sql in step.sql:
                self.conn.execute(sql)
            self.record(m, phase, i, step, time.monotonic() - t, 1)

        try:
            return self.retrying(attempt, step)[1]
        finally:
            self.timeouts(self.s.lock_timeout_ms, self.s.ddl_statement_timeout_ms, local=False)

    def primary_key(self, table: str) -> tuple[str, str]:
        rows = self.conn.execute(
            """SELECT a.attname, format_type(a.atttypid, a.atttypmod)
               FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
               WHERE i.indrelid = to_regclass(%s) AND i.indisprimary""",
            (table,),
        ).fetchall()
        if len(rows) != 1:
            raise MigrationError(
                f"backfill of {table} walks the table by its primary key, and {table} has "
                f"{'no' if not rows else 'a multi-column'} primary key. Nothing was changed; "
                "add a single-column primary key or backfill with a `sql:` step."
            )
        return rows[0]

    def throttle(self, step: Step) -> None:
        waited = 0.0
        while True:
            over = guards.read_signals(self.conn, self.s).over(self.s)
            if not over:
                return
            if waited >= self.s.max_throttle_wait_s:
                raise MigrationError(
                    f"backfill {step.key!r} throttled for {waited:.0f}s in a row ({'; '.join(over)}). Its "
                    "progress "
                    "is checkpointed; rerun when the database is less busy, or raise the limits."
                )
            self.result.throttles.append(
                ThrottleEvent(self.now(), step.key, tuple(over), self.s.throttle_sleep_s)
            )
            self.progress("throttle", {"step": step.key, "reasons": over})
            time.sleep(self.s.throttle_sleep_s)
            waited += self.s.throttle_sleep_s

    def run_backfill(self, m: Migration, phase: str, i: int, step: Step) -> int:
        a = step.args
        pk, pk_type = self.primary_key(step.table)
        # The batch runs with parameters, so a `%` in the declared SQL must reach Postgres as `%%`.
        expression, where = a["expression"].replace("%", "%%"), a["where"] and a["where"].replace("%", "%%")
        sql = spec.backfill_sql(step.table, a["column"], expression, where, pk, pk_type)
        first_sql = sql.replace(f"WHERE {pk} > %(after)s::{pk_type} ", "")
        row = self.conn.execute(
            "SELECT last_key, batches FROM opsbook_backfill_progress WHERE migration=%s AND phase=%s AND "
            "step=%s",
            (m.id, phase, i),
        ).fetchone()
        after, batch_no = (row[0], row[1]) if row else (None, 0)
        if row:
            self.progress("resume", {"step": step.key, "after": after, "batches": batch_no})
        n = a["batch_size"]
        t_step, attempts_max = time.monotonic(), 1
        attempts_seen = [1]  # read by the batch closure when it records the finished step
        while True:
            self.throttle(step)
            t = time.monotonic()

            def batch(after=after):
                with self.conn.transaction():
                    self.timeouts(self.s.lock_timeout_ms, self.s.batch_statement_timeout_ms)
                    last, scanned, updated = self.conn.execute(
                        first_sql if after is None else sql, {"after": after, "n": n}
                    ).fetchone()
                    if scanned:
                        self.conn.execute(
                            """INSERT INTO opsbook_backfill_progress AS p
                                   (migration, phase, step, last_key, batches, rows_scanned, rows_updated)
                               VALUES (%s, %s, %s, %s, 1, %s, %s)
                               ON CONFLICT (migration, phase, step) DO UPDATE SET
                                   last_key = excluded.last_key, batches = p.batches + 1,
                                   rows_scanned = p.rows_scanned + excluded.rows_scanned,
                                   rows_updated = p.rows_updated + excluded.rows_updated,
                                   updated_at = now()""",
                            (m.id, phase, i, last, scanned, updated),
                        )
                    else:
                        self.record(m, phase, i, step, time.monotonic() - t_step, attempts_seen[0])
                    return last, scanned, updated

            (last, scanned, updated), attempts = self.retrying(batch, step)
            attempts_max = attempts_seen[0] = max(attempts_max, attempts)
            if not scanned:
                return attempts_max
            batch_no += 1
            dt = time.monotonic() - t
            stat = BatchStat(
                self.now(),
                m.id,
                step.key,
                batch_no,
                scanned,
                updated,
                dt,
                scanned / dt if dt else 0.0,
                attempts,
            )
            self.result.batches.append(stat)
            self.progress(
                "batch",
                {
                    "step": step.key,
                    "batch": batch_no,
                    "rows": scanned,
                    "updated": updated,
                    "rows_per_s": round(stat.rows_per_s),
                },
            )
            after = last
            if scanned < n:
                with self.conn.transaction():
                    self.record(m, phase, i, step, time.monotonic() - t_step, attempts_max)
                return attempts_max
            if self.s.batch_pause_s:
                time.sleep(self.s.batch_pause_s)

    def run_migration(self, m: Migration, phase: str, done: dict) -> None:
        runners = {
            TX: self.run_tx,
            VALIDATE: self.run_validate,
            INDEX: self.run_index,
            DROP_INDEX: self.run_notx,
            RAW_NOTX: self.run_notx,
            BACKFILL: self.run_backfill,
        }
        self.progress("migration", {"migration": m.id, "phase": phase, "description": m.description})
        for i, step in enumerate(spec.compile_phase(m, phase), 1):
            if (m.id, phase, i) in done:
                self.result.steps.append(
                    StepResult(m.id, phase, step.key, step.kind, step.sql, self.now(), 0, 0, True)
                )
                continue
            self.progress("step", {"migration": m.id, "step": step.key, "kind": step.kind})
            started = self.now()
            try:
                attempts = runners[step.kind](m, phase, i, step)
            except Exception as e:
                before = [s.key for s in self.result.steps if s.migration == m.id and s.phase == phase]
                state = (
                    f"Steps of {m.id} {phase} applied and recorded before it: {before}. "
                    if before
                    else f"Nothing of {m.id} {phase} had been applied. "
                )
                what = str(e) if isinstance(e, MigrationError | _LockGaveUp) else f"{type(e).__name__}: {e}"
                raise MigrationError(
                    f"migration {m.id} ({phase}) stopped at step {i} {step.key!r}: {what}\n"
                    f"{LEFT_BEHIND.get(step.kind, LEFT_BEHIND[TX])} {state}"
                    "Fix the cause and rerun: recorded steps are skipped and a backfill resumes from its "
                    "checkpoint."
                ) from e
            self.result.steps.append(
                StepResult(
                    m.id, phase, step.key, step.kind, step.sql, started, self.now() - started, attempts
                )
            )
        self.conn.execute(
            "INSERT INTO opsbook_migrations (migration, phase, checksum) VALUES (%s, %s, %s) ON CONFLICT "
            "DO NOTHING",
            (m.id, phase, m.checksum),
        )
        self.result.applied.append(m.id)


class _LockGaveUp(Exception):
    pass


def _noop(_event: str, _data: dict[str, Any]) -> None:
    pass


def run(
    conninfo: str,
    directory: Path,
    phase: str = "expand",
    *,
    fleet_versions: dict[str, str | None] | None = None,
    settings: Settings | None = None,
    progress: Progress | None = None,
    only: list[str] | None = None,
) -> RunResult:
    """Apply every pending `phase` in order under the guards, measuring what other clients felt.

    Refuses before changing anything when: a file is malformed, squawk finds an unaccepted problem
    (raw and generated SQL), sessions hold long transactions, or (contract) a host serves a version
    older than a migration's contract_requires_version. `progress(event, data)` hears about each
    migration, step, retry, batch and throttle. On failure the MigrationError carries `.result`.
    """
    import psycopg

    s = settings or Settings()
    progress = progress or _noop
    p = plan(conninfo, directory, phase, fleet_versions)  # validates, lints, gates: raises before any change
    linting.refuse_unaccepted(p.findings)
    if not p.gate_allows:
        raise MigrationError(p.gate_verdict())
    migrations = [m for m in spec.load_migrations(directory) if only is None or m.id in only]
    result = RunResult(phase)
    t0 = time.monotonic()
    with psycopg.connect(conninfo, autocommit=True, application_name=APP_NAME) as conn:
        # One controller at a time per database: a session advisory lock, held until this
        # connection closes (so a killed controller frees it at once).
        if not conn.execute("SELECT pg_try_advisory_lock(%s)", (ADVISORY_LOCK,)).fetchone()[0]:
            holder = conn.execute(
                "SELECT a.pid, a.usename, a.client_addr, a.backend_start FROM pg_locks l "
                "JOIN pg_stat_activity a USING (pid) WHERE l.locktype = 'advisory' AND l.objid = %s",
                (ADVISORY_LOCK & 0xFFFFFFFF,)).fetchone()
            who = f"pid {holder[0]} ({holder[1]} from {holder[2]}, since {holder[3]:%H:%M:%S})" if holder else "?"
            raise MigrationError(f"another opsbook is running migrations on this database ({who}); nothing was "
                                 "run. Wait for it to finish, then run again.")
        runner = _Runner(conn, conninfo, s, result, progress, t0)
        runner.timeouts(s.lock_timeout_ms, s.ddl_statement_timeout_ms, local=False)
        guards.refuse_blockers(conn, s)
        for ddl in LEDGER_DDL:
            runner.retrying(lambda ddl=ddl: conn.execute(ddl), Step("ledger", TX, (ddl,)))
        applied, done = _applied(conn), _steps_done(conn)
        with LockSampler(conninfo, result, t0, {conn.info.backend_pid}, s.sample_interval_s):
            try:
                for m in migrations:
                    if (m.id, phase) not in applied:
                        runner.run_migration(m, phase, done)
            except MigrationError as e:
                result.error = str(e)
                e.result = result
                raise
            finally:
                result.seconds = time.monotonic() - t0
    return result


@dataclass(frozen=True)
class PendingContract:
    migration: str
    description: str
    requires: str | None  # the app version every host must serve first (contract_requires_version)
    steps: int

    def __str__(self) -> str:
        need = f"once every app host serves >= {self.requires}" if self.requires else "any time"
        return f"{self.migration} ({self.description}): {self.steps} step(s), runs {need}"


def pending_contracts(conn, directory: Path) -> list[PendingContract]:
    """Migrations whose expand phase is applied and whose contract phase (with steps) is not, in
    order: what `invoke migrate --phase contract` would run once the fleet allows it. Read-only.
    `conn` is an open connection (or a conninfo string, for a caller without one)."""
    if isinstance(conn, str):
        import psycopg

        with psycopg.connect(conn, autocommit=True, application_name=APP_NAME) as c:
            return pending_contracts(c, directory)
    applied = _applied(conn)
    out = []
    for m in spec.load_migrations(directory):
        if (m.id, "expand") in applied and (m.id, "contract") not in applied:
            steps = spec.compile_phase(m, "contract")
            if steps:
                out.append(PendingContract(m.id, m.description, m.contract_requires_version, len(steps)))
    return out


def apply_pending(
    conninfo: str,
    directory: Path,
    phase: str = "expand",
    log: Callable[[str], None] = print,
) -> list[str]:
    """Apply every pending `phase` in order (see `run`). Returns the ids of the migrations applied."""

    def progress(event: str, data: dict[str, Any]) -> None:
        if event == "migration":
            log(f"applying {data['migration']} ({data['phase']}): {data['description']}")
        elif event in ("retry", "throttle", "resume", "drop_invalid_index"):
            log(f"  {event}: {data}")

    return run(conninfo, directory, phase, progress=progress).applied
