"""Every class of bad input gets a 4xx JSON answer naming the problem, and writes nothing."""

from __future__ import annotations

import json
import uuid
from typing import Any, NamedTuple

import psycopg
import pytest
from bl_api.app import create_app
from bl_api.config import Settings

from opsbook.core.paths import ROOT
from opsbook.engines.migrations import apply_pending

pytestmark = pytest.mark.postgres

COURSE = str(uuid.uuid4())     # created once per module; bodies that name it are valid but for one field


def u() -> str:
    return str(uuid.uuid4())


def response(**fields) -> dict:
    base = {
        "response_uuid": u(), "course_uuid": COURSE, "ecosystem_item_uuid": u(), "trial_uuid": u(),
        "student_uuid": u(), "exercise_uuid": u(), "is_correct": True, "is_real_response": False,
        "responded_at": "2024-03-01T12:00:00+00:00",
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def event_request(**fields) -> dict:
    base = {"request_uuid": u(), "course_uuid": COURSE, "sequence_number_offset": 0}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def record(*responses) -> dict:
    return {"responses": list(responses)}


def fetch(*requests) -> dict:
    return {"course_event_requests": list(requests)}


JSON = "application/json"
BIG = "x" * (9 * 1024 * 1024)
OFFSET = "course_event_requests[0].sequence_number_offset"


class Case(NamedTuple):
    id: str
    method: str
    path: str
    body: Any            # dict/list/None -> JSON; str/bytes -> sent as is
    content_type: str | None
    status: int
    field: str | None    # a field the answer's details must name


CASES = [Case(*c) for c in [
    ("content-type-not-json", "POST", "/create_course", '{"course_uuid": 1}', "text/plain", 415,
     "Content-Type"),
    ("malformed-json", "POST", "/create_course", '{"course_uuid": ', JSON, 400, "(body)"),
    ("invalid-utf8", "POST", "/create_course", b'{"course_uuid": "\xff"}', JSON, 400, "(body)"),
    ("empty-body", "POST", "/record_responses", "", JSON, 400, "(body)"),
    ("deeply-nested-json", "POST", "/record_responses", "[" * 200_000 + "]" * 200_000, JSON, 400, "(body)"),
    ("body-is-a-list", "POST", "/create_course", [COURSE], JSON, 400, "(body)"),
    ("body-is-null", "POST", "/fetch_course_events", None, JSON, 400, "(body)"),
    ("missing-field", "POST", "/create_course", {"course_uuid": COURSE}, JSON, 400, "ecosystem_uuid"),
    ("unknown-field", "POST", "/create_course", {"course_uuid": u(), "ecosystem_uuid": u(), "x": 1}, JSON,
     400, "x"),
    ("uuid-is-a-number", "POST", "/create_course", {"course_uuid": 7, "ecosystem_uuid": u()}, JSON, 400,
     "course_uuid"),
    ("uuid-malformed", "POST", "/create_course", {"course_uuid": "not-a-uuid", "ecosystem_uuid": u()}, JSON,
     400, "course_uuid"),
    ("uuid-with-trailing-newline", "POST", "/record_responses", record(response(student_uuid=u() + "\n")), JSON,
     400, "responses[0].student_uuid"),
    ("uuid-without-hyphens", "POST", "/create_course",
     {"course_uuid": uuid.uuid4().hex, "ecosystem_uuid": u()}, JSON, 400, "course_uuid"),
    ("uuid-with-nul", "POST", "/create_course", {"course_uuid": u()[:-1] + "\x00", "ecosystem_uuid": u()},
     JSON, 400, "course_uuid"),
    ("responses-not-a-list", "POST", "/record_responses", {"responses": {"a": 1}}, JSON, 400, "responses"),
    ("response-not-an-object", "POST", "/record_responses", record("x"), JSON, 400, "responses[0]"),
    ("response-missing-field", "POST", "/record_responses", record(response(), response(trial_uuid=...)),
     JSON, 400, "responses[1].trial_uuid"),
    ("response-unknown-field", "POST", "/record_responses", record(response(score=3)), JSON, 400,
     "responses[0].score"),
    ("is-correct-as-string", "POST", "/record_responses", record(response(is_correct="true")), JSON, 400,
     "responses[0].is_correct"),
    ("is-correct-as-int", "POST", "/record_responses", record(response(is_correct=1)), JSON, 400,
     "responses[0].is_correct"),
    ("responded-at-garbage", "POST", "/record_responses", record(response(responded_at="yesterday")), JSON,
     400, "responses[0].responded_at"),
    ("responded-at-without-zone", "POST", "/record_responses",
     record(response(responded_at="2024-03-01T12:00:00")), JSON, 400, "responses[0].responded_at"),
    ("responded-at-not-string", "POST", "/record_responses", record(response(responded_at=1709294400)), JSON,
     400, "responses[0].responded_at"),
    ("too-many-responses", "POST", "/record_responses", record(*[response() for _ in range(1001)]), JSON, 413,
     "responses"),
    ("body-too-large", "POST", "/record_responses", '{"responses": ["' + BIG + '"]}', JSON, 413, None),
    ("unknown-course", "POST", "/record_responses", record(response(course_uuid=u())), JSON, 404, None),
    ("requests-not-a-list", "POST", "/fetch_course_events", {"course_event_requests": "all"}, JSON, 400,
     "course_event_requests"),
    ("offset-negative", "POST", "/fetch_course_events", fetch(event_request(sequence_number_offset=-1)), JSON,
     400, OFFSET),
    ("offset-beyond-int4", "POST", "/fetch_course_events",
     fetch(event_request(sequence_number_offset=2**31)), JSON, 400, OFFSET),
    ("offset-is-bool", "POST", "/fetch_course_events",
     fetch(event_request(sequence_number_offset=True)), JSON, 400, OFFSET),
    ("offset-is-float", "POST", "/fetch_course_events",
     fetch(event_request(sequence_number_offset=1.5)), JSON, 400, OFFSET),
    ("offset-missing", "POST", "/fetch_course_events",
     fetch(event_request(sequence_number_offset=...)), JSON, 400, OFFSET),
    ("max-events-too-many", "POST", "/fetch_course_events", fetch(event_request(max_num_events=1001)), JSON,
     400, "course_event_requests[0].max_num_events"),
    ("max-events-zero", "POST", "/fetch_course_events", fetch(event_request(max_num_events=0)), JSON, 400,
     "course_event_requests[0].max_num_events"),
    ("event-types-empty", "POST", "/fetch_course_events", fetch(event_request(event_types=[])), JSON, 400,
     "course_event_requests[0].event_types"),
    ("event-types-not-names", "POST", "/fetch_course_events",
     fetch(event_request(event_types=["record_response", "x\x00"])), JSON, 400,
     "course_event_requests[0].event_types"),
    ("too-many-event-requests", "POST", "/fetch_course_events",
     fetch(*[event_request() for _ in range(1001)]), JSON, 413, "course_event_requests"),
    ("wrong-method-get", "GET", "/record_responses", None, None, 405, None),
    ("wrong-method-post", "POST", "/ping", {}, JSON, 405, None),
    ("wrong-method-options", "OPTIONS", "/create_course", None, None, 405, None),
    ("unknown-route", "POST", "/drop_everything", {}, JSON, 404, None),
]]


@pytest.fixture(scope="module")
def client(local_pg):
    name = "t_validation_" + uuid.uuid4().hex[:8]
    with psycopg.connect(local_pg, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    conninfo = local_pg.replace("dbname=postgres", f"dbname={name}")
    apply_pending(conninfo, ROOT / "app" / "migrations", log=lambda _m: None)
    app = create_app(Settings(database_url=conninfo))
    client = app.test_client()
    r = client.post("/create_course", json={"course_uuid": COURSE, "ecosystem_uuid": u()})
    assert r.status_code == 200
    client.conninfo = conninfo
    yield client
    app.extensions["bl_api_db"].close()
    with psycopg.connect(local_pg, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _count_rows(conninfo: str) -> tuple[int, int]:
    with psycopg.connect(conninfo) as conn:
        return conn.execute(
            "SELECT (SELECT count(*) FROM courses), (SELECT count(*) FROM course_events)"
        ).fetchone()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_a_4xx_json_answer_and_writes_nothing(client, case: Case):
    before = _count_rows(client.conninfo)
    if isinstance(case.body, (str, bytes)):
        data = case.body
    else:
        data = None if case.body is None and case.method in {"GET", "OPTIONS"} else json.dumps(case.body)
    r = client.open(case.path, method=case.method, data=data, content_type=case.content_type)
    assert r.status_code == case.status, r.get_data(as_text=True)[:500]
    assert r.mimetype == "application/json"
    assert isinstance(r.json["error"], str)
    assert r.json["error"]
    if case.field is not None:
        assert case.field in [p["field"] for p in r.json["details"]], r.json
    assert _count_rows(client.conninfo) == before


def test_a_valid_body_of_each_shape_is_accepted(client):
    """The cases above fail for the reason they name, not because the bodies are broken anyway."""
    r = client.post("/record_responses", json=record(response(), response(sequence_number=5)))
    assert r.status_code == 200, r.json
    r = client.post("/fetch_course_events", json=fetch(event_request(
        event_types=["record_response"], max_num_events=1000, sequence_number_offset=2**31 - 1)))
    assert r.status_code == 200, r.json
    assert client.post("/record_responses", json=record()).json == {"recorded_response_uuids": []}
