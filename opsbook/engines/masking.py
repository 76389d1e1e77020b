"""Masking: what each column of the service's schema holds, and what a staging copy keeps of it.

The masking file lives next to the migrations (`app/masking.yml`) and decides every column:

    version: 1
    tables:
      course_events:
        event_uuid: {keep: "an event id; names no person"}     # safe, with the reason
        student_uuid: hash                                      # HMAC with the refresh's secret
        data:                                                   # a jsonb object: rules per key
          jsonb: {student_uuid: hash}
          other_keys: "ids of responses, exercises, trials; correctness and times: no person"
      learners:
        full_name: fake_name                                    # Faker, seeded from the value's HMAC
        email: fake_email
        phone: "null"

Rules: `keep` (with a reason), `hash` (pgcrypto `hmac(value, secret, 'sha256')`, SQL-side; a uuid
stays a uuid, other text becomes hex, so the same value hashes the same in every table and inside
jsonb: joins still match, and a new secret per refresh means staging ids cannot be mapped back
from one refresh to the next), `fake_name` / `fake_email` (Faker, seeded deterministically from the
value's HMAC: the same person gets the same fake name everywhere in one refresh), `null`.

- `lint` (no database): every column any migration creates is decided, and the file names no column
  no migration creates (raw `sql:` steps are invisible to this; the database check at apply time is
  the authority for what they made). `migrate.lint` runs it.
- `check_database`: the same against a real database's catalog, before anything is changed.
- `apply`: anonymize a database in place, table by table in batches of adjacent heap blocks, in the
  order of the table's file (each batch its own transaction, so a big table is never one huge
  transaction), with progress; a guard on each row version's xmin masks every row exactly once
  (a new version written ahead of the batches is skipped), the indexes that can be made again from
  their definitions are dropped while their table is masked and built after it, and the schema is
  compared before and after. Triggers and foreign-key checks are off for these updates
  (`session_replication_role = replica`): a hashed key and the key it references change alike, and
  no application trigger rewrites a masked value.
- `verify`: every value of every masked column (and every string inside a masked jsonb column) in
  the source is collected and looked for in the clone's masked columns and in every string leaf of
  its masked jsonb columns; any value found is a leak, reported with where.

The migration engine's own tables (opsbook_migrations, ...) hold migration ids, phases, checksums
and times: they are decided here (ENGINE_TABLES, keep), not in the service's file.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from opsbook.core.errors import OpsbookError
from opsbook.engines.migrations.engine import LEDGER_DDL
from opsbook.engines.migrations.spec import Migration, compile_phase, load_migrations

RULES = ("keep", "hash", "fake_name", "fake_email", "null")
KEY_RULES = ("hash", "fake_name", "fake_email", "null")
MASKING_FILE = "masking.yml"
DEFAULT_BATCH = 10_000
DEFAULT_WORKERS = 2
DEFAULT_MAINTENANCE_WORK_MEM = "256MB"   # per index build (two at a time by default)
ORDERS = ("physical", "key")
UUID_RE = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"


class MaskingError(OpsbookError):
    """The masking file, or a database, is not what masking needs."""


def _engine_tables() -> dict[str, list[str]]:
    """The migration engine's ledger tables and their columns, read from its own DDL."""
    out: dict[str, list[str]] = {}
    for ddl in LEDGER_DDL:
        table = re.search(r"CREATE TABLE IF NOT EXISTS (\w+)", ddl).group(1)
        body = ddl[ddl.index("(") + 1:]
        out[table] = [m.group(1) for m in re.finditer(r"^\s*(\w+)\s+\w", body, re.MULTILINE)
                      if m.group(1).upper() != "PRIMARY"]
    return out


ENGINE_TABLES = _engine_tables()
ENGINE_REASON = "opsbook's migration ledger: migration ids, phases, checksums and times; no person"


# --- the file -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """The decision for one column."""

    rule: str                              # keep, hash, fake_name, fake_email, null, jsonb
    reason: str = ""                       # for keep (and jsonb's other keys)
    keys: dict[str, str] = field(default_factory=dict)   # jsonb: key -> rule

    @property
    def masks(self) -> bool:
        return self.rule != "keep"


@dataclass(frozen=True)
class Masking:
    path: Path
    tables: dict[str, dict[str, Rule]]     # table -> column -> rule

    def masked(self, present: dict[str, dict[str, str]] | None = None) -> dict[str, dict[str, Rule]]:
        """table -> column -> rule of every masked column (only those in `present`, when given)."""
        out = {t: {c: r for c, r in cols.items() if r.masks and (present is None or c in present.get(t, {}))}
               for t, cols in self.tables.items()}
        return {t: cols for t, cols in out.items() if cols}


def _bad(path: Path, where: str, msg: str) -> MaskingError:
    return MaskingError(f"{path.name}: {where}: {msg}. Nothing was masked; fix the file and rerun.")


def _rule(path: Path, where: str, spec: Any) -> Rule:
    if isinstance(spec, str):
        if spec == "keep":
            raise _bad(path, where, 'keep needs its reason: `{keep: "why this names no person"}`')
        if spec not in RULES:
            raise _bad(path, where, f"unknown rule {spec!r}; rules are {', '.join(RULES)} and jsonb")
        return Rule(spec)
    if isinstance(spec, dict) and set(spec) == {"keep"}:
        if not (isinstance(spec["keep"], str) and spec["keep"].strip()):
            raise _bad(path, where, "keep's reason must be a sentence")
        return Rule("keep", spec["keep"].strip())
    if isinstance(spec, dict) and "jsonb" in spec and set(spec) <= {"jsonb", "other_keys"}:
        keys = spec["jsonb"]
        if not (isinstance(keys, dict) and keys and all(isinstance(k, str) and v in KEY_RULES
                                                         for k, v in keys.items())):
            raise _bad(path, where, f"jsonb maps keys to one of {', '.join(KEY_RULES)}")
        reason = spec.get("other_keys")
        if not (isinstance(reason, str) and reason.strip()):
            raise _bad(path, where, "jsonb needs `other_keys`: why the keys it does not mask name no person")
        return Rule("jsonb", reason.strip(), dict(keys))
    raise _bad(path, where, f"expected a rule ({', '.join(RULES)}), {{keep: reason}} or "
                            f"{{jsonb: {{key: rule}}, other_keys: reason}}, got {spec!r}")


def load(path: Path) -> Masking:
    """Read and validate a masking file (its format only; `lint` checks it against the migrations)."""
    path = Path(path)
    if not path.is_file():
        raise MaskingError(f"no masking file at {path}; every column of the service's schema needs a "
                           "decision there (see opsbook/engines/masking.py). Nothing was masked.")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise _bad(path, "YAML", str(e)) from e
    if not (isinstance(doc, dict) and doc.get("version") == 1 and isinstance(doc.get("tables"), dict)):
        raise _bad(path, "top level", "expected `version: 1` and `tables: {table: {column: rule}}`")
    tables: dict[str, dict[str, Rule]] = {}
    for table, cols in doc["tables"].items():
        if not isinstance(cols, dict) or not cols:
            raise _bad(path, str(table), "expected a mapping of its columns to rules")
        tables[str(table)] = {str(c): _rule(path, f"{table}.{c}", spec) for c, spec in cols.items()}
    return Masking(path, tables)


# --- the schema the migrations make ---------------------------------------------------------
@dataclass
class DeclaredSchema:
    """Every column the migrations create, and what the file cannot see (raw SQL)."""

    columns: dict[str, dict[str, str]] = field(default_factory=dict)   # table -> column -> where from
    dropped: dict[str, str] = field(default_factory=dict)              # "t.c" -> by which migration
    raw_sql: list[str] = field(default_factory=list)                   # raw steps' SQL


def _bare(table: str) -> str:
    return table.rsplit(".", 1)[-1]


def declared_schema(migrations: list[Migration]) -> DeclaredSchema:
    """The columns that exist at some point while the migrations are applied in order (a column a
    contract drops still exists until that contract runs, so it still needs a decision)."""
    s = DeclaredSchema()
    for m in migrations:
        for phase in ("expand", "contract"):
            for decl in m.steps[phase]:
                ((op, a),) = decl.items()
                if op == "create_table":
                    for c in a["columns"]:
                        s.columns.setdefault(_bare(a["table"]), {})[c] = m.id
                elif op == "add_column":
                    s.columns.setdefault(_bare(a["table"]), {})[a["column"]] = m.id
                elif op == "rename_column":
                    s.columns.setdefault(_bare(a["table"]), {})[a["to"]] = m.id
                    s.dropped[f"{_bare(a['table'])}.{a['column']}"] = f"{m.id}'s contract"
                elif op == "drop_column":
                    s.dropped[f"{_bare(a['table'])}.{a['column']}"] = f"{m.id}'s {phase}"
        s.raw_sql += [sql for p in ("expand", "contract") for st in compile_phase(m, p) if st.op == "sql"
                      for sql in st.sql]
    return s


def _seen_in_raw(raw: list[str], table: str, column: str) -> bool:
    return any(re.search(rf"\b{re.escape(table)}\b", q, re.I) and re.search(rf"\b{re.escape(column)}\b", q, re.I)
               for q in raw)


def lint(migrations_dir: Path, masking_path: Path | None = None) -> list[str]:
    """Refuse (MaskingError, with the lists) a masking file that leaves a column the migrations
    create undecided, or names one they never create. Returns notes for the operator."""
    masking = load(masking_path or Path(migrations_dir).parent / MASKING_FILE)
    schema = declared_schema(load_migrations(Path(migrations_dir)))
    undecided = [f"{t}.{c} (created by {src})" for t, cols in schema.columns.items() for c, src in cols.items()
                 if c not in masking.tables.get(t, {})]
    unknown = [f"{t}.{c}" for t, cols in masking.tables.items() for c in cols
               if c not in schema.columns.get(t, {}) and not _seen_in_raw(schema.raw_sql, t, c)]
    problems = []
    if undecided:
        problems.append("columns with no decision (mask them or declare them safe with {keep: reason}): "
                        + ", ".join(undecided))
    if unknown:
        problems.append("columns no migration creates (misspelt, or from a table that is gone): "
                        + ", ".join(unknown))
    if problems:
        raise MaskingError(f"{masking.path.name} does not match the migrations in {Path(migrations_dir).name}/:\n  "
                           + "\n  ".join(problems) + "\nNothing was run. Decide every column in "
                           f"{masking.path.name} (a new column containing personal data must be masked).")
    notes = [f"{masking.path.name}: {sum(len(c) for c in schema.columns.values())} column(s) decided, "
             f"{sum(len(c) for c in masking.masked().values())} masked"]
    notes += [f"{k} is dropped by {v}; its decision stays until every database is past it"
              for k, v in schema.dropped.items() if k.split(".")[0] in masking.tables]
    if schema.raw_sql:
        notes.append(f"{len(schema.raw_sql)} raw sql step(s): columns they create are checked against the "
                     "database when masking runs, not here")
    return notes


# --- against a database ---------------------------------------------------------------------
def database_columns(conn: Any) -> dict[str, dict[str, str]]:
    """table -> column -> type of every user table in schema public."""
    out: dict[str, dict[str, str]] = {}
    for t, c, typ in conn.execute(
        "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
        "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped "
        "ORDER BY c.relname, a.attnum"
    ).fetchall():
        out.setdefault(t, {})[c] = typ
    return out


def check_database(conn: Any, masking: Masking) -> dict[str, dict[str, str]]:
    """Refuse a database with a column the file does not decide, or without a table the file masks
    (the wrong database). Returns its columns. A column the file decides but the database lacks (a
    contract dropped it, or a migration has not added it yet) is fine: there is nothing to mask."""
    cols = database_columns(conn)
    undecided = [f"{t}.{c}" for t, cs in cols.items() for c in cs
                 if c not in masking.tables.get(t, {}) and c not in ENGINE_TABLES.get(t, [])]
    missing = [t for t in masking.masked() if t not in cols]
    problems = []
    if undecided:
        problems.append("columns in the database with no decision in the masking file: " + ", ".join(undecided))
    if missing:
        problems.append("tables with masked columns the database does not have (is it the service's "
                        "database?): " + ", ".join(missing))
    if problems:
        raise MaskingError("refusing to mask: " + "; ".join(problems) + ". Nothing was changed. Decide every "
                           f"column in {masking.path.name}, or point at the right database.")
    return cols


TEXT_TYPE_RE = re.compile(r"^(text|citext|character varying|character)(\((\d+)\))?$")


def _hmac_hex_sql(value: str) -> str:
    """SQL for the hex HMAC-SHA256 of `value` (text) with the refresh's secret (%(secret)s): what
    `hash` stores and what seeds a fake value, so a value maps alike everywhere."""
    return f"encode(hmac(convert_to({value}, 'UTF8'), %(secret)s::bytea, 'sha256'), 'hex')"


def _hash_sql(value: str, out_type: str) -> str:
    """SQL for the HMAC of `value` (text) with the secret (%(secret)s) as `out_type`: a uuid for a
    uuid, hex (cut to the column's length, if it has one) for text."""
    hexed = _hmac_hex_sql(value)
    if out_type == "uuid":
        return f"left({hexed}, 32)::uuid"
    m = TEXT_TYPE_RE.match(out_type)
    return f"left({hexed}, {m.group(3)})" if m and m.group(3) else hexed


def refuse_unhashable(masking: Masking, cols: dict[str, dict[str, str]]) -> None:
    """`hash` keeps a column's type: it works for uuid and text columns, not for others."""
    bad = [f"{t}.{c} ({cols[t][c]})" for t, rules in masking.masked().items() for c, r in rules.items()
           if r.rule in ("hash", "fake_name", "fake_email") and c in cols.get(t, {})
           and not (cols[t][c] == "uuid" and r.rule == "hash") and not TEXT_TYPE_RE.match(cols[t][c])]
    jsonb = [f"{t}.{c} ({cols[t][c]})" for t, rules in masking.masked().items() for c, r in rules.items()
             if r.rule == "jsonb" and c in cols.get(t, {}) and cols[t][c] != "jsonb"]
    if bad or jsonb:
        raise MaskingError("refusing to mask: " + "; ".join(
            ([f"hash and fake rules need a uuid or text column, these are not: {', '.join(bad)}"] if bad else [])
            + ([f"jsonb rules need a jsonb column: {', '.join(jsonb)}"] if jsonb else []))
            + ". Nothing was changed. Use `null` for such a column, or change its rule.")


def _key_hash_sql(value: str) -> str:
    """A jsonb string value hashed: a uuid stays uuid-shaped, anything else becomes hex."""
    hexed = _hmac_hex_sql(value)
    return f"(CASE WHEN {value} ~ '{UUID_RE}' THEN left({hexed}, 32)::uuid::text ELSE {hexed} END)"


def _jsonb_key_sql(col: str, key: str, rule: str) -> str:
    """The new value of key `key` of jsonb column `col` (SQL-side rules only)."""
    k = key.replace("'", "''")
    v = f"{col}->'{k}'"
    if rule == "null":
        new = "'null'::jsonb"
    else:  # hash: a string, or an array of strings (e.g. a roster's students)
        text_value = f"({col}->>'{k}')"
        element = "(e #>> '{}')"
        new = (f"CASE jsonb_typeof({v}) WHEN 'string' THEN to_jsonb({_key_hash_sql(text_value)}) "
               f"WHEN 'array' THEN (SELECT coalesce(jsonb_agg(CASE jsonb_typeof(e) WHEN 'string' THEN "
               f"to_jsonb({_key_hash_sql(element)}) ELSE e END), '[]'::jsonb) "
               f"FROM jsonb_array_elements({v}) AS e) ELSE {v} END")
    return new


def _jsonb_sql(col: str, keys: dict[str, str]) -> str:
    """`col` with each of `keys` that it has replaced by its masked value. Every masked value is
    computed once per row (a chain of jsonb_set under CASE computed the first key's HMAC again
    for each later key)."""
    whens = " ".join(f"WHEN '{k.replace(chr(39), chr(39) * 2)}' THEN {_jsonb_key_sql(col, k, r)}"
                     for k, r in keys.items())
    names = ", ".join("'" + k.replace("'", "''") + "'" for k in keys)
    return (f"CASE WHEN jsonb_typeof({col}) = 'object' THEN {col} || coalesce((SELECT jsonb_object_agg("
            f"opsbook_k, CASE opsbook_k {whens} END) FROM jsonb_object_keys({col}) AS opsbook_k "
            f"WHERE opsbook_k IN ({names})), '{{}}'::jsonb) ELSE {col} END")


@dataclass
class ApplyResult:
    tables: dict[str, int] = field(default_factory=dict)     # table -> rows rewritten
    batches: int = 0
    seconds: float = 0.0

    @property
    def rows_per_s(self) -> float:
        return sum(self.tables.values()) / self.seconds if self.seconds else 0.0


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _primary_key(conn: Any, table: str) -> list[tuple[str, str]]:
    return conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_index i, "
        "unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord), pg_attribute a "
        "WHERE i.indrelid = to_regclass(%s) AND i.indisprimary AND a.attrelid = i.indrelid "
        "AND a.attnum = k.attnum ORDER BY k.ord", (f"public.{_ident(table)}",)).fetchall()


def _fake(kind: str, digest: str) -> str:
    """A fake name or e-mail, the same for the same digest (Faker seeded from it). E-mails carry part
    of the digest so two people never share one (a unique column stays unique)."""
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(int(digest[:16], 16))
    if kind == "fake_name":
        return fake.name()
    return f"{fake.user_name()}.{digest[:8]}@example.org"


def apply(
    conninfo: str, masking: Masking, secret: bytes, *, batch_size: int = DEFAULT_BATCH,
    workers: int = DEFAULT_WORKERS, progress: Callable[[str], None] | None = None, order: str = "physical",
    rebuild_indexes: bool = True, maintenance_work_mem: str = DEFAULT_MAINTENANCE_WORK_MEM,
    progress_every: float = 0.0,
) -> ApplyResult:
    """Anonymize the database at `conninfo` in place (a clone: never the source, and nobody else
    writing to it). Refuses before any change when the database has a column the file does not
    decide. Each batch commits on its own; a run that stops half-way leaves earlier batches masked
    and the rest not: rerun on a fresh clone (masking a masked value again would hash the hash).
    `workers` connections mask a table at once.

    `progress` gets every line; a table's `n/total rows masked` count (one per batch: thousands) at
    most once every `progress_every` seconds, and its last one always.

    `order` is how a table is walked: "physical" (the default: block ranges of the heap in file
    order, each row version older than this run masked once, see `_mask_blocks`) or "key" (keyset
    batches of the primary key, the method before it; kept for partitioned tables, whose heap is
    their partitions', and for `bench/clone_bench.py` to compare against). In physical order, with
    `rebuild_indexes`, a table's indexes that can be made again from their definitions alone are
    dropped while it is masked and built again after it (`maintenance_work_mem` per build; see
    `_droppable_indexes`). The schema is compared before and after: a clone whose schema is not its
    source's any more (an index not made again, the extension masking needed left behind) is refused
    with the differences."""
    from opsbook.engines.interrupts import interruptible

    if len(secret) < 16:
        raise MaskingError("the masking secret must be at least 16 random bytes (one per refresh); nothing "
                           "was changed")
    if order not in ORDERS:
        raise MaskingError(f"unknown masking order {order!r} (one of {', '.join(ORDERS)}); nothing was changed")
    # SIGTERM and SIGHUP end apply like Ctrl-C: every worker after the batch it is in
    with interruptible():
        return _apply(conninfo, masking, secret, batch_size=batch_size, workers=workers,
                      say=progress or (lambda _m: None), order=order, rebuild_indexes=rebuild_indexes,
                      maintenance_work_mem=maintenance_work_mem, progress_every=progress_every)


# A database setting (not part of its schema) that says masking started on it and has not finished:
# set before the first change, reset once every table is masked and the schema compared.
STARTED_MARK = "opsbook.masking_started"


def _refuse_half_masked(conn: Any) -> None:
    """A database an earlier run began to mask and did not finish is refused: its masked rows would
    be masked again (a hash of a hash), and it may lack the indexes that run dropped."""
    mark = conn.execute(
        "SELECT split_part(c, '=', 2) FROM pg_db_role_setting s, unnest(s.setconfig) AS c "
        "WHERE s.setrole = 0 AND s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND c LIKE %s", (STARTED_MARK + "=%",)).fetchone()
    if mark:
        raise MaskingError(f"refusing to mask: an earlier masking of this database began ({mark[0]}) and did not "
                           "finish, so part of it is masked already and masking it again would hash hashes. "
                           "Nothing was changed. Discard it and mask a fresh clone.")


def _apply(conninfo: str, masking: Masking, secret: bytes, *, batch_size: int, workers: int,
           say: Callable[[str], None], order: str, rebuild_indexes: bool, maintenance_work_mem: str,
           progress_every: float) -> ApplyResult:
    import psycopg
    import psycopg.sql

    from opsbook.engines.snapshots.manifest import schema_objects

    result = ApplyResult()
    started = time.monotonic()
    with psycopg.connect(conninfo, autocommit=True, application_name="opsbook-masking") as conn:
        cols = check_database(conn, masking)
        refuse_unhashable(masking, cols)
        _refuse_half_masked(conn)
        schema_before = schema_objects(conn)
        # Every row version older than this xid is the source's; every newer one this run wrote (the
        # clone has no other writer): the guard that no row is masked twice (`_mask_blocks`).
        since = int(conn.execute("SELECT pg_current_xact_id()::text").fetchone()[0])
        database = _ident(conn.execute("SELECT current_database()").fetchone()[0])
        mark = f"xid {since} at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
        conn.execute(f"ALTER DATABASE {database} SET {STARTED_MARK} = {psycopg.sql.Literal(mark).as_string(conn)}")
        created = conn.execute("SELECT NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pgcrypto')"
                               ).fetchone()[0]
        conn.execute("CREATE EXTENSION IF NOT EXISTS pgcrypto")
        conn.execute("SET session_replication_role = replica")
        try:
            for table, rules in masking.masked(cols).items():
                result.tables[table] = _apply_table(
                    conninfo, conn, table, rules, cols[table], secret, batch_size, workers, say, result, order=order,
                    since=since, rebuild_indexes=rebuild_indexes, maintenance_work_mem=maintenance_work_mem,
                    progress_every=progress_every)
        finally:
            conn.execute("RESET session_replication_role")
            if created:  # leave the schema as it was: a clone's schema hash must match its source's
                conn.execute("DROP EXTENSION pgcrypto")
        schema_after = schema_objects(conn)
        if schema_after != schema_before:
            changed = sorted(k for k in schema_before.keys() | schema_after.keys()
                             if schema_before.get(k) != schema_after.get(k))
            raise MaskingError("masking left the clone's schema different from what it was: " + ", ".join(changed)
                               + ". The clone is masked but is not a copy of its source's schema; discard it.")
        conn.execute(f"ALTER DATABASE {database} RESET {STARTED_MARK}")   # masked, whole
    result.seconds = time.monotonic() - started
    say(f"masked {sum(result.tables.values()):,} row(s) in {len(result.tables)} table(s), {result.batches} "
        f"batch(es), {result.seconds:.1f} s ({result.rows_per_s:,.0f} rows/s)")
    return result


def _assignments(table: str, rules: dict[str, Rule], types: dict[str, str]) -> tuple[list[str], list[str]]:
    """The SQL-side SET clauses of one table's masked columns, and its columns faked in Python."""
    sets: list[str] = []
    fakes: list[str] = []
    for col, r in rules.items():
        c = _ident(col)
        if r.rule == "null":
            sets.append(f"{c} = NULL")
        elif r.rule == "hash":
            sets.append(f"{c} = {_hash_sql(f'{c}::text', types[col])}::{types[col]}")
        elif r.rule in ("fake_name", "fake_email"):
            fakes.append(col)
        else:  # jsonb
            for k, kr in r.keys.items():
                if kr in ("fake_name", "fake_email"):
                    raise MaskingError(f"{table}.{col}: fake values inside jsonb are not supported; use hash or "
                                       f"null for key {k!r}. Nothing of this table was changed.")
            expr = _jsonb_sql(c, r.keys)
            sets.append(f"{c} = {expr}")
    return sets, fakes


@dataclass
class _TableJob:
    """What every worker masking one table shares."""

    table: str
    pk: list[tuple[str, str]]
    sets: list[str]
    fakes: list[str]
    rules: dict[str, Rule]
    secret: bytes
    batch_size: int
    total: int
    say: Callable[[str], None]
    result: ApplyResult
    since: int = 0                       # pg_current_xact_id() when apply started (see _mask_blocks)
    blocks: int = 0                      # the heap's blocks when the table's masking started
    step: int = 1                        # blocks per batch
    next_block: int = 0                  # the next batch's first block (taken under `lock`)
    progress_every: float = 0.0          # seconds between two count lines (a table's last always said)
    said_at: float = float("-inf")       # when the last count line was said
    lock: Any = field(default_factory=threading.Lock)
    done: int = 0
    stop: threading.Event = field(default_factory=threading.Event)   # set: each worker ends after its batch

    def take(self) -> tuple[int, int] | None:
        """The next batch's block range [a, b), or None when the table is done."""
        with self.lock:
            a = self.next_block
            if a >= self.blocks:
                return None
            self.next_block = min(a + self.step, self.blocks)
            return a, self.next_block

    def masked(self, n: int) -> None:
        """A batch of `n` rows is masked: counted, and said unless one was said less than
        `progress_every` seconds ago (the table's last count is always said)."""
        with self.lock:
            self.done += n
            self.result.batches += 1
            now = time.monotonic()
            if self.done >= self.total or now - self.said_at >= self.progress_every:
                self.said_at = now
                self.say(f"{self.table}: {self.done:,}/{self.total:,} rows masked")


def _apply_table(  # noqa: PLR0917 - one table's share of apply
    conninfo: str, conn: Any, table: str, rules: dict[str, Rule], types: dict[str, str], secret: bytes,
    batch_size: int, workers: int, say: Callable[[str], None], result: ApplyResult, *, order: str, since: int,
    rebuild_indexes: bool, maintenance_work_mem: str, progress_every: float = 0.0,
) -> int:
    """Mask one table with `workers` connections (threads: psycopg releases the GIL while Postgres
    works): in physical order, each worker takes the next block range in turn; in key order, the
    primary-key space is cut into `workers` ranges, each masked in keyset batches."""
    from opsbook.engines.snapshots.manifest import chunk_boundaries

    relkind = conn.execute("SELECT relkind FROM pg_class WHERE oid = to_regclass(%s)",
                           (f"public.{_ident(table)}",)).fetchone()[0]
    physical = order == "physical" and relkind == "r"
    pk = _primary_key(conn, table)
    if not pk and not physical:
        raise MaskingError(f"{table} has masked columns but no primary key, so it cannot be masked in batches; "
                           "earlier tables are masked, this one is not. Give it a primary key.")
    total = conn.execute(f"SELECT count(*) FROM {_ident(table)}").fetchone()[0]
    sets, fakes = _assignments(table, rules, types)
    job = _TableJob(table, pk, sets, fakes, rules, secret, batch_size, total, say, result, since=since,
                    progress_every=progress_every)
    dropped: list[_Index] = []
    if physical:
        # Blocks now: every row version older than `since` is in them (later blocks can only hold versions
        # this run writes). A batch is about `batch_size` rows' worth of blocks, at this table's density.
        job.blocks = conn.execute("SELECT pg_relation_size(to_regclass(%s)) / current_setting('block_size')::int",
                                  (f"public.{_ident(table)}",)).fetchone()[0]
        job.step = max(1, round(batch_size * job.blocks / total)) if total else max(job.blocks, 1)
        ranges: list[Any] = [None] * max(1, min(workers, -(-job.blocks // job.step)))
        if rebuild_indexes and total:
            dropped = _droppable_indexes(conn, table)
        if dropped:
            with conn.transaction():
                for index in dropped:
                    conn.execute(index.drop)
            say(f"{table}: {len(dropped)} index(es) dropped while it is masked, built again after it: "
                f"{', '.join(i.name for i in dropped)}")
    else:
        bounds: list[Any] = []
        if workers > 1 and total > 2 * batch_size:
            bounds = chunk_boundaries(conn, f"public.{table}", [c for c, _ in pk], -(-total // workers))
        ranges = list(zip([None, *bounds], [*bounds, None], strict=True))

    def work(bounds: tuple[Any, Any] | None) -> None:
        import psycopg

        with psycopg.connect(conninfo, autocommit=True, application_name="opsbook-masking") as c:
            c.execute("SET session_replication_role = replica")
            if physical:
                while not job.stop.is_set() and (blocks := job.take()) is not None:
                    job.masked(_mask_blocks(c, job, *blocks))
            else:
                _mask_range(c, job, *bounds)

    # The first worker's error (in order) is raised; on it, or on an interrupt (Ctrl-C, SIGTERM), every
    # other worker ends after the batch it is in (each batch commits on its own), instead of running its
    # whole range while the operator waits.
    with ThreadPoolExecutor(max_workers=len(ranges)) as pool:
        try:
            list(pool.map(work, ranges))
        except BaseException:
            job.stop.set()
            raise
    if physical and job.done != total:
        raise MaskingError(f"{table}: {job.done:,} row(s) masked, but it held {total:,}: something else wrote to "
                           "the clone while it was masked. It is not usable; discard it and refresh again.")
    if physical and dropped:
        started = time.monotonic()
        _build_indexes(conninfo, dropped, workers, maintenance_work_mem)
        say(f"{table}: {len(dropped)} index(es) built again in {time.monotonic() - started:.1f} s")
    return job.done


# --- indexes while a table is masked --------------------------------------------------------
# Why they are dropped and built again (measured on a 1 GB btrfs clone, 1.83M course_events, see README):
# every masked row gets a new version, and since a masked column (student_uuid) is indexed no update
# is HOT, so each row adds an entry to every index of the table: three random-uuid-ordered B-trees
# whose pages are dirtied at random. In physical order with the indexes kept, 13,000 rows/s (22,000
# with 1 GB of shared_buffers); with them dropped, 37,000 rows/s, and building the three again from
# the masked table took 12 s (a sort each, compact indexes): 36,000 rows/s in all.
@dataclass(frozen=True)
class _Index:
    name: str
    drop: str            # SQL that drops it (the index, or the constraint it backs)
    create: str          # SQL that makes it again exactly as it was


def _droppable_indexes(conn: Any, table: str) -> list[_Index]:
    """The indexes of `table` that can be dropped while it is masked and made again from their own
    definitions alone. Kept (maintained row by row) is any index something else depends on (a foreign
    key, a view relying on a primary key), a partition's index, an index that is invalid, clustered,
    the replica identity, in its own tablespace, commented, or with its own statistics target, an
    exclusion constraint's, and one whose name is not its constraint's: what its definition does not
    say would be lost."""
    rows = conn.execute(
        """
        SELECT ic.relname, pg_get_indexdef(i.indexrelid), con.conname, pg_get_constraintdef(con.oid)
        FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
        LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid
                                       AND con.contype IN ('p', 'u', 'x')
        WHERE i.indrelid = to_regclass(%s)
          AND i.indisvalid AND i.indisready AND i.indislive AND NOT i.indisclustered AND NOT i.indisreplident
          AND ic.reltablespace = 0 AND obj_description(i.indexrelid, 'pg_class') IS NULL
          AND (con.oid IS NULL OR (con.contype IN ('p', 'u') AND con.conname = ic.relname
                                   AND obj_description(con.oid, 'pg_constraint') IS NULL
                                   AND NOT EXISTS (SELECT 1 FROM pg_depend d
                                                   WHERE d.refclassid = 'pg_constraint'::regclass
                                                   AND d.refobjid = con.oid AND d.objid <> i.indexrelid)))
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.refclassid = 'pg_class'::regclass
                          AND d.refobjid = i.indexrelid)
          AND NOT EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = i.indexrelid OR h.inhparent = i.indexrelid)
          AND NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = i.indexrelid AND a.attstattarget >= 0)
        ORDER BY ic.relname
        """, (f"public.{_ident(table)}",)).fetchall()
    out = []
    for index, indexdef, constraint, constraintdef in rows:
        if constraint:
            out.append(_Index(index, f"ALTER TABLE {_ident(table)} DROP CONSTRAINT {_ident(constraint)}",
                              f"ALTER TABLE {_ident(table)} ADD CONSTRAINT {_ident(constraint)} {constraintdef}"))
        else:
            out.append(_Index(index, f"DROP INDEX public.{_ident(index)}", indexdef))
    return out


def _build_indexes(conninfo: str, indexes: list[_Index], workers: int, maintenance_work_mem: str) -> None:
    """Make `indexes` again, `workers` at a time; an interrupt (or one build's error) cancels the
    builds in flight at once (a build is one statement: there is no batch to finish)."""
    import psycopg

    running: list[Any] = []
    lock = threading.Lock()

    def build(index: _Index) -> None:
        with psycopg.connect(conninfo, autocommit=True, application_name="opsbook-masking") as c:
            with lock:
                running.append(c)
            try:
                c.execute("SELECT set_config('maintenance_work_mem', %s, false)", (maintenance_work_mem,))
                c.execute(index.create)
            finally:
                with lock:
                    running.remove(c)

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(indexes)))) as pool:
        try:
            list(pool.map(build, indexes))
        except BaseException:
            with lock:
                for c in running:
                    c.cancel_safe()
            raise


# Why physical order, and what else was tried (each on a btrfs clone of 1 GB of course_events, 1.83M
# rows, the clone host a loop-mounted btrfs image as bench/clone_bench.py makes it; this 2-core machine
# was busy with another session's test suite, so figures within ~30 % of each other are noise):
# - key order (the method before): every batch of a table keyed by random uuids touched ~10,000 random
#   heap pages and dirtied each; written back at random through btrfs (copy-on-write, checksummed) on a
#   loop device, 2,854 rows/s (ext4: 21,000-30,000);
# - physical order, indexes kept: 13,300 rows/s; with shared_buffers 1 GB (a restart of the clone)
#   21,900, the random pages left being the indexes'; max_wal_size 8 GB and checkpoint_timeout 1 h on
#   top: 21,300 (no gain, 1.1 GB more of the clone's own space);
# - physical order, indexes dropped and built again (below): 29,600-39,200 rows/s in all with batches of
#   2,000, 10,000 or 50,000 rows and with 1 or 2 workers (no difference out of the noise: 10,000 keeps
#   transactions short and progress frequent);
# - btrfs `nodatacow` (chattr +C) would not help: every block of a fresh clone is shared with the
#   standby's snapshot, and btrfs copies a shared block on its first write whatever the flag; it would
#   also turn off data checksums. The mount is `noatime` with btrfs' defaults.
_XID_WRAP = 1 << 32


def _not_ours() -> str:
    """SQL: row version t was not written by this run. A version is ours when its xmin lies in
    [since, the statement's snapshot xmax) modulo 2^32: xmin is a 32-bit xid, `since` a 64-bit one.
    Compared in that window rather than by age(xmin) > age(since): a frozen tuple keeps its raw xmin,
    which after 2^31 more transactions reads as a future xid and age() would call it newer than
    `since`; here it would have to fall inside the few xids this run used. Old-style frozen (2) and
    bootstrap (1) xmins are never ours. The snapshot's xmax is taken inside the UPDATE itself, so a
    version another worker committed just before the statement began counts as ours too."""
    return (f"NOT (t.xmin::text::bigint >= 3 AND (t.xmin::text::bigint - %(since32)s + {_XID_WRAP}) %% {_XID_WRAP} "
            "< (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint) - %(since)s)")


def _mask_blocks(conn: Any, job: _TableJob, a: int, b: int) -> int:
    """Mask the rows in heap blocks [a, b) (a TID range scan, PostgreSQL 14+) in one transaction;
    returns how many. An UPDATE writes each new row version wherever there is room: in the same
    block, in a block a later batch will read (the free space map), or in a new block at the end.
    The guard `_not_ours` skips every version this run wrote, so a version that landed ahead is not
    masked again (hash of a hash), and a batch run twice (a retry after a lost commit) masks nothing
    the second time."""
    rng = "t.ctid >= %(lo)s::tid AND t.ctid < %(hi)s::tid"
    params: dict[str, Any] = {"secret": job.secret, "lo": f"({a},0)", "hi": f"({b},0)",
                              "since": job.since, "since32": job.since % _XID_WRAP}
    where = f"{rng} AND {_not_ours()}"
    table = _ident(job.table)
    with conn.transaction():
        if not job.fakes:
            return conn.execute(f"UPDATE {table} AS t SET {', '.join(job.sets)} WHERE {where}", params).rowcount
        digests = ", ".join(_hmac_hex_sql(f"t.{_ident(f)}::text") for f in job.fakes)
        found = conn.execute(f"SELECT t.ctid::text, {digests} FROM {table} AS t WHERE {where}", params).fetchall()
        if not found:
            return 0
        assign = list(job.sets)
        params["c"] = [row[0] for row in found]
        for j, f in enumerate(job.fakes):
            params[f"f{j}"] = [None if row[1 + j] is None else _fake(job.rules[f].rule, row[1 + j]) for row in found]
            assign.append(f"{_ident(f)} = CASE WHEN t.{_ident(f)} IS NULL THEN NULL ELSE b.opsbook_f{j} END")
        unnest = ", ".join(["%(c)s::tid[]"] + [f"%(f{j})s::text[]" for j in range(len(job.fakes))])
        names = ", ".join(["opsbook_ctid"] + [f"opsbook_f{j}" for j in range(len(job.fakes))])
        # the rows found above, by their ctid: nobody else writes to them while this transaction runs
        return conn.execute(f"UPDATE {table} AS t SET {', '.join(assign)} FROM unnest({unnest}) AS b({names}) "
                            f"WHERE t.ctid = b.opsbook_ctid AND {where}", params).rowcount


def _mask_range(conn: Any, job: _TableJob, lo: Any, hi: Any) -> None:
    """Keyset batches over keys in [lo, hi) (None: unbounded), each batch its own transaction."""
    pk = job.pk
    n_pk = len(pk)
    pk_cols = [_ident(c) for c, _ in pk]
    key = "ROW(" + ", ".join(pk_cols) + ")"

    def value(prefix: str) -> str:
        return "ROW(" + ", ".join(f"%({prefix}{i})s::{t}" for i, (_, t) in enumerate(pk)) + ")"

    digests = "".join(", " + _hmac_hex_sql(f"t.{_ident(f)}::text") for f in job.fakes)
    last = None
    while not job.stop.is_set():
        params: dict[str, Any] = {"secret": job.secret, "n": job.batch_size}
        where = []
        if last is not None:
            where.append(f"{key} > {value('k')}")
            params.update({f"k{i}": v for i, v in enumerate(last)})
        elif lo is not None:
            where.append(f"{key} >= {value('lo')}")
            params.update({f"lo{i}": v for i, v in enumerate(lo)})
        if hi is not None:
            where.append(f"{key} < {value('hi')}")
            params.update({f"hi{i}": v for i, v in enumerate(hi)})
        cond = ("WHERE " + " AND ".join(where)) if where else ""
        with conn.transaction():
            keys = conn.execute(
                f"SELECT {', '.join(pk_cols)}{digests} FROM {_ident(job.table)} AS t {cond} "
                f"ORDER BY {', '.join(pk_cols)} LIMIT %(n)s", params).fetchall()
            if not keys:
                return
            assign = list(job.sets)
            arrays: dict[str, Any] = {"secret": job.secret}
            for j, f in enumerate(job.fakes):
                arrays[f"f{j}"] = [None if row[n_pk + j] is None else _fake(job.rules[f].rule, row[n_pk + j])
                                   for row in keys]
                assign.append(f"{_ident(f)} = CASE WHEN t.{_ident(f)} IS NULL THEN NULL ELSE b.opsbook_f{j} END")
            for i in range(n_pk):
                arrays[f"p{i}"] = [row[i] for row in keys]
            unnest = ", ".join([f"%(p{i})s::{t}[]" for i, (_, t) in enumerate(pk)]
                               + [f"%(f{j})s::text[]" for j in range(len(job.fakes))])
            names = ", ".join([f"opsbook_p{i}" for i in range(n_pk)]
                              + [f"opsbook_f{j}" for j in range(len(job.fakes))])
            match = " AND ".join(f"t.{c} = b.opsbook_p{i}" for i, c in enumerate(pk_cols))
            conn.execute(f"UPDATE {_ident(job.table)} AS t SET {', '.join(assign)} "
                         f"FROM unnest({unnest}) AS b({names}) WHERE {match}", arrays)
        last = keys[-1][:n_pk]
        job.masked(len(keys))


# --- verify ---------------------------------------------------------------------------------
@dataclass
class Leak:
    where: str          # table.column or table.column (jsonb)
    count: int          # clone values equal to a source value of a masked column
    examples: list[str]

    def __str__(self) -> str:
        return f"{self.where}: {self.count} value(s) from the source's masked columns, e.g. {', '.join(self.examples)}"


def _masked_value_queries(table: str, rules: dict[str, Rule]) -> list[tuple[str, str]]:
    """(where, SQL returning text values) for every masked column, and every string leaf of a masked
    jsonb column (a value hidden under another key, or nested, is found too)."""
    out = []
    for col, r in rules.items():
        c, t = _ident(col), _ident(table)
        if r.rule == "jsonb":
            out.append((f"{table}.{col} (jsonb strings)",
                        f"SELECT v #>> '{{}}' FROM {t}, "
                        f"jsonb_path_query({c}, 'strict $.** ? (@.type() == \"string\")') AS v"))
        else:
            out.append((f"{table}.{col}", f"SELECT {c}::text FROM {t} WHERE {c} IS NOT NULL"))
    return out


def verify(source: str, clone: str, masking: Masking, *, examples: int = 3,
           progress: Callable[[str], None] | None = None) -> list[Leak]:
    """Every place in `clone` where a value of a masked column of `source` still appears ([] when
    none). The source's values are copied into a temporary table of the clone's session (nothing is
    written to either database) and joined against each masked place."""
    import psycopg

    say = progress or (lambda _m: None)
    leaks = []
    with psycopg.connect(source, autocommit=True) as src, psycopg.connect(clone, autocommit=True) as dst:
        src_cols = check_database(src, masking)
        dst_cols = check_database(dst, masking)
        dst.execute("CREATE TEMPORARY TABLE opsbook_source_values (v text)")
        for table, rules in masking.masked(src_cols).items():
            # only the masked keys' values of jsonb columns are personal in the source
            for col, r in rules.items():
                c, t = _ident(col), _ident(table)
                if r.rule == "jsonb":
                    queries = [f"SELECT {c}->>'{k.replace(chr(39), chr(39) * 2)}' FROM {t} WHERE {c} ? "
                               f"'{k.replace(chr(39), chr(39) * 2)}' AND jsonb_typeof({c}->'{k}') = 'string'"
                               for k in r.keys]
                    queries += [f"SELECT e FROM {t}, jsonb_array_elements_text(CASE jsonb_typeof({c}->'{k}') "
                                f"WHEN 'array' THEN {c}->'{k}' END) AS e" for k in r.keys]
                else:
                    queries = [f"SELECT {c}::text FROM {t} WHERE {c} IS NOT NULL"]
                for q in queries:
                    with src.cursor().copy(f"COPY ({q}) TO STDOUT") as out, \
                            dst.cursor().copy("COPY opsbook_source_values (v) FROM STDIN") as into:
                        for data in out:
                            into.write(data)
        n = dst.execute("SELECT count(*) FROM opsbook_source_values").fetchone()[0]
        dst.execute("DELETE FROM opsbook_source_values WHERE v IS NULL OR v = ''")
        dst.execute("CREATE INDEX ON opsbook_source_values (v)")
        dst.execute("ANALYZE opsbook_source_values")
        say(f"{n:,} source value(s) of masked columns collected")
        for table, rules in masking.masked(dst_cols).items():
            for where, q in _masked_value_queries(table, rules):
                found = dst.execute(
                    f"SELECT count(*), (array_agg(DISTINCT x.v))[1:%s] FROM ({q}) AS x(v) "
                    "WHERE EXISTS (SELECT 1 FROM opsbook_source_values s WHERE s.v = x.v)", (examples,)
                ).fetchone()
                if found[0]:
                    leaks.append(Leak(where, found[0], list(found[1])))
                say(f"{where}: {found[0]} leak(s)")
    return leaks
