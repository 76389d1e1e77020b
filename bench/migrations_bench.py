"""What a writer feels while 0002's expand runs on a big course_events: online engine vs naive SQL.

    python bench/migrations_bench.py                 # starts its own Postgres 15, 5M rows
    python bench/migrations_bench.py --rows 500000   # quicker
    python bench/migrations_bench.py --dsn 'host=... user=... dbname=postgres'   # existing server

Seeds one database with 0001 + N record_response events (COPY), clones it (CREATE DATABASE ...
TEMPLATE) so both runs start from identical tables, then, while a writer inserts events at a
steady rate into each:
  online: opsbook's engine runs 0002 expand (add column, sync trigger, keyset batches, CONCURRENTLY)
  naive:  what the old runner did: one transaction with ALTER TABLE ADD COLUMN, UPDATE all rows,
          CREATE INDEX (no CONCURRENTLY)
and prints, for each: longest insert the writer saw, longest lock wait behind the migration
(sampled from pg_locks), writer errors (the writer's statement_timeout), total time and
backfill rows/s. Prints figures; never passes or fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opsbook.engines.migrations import Settings, run  # noqa: E402 - after the path is set
from opsbook.engines.migrations.measure import LockSampler, RunResult  # noqa: E402
from tests.fixtures.postgres import PG_BIN, _as_postgres, _free_port  # noqa: E402

COURSES = 1000
NAIVE_SQL = (
    "ALTER TABLE course_events ADD COLUMN student_uuid uuid",
    "UPDATE course_events SET student_uuid = (data->>'student_uuid')::uuid WHERE data ? 'student_uuid'",
    "CREATE INDEX course_events_student_uuid_idx ON course_events (student_uuid) WHERE student_uuid IS "
    "NOT NULL",
)


def start_postgres() -> tuple[str, callable]:
    base = Path(tempfile.mkdtemp(prefix="opsbook-bench-pg-"))
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    port = _free_port()
    subprocess.run(
        _as_postgres(
            [str(PG_BIN / "initdb"), "-D", str(base / "data"), "-U", "postgres", "-A", "trust", "-E", "UTF8"]
        ),
        check=True,
        capture_output=True,
    )
    opts = (
        f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={base} -c fsync=off "
        "-c shared_buffers=512MB -c max_wal_size=8GB -c maintenance_work_mem=256MB -c "
        "checkpoint_timeout=30min"
    )
    subprocess.run(
        _as_postgres(
            [
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(base / "data"),
                "-o",
                opts,
                "-l",
                str(base / "log"),
                "-w",
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )

    def stop():
        subprocess.run(
            _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(base / "data"), "-m", "immediate", "stop"]),
            check=False,
            capture_output=True,
        )
        shutil.rmtree(base, ignore_errors=True)

    return f"host=127.0.0.1 port={port} user=postgres dbname=postgres", stop


def db(dsn: str, name: str) -> str:
    return psycopg.conninfo.make_conninfo(dsn, dbname=name)


def migrations_dir(upto: int) -> Path:
    d = Path(tempfile.mkdtemp(prefix="opsbook-bench-m-"))
    for f in sorted((ROOT / "app" / "migrations").glob("*.yml"))[:upto]:
        shutil.copy(f, d / f.name)
    return d


def fake_uuid() -> str:
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:]}"


def seed(dsn: str, rows: int) -> None:
    t0 = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS bench_online WITH (FORCE)")
        conn.execute("DROP DATABASE IF EXISTS bench_naive WITH (FORCE)")
        conn.execute("CREATE DATABASE bench_online")
    online = db(dsn, "bench_online")
    run(online, migrations_dir(1), "expand")
    courses = [fake_uuid() for _ in range(COURSES)]
    with psycopg.connect(online, autocommit=True) as conn:
        with conn.cursor().copy("COPY courses (course_uuid, ecosystem_uuid) FROM STDIN") as cp:
            for c in courses:
                cp.write(f"{c}\t{fake_uuid()}\n")
        # Load without the indexes, then build them once (how a restore does it); same schema after.
        conn.execute(
            "ALTER TABLE course_events DROP CONSTRAINT course_events_pkey, "
            "DROP CONSTRAINT course_events_course_sequence_key, DROP CONSTRAINT "
            "course_events_course_uuid_fkey"
        )
        chunk = []
        with conn.cursor().copy(
            "COPY course_events (event_uuid, course_uuid, sequence_number, event_type, data) FROM STDIN"
        ) as cp:
            for i in range(rows):
                data = (
                    f'{{"student_uuid": "{fake_uuid()}", "exercise_uuid": "{fake_uuid()}", '
                    f'"is_correct": {"true" if i % 3 else "false"}}}'
                )
                chunk.append(
                    f"{fake_uuid()}\t{courses[i % COURSES]}\t{i // COURSES}\trecord_response\t{data}\n"
                )
                if len(chunk) == 20000:
                    cp.write("".join(chunk))
                    chunk.clear()
            cp.write("".join(chunk))
        t_copy = time.monotonic() - t0
        conn.execute(
            "ALTER TABLE course_events ADD CONSTRAINT course_events_pkey PRIMARY KEY (event_uuid), "
            "ADD CONSTRAINT course_events_course_sequence_key UNIQUE (course_uuid, sequence_number), "
            "ADD CONSTRAINT course_events_course_uuid_fkey FOREIGN KEY (course_uuid) REFERENCES courses"
        )
        conn.execute("UPDATE courses SET next_sequence_number = %s", (rows // COURSES + 1,))
        conn.execute("VACUUM ANALYZE course_events")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE DATABASE bench_naive TEMPLATE bench_online")
        size = conn.execute("SELECT pg_size_pretty(pg_database_size('bench_online'))").fetchone()[0]
    print(
        f"seeded {rows:,} course_events ({size}) in {time.monotonic() - t0:.0f}s (COPY {t_copy:.0f}s), "
        "cloned into bench_naive",
        flush=True,
    )


class Writer(threading.Thread):
    """Inserts record_response events at a steady rate, like the service would, one per transaction."""

    def __init__(self, dsn: str, rate: float, timeout_ms: int):
        super().__init__(daemon=True)
        self.dsn, self.rate, self.timeout_ms = dsn, rate, timeout_ms
        self.stop = threading.Event()
        self.latencies: list[tuple[float, float]] = []  # (t, seconds)
        self.errors: list[str] = []

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True, application_name="bench-writer") as conn:
            conn.execute(f"SET statement_timeout = {self.timeout_ms}")
            course = conn.execute("SELECT course_uuid FROM courses LIMIT 1").fetchone()[0]
            seq = 10_000_000
            t0 = next_at = time.monotonic()
            while not self.stop.is_set():
                seq += 1
                start = time.monotonic()
                try:
                    conn.execute(
                        "INSERT INTO course_events (event_uuid, course_uuid, sequence_number, event_type, "
                        "data) "
                        "VALUES (%s, %s, %s, 'record_response', %s)",
                        (uuid.uuid4(), course, seq, json.dumps({"student_uuid": str(uuid.uuid4())})),
                    )
                except psycopg.Error as e:
                    self.errors.append(type(e).__name__)
                self.latencies.append((start - t0, time.monotonic() - start))
                next_at += 1 / self.rate
                self.stop.wait(max(0.0, next_at - time.monotonic()))


def run_online(dsn: str, rate: float, timeout_ms: int) -> dict:
    writer = Writer(dsn, rate, timeout_ms)
    writer.start()
    time.sleep(1)
    result = run(
        dsn,
        migrations_dir(2),
        "expand",
        settings=Settings(max_active_sessions=20),
        progress=lambda e, d: (
            print(f"  online {e}: {d}", flush=True) if e != "batch" or d["batch"] % 100 == 0 else None
        ),
    )
    time.sleep(1)
    writer.stop.set()
    writer.join()
    with psycopg.connect(dsn) as conn:
        missing = conn.execute("SELECT count(*) FROM course_events WHERE student_uuid IS NULL").fetchone()[0]
    return figures("online (opsbook engine)", result, writer, result.backfill_rows_per_s, missing)


def run_naive(dsn: str, rate: float, timeout_ms: int) -> dict:
    writer = Writer(dsn, rate, timeout_ms)
    writer.start()
    time.sleep(1)
    result = RunResult("expand")
    t0 = time.monotonic()
    with psycopg.connect(dsn, application_name="bench-naive") as conn:
        with LockSampler(dsn, result, t0, {conn.info.backend_pid}, 0.2):
            update_s = 0.0
            with conn.transaction():
                for sql in NAIVE_SQL:
                    t = time.monotonic()
                    cur = conn.execute(sql)
                    if sql.startswith("UPDATE"):
                        update_s, updated = time.monotonic() - t, cur.rowcount
                    print(f"  naive {sql.split('(')[0][:60]}...: {time.monotonic() - t:.1f}s", flush=True)
        result.seconds = time.monotonic() - t0
    time.sleep(1)
    writer.stop.set()
    writer.join()
    with psycopg.connect(dsn) as conn:
        missing = conn.execute("SELECT count(*) FROM course_events WHERE student_uuid IS NULL").fetchone()[0]
    return figures(
        "naive (one transaction)", result, writer, updated / update_s if update_s else 0.0, missing
    )


def figures(name: str, result: RunResult, w: Writer, rows_per_s: float, missing: int) -> dict:
    lat = sorted(x for _t, x in w.latencies)
    return {
        "run": name,
        "total_s": round(result.seconds, 1),
        "writer_inserts": len(lat),
        "writer_errors": len(w.errors),
        "writer_longest_insert_s": round(lat[-1], 3) if lat else None,
        "writer_p99_insert_ms": round(lat[int(len(lat) * 0.99)] * 1000, 1) if lat else None,
        "longest_lock_wait_behind_migration_s": round(result.longest_wait_behind_migration_s, 3),
        "backfill_rows_per_s": round(rows_per_s),
        "rows_left_without_student_uuid": missing,
        "lock_retries": len(result.lock_retries),
        "throttled_s": round(sum(t.slept_s for t in result.throttles), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn", help="superuser conninfo of an existing server (default: start a local one)")
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--rate", type=float, default=100.0, help="writer inserts per second")
    ap.add_argument("--writer-timeout-ms", type=int, default=10_000, help="the writer's statement_timeout")
    args = ap.parse_args()
    stop = None
    dsn = args.dsn
    if dsn is None:
        dsn, stop = start_postgres()
    t0 = time.monotonic()
    try:
        seed(dsn, args.rows)
        out = [
            run_online(db(dsn, "bench_online"), args.rate, args.writer_timeout_ms),
            run_naive(db(dsn, "bench_naive"), args.rate, args.writer_timeout_ms),
        ]
    finally:
        if stop:
            stop()
    print(
        f"\n0002 expand on {args.rows:,} course_events, writer at {args.rate:g} inserts/s "
        f"(statement_timeout {args.writer_timeout_ms} ms); whole bench {time.monotonic() - t0:.0f}s"
    )
    keys = list(out[0])
    width = max(len(k) for k in keys)
    for k in keys:
        print(f"{k:<{width}}  " + "  ".join(f"{r[k]!s:>24}" for r in out))


if __name__ == "__main__":
    main()
