"""bl-api 1.1.0 across the schemas of a rollout: the same API answers on each, and migrations that
run while it serves (expand, then contract) never make a request fail."""

from __future__ import annotations

import shutil
import uuid

import psycopg
import pytest
from bl_api import __version__
from bl_api.app import create_app
from bl_api.config import Settings
from bl_api.db import Schema

from opsbook.engines.migrations import run
from tests.unit.test_app import APP_MIGRATIONS, STAGES, migrate_to

pytestmark = pytest.mark.postgres

COURSE, ECOSYSTEM = "5b7a2d4e-0000-4000-8000-000000000001", "5b7a2d4e-0000-4000-8000-0000000000e1"


def fixed_responses(n: int, start: int = 0) -> list[dict]:
    """Responses with fixed uuids, so answers from different databases can be compared."""
    return [
        {
            "response_uuid": str(uuid.UUID(int=0x1000 + i)),
            "course_uuid": COURSE,
            "ecosystem_item_uuid": str(uuid.UUID(int=0x2000 + i)),
            "trial_uuid": str(uuid.UUID(int=0x3000 + i)),
            "student_uuid": str(uuid.UUID(int=0x4000 + i % 3)),
            "exercise_uuid": str(uuid.UUID(int=0x5000 + i)),
            "is_correct": i % 2 == 0,
            "is_real_response": True,
            "responded_at": "2024-03-01T12:00:00Z",
        }
        for i in range(start, start + n)
    ]


def post(client, path, body) -> dict:
    r = client.post(path, json=body)
    assert r.status_code == 200, (path, r.status_code, r.json)
    return r.json


def answers(client) -> list:
    """Everything a client can read about the course, with the create_course event's random uuid
    taken out (the one value the service makes up)."""
    out = []
    for extra in ({}, {"event_types": ["record_response"], "max_num_events": 4},
                  {"event_types": ["create_course"]}, {"sequence_number_offset": 3}):
        body = {"course_event_requests": [
            {"request_uuid": "5b7a2d4e-0000-4000-8000-00000000aaaa", "course_uuid": COURSE,
             "sequence_number_offset": 0, **extra}]}
        [answer] = post(client, "/fetch_course_events", body)["course_event_responses"]
        for e in answer["events"]:
            if e["event_type"] == "create_course":
                e["event_uuid"] = "(made up by the service)"
        out.append(answer)
    return out


def write(client, start: int, n: int) -> None:
    post(client, "/create_course", {"course_uuid": COURSE, "ecosystem_uuid": ECOSYSTEM})
    got = post(client, "/record_responses", {"responses": fixed_responses(n, start)})
    assert len(got["recorded_response_uuids"]) == n


@pytest.fixture
def serve():
    apps = []

    def start(conninfo):
        app = create_app(Settings(database_url=conninfo, pool_max=4))
        apps.append(app)
        return app.test_client()

    yield start
    for app in apps:
        app.extensions["bl_api_db"].close()


def schema_of(conninfo) -> Schema:
    with psycopg.connect(conninfo) as conn:
        return Schema.detect(conn)


def bad_rows(conninfo) -> int:
    """Rows whose new columns disagree with what the old shape says (whichever columns exist)."""
    s = schema_of(conninfo)
    checks = []
    if s.student_uuid:
        checks.append("student_uuid IS DISTINCT FROM (data->>'student_uuid')::uuid")
    if s.kind:
        checks.append("kind IS NULL")
    if s.kind and s.event_type:
        checks.append("kind IS DISTINCT FROM event_type")
    if not checks:
        return 0
    with psycopg.connect(conninfo) as conn:
        return conn.execute(f"SELECT count(*) FROM course_events WHERE {' OR '.join(checks)}").fetchone()[0]


def test_detects_each_stage(pg_db, tmp_path):
    migrate_to(pg_db, "0001", tmp_path)
    assert schema_of(pg_db) == Schema(student_uuid=False, kind=False, event_type=True)
    migrate_to(pg_db, "expand", tmp_path)
    assert schema_of(pg_db) == Schema(student_uuid=True, kind=True, event_type=True)
    migrate_to(pg_db, "contract", tmp_path)
    assert schema_of(pg_db) == Schema(student_uuid=True, kind=True, event_type=False)


@pytest.fixture
def three_dbs(local_pg):
    names = [f"t_{uuid.uuid4().hex[:12]}" for _ in STAGES]
    with psycopg.connect(local_pg, autocommit=True) as conn:
        for n in names:
            conn.execute(f'CREATE DATABASE "{n}"')
    yield [local_pg.replace("dbname=postgres", f"dbname={n}") for n in names]
    with psycopg.connect(local_pg, autocommit=True) as conn:
        for n in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{n}" WITH (FORCE)')


def test_same_api_answers_on_every_schema_stage(three_dbs, serve, tmp_path):
    seen = {}
    for stage, conninfo in zip(STAGES, three_dbs, strict=True):
        migrate_to(conninfo, stage, tmp_path)
        client = serve(conninfo)
        write(client, 0, 7)
        write(client, 5, 4)  # two re-sent, two new
        seen[stage] = answers(client)
        assert bad_rows(conninfo) == 0
    assert seen["expand"] == seen["0001"]
    assert seen["contract"] == seen["0001"]
    assert [e["sequence_number"] for e in seen["0001"][0]["events"]] == list(range(10))


def test_contracted_schema_gets_student_uuid_and_kind_from_the_service_itself(pg_db, serve, tmp_path):
    """After the contract no trigger fills the new columns: 1.1.0 must write them."""
    migrate_to(pg_db, "contract", tmp_path)
    with psycopg.connect(pg_db) as conn:
        triggers = conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'course_events'::regclass AND NOT tgisinternal"
        ).fetchone()[0]
    assert triggers == 0
    write(serve(pg_db), 0, 5)
    with psycopg.connect(pg_db) as conn:
        rows = conn.execute(
            "SELECT kind, student_uuid::text, data->>'student_uuid' FROM course_events ORDER BY sequence_number"
        ).fetchall()
    assert rows[0] == ("create_course", None, None)
    assert all(k == "record_response" and s == d and s for k, s, d in rows[1:])
    assert len(rows) == 6


def test_expand_then_contract_while_the_service_runs_never_fails_a_request(pg_db, serve, tmp_path):
    """The service started on 0001 keeps its detected schema until it is stale or a request fails
    because of it: a contract that drops event_type under it costs a retry, not an error."""
    migrate_to(pg_db, "0001", tmp_path)
    client = serve(pg_db)
    write(client, 0, 6)
    before = answers(client)

    migrate_to(pg_db, "expand", tmp_path)  # the service's pool is open and idle meanwhile
    assert answers(client) == before
    write(client, 6, 3)  # still the 0001 shape from this service: the sync triggers fill the rest
    after_expand = answers(client)
    assert bad_rows(pg_db) == 0

    run(pg_db, APP_MIGRATIONS, "contract", fleet_versions={"app1": __version__})
    assert not schema_of(pg_db).event_type
    assert answers(client) == after_expand  # the read names event_type, fails, re-detects, retries
    write(client, 9, 3)
    assert bad_rows(pg_db) == 0
    assert [e["sequence_number"] for e in answers(client)[0]["events"]] == list(range(13))


def test_a_student_contract_under_a_stale_service_costs_a_retry_not_an_error(pg_db, serve, tmp_path):
    """Only 0002's contract (the CHECK, no trigger): a service that has not seen student_uuid yet
    inserts without it, the CHECK refuses, the service re-detects and writes it."""
    migrate_to(pg_db, "0001", tmp_path)
    client = serve(pg_db)
    write(client, 0, 2)
    only = tmp_path / "upto-0002"
    only.mkdir()
    for name in ("0001_course_events.yml", "0002_course_events_student_uuid.yml"):
        shutil.copy(APP_MIGRATIONS / name, only)
    run(pg_db, only, "expand")
    run(pg_db, only, "contract", fleet_versions={"app1": __version__})
    write(client, 2, 3)
    with psycopg.connect(pg_db) as conn:
        missing = conn.execute(
            "SELECT count(*) FROM course_events WHERE data ? 'student_uuid' AND student_uuid IS NULL"
        ).fetchone()[0]
    assert missing == 0
    assert len(answers(client)[0]["events"]) == 6
