"""bl-api in-process (Flask test client) against a real, migrated Postgres."""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import uuid
from pathlib import Path

import psycopg
import pytest
from bl_api import __version__
from bl_api.app import create_app
from bl_api.config import Settings

from opsbook.core.paths import ROOT
from opsbook.engines.migrations import apply_pending, run

pytestmark = pytest.mark.postgres


def new_uuid() -> str:
    return str(uuid.uuid4())


def a_response(course_uuid: str, **fields) -> dict:
    return {
        "response_uuid": new_uuid(),
        "course_uuid": course_uuid,
        "ecosystem_item_uuid": new_uuid(),
        "trial_uuid": new_uuid(),
        "student_uuid": new_uuid(),
        "exercise_uuid": new_uuid(),
        "is_correct": True,
        "is_real_response": True,
        "responded_at": "2024-03-01T12:00:00Z",
        **fields,
    }


APP_MIGRATIONS = ROOT / "app" / "migrations"
# The schemas a rollout passes through; the service (1.1.0) must answer the same on each.
STAGES = ("0001", "expand", "contract")


def migrate_to(conninfo: str, stage: str, tmp_dir: Path | None = None) -> None:
    """Bring a database to a rollout stage: `0001` (the first schema only), `expand` (every
    expand applied: old and new columns side by side, kept in sync by triggers), `contract`
    (every contract applied too: event_type dropped, no triggers)."""
    if stage == "0001":
        only = Path(tempfile.mkdtemp(prefix="m0001-", dir=tmp_dir))
        shutil.copy(APP_MIGRATIONS / "0001_course_events.yml", only)
        apply_pending(conninfo, only, log=lambda _m: None)
        return
    apply_pending(conninfo, APP_MIGRATIONS, log=lambda _m: None)
    if stage == "contract":
        run(conninfo, APP_MIGRATIONS, "contract", fleet_versions={"app1": __version__})


@pytest.fixture(params=STAGES, ids=lambda s: f"schema-{s}")
def schema_db(request, pg_db, tmp_path):
    migrate_to(pg_db, request.param, tmp_path)
    return pg_db


@pytest.fixture
def app(schema_db):
    app = create_app(Settings(database_url=schema_db, pool_max=10))
    yield app
    app.extensions["bl_api_db"].close()


@pytest.fixture
def client(app):
    return app.test_client()


def create_course(client, course_uuid=None, ecosystem_uuid=None) -> str:
    course_uuid = course_uuid or new_uuid()
    r = client.post("/create_course", json={"course_uuid": course_uuid,
                                             "ecosystem_uuid": ecosystem_uuid or new_uuid()})
    assert r.status_code == 200, r.json
    return course_uuid


def fetch(client, course_uuid, offset=0, **extra) -> dict:
    r = client.post("/fetch_course_events", json={"course_event_requests": [
        {"request_uuid": new_uuid(), "course_uuid": course_uuid, "sequence_number_offset": offset, **extra}
    ]})
    assert r.status_code == 200, r.json
    [answer] = r.json["course_event_responses"]
    return answer


def test_round_trip_returns_exactly_the_events_written_in_sequence_order(client):
    course, ecosystem = new_uuid(), new_uuid()
    r = client.post("/create_course", json={"course_uuid": course.upper(), "ecosystem_uuid": ecosystem})
    assert r.status_code == 200
    assert r.json == {"created_course_uuid": course}
    first = [a_response(course, sequence_number=99) for _ in range(3)]
    second = [a_response(course, is_correct=False) for _ in range(2)]
    for batch in (first, second):
        r = client.post("/record_responses", json={"responses": batch})
        assert r.status_code == 200, r.json
        assert r.json == {"recorded_response_uuids": [x["response_uuid"] for x in batch]}

    answer = fetch(client, course)
    assert answer["course_uuid"] == course
    assert answer["is_gap"] is False
    assert answer["is_end"] is True
    events = answer["events"]
    assert [e["sequence_number"] for e in events] == [0, 1, 2, 3, 4, 5]
    assert events[0]["event_type"] == "create_course"
    assert events[0]["event_data"] == {"course_uuid": course, "ecosystem_uuid": ecosystem}
    written = first + second
    assert [e["event_uuid"] for e in events[1:]] == [x["response_uuid"] for x in written]
    assert {e["event_type"] for e in events[1:]} == {"record_response"}
    # The client's sequence_number is ignored: the server numbers events.
    expected_data = [{k: v for k, v in x.items() if k != "sequence_number"} for x in written]
    assert [e["event_data"] for e in events[1:]] == expected_data

    tail = fetch(client, course, offset=4)
    assert [e["sequence_number"] for e in tail["events"]] == [4, 5]
    page = fetch(client, course, event_types=["record_response"], max_num_events=2)
    assert [e["sequence_number"] for e in page["events"]] == [1, 2]
    assert page["is_end"] is False
    last = fetch(client, course, offset=5, event_types=["record_response"], max_num_events=2)
    assert [e["sequence_number"] for e in last["events"]] == [5]
    assert last["is_end"] is True
    assert fetch(client, course, offset=6)["events"] == []


def test_fetch_answers_each_request_of_a_call(client):
    a, b = create_course(client), create_course(client)
    client.post("/record_responses", json={"responses": [a_response(b)]})
    requests = [{"request_uuid": new_uuid(), "course_uuid": c, "sequence_number_offset": 0} for c in (a, b)]
    r = client.post("/fetch_course_events", json={"course_event_requests": requests})
    assert r.status_code == 200
    answers = r.json["course_event_responses"]
    assert [x["request_uuid"] for x in answers] == [x["request_uuid"] for x in requests]
    assert [len(x["events"]) for x in answers] == [1, 2]


def test_create_course_is_idempotent_and_refuses_another_ecosystem(client, schema_db):
    course, ecosystem = new_uuid(), new_uuid()
    for _ in range(2):
        r = client.post("/create_course", json={"course_uuid": course, "ecosystem_uuid": ecosystem})
        assert (r.status_code, r.json) == (200, {"created_course_uuid": course})
    other = new_uuid()
    r = client.post("/create_course", json={"course_uuid": course, "ecosystem_uuid": other})
    assert r.status_code == 409
    assert r.json["details"]["existing_ecosystem_uuid"] == ecosystem
    with psycopg.connect(schema_db) as conn:
        assert conn.execute("SELECT ecosystem_uuid::text, next_sequence_number FROM courses").fetchall() == [
            (ecosystem, 1)
        ]
        assert conn.execute("SELECT count(*) FROM course_events").fetchone()[0] == 1


def test_resending_responses_records_each_once_and_consumes_no_numbers(client, schema_db):
    course = create_course(client)
    batch = [a_response(course) for _ in range(3)]
    assert client.post("/record_responses", json={"responses": batch}).status_code == 200
    extra = a_response(course)
    resend = [batch[1], extra, batch[0], extra]       # old ones, a new one, and a duplicate inside the call
    r = client.post("/record_responses", json={"responses": resend})
    assert r.status_code == 200
    assert r.json["recorded_response_uuids"] == [batch[1]["response_uuid"], extra["response_uuid"],
                                                 batch[0]["response_uuid"]]
    events = fetch(client, course)["events"]
    assert [e["sequence_number"] for e in events] == [0, 1, 2, 3, 4]
    assert [e["event_uuid"] for e in events[1:]] == [x["response_uuid"] for x in [*batch, extra]]
    with psycopg.connect(schema_db) as conn:
        assert conn.execute("SELECT next_sequence_number FROM courses").fetchone()[0] == 5


def test_unknown_course_rejects_the_whole_batch(client, schema_db):
    known, unknown = create_course(client), new_uuid()
    batch = [a_response(known), a_response(unknown), a_response(known)]
    r = client.post("/record_responses", json={"responses": batch})
    assert r.status_code == 404
    assert r.json["details"] == {"course_uuids": [unknown]}
    assert [e["event_type"] for e in fetch(client, known)["events"]] == ["create_course"]
    with psycopg.connect(schema_db) as conn:
        assert conn.execute("SELECT next_sequence_number FROM courses").fetchone()[0] == 1


def test_concurrent_writers_get_gap_free_unique_numbers(app, schema_db):
    client = app.test_client()
    course, other_course = create_course(client), create_course(client)
    shared = [a_response(course) for _ in range(5)]   # every thread also re-sends these
    threads, batches, per_batch = 8, 6, 5
    sent: list[str] = [x["response_uuid"] for x in shared]
    failures: list = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def writer(n: int) -> None:
        c = app.test_client()
        start.wait()
        for i in range(batches):
            batch = [a_response(course) for _ in range(per_batch)]
            # Batches that span two courses lock both rows; mix orders to provoke deadlocks if any.
            batch.append(a_response(other_course))
            if i % 2 == n % 2:
                batch.reverse()
            batch += shared[i % 5:i % 5 + 1]
            r = c.post("/record_responses", json={"responses": batch})
            with lock:
                if r.status_code != 200:
                    failures.append(r.json)
                sent.extend(x["response_uuid"] for x in batch)

    workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert not failures
    with psycopg.connect(schema_db) as conn:
        rows = conn.execute(
            "SELECT course_uuid::text, sequence_number, event_uuid::text FROM course_events "
            "ORDER BY course_uuid, sequence_number"
        ).fetchall()
        next_numbers = dict(conn.execute("SELECT course_uuid::text, next_sequence_number FROM courses"))
    for c in (course, other_course):
        numbers = [seq for cu, seq, _ in rows if cu == c]
        assert numbers == list(range(len(numbers)))
        assert next_numbers[c] == len(numbers)
    assert len(rows) == 2 + threads * batches * (per_batch + 1) + len(shared)
    assert {ev for _, _, ev in rows} >= set(sent)
    assert len({ev for _, _, ev in rows}) == len(rows)


def test_ping_and_version(client):
    assert (client.get("/ping").status_code, client.get("/ping").json) == (200, {"status": "ok"})
    assert client.get("/version").json == {"version": __version__}


def _dead_database() -> str:
    with socket.socket() as s:     # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"host=127.0.0.1 port={port} dbname=nowhere user=nobody connect_timeout=1"


def test_unreachable_database_answers_503_json():
    app = create_app(Settings(database_url=_dead_database(), pool_timeout=1, ping_timeout=1))
    try:
        client = app.test_client()
        r = client.get("/ping")
        assert r.status_code == 503
        assert r.json["status"] == "unavailable"
        assert r.json["error"]
        # The database's own error text (host, user, database names) never reaches a client.
        assert "nowhere" not in r.get_data(as_text=True)
        assert "nobody" not in r.get_data(as_text=True)
        r = client.post("/create_course", json={"course_uuid": new_uuid(), "ecosystem_uuid": new_uuid()})
        assert r.status_code == 503
        assert r.json["error"].startswith("database unavailable")
        assert "nowhere" not in r.get_data(as_text=True)
        # Validation still answers without the database.
        assert client.post("/create_course", json={}).status_code == 400
    finally:
        app.extensions["bl_api_db"].close()


def test_same_response_sent_concurrently_to_two_courses_is_recorded_once(app, schema_db):
    """response_uuid is unique service-wide; the loser of the race retries and sees it recorded."""
    client = app.test_client()
    courses = [create_course(client), create_course(client)]
    shared = [new_uuid() for _ in range(40)]
    statuses: list[int] = []
    start = threading.Barrier(2)

    def writer(course: str) -> None:
        c = app.test_client()
        start.wait()
        for response_uuid in shared:
            body = {"responses": [a_response(course, response_uuid=response_uuid)]}
            r = c.post("/record_responses", json=body)
            statuses.append(r.status_code)

    workers = [threading.Thread(target=writer, args=(c,)) for c in courses]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert statuses == [200] * 80
    with psycopg.connect(schema_db) as conn:
        rows = conn.execute(
            "SELECT course_uuid::text, sequence_number, event_uuid::text FROM course_events "
            "WHERE sequence_number > 0 ORDER BY course_uuid, sequence_number"  # not the create_course event
        ).fetchall()
    assert sorted(ev for _, _, ev in rows) == sorted(shared)
    for c in courses:
        numbers = [seq for cu, seq, _ in rows if cu == c]
        assert numbers == list(range(1, 1 + len(numbers)))


def test_a_connection_dropped_after_the_checkout_looked_costs_a_retry_not_an_error(client, local_pg, schema_db,
                                                                                   monkeypatch):
    """The checkout's look at a pooled connection costs no round trip, so a connection the database drops
    an instant later is only found dead by the request's first statement: the work runs once more on
    another connection (here the look is switched off, so every dropped connection is found that way)."""
    import bl_api.db

    monkeypatch.setattr(bl_api.db, "_check_connection", lambda conn: None)
    course = create_course(client)    # the pool (created now) keeps the connection
    dbname = psycopg.conninfo.conninfo_to_dict(schema_db)["dbname"]
    with psycopg.connect(local_pg, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", [dbname])
    responses = [{"response_uuid": new_uuid(), "course_uuid": course, "ecosystem_item_uuid": new_uuid(),
                  "trial_uuid": new_uuid(), "student_uuid": new_uuid(), "exercise_uuid": new_uuid(),
                  "is_correct": True, "is_real_response": True, "responded_at": "2024-03-01T12:00:00Z"}]
    r = client.post("/record_responses", json={"responses": responses})
    assert r.status_code == 200, r.json
    assert client.get("/ping").status_code == 200


def test_connections_dropped_by_the_database_are_replaced_without_errors(client, local_pg, schema_db):
    """After a database restart or failover the pool's old connections are dead; requests still succeed."""
    assert client.get("/ping").status_code == 200
    dbname = psycopg.conninfo.conninfo_to_dict(schema_db)["dbname"]
    with psycopg.connect(local_pg, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s", [dbname]
        ).fetchone()[0]
    assert killed >= 1
    assert client.get("/ping").status_code == 200
    create_course(client)
