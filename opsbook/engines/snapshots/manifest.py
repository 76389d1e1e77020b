"""A manifest of what a database holds, taken from one consistent snapshot, and `compare`.

A manifest is plain JSON-able data (`VERSION`):

- `tables`: per table, the exact row count and row checksums in chunks of `chunk_rows` rows by
  primary-key range (so a large table never needs one huge query, and a difference is located:
  "rows with event_uuid from (a) up to (b) excluded differ");
- `sequences`: last value of every sequence;
- `schema`: a hash of the catalog and the objects it was made from (columns with their types,
  defaults and order, constraints, indexes, triggers, views, functions, sequences' definitions,
  extensions, enum types), each rendered by Postgres' own `pg_get_*def` functions, never by OID,
  so a restore into another cluster hashes the same;
- `figures`: bytes of table data read, seconds, MB/s.

**One snapshot, several readers.** The coordinating connection opens a REPEATABLE READ READ ONLY
transaction and exports its snapshot (`pg_export_snapshot()`); every worker connection imports it
(`SET TRANSACTION SNAPSHOT`) before reading, so chunks read in parallel all see the same committed
state. A caller that already holds a snapshot (e.g. exported while writes were paused, see
pgbackrest.py) passes its id instead. Sequences are not transactional: their values are read at
the same moment, not through the snapshot, and a restored sequence may legitimately be up to
`SEQUENCE_LOG_AHEAD` increments ahead (Postgres WAL-logs sequence values in advance), so
`compare` accepts that much and nothing else.

**The row checksum.** Each row is hashed by Postgres with `hash_record_extended` (every column
through its type's own extended hash function: no text rendering, which cost 5x more), re-mixed with
`hashint8extended` (hash_record_extended combines columns linearly, so without the mix two rows that
swap a value would sum to the same), and a chunk's checksum is the sum of its rows' hashes modulo
2^64. Each row's hash covers its primary key, so the order of rows inside a chunk carries nothing
the key range does not already fix, and a sum needs no sort. The extended hash functions are the
ones hash partitioning uses, which Postgres keeps stable across versions and clusters (pg_upgrade
depends on it); the price is that values equal under their type's equality hash alike (numeric
1.0 and 1.00, text under a nondeterministic collation). A table with a column type that has no
hash function falls back to hashing its text rendering (`t::text`, under pinned DateStyle,
TimeZone and extra_float_digits).

**Chunks are key ranges; reads are block ranges.** Chunk i holds the rows whose primary key is in
[boundary i-1, boundary i), the boundaries being the key of every `chunk_rows`-th row, found in one
ordered pass when the expected manifest is taken (a restore drill reuses them with
`like=`, so a deleted row changes one chunk, not every chunk after it). Reading by key range would
make every chunk of a table with random keys (uuid v4, like course_events) touch every page: a
sequential scan per chunk. So the table is read in slices of `slice_mb` of physical blocks (TID range
scans: bounded, sequential, spread over the readers), each slice sorting its rows into key chunks
with `width_bucket` (a binary search over the boundaries) and returning per-chunk counts and sums,
which add up across slices. No query reads more than one slice.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from opsbook.core.errors import OpsbookError

VERSION = 1
DEFAULT_CHUNK_ROWS = 100_000
DEFAULT_WORKERS = 2
DEFAULT_SLICE_MB = 64      # physical slice one query reads
SEQUENCE_LOG_AHEAD = 32  # SEQ_LOG_VALS in Postgres' sequence.c: values WAL-logged ahead of use
MASK64 = (1 << 64) - 1
# Session settings that change how values render as text: pinned so any two sessions agree.
RENDER_SETTINGS = (
    "SET DateStyle = 'ISO, YMD'",
    "SET IntervalStyle = 'postgres'",
    "SET TimeZone = 'UTC'",
    "SET extra_float_digits = 3",
    "SET bytea_output = 'hex'",
    "SET statement_timeout = 0",
)
SYSTEM_SCHEMAS = "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_(toast|temp)'"


class ManifestError(OpsbookError):
    """A manifest could not be taken or read."""


# --- schema ---------------------------------------------------------------------------------
SCHEMA_QUERIES: dict[str, str] = {
    "table": f"""
        SELECT n.nspname || '.' || c.relname, c.relkind::text || ' ' || c.relpersistence::text
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND {SYSTEM_SCHEMAS}
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')""",
    "column": f"""
        SELECT n.nspname || '.' || c.relname || '.' || a.attname,
               row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum) || ' '
               || format_type(a.atttypid, a.atttypmod)
               || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
               || coalesce(' default ' || pg_get_expr(ad.adbin, ad.adrelid), '')
               || CASE WHEN a.attidentity <> '' THEN ' identity ' || a.attidentity::text ELSE '' END
               || CASE WHEN a.attgenerated <> '' THEN ' generated ' || a.attgenerated::text ELSE '' END
               || CASE WHEN a.attcollation <> 0 AND a.attcollation <> t.typcollation
                       THEN ' collate ' || co.collname ELSE '' END
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_type t ON t.oid = a.atttypid
        LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
        LEFT JOIN pg_collation co ON co.oid = a.attcollation
        WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
          AND {SYSTEM_SCHEMAS}
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')""",
    "constraint": f"""
        SELECT n.nspname || '.' || c.relname || '.' || con.conname,
               pg_get_constraintdef(con.oid) || CASE WHEN con.convalidated THEN '' ELSE ' (not validated)' END
        FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {SYSTEM_SCHEMAS}""",
    "index": f"""
        SELECT n.nspname || '.' || ic.relname,
               pg_get_indexdef(i.indexrelid) || CASE WHEN i.indisvalid THEN '' ELSE ' (invalid)' END
        FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
        JOIN pg_namespace n ON n.oid = ic.relnamespace WHERE {SYSTEM_SCHEMAS}""",
    "trigger": f"""
        SELECT n.nspname || '.' || c.relname || '.' || tg.tgname, pg_get_triggerdef(tg.oid)
        FROM pg_trigger tg JOIN pg_class c ON c.oid = tg.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace WHERE NOT tg.tgisinternal AND {SYSTEM_SCHEMAS}""",
    "view": f"""
        SELECT n.nspname || '.' || c.relname, pg_get_viewdef(c.oid)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('v', 'm') AND {SYSTEM_SCHEMAS}""",
    "function": f"""
        SELECT n.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
               md5(pg_get_functiondef(p.oid))
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE p.prokind IN ('f', 'p') AND {SYSTEM_SCHEMAS}
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')""",
    "sequence": """
        SELECT schemaname || '.' || sequencename,
               format('%s start %s increment %s min %s max %s cycle %s cache %s', data_type, start_value,
                      increment_by, min_value, max_value, cycle, cache_size)
        FROM pg_sequences""",
    "extension": "SELECT extname, extversion FROM pg_extension",
    "type": f"""
        SELECT n.nspname || '.' || t.typname, string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
        FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE {SYSTEM_SCHEMAS} GROUP BY 1""",
}


def schema_objects(cur: Any) -> dict[str, str]:
    """`kind name` -> its definition as Postgres renders it (no OIDs)."""
    out: dict[str, str] = {}
    for kind, query in SCHEMA_QUERIES.items():
        for name, definition in cur.execute(query).fetchall():
            out[f"{kind} {name}"] = definition
    return dict(sorted(out.items()))


def schema_hash(objects: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(objects, sort_keys=True).encode()).hexdigest()


# --- tables ---------------------------------------------------------------------------------
def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _qualified(table: str) -> str:
    schema, _, rel = table.partition(".")
    return f"{_quote(schema)}.{_quote(rel)}"


def list_tables(cur: Any) -> dict[str, dict[str, Any]]:
    """Every user table holding rows: its primary key (names, types) and its size in bytes."""
    rows = cur.execute(f"""
        SELECT n.nspname || '.' || c.relname, pg_table_size(c.oid),
               pg_relation_size(c.oid) / current_setting('block_size')::int,
               (SELECT array_agg(a.attname::text ORDER BY k.ord)
                  FROM pg_index i, unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord), pg_attribute a
                 WHERE i.indrelid = c.oid AND i.indisprimary AND a.attrelid = c.oid AND a.attnum = k.attnum),
               (SELECT array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY k.ord)
                  FROM pg_index i, unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord), pg_attribute a
                 WHERE i.indrelid = c.oid AND i.indisprimary AND a.attrelid = c.oid AND a.attnum = k.attnum)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'r' AND {SYSTEM_SCHEMAS}
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')
        ORDER BY 1""").fetchall()
    return {name: {"bytes": size, "blocks": blocks, "key": list(key or []), "key_types": list(types or [])}
            for name, size, blocks, key, types in rows}


def _key_expr(key: list[str]) -> str:
    return "ROW(" + ", ".join(_quote(k) for k in key) + ")"


def _key_value(types: list[str]) -> str:
    return "ROW(" + ", ".join(f"%s::{t}" for t in types) + ")"


def chunk_boundaries(cur: Any, table: str, key: list[str], chunk_rows: int) -> list[list[str]]:
    """The key (as text) of rows chunk_rows, 2*chunk_rows, ... (0-based) in key order: chunk i holds
    the keys in [boundary i-1, boundary i). One ordered pass (a window over the key, which the
    planner serves from the primary-key index or one sort); walking with OFFSET sorted the table
    once per boundary."""
    cols = ", ".join(f"{_quote(k)}::text" for k in key)
    order = ", ".join(_quote(k) for k in key)
    rows = cur.execute(
        f"SELECT {cols} FROM (SELECT {order}, row_number() OVER (ORDER BY {order}) AS opsbook_rn "
        f"FROM {_qualified(table)}) AS s WHERE opsbook_rn %% %s = 1 AND opsbook_rn > 1 ORDER BY opsbook_rn",
        (chunk_rows,),
    ).fetchall()
    return [list(r) for r in rows]


def row_hash(cur: Any, table: str) -> str:
    """The per-row hash expression for `table` (alias t): by column hash functions when every
    column type has one, else by its text rendering."""
    cur.execute("SAVEPOINT opsbook_probe")
    try:
        cur.execute(f"SELECT hash_record_extended(t, 0) FROM {_qualified(table)} AS t LIMIT 1").fetchall()
    except Exception:  # noqa: BLE001 - a type without a hash function: fall back, said in the manifest
        cur.execute("ROLLBACK TO SAVEPOINT opsbook_probe")
        return "hashtextextended(t::text, 0)"
    cur.execute("RELEASE SAVEPOINT opsbook_probe")
    return "hashint8extended(hash_record_extended(t, 0), 0)"


def _slice_query(table: str, t: dict[str, Any], *, upper: bool) -> str:
    """Per-chunk count and hash sum of the rows in one block range of `table`."""
    key, types, n_bounds, hash_expr = t["key"], t["key_types"], len(t["boundaries"]), t["hash"]
    if not key or not n_bounds:
        bucket = "0"
    elif len(key) == 1:
        bucket = f"width_bucket(t.{_quote(key[0])}, %s::text[]::{types[0]}[])"
    else:
        rows = ", ".join(_key_value(types) for _ in range(n_bounds))
        cols = ", ".join(f"t.{_quote(k)}" for k in key)
        bucket = f"width_bucket(ROW({cols}), ARRAY[{rows}])"
    cond = "t.ctid >= %s::tid" + (" AND t.ctid < %s::tid" if upper else "")
    # Each row's bucket and hash are computed below the aggregate (OFFSET 0 keeps the planner from pulling
    # them up): aggregated directly, the planner may sort whole rows by bucket to group them, to disk (seen
    # at 5 GB: external merge sorts of 66 MB a slice, 2.5x slower than hashing 16-byte pairs).
    return (f"SELECT b, count(*), sum(h)::text FROM (SELECT {bucket} AS b, {hash_expr} AS h "
            f"FROM {_qualified(table)} AS t WHERE {cond} OFFSET 0) AS s GROUP BY 1")


def _open_reader(conninfo: str, snapshot: str | None) -> Any:
    import psycopg
    from psycopg import sql

    # No server-side prepared statements: psycopg prepares a query run five times, and Postgres then plans
    # it generically, the boundaries an unknown parameter whose cast (text[] to the key's type) runs again
    # for every row; at 5 GB (79 slices, 91 boundaries) slices after the tenth took 3 s instead of 0.3 s.
    conn = psycopg.connect(conninfo, autocommit=True, application_name="opsbook-manifest", prepare_threshold=None)
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    if snapshot:
        conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
    for s in RENDER_SETTINGS:
        conn.execute(s)
    return conn


def take(
    conninfo: str,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    workers: int = DEFAULT_WORKERS,
    slice_mb: int = DEFAULT_SLICE_MB,
    like: dict[str, Any] | None = None,
    snapshot: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The manifest of the database at `conninfo`, read from one snapshot by `workers` connections.

    `like`: an expected manifest whose chunk boundaries to reuse (for `compare`). `snapshot`: an
    exported snapshot id to read instead of exporting a new one (its exporter must stay open)."""
    import psycopg

    if chunk_rows < 1 or workers < 1:
        raise ManifestError(f"chunk_rows and workers must be at least 1 (got {chunk_rows}, {workers}); "
                            "nothing was read")
    started = time.monotonic()
    try:
        coord = _open_reader(conninfo, snapshot)
    except psycopg.Error as e:
        raise ManifestError(f"could not open a snapshot of the database: {str(e).strip()}. Nothing was "
                            "read; check the database answers and, with `snapshot=`, that its exporter "
                            "is still open.") from e
    readers: list[Any] = []
    try:
        cur = coord.cursor()
        snap_id = snapshot or cur.execute("SELECT pg_export_snapshot()").fetchone()[0]
        info = cur.execute(
            "SELECT current_database(), current_setting('server_version'), pg_is_in_recovery(), "
            "CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END::text"
        ).fetchone()
        objects = schema_objects(cur)
        sequences = {
            name: {"last_value": last, "increment": inc}
            for name, last, inc in cur.execute(
                "SELECT schemaname || '.' || sequencename, last_value, increment_by FROM pg_sequences ORDER BY 1"
            ).fetchall()
        }
        tables = list_tables(cur)
        expected_tables = (like or {}).get("tables", {})
        slice_blocks = max(1, slice_mb * 1024 * 1024 // 8192)
        jobs = [j for name, t in tables.items()
                for j in _plan_table(cur, name, t, expected_tables.get(name), chunk_rows=chunk_rows,
                                               slice_blocks=slice_blocks)]
        if progress:
            progress(f"{len(tables)} table(s) in {len(jobs)} slice(s) of {slice_mb} MB, {len(sequences)} sequence(s); "
                     f"{workers} reader(s) on snapshot {snap_id}")
        readers = [_open_reader(conninfo, snap_id) for _ in range(max(0, min(workers, len(jobs)) - 1))]
        _run_chunks([coord, *readers], jobs, tables, progress)
    except psycopg.Error as e:
        raise ManifestError(f"reading the manifest failed: {str(e).strip()}. Nothing was changed (the "
                            "manifest only reads); rerun when the database answers.") from e
    finally:
        for c in [*readers, coord]:
            c.close()
    seconds = time.monotonic() - started
    total_bytes = sum(t["bytes"] for t in tables.values())
    for t in tables.values():
        for c in t["chunks"]:
            c["sum"] = format(c["sum"] & MASK64, "016x")
        t["rows"] = sum(c["rows"] for c in t["chunks"])
    return {
        "version": VERSION,
        "taken_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "database": info[0],
        "server_version": info[1],
        "lsn": info[3],
        "chunk_rows": chunk_rows,
        "slice_mb": slice_mb,
        "schema": {"hash": schema_hash(objects), "objects": objects},
        "sequences": sequences,
        "tables": tables,
        "figures": {"seconds": round(seconds, 3), "bytes": total_bytes,
                    "mb_per_s": round(total_bytes / 1e6 / seconds, 1) if seconds else None},
    }


def _plan_table(cur: Any, name: str, t: dict[str, Any], prior: dict[str, Any] | None, *, chunk_rows: int,
                slice_blocks: int) -> list[tuple[str, str, tuple]]:
    """Fix `t`'s chunk boundaries (the expected manifest's when it has them) and row hash, and
    return the slice queries that read it."""
    key, types = t["key"], t["key_types"]
    if not key:
        t["boundaries"] = []
    elif prior and prior.get("key") == key and prior.get("key_types") == types:
        t["boundaries"] = prior["boundaries"]
    else:
        t["boundaries"] = chunk_boundaries(cur, name, key, chunk_rows)
    bounds = t["boundaries"]
    t["hash"] = row_hash(cur, name)
    t["chunks"] = [{"rows": 0, "sum": 0} for _ in range(len(bounds) + 1)]
    if len(key) == 1:
        bound_params: tuple = ([b[0] for b in bounds],) if bounds else ()
    else:
        bound_params = tuple(v for b in bounds for v in b)
    starts = list(range(0, max(t["blocks"], 1), slice_blocks))
    jobs = []
    for i, start in enumerate(starts):
        last = i == len(starts) - 1  # open-ended: nothing visible to the snapshot lies beyond
        tids = (f"({start},0)",) + (() if last else (f"({start + slice_blocks},0)",))
        jobs.append((name, _slice_query(name, t, upper=not last), (*bound_params, *tids)))
    return jobs


def _run_chunks(conns: list[Any], jobs: list, tables: dict, progress: Callable[[str], None] | None) -> None:
    """Each connection (all in the same snapshot) takes slices from one queue until none is left,
    adding each slice's per-chunk counts and sums into its table's chunks. Threads are enough:
    psycopg releases the GIL while Postgres works."""
    todo: queue.Queue = queue.Queue()
    for j in jobs:
        todo.put(j)
    errors: list[BaseException] = []
    done = [0]
    lock = threading.Lock()

    def work(conn: Any) -> None:
        cur = conn.cursor()
        while not errors:
            try:
                name, q, params = todo.get_nowait()
            except queue.Empty:
                return
            try:
                found = cur.execute(q, params).fetchall()
            except BaseException as e:  # noqa: BLE001 - handed to the caller, which raises it
                errors.append(e)
                return
            with lock:
                chunks = tables[name]["chunks"]
                for bucket, rows, total in found:
                    chunks[bucket]["rows"] += rows
                    chunks[bucket]["sum"] += int(total)
                done[0] += 1
                if progress and done[0] % 20 == 0:
                    progress(f"{done[0]}/{len(jobs)} slices")

    with ThreadPoolExecutor(max_workers=len(conns)) as pool:
        list(pool.map(work, conns))
    if errors:
        raise errors[0]


# --- compare --------------------------------------------------------------------------------
def _range(key: list[str], bounds: list[list[str]], i: int) -> str:
    lo = "the start" if i == 0 else "(" + ", ".join(bounds[i - 1]) + ")"
    hi = "the end" if i == len(bounds) else "(" + ", ".join(bounds[i]) + ") excluded"
    return f"rows with {', '.join(key)} from {lo} up to {hi}"


def compare(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Every difference between two manifests, in an operator's words; [] when they agree.
    Take `actual` with `like=expected` so chunk boundaries line up."""
    for m, which in ((expected, "expected"), (actual, "actual")):
        if not isinstance(m, dict) or m.get("version") != VERSION:
            got = m.get("version") if isinstance(m, dict) else type(m).__name__
            return [f"the {which} manifest is version {got!r}, this opsbook reads version {VERSION}: "
                    "cannot compare (take both with the same opsbook)"]
    out: list[str] = []
    out += _compare_schema(expected["schema"], actual["schema"])
    out += _compare_sequences(expected["sequences"], actual["sequences"])
    out += _compare_tables(expected["tables"], actual["tables"])
    return out


def _compare_schema(exp: dict, act: dict) -> list[str]:
    if exp["hash"] == act["hash"]:
        return []
    e, a = exp["objects"], act["objects"]
    out = [f"schema differs: {k} is missing (expected {e[k]})" for k in sorted(set(e) - set(a))]
    out += [f"schema differs: {k} is not expected (found {a[k]})" for k in sorted(set(a) - set(e))]
    out += [f"schema differs: {k}: expected {e[k]}, found {a[k]}" for k in sorted(set(e) & set(a)) if e[k] != a[k]]
    return out or ["schema differs: the hashes differ but no object does (manifests edited by hand?)"]


def _compare_sequences(exp: dict, act: dict) -> list[str]:
    out = [f"sequence {s}: missing" for s in sorted(set(exp) - set(act))]
    out += [f"sequence {s}: not expected" for s in sorted(set(act) - set(exp))]
    for s in sorted(set(exp) & set(act)):
        ev, av, inc = exp[s]["last_value"], act[s]["last_value"], exp[s]["increment"]
        if ev is None or av is None:
            if ev != av:
                out.append(f"sequence {s}: last value {ev} expected, {av} found")
            continue
        ahead = (av - ev) / inc if inc else 0
        if not 0 <= ahead <= SEQUENCE_LOG_AHEAD:
            out.append(f"sequence {s}: last value {ev} expected, {av} found (a restore may be at most "
                       f"{SEQUENCE_LOG_AHEAD} values ahead, never behind)")
    return out


def _compare_tables(exp: dict, act: dict) -> list[str]:
    out = [f"table {t}: missing ({exp[t]['rows']} rows expected)" for t in sorted(set(exp) - set(act))]
    out += [f"table {t}: not expected ({act[t]['rows']} rows found)" for t in sorted(set(act) - set(exp))]
    for name in sorted(set(exp) & set(act)):
        e, a = exp[name], act[name]
        if e["rows"] != a["rows"]:
            out.append(f"table {name}: {e['rows']} rows expected, {a['rows']} found")
        if e["boundaries"] != a["boundaries"]:
            if e["chunks"] != a["chunks"]:
                out.append(f"table {name}: its chunks are bounded differently, so the differing rows cannot be "
                           "located; its checksums differ (take the second manifest with like=the first)")
            continue
        key = e["key"] or ["(no primary key: the whole table)"]
        for i, (ec, ac) in enumerate(zip(e["chunks"], a["chunks"], strict=True)):
            if ec != ac:
                what = (f"{ec['rows']} rows expected, {ac['rows']} found" if ec["rows"] != ac["rows"]
                        else f"same count ({ec['rows']}), different contents")
                out.append(f"table {name}: {_range(key, e['boundaries'], i)} differ ({what})")
    return out
