"""How long a copy of the service database takes, by three mechanisms, as it grows: the btrfs
copy-on-write clone that `staging.refresh` uses, `pg_dump -j | pg_restore -j` (directory format),
and `CREATE DATABASE ... TEMPLATE`; then masking throughput and a drill's manifest comparison rate.

    python bench/clone_bench.py                 # 1 GB, then 5 GB of course_events, in one run
    python bench/clone_bench.py --sizes 1       # 1 GB only
    python bench/clone_bench.py --mask-at 1     # mask only at 1 GB
    python bench/clone_bench.py --sizes 1 --mask-at 1 --old-mask-seconds 0   # the old method to the end too

Starts a local Postgres 15 (the source), applies the app's migrations, and for each size in turn
loads record_response events until course_events holds about that many GB (10^9 bytes,
pg_table_size), then, with the source settled (a CHECKPOINT on the source and the standby's replay
caught up: the steady state a standby is in between refreshes):

  cow clone      the btrfs path's clone (catch up, restartpoint, snapshot, start, promote) of a
                 standby on a loop-mounted btrfs image; measured twice, time to a usable database
  manifest       the source's manifest, then the clone's with the same chunk boundaries (what a
                 restore drill does), compared: MB/s of the second read, differences found
  masking        app/masking.yml applied to a clone (the refresh's mask step) by the method before
                 (keyset batches of the primary key, indexes maintained: `order="key"`, stopped after
                 --old-mask-seconds, its rows/s over that prefix) and, on a second clone of the same
                 point, by masking.apply's own (physical order, indexes built again): rows/s of each,
                 their ratio, and the space the masked clone then holds alone (btrfs exclusive bytes)
  dump/restore   pg_dump -Fd -j 2 into a directory on this machine's disk, pg_restore -j 2 into a
                 new database of the same cluster (indexes and constraints included)
  template       CREATE DATABASE ... TEMPLATE (PostgreSQL 15: a full block copy, WAL-logged)

The standby's base backup (pg_basebackup, once per source) is timed too: it is the one step of the
btrfs path whose time grows with the database. Checks free disk first. Prints figures, never
passes or fails. Goals (issue 11): the 5 GB clone within 1.2x the 1 GB clone, and at most 1/10 of
dump-and-restore at 5 GB; a drill's manifest comparison at >= 100 MB/s.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opsbook.core.paths import APP  # noqa: E402 - after the path is set
from opsbook.engines import masking  # noqa: E402
from opsbook.engines.clones.btrfs import BtrfsClones, Settings  # noqa: E402
from opsbook.engines.clones.runner import LocalRunner  # noqa: E402
from opsbook.engines.snapshots import manifest  # noqa: E402
from tests.fixtures.biglearn import apply_app_schema, load_course_events  # noqa: E402
from tests.fixtures.clones import start_source  # noqa: E402
from tests.fixtures.postgres import PG_BIN, _as_postgres, _free_port  # noqa: E402

BYTES_PER_EVENT = 545   # pg_table_size(course_events) / rows for this shape (bench/manifest_bench.py)
DB = "bl_api"
SERVER = "-c shared_buffers=512MB -c max_wal_size=2GB -c checkpoint_timeout=15min -c maintenance_work_mem=256MB"


def say(text: str) -> None:
    print(text, flush=True)


def one(dsn: str, sql: str):
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql).fetchone()[0]


def free_gb(path: str) -> float:
    return shutil.disk_usage(path).free / 1e9


def settle(src, host: BtrfsClones) -> None:
    """CHECKPOINT on the source, then wait until the standby has replayed everything."""
    with psycopg.connect(src.socket(), autocommit=True) as conn:
        conn.execute("CHECKPOINT")
    target = one(src.socket(), "SELECT pg_current_wal_flush_lsn()::text")
    t0 = time.monotonic()
    while one(host.standby_conninfo(), f"SELECT pg_wal_lsn_diff('{target}', pg_last_wal_replay_lsn())") > 0:
        time.sleep(0.5)
    say(f"  settled: standby replayed to {target} ({time.monotonic() - t0:.1f} s after the source's checkpoint)")


def cow(src, host: BtrfsClones, name: str) -> tuple[float, object]:
    c = host.clone(name, service_port=_free_port(), source=src.source())
    s = c.seconds
    say(f"  cow clone {name}: usable after {s['usable']:.2f} s (catch up {s['catch_up']:.2f}, restartpoint "
        f"{s['restartpoint']:.2f}, snapshot {s['snapshot']:.2f}, start {s['start']:.2f}, promote {s['promote']:.2f})")
    return s["usable"], c


def dump_restore(src, work: Path) -> tuple[float, float]:
    home = work / "dumps"          # pg_dump runs as postgres: its own directory
    home.mkdir(exist_ok=True)
    shutil.chown(home, "postgres", "postgres")
    out = home / "dump"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.monotonic()
    subprocess.run(_as_postgres([str(PG_BIN / "pg_dump"), "-Fd", "-j", "2", "-f", str(out), "-d", src.socket(DB)]),
                   check=True, capture_output=True)
    dump_s = time.monotonic() - t0
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    with psycopg.connect(src.socket(), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS restored")
        conn.execute("CREATE DATABASE restored")
    t0 = time.monotonic()
    subprocess.run(_as_postgres([str(PG_BIN / "pg_restore"), "-j", "2", "-d", src.socket("restored"), str(out)]),
                   check=True, capture_output=True)
    restore_s = time.monotonic() - t0
    say(f"  pg_dump -Fd -j 2: {dump_s:.1f} s ({size / 1e6:,.0f} MB on disk); pg_restore -j 2: {restore_s:.1f} s; "
        f"in all {dump_s + restore_s:.1f} s")
    with psycopg.connect(src.socket(), autocommit=True) as conn:
        conn.execute("DROP DATABASE restored")
    shutil.rmtree(out, ignore_errors=True)
    return dump_s, restore_s


def template(src) -> float:
    with psycopg.connect(src.socket(), autocommit=True) as conn:
        t0 = time.monotonic()
        conn.execute(f"CREATE DATABASE copied TEMPLATE {DB}")
        took = time.monotonic() - t0
        conn.execute("DROP DATABASE copied")
    say(f"  CREATE DATABASE ... TEMPLATE: {took:.1f} s")
    return took


class _Enough(Exception):
    """The old method has run long enough to know its rate."""


def mask_old(dsn: str, seconds: float) -> float:
    """rows/s of the masking method before (keyset batches of the primary key, indexes maintained),
    over its first `seconds` (0: to the end). The rate is steady after its first batches: every batch
    dirties ~10,000 random heap pages (course_events' key is a random uuid)."""
    started = time.monotonic()
    last = [0]

    def progress(line: str) -> None:   # a count at most every 10 s (masking's progress_every)
        say(f"    {line}")
        if line.startswith("course_events: ") and line.endswith(" rows masked"):
            last[0] = int(line.split(": ")[1].split("/", maxsplit=1)[0].replace(",", ""))
            if seconds and time.monotonic() - started > seconds:
                raise _Enough

    try:
        done = masking.apply(dsn, masking.load(APP / "masking.yml"), secrets.token_bytes(32), order="key",
                             rebuild_indexes=False, progress=progress, progress_every=10)
    except _Enough:
        took = time.monotonic() - started
        say(f"  masking by the method before (key order, indexes maintained): {last[0]:,} rows in {took:.1f} s "
            f"({last[0] / took:,.0f} rows/s), stopped after {seconds:g} s")
        return last[0] / took
    say(f"  masking by the method before (key order, indexes maintained): {sum(done.tables.values()):,} rows in "
        f"{done.seconds:.1f} s ({done.rows_per_s:,.0f} rows/s)")
    return done.rows_per_s


def measure(src, host: BtrfsClones, gb: float, work: Path, row: dict, *, mask: bool, old_seconds: float) -> None:
    settle(src, host)
    row["cow_s"] = []
    clone = None
    for i in (1, 2):
        took, c = cow(src, host, f"bench-{gb:g}gb-{i}")
        row["cow_s"].append(took)
        if clone is not None:
            host.discard(clone.name)
        clone = c
    dsn = host.conninfo(clone.private_port, DB)
    expected = manifest.take(src.socket(DB))
    e = expected["figures"]
    say(f"  manifest of the source (ext4, boundaries found): {e['bytes'] / 1e6:,.0f} MB in {e['seconds']:.1f} s "
        f"({e['mb_per_s']:.0f} MB/s)")
    got = manifest.take(dsn, like=expected)
    diffs = manifest.compare(expected, got)
    f = got["figures"]
    row["manifest_mb_s"] = f["mb_per_s"]
    say(f"  manifest of the clone with the source's boundaries: {f['bytes'] / 1e6:,.0f} MB in {f['seconds']:.1f} s "
        f"({f['mb_per_s']:.0f} MB/s); {len(diffs)} difference(s) from the source's")
    row["mask_rows_s"] = row["old_mask_rows_s"] = None
    if mask:
        host.discard(clone.name)   # each method masks its own clone of the same point
        _, old = cow(src, host, f"bench-{gb:g}gb-old")
        row["old_mask_rows_s"] = mask_old(host.conninfo(old.private_port, DB), old_seconds)
        host.discard(old.name)
        _, clone = cow(src, host, f"bench-{gb:g}gb-new")
        dsn = host.conninfo(clone.private_port, DB)
        done = masking.apply(dsn, masking.load(APP / "masking.yml"), secrets.token_bytes(32),
                             progress=lambda line: say(f"    {line}"), progress_every=30)
        row["mask_rows_s"] = done.rows_per_s
        use = host.usage(clone.name)
        say(f"  masking (physical order, indexes built again): {sum(done.tables.values()):,} rows in "
            f"{done.seconds:.1f} s ({done.rows_per_s:,.0f} rows/s); the clone now holds "
            f"{use['exclusive_bytes'] / 1e6:,.0f} MB of its own of {use['total_bytes'] / 1e6:,.0f} MB")
        say(f"  masking, this method / the method before, same run: {done.rows_per_s / row['old_mask_rows_s']:.1f}x")
    host.discard(clone.name)
    row["dump_s"], row["restore_s"] = dump_restore(src, work)
    row["template_s"] = template(src)


def stop_on_sigterm(_signum, _frame) -> None:
    raise KeyboardInterrupt   # the clusters, the mount and the slot are removed on the way out


def main() -> None:
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,5", help="GB of course_events to measure at, rising, comma-separated")
    ap.add_argument("--work", default=tempfile.gettempdir(), help="where the clusters, image and dumps go")
    ap.add_argument("--mask-at", default=None, help="sizes at which to mask the clone (default: every size; 'none')")
    ap.add_argument("--old-mask-seconds", type=float, default=180,
                    help="stop the masking method before after this long (0: to the end; about 10 min at 1 GB)")
    args = ap.parse_args()
    sizes = [float(x) for x in args.sizes.split(",")]
    mask_at = sizes if args.mask_at is None else [float(x) for x in args.mask_at.split(",") if x not in ("", "none")]
    need = sizes[-1] * 5 + 6   # source + its WAL, standby, a masked clone's own blocks, a dump, a restore
    have = free_gb(args.work)
    say(f"free disk under {args.work}: {have:.0f} GB; this run needs about {need:.0f} GB at its largest size")
    if have < need:
        sys.exit(f"not enough free disk under {args.work} for {sizes[-1]:g} GB: {have:.0f} GB free, about {need:.0f} "
                 f"GB needed. Nothing was started.")
    work = Path(tempfile.mkdtemp(prefix="opsbook-clone-bench-", dir=args.work))
    work.chmod(0o755)
    src = start_source(DB, options=SERVER)
    host = BtrfsClones(LocalRunner(), Settings(base=str(work / "clones"), image_gb=int(sizes[-1] * 3 + 8),
                                               listen_addresses="127.0.0.1"), log=say)
    rows: list[dict] = []
    try:
        apply_app_schema(src.socket(DB))
        for gb in sizes:
            have_bytes = one(src.socket(DB), "SELECT pg_table_size('course_events')")
            missing = int((gb * 1e9 - have_bytes) / BYTES_PER_EVENT)
            t0 = time.monotonic()
            load_course_events(src.socket(DB), max(missing, 0), courses=1000, students=100_000)
            row = {"gb": gb, "db_mb": one(src.socket(DB), f"SELECT pg_database_size('{DB}')") / 1e6,
                   "rows": one(src.socket(DB), "SELECT count(*) FROM course_events")}
            say(f"{gb:g} GB: {row['rows']:,} events, database {row['db_mb']:,.0f} MB (loaded in "
                f"{time.monotonic() - t0:.0f} s)")
            if not host.standby_exists():
                t0 = time.monotonic()
                host.ensure_standby(src.source())
                say(f"  standby set up (pg_basebackup, once per source): {time.monotonic() - t0:.1f} s")
            measure(src, host, gb, work, row, mask=gb in mask_at, old_seconds=args.old_mask_seconds)
            rows.append(row)
    finally:
        host.remove_all(src.source())
        src.stop()
        shutil.rmtree(work, ignore_errors=True)
    report(rows)


def mask_figures(r: dict) -> str:
    if r["mask_rows_s"] is None:
        return "not run"
    return (f"{r['old_mask_rows_s']:,.0f} / {r['mask_rows_s']:,.0f} rows/s "
            f"({r['mask_rows_s'] / r['old_mask_rows_s']:.1f}x)")


def report(rows: list[dict]) -> None:
    say("\n| course_events | database | cow clone (usable) | pg_dump -j2 | pg_restore -j2 | dump+restore | TEMPLATE | "
        "masking (before / now) | manifest compare |")
    say("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        say(f"| {r['gb']:g} GB ({r['rows']:,} rows) | {r['db_mb']:,.0f} MB | "
            f"{' / '.join(f'{s:.2f}' for s in r['cow_s'])} s | {r['dump_s']:.1f} s | {r['restore_s']:.1f} s | "
            f"{r['dump_s'] + r['restore_s']:.1f} s | {r['template_s']:.1f} s | "
            f"{mask_figures(r)} | "
            f"{r['manifest_mb_s']:.0f} MB/s |")
    if len(rows) >= 2:
        small, big = rows[0], rows[-1]
        ratio = min(big["cow_s"]) / min(small["cow_s"])
        share = min(big["cow_s"]) / (big["dump_s"] + big["restore_s"])
        say(f"\ncow clone at {big['gb']:g} GB / at {small['gb']:g} GB (best of two each): {ratio:.2f}x (goal <= 1.2x)")
        say(f"cow clone / dump+restore at {big['gb']:g} GB: {share:.4f} (goal <= 0.1)")


if __name__ == "__main__":
    main()
