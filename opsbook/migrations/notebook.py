"""What `runbooks/migrate.ipynb` calls: each section of the runbook is one or two calls here.

The runbook reads like a procedure (plan, preflight, contract gate, run, measurements, key
figures); the logic lives here so it is tested like the rest of opsbook. Functions print what a
person reading the record needs and return plain values (dataclasses, DataFrames, figures).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from opsbook import ROOT
from opsbook.migrations import engine, guards
from opsbook.migrations.guards import Settings
from opsbook.migrations.measure import RunResult
from opsbook.migrations.spec import PHASES, MigrationError

APP_MIGRATIONS = ROOT / "app" / "migrations"


def no_password(conninfo: str, what: str = "the DSN override") -> None:
    """Refuse a conninfo that carries a password: it would be stored in the run's record."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        raise MigrationError(f"{what} is not a valid libpq conninfo or URL. Nothing was run.") from None
    if parts.get("password"):
        raise MigrationError(
            f"{what} contains a password, and run parameters are stored in the record. Give the password "
            "through PGPASSWORD or ~/.pgpass instead (libpq reads both). Nothing was run."
        )


def describe_conninfo(conninfo: str) -> str:
    """host:port/dbname as user: where the migration runs, without secrets."""
    from psycopg.conninfo import conninfo_to_dict

    d = conninfo_to_dict(conninfo)
    return f"{d.get('host', 'local socket')}:{d.get('port', 5432)}/{d.get('dbname', '?')} as {d.get('user', '?')}"


@dataclass
class Context:
    env: str
    phase: str
    conninfo: str = field(repr=False)
    where: str
    directory: Path
    settings: Settings
    fleet_override: dict[str, str] | None
    dry_run: bool = False


def settings_from(  # noqa: PLR0917 - one per runbook parameter
    lock_timeout_ms: int = 2000,
    retries: int = 5,
    max_transaction_age_s: float = 60.0,
    max_idle_in_transaction_s: float = 10.0,
    max_active_sessions: int = 50,
    max_replication_lag_s: float = 10.0,
    max_canary_ms: float = 250.0,
    batch_pause_s: float = 0.0,
    sample_interval_s: float = 0.2,
) -> Settings:
    """The engine's Settings from runbook parameters; a throttle limit of 0 turns that signal off."""
    return Settings(
        lock_timeout_ms=lock_timeout_ms,
        retries=retries,
        max_transaction_age_s=max_transaction_age_s,
        max_idle_in_transaction_s=max_idle_in_transaction_s,
        max_active_sessions=max_active_sessions or None,
        max_replication_lag_s=max_replication_lag_s or None,
        max_canary_ms=max_canary_ms or None,
        batch_pause_s=batch_pause_s,
        sample_interval_s=sample_interval_s,
    )


def prepare(
    env: str,
    phase: str,
    *,
    dsn_override: str = "",
    fleet_override: dict | None = None,
    migrations_dir: str = "",
    settings: Settings | None = None,
    dry_run: bool = False,
) -> Context:
    """Validate the parameters and resolve the database: the override, else the environment's
    service database as the admin role (`opsbook.release.admin_conninfo`)."""
    if phase not in PHASES:
        raise MigrationError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}. Nothing was run.")
    for host, version in (fleet_override or {}).items():
        if not isinstance(version, str) or not version:
            raise MigrationError(f"fleet_override: host {host!r} needs a version string, got {version!r}")
    directory = Path(migrations_dir) if migrations_dir else APP_MIGRATIONS
    if not directory.is_dir():
        raise MigrationError(f"no migrations directory {directory}. Nothing was run.")
    if dsn_override:
        no_password(dsn_override)
        conninfo = dsn_override
    else:
        from opsbook import inventory
        from opsbook.release import admin_conninfo

        conninfo = admin_conninfo(inventory.load(env))
    ctx = Context(env, phase, conninfo, describe_conninfo(conninfo), directory, settings or Settings(),
                  dict(fleet_override) if fleet_override else None, dry_run)
    source = "override" if dsn_override else f"{env}'s service database"
    print(f"{phase} migrations of {directory} on {ctx.where} ({source}); dry run: {dry_run}")
    return ctx


# --- plan -------------------------------------------------------------------------------------
def plan(ctx: Context) -> engine.Plan:
    """Every step of the pending phase with its SQL, and the lint findings. The contract gate is
    decided in its own section (it needs the fleet)."""
    p = engine.plan(ctx.conninfo, ctx.directory, ctx.phase, fleet_versions={})
    print(p.text())
    if p.findings:
        print("\nlint findings (each must be accepted in its file, with a reason):")
        for f in p.findings:
            print(f"  {f}")
    else:
        print("\nlint: clean")
    return p


# --- preflight --------------------------------------------------------------------------------
def preflight(ctx: Context):
    """Sessions that would block our DDL or be blocked by it. Raises (the run stops) when any
    exist and this is not a dry run."""
    import pandas as pd
    import psycopg

    with psycopg.connect(ctx.conninfo, autocommit=True, application_name=guards.APP_NAME) as conn:
        found = guards.blocking_sessions(conn, ctx.settings)
    if not found:
        print("no blocking sessions")
        return pd.DataFrame(columns=["pid", "user", "state", "age_s", "query", "application"])
    table = pd.DataFrame([asdict(s) for s in found])
    print(f"{len(found)} blocking session(s):")
    for s in found:
        print(f"  {s}")
    if not ctx.dry_run:
        guards.refuse_blockers_found(found, ctx.settings)
    return table


# --- contract gate ----------------------------------------------------------------------------
@dataclass
class Gate:
    needed: bool
    fleet: dict[str, str | None] | None
    refused: dict[str, dict[str, str]]  # migration -> {host: version that blocks}
    source: str

    @property
    def blocking_hosts(self) -> list[str]:
        return sorted({h for hosts in self.refused.values() for h in hosts})

    @property
    def blocking_versions(self) -> dict[str, str]:
        return {h: v for hosts in self.refused.values() for h, v in hosts.items()}


def fleet_versions(ctx: Context, timeout: float = 3.0):
    """The override, else what every app host of the environment serves (GET /version)."""
    if ctx.fleet_override is not None:
        return ctx.fleet_override, "fleet_override parameter"
    from opsbook import fleet, inventory

    return fleet.served_versions(inventory.load(ctx.env), timeout=timeout), "GET /version on every app host"


def contract_gate(ctx: Context, timeout: float = 3.0) -> Gate:
    """Expand: not needed. Contract: every pending migration's required version against the fleet.
    Raises, naming the hosts, when a host blocks (unless dry run)."""
    import pandas as pd
    from IPython.display import display

    if ctx.phase != "contract":
        print("expand phase: the contract gate does not apply (expand keeps every version working)")
        return Gate(False, None, {}, "")
    versions, source = fleet_versions(ctx, timeout)
    rows = versions.rows() if hasattr(versions, "rows") else [
        {"host": h, "url": "", "version": v, "problem": ""} for h, v in sorted(versions.items())
    ]
    display(pd.DataFrame(rows, columns=["host", "url", "version", "problem"]))
    p = engine.plan(ctx.conninfo, ctx.directory, "contract", fleet_versions=versions)
    gate = Gate(True, dict(versions), p.refused, source)
    if p.not_expanded:
        print(f"not expanded yet (their contract cannot run): {p.not_expanded}")
    if not gate.refused:
        print(f"contract allowed: no app host ({source}) serves a version older than a pending contract needs")
        return gate
    lines = [
        f"{m}: " + ", ".join(f"{h} serves {v}" for h, v in hosts.items()) for m, hosts in gate.refused.items()
    ]
    msg = (
        f"refusing the contract phase: app hosts {', '.join(gate.blocking_hosts)} serve versions older than "
        f"it requires ({'; '.join(lines)}). Nothing was changed. Finish rolling the fleet to the new "
        "version, then rerun the contract."
    )
    if ctx.dry_run:
        print(f"dry run: {msg}")
        return gate
    # The run stops here, before the cell that reports the run's figures: the record of a refusal
    # still says what was refused and who blocked it.
    from opsbook.records import report

    report(**figures(ctx, p, None, gate))
    raise MigrationError(msg)


# --- run --------------------------------------------------------------------------------------
def progress_printer(every: int = 20):
    """A progress callback that prints each event, and every `every`-th backfill batch."""

    def progress(event: str, data: dict[str, Any]) -> None:
        if event == "batch" and data["batch"] % max(every, 1) != 1 and every > 1:
            return
        detail = ", ".join(f"{k}={v}" for k, v in data.items())
        print(f"{event}: {detail}", flush=True)
        sys.stdout.flush()

    return progress


def run(ctx: Context, gate: Gate | None = None, progress_every: int = 20) -> RunResult | None:
    """Run the pending phase. A failure does not stop the runbook here: the result (with its
    error) is returned so the measurements still show what happened; `finish` fails the run."""
    if ctx.dry_run:
        print("dry run: nothing was run")
        return None
    fleet = gate.fleet if gate is not None and gate.needed else None
    try:
        result = engine.run(ctx.conninfo, ctx.directory, ctx.phase, fleet_versions=fleet,
                            settings=ctx.settings, progress=progress_printer(progress_every))
    except MigrationError as e:
        result = getattr(e, "result", None)
        if result is None:  # refused before anything ran
            result = RunResult(ctx.phase, error=str(e))
        print(f"\nFAILED: {e}")
        return result
    print(f"\napplied: {', '.join(result.applied) or 'nothing pending'} in {result.seconds:.1f}s")
    return result


# --- measurements -----------------------------------------------------------------------------
def steps_table(result: RunResult | None):
    import pandas as pd

    cols = ["migration", "key", "kind", "seconds", "attempts", "skipped"]
    if result is None:
        return pd.DataFrame(columns=cols)
    return pd.DataFrame([asdict(s) for s in result.steps], columns=[*cols, "started"])[cols].round(3)


def batches_frame(result: RunResult | None):
    import pandas as pd

    cols = ["t", "migration", "step", "batch", "rows_scanned", "rows_updated", "seconds", "rows_per_s", "attempts"]
    return pd.DataFrame([asdict(b) for b in (result.batches if result else [])], columns=cols)


def lock_frame(result: RunResult | None):
    import pandas as pd

    cols = ["t", "waiting", "waiting_behind_migration", "longest_wait_s", "longest_wait_behind_migration_s"]
    return pd.DataFrame([asdict(s) for s in (result.lock_samples if result else [])], columns=cols)


def plot(result: RunResult | None):
    """Backfill rows/s per batch (top) and lock waits other sessions saw (bottom), over the run."""
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    batches, locks = batches_frame(result), lock_frame(result)
    for step, rows in batches.groupby("step"):
        top.plot(rows["t"], rows["rows_per_s"], marker=".", label=step)
    top.set_ylabel("backfill rows/s")
    top.set_title("batch throughput")
    if not batches.empty:
        top.legend(fontsize="small")
    if not locks.empty:
        bottom.plot(locks["t"], locks["longest_wait_s"], label="longest lock wait, any session")
        bottom.plot(locks["t"], locks["longest_wait_behind_migration_s"], label="longest wait behind the migration")
        bottom.legend(fontsize="small")
    bottom.set_ylabel("seconds waiting")
    bottom.set_xlabel("seconds since the run started")
    bottom.set_title("lock waits (sampled from pg_locks / pg_stat_activity)")
    fig.tight_layout()
    return fig


def figures(ctx: Context, p: engine.Plan, result: RunResult | None, gate: Gate | None = None) -> dict[str, Any]:
    """The key figures of the run, for `opsbook.records.report(**figures)`."""
    out: dict[str, Any] = {
        "phase": ctx.phase,
        "dry_run": ctx.dry_run,
        "database": ctx.where,
        "pending_steps": len(p.pending),
    }
    if gate is not None and gate.needed:
        out["blocking_hosts"] = gate.blocking_hosts
    if gate is not None and gate.refused and not ctx.dry_run:
        out |= {"refused": True, "blocking_versions": gate.blocking_versions,
                "refused_migrations": sorted(gate.refused)}
    if result is None:
        return out
    locks = lock_frame(result)
    out |= {
        "applied": list(result.applied),
        "steps_applied": sum(1 for s in result.steps if not s.skipped),
        "seconds": round(result.seconds, 3),
        "longest_lock_wait_s": round(result.longest_lock_wait_s, 3),
        "longest_wait_behind_migration_s": round(result.longest_wait_behind_migration_s, 3),
        # How many lock samples saw a session (a writer) waiting behind the migration, and at most how many at once.
        "writer_visible_wait_samples": int((locks["waiting_behind_migration"] > 0).sum()),
        "max_sessions_waiting_behind_migration": int(locks["waiting_behind_migration"].max() if len(locks) else 0),
        "backfill_rows_updated": result.backfill_rows,
        "backfill_rows_per_s": round(result.backfill_rows_per_s, 1),
        "lock_retries": len(result.lock_retries),
        "throttled_s": round(sum(x.slept_s for x in result.throttles), 1),
        "error": result.error,
    }
    return out


def finish(result: RunResult | None) -> None:
    """Fail the runbook (and so its record) when the run failed; say so when it did not."""
    if result is not None and result.error:
        raise MigrationError(result.error)
    print("done" if result is not None else "dry run: done, nothing changed")
