"""The online migration engine against a real Postgres: app migrations, safe forms, guards, gate."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from opsbook.core.paths import ROOT
from opsbook.engines.migrations import MigrationError, Settings, plan, run

pytestmark = pytest.mark.postgres
APP = ROOT / "app" / "migrations"
FAST = Settings(lock_timeout_ms=300, retries=2, backoff_s=0.05, backoff_max_s=0.1, max_canary_ms=None)

RAW_0001 = """
CREATE TABLE courses (
    course_uuid uuid PRIMARY KEY, ecosystem_uuid uuid NOT NULL,
    next_sequence_number integer NOT NULL DEFAULT 0, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE course_events (
    event_uuid uuid PRIMARY KEY, course_uuid uuid NOT NULL REFERENCES courses (course_uuid),
    sequence_number integer NOT NULL, event_type text NOT NULL, data jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT course_events_course_sequence_key UNIQUE (course_uuid, sequence_number));
"""
SCHEMA_SQL = """
SELECT 'col', table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable || ' '
       || coalesce(column_default, '') FROM information_schema.columns
WHERE table_schema = 'public' AND table_name IN ('courses', 'course_events')
UNION ALL
SELECT 'con', conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint
WHERE conrelid IN ('courses'::regclass, 'course_events'::regclass)
UNION ALL
SELECT 'idx', indexdef FROM pg_indexes WHERE tablename IN ('courses', 'course_events')
ORDER BY 1, 2
"""


def only_dir_for_0001():
    return only(Path(tempfile.mkdtemp(prefix="m0001-")), ["0001_course_events.yml"])


def only(tmp_path, names):
    """A migrations directory holding copies of the named app migrations."""
    for n in names:
        shutil.copy(APP / n, tmp_path / n)
    return tmp_path


def seed(conninfo, events=3000, courses=3):
    """0001 applied plus `events` rows: 2/3 record_response with a student, 1/3 without one."""
    run(conninfo, only_dir_for_0001(), "expand")
    with psycopg.connect(conninfo) as conn:
        cs = [uuid.uuid4() for _ in range(courses)]
        for c in cs:
            conn.execute(
                "INSERT INTO courses (course_uuid, ecosystem_uuid) VALUES (%s, %s)", (c, uuid.uuid4())
            )
        with conn.cursor().copy(
            "COPY course_events (event_uuid, course_uuid, sequence_number, event_type, data) FROM STDIN"
        ) as cp:
            for i in range(events):
                if i % 3:
                    kind, data = (
                        "record_response",
                        {"student_uuid": str(uuid.uuid4()), "is_correct": i % 2 == 0},
                    )
                else:
                    kind, data = "update_roster", {"students": []}
                cp.write_row((uuid.uuid4(), cs[i % courses], i, kind, json.dumps(data)))
        return cs


def test_0001_in_the_declarative_format_creates_the_same_schema_as_its_sql(pg_db, local_pg):
    run(pg_db, only_dir_for_0001(), "expand")
    other = "t_raw_" + uuid.uuid4().hex[:8]
    with psycopg.connect(local_pg, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{other}"')
    try:
        with psycopg.connect(local_pg.replace("dbname=postgres", f"dbname={other}")) as conn:
            conn.execute(RAW_0001)
            raw = conn.execute(SCHEMA_SQL).fetchall()
        with psycopg.connect(pg_db) as conn:
            declarative = conn.execute(SCHEMA_SQL).fetchall()
    finally:
        with psycopg.connect(local_pg, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{other}" WITH (FORCE)')
    assert len(raw) > 10
    assert declarative == raw


def test_app_migrations_expand_keep_both_app_versions_working_then_contract(pg_db):
    seed(pg_db)
    events = []
    result = run(
        pg_db, APP, "expand", settings=Settings(max_canary_ms=None), progress=lambda e, d: events.append(e)
    )
    assert result.applied == ["0002_course_events_student_uuid", "0003_course_events_kind"]
    assert {"migration", "step", "batch"} <= set(events)
    assert result.backfill_rows == 2000 + 3000  # student_uuid for 2/3 of the rows, kind for all
    assert len(result.batches) >= 2
    assert all(b.rows_per_s > 0 for b in result.batches)
    with psycopg.connect(pg_db) as conn:
        course = conn.execute("SELECT course_uuid FROM courses LIMIT 1").fetchone()[0]
        student = uuid.uuid4()
        # 1.0.x writes only the old shape...
        conn.execute(
            "INSERT INTO course_events (event_uuid, course_uuid, sequence_number, event_type, data) "
            "VALUES (%s, %s, 10000, 'record_response', %s)",
            (uuid.uuid4(), course, json.dumps({"student_uuid": str(student)})),
        )
        # ...1.1.0 writes kind and student_uuid, and leaves event_type out.
        conn.execute(
            "INSERT INTO course_events (event_uuid, course_uuid, sequence_number, kind, student_uuid, data) "
            "VALUES (%s, %s, 10001, 'record_response', %s, %s)",
            (uuid.uuid4(), course, student, json.dumps({"student_uuid": str(student)})),
        )
        wrong = conn.execute(
            "SELECT count(*) FROM course_events WHERE student_uuid IS DISTINCT FROM "
            "(data->>'student_uuid')::uuid "
            "OR kind IS DISTINCT FROM event_type"
        ).fetchone()[0]
        assert wrong == 0
        assert (
            conn.execute("SELECT count(*) FROM course_events WHERE student_uuid = %s", (student,)).fetchone()[
                0
            ]
            == 2
        )
        assert conn.execute(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'course_events_student_uuid_idx'::regclass"
        ).fetchone()[0]

    # The contract is refused while any host serves an older version, naming the hosts.
    with pytest.raises(
        MigrationError, match=r"app2 serves 1\.0\.3.*app3 serves 1\.0\.9.*Nothing was changed"
    ):
        run(pg_db, APP, "contract", fleet_versions={"app1": "1.1.0", "app2": "1.0.3", "app3": "1.0.9"})
    with pytest.raises(MigrationError, match="fleet unknown"):
        run(pg_db, APP, "contract")
    assert plan(pg_db, APP, "contract", {"app1": "1.0.3"}).refused["0003_course_events_kind"] == {
        "app1": "1.0.3"
    }
    with psycopg.connect(pg_db) as conn:
        assert (
            conn.execute(
                "SELECT count(*) FROM opsbook_migrations WHERE phase = 'contract' "
                "AND migration <> '0001_course_events'"
            ).fetchone()[0]
            == 0
        )

    result = run(pg_db, APP, "contract", fleet_versions={"app1": "1.1.0", "app2": "1.2.0"})
    assert result.applied == [
        "0001_course_events",
        "0002_course_events_student_uuid",
        "0003_course_events_kind",
    ]
    with psycopg.connect(pg_db) as conn:
        cols = dict(
            conn.execute(
                "SELECT column_name, is_nullable FROM information_schema.columns "
                "WHERE table_name = 'course_events'"
            ).fetchall()
        )
        assert cols["kind"] == "NO"
        assert "event_type" not in cols
        assert cols["student_uuid"] == "YES"
        cons = dict(
            conn.execute(
                "SELECT conname, convalidated FROM pg_constraint "
                "WHERE conrelid = 'course_events'::regclass AND contype = 'c'"
            ).fetchall()
        )
        assert cons == {"course_events_student_uuid_present": True}  # the NOT NULL helper check is gone
        assert (
            conn.execute(
                "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'course_events'::regclass "
                "AND NOT tgisinternal"
            ).fetchone()[0]
            == 0
        )
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(
                "INSERT INTO course_events (event_uuid, course_uuid, sequence_number, kind, data) "
                "VALUES (%s, %s, 20000, 'record_response', %s)",
                (uuid.uuid4(), course, json.dumps({"student_uuid": str(student)})),
            )
    assert run(pg_db, APP, "contract", fleet_versions={}).applied == []


def write(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    return tmp_path


def test_safe_forms_for_each_operation(pg_db, tmp_path):
    with psycopg.connect(pg_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE parent (id bigint PRIMARY KEY)")
        conn.execute("CREATE TABLE t (id bigint PRIMARY KEY, a bigint, b text, parent_id bigint)")
        conn.execute("INSERT INTO parent SELECT g FROM generate_series(1, 10) g")
        conn.execute("INSERT INTO t SELECT g, g, 'x' || g, 1 + g % 10 FROM generate_series(1, 500) g")
    write(
        tmp_path,
        "0001_forms.yml",
        """
expand:
  - add_column: {table: t, column: c, type: bigint, default: "7", not_null: true}
  - add_column: {table: t, column: d, type: bigint}
  - backfill: {table: t, column: d, expression: a * 2 + a % 1, batch_size: 64}
  - set_not_null: {table: t, column: d}
  - add_check: {table: t, name: t_a_positive, expression: a > 0}
  - add_foreign_key: {table: t, name: t_parent_fk, columns: [parent_id], references_table: parent,
                      references_columns: [id]}
  - add_unique: {table: t, name: t_b_key, columns: [b]}
  - create_index: {table: t, name: t_d_idx, columns: [d]}
contract_requires_version: "2.0"
contract:
  - drop_index: {name: t_d_idx}
  - drop_column: {table: t, column: c}
""",
    )
    with psycopg.connect(pg_db, autocommit=True) as conn:
        rel = conn.execute("SELECT relfilenode FROM pg_class WHERE relname = 't'").fetchone()[0]
    result = run(pg_db, tmp_path, "expand", settings=FAST)
    kinds = [s.kind for s in result.steps]
    assert kinds.count("validate") == 3
    assert kinds.count("index") == 2
    assert kinds.count("backfill") == 1
    assert len(result.batches) == 8  # 500 rows / 64 per batch
    with psycopg.connect(pg_db, autocommit=True) as conn:
        assert conn.execute("SELECT relfilenode FROM pg_class WHERE relname = 't'").fetchone()[0] == rel, (
            "nothing rewrote the table"
        )
        assert conn.execute("SELECT count(*) FROM t WHERE c = 7 AND d = a * 2").fetchone()[0] == 500
        cons = dict(
            conn.execute("SELECT conname, convalidated FROM pg_constraint WHERE conrelid = 't'::regclass")
        )
        assert cons == {"t_pkey": True, "t_a_positive": True, "t_parent_fk": True, "t_b_key": True}
        assert conn.execute(
            "SELECT attnotnull FROM pg_attribute WHERE attrelid = 't'::regclass AND attname = 'd'"
        ).fetchone()[0]
        assert conn.execute(
            "SELECT bool_and(indisvalid) FROM pg_index WHERE indrelid = 't'::regclass"
        ).fetchone()[0]
    run(pg_db, tmp_path, "contract", fleet_versions={"app1": "2.0.0"}, settings=FAST)
    with psycopg.connect(pg_db) as conn:
        assert conn.execute("SELECT to_regclass('t_d_idx')").fetchone()[0] is None
        cols = {
            r[0]
            for r in conn.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 't'")
        }
        assert cols == {"id", "a", "b", "parent_id", "d"}


def test_a_check_existing_rows_break_stays_not_valid_and_says_so(pg_db, tmp_path):
    with psycopg.connect(pg_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id bigint PRIMARY KEY, a bigint)")
        conn.execute("INSERT INTO t VALUES (1, 1), (2, -1)")
    write(tmp_path, "0001_chk.yml", "expand:\n  - add_check: {table: t, name: t_a_pos, expression: a > 0}\n")
    with pytest.raises(MigrationError, match=r"(?s)existing rows break.*t_a_pos stays in place NOT VALID"):
        run(pg_db, tmp_path, "expand", settings=FAST)
    with psycopg.connect(pg_db, autocommit=True) as conn:
        assert conn.execute(
            "SELECT convalidated FROM pg_constraint WHERE conname = 't_a_pos'"
        ).fetchone() == (False,)
        conn.execute("UPDATE t SET a = 2 WHERE id = 2")
    run(pg_db, tmp_path, "expand", settings=FAST)
    with psycopg.connect(pg_db, autocommit=True) as conn:
        assert conn.execute(
            "SELECT convalidated FROM pg_constraint WHERE conname = 't_a_pos'"
        ).fetchone() == (True,)


def test_an_invalid_index_left_by_a_failed_build_is_dropped_and_rebuilt(pg_db, tmp_path):
    with psycopg.connect(pg_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id bigint PRIMARY KEY, a bigint)")
        conn.execute("INSERT INTO t VALUES (1, 1), (2, 1)")
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("CREATE UNIQUE INDEX CONCURRENTLY t_a_idx ON t (a)")
        assert conn.execute(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 't_a_idx'::regclass"
        ).fetchone() == (False,)
    events = []
    write(tmp_path, "0001_idx.yml", "expand:\n  - create_index: {table: t, name: t_a_idx, columns: [a]}\n")
    run(pg_db, tmp_path, "expand", settings=FAST, progress=lambda e, d: events.append((e, d)))
    assert ("drop_invalid_index", {"index": "t_a_idx"}) in events
    with psycopg.connect(pg_db) as conn:
        assert conn.execute(
            "SELECT indisvalid, indisunique FROM pg_index WHERE indexrelid = 't_a_idx'::regclass"
        ).fetchone() == (True, False)


@pytest.fixture
def table_t(pg_db):
    with psycopg.connect(pg_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id bigint PRIMARY KEY, a bigint)")
        conn.execute("INSERT INTO t SELECT g, g FROM generate_series(1, 100) g")
    return pg_db


@pytest.mark.parametrize(
    ("op", "leftover_sql"),
    [
        pytest.param(
            "add_column: {table: t, column: b, type: bigint}",
            "SELECT count(*) FROM pg_attribute WHERE attrelid = 't'::regclass AND attname = 'b'",
            id="add_column",
        ),
        pytest.param(
            "add_check: {table: t, name: t_a_pos, expression: a > 0}",
            "SELECT count(*) FROM pg_constraint WHERE conname = 't_a_pos'",
            id="add_check",
        ),
        pytest.param(
            "create_index: {table: t, name: t_a_idx, columns: [a]}",
            "SELECT count(*) FROM pg_class WHERE relname = 't_a_idx'",
            id="create_index",
        ),
    ],
)
def test_a_lock_that_cannot_be_had_stops_cleanly_and_names_the_holder(table_t, tmp_path, op, leftover_sql):
    write(tmp_path, "0001_x.yml", f"expand:\n  - {op}\n")
    holder = psycopg.connect(table_t, application_name="long-writer")
    try:
        holder.execute("INSERT INTO t VALUES (1000, 1)")  # an open write transaction on t
        holder_pid = holder.info.backend_pid
        time.sleep(0.4)  # older than lock_timeout: CREATE INDEX CONCURRENTLY would wait on it
        t0 = time.monotonic()
        with pytest.raises(MigrationError) as err:
            run(table_t, tmp_path, "expand", settings=FAST)
        took = time.monotonic() - t0
    finally:
        holder.close()
    msg = str(err.value)
    assert "could not get the lock" in msg
    assert "3 attempts" in msg
    assert f"pid {holder_pid}" in msg
    assert "long-writer" in msg
    assert "Nothing of 0001_x expand had been applied" in msg
    assert took < 5
    assert len(err.value.result.lock_retries) == 2
    with psycopg.connect(table_t) as conn:
        assert (
            conn.execute(leftover_sql).fetchone()[0] == 0
        )  # no column, no NOT VALID constraint, no invalid index
        assert conn.execute("SELECT count(*) FROM opsbook_migration_steps").fetchone()[0] == 0
    run(table_t, tmp_path, "expand", settings=FAST)  # once the holder is gone it goes through
    with psycopg.connect(table_t) as conn:
        assert conn.execute(leftover_sql).fetchone()[0] == 1


def test_refuses_to_start_while_a_session_idles_in_transaction(table_t, tmp_path):
    write(tmp_path, "0001_x.yml", "expand:\n  - add_column: {table: t, column: b, type: bigint}\n")
    idler = psycopg.connect(table_t, application_name="forgotten-console")
    try:
        idler.execute("SELECT count(*) FROM t")  # opens a transaction and leaves it idle
        idler_pid = idler.info.backend_pid
        time.sleep(0.6)
        settings = Settings(max_idle_in_transaction_s=0.5)
        with pytest.raises(MigrationError) as err:
            run(table_t, tmp_path, "expand", settings=settings)
    finally:
        idler.close()
    msg = str(err.value)
    assert f"pid {idler_pid} user postgres (forgotten-console) idle in transaction" in msg
    assert "SELECT count(*) FROM t" in msg
    assert "Nothing was changed" in msg
    with psycopg.connect(table_t) as conn:
        assert (
            conn.execute(
                "SELECT count(*) FROM pg_attribute WHERE attrelid = 't'::regclass AND attname = 'b'"
            ).fetchone()[0]
            == 0
        )


def test_measures_the_sessions_that_queue_behind_the_migration(table_t, tmp_path):
    """A long reader holds t; the migration's ALTER waits for it; a writer queues behind the ALTER."""
    write(tmp_path, "0001_x.yml", "expand:\n  - add_column: {table: t, column: b, type: bigint}\n")
    reader = psycopg.connect(table_t)
    reader.execute("SELECT count(*) FROM t")
    writer_seconds = []

    def late_writer():
        time.sleep(0.3)  # the ALTER is waiting by now
        t0 = time.monotonic()
        with psycopg.connect(table_t, autocommit=True) as w:
            w.execute("INSERT INTO t (id, a) VALUES (5000, 1)")
        writer_seconds.append(time.monotonic() - t0)

    def end_reader():
        time.sleep(1.5)
        reader.rollback()

    threads = [threading.Thread(target=late_writer), threading.Thread(target=end_reader)]
    for th in threads:
        th.start()
    result = run(table_t, tmp_path, "expand", settings=Settings(lock_timeout_ms=5000, sample_interval_s=0.05))
    for th in threads:
        th.join()
    reader.close()
    assert writer_seconds[0] > 0.8
    assert max(s.waiting_behind_migration for s in result.lock_samples) == 1
    assert 0.6 < result.longest_wait_behind_migration_s <= writer_seconds[0] + 0.1
    assert result.summary()["longest_wait_behind_migration_s"] > 0.6


WATCH_BUILD_SQL = """
SELECT p.phase, a.wait_event_type, a.wait_event, pg_blocking_pids(p.pid), i.indisready, i.indisvalid
FROM pg_stat_progress_create_index p
JOIN pg_stat_activity a USING (pid)
JOIN pg_index i ON i.indexrelid = p.index_relid
WHERE p.relid = 't'::regclass AND p.command = 'CREATE INDEX CONCURRENTLY'
"""


@pytest.mark.parametrize(
    ("holder_sql", "build_phase", "holder_blocks_the_drop"),
    [
        # A writer on t: the build waits for it before building; so does DROP INDEX CONCURRENTLY.
        pytest.param(
            ("INSERT INTO t VALUES (1000, 1)",), "waiting for writers before build", True, id="writer_on_t"
        ),
        # A snapshot and no lock on t: the build waits for it after building, before marking the index
        # valid; DROP INDEX CONCURRENTLY does not wait for it.
        pytest.param(
            ("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", "SELECT 1"),
            "waiting for old snapshots",
            False,
            id="old_snapshot",
        ),
    ],
)
def test_a_lock_timeout_in_the_middle_of_create_index_concurrently_leaves_no_invalid_index(
    table_t, tmp_path, holder_sql, build_phase, holder_blocks_the_drop
):
    """The holder opens its transaction as the engine announces the step, so the engine's pre-check
    (which refuses only lock holders older than lock_timeout) lets the build start: CREATE INDEX
    CONCURRENTLY commits its INVALID catalog entry, waits for the holder's virtualxid, and its
    lock_timeout fires in the middle of the build. A watcher sees that happen."""
    write(tmp_path, "0001_x.yml", "expand:\n  - create_index: {table: t, name: t_a_idx, columns: [a]}\n")
    holder = psycopg.connect(table_t, application_name="late-holder")
    holder_pid = holder.info.backend_pid
    seen, events, timers = [], [], []
    stop = threading.Event()

    def watch():
        with psycopg.connect(table_t, autocommit=True) as w:
            while not stop.is_set():
                seen.extend(w.execute(WATCH_BUILD_SQL).fetchall())
                stop.wait(0.01)

    def progress(event, data):
        events.append((event, data))
        if event == "step":  # just before the build: the holder's transaction is younger than lock_timeout
            for sql in holder_sql:
                holder.execute(sql)
        if event == "drop_invalid_index" and "wait_up_to_s" in data and holder_blocks_the_drop:
            # The engine gave up and drops the invalid index, waiting for the holder: it ends after
            # twice lock_timeout, so a drop that waited only lock_timeout would leave the index.
            timers.append(threading.Timer(2 * FAST.lock_timeout_ms / 1000, holder.rollback))
            timers[-1].start()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with pytest.raises(MigrationError) as err:
            run(table_t, tmp_path, "expand", settings=FAST, progress=progress)
        with psycopg.connect(table_t) as conn:
            left = conn.execute(
                "SELECT c.relname, i.indisvalid FROM pg_class c LEFT JOIN pg_index i ON i.indexrelid = c.oid "
                "WHERE c.relname = 't_a_idx' OR i.indrelid = 't'::regclass AND NOT i.indisvalid"
            ).fetchall()
            holder_open = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND xact_start IS NOT NULL", (holder_pid,)
            ).fetchone()[0]
    finally:
        stop.set()
        watcher.join()
        for timer in timers:
            timer.join()
        holder.close()
    # The build itself was started and timed out in the middle (not refused before it started).
    ready = build_phase != "waiting for writers before build"  # the build fills the index before validating
    assert (build_phase, "Lock", "virtualxid", [holder_pid], ready, False) in seen
    assert events[[e for e, _ in events].index("retry")][1]["error"] == "canceling statement due to lock timeout"
    # After the failure no index of the step is left, valid or invalid, and nothing is recorded.
    assert left == []
    assert holder_open == (0 if holder_blocks_the_drop else 1)  # the snapshot holder did not need to end
    msg = str(err.value)
    assert f"pid {holder_pid}" in msg
    assert "late-holder" in msg
    assert "Nothing of 0001_x expand had been applied" in msg
    with psycopg.connect(table_t) as conn:
        assert conn.execute("SELECT count(*) FROM opsbook_migration_steps").fetchone()[0] == 0
    run(table_t, tmp_path, "expand", settings=FAST)  # once the holder is gone the index is built
    with psycopg.connect(table_t) as conn:
        assert conn.execute(
            "SELECT indisvalid, indisready FROM pg_index WHERE indexrelid = 't_a_idx'::regclass"
        ).fetchone() == (True, True)
