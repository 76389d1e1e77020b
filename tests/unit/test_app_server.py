"""bl-api under a real gunicorn (gthread workers) on 127.0.0.1 against a real Postgres."""

from __future__ import annotations

import signal
import socket
import threading
import time
import uuid

import bl_api
import httpx
import psycopg
import pytest

from opsbook.core.paths import ROOT
from opsbook.engines.migrations import apply_pending
from tests.fixtures.service import Service

pytestmark = pytest.mark.postgres


@pytest.fixture
def schema_db(pg_db):
    apply_pending(pg_db, ROOT / "app" / "migrations", log=lambda _m: None)
    return pg_db


@pytest.fixture
def service(tmp_path):
    """Services to start; whatever is still running at the end of the test is killed."""
    started: list[Service] = []

    def make(database_url: str | None, **settings: str) -> Service:
        started.append(Service(database_url, tmp_path, **settings))
        return started[-1].launch()

    yield make
    for s in started:
        s.kill()


def test_sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0(schema_db, service):
    server = service(schema_db, BL_API_WORKERS="1", BL_API_THREADS="4", BL_API_GRACEFUL_TIMEOUT="15",
                     BL_API_TEST_SLOW_HEADER="1").wait_ready()
    result: dict = {}

    def slow_request() -> None:
        try:
            result["response"] = httpx.get(f"{server.url}/ping", headers={"X-Test-Delay": "4"}, timeout=30)
        except httpx.HTTPError as e:
            result["error"] = e

    in_flight = threading.Thread(target=slow_request)
    in_flight.start()
    time.sleep(1.0)                        # the request is now sleeping inside a worker thread
    server.proc.send_signal(signal.SIGTERM)

    refused_at = None
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
        except (ConnectionRefusedError, ConnectionResetError):
            # Refused outright, or reset while the listening socket was being closed under our handshake
            # (seen in CI): either way gunicorn no longer takes the connection.
            refused_at = time.monotonic()
            break
        time.sleep(0.05)
    assert refused_at is not None, "gunicorn still accepts connections 3 s after SIGTERM"
    assert in_flight.is_alive(), "the slow request ended before new connections were refused"

    in_flight.join(timeout=20)
    assert "error" not in result, result
    assert result["response"].status_code == 200
    assert result["response"].json() == {"status": "ok"}
    assert server.proc.wait(timeout=20) == 0
    out = server.output()
    assert "database pool closed" in out, out
    assert "Traceback" not in out, out


def test_ping_reports_the_database_without_the_test_hook(schema_db, service):
    server = service(schema_db, BL_API_WORKERS="1").wait_ready()
    started = time.monotonic()
    r = httpx.get(f"{server.url}/ping", headers={"X-Test-Delay": "5"}, timeout=10)
    assert r.status_code == 200
    assert time.monotonic() - started < 4, "X-Test-Delay (5 s) was honoured without BL_API_TEST_SLOW_HEADER=1"
    assert httpx.get(f"{server.url}/version", timeout=5).json() == {"version": bl_api.__version__}
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=20) == 0


def test_two_workers_number_concurrent_writes_without_gaps(schema_db, service):
    server = service(schema_db, BL_API_WORKERS="2", BL_API_THREADS="4", BL_API_POOL_MAX="4").wait_ready()
    course = str(uuid.uuid4())
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/create_course", json={"course_uuid": course, "ecosystem_uuid": str(uuid.uuid4())})
        assert r.status_code == 200
    sent: list[str] = []
    failures: list = []
    lock = threading.Lock()

    def writer() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:   # own connection -> spread over workers
            for _ in range(8):
                batch = [{
                    "response_uuid": str(uuid.uuid4()), "course_uuid": course,
                    "ecosystem_item_uuid": str(uuid.uuid4()), "trial_uuid": str(uuid.uuid4()),
                    "student_uuid": str(uuid.uuid4()), "exercise_uuid": str(uuid.uuid4()),
                    "is_correct": False, "is_real_response": True, "responded_at": "2024-03-01T12:00:00Z",
                } for _ in range(5)]
                for _attempt in range(2):   # a re-send must not duplicate anything
                    r = c.post("/record_responses", json={"responses": batch})
                    if r.status_code != 200:
                        with lock:
                            failures.append(r.text)
                with lock:
                    sent.extend(x["response_uuid"] for x in batch)

    threads = [threading.Thread(target=writer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not failures
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/fetch_course_events", json={"course_event_requests": [
            {"request_uuid": str(uuid.uuid4()), "course_uuid": course, "sequence_number_offset": 0}
        ]})
    [answer] = r.json()["course_event_responses"]
    assert answer["is_end"] is True
    events = answer["events"]
    assert [e["sequence_number"] for e in events] == list(range(1 + len(sent)))
    assert sorted(e["event_uuid"] for e in events[1:]) == sorted(sent)
    with psycopg.connect(schema_db) as conn:
        assert conn.execute("SELECT next_sequence_number FROM courses").fetchone()[0] == 1 + len(sent)
    pids = {line.split()[-1] for line in server.output().splitlines() if "Booting worker" in line}
    assert len(pids) == 2
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=20) == 0


def test_missing_database_url_stops_the_service_from_starting(service):
    server = service(None, BL_API_WORKERS="1")
    assert server.proc.wait(timeout=30) != 0
    assert "DATABASE_URL is not set" in server.output()
