"""The snapshot manifest against a real Postgres with the app's schema: a manifest taken again
agrees with itself; each kind of change (tampered, deleted and added rows, a moved sequence, a
changed column type) is reported in words; chunks read in parallel see one snapshot."""

from __future__ import annotations

import json
import threading

import psycopg
import pytest

from opsbook.engines.snapshots import manifest
from tests.fixtures.biglearn import apply_app_schema, load_course_events

pytestmark = pytest.mark.postgres
CHUNK = 500


@pytest.fixture
def app_db(pg_db):
    apply_app_schema(pg_db)
    load_course_events(pg_db, 3000, courses=7, students=50)
    with psycopg.connect(pg_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE audit_notes (id bigserial PRIMARY KEY, note text)")
        conn.execute("INSERT INTO audit_notes (note) SELECT 'note ' || g FROM generate_series(1, 40) g")
    return pg_db


def take(conninfo, like=None, **kw):
    return manifest.take(conninfo, chunk_rows=CHUNK, workers=2, slice_mb=1, like=like, **kw)


def test_a_manifest_is_json_data_that_agrees_with_itself(app_db):
    first = take(app_db)
    assert json.loads(json.dumps(first)) == first
    assert first["version"] == manifest.VERSION
    events = first["tables"]["public.course_events"]
    assert events["rows"] == 3000
    assert events["key"] == ["event_uuid"]
    assert [c["rows"] for c in events["chunks"]] == [CHUNK] * 6
    assert events["blocks"] > 128  # more than one slice of 1 MB: the slices' sums add up
    assert first["tables"]["public.courses"]["rows"] == 7
    assert first["sequences"]["public.audit_notes_id_seq"]["last_value"] == 40
    assert "column public.course_events.kind" in first["schema"]["objects"]
    assert not any("event_type" in k for k in first["schema"]["objects"])  # 0003's contract dropped it
    again = take(app_db, like=first)
    assert manifest.compare(first, again) == []


def test_the_schema_hash_has_no_oids_and_survives_a_copy(app_db, local_pg):
    """A database made again from the same migrations (other OIDs) hashes the same schema."""
    first = take(app_db)
    other = app_db.rsplit("dbname=", 1)[0] + "dbname=postgres"
    name = "copy_" + app_db.rsplit("dbname=", 1)[1]
    with psycopg.connect(other, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        dsn = app_db.rsplit("dbname=", 1)[0] + f"dbname={name}"
        apply_app_schema(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE audit_notes (id bigserial PRIMARY KEY, note text)")
        fresh = take(dsn)
        assert fresh["schema"]["hash"] == first["schema"]["hash"]
    finally:
        with psycopg.connect(other, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def change(conninfo, *statements):
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for s in statements:
            conn.execute(s)


def middle_event(conninfo):
    with psycopg.connect(conninfo) as conn:
        q = "SELECT event_uuid FROM course_events ORDER BY event_uuid OFFSET 1700 LIMIT 1"
        return conn.execute(q).fetchone()[0]


@pytest.mark.parametrize("what", ["tampered", "deleted", "added"])
def test_a_changed_row_is_one_located_difference(app_db, what):
    before = take(app_db)
    ev = middle_event(app_db)
    if what == "tampered":  # one boolean inside one event's jsonb flips
        change(app_db, "UPDATE course_events SET data = jsonb_set(data, '{is_correct}', "
                       f"to_jsonb(NOT (data->>'is_correct')::boolean)) WHERE event_uuid = '{ev}'")
    elif what == "deleted":
        change(app_db, f"DELETE FROM course_events WHERE event_uuid = '{ev}'")
    else:
        change(app_db, "INSERT INTO course_events (event_uuid, course_uuid, sequence_number, kind, data, "
                       "student_uuid) SELECT gen_random_uuid(), course_uuid, 99999, kind, data, student_uuid "
                       "FROM course_events LIMIT 1")
    after = take(app_db, like=before)
    diffs = manifest.compare(before, after)
    chunk_diffs = [d for d in diffs if "rows with event_uuid" in d]
    assert len(chunk_diffs) == 1, diffs
    if what == "tampered":
        assert "same count (500), different contents" in chunk_diffs[0]
        assert diffs == chunk_diffs
    else:
        n = 2999 if what == "deleted" else 3001
        assert f"table public.course_events: 3000 rows expected, {n} found" in diffs


def test_two_rows_swapping_a_value_is_a_difference(app_db):
    """Column hashes combine linearly inside hash_record_extended; the manifest re-mixes each row's."""
    before = take(app_db)
    change(app_db, """
        WITH two AS (SELECT event_uuid, data FROM course_events ORDER BY event_uuid LIMIT 2),
             swapped AS (SELECT a.event_uuid, b.data FROM two a JOIN two b ON a.event_uuid <> b.event_uuid)
        UPDATE course_events c SET data = s.data FROM swapped s WHERE c.event_uuid = s.event_uuid""")
    diffs = manifest.compare(before, take(app_db, like=before))
    assert len(diffs) == 1
    assert "from the start up to" in diffs[0]
    assert "same count (500), different contents" in diffs[0]


def test_a_composite_key_locates_its_chunk(app_db):
    change(app_db, "CREATE TABLE pairs (course int, seq int, v text, PRIMARY KEY (course, seq))",
           "INSERT INTO pairs SELECT g % 3, g, 'v' || g FROM generate_series(1, 1200) g")
    before = take(app_db)
    assert before["tables"]["public.pairs"]["boundaries"] == [["1", "301"], ["2", "602"]]
    change(app_db, "UPDATE pairs SET v = 'changed' WHERE course = 1 AND seq = 700")
    diffs = manifest.compare(before, take(app_db, like=before))
    assert len(diffs) == 1
    assert diffs == ["table public.pairs: rows with course, seq from (1, 301) up to (2, 602) excluded differ "
                     "(same count (500), different contents)"]


def test_a_table_whose_types_have_no_hash_function_is_hashed_as_text(app_db):
    change(app_db, "CREATE TABLE shapes (id int PRIMARY KEY, doc json, at point)",
           "INSERT INTO shapes SELECT g, json_build_object('g', g), point(g, g) FROM generate_series(1, 100) g")
    before = take(app_db)
    assert before["tables"]["public.shapes"]["hash"] == "hashtextextended(t::text, 0)"
    assert before["tables"]["public.course_events"]["hash"].startswith("hashint8extended(hash_record_extended")
    change(app_db, "UPDATE shapes SET at = point(0, 0) WHERE id = 42")
    assert manifest.compare(before, take(app_db, like=before)) == [
        "table public.shapes: rows with id from the start up to the end differ (same count (100), different "
        "contents)"]


def test_a_table_without_a_primary_key_is_one_chunk(app_db):
    change(app_db, "CREATE TABLE loose (v text)", "INSERT INTO loose SELECT 'v' || g FROM generate_series(1, 900) g")
    before = take(app_db)
    assert before["tables"]["public.loose"]["rows"] == 900
    change(app_db, "UPDATE loose SET v = 'w' WHERE v = 'v7'")
    assert manifest.compare(before, take(app_db, like=before)) == [
        "table public.loose: rows with (no primary key: the whole table) from the start up to the end differ "
        "(same count (900), different contents)"]


def test_a_moved_sequence_is_a_difference_but_wal_log_ahead_is_not(app_db):
    before = take(app_db)
    change(app_db, "SELECT setval('audit_notes_id_seq', 60)")  # within the 32 values a restore may skip ahead
    assert manifest.compare(before, take(app_db, like=before)) == []
    change(app_db, "SELECT setval('audit_notes_id_seq', 10)")
    diffs = manifest.compare(before, take(app_db, like=before))
    assert diffs == ["sequence public.audit_notes_id_seq: last value 40 expected, 10 found (a restore may be "
                     "at most 32 values ahead, never behind)"]


def test_a_changed_column_type_is_named(app_db):
    before = take(app_db)
    change(app_db, "ALTER TABLE courses ALTER COLUMN next_sequence_number TYPE bigint")
    diffs = manifest.compare(before, take(app_db, like=before))
    assert diffs == ["schema differs: column public.courses.next_sequence_number: expected 3 integer not null "
                     "default 0, found 3 bigint not null default 0"]


def test_every_reader_sees_the_one_snapshot(app_db):
    """Rows committed while the manifest is read are not in it: the readers share one snapshot."""
    started = threading.Event()

    def progress(msg):
        if not started.is_set():
            started.set()
            change(app_db, "DELETE FROM course_events WHERE event_uuid IN "
                           "(SELECT event_uuid FROM course_events ORDER BY event_uuid DESC LIMIT 100)")

    m = manifest.take(app_db, chunk_rows=100, workers=2, progress=progress)
    assert started.is_set()
    assert m["tables"]["public.course_events"]["rows"] == 3000


def test_an_unknown_manifest_version_is_refused_in_words(app_db):
    m = take(app_db)
    diffs = manifest.compare({**m, "version": 99}, m)
    assert diffs
    assert "version 99" in diffs[0]
