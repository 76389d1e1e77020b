"""What `invoke migrate` and `invoke migrate.lint` call (and what the migrate runbook calls).

The environment -> database and environment -> fleet versions wiring belongs to the release code;
until it lands, `migrate` takes the database as a conninfo and the fleet as `host=version` pairs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from opsbook import ROOT
from opsbook.migrations import engine, linting
from opsbook.migrations.guards import Settings
from opsbook.migrations.measure import RunResult
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


def resolve_dsn(env: str, dsn: str | None) -> str:
    dsn = dsn or os.environ.get("OPSBOOK_MIGRATE_DSN")
    if not dsn:
        raise MigrationError(
            f"no database known for env {env!r}: pass --dsn 'host=... dbname=...' (or set "
            "OPSBOOK_MIGRATE_DSN). "
            "Nothing was run."
        )
    return dsn


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
    env: str,
    phase: str = "expand",
    *,
    dry_run: bool = False,
    dsn: str | None = None,
    fleet: str | None = None,
    directory: Path = APP_MIGRATIONS,
    settings: Settings | None = None,
    out: Callable[[str], None] = print,
) -> RunResult | engine.Plan:
    """Plan (dry run) or run the pending `phase` against env's database, printing progress."""
    if phase not in PHASES:
        raise MigrationError(f"unknown phase {phase!r}; phases are {', '.join(PHASES)}. Nothing was run.")
    conninfo = resolve_dsn(env, dsn)
    fleet_versions = parse_fleet(fleet)
    p = engine.plan(conninfo, directory, phase, fleet_versions)
    out(p.text())
    if dry_run:
        return p

    def progress(event: str, data: dict) -> None:
        if event != "batch" or data["batch"] % 20 == 1:
            out(f"{event}: {data}")

    result = engine.run(
        conninfo, directory, phase, fleet_versions=fleet_versions, settings=settings, progress=progress
    )
    out(f"summary: {result.summary()}")
    return result
