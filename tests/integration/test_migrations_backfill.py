"""Backfills: killed mid-way they resume from the checkpoint; they throttle on load."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from opsbook.core.paths import ROOT
from opsbook.engines.migrations import Settings, run

pytestmark = pytest.mark.postgres
ROWS, BATCH = 6000, 200
MIGRATION = f"""
expand:
  - add_column: {{table: events, column: student, type: uuid}}
  - backfill:
      table: events
      column: student
      expression: (data->>'student_uuid')::uuid
      where: data ? 'student_uuid'
      batch_size: {BATCH}
"""

CHILD = """
import sys
from opsbook.engines.migrations import Settings, run
run(sys.argv[1], sys.argv[2], settings=Settings(batch_pause_s=0.05, max_canary_ms=None))
"""


@pytest.fixture
def events(pg_db, tmp_path):
    with psycopg.connect(pg_db, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE events (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), data jsonb NOT NULL)"
        )
        conn.execute(
            "INSERT INTO events (data) SELECT CASE WHEN g %% 4 = 0 THEN '{}'::jsonb "
            "ELSE jsonb_build_object('student_uuid', gen_random_uuid()) END FROM generate_series(1, %s) g",
            (ROWS,),
        )
        # Audit: every UPDATE the backfill makes, per row; a replayed batch would show up twice.
        conn.execute("CREATE TABLE audit (id uuid NOT NULL)")
        conn.execute(
            "CREATE FUNCTION audit_update() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN INSERT INTO audit VALUES (NEW.id); RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE TRIGGER audit_update AFTER UPDATE ON events FOR EACH ROW EXECUTE FUNCTION audit_update()"
        )
    (tmp_path / "0001_student.yml").write_text(MIGRATION)
    return pg_db, tmp_path


def progress_row(conninfo):
    with psycopg.connect(conninfo) as conn:
        if conn.execute("SELECT to_regclass('opsbook_backfill_progress')").fetchone()[0] is None:
            return None
        return conn.execute(
            "SELECT batches, rows_scanned, last_key FROM opsbook_backfill_progress"
        ).fetchone()


def test_a_backfill_killed_mid_way_resumes_without_duplicating_or_skipping_rows(events):
    conninfo, directory = events
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, conninfo, str(directory)],
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.monotonic() + 60
        while (row := progress_row(conninfo)) is None or row[0] < 5:
            assert child.poll() is None, "the backfill ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
    time.sleep(0.3)  # the server notices the dead client and ends its backend
    killed_at = progress_row(conninfo)
    assert 5 <= killed_at[0] < ROWS // BATCH, "killed mid-way"
    with psycopg.connect(conninfo) as conn:
        done_before = conn.execute("SELECT count(*) FROM events WHERE student IS NOT NULL").fetchone()[0]
        assert 0 < done_before < ROWS
        assert (
            conn.execute("SELECT count(*) FROM opsbook_migration_steps").fetchone()[0] == 1
        )  # add_column only

    resumed = []
    result = run(
        conninfo,
        directory,
        settings=Settings(max_canary_ms=None),
        progress=lambda e, d: resumed.append(d) if e == "resume" else None,
    )
    assert resumed
    assert resumed[0]["after"] == killed_at[2]
    assert result.batches[0].batch == killed_at[0] + 1
    with psycopg.connect(conninfo) as conn:
        batches, scanned, _ = progress_row(conninfo)
        assert scanned == ROWS  # each row scanned exactly once across both runs
        assert batches == -(-ROWS // BATCH)
        per_row = conn.execute(
            "SELECT count(*), count(DISTINCT id), max(n) FROM "
            "(SELECT id, count(*) AS n FROM audit GROUP BY id) x"
        ).fetchone()
        assert per_row == (ROWS * 3 // 4, ROWS * 3 // 4, 1)  # every row with a student updated, once
        mismatched = conn.execute(
            "SELECT count(*) FROM events WHERE student IS DISTINCT FROM (data->>'student_uuid')::uuid"
        ).fetchone()[0]
        assert mismatched == 0  # same values as a full recompute
        assert conn.execute("SELECT count(*) FROM opsbook_migrations").fetchone()[0] == 1


def test_a_backfill_waits_while_the_database_is_busy(events):
    conninfo, directory = events
    busy_for = 1.5

    def busy():
        with psycopg.connect(conninfo, autocommit=True) as c:
            c.execute("SELECT pg_sleep(%s)", (busy_for,))

    th = threading.Thread(target=busy)
    th.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    result = run(
        conninfo,
        directory,
        settings=Settings(max_active_sessions=0, throttle_sleep_s=0.2, max_canary_ms=None),
    )
    th.join()
    assert result.throttles, "the busy session should have held the backfill back"
    assert all("active sessions > 0" in r for ev in result.throttles for r in ev.reasons)
    first_batch = result.batches[0].t
    assert first_batch >= busy_for - 0.2 - 0.3
    assert time.monotonic() - t0 >= busy_for - 0.3
    assert result.backfill_rows == ROWS * 3 // 4


def test_a_backfill_throttled_too_long_stops_with_its_progress_kept(events):
    conninfo, directory = events
    stop = threading.Event()

    def busy():
        with psycopg.connect(conninfo, autocommit=True) as c:
            while not stop.is_set():
                c.execute("SELECT pg_sleep(0.5)")

    th = threading.Thread(target=busy)
    th.start()
    try:
        with pytest.raises(Exception, match=r"throttled for \d+s in a row.*checkpointed"):
            run(
                conninfo,
                directory,
                settings=Settings(
                    max_active_sessions=0, throttle_sleep_s=0.1, max_throttle_wait_s=0.5, max_canary_ms=None
                ),
            )
    finally:
        stop.set()
        th.join()
