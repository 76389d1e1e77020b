"""A restore drill on Biglearn-shaped data, and masking a clone of it: where the time goes.

    python bench/drill_bench.py               # ~300 MB of course_events
    python bench/drill_bench.py --mb 1000

Starts a local Postgres 15 whose WAL pgBackRest archives into a repository in a temp dir, applies
the app's migrations, loads record_response events to about --mb MB, then:
  snapshot: full backup + restore point + manifest (write pause measured)
  drill:    restore to the point into a scratch cluster, time to usable, manifest, compare, pg_amcheck
  masking:  CREATE DATABASE ... TEMPLATE of the source, app/masking.yml applied, then verify
Prints figures; never passes or fails.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opsbook.core.paths import APP  # noqa: E402 - after the path is set
from opsbook.engines import masking  # noqa: E402
from opsbook.engines.snapshots import pgbackrest as pgbr  # noqa: E402
from tests.fixtures.archived_pg import start_archived_cluster  # noqa: E402
from tests.fixtures.biglearn import apply_app_schema, load_course_events  # noqa: E402

BYTES_PER_EVENT = 545


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=300, help="table data to load, in MB (10^6 bytes)")
    ap.add_argument("--skip-masking", action="store_true")
    args = ap.parse_args()
    repo, admin, stop = start_archived_cluster("shared_buffers = 512MB\nmax_wal_size = 8GB\n")
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("CREATE DATABASE blapi")
        dsn = admin.replace("dbname=postgres", "dbname=blapi")
        apply_app_schema(dsn)
        t = time.monotonic()
        load_course_events(dsn, int(args.mb * 1e6 / BYTES_PER_EVENT), courses=1000, students=100_000)
        print(f"loaded in {time.monotonic() - t:.0f} s")

        t = time.monotonic()
        snap = pgbr.snapshot(repo, dsn, kind="full")
        snap_s = time.monotonic() - t
        f = snap.manifest["figures"]
        print(f"snapshot: {snap_s:.1f} s in all; backup {snap.backup.id}: {snap.backup.size / 1e6:,.0f} MB, "
              f"{snap.backup.repo_size / 1e6:,.0f} MB in the repository; writes paused {snap.write_pause_ms:.0f} ms; "
              f"manifest {f['seconds']:.1f} s ({f['bytes'] / 1e6:,.0f} MB of table data, {f['mb_per_s']:.0f} MB/s)")

        t = time.monotonic()
        result = pgbr.drill(repo, snap, "blapi")
        s = result.seconds
        print(f"drill: {result.verdict}")
        print(f"drill: {time.monotonic() - t:.1f} s in all: restore {s.get('restore', 0):.1f} s, recovery to the "
              f"point {s.get('recovery', 0):.1f} s (usable after {s.get('usable', 0):.1f} s), manifest "
              f"{s.get('manifest', 0):.1f} s ({f['bytes'] / 1e6 / s['manifest']:.0f} MB/s), "
              f"pg_amcheck {s.get('amcheck', 0):.1f} s")

        if not args.skip_masking:
            with psycopg.connect(admin, autocommit=True) as conn:
                t = time.monotonic()
                conn.execute("CREATE DATABASE blapi_clone TEMPLATE blapi")
                print(f"clone (CREATE DATABASE ... TEMPLATE): {time.monotonic() - t:.1f} s")
            clone = admin.replace("dbname=postgres", "dbname=blapi_clone")
            rules = masking.load(APP / "masking.yml")
            done = masking.apply(clone, rules, secrets.token_bytes(32))
            print(f"masking: {sum(done.tables.values()):,} rows in {done.seconds:.1f} s "
                  f"({done.rows_per_s:,.0f} rows/s, {done.batches} batches)")
            t = time.monotonic()
            leaks = masking.verify(dsn, clone, rules)
            print(f"verify: {time.monotonic() - t:.1f} s, {len(leaks)} leak(s)")
    finally:
        stop()


if __name__ == "__main__":
    main()
