"""The migrate operation: `invoke migrate`, `invoke migrate.lint` and the sections of
`runbooks/migrate.ipynb`.

`invoke migrate --env E [--phase expand|contract] [--dry-run]`:
- the database is the environment's service database as the admin role
  (`opsbook.engines.database.admin_conninfo`); the fleet is what every app host answers on
  `GET /version` (`opsbook.engines.fleet.served_versions`). A host that does not answer blocks a
  contract.
- the real run is the `migrate` runbook, so it leaves a record (plan, preflight, gate, progress,
  measurements, plot, key figures); `--dry-run` prints the plan, the lint findings and the
  contract gate's verdict, changes nothing and leaves no record.
- `--dsn` and `--fleet` are overrides for operators (a database or fleet the inventory does not
  describe, e.g. a restored copy): `--dsn` never carries a password (it is stored in the record;
  use PGPASSWORD or ~/.pgpass), `--fleet` is `host=version` pairs and replaces asking the hosts.
- the engine's knobs (`Settings`: lock timeout, retries, throttle limits) are set by name with
  `--param NAME=VALUE`; they are defined once, in `opsbook.engines.migrations.guards.Settings`.

The runbook reads like a procedure (plan, preflight, contract gate, run, measurements, key
figures); each of its sections is one or two calls to the functions below, which print what a
person reading the record needs and return plain values (dataclasses, DataFrames, figures).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from opsbook.core.inventory import Env
from opsbook.core.paths import APP_MIGRATIONS
from opsbook.engines import database, fleet, masking
from opsbook.engines import lock as locks
from opsbook.engines.migrations import engine, guards, linting
from opsbook.engines.migrations.guards import Settings
from opsbook.engines.migrations.measure import RunResult
from opsbook.engines.migrations.spec import PHASES, MigrationError
from opsbook.engines.records import runner
from opsbook.engines.records.figures import record_figures


# --- what the Invoke tasks call ----------------------------------------------------------------
def parse_fleet(text: str | None) -> dict[str, str] | None:
    """`app1=1.1.0,app2=1.0.3` -> {"app1": "1.1.0", "app2": "1.0.3"}."""
    if not text:
        return None
    out = {}
    for pair in text.split(","):
        host, sep, version = pair.strip().partition("=")
        if not (sep and host and version):
            raise MigrationError(
                f"--fleet takes host=version pairs separated by commas, got {pair!r}; nothing was run"
            )
        out[host] = version
    return out


def lint_report(directory: Path = APP_MIGRATIONS, out: Callable[[str], None] = print) -> int:
    """Lint every migration; print accepted findings with their reasons. Raises on any other. Then
    the masking file next to the migrations: every column they create must be decided there."""
    findings = linting.lint(directory)
    for f in findings:
        out(str(f))
    out(
        f"{len(list(directory.glob('*.y*ml')))} migration file(s) lint clean ({len(findings)} accepted "
        "finding(s))"
    )
    for note in masking.lint(directory, directory.parent / masking.MASKING_FILE):
        out(note)
    return len(findings)


def runbook_parameters(pairs: list[str] | None) -> dict[str, Any]:
    """`--param NAME=VALUE` pairs -> the migrate runbook's parameters: an engine knob (a Settings
    field) goes into the `settings` mapping, anything else must be one of the runbook's own
    parameters (converted by its declared type)."""
    knobs = Settings.knobs()
    settings: dict[str, Any] = {}
    other: list[str] = []
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        name = name.strip()
        if sep and name in knobs:
            settings[name] = None if value.strip().lower() in ("none", "off") else value.strip()
        else:
            other.append(pair)
    params = runner.parse_cli_parameters("migrate", runner.parameters("migrate"), other) if other else {}
    flagged = {"phase", "dry_run", "dsn_override", "fleet_override", "migrations_dir", "settings"} & set(params)
    if flagged:
        raise MigrationError(
            f"set {', '.join(sorted(flagged))} with its own flag (--phase, --dry-run, --dsn, --fleet) or an engine "
            f"setting by its name (--param lock_timeout_ms=1000), not as a runbook parameter. Nothing was run."
        )
    if settings:
        # Command-line strings become numbers here (names and types checked by Settings itself, and
        # again by the runbook before anything runs).
        converted = asdict(Settings.from_mapping(settings))
        params["settings"] = {k: converted[k] for k in settings}
    return params


def migrate(
    env: Env,
    phase: str = "expand",
    *,
    dry_run: bool = False,
    dsn: str | None = None,
    fleet: str | None = None,
    directory: Path = APP_MIGRATIONS,
    out: Callable[[str], None] = print,
    pairs: list[str] | None = None,
) -> dict[str, Any] | engine.Plan:
    """Dry run: print the plan and the gate's verdict, return the Plan. Otherwise run the `migrate`
    runbook for `env` and return its ledger entry (RunbookFailed, with the record, on failure).
    `pairs` (`NAME=VALUE`) set engine knobs and the runbook's other parameters."""
    if phase not in PHASES:
        raise MigrationError(f"unknown phase {phase!r}; phases are {', '.join(PHASES)}. Nothing was run.")
    fleet_override = parse_fleet(fleet)
    if dsn:
        no_password(dsn, "--dsn")
    params = runbook_parameters(pairs)
    if dry_run:
        return dry_run_plan(env, phase, dsn=dsn, fleet_override=fleet_override, directory=directory, out=out)
    params |= {"phase": phase, "dsn_override": dsn or "", "fleet_override": fleet_override or {}}
    if directory != APP_MIGRATIONS:
        params["migrations_dir"] = str(directory)
    # One operation at a time per environment: a migration never runs while a release or a
    # rollback moves hosts (the contract gate's answer would be stale), nor beside another one.
    with locks.lock_for(env).hold(f"migrate {phase}", wait=0) as held:
        out(held.message)
        return runner.run("migrate", env, params, log=out)


def dry_run_plan(
    env: Env,
    phase: str,
    *,
    dsn: str | None = None,
    fleet_override: dict[str, str] | None = None,
    directory: Path = APP_MIGRATIONS,
    out: Callable[[str], None] = print,
) -> engine.Plan:
    """The plan (pending steps and their SQL), lint findings and, for a contract, the gate's verdict
    with every app host's version. Read-only: no change, no record."""
    conninfo = dsn or database.admin_conninfo(env)
    versions: dict[str, str | None] = {}
    if phase == "contract":
        versions = fleet_override if fleet_override is not None else fleet.served_versions(env)
    p = engine.plan(conninfo, directory, phase, versions)
    out(f"dry run: {phase} on {describe_conninfo(conninfo)}; nothing will be changed")
    out(p.text())
    for f in p.findings:
        out(f"  lint: {f}")
    if phase == "contract":
        source = "--fleet" if fleet_override is not None else "GET /version"
        for host, version in sorted(versions.items()):
            why = getattr(versions, "reasons", {}).get(host, "")
            out(f"  fleet ({source}): {host} serves {version}" + (f" ({why})" if why else ""))
    return p


# --- what the migrate runbook calls -------------------------------------------------------------
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


def prepare(
    env: str,
    phase: str,
    *,
    dsn_override: str = "",
    fleet_override: dict | None = None,
    migrations_dir: str = "",
    settings: dict[str, Any] | None = None,
    dry_run: bool = False,
) -> Context:
    """Validate the parameters and resolve the database: the override, else the environment's
    service database as the admin role (`opsbook.release.admin_conninfo`)."""
    if phase not in PHASES:
        raise MigrationError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}. Nothing was run.")
    knobs = Settings.from_mapping(settings)
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
        from opsbook.core.inventory import load

        conninfo = database.admin_conninfo(load(env))
    ctx = Context(env, phase, conninfo, describe_conninfo(conninfo), directory, knobs,
                  dict(fleet_override) if fleet_override else None, dry_run)
    source = "override" if dsn_override else f"{env}'s service database"
    print(f"{phase} migrations of {directory} on {ctx.where} ({source}); dry run: {dry_run}")
    changed = {k: v for k, v in asdict(knobs).items() if v != asdict(Settings())[k]}
    print(f"engine settings: the defaults{', except ' + str(changed) if changed else ''}")
    return ctx


# --- plan -------------------------------------------------------------------------------------
def plan(ctx: Context) -> engine.Plan:
    """Every step of the pending phase with its SQL, and the lint findings. The contract gate is
    decided in its own section (it needs the fleet)."""
    p = engine.plan(ctx.conninfo, ctx.directory, ctx.phase, gate=False)
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
    plan: engine.Plan | None   # the contract plan the verdict comes from (None: expand)
    source: str

    @property
    def refused(self) -> dict[str, dict[str, str]]:  # migration -> {host: version that blocks}
        return self.plan.refused if self.plan is not None else {}

    @property
    def blocking_hosts(self) -> list[str]:
        return self.plan.blocking_hosts if self.plan is not None else []

    @property
    def blocking_versions(self) -> dict[str, str]:
        return self.plan.blocking_versions if self.plan is not None else {}


def fleet_versions(ctx: Context, timeout: float = 3.0):
    """The override, else what every app host of the environment serves (GET /version)."""
    if ctx.fleet_override is not None:
        return ctx.fleet_override, "fleet_override parameter"
    from opsbook.core.inventory import load

    return fleet.served_versions(load(ctx.env), timeout=timeout), "GET /version on every app host"


def contract_gate(ctx: Context, timeout: float = 3.0) -> Gate:
    """Expand: not needed. Contract: every pending migration's required version against the fleet.
    Raises, naming the hosts, when a host blocks (unless dry run)."""
    import pandas as pd
    from IPython.display import display

    if ctx.phase != "contract":
        print("expand phase: the contract gate does not apply (expand keeps every version working)")
        return Gate(False, None, None, "")
    versions, source = fleet_versions(ctx, timeout)
    rows = versions.rows() if hasattr(versions, "rows") else [
        {"host": h, "url": "", "version": v, "problem": ""} for h, v in sorted(versions.items())
    ]
    display(pd.DataFrame(rows, columns=["host", "url", "version", "problem"]))
    p = engine.plan(ctx.conninfo, ctx.directory, "contract", fleet_versions=versions)
    gate = Gate(True, dict(versions), p, source)
    print(f"{p.gate_verdict()} (fleet: {source})")
    if not gate.refused:
        return gate
    if ctx.dry_run:
        print("dry run: the contract would be refused")
        return gate
    # The run stops here, before the cell that reports the run's figures: the record of a refusal
    # still says what was refused and who blocked it.
    record_figures(**figures(ctx, p, None, gate))
    raise MigrationError(p.gate_verdict())


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
    """The key figures of the run, for `record_figures(**figures)`."""
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
