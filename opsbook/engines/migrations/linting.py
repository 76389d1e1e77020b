"""Lint migrations without a database: the format (spec.load_migrations) and, with squawk, both the
raw `sql:` steps and the SQL the engine generates for every declared operation.

squawk is the well-kept linter for exactly this (Postgres migrations that lock or rewrite); we run
its CLI with `--reporter json` and read its findings. A finding stops the migration unless the
file accepts that rule with a reason (`accept: {rule: reason}`), or the engine itself provides
what the rule asks for (ENGINE_PROVIDES, each with its reason).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from opsbook.engines.migrations.spec import (
    PHASES,
    RAW_NOTX,
    TX,
    VALIDATE,
    Migration,
    MigrationError,
    compile_phase,
    load_migrations,
)

# Rules whose demand the engine meets for every statement it runs.
ENGINE_PROVIDES = {
    "require-lock-timeout": "the engine runs every statement under a short lock_timeout, with retries",
    "require-statement-timeout": "the engine runs every statement under statement_timeout",
}
# Rules the engine meets for statements it runs inside a transaction with the step's ledger row.
ENGINE_PROVIDES_IN_TX = {
    "prefer-robust-stmts": "the step runs in one transaction with its ledger row; a rerun never repeats it",
    "transaction-nesting": "the engine owns the transaction; steps must not open their own",
}
PG_VERSION = "15"


@dataclass(frozen=True)
class Finding:
    migration: str
    phase: str
    step: str
    rule: str
    message: str
    sql: str
    accepted: str | None = None  # the reason, when the file or the engine accepts the rule

    def __str__(self) -> str:
        state = f"accepted: {self.accepted}" if self.accepted else "NOT accepted"
        return f"{self.migration} {self.phase} [{self.step}] {self.rule}: {self.message} ({state})"


def squawk_binary() -> str:
    found = shutil.which("squawk") or str(Path(sys.executable).with_name("squawk"))
    if not Path(found).exists():
        raise MigrationError("squawk is not installed (pip install squawk-cli); nothing was linted or run")
    return found


def squawk(sql: str, *, in_transaction: bool = False, pg_version: str = PG_VERSION) -> list[dict]:
    """squawk's findings for `sql` (its JSON reporter), syntax errors included."""
    cmd = [squawk_binary(), "--reporter", "json", "--pg-version", pg_version, "--stdin-filepath", "step.sql"]
    if in_transaction:
        cmd.append("--assume-in-transaction")
    text = sql.strip()
    proc = subprocess.run(
        cmd,
        input=text if text.endswith(";") else text + ";",
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    try:
        found = json.loads(proc.stdout or "[]")
    except json.JSONDecodeError as e:
        raise MigrationError(
            f"could not read squawk's output (exit {proc.returncode}): {proc.stdout[:200]!r} "
            f"{proc.stderr[:200]!r}; nothing was run"
        ) from e
    if proc.returncode not in (0, 1) or not isinstance(found, list):
        raise MigrationError(f"squawk failed (exit {proc.returncode}): {proc.stderr[:300]}; nothing was run")
    return found


def lint_migration(m: Migration, phases: tuple[str, ...] = PHASES) -> list[Finding]:
    out = []
    for phase in phases:
        for step in compile_phase(m, phase):
            if not step.lint:
                continue
            in_tx = step.kind in (TX, VALIDATE)
            for sql in step.sql:
                for f in squawk(sql, in_transaction=in_tx):
                    rule = f.get("rule_name", "?")
                    reason = (
                        m.accept.get(rule)
                        or step.accept.get(rule)
                        or ENGINE_PROVIDES.get(rule)
                        or (ENGINE_PROVIDES_IN_TX.get(rule) if in_tx else None)
                    )
                    if rule == "syntax-error":
                        reason = None  # never acceptable
                    if step.kind == RAW_NOTX and rule == "prefer-robust-stmts":
                        reason = m.accept.get(rule)
                    out.append(Finding(m.id, phase, step.key, rule, f.get("message", ""), sql, reason))
    return out


def refuse_unaccepted(findings: list[Finding]) -> None:
    bad = [f for f in findings if not f.accepted]
    if bad:
        lines = "\n  ".join(str(f) for f in bad)
        raise MigrationError(
            f"squawk found {len(bad)} problem(s) no migration accepts:\n  {lines}\n"
            "Nothing was run. Fix the SQL, or if it is safe here, accept the rule in the file with a "
            'reason: `accept: {rule-name: "why this is safe"}`.'
        )


def lint(directory: Path) -> list[Finding]:
    """Validate and lint every migration in `directory` (no database). Raises on anything unaccepted;
    returns every finding (accepted ones included) for the record."""
    findings = []
    for m in load_migrations(directory):
        findings += lint_migration(m)
    refuse_unaccepted(findings)
    return findings
