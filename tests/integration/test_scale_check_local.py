"""The scaling check's load driver against a real bl-api (gunicorn on 127.0.0.1) and a real local
Postgres: open-model latency, nothing lost, refusals before any request. No lab needed."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from opsbook.engines import database, load
from opsbook.operations import scale_check as sc
from tests.fixtures.service import Service

pytestmark = pytest.mark.postgres


def _ctx(url: str, conninfo: str, steps: list[float], *, mix: str = "record10", seconds: float = 2.0,
         p99: float = 200.0, **kw) -> sc.Context:
    from opsbook.engines.load.curve import Target

    return sc.Context(env="local", kind="local", url=url, conninfo=conninfo, target=Target(steps[-1], p99, 0.0),
                      steps=steps, step_seconds=seconds, mix=mix, max_seconds=60, courses=20,
                      sample_hosts=False, **kw)


def _events(conninfo: str) -> int:
    with psycopg.connect(conninfo) as conn:
        return conn.execute("SELECT count(*) FROM course_events WHERE sequence_number > 0").fetchone()[0]


def test_a_short_check_counts_every_acknowledged_response_in_the_database(bl_api_service, pg_db):
    ctx = _ctx(bl_api_service.url, pg_db, [100, 200], seconds=2)
    check = sc.run(ctx, out=lambda _m: None)
    assert [r["index"] for r in check.rows] == [1, 2]
    acked = check.lost["acknowledged"]
    assert acked > 0
    assert acked == check.result.acknowledged_total
    assert check.lost["missing"] == 0
    # The database holds exactly what was acknowledged: the check's writes are the only ones here.
    assert _events(pg_db) == acked
    for r in check.rows:
        assert r["offered"] in (100, 200)
        assert r["p99_ms"] is not None
        assert r["db"]["xact_per_s"] > 0     # pg_stat_database read during the step
    figures = sc.figures(check)
    assert figures["missing_acknowledged"] == 0
    assert figures["steps"][0][0] == 100


def test_a_check_removes_its_acknowledged_file_whether_it_counts_or_its_generator_fails(bl_api_service, pg_db,
                                                                                      tmp_path, monkeypatch):
    """The generator's list of acknowledged uuids is a temporary file: the check counts and removes it,
    and a generator that dies without results removes it too (a leak per check, found in /tmp)."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    check = sc.run(_ctx(bl_api_service.url, pg_db, [50], seconds=1), out=lambda _m: None)
    assert check.lost["acknowledged"] > 0
    # A plan larger than a pipe's buffer: the child dies before reading it, so writing it fails
    # (BrokenPipeError), which is said as the generator's failure like any other.
    plan = load.LoadPlan(base_url=bl_api_service.url, steps=load.make_steps([10], 1, load.mix_named("ping")),
                         mix="ping", max_seconds=5, courses=[str(uuid.uuid4()) for _ in range(3000)])
    assert len(plan.to_json()) > 65536
    with pytest.raises(load.LoadError, match="without its results"):
        load.run(plan, python="/bin/false")
    assert plan.acked_file.startswith(str(tmp_path))
    assert not list(tmp_path.glob("opsbook-load-acked-*"))


def test_missing_acknowledged_responses_are_found(bl_api_service, pg_db):
    ctx = _ctx(bl_api_service.url, pg_db, [100], seconds=1)
    check = sc.run(ctx, out=lambda _m: None)
    assert check.lost["missing"] == 0
    with psycopg.connect(pg_db) as conn:   # lose three acknowledged responses behind the service's back
        conn.execute("DELETE FROM course_events WHERE event_uuid IN "
                     "(SELECT event_uuid FROM course_events WHERE sequence_number > 0 LIMIT 3)")
    uuids = [r[0] for r in psycopg.connect(pg_db).execute(
        "SELECT event_uuid::text FROM course_events WHERE sequence_number > 0").fetchall()]
    counted = database.count_missing(pg_db, [*uuids, "00000000-0000-4000-a000-000000000001"])
    assert counted["missing"] == 1
    assert counted["present"] == len(uuids)


def test_latency_is_measured_from_the_scheduled_time_when_the_server_falls_behind(pg_db, tmp_path):
    """One gunicorn thread, /ping slowed to 50 ms: at most ~20 requests/s. Offered 40/s, the queue grows,
    and so must the latency from the scheduled time, while the service time stays near 50 ms."""
    from opsbook.core.paths import ROOT
    from opsbook.engines.migrations import apply_pending

    apply_pending(pg_db, ROOT / "app" / "migrations", log=lambda _m: None)
    slow = Service(pg_db, tmp_path, BL_API_WORKERS="1", BL_API_THREADS="1", BL_API_TEST_SLOW_HEADER="1").start()
    try:
        plan = load.LoadPlan(base_url=slow.url, steps=load.make_steps([10, 40], 3, load.mix_named("ping")),
                             mix="ping", timeout_s=20, max_in_flight=64, max_seconds=30, ping_delay_s=0.05,
                             arrivals="uniform", acked_file=str(tmp_path / "acked.bin"))
        result = load.run(plan)
    finally:
        slow.stop()
    below, above = result.steps
    assert below.error_count == 0
    assert above.error_count == 0
    assert below.p99_ms < 400                      # 10/s is within what one thread at 50 ms can do
    assert above.achieved_requests_per_s < 30      # the server cannot keep up with 40/s ...
    assert above.p99_ms > 1000                     # ... so requests wait, and that wait is counted
    assert above.p99_ms > 5 * below.p99_ms
    # A closed-loop view (from the moment a request left) would not show the backlog in the generator;
    # here every client was free, so the wait is the server's queue: service time grows too, but the
    # scheduled-time figure is never smaller than it.
    assert above.p99_ms >= above.service_p99_ms


def test_the_generator_queue_counts_when_every_client_is_busy(pg_db, tmp_path):
    """One simulated client and a 50 ms server at 40 requests/s offered: the requests wait in the generator,
    not in the server. The service time stays near 50 ms; the latency from the scheduled time grows."""
    from opsbook.core.paths import ROOT
    from opsbook.engines.migrations import apply_pending

    apply_pending(pg_db, ROOT / "app" / "migrations", log=lambda _m: None)
    slow = Service(pg_db, tmp_path, BL_API_TEST_SLOW_HEADER="1").start()
    try:
        plan = load.LoadPlan(base_url=slow.url, steps=load.make_steps([40], 3, load.mix_named("ping")), mix="ping",
                             timeout_s=20, max_in_flight=1, max_seconds=30, ping_delay_s=0.05, arrivals="uniform",
                             acked_file=str(tmp_path / "acked.bin"))
        (step,) = load.run(plan).steps
    finally:
        slow.stop()
    assert step.service_p99_ms < 300               # each request, once sent, took about 50 ms
    assert step.p99_ms > 1000                      # but it was sent far later than scheduled
    assert step.in_flight_cap_hits > 0
    assert step.send_lag_p99_ms > 800


def test_an_unreachable_target_gives_a_failing_verdict_not_a_crash(pg_db):
    from opsbook.core.paths import ROOT
    from opsbook.engines.migrations import apply_pending

    apply_pending(pg_db, ROOT / "app" / "migrations", log=lambda _m: None)
    ctx = _ctx("http://127.0.0.1:9", pg_db, [50, 100, 200], seconds=1, timeout_s=2,
               stop_when={"error_rate": 0.5, "p99_ms": 5000})
    check = sc.run(ctx, out=lambda _m: None)
    assert not check.verdict.passed
    assert check.knee.index is None
    assert check.rows[0]["errors"] > 0
    assert len(check.rows) < 3                    # it stopped stepping up
    assert check.result.stopped_by == "stop_when"
    assert check.limit.resource == "connection errors"
    assert sc.figures(check)["verdict"] == "fail"


@pytest.mark.kernel
def test_the_runbook_leaves_a_record_with_the_curve_knee_and_verdict(bl_api_service, pg_db, tmp_path):
    """runbooks/scaling_check.ipynb run by the records runner (a real papermill kernel), pointed at the local
    bl-api and its database by the overrides, as `invoke scale.check` would run it."""
    import nbformat

    from opsbook.engines.records import runner
    from opsbook.engines.records.store import LocalStore
    from tests.unit.test_migrate_runbook import scratch_env

    store = LocalStore(tmp_path / "records")
    entry = runner.run("scaling_check", scratch_env(tmp_path, "scaletest"), {
        "url_override": bl_api_service.url, "dsn_override": pg_db, "target": 150.0, "p99_ms": 500.0,
        "steps": [50, 100, 150], "step_seconds": 1.5, "mix": "biglearn"},
        store=store, secrets={}, progress=False, log=lambda _m: None)
    assert entry["outcome"] == "succeeded", entry["error"]
    f = entry["figures"]
    assert f["verdict"] in ("pass", "fail")
    assert [s[0] for s in f["steps"]] == [50, 100, 150]
    assert f["missing_acknowledged"] == 0
    assert f["acknowledged_responses"] > 0
    assert f["knee_rule"].startswith("the highest step")
    assert f["limiting_resource"]
    nb = nbformat.reads(store.get(entry["notebook"]).decode(), as_version=4)
    pngs = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert pngs, "the curve's plot is in the record"
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "verdict:" in text
    assert "no Auto Scaling group" in text
