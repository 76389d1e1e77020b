"""Masking a clone of a database with the app's real schema (plus a table of names and e-mails that
bl-api does not have, to exercise the fake rules): deterministic, joins still match, batched with
progress, refused before any change when a column is undecided, and verified by a scan that finds
every source value left in the clone."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import threading
import time
import uuid

import psycopg
import pytest

from opsbook.core.paths import APP
from opsbook.engines import masking
from tests.fixtures.biglearn import apply_app_schema, load_course_events

pytestmark = pytest.mark.postgres
SECRET = b"s" * 32
LEARNERS_RULES = """  learners:
    id: {keep: "a surrogate key"}
    full_name: fake_name
    email: fake_email
    phone: "null"
    student_uuid: hash
    badge: hash
"""


@pytest.fixture
def rules(tmp_path):
    path = tmp_path / "masking.yml"
    path.write_text((APP / "masking.yml").read_text() + LEARNERS_RULES)
    return masking.load(path)


@pytest.fixture
def source(pg_db):
    apply_app_schema(pg_db)
    load_course_events(pg_db, 2000, courses=4, students=60)
    with psycopg.connect(pg_db, autocommit=True) as conn:
        students = [r[0] for r in conn.execute("SELECT DISTINCT student_uuid::text FROM course_events "
                                               "ORDER BY 1 LIMIT 5").fetchall()]
        conn.execute("INSERT INTO course_events (event_uuid, course_uuid, sequence_number, kind, data) "
                     "SELECT gen_random_uuid(), course_uuid, 100000, 'update_roster', %s FROM courses LIMIT 1",
                     (json.dumps({"students": students}),))
        conn.execute("CREATE TABLE learners (id bigserial PRIMARY KEY, full_name text, email text UNIQUE, "
                     "phone text, student_uuid uuid, badge varchar(10))")
        conn.execute("INSERT INTO learners (full_name, email, phone, student_uuid, badge) "
                     "SELECT 'Learner ' || (g % 20), 'learner' || g || '@school.example', '555-' || g, "
                     "md5('student' || (g::bigint * 7919 % 60))::uuid, 'B-' || g FROM generate_series(1, 300) g")
        conn.execute("UPDATE learners SET full_name = NULL, email = NULL WHERE id = 7")
    return pg_db


def clone_of(source):
    """CREATE DATABASE ... TEMPLATE: a copy of the source to mask (dropped by the caller's cleanup)."""
    base, name = source.rsplit("dbname=", 1)
    new = f"{name}_c{uuid.uuid4().hex[:6]}"
    with psycopg.connect(base + "dbname=postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{new}" TEMPLATE "{name}"')
    return base + f"dbname={new}"


@pytest.fixture
def clones(source):
    made = []

    def make():
        made.append(clone_of(source))
        return made[-1]

    yield make
    base = source.rsplit("dbname=", 1)[0]
    with psycopg.connect(base + "dbname=postgres", autocommit=True) as conn:
        for dsn in made:
            conn.execute(f'DROP DATABASE IF EXISTS "{dsn.rsplit("dbname=", 1)[1]}" WITH (FORCE)')


def rows(dsn, q):
    with psycopg.connect(dsn) as conn:
        return conn.execute(q).fetchall()


def expected_hash(value: str) -> str:
    return str(uuid.UUID(hmac.new(SECRET, value.encode(), hashlib.sha256).hexdigest()[:32]))


def test_a_masked_clone_keeps_no_source_value_and_joins_still_match(source, clones, rules):
    clone = clones()
    said = []
    result = masking.apply(clone, rules, SECRET, batch_size=700, workers=1, progress=said.append)
    assert result.tables == {"course_events": 2001, "learners": 300}
    assert result.batches == 3 + 1  # 2001 events in batches of 700, 300 learners in one
    assert "course_events: 1,400/2,001 rows masked" in said

    assert masking.verify(source, clone, rules) == []

    # the column and the copy inside data hash alike, as the HMAC computed here says
    pairs = rows(clone, "SELECT student_uuid::text, data->>'student_uuid' FROM course_events "
                        "WHERE kind = 'record_response'")
    assert all(a == b for a, b in pairs)
    src = dict(rows(source, "SELECT event_uuid::text, student_uuid::text FROM course_events "
                            "WHERE kind = 'record_response'"))
    dst = dict(rows(clone, "SELECT event_uuid::text, student_uuid::text FROM course_events "
                           "WHERE kind = 'record_response'"))
    assert all(dst[e] == expected_hash(s) for e, s in src.items())
    assert len(set(dst.values())) == len(set(src.values())) == 60
    # a learner's hashed id in another table joins to their events
    assert rows(clone, "SELECT count(*) FROM learners l JOIN course_events e USING (student_uuid)")[0][0] > 0
    # the roster's list of student ids is hashed element by element
    roster = rows(clone, "SELECT data->'students' FROM course_events WHERE kind = 'update_roster'")[0][0]
    src_roster = rows(source, "SELECT data->'students' FROM course_events WHERE kind = 'update_roster'")[0][0]
    assert roster == [expected_hash(s) for s in src_roster]
    # a hashed varchar(10) keeps its length limit
    assert rows(clone, "SELECT max(length(badge)), count(DISTINCT badge) FROM learners")[0] == (10, 300)
    # what is kept is kept; the extension masking needed is gone again
    assert rows(clone, "SELECT count(*) FROM course_events WHERE data->>'exercise_uuid' IS NULL")[0][0] == 1
    assert rows(clone, "SELECT count(*) FROM pg_extension WHERE extname = 'pgcrypto'")[0][0] == 0


def test_fake_names_and_emails_are_deterministic_and_nulls_stay(source, clones, rules):
    one, two = clones(), clones()
    masking.apply(one, rules, SECRET, batch_size=128, workers=2)  # each table's keys in two ranges at once
    masking.apply(two, rules, SECRET, batch_size=1000, workers=1)
    q = "SELECT id, full_name, email, phone, student_uuid FROM learners ORDER BY id"
    a, b = rows(one, q), rows(two, q)
    assert a == b  # same secret, same values, whatever the batches and workers
    assert masking.verify(source, one, rules) == []
    assert rows(one, "SELECT event_uuid, student_uuid, data FROM course_events ORDER BY 1") == \
        rows(two, "SELECT event_uuid, student_uuid, data FROM course_events ORDER BY 1")
    src = rows(source, q)
    by_name: dict[str, set[str]] = {}
    for (_, s_name, _, _, _), (_, name, email, phone, _) in zip(src, a, strict=True):
        assert phone is None
        if s_name is None:
            assert (name, email) == (None, None)
            continue
        assert name != s_name
        assert email.endswith("@example.org")
        by_name.setdefault(s_name, set()).add(name)
    assert all(len(v) == 1 for v in by_name.values())  # one person, one fake name
    assert len({r[2] for r in a if r[2]}) == 299  # e-mails stay unique
    other = clones()
    masking.apply(other, rules, b"t" * 32)
    assert rows(other, q) != a  # another refresh's secret gives other values


def test_verify_finds_every_value_left_behind(source, clones, rules):
    clone = clones()
    leaks = masking.verify(source, clone, rules)  # nothing masked yet
    where = {leak.where: leak.count for leak in leaks}
    assert where["course_events.student_uuid"] == 2000
    assert where["course_events.data (jsonb strings)"] == 2000 + 5
    assert where["learners.full_name"] == 299
    masking.apply(clone, rules, SECRET)
    with psycopg.connect(clone, autocommit=True) as conn:  # one value copied back under another key
        conn.execute("UPDATE course_events SET data = data || jsonb_build_object('note', "
                     "(SELECT email FROM learners WHERE id = 3)) WHERE sequence_number = 1")
        conn.execute("UPDATE learners SET email = %s WHERE id = 3",
                     (rows(source, "SELECT email FROM learners WHERE id = 3")[0][0],))
    leaks = masking.verify(source, clone, rules)
    assert [str(leak) for leak in leaks] == [
        "learners.email: 1 value(s) from the source's masked columns, e.g. learner3@school.example"]


def test_an_undecided_column_is_refused_before_anything_changes(source, clones, rules):
    clone = clones()
    with psycopg.connect(clone, autocommit=True) as conn:
        conn.execute("ALTER TABLE course_events ADD COLUMN nickname text")
        conn.execute("ALTER TABLE learners ADD COLUMN address text")
    before = rows(clone, "SELECT student_uuid FROM course_events ORDER BY event_uuid LIMIT 5")
    with pytest.raises(masking.MaskingError) as e:
        masking.apply(clone, rules, SECRET)
    assert "columns in the database with no decision in the masking file: course_events.nickname, " \
           "learners.address" in str(e.value)
    assert "Nothing was changed" in str(e.value)
    assert rows(clone, "SELECT student_uuid FROM course_events ORDER BY event_uuid LIMIT 5") == before


def test_a_rule_the_column_type_cannot_take_is_refused_before_anything_changes(source, clones, tmp_path):
    path = tmp_path / "masking.yml"
    path.write_text((APP / "masking.yml").read_text().replace(
        'next_sequence_number: {keep: "a counter of the course\'s events"}', "next_sequence_number: hash")
        + LEARNERS_RULES)
    clone = clones()
    with pytest.raises(masking.MaskingError) as e:
        masking.apply(clone, masking.load(path), SECRET)
    assert "hash and fake rules need a uuid or text column, these are not: courses.next_sequence_number " \
           "(integer)" in str(e.value)
    assert masking.verify(source, clone, masking.load(path))  # nothing was masked


def test_a_database_before_0002_masks_the_ids_it_has(pg_db, tmp_path):
    """Production may run an older schema than this checkout: no student_uuid column yet, event_type
    instead of kind. What it has is masked; what it lacks needs nothing."""
    import shutil

    from opsbook.engines.migrations import run

    only_0001 = tmp_path / "migrations"
    only_0001.mkdir()
    shutil.copy(APP / "migrations" / "0001_course_events.yml", only_0001)
    run(pg_db, only_0001, "expand")
    student = str(uuid.uuid4())
    with psycopg.connect(pg_db, autocommit=True) as conn:
        conn.execute("INSERT INTO courses (course_uuid, ecosystem_uuid) VALUES (gen_random_uuid(), gen_random_uuid())")
        conn.execute("INSERT INTO course_events (event_uuid, course_uuid, sequence_number, event_type, data) "
                     "SELECT gen_random_uuid(), course_uuid, g, 'record_response', jsonb_build_object('student_uuid', "
                     "%s::text) FROM courses, generate_series(1, 30) g", (student,))
    rules = masking.load(APP / "masking.yml")
    clone = clone_of(pg_db)
    try:
        result = masking.apply(clone, rules, SECRET)
        assert result.tables == {"course_events": 30}
        assert masking.verify(pg_db, clone, rules) == []
        assert rows(clone, "SELECT DISTINCT data->>'student_uuid' FROM course_events") == [(expected_hash(student),)]
    finally:
        base = pg_db.rsplit("dbname=", 1)[0]
        with psycopg.connect(base + "dbname=postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{clone.rsplit("dbname=", 1)[1]}" WITH (FORCE)')


def test_the_wrong_database_is_refused(local_pg):
    with pytest.raises(masking.MaskingError) as e:
        masking.apply(local_pg, masking.load(APP / "masking.yml"), SECRET)
    assert "tables with masked columns the database does not have (is it the service's database?): " \
           "course_events" in str(e.value)


def test_a_short_secret_is_refused(source, clones, rules):
    with pytest.raises(masking.MaskingError, match="at least 16 random bytes"):
        masking.apply(clones(), rules, b"short")


def test_ctrl_c_stops_every_worker_after_its_batch(source, clones, rules):
    """An operator's Ctrl-C while a table is masked in several ranges at once: apply ends at once with
    the interrupt, each worker after the batch it was in, not after its whole range."""
    clone = clones()
    said: list[str] = []

    def progress(message: str) -> None:
        said.append(message)
        if len(said) == 1:   # after the first batch committed: the operator presses Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        masking.apply(clone, rules, SECRET, batch_size=5, workers=2, progress=progress)
    assert time.monotonic() - started < 20
    assert not [t for t in threading.enumerate() if t.name.startswith("ThreadPoolExecutor")]
    after = len(said)
    time.sleep(0.5)
    assert len(said) == after   # nothing masks on behind the operator's back
    total = rows(clone, "SELECT count(*) FROM course_events")[0][0]
    assert not any(m.startswith("course_events: ") and m.endswith(f"{total:,}/{total:,} rows masked") for m in said)
    assert sum(1 for m in said if m.startswith("course_events: ")) < total // 5 // 4, said[-3:]
