"""The lab end to end: provisioning, a release from one version to another, the service
through the load balancer, and the bad inputs an operator can meet. Real hosts over SSH."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import pytest

from opsbook.core.paths import ROOT
from opsbook.engines.ansible import ansible_env
from opsbook.engines.probe import Probe, probe_url
from tests.fixtures.lab import ensure_converged, haproxy_status, http_json, invoke, new_uuid, ssh, start_invoke

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def fleet_state(env) -> dict[str, tuple[str, str]]:
    """host -> (release `current` points at, main PID of the service)."""
    out = {}
    for h in env.hosts("app"):
        out[h.name] = (
            ssh(h.name, "readlink /srv/bl-api/current || true"),
            ssh(h.name, "systemctl show -p MainPID --value bl-api"),
        )
    return out


def served_versions(env) -> dict[str, str]:
    port = env.var("bl_api_port")
    return {h.name: http_json(f"http://{h.address}:{port}/version")[1].get("version") for h in env.hosts("app")}


# --- bad input changes nothing ----------------------------------------------------------
def test_release_to_unknown_env_names_the_environments_that_exist():
    proc = invoke("release", "--env", "nope")
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert "unknown environment 'nope'" in err
    for name in ("lab", "prod", "staging"):
        assert name in err
    assert "Traceback" not in err


def test_release_of_a_missing_artifact_touches_no_host(lab_env):
    before = fleet_state(lab_env)
    proc = invoke("release", "--env", "lab", "--version", "0.0.0-missing")
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert "0.0.0-missing does not exist" in err
    assert "invoke build --version 0.0.0-missing" in err
    assert "No host was touched" in err
    assert "PLAY" not in proc.stdout   # no playbook ran
    assert fleet_state(lab_env) == before


def test_release_to_an_aws_environment_without_its_credentials_is_refused_before_anything(test_versions):
    # prod lives in its own AWS account, named with its credentials profile in the inventory; this
    # machine has no such profile. The account check refuses before any database, lock, host or AWS
    # API is asked (unshare -n: there is nothing to ask), and says what to do.
    proc = subprocess.run(["unshare", "-n", sys.executable, "-m", "invoke", "release", "--env", "prod",
                           "--version", test_versions[0]], cwd=ROOT, capture_output=True, text=True, check=False,
                          timeout=120)
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert "the AWS profile 'opsbook-prod' that prod names (opsbook_aws_profile) is not configured" in err
    assert "Nothing was changed" in err
    assert "Traceback" not in err


def test_lab_up_without_podman_says_what_to_do(tmp_path):
    # A PATH with our Python but no podman: what a machine without podman looks like.
    proc = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), "-c",
         "from opsbook.core.inventory import load; from opsbook.engines import lab; "
         "lab.up(load('lab'))"],
        cwd=ROOT, capture_output=True, text=True, env={"PATH": str(tmp_path), "HOME": str(tmp_path)},
        check=False)
    assert proc.returncode != 0
    assert "podman is not installed" in proc.stderr
    assert "apt-get install podman" in proc.stderr


def test_lab_up_refuses_a_subnet_already_taken(tmp_path, lab_env):
    from opsbook.core.inventory import Env
    from opsbook.engines import lab

    inv = tmp_path / "otherlab"
    (inv / "group_vars" / "all").mkdir(parents=True)
    (inv / "hosts.yml").write_text("all:\n  hosts:\n    x1:\n      ansible_host: 10.89.7.200\n")
    (inv / "group_vars" / "all" / "main.yml").write_text(
        "opsbook_env_kind: lab\nopsbook_lab_network: opsbook-lab-other\n"
        f"opsbook_lab_subnet: {lab_env.var('opsbook_lab_subnet')}\nopsbook_lab_gateway: 10.89.7.1\n"
        f"opsbook_lab_dir: {tmp_path}/.lab\n")
    other = Env("otherlab", path=inv)
    with pytest.raises(lab.LabError, match=r"already taken by podman network 'opsbook-lab'.*Nothing was changed"):
        lab.up(other)
    assert lab.podman("network", "exists", "opsbook-lab-other", check=False).returncode != 0


def test_lab_up_on_a_running_lab_changes_nothing(lab_env):
    from opsbook.engines import lab
    assert lab.up(lab_env) is False


def test_lab_down_would_remove_exactly_what_lab_up_created(lab_env, capsys):
    from opsbook.engines import lab
    lab.down(lab_env, dry_run=True)
    out = capsys.readouterr().out
    removed = set(re.findall(r"would remove (?!volume |network )(\S+)", out))
    assert removed == {f"opsbook-lab-{h.name}" for h in lab_env.hosts()}
    # The network goes with the last lab environment's hosts (lab-staging shares it).
    assert "would remove network opsbook-lab" in out or "network opsbook-lab kept: " in out
    # Database hosts' data volumes (made by lab.up) go too, and nothing else does.
    volumes = set(re.findall(r"would remove volume (\S+)", out))
    assert volumes <= {f"opsbook-lab-{h.name}-data" for h in lab_env.hosts("db")}


# --- provisioning, release, service ------------------------------------------------------
def test_second_provision_changes_nothing(lab_env):
    # The first run: unless every host is stamped as converged to this very configuration (by a
    # provision, or a release's converge, of the same roles, inventory and secrets), converge now.
    ensure_converged(lab_env)
    proc = subprocess.run(
        ["ansible-playbook", "-i", str(lab_env.path), str(ROOT / "playbooks" / "site.yml")],
        cwd=ROOT, env=ansible_env(), capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    recap = [line for line in proc.stdout.splitlines() if re.match(r"^\S+\s+: ok=", line)]
    assert len(recap) == len(lab_env.hosts())
    changed = [line for line in recap if "changed=0" not in line]
    assert not changed, "second provision changed something:\n" + "\n".join(changed)


SERVICE_FILES = ("/srv/bl-api/shared/bl-api.env", "/etc/systemd/system/bl-api.service")


def _predates_its_configuration(host: str) -> bool:
    """The service runs but started before its environment file or unit was last written (read here
    on its own, as seconds, not with the role's shell function)."""
    out = ssh(host, "systemctl show -p ExecMainStartTimestamp --timestamp=unix --value bl-api; "
                    f"stat -c %Y {' '.join(SERVICE_FILES)}").split()
    started, written = int(out[0].lstrip("@")), max(int(x) for x in out[1:])
    return written > started


def _change_service_configuration(hosts) -> None:
    """Make each host's service environment file differ from what the role writes (as a changed
    inventory value would), so that the next converge writes it again."""
    for h in hosts:
        ssh(h.name, f"echo '# changed by a test' >> {SERVICE_FILES[0]}")


def test_provision_that_changes_the_service_configuration_restarts_app_hosts_one_at_a_time_drained(
        lab_env, serving_fleet):
    """Every app host's environment file changed: provisioning rewrites them and restarts each
    service, one host at a time, drained, so that it runs the configuration on disk; not all at once,
    which users feel as failed requests. A provision stopped (Ctrl-C) while it restarts the second
    host leaves a host out of rotation and one whose service predates its file; the next provision finishes both."""
    ensure_converged(lab_env, "lb1")
    apps = lab_env.hosts("app")
    _change_service_configuration(apps)
    pids = fleet_state(lab_env)
    probe = Probe(probe_url(lab_env), rate=30, max_seconds=300).start("provision")
    try:
        stopped = start_invoke("provision", "--env", "lab", "--hosts", "app")
        assert stopped.stdout is not None
        restarts = 0
        for line in stopped.stdout:
            restarts += "TASK [app : Switch current to the release" in line
            if restarts == 2:
                break
        time.sleep(0.3)
        stopped.send_signal(signal.SIGINT)
        rest, _ = stopped.communicate(timeout=300)
        assert stopped.returncode == 130, rest[-3000:]
        assert "run the task again to finish it" in rest
        out = invoke("provision", "--env", "lab", "--hosts", "app", check=True).stdout
    finally:
        report = probe.stop()
    assert report.failed == 0, report.errors()
    assert report.figures()["missing_acknowledged_writes"] == 0
    after = fleet_state(lab_env)
    assert all(after[h.name][1] != pids[h.name][1] for h in apps), (pids, after)   # each restarted
    assert all(after[h.name][0] == pids[h.name][0] for h in apps)                    # same release
    assert out.count("TASK [app : Drain the host in the load balancer") >= 1, out[-3000:]
    for h in apps:
        assert "changed by a test" not in ssh(h.name, f"cat {SERVICE_FILES[0]}")
        assert not _predates_its_configuration(h.name)
    assert all(haproxy_status(h.name) == "UP" for h in apps)


def test_provision_restarts_a_service_that_started_before_its_configuration_was_written(lab_env, serving_fleet):
    """A converge killed right after it wrote app1's environment file (or a file edited by hand)
    leaves a service that runs but predates the file on disk, and a next converge finds the file as
    the role writes it, with nothing to change. What the service owes is read from the host itself,
    so the next provision restarts it, drained, and only it."""
    apps = [h.name for h in lab_env.hosts("app")]
    ensure_converged(lab_env, *apps)   # every file as this checkout's roles write it
    assert not any(_predates_its_configuration(h) for h in apps)
    ssh("app1", f"sleep 1.1; touch {SERVICE_FILES[0]}")    # written again, content unchanged
    assert _predates_its_configuration("app1")
    status = invoke("status", "--env", "lab", check=True).stdout
    assert "  restart owed: app1 (" in status, status              # what the operator is told
    plan = invoke("release", "--env", "lab", "--version", serving_fleet, "--dry-run", check=True).stdout
    assert f"app1: already serving {serving_fleet}, but the service started before" in plan, plan
    pids = fleet_state(lab_env)
    out = invoke("provision", "--env", "lab", "--hosts", "app", check=True).stdout
    after = fleet_state(lab_env)
    assert after["app1"][1] != pids["app1"][1], out[-3000:]
    assert after["app1"][0] == pids["app1"][0]
    assert all(after[h][1] == pids[h][1] for h in ("app2", "app3")), (pids, after)
    assert not any(_predates_its_configuration(h) for h in apps)
    assert all(haproxy_status(h) == "UP" for h in apps)
    assert "restart owed" not in invoke("status", "--env", "lab", check=True).stdout


def test_a_release_of_the_version_served_restarts_a_host_whose_configuration_it_changed(lab_env, serving_fleet):
    """A release converges a host whose configuration changed, and the service there must take the
    new configuration even when the host already serves the release: the rolling switch restarts it,
    drained; the hosts whose configuration did not change are left running."""
    from opsbook.engines import ansible as ansible_engine
    from opsbook.engines.records.store import store_for

    ensure_converged(lab_env, "lb1", *(h.name for h in lab_env.hosts("app")))   # so that only app1 changes
    app1 = lab_env.host("app1")
    _change_service_configuration([app1])
    ssh("app1", f"echo 0000000000000000 > {ansible_engine.STAMP}")   # converged to another configuration
    pids = fleet_state(lab_env)
    invoke("release", "--env", "lab", "--version", serving_fleet, check=True)
    after = fleet_state(lab_env)
    assert after["app1"][1] != pids["app1"][1]
    assert all(after[h][1] == pids[h][1] for h in ("app2", "app3")), (pids, after)
    assert "changed by a test" not in ssh("app1", f"cat {SERVICE_FILES[0]}")
    assert not _predates_its_configuration("app1")
    rec = [e for e in store_for(lab_env).ledger() if e["runbook"] == "release"][-1]["figures"]
    assert rec["outcome"] == "succeeded"
    assert rec["converged"] == ["app1"]
    assert rec["failed_requests"] == 0


def test_provision_applies_a_database_setting_by_a_reload_restarts_only_for_one_that_needs_it_refuses_a_bad_one(
        lab_env, serving_fleet):
    """A changed cluster setting that a reload applies is applied so, the service unaware (before, any
    change restarted Postgres: every connection dropped), also when an earlier converge wrote the file
    and stopped; one only a restart applies restarts it; a value PostgreSQL refuses, at a reload or
    only at a start, fails the converge with the cluster untouched."""
    import yaml

    port = lab_env.var("bl_api_db_port")
    unit = "postgresql@$(ls /etc/postgresql)-main"
    conf = "/etc/postgresql/$(ls /etc/postgresql)/main/conf.d/opsbook.conf"

    def pid() -> str:
        return ssh("db1", f"systemctl show -p MainPID --value {unit}")

    def show(name: str) -> str:
        return ssh("db1", f"runuser -u postgres -- psql -XAtq -p {port} -c 'SHOW {name}'")

    def running_with(line: str, action: str, setting: str, shown: str) -> None:
        """db1 runs with `line` (a value the role does not write, as an earlier inventory's would),
        applied by `action`, once `SHOW setting` gives `shown` (a reload is applied asynchronously)."""
        ssh("db1", f"echo \"{line}\" >> {conf} && systemctl {action} {unit}")
        deadline = time.monotonic() + 10
        while show(setting) != shown:
            assert time.monotonic() < deadline, show(setting)
            time.sleep(0.2)

    ensure_converged(lab_env, "db1")
    done = False
    try:
        running_with("log_min_duration_statement = '500'", "reload", "log_min_duration_statement", "500ms")
        before = pid()
        probe = Probe(probe_url(lab_env), rate=30, max_seconds=300).start("provision")
        try:
            invoke("provision", "--env", "lab", "--hosts", "db1", check=True)
        finally:
            report = probe.stop()
        assert show("log_min_duration_statement") == "1s"
        assert pid() == before                                  # reloaded, not restarted
        assert report.failed == 0, report.errors()

        # A converge stopped after it wrote the file, before the server loaded it: the file is as the
        # role writes it, the server runs an earlier value, and the next converge has nothing to write.
        running_with("log_min_duration_statement = '500'", "reload", "log_min_duration_statement", "500ms")
        ssh("db1", f"sed -i '$d' {conf}")                        # the role's file again, not loaded
        invoke("provision", "--env", "lab", "--hosts", "db1", check=True)
        assert show("log_min_duration_statement") == "1s"
        assert pid() == before

        running_with("max_connections = '150'", "restart", "max_connections", "150")
        before = pid()
        invoke("provision", "--env", "lab", "--hosts", "db1", check=True)
        assert show("max_connections") == "200"
        assert pid() != before                                  # only a restart applies it

        settings = yaml.safe_load((ROOT / "roles" / "postgres" / "defaults" / "main.yml").read_text())
        # A value refused at a reload (a start would refuse it too), and one only a start reads: the
        # running server marks both alike ("setting could not be applied"), and a restart into the
        # second would leave the cluster down.
        refused = (({"log_min_duration_statement": "soon", "max_connections": 120}, "log_min_duration_statement"),
                   ({"max_connections": "lots"}, 'invalid value for parameter "max_connections": "lots"'))
        for bad, named in refused:
            before = pid()
            proc = subprocess.run(
                ["ansible-playbook", "-i", str(lab_env.path), "--limit", "db1",
                 "-e", json.dumps({"postgres_settings": dict(settings["postgres_settings"], **bad)}),
                 str(ROOT / "playbooks" / "site.yml")],
                cwd=ROOT, env=ansible_env(), capture_output=True, text=True, check=False, timeout=600)
            assert proc.returncode != 0, proc.stdout[-3000:]
            assert "hold values PostgreSQL refuses" in proc.stdout, proc.stdout[-3000:]
            assert named in proc.stdout, proc.stdout[-3000:]
            assert pid() == before
            assert show("max_connections") == "200"             # not restarted into the file's value
            assert show("log_min_duration_statement") == "1s"
            # The file the server would refuse at its next start is not left in place, nor any copy.
            text = ssh("db1", f"cat {conf}")
            assert "soon" not in text
            assert "lots" not in text
            assert ssh("db1", "ls /etc/postgresql/$(ls /etc/postgresql)/main/conf.d") == "opsbook.conf"
            assert ssh("db1", f"systemctl is-active {unit}") == "active"
        done = True
    finally:
        if not done:    # db1 as the roles make it, whatever step failed
            invoke("provision", "--env", "lab", "--hosts", "db1", check=True)


def _connects(src: str, address: str, port: int) -> bool:
    """Whether the firewall lets `src` (a lab host) reach address:port, whether or not anything listens
    there: a connection opened, or refused by the host itself (a TCP reset: no listener, e.g. a lab
    never released to has no service on its app hosts), passed it; the firewall's own refusal is an
    ICMP admin-prohibited, which nc reports as "No route to host". Anything else (a timeout) fails."""
    out = ssh(src, f"nc -zv -w 3 {address} {port} 2>&1 && echo open || true")
    if out.endswith("open") or "Connection refused" in out:
        return True
    if "No route to host" in out:
        return False
    pytest.fail(f"{src} -> {address}:{port}: neither through nor rejected by the firewall: {out}")


def test_a_provision_loads_what_a_stopped_one_wrote_and_never_loaded(lab_env):
    """A converge stopped after it wrote lb1's haproxy.cfg and firewall rules, before its handlers
    ran: the files are as the roles write them, the running services have something else, and the
    next converge has nothing to write. It has them load the files all the same."""
    ensure_converged(lab_env, "lb1")

    def haproxy_workers() -> set[str]:
        return set(ssh("lb1", "pgrep -P $(systemctl show -p MainPID --value haproxy) || true").split())

    ssh("lb1", "nft add rule inet opsbook input tcp dport 9 accept comment '\"only in the running rules\"'")
    assert "only in the running rules" in ssh("lb1", "nft list ruleset")
    workers = haproxy_workers()
    ssh("lb1", "touch /etc/nftables.conf /etc/haproxy/haproxy.cfg")   # written again, content unchanged
    invoke("provision", "--env", "lab", "--hosts", "lb1", check=True)
    assert "only in the running rules" not in ssh("lb1", "nft list ruleset")   # the file's rules loaded
    assert haproxy_workers() - workers, "haproxy was not reloaded"


def test_the_firewall_refuses_hosts_that_do_not_need_a_port(lab_env):
    """The service port and Postgres accept connections only from the hosts that need them; SSH
    only from the controller (and, between db1 and db2, for pgBackRest). Tried from hosts that must be
    refused and from hosts that must not."""
    ensure_converged(lab_env)   # releases do not converge db hosts
    addr = {h.name: h.address for h in lab_env.hosts()}
    app_port, db_port = lab_env.var("bl_api_port"), lab_env.var("bl_api_db_port")
    # Postgres: the app hosts (and the controller) only.
    assert _connects("app1", addr["db1"], db_port)
    assert not _connects("lb1", addr["db1"], db_port)
    assert not _connects("db2", addr["db1"], db_port)
    # The service: the load balancers (and the controller) only; app hosts never talk to each other.
    assert _connects("lb1", addr["app1"], app_port)
    assert not _connects("app2", addr["app1"], app_port)
    assert not _connects("db1", addr["app1"], app_port)
    # The load balancer's HTTP port is public; SSH is the controller's alone.
    assert _connects("app1", addr["lb1"], lab_env.var("lb_http_port"))
    assert not _connects("app1", addr["db1"], 22)
    assert not _connects("lb1", addr["app1"], 22)
    # pgBackRest: db1 pushes its WAL to its repository host db2, db2 reads db1 for backups; nobody else.
    assert _connects("db1", addr["db2"], 22)
    assert _connects("db2", addr["db1"], 22)
    assert not _connects("app1", addr["db2"], 22)
    import socket

    for host, port in (("app1", app_port), ("db1", db_port), ("lb1", 22)):
        try:   # the controller reaches what it manages (refused by the host itself: no listener, let through)
            with socket.create_connection((addr[host], port), timeout=3):
                pass
        except ConnectionRefusedError:
            pass


def test_release_switches_every_host_from_a_to_b(lab_env, fleet):
    a, b = fleet
    assert set(served_versions(lab_env).values()) == {a}
    before = fleet_state(lab_env)
    plant_old_releases("app1")
    invoke("release", "--env", "lab", "--version", b, check=True)
    assert set(served_versions(lab_env).values()) == {b}
    for host, (current, pid) in fleet_state(lab_env).items():
        assert current == f"/srv/bl-api/releases/{b}", host
        assert pid != before[host][1], f"{host}: the service was not restarted on the new release"
    invoke("check", "--env", "lab", check=True)

    # Retention: at most opsbook_release_keep releases besides the one in use, the oldest gone,
    # and no tarball left behind for a release that was removed.
    releases = ssh("app1", "ls -1 /srv/bl-api/releases").split()
    assert b in releases
    assert "0.0.1-old" not in releases
    assert len(releases) <= lab_env.var("opsbook_release_keep") + 1
    tarballs = ssh("app1", "ls -1 /srv/bl-api/shared/artifacts").split()
    assert "bl-api-0.0.0-orphan.tar.gz" not in tarballs
    assert f"bl-api-{b}.tar.gz" in tarballs
    assert {t.removeprefix("bl-api-").removesuffix(".tar.gz") for t in tarballs} <= set(releases)

    # The same release once more restarts nothing (the same fleet serves the same PIDs).
    before = fleet_state(lab_env)
    invoke("release", "--env", "lab", "--version", b, check=True)
    assert fleet_state(lab_env) == before


def plant_old_releases(host: str, count: int = 8) -> None:
    """Old releases (oldest first, by mtime) with their tarballs, and a tarball of no release."""
    ssh(host, "set -e; cd /srv/bl-api; "
              f"for i in $(seq 1 {count}); do mkdir -p releases/0.0.$i-old; "
              "touch -d \"2020-01-0$i\" releases/0.0.$i-old; "
              ": > shared/artifacts/bl-api-0.0.$i-old.tar.gz; done; "
              ": > shared/artifacts/bl-api-0.0.0-orphan.tar.gz")


def test_record_then_fetch_through_the_load_balancer(lb_url, serving_fleet):
    course, ecosystem = new_uuid(), new_uuid()
    status, body = http_json(f"{lb_url}/create_course", {"course_uuid": course, "ecosystem_uuid": ecosystem})
    assert status == 200, body
    responses = [
        {"response_uuid": new_uuid(), "course_uuid": course, "ecosystem_item_uuid": new_uuid(),
         "trial_uuid": new_uuid(), "student_uuid": new_uuid(), "exercise_uuid": new_uuid(),
         "is_correct": i % 2 == 0, "is_real_response": True, "responded_at": "2026-11-28T12:00:00Z"}
        for i in range(25)
    ]
    # Several requests, so more than one app host takes part behind the balancer.
    for chunk in (responses[:10], responses[10:20], responses[20:]):
        status, body = http_json(f"{lb_url}/record_responses", {"responses": chunk})
        assert status == 200, body
        assert body["recorded_response_uuids"] == [r["response_uuid"] for r in chunk]
    status, body = http_json(f"{lb_url}/fetch_course_events", {"course_event_requests": [
        {"request_uuid": new_uuid(), "course_uuid": course, "sequence_number_offset": 1}]})
    assert status == 200, body
    events = body["course_event_responses"][0]["events"]
    assert [e["event_uuid"] for e in events] == [r["response_uuid"] for r in responses]
    assert [e["sequence_number"] for e in events] == list(range(1, 26))


def test_bad_request_through_the_load_balancer_is_a_4xx_json(lb_url, serving_fleet):
    status, body = http_json(f"{lb_url}/record_responses", {"responses": [{"course_uuid": "not-a-uuid"}]})
    assert 400 <= status < 500
    assert "error" in body


def test_a_reload_of_the_load_balancer_answers_a_kept_alive_client_instead_of_closing_on_it(lab_env, lb_url,
                                                                                            serving_fleet):
    """A converge that changes haproxy.cfg reloads haproxy under traffic (a release's provisioning
    does). The old process must answer a request that arrives on a connection it holds idle, with
    `Connection: close`, rather than close it: a client that sends as the close arrives gets no
    answer (the CI saw one failed request so, "Server disconnected without sending a response")."""
    ensure_converged(lab_env, "lb1")    # haproxy.cfg as the roles checked out now write it
    url = urlsplit(lb_url)
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=10)
    try:
        conn.request("GET", "/ping")
        first = conn.getresponse()
        first.read()
        assert first.status == 200
        assert not first.will_close
        # The reload runs beside the requests, which go on the same connection (http.client does not
        # reconnect) every half second, well within haproxy's keep-alive timeout, until the old
        # process, in its soft stop, answers one with Connection: close. Without the option it closes
        # the idle connection as its soft stop begins, and the next request gets no answer.
        reload = threading.Thread(target=ssh, args=("lb1", "systemctl reload haproxy"), daemon=True)
        reload.start()
        deadline = time.monotonic() + 30
        while True:
            time.sleep(0.5)
            conn.request("GET", "/ping")
            answer = conn.getresponse()
            answer.read()
            assert answer.status == 200
            if answer.will_close:
                break
            assert time.monotonic() < deadline, "no answer with Connection: close within 30 s of the reload"
        reload.join(timeout=30)
    finally:
        conn.close()


# --- records of what ran against the lab ----------------------------------------------------
def test_report_leaves_a_record_that_records_and_index_show(lab_env):
    from opsbook.engines.records.store import store_for

    invoke("report", "--env", "lab", check=True)
    entry = [e for e in store_for(lab_env).ledger() if e["runbook"] == "env_report"][-1]
    assert entry["outcome"] == "succeeded"
    assert entry["figures"]["hosts_answering"] == len(lab_env.hosts())
    assert entry["figures"]["lb_healthy"] is True
    store = store_for(lab_env)
    assert store.get(entry["notebook"])
    assert store.get(entry["html"])
    listed = invoke("records", "--env", "lab", "--runbook", "env_report", check=True)
    assert entry["id"] in listed.stdout
    index = invoke("records.index", "--env", "lab", check=True)
    page = store.get("index.html").decode()
    assert entry["id"] in page, index.stdout
    assert entry["html"] in page


def test_breaking_the_release_lock_is_recorded(lab_env):
    import signal
    import sys

    from opsbook.engines.lock import lock_for
    from opsbook.engines.records.store import store_for

    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from opsbook.engines.lock import lock_for; "
         "from opsbook.core.inventory import load; "
         "lock_for(load('lab')).acquire('stuck release'); print('held', flush=True); time.sleep(600)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        shown = invoke("lock", "--env", "lab", check=True)
        assert "stuck release" in shown.stdout
        invoke("lock.break", "--env", "lab", "--reason", "holder was killed (test)", check=True)
        assert lock_for(lab_env).holder() is None
        entry = [e for e in store_for(lab_env).ledger() if e["runbook"] == "lock_break"][-1]
        assert entry["figures"]["broken"] is True
        assert entry["figures"]["reason"] == "holder was killed (test)"
        assert entry["figures"]["broken_holder"]["reason"] == "stuck release"
    finally:
        if holder.poll() is None:
            holder.kill()
