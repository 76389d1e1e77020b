"""The migration file format and the safe Postgres forms each operation turns into.

A migration is `app/migrations/NNNN_snake_name.yml`:

    description: one line a person reads in the plan
    contract_requires_version: "1.1.0"   # contract runs only when every app host serves >= this
    accept:                              # squawk rules this file knowingly breaks, each with a reason
      prefer-bigint-over-int: "sequence numbers are per course; int is plenty"
    expand:                              # changes the running (older) app version tolerates
      - add_column: {table: course_events, column: student_uuid, type: uuid}
      - backfill: {table: course_events, column: student_uuid, expression: "(data->>'student_uuid')::uuid"}
      - create_index: {table: course_events, name: course_events_student_uuid_idx, columns: [student_uuid]}
    contract:                            # changes that need every host on the new version
      - set_not_null: {table: t, column: c}

Everything here works without a database: loading validates every file (unknown keys, unknown
operations, missing arguments) and `compile_phase` turns operations into `Step`s whose SQL the
plan shows and squawk lints. The engine (engine.py) runs the steps.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from opsbook.core.errors import OpsbookError

PHASES = ("expand", "contract")
FILE_RE = re.compile(r"^(?P<id>\d{4})_(?P<name>[a-z0-9_]+)\.ya?ml$")
IDENT_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}(\.[a-z_][a-z0-9_]{0,62})?$")
VERSION_RE = re.compile(r"^\d+(\.\d+){0,3}([a-z0-9.+-]*)$")
RULE_RE = re.compile(r"^[a-z0-9-]+$")
# Defaults that make ADD COLUMN rewrite the table (volatile). Postgres >= 11 stores a
# non-volatile default in the catalog instead, so those are instant.
VOLATILE_DEFAULT_RE = re.compile(
    r"\b(random|gen_random_uuid|uuid_generate_v[14]|clock_timestamp|timeofday|nextval|txid_current)\s*\(",
    re.IGNORECASE,
)

# Step kinds: how the engine runs a step.
TX = "tx"  # one short transaction under lock_timeout + statement_timeout, retried
VALIDATE = "validate"  # VALIDATE CONSTRAINT: own transaction, weak lock, long statement_timeout
INDEX = "index"  # CREATE INDEX CONCURRENTLY: outside any transaction, invalid leftovers dropped
DROP_INDEX = "drop_index"  # DROP INDEX CONCURRENTLY: outside any transaction
BACKFILL = "backfill"  # keyset batches, each its own transaction, checkpointed
RAW_NOTX = "raw_notx"  # raw SQL the file says must run outside a transaction


class MigrationError(OpsbookError):
    pass


@dataclass(frozen=True)
class Step:
    """One unit the engine runs and records in the per-step ledger."""

    key: str  # stable, readable: "add_column course_events.student_uuid"
    kind: str
    sql: tuple[str, ...]  # what runs (for BACKFILL: the batch statement, shown in the plan)
    table: str | None = None
    op: str = ""  # the declared operation this step comes from
    args: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    lint: bool = True  # lint this step's SQL with squawk
    accept: dict[str, str] = field(default_factory=dict, repr=False, compare=False)  # engine-known rules


@dataclass(frozen=True)
class Migration:
    id: str  # "0001_course_events"
    path: Path
    description: str
    steps: dict[str, list[dict[str, Any]]] = field(repr=False)  # declared operations per phase
    checksum: str = field(repr=False)
    contract_requires_version: str | None = None
    accept: dict[str, str] = field(default_factory=dict, repr=False)


# --- the operations ---------------------------------------------------------------------------
# name -> (required args, optional args, phases it may appear in)
OPERATIONS: dict[str, tuple[set[str], set[str], tuple[str, ...]]] = {
    "create_table": ({"table", "columns"}, {"constraints"}, PHASES),
    "add_column": ({"table", "column", "type"}, {"default", "not_null"}, PHASES),
    "backfill": ({"table", "column", "expression"}, {"where", "batch_size", "keep_synced"}, PHASES),
    "stop_sync": ({"table", "column"}, set(), PHASES),
    "create_index": ({"table", "name", "columns"}, {"unique", "where", "using"}, PHASES),
    "add_check": ({"table", "name", "expression"}, set(), PHASES),
    "add_foreign_key": (
        {"table", "name", "columns", "references_table", "references_columns"},
        {"on_delete"},
        PHASES,
    ),
    "add_unique": ({"table", "name", "columns"}, set(), PHASES),
    "set_not_null": ({"table", "column"}, set(), PHASES),
    "rename_column": ({"table", "column", "to", "type"}, {"not_null", "batch_size"}, ("expand",)),
    "drop_column": ({"table", "column"}, set(), PHASES),
    "drop_index": ({"name"}, set(), PHASES),
    "sql": (set(), set(), PHASES),  # `sql: "..."` or `sql: {sql: "...", transaction: false}`
}
ON_DELETE = {"no action", "restrict", "cascade", "set null", "set default"}
MAX_BATCH = 100_000
CONTRACT_DROP = "a contract runs only when every app host serves contract_requires_version or newer"
OWN_FUNCTION = {"ban-drop-function": "the engine's own sync-trigger function; only its trigger calls it"}


def _err(where: str, msg: str) -> MigrationError:
    return MigrationError(f"{where}: {msg}. Nothing was run; fix the file and rerun.")


def _ident(where: str, args: dict, key: str) -> str:
    v = args[key]
    if not (isinstance(v, str) and IDENT_RE.match(v)):
        raise _err(where, f"`{key}` must be a lower-case SQL identifier (optionally schema.name), got {v!r}")
    return v


def _text(where: str, args: dict, key: str) -> str:
    v = args[key]
    if isinstance(v, int | float) and not isinstance(v, bool):
        args[key] = v = str(v)  # `default: 0` reads as YAML's number; it is the SQL literal 0
    if not (isinstance(v, str) and v.strip()):
        raise _err(where, f"`{key}` must be a non-empty SQL text, got {v!r}")
    if ";" in v:
        raise _err(where, f"`{key}` must be one SQL expression, without `;`")
    return v.strip()


def _idents(where: str, args: dict, key: str) -> list[str]:
    v = args[key]
    if not (isinstance(v, list) and v and all(isinstance(x, str) and IDENT_RE.match(x) for x in v)):
        raise _err(where, f"`{key}` must be a non-empty list of column names, got {v!r}")
    return v


def _validate_op(where: str, phase: str, step: Any) -> None:  # noqa: PLR0912, PLR0915 - a check per rule
    if not (isinstance(step, dict) and len(step) == 1):
        raise _err(where, f"expected one operation like `add_column: {{...}}`, got {step!r}")
    ((op, args),) = step.items()
    if op not in OPERATIONS:
        raise _err(where, f"unknown operation {op!r}; known: {', '.join(sorted(OPERATIONS))}")
    required, optional, phases = OPERATIONS[op]
    if phase not in phases:
        raise _err(where, f"`{op}` belongs in the {' or '.join(phases)} phase")
    if op == "sql":
        if isinstance(args, str) and args.strip():
            return
        if (
            isinstance(args, dict)
            and isinstance(args.get("sql"), str)
            and set(args) <= {"sql", "transaction"}
        ):
            if not isinstance(args.get("transaction", True), bool):
                raise _err(where, "`transaction` must be true or false")
            return
        raise _err(where, "expected `sql: ...` (SQL text) or `sql: {sql: ..., transaction: false}`")
    if not isinstance(args, dict):
        raise _err(where, f"`{op}` takes a mapping of arguments, got {args!r}")
    missing = required - set(args)
    if missing:
        raise _err(where, f"`{op}` is missing {', '.join(sorted(missing))}")
    unknown = set(args) - required - optional
    if unknown:
        raise _err(where, f"`{op}` does not take {', '.join(sorted(unknown))}")
    for key in ("table", "column", "name", "to", "references_table"):
        if key in args:
            _ident(where, args, key)
    for key in ("expression", "where", "type", "default"):
        if key in args:
            _text(where, args, key)
    for key in ("columns", "references_columns"):
        if key in args and op != "create_table":
            _idents(where, args, key)
    for key in ("unique", "keep_synced", "not_null"):
        if key in args and not isinstance(args[key], bool):
            raise _err(where, f"`{key}` must be true or false")
    if "batch_size" in args and not (
        isinstance(args["batch_size"], int) and 0 < args["batch_size"] <= MAX_BATCH
    ):
        raise _err(where, f"`batch_size` must be an integer between 1 and {MAX_BATCH}")
    if op == "create_table":
        cols = args["columns"]
        if not (
            isinstance(cols, dict)
            and cols
            and all(IDENT_RE.match(str(k)) and isinstance(v, str) for k, v in cols.items())
        ):
            raise _err(where, "`columns` must map column names to their SQL definitions")
        cons = args.get("constraints", [])
        if not (isinstance(cons, list) and all(isinstance(c, str) for c in cons)):
            raise _err(where, "`constraints` must be a list of SQL table constraints")
    if op == "add_column":
        if args.get("not_null") and "default" not in args:
            raise _err(
                where, "a NOT NULL column needs a default; or add it nullable, backfill, then set_not_null"
            )
        if "default" in args and VOLATILE_DEFAULT_RE.search(args["default"]):
            raise _err(
                where,
                "a volatile default rewrites the whole table under an exclusive lock; "
                "add the column without a default, then backfill",
            )
    if op == "add_foreign_key":
        if len(args["columns"]) != len(args["references_columns"]):
            raise _err(where, "`columns` and `references_columns` must have the same length")
        if args.get("on_delete") and str(args["on_delete"]).lower() not in ON_DELETE:
            raise _err(where, f"`on_delete` must be one of {sorted(ON_DELETE)}")
    if (
        op == "create_index"
        and "using" in args
        and args["using"] not in ("btree", "hash", "gin", "gist", "brin")
    ):
        raise _err(where, "`using` must be btree, hash, gin, gist or brin")


def load_migrations(directory: Path) -> list[Migration]:  # noqa: PLR0912 - a check per key
    """Read and validate every migration file, in order. Raises before anything runs."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MigrationError(f"no migrations directory at {directory}")
    out = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or path.suffix not in (".yml", ".yaml"):
            continue
        if not FILE_RE.match(path.name):
            raise _err(path.name, "migration files are named NNNN_snake_name.yml")
        text = path.read_text()
        try:
            doc = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise _err(path.name, f"not valid YAML: {e}") from e
        if not isinstance(doc, dict):
            raise _err(path.name, "expected a mapping with expand/contract")
        unknown = set(doc) - {"description", "expand", "contract", "contract_requires_version", "accept"}
        if unknown:
            raise _err(path.name, f"unknown keys {sorted(unknown)}")
        accept = doc.get("accept") or {}
        if not (
            isinstance(accept, dict)
            and all(
                isinstance(k, str) and RULE_RE.match(k) and isinstance(v, str) and v.strip()
                for k, v in accept.items()
            )
        ):
            raise _err(path.name, "`accept` maps squawk rule names to the reason this file breaks them")
        requires = doc.get("contract_requires_version")
        if requires is not None and not (isinstance(requires, str) and VERSION_RE.match(requires)):
            raise _err(
                path.name,
                f'contract_requires_version must be a quoted version like "1.2.0", got {requires!r}',
            )
        steps = {}
        for phase in PHASES:
            phase_steps = doc.get(phase) or []
            if not isinstance(phase_steps, list):
                raise _err(path.name, f"{phase} must be a list of operations")
            for i, step in enumerate(phase_steps, 1):
                _validate_op(f"{path.name}: {phase} step {i}", phase, step)
            steps[phase] = phase_steps
        m = Migration(
            id=path.stem,
            path=path,
            description=str(doc.get("description", "")),
            steps=steps,
            checksum=hashlib.sha256(text.encode()).hexdigest(),
            contract_requires_version=requires,
            accept=accept,
        )
        if compile_phase(m, "contract") and not requires:
            raise _err(
                path.name,
                "a non-empty contract needs `contract_requires_version` (the first app "
                "version that no longer uses the old schema)",
            )
        out.append(m)
    ids = [m.id[:4] for m in out]
    dupes = {i for i in ids if ids.count(i) > 1}
    if dupes:
        raise MigrationError(f"two migrations share the number(s) {sorted(dupes)} in {directory}")
    return out


# --- safe forms -------------------------------------------------------------------------------
def _short(name: str, limit: int = 63) -> str:
    """A derived identifier within Postgres' 63-byte limit, stable across runs."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]  # noqa: S324 - a name, not security
    return f"{name[: limit - 9]}_{digest}"


def _bare(table: str) -> str:
    return table.rsplit(".", maxsplit=1)[-1]


def sync_trigger_name(table: str, column: str) -> str:
    return _short(f"opsbook_sync_{_bare(table)}_{column}")


def check_steps(op: str, table: str, name: str, add_sql: str) -> list[Step]:
    """ADD CONSTRAINT ... NOT VALID (brief exclusive lock), then VALIDATE (no write lock) separately."""
    return [
        Step(f"{op} {name} (not valid)", TX, (add_sql,), table, op, {"constraint": name}),
        Step(
            f"{op} {name} (validate)",
            VALIDATE,
            (f"ALTER TABLE {table} VALIDATE CONSTRAINT {name}",),
            table,
            op,
            {"constraint": name},
        ),
    ]


def not_null_steps(op: str, table: str, column: str) -> list[Step]:
    """SET NOT NULL without a scan under ACCESS EXCLUSIVE: a validated CHECK proves it first."""
    chk = _short(f"{_bare(table)}_{column}_not_null")
    return [
        *check_steps(
            op, table, chk, f"ALTER TABLE {table} ADD CONSTRAINT {chk} CHECK ({column} IS NOT NULL) NOT VALID"
        ),
        Step(
            f"{op} {table}.{column}",
            TX,
            (
                f"ALTER TABLE {table} ALTER COLUMN {column} SET NOT NULL",
                f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {chk}",
            ),
            table,
            op,
            accept={
                "adding-not-nullable-field": "a validated CHECK (col IS NOT NULL) spares SET NOT NULL a scan",
                "ban-drop-constraint": "that CHECK only spared SET NOT NULL its scan; NOT NULL says the same",
            },
        ),
    ]


def backfill_sql(  # noqa: PLR0917 - the parts of one statement
    table: str, column: str, expression: str, where: str | None, pk: str = "<pk>", pk_type: str = "<pk type>"
) -> str:
    """One keyset batch: the next `n` keys after the checkpoint, updated in one short transaction."""
    cond = f" AND ({where})" if where else ""
    return (
        f"WITH batch AS (SELECT {pk} AS opsbook_key FROM {table} WHERE {pk} > %(after)s::{pk_type} "
        f"ORDER BY {pk} LIMIT %(n)s), "
        f"done AS (UPDATE {table} SET {column} = ({expression}) FROM batch "
        f"WHERE {table}.{pk} = batch.opsbook_key{cond} RETURNING 1) "
        f"SELECT (SELECT b.opsbook_key FROM batch AS b ORDER BY b.opsbook_key DESC LIMIT 1)::text, "
        f"(SELECT count(*) FROM batch), (SELECT count(*) FROM done)"
    )


def _sync_function(table: str, column: str, expression: str) -> tuple[str, str, str]:
    name = sync_trigger_name(table, column)
    fn = (
        f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $fn$\n"
        f"BEGIN\n"
        f"  IF NEW.{column} IS NULL THEN\n"
        f"    NEW.{column} := (SELECT {expression} FROM (SELECT NEW.*) AS opsbook_row);\n"
        f"  END IF;\n"
        f"  RETURN NEW;\n"
        f"END $fn$"
    )
    return (
        name,
        fn,
        f"CREATE TRIGGER {name} BEFORE INSERT OR UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION {name}()",
    )


def _rename_function(table: str, old: str, new: str) -> tuple[str, str, str]:
    name = sync_trigger_name(table, f"{old}_{new}")
    fn = (
        f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $fn$\n"
        f"BEGIN\n"
        f"  IF TG_OP = 'INSERT' THEN\n"
        f"    IF NEW.{new} IS NULL THEN NEW.{new} := NEW.{old};\n"
        f"    ELSIF NEW.{old} IS NULL THEN NEW.{old} := NEW.{new}; END IF;\n"
        f"  ELSIF NEW.{new} IS DISTINCT FROM OLD.{new} THEN NEW.{old} := NEW.{new};\n"
        f"  ELSIF NEW.{old} IS DISTINCT FROM OLD.{old} THEN NEW.{new} := NEW.{old};\n"
        f"  END IF;\n"
        f"  RETURN NEW;\n"
        f"END $fn$"
    )
    return (
        name,
        fn,
        f"CREATE TRIGGER {name} BEFORE INSERT OR UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION {name}()",
    )


def _trigger_steps(op: str, key: str, table: str, name: str, fn: str, trigger: str) -> Step:  # noqa: PLR0917 - the parts of one statement
    return Step(key, TX, (fn, f"DROP TRIGGER IF EXISTS {name} ON {table}", trigger), table, op)


def _drop_trigger_step(op: str, key: str, table: str, name: str) -> Step:
    return Step(
        key,
        TX,
        (f"DROP TRIGGER IF EXISTS {name} ON {table}", f"DROP FUNCTION IF EXISTS {name}()"),
        table,
        op,
        accept=OWN_FUNCTION,
    )


def _backfill_step(op: str, table: str, column: str, expression: str, where: str | None, batch: int) -> Step:  # noqa: PLR0917 - the parts of one statement
    return Step(
        f"backfill {table}.{column}",
        BACKFILL,
        (backfill_sql(table, column, expression, where),),
        table,
        op,
        {"column": column, "expression": expression, "where": where, "batch_size": batch},
        lint=False,
    )


def index_sql(  # noqa: PLR0917 - the parts of one statement
    table: str,
    name: str,
    columns: list[str],
    unique: bool = False,
    where: str | None = None,
    using: str = "btree",
) -> str:
    u = "UNIQUE " if unique else ""
    w = f" WHERE {where}" if where else ""
    cols = ", ".join(columns)
    return f"CREATE {u}INDEX CONCURRENTLY IF NOT EXISTS {name} ON {table} USING {using} ({cols}){w}"


def steps_for(op: str, a: dict[str, Any], phase: str) -> list[Step]:  # noqa: PLR0911, PLR0912 - one branch per operation
    """The safe steps one declared operation becomes in `phase`."""
    t = a.get("table")
    if op == "create_table":
        body = [f"{c} {d}" for c, d in a["columns"].items()] + list(a.get("constraints", []))
        sql = f"CREATE TABLE IF NOT EXISTS {t} (\n    " + ",\n    ".join(body) + "\n)"
        return [Step(f"create_table {t}", TX, (sql,), t, op)]
    if op == "add_column":
        default = f" DEFAULT {a['default']}" if "default" in a else ""
        nn = " NOT NULL" if a.get("not_null") else ""
        sql = f"ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {a['column']} {a['type']}{default}{nn}"
        return [Step(f"add_column {t}.{a['column']}", TX, (sql,), t, op)]
    if op == "backfill":
        steps = []
        if a.get("keep_synced"):
            name, fn, trig = _sync_function(t, a["column"], a["expression"])
            steps.append(
                _trigger_steps(op, f"keep {t}.{a['column']} in sync (trigger {name})", t, name, fn, trig)
            )
        steps.append(
            _backfill_step(op, t, a["column"], a["expression"], a.get("where"), a.get("batch_size", 5000))
        )
        return steps
    if op == "stop_sync":
        name = sync_trigger_name(t, a["column"])
        return [_drop_trigger_step(op, f"stop syncing {t}.{a['column']} (trigger {name})", t, name)]
    if op == "create_index":
        sql = index_sql(
            t, a["name"], a["columns"], a.get("unique", False), a.get("where"), a.get("using", "btree")
        )
        return [Step(f"create_index {a['name']}", INDEX, (sql,), t, op, {"name": a["name"]})]
    if op == "add_check":
        return check_steps(
            op,
            t,
            a["name"],
            f"ALTER TABLE {t} ADD CONSTRAINT {a['name']} CHECK ({a['expression']}) NOT VALID",
        )
    if op == "add_foreign_key":
        on_delete = f" ON DELETE {a['on_delete'].upper()}" if a.get("on_delete") else ""
        sql = (
            f"ALTER TABLE {t} ADD CONSTRAINT {a['name']} FOREIGN KEY ({', '.join(a['columns'])}) "
            f"REFERENCES {a['references_table']} ({', '.join(a['references_columns'])}){on_delete} NOT VALID"
        )
        return check_steps(op, t, a["name"], sql)
    if op == "add_unique":
        return [
            Step(
                f"add_unique {a['name']} (index)",
                INDEX,
                (index_sql(t, a["name"], a["columns"], unique=True),),
                t,
                op,
                {"name": a["name"]},
            ),
            Step(
                f"add_unique {a['name']} (constraint)",
                TX,
                (f"ALTER TABLE {t} ADD CONSTRAINT {a['name']} UNIQUE USING INDEX {a['name']}",),
                t,
                op,
                {"constraint": a["name"]},
            ),
        ]
    if op == "set_not_null":
        return not_null_steps(op, t, a["column"])
    if op == "rename_column":
        old, new = a["column"], a["to"]
        name, fn, trig = _rename_function(t, old, new)
        if phase == "expand":
            return [
                Step(
                    f"rename_column {t}.{old} -> {new} (new column)",
                    TX,
                    (f"ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {new} {a['type']}",),
                    t,
                    op,
                ),
                _trigger_steps(op, f"rename_column {t}.{old} -> {new} (sync trigger)", t, name, fn, trig),
                _backfill_step(op, t, new, old, f"{new} IS DISTINCT FROM {old}", a.get("batch_size", 5000)),
            ]
        steps = not_null_steps(op, t, new) if a.get("not_null") else []
        # One transaction: without the trigger the old NOT NULL column would refuse the new version's inserts.
        return [
            *steps,
            Step(
                f"rename_column {t}.{old} -> {new} (drop sync trigger and old column)",
                TX,
                (
                    f"DROP TRIGGER IF EXISTS {name} ON {t}",
                    f"ALTER TABLE {t} DROP COLUMN IF EXISTS {old}",
                    f"DROP FUNCTION IF EXISTS {name}()",
                ),
                t,
                op,
                accept={"ban-drop-column": CONTRACT_DROP, **OWN_FUNCTION},
            ),
        ]
    if op == "drop_column":
        return [
            Step(
                f"drop_column {t}.{a['column']}",
                TX,
                (f"ALTER TABLE {t} DROP COLUMN IF EXISTS {a['column']}",),
                t,
                op,
                accept={"ban-drop-column": CONTRACT_DROP} if phase == "contract" else {},
            )
        ]
    if op == "drop_index":
        return [
            Step(
                f"drop_index {a['name']}",
                DROP_INDEX,
                (f"DROP INDEX CONCURRENTLY IF EXISTS {a['name']}",),
                None,
                op,
                {"name": a["name"]},
            )
        ]
    raise AssertionError(op)  # pragma: no cover - _validate_op refuses unknown operations


def compile_phase(m: Migration, phase: str) -> list[Step]:
    """Every step `phase` of `m` runs, in order. A contract starts with the second half of each
    rename_column its expand began (copy stops, old column goes)."""
    out: list[Step] = []
    if phase == "contract":
        for decl in m.steps["expand"]:
            ((op, args),) = decl.items()
            if op == "rename_column":
                out += steps_for(op, args, "contract")
    for i, decl in enumerate(m.steps[phase], 1):
        ((op, args),) = decl.items()
        if op == "sql":
            sql, tx = (args, True) if isinstance(args, str) else (args["sql"], args.get("transaction", True))
            out.append(Step(f"sql step {i}", TX if tx else RAW_NOTX, (sql.strip(),), None, "sql"))
        else:
            out += steps_for(op, args, phase)
    keys = [s.key for s in out]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise _err(f"{m.path.name}: {phase}", f"two operations produce the same step {dupes}")
    return out
