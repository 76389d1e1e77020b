"""The release probe against a real bl-api (gunicorn + Postgres on 127.0.0.1)."""

from __future__ import annotations

import time

import psycopg
import pytest

from opsbook.core.inventory import load
from opsbook.engines.probe import FAILED, OK, Probe, ProbeError, ProbeResults, Sample, percentile

SLO = {"max_failed_requests": 0, "max_p99_ms": 2000}


@pytest.mark.postgres
def test_a_clean_run_has_no_failures_no_missing_writes_and_draws_a_plot(bl_api_service, tmp_path):
    probe = Probe(bl_api_service.url, rate=30, seed=1).start()
    time.sleep(1.5)
    probe.mark("batch 1")
    time.sleep(1.5)
    report = probe.stop()

    figures = report.figures()
    assert report.failed == 0, report.errors()
    assert report.client_errors == 0, report.errors()
    assert report.missing_acknowledged_writes == []
    assert figures["acknowledged_writes"] >= 20          # ~15 writes x 3 responses were acknowledged
    assert 50 <= report.requests <= 100                  # 30/s for ~3 s
    assert {s.kind for s in report.samples} == {"write", "read", "ping"}
    assert report.phase_names() == ["before", "batch 1"]
    assert figures["phases"]["before"]["requests"] > 20
    assert figures["phases"]["batch 1"]["requests"] > 20
    assert report.p50_ms is not None
    assert report.p99_ms >= report.p50_ms
    assert report.within(SLO) == (True, [])
    assert report.phase_within("batch 1", SLO) == (True, [])
    # A tighter latency objective than any real request can meet fails, and says why.
    ok, reasons = report.within({"max_p99_ms": 0.001})
    assert not ok
    assert "p99 latency" in reasons[0]

    png = report.plot(tmp_path / "probe.png")
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG")
    assert len(data) > 10_000


@pytest.mark.postgres
def test_taking_the_service_away_mid_probe_counts_failures_in_that_phase(bl_api_service, tmp_path):
    probe = Probe(bl_api_service.url, rate=30, timeout=2, seed=2).start()
    time.sleep(1.2)
    probe.mark("outage")
    bl_api_service.stop()
    time.sleep(1.2)
    probe.mark("restarting")
    bl_api_service.start()
    probe.mark("after")
    time.sleep(1.2)
    report = probe.stop()

    before, outage, after = report.phase("before"), report.phase("outage"), report.phase("after")
    assert before["failed"] == 0
    assert outage["failed"] >= 20, report.errors()       # ~36 requests, all refused
    assert after["failed"] == 0, report.errors()
    assert after["requests"] >= 20
    assert report.failed >= outage["failed"]
    assert any("ConnectError" in text for text, _n in report.errors())
    # Refused writes were never acknowledged, so none is missing.
    assert report.missing_acknowledged_writes == []
    ok, reasons = report.within(SLO)
    assert not ok
    assert any("failed requests" in r for r in reasons)
    # The refusal says what failed and when, for whoever reads it without the record.
    assert any(r.startswith("what failed: ") and "ConnectError" in r and "(during outage)" in r for r in reasons)
    assert report.phase_within("before", SLO) == (True, [])
    assert report.phase_within("after", SLO) == (True, [])
    assert not report.phase_within("outage", SLO)[0]
    assert report.plot(tmp_path / "outage.png").stat().st_size > 10_000


@pytest.mark.postgres
def test_an_acknowledged_write_deleted_from_the_database_is_reported_missing(bl_api_service):
    probe = Probe(bl_api_service.url, rate=30, seed=3).start()
    time.sleep(1.0)
    probe.mark("batch 1")
    deadline = time.monotonic() + 10
    while not probe.results().acknowledged and time.monotonic() < deadline:
        time.sleep(0.1)
    lost = next(iter(probe.results().acknowledged))
    with psycopg.connect(bl_api_service.database_url, autocommit=True) as conn:
        assert conn.execute("DELETE FROM course_events WHERE event_uuid = %s", [lost]).rowcount == 1
    time.sleep(0.5)
    report = probe.stop()

    assert report.failed == 0, report.errors()
    assert report.missing_acknowledged_writes == [lost]
    assert report.figures()["missing_acknowledged_writes"] == 1
    assert report.phase(report.acknowledged[lost])["missing_acknowledged_writes"] == 1
    ok, reasons = report.within(SLO)
    assert not ok
    assert reasons == [f"1 acknowledged writes are missing (SLO allows 0), e.g. {[lost]}"]


@pytest.mark.postgres
def test_the_probe_stops_by_itself_after_max_seconds(bl_api_service):
    probe = Probe(bl_api_service.url, rate=20, max_seconds=1.0).start()
    time.sleep(2.0)
    count = len(probe.results().samples)
    time.sleep(0.5)
    assert len(probe.results().samples) == count          # nothing sent after max_seconds
    report = probe.stop()
    assert report.stopped_by == "max_seconds"
    assert 10 <= report.requests <= 30
    assert report.duration_s < 1.5
    assert report.missing_acknowledged_writes == []


def test_a_probe_that_cannot_reach_the_service_refuses_to_start():
    probe = Probe("http://127.0.0.1:9", rate=5, timeout=0.5)
    with pytest.raises(ProbeError, match=r"could not create its courses.*no traffic"):
        probe.start()


def _sample(t, phase, outcome=OK, latency=10.0, status=200):
    return Sample(t, 1_700_000_000 + t, phase, "ping", outcome, status, None, latency)


def test_slo_gates_on_figures_per_phase_and_for_the_whole_run():
    samples = [_sample(i * 0.1, "before") for i in range(50)]
    samples += [_sample(5 + i * 0.1, "batch 1", latency=3000.0 if i < 2 else 12.0) for i in range(50)]
    samples += [_sample(10.5, "batch 1", outcome=FAILED, status=None, latency=1.0)]
    report = ProbeResults("http://lb", 1_700_000_000, 11, samples,
                         [("before", 0, 5), ("batch 1", 5, 11)], {"a": "before"}, [])
    assert report.phase_within("before", SLO) == (True, [])
    ok, reasons = report.phase_within("batch 1", SLO)
    assert not ok
    assert reasons == ["phase 'batch 1': 1 failed requests (SLO allows 0)",
                       "phase 'batch 1': p99 latency 3000 ms (SLO allows 2000 ms)"]
    assert report.within({**SLO, "max_failed_requests": 1, "max_p99_ms": 5000}) == (True, [])
    unverified = ProbeResults("http://lb", 0, 1, samples[:5], [("before", 0, 1)], {}, None)
    assert not unverified.within(SLO)[0]
    with pytest.raises(ProbeError, match="no phase 'batch 9'"):
        report.phase("batch 9")


def test_percentile_is_nearest_rank():
    assert percentile([], 99) is None
    assert percentile([5.0], 50) == 5.0
    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile(list(range(1, 101)), 50) == 50
    assert percentile([1, 2, 3, 1000], 99) == 1000


def test_the_lab_inventory_points_the_probe_at_its_load_balancer_and_names_the_slo():
    from opsbook.engines.probe import probe_for, slo_for

    probe = probe_for(load("lab"))                              # built only: sends nothing until start()
    assert probe.base_url == "http://10.89.7.10:80"
    assert probe.rate == 20
    assert probe.max_seconds == 3600
    assert slo_for(load("lab")) == {"max_failed_requests": 0, "max_p99_ms": 2000,
                              "max_missing_acknowledged_writes": 0, "max_client_errors": 0}


def test_a_fleet_already_slow_before_a_change_is_judged_against_its_own_baseline():
    """A release that would fix a slow fleet must not be blamed for the slowness it found; one that
    makes a healthy fleet slow is still stopped."""
    slow_before = [_sample(i * 0.1, "before", latency=2500.0 if i % 3 else 20.0) for i in range(60)]
    better = [_sample(6 + i * 0.1, "batch 1", latency=2400.0 if i % 3 == 1 else 15.0) for i in range(60)]
    worse = [_sample(12 + i * 0.1, "batch 2", latency=4000.0 if i % 3 else 15.0) for i in range(60)]
    results = ProbeResults("http://lb", 1_700_000_000, 18, slow_before + better + worse,
                           [("before", 0, 6), ("batch 1", 6, 12), ("batch 2", 12, 18)], {}, [])
    gate, note = results.baseline_slo(SLO)
    assert gate["max_p99_ms"] == 3125            # 1.25 x the 2500 ms the fleet had before
    assert "already missed its p99 objective" in note
    assert results.phase_within("batch 1", gate)[0]
    assert not results.phase_within("batch 2", gate)[0]
    healthy = ProbeResults("http://lb", 1_700_000_000, 12, [_sample(i * 0.1, "before") for i in range(60)] + worse,
                           [("before", 0, 6), ("batch 2", 12, 18)], {}, [])
    assert healthy.baseline_slo(SLO) == (SLO, None)   # a healthy baseline keeps the SLO as it is
