"""A release you can trust, on the lab: lock, gates, probe, rollback, and the faults it must
survive. Real hosts, real haproxy, real probe traffic through lb1."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from opsbook.core.paths import ROOT
from opsbook.engines import artifact
from opsbook.engines.lock import lock_for
from opsbook.engines.records.store import store_for
from tests.fixtures.lab import haproxy_status, invoke, ssh, start_invoke

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def served(env) -> dict[str, str | None]:
    from opsbook.engines import fleet
    return dict(fleet.served_versions(env))


def last_record(env, kind: str) -> dict:
    entries = [e for e in store_for(env).ledger()
               if e.get("runbook") == "release" and (e.get("figures") or {}).get("kind") == kind]
    assert entries, f"no {kind} record"
    return entries[-1]


def test_release_under_probe_then_rollback_with_zero_failed_requests_staging_where_missing(lab_env, fleet):
    a, b = fleet
    proc = invoke("release", "--env", "lab", "--version", b, check=True)
    assert "plan: release" in proc.stdout
    assert set(served(lab_env).values()) == {b}
    rec = last_record(lab_env, "release")
    figs = rec["figures"]
    assert rec["outcome"] == "succeeded"
    assert figs["version"] == b
    assert figs["requests"] > 50
    assert figs["failed_requests"] == 0
    assert figs["missing_acknowledged_writes"] == 0
    notebook = store_for(lab_env).get(rec["notebook"])
    assert b'"image/png"' in notebook   # the latency/errors plot is in the record

    # The rollback stages in its rolling switch's run where the release is missing. First a host where
    # staging cannot work (a file where the release's directory goes): the rollback ends before any
    # host is drained, says so, and changes nothing.
    root = yaml.safe_load((lab_env.path / "group_vars" / "app" / "main.yml").read_text())["app_root"]
    ssh("app3", f"rm -rf {root}/releases/{a}")
    ssh("app2", f"rm -rf {root}/releases/{a} && touch {root}/releases/{a}")
    try:
        failed = invoke("rollback", "--env", "lab")
    finally:
        ssh("app2", f"rm -f {root}/releases/{a}")
    out = failed.stdout + failed.stderr
    assert failed.returncode != 0, out[-3000:]
    assert "before any host was switched" in out, out[-3000:]
    assert set(served(lab_env).values()) == {b}
    assert all(haproxy_status(h.name) == "UP" for h in lab_env.hosts("app"))
    assert lock_for(lab_env).holder() is None
    rb = last_record(lab_env, "rollback")
    assert rb["outcome"] == "failed"
    assert "staging" in rb["figures"]["reason"]

    proc = invoke("rollback", "--env", "lab", check=True)
    assert f"rollback bl-api {a}" in proc.stdout
    assert set(served(lab_env).values()) == {a}
    rb = last_record(lab_env, "rollback")
    assert rb["outcome"] == "succeeded"
    assert rb["figures"]["failed_requests"] == 0
    assert rb["figures"]["missing_acknowledged_writes"] == 0
    for host in ("app2", "app3"):   # staged again where it was missing
        assert ssh(host, f"test -e {root}/releases/{a}/venv/.opsbook-complete && echo staged") == "staged"


def test_dry_run_prints_the_plan_and_changes_nothing(lab_env, fleet):
    _a, b = fleet
    before = served(lab_env)
    proc = invoke("release", "--env", "lab", "--version", b, "--dry-run", "--batch", "2", check=True)
    assert "batch 1: app1" in proc.stdout
    assert "app2" in proc.stdout
    assert "batch 2: app3" in proc.stdout
    assert "nothing was locked or changed" in proc.stdout
    assert served(lab_env) == before
    assert lock_for(lab_env).holder() is None


def test_second_release_during_the_first_is_refused_and_changes_nothing(lab_env, fleet):
    _a, b = fleet
    before = served(lab_env)
    with lock_for(lab_env).hold("a release already running (test)"):
        proc = invoke("release", "--env", "lab", "--version", b)
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "a release already running (test)" in err
    assert "Nothing was changed" in err
    assert served(lab_env) == before


def test_killed_lock_holder_blocks_until_its_lease_expires(lab_env, fleet):
    a, _b = fleet
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import time; from opsbook.engines.lock import lock_for; "
         "from opsbook.core.inventory import load; "
         "lock_for(load('lab'), lease_seconds=8).acquire('release that will be killed'); print('held', flush=True); "
         "time.sleep(600)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    refused = invoke("release", "--env", "lab", "--version", a)
    assert refused.returncode != 0
    assert "release that will be killed" in refused.stdout + refused.stderr
    time.sleep(9)
    proc = invoke("release", "--env", "lab", "--version", a, check=True)
    assert "expired" in proc.stdout   # the message says the previous holder's lease expired
    assert set(served(lab_env).values()) == {a}


def test_a_version_that_fails_its_health_check_returns_its_batch(lab_env, fleet, tmp_path):
    a, _b = fleet
    src = tmp_path / "app"
    shutil.copytree(ROOT / "app", src, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    handlers = src / "bl_api" / "handlers.py"
    text = handlers.read_text()
    marker = '    """Load-balancer health check: 200 only when this worker can reach the database."""\n'
    assert marker in text
    handlers.write_text(text.replace(marker, marker + '    return jsonify(status="broken on purpose"), 503\n'))
    broken = f"{artifact.default_version()}.broken"
    artifact.build(broken, log=lambda _m: None, source=src)

    proc = invoke("release", "--env", "lab", "--version", broken)
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "batch 1 (app1) failed" in err
    assert set(served(lab_env).values()) == {a}          # the batch went back; the rest never moved
    rec = last_record(lab_env, "release")
    assert rec["outcome"] == "failed"
    assert "app1" in rec["figures"]["reason"]
    assert rec["figures"]["failed_requests"] == 0        # the host was drained: users saw nothing
    assert rec["figures"]["missing_acknowledged_writes"] == 0
    assert all(haproxy_status(h.name) == "UP" for h in lab_env.hosts("app"))


def test_service_killed_while_its_host_is_released_stops_the_release(lab_env, fleet):
    a, b = fleet
    # As soon as app2 is switched to b (it is being released), its service is killed again and
    # again (a crash loop), the way a host dies in the middle of a deploy.
    ssh("app2", "rm -f /tmp/stop-killing; nohup timeout 600 sh -c 'until [ -e /tmp/stop-killing ]; do "
                f"if [ \"$(readlink /srv/bl-api/current)\" = /srv/bl-api/releases/{b} ]; then "
                "systemctl kill --signal=KILL bl-api 2>/dev/null; fi; sleep 0.2; done' >/dev/null 2>&1 &")
    try:
        release = invoke("release", "--env", "lab", "--version", b)
    finally:
        ssh("app2", "touch /tmp/stop-killing")
    out = release.stdout + release.stderr
    assert release.returncode != 0, out[-3000:]
    assert "batch 2 (app2) failed" in out
    rec = last_record(lab_env, "release")
    assert rec["outcome"] == "failed"
    assert "app2" in rec["figures"]["reason"]
    # While its service was dead the balancer sent it nothing: users saw no failed request.
    assert rec["figures"]["failed_requests"] == 0
    assert rec["figures"]["missing_acknowledged_writes"] == 0
    versions = served(lab_env)
    assert versions["app1"] == b          # batch 1 had passed
    assert versions["app2"] == a          # the failed batch went back to the version it had
    assert versions["app3"] == a          # untouched

    invoke("release", "--env", "lab", "--version", b, check=True)   # the next release converges
    assert set(served(lab_env).values()) == {b}
    invoke("check", "--env", "lab", check=True)


def test_status_is_read_only_and_names_versions_and_lock(lab_env):
    n_before = len(store_for(lab_env).ledger())
    proc = invoke("status", "--env", "lab", check=True)
    for h in lab_env.hosts("app"):
        assert h.name in proc.stdout
    assert "lock:" in proc.stdout
    assert "last " in proc.stdout
    # Releases run every expand phase of the code they ship; contracts wait for `invoke migrate`.
    assert "migrations: expand pending: none; contract pending: " in proc.stdout
    assert len(store_for(lab_env).ledger()) == n_before


def test_release_record_json_has_no_secret(lab_env, serving_fleet):
    secrets = [s for s in lab_env.secret_values().values() if s]
    # Vacuous otherwise: the lab's secrets must have been resolved for the check to mean anything.
    assert len(secrets) >= 2, "no secret value was resolved; the check would prove nothing"
    store = store_for(lab_env)
    releases = [e for e in store.ledger() if e.get("runbook") == "release"][-5:]
    assert releases, "no release record to check"
    for rec in releases:
        blob = json.dumps(rec) + store.get(rec["notebook"]).decode() + store.get(rec["html"]).decode()
        assert not any(s in blob for s in secrets), rec["id"]




# --- interrupted releases --------------------------------------------------------------------
def _release_until_batch(version: str, batch: int) -> tuple[subprocess.Popen, list[str]]:
    """Start `invoke release` and read its output until batch `batch` is draining its host."""
    proc = start_invoke("release", "--env", "lab", "--version", version)
    seen: list[str] = []
    assert proc.stdout is not None
    started = False
    for line in proc.stdout:
        seen.append(line)
        started = started or f"batch {batch - 1} done" in line
        if started and "TASK [app : Drain the host in the load balancer" in line:
            return proc, seen
    raise AssertionError(f"the release ended before batch {batch} switched:\n" + "".join(seen[-60:]))


@pytest.mark.parametrize("signals", [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM,)],
                         ids=["ctrl-c-twice", "sigterm"])
def test_a_release_interrupted_while_a_batch_switches_ends_in_order(lab_env, fleet, signals):
    a, b = fleet
    proc, seen = _release_until_batch(b, 2)
    for i, sig in enumerate(signals):
        if i:
            time.sleep(1.5)   # a second Ctrl-C while the release puts things back
        proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=600)
    out = "".join(seen) + rest
    assert proc.returncode == 130, out[-3000:]   # interrupted and ended in order, as every task says it
    assert f"interrupted by {signal.Signals(signals[0]).name}" in out or "Ctrl-C" in out, out[-3000:]
    # Every backend UP, each host serving exactly one version, the lock free.
    assert all(haproxy_status(h.name) == "UP" for h in lab_env.hosts("app")), out[-3000:]
    versions = served(lab_env)
    assert set(versions.values()) <= {a, b}, versions
    assert versions["app1"] == b           # batch 1 had passed
    assert versions["app3"] == a           # never touched
    assert lock_for(lab_env).holder() is None
    rec = last_record(lab_env, "release")
    assert rec["outcome"] == "interrupted", rec
    assert rec["figures"]["interrupted_in"] == "rolling switch"
    assert signal.Signals(signals[0]).name in rec["figures"]["reason"] or "Ctrl-C" in rec["figures"]["reason"]
    # The next release converges, with nothing lost.
    invoke("release", "--env", "lab", "--version", b, check=True)
    rec = last_record(lab_env, "release")
    assert set(served(lab_env).values()) == {b}
    assert rec["figures"]["failed_requests"] == 0
    assert rec["figures"]["missing_acknowledged_writes"] == 0


def test_a_version_too_slow_for_the_slo_fails_its_gate_and_returns_its_batch(lab_env, fleet, tmp_path):
    """Answers right, but every write takes longer than the SLO's p99 allows: the gate, not the
    health check, stops it."""
    a, _b = fleet
    src = tmp_path / "app"
    shutil.copytree(ROOT / "app", src, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    handlers = src / "bl_api" / "handlers.py"
    text = handlers.read_text()
    slow = lab_env.var("opsbook_release_slo")["max_p99_ms"] / 1000 + 0.5
    marker = "def record_responses():\n"
    assert marker in text
    handlers.write_text(text.replace(marker, marker + f"    time.sleep({slow})\n"))
    version = f"{artifact.default_version()}.slow"
    artifact.build(version, log=lambda _m: None, source=src)

    proc = invoke("release", "--env", "lab", "--version", version)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "batch 1 (app1) missed the SLO" in out
    assert set(served(lab_env).values()) == {a}          # the batch went back
    rec = last_record(lab_env, "release")
    assert rec["outcome"] == "failed"
    assert "p99" in rec["figures"]["reason"]
    assert all(haproxy_status(h.name) == "UP" for h in lab_env.hosts("app"))


def test_a_contract_is_refused_while_a_release_holds_the_lock(lab_env, fleet):
    with lock_for(lab_env).hold("a release already running (test)"):
        proc = invoke("migrate", "--env", "lab", "--phase", "contract")
    assert proc.returncode != 0
    assert "a release already running (test)" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(("release", "--batch", "abc"), "neither a positive number", id="batch-abc"),
        pytest.param(("release", "--batch", "0"), "neither a positive number", id="batch-0"),
        pytest.param(("release", "--batch", "101%"), "neither a positive number", id="batch-101%"),
        pytest.param(("rollback", "--to", "0.0.0-nope"), "does not exist", id="rollback-to-unknown"),
    ],
)
def test_bad_input_is_refused_clearly_and_changes_nothing(lab_env, fleet, args, message):
    n_before = len(store_for(lab_env).ledger())
    extra = ("--version", fleet[1]) if args[0] == "release" else ()
    proc = invoke(args[0], "--env", "lab", *extra, *args[1:])
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert set(served(lab_env).values()) == {fleet[0]}
    assert len(store_for(lab_env).ledger()) == n_before
    assert lock_for(lab_env).holder() is None


# --- hosts and the database going away mid-release -------------------------------------------
def test_a_host_killed_in_the_middle_of_a_release(lab_env, fleet):
    from opsbook.engines import lab

    _a, b = fleet
    proc, seen = _release_until_batch(b, 2)        # app2 is being drained
    lab.podman("kill", "opsbook-lab-app2")
    rest, _ = proc.communicate(timeout=600)
    out = "".join(seen) + rest
    assert proc.returncode != 0, out[-3000:]
    rec = last_record(lab_env, "release")
    assert rec["outcome"] == "failed"
    assert "app2" in rec["figures"]["reason"]
    status = invoke("status", "--env", "lab", check=True).stdout
    assert re.search(r"app2\s+not serving", status), status       # status tells the truth
    assert lock_for(lab_env).holder() is None
    assert all(haproxy_status(h) == "UP" for h in ("app1", "app3"))
    # The host comes back (lab.up recreates it from the image, unprovisioned, like a replaced
    # instance); the next release provisions it and converges the fleet, with nothing lost.
    invoke("lab.up", check=True)
    invoke("release", "--env", "lab", "--version", b, check=True)
    assert set(served(lab_env).values()) == {b}
    rec = last_record(lab_env, "release")
    assert rec["figures"]["converged"] == ["app2"]      # only the new host needed provisioning
    assert rec["figures"]["failed_requests"] == 0
    assert rec["figures"]["missing_acknowledged_writes"] == 0
    assert all(haproxy_status(h.name) == "UP" for h in lab_env.hosts("app"))


def test_the_database_stopped_in_the_middle_of_a_release(lab_env, fleet):
    _a, b = fleet
    proc, seen = _release_until_batch(b, 2)
    ssh("db1", "systemctl stop postgresql")
    try:
        rest, _ = proc.communicate(timeout=600)
        status = invoke("status", "--env", "lab", check=True).stdout
    finally:
        ssh("db1", "systemctl start postgresql")
    out = "".join(seen) + rest
    assert proc.returncode != 0, out[-3000:]
    rec = last_record(lab_env, "release")
    assert rec["outcome"] == "failed"
    assert "batch 2" in rec["figures"]["reason"]
    assert "database not reachable" in status
    assert lock_for(lab_env).holder() is None
    # Once the database is back and the service answers again (bl-api's connection pool reconnects with
    # a backoff, which after a minute-long outage can take tens of seconds), the next release converges
    # with nothing lost.
    _wait_until_every_app_host_answers_ping(lab_env, timeout=180)
    invoke("release", "--env", "lab", "--version", b, check=True)
    assert set(served(lab_env).values()) == {b}
    rec = last_record(lab_env, "release")
    assert rec["figures"]["failed_requests"] == 0
    assert rec["figures"]["missing_acknowledged_writes"] == 0
    assert all(haproxy_status(h.name) == "UP" for h in lab_env.hosts("app"))


def _wait_until_every_app_host_answers_ping(env, timeout: float) -> None:
    import urllib.request

    port = env.var("bl_api_port")
    deadline = time.monotonic() + timeout
    waiting = [h.address for h in env.hosts("app")]
    while waiting and time.monotonic() < deadline:
        still = []
        for address in waiting:
            try:
                with urllib.request.urlopen(f"http://{address}:{port}/ping", timeout=3) as r:
                    if r.status != 200:
                        still.append(address)
            except OSError:
                still.append(address)
        waiting = still
        if waiting:
            time.sleep(1)
    assert not waiting, f"app hosts {waiting} did not answer /ping within {timeout:.0f}s of the database's return"


def test_the_controller_killed_mid_batch_status_tells_the_truth_and_the_next_release_converges(lab_env, fleet):
    """SIGKILL: nothing of opsbook's runs (no put-back, no record, the lock stays). What must hold is
    that Ansible dies with it, that `invoke status` says how things really are, and that the next
    release waits out the dead holder's lease and converges with nothing lost."""
    _a, b = fleet
    proc, _seen = _release_until_batch(b, 2)        # app2 is being drained
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 30                # Ansible gets SIGTERM when its parent dies
    while time.monotonic() < deadline and subprocess.run(
            ["pgrep", "-f", "ansible-playbook.*switch.yml"], capture_output=True, check=False).returncode == 0:
        time.sleep(0.5)
    assert subprocess.run(["pgrep", "-f", "ansible-playbook.*switch.yml"], capture_output=True,
                          check=False).returncode != 0, "ansible-playbook outlived the killed release"

    status = invoke("status", "--env", "lab", check=True).stdout
    versions = served(lab_env)
    for h in lab_env.hosts("app"):
        line = next((x for x in status.splitlines() if x.strip().startswith(f"{h.name} ")), "")
        assert (versions[h.name] or "not serving") in line, status
        assert f"lb1 {haproxy_status(h.name)}" in line, status
    assert f"its process {proc.pid} no longer runs on this machine" in status, status
    holder = lock_for(lab_env).holder()
    assert holder is not None
    assert holder.pid == proc.pid

    lease = float(lab_env.var("opsbook_lock_lease_seconds"))
    done = invoke("release", "--env", "lab", "--version", b, "--wait", str(int(lease) + 30), check=True)
    assert "expired" in done.stdout           # it says it took over a dead holder's lease
    assert set(served(lab_env).values()) == {b}
    rec = last_record(lab_env, "release")
    assert rec["outcome"] == "succeeded"
    assert rec["figures"]["failed_requests"] == 0
    assert rec["figures"]["missing_acknowledged_writes"] == 0
    assert all(haproxy_status(h.name) == "UP" for h in lab_env.hosts("app"))
    assert lock_for(lab_env).holder() is None
