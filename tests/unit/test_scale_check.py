"""The scaling check's arithmetic on real data structures: the knee and its stated rule, the limiting
resource, the verdict against a target, the demonstrated-at-scale gate over ledger entries written the
way the scaling_check runbook writes them, and refusals before any load is sent."""

from __future__ import annotations

import json
import shutil
import socket
import threading
from datetime import UTC, datetime, timedelta

import pytest
import yaml

from opsbook.core.errors import OpsbookError
from opsbook.core.paths import INVENTORIES
from opsbook.engines import load, scale_gate
from opsbook.engines.load import curve
from opsbook.operations import scale_check as sc

SHA = "a" * 64


def step(i: int, offered: float, achieved: float, p99: float, *, ok: int = 1000, errors: dict | None = None,
         generator_cpu: float = 0.3) -> load.StepResult:
    return load.StepResult(
        index=i, offered_responses_per_s=offered, offered_requests_per_s=offered / 10, start=1000.0 + i * 10,
        end=1010.0 + i * 10, seconds=10, scheduled=ok + sum((errors or {}).values()),
        scheduled_responses=int(offered * 10), sent=ok, ok=ok,
        errors=errors or {}, acknowledged_responses=int(achieved * 10), achieved_requests_per_s=achieved / 10,
        achieved_responses_per_s=achieved, p50_ms=p99 / 4, p95_ms=p99 / 2, p99_ms=p99, max_ms=p99 * 1.5,
        service_p99_ms=p99 / 2, send_lag_p99_ms=1.0, max_in_flight=20, in_flight_cap_hits=0,
        generator_cpu=generator_cpu, by_kind={})


def ctx(target: float = 3000, p99: float = 200, **kw) -> sc.Context:
    return sc.Context(env="lab", kind="lab", url="http://10.89.7.10:80", conninfo="", target=curve.Target(target, p99),
                      steps=[1000, 2000, 3000, 4000], mix="record10", app_hosts=["app1", "app2", "app3"],
                      version="1.2.0", artifact_sha256=SHA, **kw)


def checked(steps: list[load.StepResult], *, missing: int | None = 0, c: sc.Context | None = None, machine=None):
    c = c or ctx()
    rows = sc.curve_rows(c, steps, machine)
    result = load.LoadResult(plan=None, steps=steps, setup={"courses_created": 200}, stopped_by="plan",
                             acknowledged_file="", acknowledged_total=sum(s.acknowledged_responses for s in steps),
                             generator={}, courses=[])
    lost = {"acknowledged": result.acknowledged_total, "missing": missing, "error": None}
    return sc.judge(c, result, rows, lost, problems=[], started=0.0, ended=60.0)


CURVE = [step(1, 1000, 1000, 40), step(2, 2000, 1995, 60), step(3, 3000, 2990, 120), step(4, 4000, 3300, 900)]


# --- the knee ---------------------------------------------------------------------------------------------
def test_the_knee_is_the_last_passing_step_before_the_first_failing_one():
    check = checked(CURVE)
    assert (check.knee.index, check.knee.offered, check.knee.achieved) == (3, 3000, 2990)
    assert check.knee.first_failing == 4
    assert any("p99 900 ms > 200 ms" in r for r in check.knee.failing_reasons)
    assert any("achieved 0.82" in r for r in check.knee.failing_reasons)
    assert "every lower step" in check.knee.rule
    assert check.capacity_per_host() == pytest.approx(996.7, abs=0.1)


def test_a_step_that_passes_above_a_failing_one_does_not_move_the_knee():
    bent = [step(1, 1000, 1000, 40), step(2, 2000, 1500, 300), step(3, 3000, 2990, 120)]
    assert checked(bent).knee.index == 1


@pytest.mark.parametrize(("achieved", "errors", "passes"), [
    pytest.param(1980, {}, True, id="achieved-0.99"),
    pytest.param(1950, {}, False, id="achieved-0.975"),
    pytest.param(2000, {"HTTP 503": 9}, True, id="errors-0.9%"),
    pytest.param(2000, {"HTTP 503": 11}, False, id="errors-1.1%"),
])
def test_the_knee_rule_thresholds(achieved, errors, passes):
    s = step(1, 2000, achieved, 50, ok=1000 - sum(errors.values()), errors=errors)
    assert (checked([s]).knee.index == 1) is passes


def test_no_passing_step_has_no_knee():
    check = checked([step(1, 1000, 400, 2000)])
    assert check.knee.index is None
    assert check.capacity_per_host() is None


# --- the limiting resource ----------------------------------------------------------------------------------
class FakeMachine:
    """Stands in for MachineSampler's two questions with fixed answers (its sampling is tested on the lab)."""

    def __init__(self, cpu: float, db: dict | None = None):
        self.cpu, self.db = cpu, db or {}

    def machine_cpu(self, start, end):
        return self.cpu

    def database(self, start, end):
        return self.db


def test_a_busy_machine_is_named_as_the_limit_in_the_lab():
    check = checked(CURVE, machine=FakeMachine(0.97))
    assert check.limit.resource == "machine cpu"
    assert "share" in check.limit.detail


def test_a_saturated_generator_is_a_limit_and_is_said():
    steps = [*CURVE[:3], step(4, 4000, 3300, 900, generator_cpu=0.98)]
    check = checked(steps, machine=FakeMachine(0.5))
    assert check.limit.resource == "load generator"
    assert check.generator_saturated
    assert sc.figures(check)["generator_saturated"] is True


def test_lock_waits_name_the_database():
    check = checked(CURVE, machine=FakeMachine(0.5, {"lock_waits_max": 30}))
    assert check.limit.resource == "database locks"


def test_nothing_saturated_says_so():
    check = checked(CURVE, machine=FakeMachine(0.4))
    assert check.limit.resource == "none identified"


# --- the verdict ---------------------------------------------------------------------------------------------
def test_the_verdict_passes_at_the_target():
    check = checked(CURVE)
    assert check.verdict.passed
    assert check.verdict.step == 3
    figures = sc.figures(check)
    assert figures["verdict"] == "pass"
    assert figures["p99_ms_at_target"] == 120
    assert figures["knee_responses_per_s"] == 2990
    json.dumps(figures)   # a ledger entry's figures are JSON


@pytest.mark.parametrize(("steps", "missing", "why"), [
    pytest.param([step(1, 1000, 1000, 40), step(2, 2000, 2000, 60)], 0, "no step offered the target", id="too-low"),
    pytest.param([step(1, 3000, 2990, 250)], 0, "p99 250", id="slow"),
    pytest.param([step(1, 3000, 2990, 120, ok=999, errors={"HTTP 503": 1})], 0, "budget", id="one-error"),
    pytest.param(CURVE, 3, "3 acknowledged responses are missing", id="lost-writes"),
    pytest.param(CURVE, None, "not counted", id="unverified"),
])
def test_the_verdict_fails_and_says_why(steps, missing, why):
    check = checked(steps, missing=missing)
    assert not check.verdict.passed
    assert any(why in r for r in check.verdict.reasons), check.verdict.reasons


# --- the gate ------------------------------------------------------------------------------------------------
def ledger_entry(check: sc.CheckRun, *, env: str = "lab", age: timedelta = timedelta(hours=1),
                 outcome: str = "succeeded") -> dict:
    """A ledger entry as the runner writes it for the scaling_check runbook."""
    start = datetime.now(UTC) - age
    return {"id": f"{start:%Y%m%dT%H%M%SZ}-scaling_check-abc123", "runbook": "scaling_check", "env": env,
            "start": start.isoformat(timespec="seconds"), "outcome": outcome, "figures": sc.figures(check)}


REQ = scale_gate.Requirement(3000, 200, 0.0, timedelta(days=7), ("staging", "lab"))


def test_the_gate_accepts_a_passing_check_of_the_same_artifact():
    d = scale_gate.decide(REQ, SHA, [ledger_entry(checked(CURVE))])
    assert d.passed
    assert d.evidence["env"] == "lab"
    assert "passed by record" in d.text()


@pytest.mark.parametrize(("entry", "why"), [
    pytest.param(lambda: ledger_entry(checked(CURVE, c=ctx(target=2000))), "below the 3000/s", id="lower-target"),
    pytest.param(lambda: ledger_entry(checked(CURVE), env="prod"), "not on staging or lab", id="wrong-env"),
    pytest.param(lambda: ledger_entry(checked(CURVE), age=timedelta(days=8)), "older than", id="too-old"),
    pytest.param(lambda: ledger_entry(checked(CURVE, missing=2)), "verdict fail", id="lost-writes"),
    pytest.param(lambda: ledger_entry(checked(CURVE, c=ctx(p99=500))), "looser than 200", id="looser-p99"),
    pytest.param(lambda: {**ledger_entry(checked(CURVE)),
                          "figures": {**sc.figures(checked(CURVE)), "artifact_sha256": "b" * 64}},
                 "another artifact", id="other-artifact"),
])
def test_the_gate_refuses_what_does_not_demonstrate_this_artifact_at_scale(entry, why):
    d = scale_gate.decide(REQ, SHA, [entry()])
    assert not d.passed
    assert any(why in m for m in d.misses), d.misses


def test_the_gate_takes_the_newest_qualifying_record_among_others():
    entries = [ledger_entry(checked(CURVE, missing=1), age=timedelta(hours=1)),
               ledger_entry(checked(CURVE), age=timedelta(days=2)),
               {"id": "x", "runbook": "release", "env": "lab", "start": "2026-01-01T00:00:00+00:00", "figures": {}}]
    d = scale_gate.decide(REQ, SHA, entries)
    assert d.passed
    assert d.evidence["id"] == entries[1]["id"]
    assert len(d.misses) == 1


def test_skipping_needs_a_reason_and_is_what_the_decision_says():
    d = scale_gate.decide(REQ, SHA, [], skip_reason="hotfix for incident 42")
    assert d.passed
    assert "SKIPPED" in d.text()
    assert "incident 42" in d.text()
    assert not scale_gate.decide(REQ, SHA, [], skip_reason="  ").passed


def _lab_copy(tmp_path, **values):
    """The lab's inventory under a new name, with its record store in tmp_path and `values` added."""
    from opsbook.core.inventory import Env

    path = tmp_path / "labcopy"
    shutil.copytree(INVENTORIES / "lab", path)
    secrets = tmp_path / "labdir" / "secrets"
    secrets.mkdir(parents=True)
    for name in ("bl_api_db_password", "opsbook_db_admin_password"):
        (secrets / name).write_text("not-a-real-secret")
    (path / "group_vars" / "all" / "zz-test.yml").write_text(yaml.safe_dump(
        {"opsbook_record_store": str(tmp_path / "records"), "opsbook_lab_dir": str(tmp_path / "labdir"), **values}))
    return Env("labcopy", path=path)


def test_the_gate_reads_the_record_store_with_the_lab_standing_in_for_prod(tmp_path):
    from opsbook.engines.records.store import store_for

    env = _lab_copy(tmp_path, opsbook_require_scale_check=True, opsbook_scale_check_from=["labcopy"],
                    opsbook_scale_check_max_age="7d")
    with pytest.raises(scale_gate.ScaleGateRefused) as refused:
        scale_gate.check_release(env, "1.2.0", SHA)
    text = str(refused.value)
    assert "Nothing was changed" in text
    assert "invoke scale.check --env labcopy" in text
    assert "--skip-scale-check --reason R" in text
    entry = ledger_entry(checked(CURVE), env="labcopy")
    store_for(env).write_record(entry, b"{}", b"<html></html>")
    d = scale_gate.check_release(env, "1.2.0", SHA)
    assert d.passed
    assert d.evidence["id"] == entry["id"]
    with pytest.raises(scale_gate.ScaleGateRefused, match="another artifact"):
        scale_gate.check_release(env, "1.2.1", "c" * 64)
    assert scale_gate.check_release(env, "1.2.1", "c" * 64, skip_reason="incident 42").skipped_reason == "incident 42"


def test_an_environment_that_asks_for_no_check_is_not_gated(tmp_path):
    env = _lab_copy(tmp_path)
    assert not scale_gate.check_release(env, "1.2.0", SHA).required


def test_prod_asks_for_the_check():
    from opsbook.core.inventory import load as load_inventory

    req = scale_gate.requirement(load_inventory("prod"))
    assert req is not None
    assert req.responses_per_s >= 3000
    assert req.from_envs == ("staging", "lab")


def test_a_release_to_prod_without_a_reason_to_skip_is_refused_before_anything():
    from opsbook.operations import release

    with pytest.raises(OpsbookError, match="needs --reason"):
        release.release(object(), skip_scale_check=True, reason="")


# --- refusals before any load ---------------------------------------------------------------------------------
@pytest.fixture
def listener():
    """A TCP listener on loopback that counts the connections made to it (none may be)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(0.2)
    seen = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            seen.append(conn)
            conn.close()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", seen
    stop.set()
    t.join()
    sock.close()


@pytest.mark.parametrize(("kwargs", "values", "why"), [
    pytest.param({"steps": "1000,-5"}, {}, "positive", id="negative-rate"),
    pytest.param({"steps": "3000,1000"}, {}, "must go up", id="falling-rates"),
    pytest.param({"steps": "1000,lots"}, {}, "not a number", id="not-a-number"),
    pytest.param({"target": -3.0}, {}, "positive", id="negative-target"),
    pytest.param({"mix": "everything"}, {}, "unknown traffic mix", id="unknown-mix"),
    pytest.param({"step_seconds": 0}, {}, "positive seconds", id="zero-seconds"),
    pytest.param({"steps": "1000,2000", "step_seconds": 400}, {}, "more than max_seconds", id="over-time-cap"),
    pytest.param({}, {"opsbook_scale_check_protected": True}, "--allow-prod", id="prod-without-reason"),
    pytest.param({"allow_prod": True}, {"opsbook_scale_check_protected": True}, "--allow-prod", id="prod-no-reason"),
    pytest.param({}, {"opsbook_scale_target": None}, "declares no scaling target", id="no-target"),
    pytest.param({}, {"opsbook_scale_url": "http://192.0.2.10:80"}, "outside this environment", id="off-network"),
    pytest.param({}, {"opsbook_scale_url": "http://example.com"}, "a name, not an address", id="by-name"),
])
def test_bad_parameters_are_refused_before_any_request(tmp_path, listener, kwargs, values, why):
    url, seen = listener
    env = _lab_copy(tmp_path, **{"opsbook_scale_url": url, **values})
    with pytest.raises(OpsbookError, match=why) as refused:
        sc.scale_check(env, **kwargs, out=lambda _m: None)
    assert "No load was sent" in str(refused.value) or "Nothing was sent" in str(refused.value)
    assert seen == []


def test_an_environment_without_a_load_balancer_is_refused(tmp_path, listener):
    from opsbook.core.inventory import Env

    _url, seen = listener
    path = tmp_path / "nolb"
    shutil.copytree(INVENTORIES / "lab", path)
    hosts = yaml.safe_load((path / "hosts.yml").read_text())
    del hosts["all"]["children"]["lb"]
    (path / "hosts.yml").write_text(yaml.safe_dump(hosts))
    with pytest.raises(sc.ScaleCheckRefused, match="has no load balancer"):
        sc.scale_check(Env("nolb", path=path), out=lambda _m: None)
    assert seen == []


def test_a_dry_run_sends_nothing_and_shows_the_plan(tmp_path, listener):
    url, seen = listener
    lines: list[str] = []
    env = _lab_copy(tmp_path, opsbook_scale_url=url)
    c = sc.scale_check(env, steps="500,1000", step_seconds=5, dry_run=True, out=lines.append)
    assert c.steps == [500.0, 1000.0]
    assert c.url == url
    assert seen == []


def test_the_cli_path_of_a_prod_release_as_far_as_it_gets_here():
    """`invoke release --env prod` is refused by the account check first (no credentials profile on this
    machine); `--skip-scale-check` without a reason is refused before even that."""
    import subprocess
    import sys

    from opsbook.core.paths import ROOT

    def invoke(*args):
        return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, check=False)

    no_reason = invoke("release", "--env", "prod", "--skip-scale-check")
    assert no_reason.returncode == 1
    assert "--skip-scale-check needs --reason R" in no_reason.stderr
    refused = invoke("release", "--env", "prod")
    assert refused.returncode == 1
    assert "Nothing was changed" in refused.stderr
    assert "profile" in refused.stderr or "account" in refused.stderr


def test_the_records_site_gets_a_scaling_check_page_with_its_figures(tmp_path):
    import nbformat

    from opsbook.engines.records.store import LocalStore
    from opsbook.operations.records_site import builder

    store = LocalStore(tmp_path / "records")
    empty = nbformat.writes(nbformat.v4.new_notebook()).encode()
    for i, age in enumerate((timedelta(hours=3), timedelta(hours=1))):
        e = ledger_entry(checked(CURVE), age=age)
        e |= {"id": e["id"].replace("abc123", f"abc12{i}"), "parameters": {"steps": [1000, 2000]}, "operator": "t",
              "git_sha": "abc", "end": e["start"], "duration_s": 60.0, "error": None, "parent_record_id": None}
        store.write_record(e, empty, b"<html></html>")
    built = builder.build(store, log=lambda _m: None)
    assert "runbooks/scaling_check.html" in built.rendered
    page = (tmp_path / "records" / "site" / "runbooks" / "scaling_check.html").read_text()
    for figure in ("knee_responses_per_s", "capacity_per_host", "p99_ms_at_target", "verdict"):
        assert figure in page
