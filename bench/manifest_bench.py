"""How fast a snapshot manifest reads Biglearn-shaped data: MB/s of table data.

    python bench/manifest_bench.py                  # starts its own Postgres 15, ~500 MB of course_events
    python bench/manifest_bench.py --mb 1000 --workers 2 --chunk-rows 100000
    python bench/manifest_bench.py --dsn 'host=127.0.0.1 port=5432 user=postgres dbname=bench'  # existing db

Applies the app's migrations (expand and contract) with opsbook's engine, loads record_response
events until the tables hold about --mb MB, then takes a manifest (the expected one: boundaries
walked), a second one with the first's boundaries (what a restore drill does), compares them, and
prints seconds and MB/s for each (MB = 10^6 bytes of heap + TOAST, pg_table_size). The first read
after loading may come from the page cache or disk depending on shared_buffers and memory: both
runs are printed. Prints figures; never passes or fails. Goal (issue 11): >= 100 MB/s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.migrations_bench import start_postgres  # noqa: E402 - after the path is set
from opsbook.engines.snapshots import manifest  # noqa: E402
from tests.fixtures.biglearn import apply_app_schema, load_course_events  # noqa: E402

BYTES_PER_EVENT = 545  # measured: pg_table_size(course_events) / rows for this shape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=500, help="table data to load, in MB (10^6 bytes)")
    ap.add_argument("--workers", type=int, default=manifest.DEFAULT_WORKERS)
    ap.add_argument("--chunk-rows", type=int, default=manifest.DEFAULT_CHUNK_ROWS)
    ap.add_argument("--dsn", help="an existing database (its course_events is reused when present)")
    args = ap.parse_args()

    stop = None
    dsn = args.dsn
    if not dsn:
        dsn, stop = start_postgres()
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            has = conn.execute("SELECT to_regclass('course_events') IS NOT NULL").fetchone()[0]
        if not has:
            apply_app_schema(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            size = conn.execute("SELECT pg_table_size('course_events')").fetchone()[0]
        missing = int((args.mb * 1e6 - size) / BYTES_PER_EVENT)
        if missing > 0:
            t = time.monotonic()
            load_course_events(dsn, missing, courses=1000, students=100_000)
            print(f"loaded {missing:,} events in {time.monotonic() - t:.0f} s")
        first = manifest.take(dsn, chunk_rows=args.chunk_rows, workers=args.workers)
        second = manifest.take(dsn, chunk_rows=args.chunk_rows, workers=args.workers, like=first)
        t = time.monotonic()
        diffs = manifest.compare(first, second)
        compare_s = time.monotonic() - t
        rows = sum(x["rows"] for x in first["tables"].values())
        chunks = sum(len(x["chunks"]) for x in first["tables"].values())
        f1, f2 = first["figures"], second["figures"]
        print(f"table data: {f1['bytes'] / 1e6:,.0f} MB, {rows:,} rows, {chunks} chunks of "
              f"{args.chunk_rows:,} rows, {args.workers} reader(s)")
        print(f"manifest (boundaries walked):   {f1['seconds']:.1f} s  {f1['mb_per_s']:.0f} MB/s")
        print(f"manifest (boundaries given):    {f2['seconds']:.1f} s  {f2['mb_per_s']:.0f} MB/s")
        print(f"compare: {compare_s * 1000:.1f} ms, {len(diffs)} difference(s)")
    finally:
        if stop:
            stop()


if __name__ == "__main__":
    main()
