"""What `invoke migrate` and `invoke migrate.lint` call.

`invoke migrate --env E [--phase expand|contract] [--dry-run]`:
- the database is the environment's service database as the admin role
  (`opsbook.release.admin_conninfo`); the fleet is what every app host answers on `GET /version`
  (`opsbook.fleet.served_versions`). A host that does not answer blocks a contract.
- the real run is the `migrate` runbook, so it leaves a record (plan, preflight, gate, progress,
  measurements, plot, key figures); `--dry-run` prints the plan, the lint findings and the
  contract gate's verdict, changes nothing and leaves no record.
- `--dsn` and `--fleet` are overrides for operators (a database or fleet the inventory does not
  describe, e.g. a restored copy): `--dsn` never carries a password (it is stored in the record;
  use PGPASSWORD or ~/.pgpass), `--fleet` is `host=version` pairs and replaces asking the hosts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from opsbook import ROOT
from opsbook.migrations import engine, linting
from opsbook.migrations.spec import PHASES, MigrationError

APP_MIGRATIONS = ROOT / "app" / "migrations"


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
    """Lint every migration; print accepted findings with their reasons. Raises on any other."""
    findings = linting.lint(directory)
    for f in findings:
        out(str(f))
    out(
        f"{len(list(directory.glob('*.y*ml')))} migration file(s) lint clean ({len(findings)} accepted "
        "finding(s))"
    )
    return len(findings)


def migrate(
    env,
    phase: str = "expand",
    *,
    dry_run: bool = False,
    dsn: str | None = None,
    fleet: str | None = None,
    directory: Path = APP_MIGRATIONS,
    out: Callable[[str], None] = print,
    pairs: list[str] | None = None,
    **runbook_params: Any,
) -> dict[str, Any] | engine.Plan:
    """`env` is an environment name (or an inventory Env).

    Dry run: print the plan and the gate's verdict, return the Plan. Otherwise run the `migrate`
    runbook for `env` and return its ledger entry (RunbookFailed, with the record, on failure).
    `pairs` (`NAME=VALUE`) and `runbook_params` set the runbook's other parameters (throttle, timeouts)."""
    from opsbook.migrations import notebook

    if phase not in PHASES:
        raise MigrationError(f"unknown phase {phase!r}; phases are {', '.join(PHASES)}. Nothing was run.")
    fleet_override = parse_fleet(fleet)
    if dsn:
        notebook.no_password(dsn, "--dsn")
    if dry_run:
        return dry_run_plan(env, phase, dsn=dsn, fleet_override=fleet_override, directory=directory, out=out)
    from opsbook import runbooks

    flagged = {"phase", "dry_run", "dsn_override", "fleet_override", "migrations_dir"}
    given = {pair.partition("=")[0].strip() for pair in pairs or []} | set(runbook_params)
    if given & flagged:
        raise MigrationError(
            f"set {', '.join(sorted(given & flagged))} with its own flag (--phase, --dry-run, --dsn, --fleet), "
            "not as a runbook parameter. Nothing was run."
        )
    if pairs:  # `lock_timeout_ms=1000`: converted by the runbook's declared types
        runbook_params = {**runbooks.parse_cli_parameters("migrate", runbooks.parameters("migrate"), pairs),
                          **runbook_params}
    params = {"phase": phase, "dsn_override": dsn or "", "fleet_override": fleet_override or {}, **runbook_params}
    if directory != APP_MIGRATIONS:
        params["migrations_dir"] = str(directory)
    return runbooks.run("migrate", env, params, log=out)


def _env(env):
    from opsbook import inventory

    return inventory.load(env) if isinstance(env, str) else env


def dry_run_plan(
    env,
    phase: str,
    *,
    dsn: str | None = None,
    fleet_override: dict[str, str] | None = None,
    directory: Path = APP_MIGRATIONS,
    out: Callable[[str], None] = print,
) -> engine.Plan:
    """The plan (pending steps and their SQL), lint findings and, for a contract, the gate's verdict
    with every app host's version. Read-only: no change, no record."""
    from opsbook.migrations import notebook

    if dsn:
        conninfo = dsn
    else:
        from opsbook.release import admin_conninfo

        conninfo = admin_conninfo(_env(env))
    fleet_versions = None
    if phase == "contract":
        if fleet_override is not None:
            fleet_versions = fleet_override
        else:
            from opsbook import fleet

            fleet_versions = fleet.served_versions(_env(env))
    p = engine.plan(conninfo, directory, phase, fleet_versions if phase == "contract" else {})
    out(f"dry run: {phase} on {notebook.describe_conninfo(conninfo)}; nothing will be changed")
    out(p.text())
    for f in p.findings:
        out(f"  lint: {f}")
    if phase == "contract":
        source = "--fleet" if fleet_override is not None else "GET /version"
        for host, version in sorted((fleet_versions or {}).items()):
            why = getattr(fleet_versions, "reasons", {}).get(host, "")
            out(f"  fleet ({source}): {host} serves {version}" + (f" ({why})" if why else ""))
        if p.refused:
            hosts = sorted({h for hs in p.refused.values() for h in hs})
            out(f"contract gate: REFUSED, blocked by {', '.join(hosts)}")
        elif p.not_expanded:
            out(f"contract gate: REFUSED, expand has not run for {', '.join(p.not_expanded)}")
        else:
            out("contract gate: allowed")
    return p
