"""Schema migrations shipped with the service (`app/migrations/NNNN_name.yml`).

Each file has an `expand` phase (changes the running version tolerates) and a `contract`
phase (changes that need every host on a version that no longer uses the old schema).
This module is the simple ordered runner: it applies pending phases in order and records
each applied (migration, phase) in `opsbook_migrations`. The online engine (safe forms,
guards, throttled backfills) grows from it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from opsbook.errors import OpsbookError

PHASES = ("expand", "contract")
FILE_RE = re.compile(r"^(?P<id>\d{4})_(?P<name>[a-z0-9_]+)\.ya?ml$")
LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS opsbook_migrations (
    migration  text NOT NULL,
    phase      text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (migration, phase)
)
"""


class MigrationError(OpsbookError):
    pass


@dataclass(frozen=True)
class Migration:
    id: str                      # "0001_course_events"
    path: Path
    description: str
    steps: dict[str, list[dict[str, Any]]] = field(repr=False)
    checksum: str = field(repr=False)


def load_migrations(directory: Path) -> list[Migration]:
    """Read and validate every migration file, in order. Raises before anything runs."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MigrationError(f"no migrations directory at {directory}")
    out = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or path.suffix not in (".yml", ".yaml"):
            continue
        if not FILE_RE.match(path.name):
            raise MigrationError(f"{path.name}: migration files are named NNNN_snake_name.yml")
        text = path.read_text()
        try:
            doc = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise MigrationError(f"{path.name}: not valid YAML: {e}") from e
        if not isinstance(doc, dict):
            raise MigrationError(f"{path.name}: expected a mapping with expand/contract")
        unknown = set(doc) - {"description", "expand", "contract", "contract_requires_version"}
        if unknown:
            raise MigrationError(f"{path.name}: unknown keys {sorted(unknown)}")
        steps = {}
        for phase in PHASES:
            phase_steps = doc.get(phase) or []
            if not isinstance(phase_steps, list):
                raise MigrationError(f"{path.name}: {phase} must be a list of operations")
            for i, step in enumerate(phase_steps, 1):
                if not (isinstance(step, dict) and list(step) == ["sql"] and isinstance(step["sql"], str)):
                    raise MigrationError(f"{path.name}: {phase} step {i}: expected `sql: ...`, got {step!r}")
            steps[phase] = phase_steps
        out.append(
            Migration(
                id=path.stem,
                path=path,
                description=str(doc.get("description", "")),
                steps=steps,
                checksum=hashlib.sha256(text.encode()).hexdigest(),
            )
        )
    ids = [m.id[:4] for m in out]
    dupes = {i for i in ids if ids.count(i) > 1}
    if dupes:
        raise MigrationError(f"two migrations share the number(s) {sorted(dupes)} in {directory}")
    return out


def applied(conn) -> dict[tuple[str, str], str]:
    """(migration, phase) -> checksum for everything applied to this database."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('opsbook_migrations') IS NOT NULL")
        if not cur.fetchone()[0]:
            return {}
        cur.execute("SELECT migration, phase, checksum FROM opsbook_migrations")
        return {(m, p): c for m, p, c in cur.fetchall()}


def pending(conn, migrations: list[Migration], phase: str = "expand") -> list[Migration]:
    done = applied(conn)
    return [m for m in migrations if (m.id, phase) not in done]


def apply_pending(
    conninfo: str,
    directory: Path,
    phase: str = "expand",
    log: Callable[[str], None] = print,
) -> list[str]:
    """Apply every pending `phase` in order, each migration in one transaction. Returns their ids."""
    import psycopg

    if phase not in PHASES:
        raise MigrationError(f"unknown phase {phase!r}; phases are {', '.join(PHASES)}")
    migrations = load_migrations(directory)
    done = []
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(LEDGER_DDL)
        for m in pending(conn, migrations, phase):
            log(f"applying {m.id} ({phase}): {m.description}")
            try:
                with conn.transaction():
                    conn.execute("SET LOCAL lock_timeout = '5s'")
                    for step in m.steps[phase]:
                        conn.execute(step["sql"])
                    conn.execute(
                        "INSERT INTO opsbook_migrations (migration, phase, checksum) VALUES (%s, %s, %s)",
                        (m.id, phase, m.checksum),
                    )
            except psycopg.Error as e:
                raise MigrationError(
                    f"migration {m.id} ({phase}) failed and was rolled back: {e}. "
                    f"Applied before it: {done or 'nothing'}. Fix the migration or the database and rerun."
                ) from e
            done.append(m.id)
    return done
