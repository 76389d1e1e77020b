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
    assert result.batches == 3 + 1  # 2001 events in batches of about 700 (in blocks), 300 learners in one
    counts = [m for m in said if m.startswith("course_events: ") and m.endswith(" rows masked")]
    assert len(counts) == 3, counts
    assert counts[-1] == "course_events: 2,001/2,001 rows masked"
    assert "course_events: 3 index(es) built again" in " ".join(said)

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
    # finished: the database no longer says a masking began on it
    assert rows(clone, "SELECT count(*) FROM pg_db_role_setting")[0][0] == 0


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


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_stops_every_worker_after_its_batch(source, clones, rules, signum):
    """An operator's Ctrl-C (or a SIGTERM) while a table is masked by several workers at once: apply
    ends at once with the interrupt, each worker after the batch it was in, not after the table."""
    clone = clones()
    said: list[str] = []

    def progress(message: str) -> None:
        said.append(message)
        if message.endswith("rows masked") and sum(m.endswith("rows masked") for m in said) == 1:
            os.kill(os.getpid(), signum)   # after the first batch committed: the operator presses Ctrl-C

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        masking.apply(clone, rules, SECRET, batch_size=5, workers=2, progress=progress)
    assert time.monotonic() - started < 20
    assert not [t for t in threading.enumerate() if t.name.startswith("ThreadPoolExecutor")]
    after = len(said)
    time.sleep(0.5)
    assert len(said) == after   # nothing masks on behind the operator's back
    total = rows(clone, "SELECT count(*) FROM course_events")[0][0]
    counts = [m for m in said if m.startswith("course_events: ") and m.endswith("rows masked")]
    assert counts
    assert not any(m.endswith(f"{total:,}/{total:,} rows masked") for m in counts)
    assert len(counts) < total // 5 // 4, said[-3:]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # apply's handler is gone again
    with psycopg.connect(clone, autocommit=True) as conn:   # no worker still runs a statement
        assert conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'opsbook-masking' "
                            "AND state = 'active'").fetchone()[0] == 0
    # masking the half-masked clone again would hash the hashes: refused, nothing changed
    before = rows(clone, "SELECT event_uuid, student_uuid, data FROM course_events ORDER BY 1")
    with pytest.raises(masking.MaskingError, match="an earlier masking of this database began"):
        masking.apply(clone, rules, SECRET)
    assert rows(clone, "SELECT event_uuid, student_uuid, data FROM course_events ORDER BY 1") == before


def test_an_interrupt_while_indexes_are_built_again_cancels_the_builds(source, clones, rules):
    """The indexes dropped while a table is masked are built again after it, each one statement: an
    interrupt cancels the builds in flight instead of waiting for them."""
    clone = clones()
    with psycopg.connect(clone, autocommit=True) as conn:   # an index that takes 0.05 s a row to build (15 s)
        conn.execute("CREATE FUNCTION slow_id(x uuid) RETURNS uuid IMMUTABLE LANGUAGE plpgsql AS "
                     "'BEGIN PERFORM pg_sleep(0.05); RETURN x; END'")
        conn.execute("CREATE INDEX learners_slow_idx ON learners (slow_id(student_uuid))")
    said: list[str] = []

    def progress(message: str) -> None:
        said.append(message)
        if message == "learners: 300/300 rows masked":
            threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        masking.apply(clone, rules, SECRET, progress=progress)
    assert time.monotonic() - started < 10, said
    assert "learners: 3 index(es) dropped while it is masked, built again after it: learners_email_key, " \
           "learners_pkey, learners_slow_idx" in said
    with psycopg.connect(clone, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'opsbook-masking' "
                            "AND state = 'active'").fetchone()[0] == 0


def _free_space_ahead(clone: str) -> None:
    """Delete every other event in the second half of the heap and vacuum: the free space map then
    offers those blocks, so an update in the first half writes its new row version ahead, into a block
    a later batch reads."""
    with psycopg.connect(clone, autocommit=True) as conn:
        blocks = conn.execute("SELECT pg_relation_size('course_events') / 8192").fetchone()[0]
        conn.execute("DELETE FROM course_events WHERE ctid >= %s::tid AND sequence_number %% 2 = 0",
                     (f"({blocks // 2},0)",))
        conn.execute("VACUUM course_events")


def _hashed_once(source: str, clone: str) -> None:
    src = dict(rows(source, "SELECT event_uuid::text, student_uuid::text FROM course_events "
                            "WHERE kind = 'record_response'"))
    got = rows(clone, "SELECT event_uuid::text, student_uuid::text, data->>'student_uuid' FROM course_events "
                      "WHERE kind = 'record_response'")
    assert len(got) > 1000
    wrong = [(e, s) for e, s, d in got if not s == d == expected_hash(src[e])]
    assert not wrong, f"{len(wrong)} of {len(got)} rows not hashed exactly once, e.g. {wrong[:2]}"


@pytest.mark.parametrize("workers", [1, 2])
def test_no_row_is_masked_twice_when_its_new_version_lands_ahead(source, clones, rules, workers):
    clone = clones()
    _free_space_ahead(clone)
    size_before = rows(clone, "SELECT pg_relation_size('course_events')")[0][0]
    result = masking.apply(clone, rules, SECRET, batch_size=50, workers=workers)
    # new versions went into the freed blocks ahead (the table grew by less than it would have)
    assert rows(clone, "SELECT pg_relation_size('course_events')")[0][0] < 2 * size_before
    assert result.tables["course_events"] == rows(clone, "SELECT count(*) FROM course_events")[0][0]
    _hashed_once(source, clone)
    assert masking.verify(source, clone, rules) == []


def test_without_the_guard_rows_would_be_masked_twice(source, clones, rules, monkeypatch):
    """The same clone without the guard against this run's own row versions: rows are masked twice,
    and apply refuses the clone (more rows masked than the table held)."""
    clone = clones()
    _free_space_ahead(clone)
    monkeypatch.setattr(masking, "_not_ours", lambda: "true")
    with pytest.raises(masking.MaskingError, match=r"course_events: [\d,]+ row\(s\) masked, but it held"):
        masking.apply(clone, rules, SECRET, batch_size=50, workers=1)


def test_a_batch_run_again_masks_nothing_the_second_time(source, clones, rules, monkeypatch):
    """A batch whose commit was lost and is retried (run twice): the second run finds only versions
    this run wrote and masks none of them."""
    clone = clones()
    again: list[int] = []
    once = masking._mask_blocks

    def twice(conn, job, a, b):
        n = once(conn, job, a, b)
        again.append(once(conn, job, a, b))
        return n

    monkeypatch.setattr(masking, "_mask_blocks", twice)
    result = masking.apply(clone, rules, SECRET, batch_size=100, workers=2)
    assert result.tables == {"course_events": 2001, "learners": 300}
    assert again
    assert set(again) == {0}
    _hashed_once(source, clone)
    assert masking.verify(source, clone, rules) == []


def test_the_clone_keeps_its_source_schema_and_what_cannot_be_rebuilt_is_kept(source, clones, rules):
    """Indexes dropped while a table is masked are built again exactly; those whose definition does
    not say everything (referenced by a foreign key, commented) stay and are maintained."""
    from opsbook.engines.snapshots.manifest import schema_objects

    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE badges_awarded (learner bigint REFERENCES learners (id))")
        conn.execute("CREATE INDEX learners_phone_idx ON learners (phone) WHERE phone IS NOT NULL")
        conn.execute("COMMENT ON INDEX learners_phone_idx IS 'support looks people up by phone'")
        conn.execute("CREATE UNIQUE INDEX course_events_trial_idx ON course_events ((data->>'trial_uuid')) "
                     "INCLUDE (created_at) WITH (fillfactor = 80)")
        expected = schema_objects(conn)
    path = rules.path
    path.write_text(path.read_text() + '  badges_awarded:\n    learner: {keep: "a surrogate key"}\n')
    clone = clones()
    said: list[str] = []
    masking.apply(clone, masking.load(path), SECRET, progress=said.append)
    assert "course_events: 4 index(es) dropped while it is masked, built again after it: " \
           "course_events_course_sequence_key, course_events_pkey, course_events_student_uuid_idx, " \
           "course_events_trial_idx" in said
    assert "learners: 1 index(es) dropped while it is masked, built again after it: learners_email_key" in said
    with psycopg.connect(clone, autocommit=True) as conn:
        assert schema_objects(conn) == expected
    assert masking.verify(source, clone, masking.load(path)) == []
