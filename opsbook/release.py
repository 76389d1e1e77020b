"""Provisioning, release and rollback of an environment.

A release: guardrails (known env, existing artifact), plan (hosts in batches, the version each
serves, migrations), then under the environment's release lock and a probe driving traffic
through the load balancer: preflight (host checks, database sessions), provisioning, expand
migrations, staging the release on every host, and the rolling switch batch by batch (drain,
switch `current`, restart, health, re-enable) with a gate after each batch. A batch that fails
its health check or its gate is returned to the version it had and the release stops. Every
release and rollback ends with a record (runbooks/release.ipynb), succeeded or failed.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opsbook import ROOT, artifact, migrations
from opsbook.errors import OpsbookError
from opsbook.inventory import Env, load

PLAYBOOKS = ROOT / "playbooks"


class PlaybookFailed(OpsbookError):
    pass


class ReleaseFailed(OpsbookError):
    pass


def log(msg: str) -> None:
    print(f"[opsbook] {msg}", flush=True)


def ansible_env() -> dict[str, str]:
    env = dict(os.environ)
    env["ANSIBLE_CONFIG"] = str(ROOT / "ansible.cfg")
    env.setdefault("ANSIBLE_FORCE_COLOR", "0")
    venv_bin = Path(sys.executable).parent
    env["PATH"] = f"{venv_bin}:{env.get('PATH', '')}"
    return env


def run_playbook(env: Env, playbook: str, *, extra_vars: dict | None = None, check: bool = False,
                 limit: str | None = None, what: str = "") -> None:
    """Run a playbook against an environment, streaming Ansible's progress to the terminal."""
    cmd = ["ansible-playbook", "-i", str(env.path), str(PLAYBOOKS / playbook)]
    if extra_vars:
        cmd += ["-e", json.dumps(extra_vars)]
    if check:
        cmd += ["--check", "--diff"]
    if limit:
        cmd += ["--limit", limit]
    # Ansible's output streams to the terminal as it comes; the failing task's lines are also
    # kept, so the error (and the release record) says which host failed and why.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ansible_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    failures: list[str] = []
    task = ""
    keep = 0
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        if line.startswith("TASK ["):
            task = line.strip(" *\n")
        if line.startswith(("fatal:", "failed:")):
            failures.append(f"{task}: {line.strip()}")
            keep = 6
        elif keep and line.strip():
            failures.append("    " + line.strip()[:300])
            keep -= 1
    sys.stdout.flush()
    if proc.wait() != 0:
        detail = ("\n  " + "\n  ".join(failures[:24])) if failures else ""
        raise PlaybookFailed(
            f"{what or playbook} failed on {env.name} (ansible-playbook exit {proc.returncode}){detail}"
        )


def provision(env_name: str, check: bool = False) -> None:
    env = load(env_name)
    if env.kind == "lab":
        from opsbook import lab

        lab.up()   # the lab's hosts must exist before they can be provisioned (no-op when up)
    t0 = time.monotonic()
    run_playbook(env, "site.yml", check=check, what="provisioning")
    log(f"provisioned {env.name} in {time.monotonic() - t0:.0f}s" + (" (check mode)" if check else ""))


def admin_conninfo(env: Env, host: str | None = None) -> str:
    """libpq conninfo for the admin role on the environment's service database."""
    host = host or env.var("bl_api_db_host")
    from psycopg.conninfo import make_conninfo

    return make_conninfo(
        host=env.host(host).address,
        port=env.var("bl_api_db_port"),
        dbname=env.var("bl_api_db_name"),
        user=env.var("opsbook_db_admin_user"),
        password=env.var("opsbook_db_admin_password"),
        connect_timeout=5,
        application_name="opsbook",
    )


def resolve_artifact(version: str | None) -> artifact.Artifact:
    if version:
        return artifact.find(version)
    return artifact.build()


# --- the fleet ----------------------------------------------------------------------------
def fleet_versions(env: Env) -> dict[str, str | None]:
    """host -> the version its service reports on /version (None when it does not answer)."""
    from opsbook import fleet

    return dict(fleet.served_versions(env))


def batches_of(hosts: list[str], size: str | int) -> list[list[str]]:
    """Split hosts into batches of `size` hosts, or of a percentage of the fleet ("25%")."""
    text = str(size).strip()
    n = 0
    if text.endswith("%") and text[:-1].replace(".", "", 1).isdigit() and 0 < float(text[:-1]) <= 100:
        n = max(1, math.floor(len(hosts) * float(text[:-1]) / 100))
    elif text.isdigit():
        n = int(text)
    if n < 1:
        raise OpsbookError(f"batch size {size!r} is neither a positive number of hosts nor a percentage "
                           f"like 25%. Nothing was changed.")
    return [hosts[i : i + n] for i in range(0, len(hosts), n)]


@dataclass
class Plan:
    env: str
    kind: str                                  # release | rollback
    target: str
    artifact_file: str
    artifact_sha256: str
    current: dict[str, str | None]             # host -> version it serves now (None: nothing)
    batches: list[list[str]]
    drain_timeout: int
    migrations_pending: list[str] = field(default_factory=list)
    contracts_pending: list[str] = field(default_factory=list)

    @property
    def mixed(self) -> bool:
        return len(set(self.current.values())) > 1

    def text(self) -> str:
        lines = [f"plan: {self.kind} bl-api {self.target} to {self.env} "
                 f"({len(self.current)} app hosts, {len(self.batches)} batches, drain timeout "
                 f"{self.drain_timeout}s)"]
        if self.mixed:
            served = ", ".join(f"{h}={v or 'nothing'}" for h, v in self.current.items())
            lines.append(f"  the fleet serves mixed versions ({served}); this {self.kind} converges it")
        for i, batch in enumerate(self.batches, 1):
            parts = []
            for h in batch:
                now = self.current.get(h) or "nothing"
                parts.append(f"{h} ({now}{'' if now != self.target else ', already there'})")
            lines.append(f"  batch {i}: " + ", ".join(parts))
        if self.kind == "release":
            lines.append("  expand migrations to run first: " + (", ".join(self.migrations_pending) or "none"))
            lines.append("  contracts pending (not run by a release): "
                         + (", ".join(self.contracts_pending) or "none"))
        return "\n".join(lines)


def pending_migrations(env: Env, mig_dir: Path) -> tuple[list[str], list[str]]:
    """(expand phases of the migrations in `mig_dir` not yet applied, contracts pending) on env's
    database. Raises psycopg.Error when the database does not answer."""
    import psycopg

    conninfo = admin_conninfo(env)
    with psycopg.connect(conninfo) as conn:
        done = migrations.applied_phases(conn)
    contracts = [str(c) for c in migrations.pending_contracts(conninfo, mig_dir)]
    return [m.id for m in migrations.load_migrations(mig_dir) if (m.id, "expand") not in done], contracts


def _pending_migrations(env: Env, art: artifact.Artifact) -> tuple[list[str], list[str]]:
    """(expand phases this artifact would apply, contracts already pending) on env's database."""
    import psycopg

    with tempfile.TemporaryDirectory(prefix="opsbook-migrations-") as tmp:
        try:
            return pending_migrations(env, art.extract_migrations(Path(tmp)))
        except psycopg.Error as e:
            raise OpsbookError(f"cannot read the applied migrations on {env.name}'s database: {e}. "
                               f"Nothing was changed. Is `invoke provision --env {env.name}` done?") from e


def refuse_below_schema(env: Env, version: str) -> None:
    """A version older than what an applied contract requires would meet a schema it cannot use."""
    import psycopg
    from packaging.version import InvalidVersion, Version

    try:
        with psycopg.connect(admin_conninfo(env)) as conn:
            done = {m for m, phase in migrations.applied_phases(conn) if phase == "contract"}
    except psycopg.Error:
        return   # a database that does not answer has no contracts to protect; preflight says so
    try:
        target = Version(version)
    except InvalidVersion:
        return
    blocking = [f"{m.id} (needs >= {m.contract_requires_version})"
                for m in migrations.load_migrations(ROOT / "app" / "migrations")
                if m.id in done and m.contract_requires_version and target < Version(m.contract_requires_version)]
    if blocking:
        raise OpsbookError(f"{version} is older than the schema of {env.name} allows: contract(s) "
                           f"{', '.join(blocking)} already ran, so {version} would fail against it. Nothing "
                           f"was changed. Release or roll back to a version at or above those.")


def make_plan(env: Env, art: artifact.Artifact, *, kind: str = "release", batch: str | None = None) -> Plan:
    hosts = [h.name for h in env.hosts("app")]
    if not hosts:
        raise OpsbookError(f"environment {env.name} has no app hosts in its inventory ({env.path}); nothing to "
                           f"{kind}. Nothing was changed. Add hosts to its `app` group (the AWS environments "
                           f"will get theirs from a dynamic inventory, which is not built yet).")
    refuse_below_schema(env, art.version)
    current = fleet_versions(env)
    # Hosts that serve nothing (new, or left down by a failed release) go first: they take no
    # traffic, and once they serve, draining the others never leaves the balancer empty.
    hosts.sort(key=lambda h: current.get(h) is not None)
    plan = Plan(
        env=env.name, kind=kind, target=art.version, artifact_file=art.path.name, artifact_sha256=art.sha256,
        current=current, batches=batches_of(hosts, batch or env.var("opsbook_release_batch_size")),
        drain_timeout=int(env.var("opsbook_release_drain_timeout")),
    )
    if kind == "release":
        try:
            plan.migrations_pending, plan.contracts_pending = _pending_migrations(env, art)
        except OpsbookError as e:
            if any(plan.current.values()):
                raise
            log(f"database not reachable yet ({e}); the first release will provision it")
            plan.migrations_pending = ["(all: database not provisioned yet)"]
    return plan


# --- running a release --------------------------------------------------------------------
@dataclass
class Run:
    """What a release or rollback did, for its record."""

    plan: Plan
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    t0: float = field(default_factory=time.monotonic)
    phases: dict[str, float] = field(default_factory=dict)
    batches: list[dict[str, Any]] = field(default_factory=list)
    migrations: dict[str, Any] = field(default_factory=dict)
    outcome: str = "failed"
    reason: str | None = None
    detail: str | None = None   # the whole error, e.g. the failing Ansible task's output
    lock: str | None = None
    probe: dict[str, Any] | None = None
    probe_plot: str | None = None
    live_probe: Any = None   # the running Probe, so its samples are labelled with the phase

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.monotonic()
        log(f"{name} …")
        if self.live_probe is not None and name != "rolling switch":   # batches label themselves
            self.live_probe.mark(name)
        try:
            yield
        finally:
            self.phases[name] = time.monotonic() - t

    def data(self) -> dict[str, Any]:
        return {
            "kind": self.plan.kind, "env": self.plan.env, "version": self.plan.target,
            "operator": f"{getpass.getuser()}@{socket.gethostname()}", "git_sha": artifact.git_sha(),
            "commit_time": _commit_time(),
            "started_at": self.started.isoformat(timespec="seconds"), "duration_s": time.monotonic() - self.t0,
            "artifact": {"file": self.plan.artifact_file, "sha256": self.plan.artifact_sha256},
            "plan": asdict(self.plan), "phases": self.phases, "batches": self.batches,
            "migrations": self.migrations, "outcome": self.outcome, "reason": self.reason, "detail": self.detail,
            "lock": self.lock, "probe": self.probe, "probe_plot": self.probe_plot,
        }


def _commit_time() -> str | None:
    proc = subprocess.run(["git", "log", "-1", "--format=%cI"], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    return proc.stdout.strip() or None


def _switch(env: Env, hosts: list[str], version: str, what: str) -> None:
    """Switch hosts to a release already staged on them (switch.yml never needs the artifact)."""
    run_playbook(env, "switch.yml", limit=",".join(hosts), what=what, extra_vars={
        "opsbook_release_version": version,
        # `serial` is read before inventory variables exist; a batch is switched one host after
        # another inside it, so a failing host stops its batch early.
        "opsbook_release_batch_size": len(hosts),
    })


def _return_batch(env: Env, plan: Plan, batch: list[str]) -> str:
    """Switch a failed batch's hosts back to the versions they served before. Returns a summary."""
    by_version: dict[str, list[str]] = {}
    for h in batch:
        prev = plan.current.get(h)
        if prev and prev != plan.target:
            by_version.setdefault(prev, []).append(h)
    if not by_version:
        return "no previous version to return to"
    done = []
    for prev, hosts in by_version.items():
        # The version a host served is still in its releases/ (retention keeps the one in use).
        try:
            _switch(env, hosts, prev, f"returning {hosts} to {prev}")
            done.append(f"{', '.join(hosts)} returned to {prev}")
        except PlaybookFailed as e:
            done.append(f"{', '.join(hosts)} could NOT be returned to {prev}: {e}")
    return "; ".join(done)


def preflight(env: Env, plan: Plan) -> None:
    from opsbook import checks
    from opsbook.migrations import guards

    # Everything but what the release itself converges (services up, hosts in rotation): a host
    # left out of rotation by a failed release is what the next release is there to fix.
    checks.run_host_checks(env.name, extra=["-m", "not converges"])
    try:
        import psycopg

        with psycopg.connect(admin_conninfo(env)) as conn:
            blocking = guards.blocking_sessions(conn, guards.Settings())
    except psycopg.Error as e:
        if any(plan.current.values()):
            raise ReleaseFailed(f"preflight: the database does not answer ({e})") from e
        blocking = []
    if blocking:
        raise ReleaseFailed("preflight: sessions that would block migrations: "
                            + "; ".join(str(b) for b in blocking))


def release(env_name: str, version: str | None = None, *, batch: str | None = None, dry_run: bool = False,
            wait: int = 0) -> str:
    env = load(env_name)   # unknown environment: names the ones that exist, changes nothing
    art = resolve_artifact(version)
    if env.kind == "lab" and not dry_run:
        from opsbook import lab

        lab.up()
    plan = make_plan(env, art, kind="release", batch=batch)
    print(plan.text(), flush=True)
    if dry_run:
        log("dry run: nothing was locked or changed")
        return art.version
    return _execute(env, plan, art, wait=wait)


def rollback(env_name: str, to: str | None = None, *, batch: str | None = None, dry_run: bool = False,
             wait: int = 0) -> str:
    env = load(env_name)
    current = fleet_versions(env)
    target = to or previous_good(env, exclude={v for v in current.values() if v})
    if not target:
        raise OpsbookError(f"no earlier good release of {env.name} is known to roll back to; name one with "
                           f"--to V (`invoke records --env {env.name} --runbook release`). Nothing was changed.")
    art = artifact.find(target)
    plan = make_plan(env, art, kind="rollback", batch=batch)
    print(plan.text(), flush=True)
    if dry_run:
        log("dry run: nothing was locked or changed")
        return target
    return _execute(env, plan, art, wait=wait)


def previous_good(env: Env, exclude: set[str]) -> str | None:
    """The newest version whose release to this environment succeeded, other than `exclude`."""
    from opsbook.record_store import store_for

    entries = [e for e in store_for(env).ledger() if e.get("runbook") == "release"
               and e.get("outcome") == "succeeded"]
    for e in sorted(entries, key=lambda e: e.get("start", ""), reverse=True):
        v = (e.get("figures") or {}).get("version")
        if v and v not in exclude and artifact.artifact_path(v).exists():
            return v
    return None


def _execute(env: Env, plan: Plan, art: artifact.Artifact, *, wait: int) -> str:
    from opsbook import lock as locks
    from opsbook import probe as probes
    from opsbook.record_store import new_record_id

    run = Run(plan=plan)
    record_id = new_record_id(plan.kind)
    slo = probes.slo_for(env)
    lock = locks.lock_for(env)
    with lock.hold(f"{plan.kind} {plan.target} (record {record_id})", wait=wait) as held:
        log(held.message)
        run.lock = held.message
        probe = probes.probe_for(env)
        try:
            if any(plan.current.values()):
                _start_probe(run, probe, "before", required=False)
            _steps(env, plan, art, run, held=held, probe=probe, slo=slo)
            run.outcome = "succeeded"
        except (OpsbookError, KeyboardInterrupt) as e:
            run.reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            run.detail = str(e)
            log(f"{plan.kind} FAILED: {run.reason}")
        finally:
            if run.live_probe is not None:
                run.live_probe = None
                with run.phase("probe read-back"):
                    report = probe.stop()
                run.probe = _probe_figures(report)
                plot = Path(tempfile.mkdtemp(prefix="opsbook-probe-")) / "probe.png"
                run.probe_plot = str(report.plot(plot, title=f"{plan.kind} {plan.target} to {env.name}"))
                ok, reasons = report.within(slo)
                if not ok and run.outcome == "succeeded":
                    run.outcome, run.reason = "failed", "SLO missed: " + "; ".join(reasons)
        if run.outcome == "succeeded":
            _mark_good(env, plan)
    _write_record(env, run, record_id)
    if run.outcome != "succeeded":
        raise ReleaseFailed(f"{plan.kind} of {plan.target} to {env.name} failed: {run.reason}. "
                            f"Record {record_id} has the details; `invoke status --env {env.name}` shows "
                            f"what each host serves now.")
    log(f"{plan.kind} of {plan.target} to {env.name} succeeded in {time.monotonic() - run.t0:.0f}s "
        f"(record {record_id})")
    return plan.target


def _probe_figures(report) -> dict[str, Any]:
    figs = dict(report.figures())
    phases = {name: report.phase(name) for name in report.phase_names()}
    figs["phases"] = phases
    before = phases.get("before", {})
    during = [p for n, p in phases.items() if n.startswith("batch")]
    figs["p99_ms_before"] = before.get("p99_ms")
    figs["p99_ms_during"] = max((p.get("p99_ms") or 0 for p in during), default=None)
    return figs


def _start_probe(run: Run, probe, phase: str, *, required: bool) -> None:
    """Start the probe; a service that cannot take the probe's first writes is already down."""
    from opsbook.probe import ProbeError

    try:
        probe.start(phase)
    except ProbeError as e:
        if required:
            raise ReleaseFailed(f"the service does not take traffic even after the expand migrations, so the "
                                f"release cannot be judged: {e}") from e
        log(f"the service does not take traffic before the {run.plan.kind} ({e}); the probe starts after "
            f"the expand migrations")
        return
    run.live_probe = probe
    time.sleep(2)   # a baseline of what users feel before anything changes


def _steps(env: Env, plan: Plan, art: artifact.Artifact, run: Run, *, held, probe, slo) -> None:
    if plan.kind == "release":
        # Provisioning converges host configuration (idempotent: changed=0 on a provisioned
        # fleet); preflight then checks the result, so a first release on new hosts works too.
        with run.phase("provision"):
            provision(env.name)
    with run.phase("preflight"):
        preflight(env, plan)
    if plan.kind == "release":
        with run.phase("expand migrations"), tempfile.TemporaryDirectory(prefix="opsbook-migrations-") as tmp:
            mig_dir = art.extract_migrations(Path(tmp))
            applied = migrations.apply_pending(admin_conninfo(env), mig_dir, phase="expand",
                                               log=lambda m: log(f"migrate: {m}"))
            contracts = [str(c) for c in migrations.pending_contracts(admin_conninfo(env), mig_dir)]
            run.migrations = {"applied": applied, "contracts_pending": contracts}
            for c in contracts:
                log(f"contract pending: {c} (run `invoke migrate --env {env.name} --phase contract` once "
                    f"every app host serves the version it needs)")
    if run.live_probe is None and any(plan.current.values()):
        _start_probe(run, probe, "stage", required=True)
    probe = run.live_probe
    with run.phase("stage"):
        run_playbook(env, "stage.yml", what=f"staging {plan.target}", extra_vars={
            "opsbook_release_version": plan.target, "opsbook_release_artifact": str(art.path)})
    with run.phase("rolling switch"):
        for i, batch in enumerate(plan.batches, 1):
            name = f"batch {i}"
            if probe:
                probe.mark(name)
            t = time.monotonic()
            entry: dict[str, Any] = {"batch": i, "hosts": ", ".join(batch)}
            run.batches.append(entry)
            try:
                _switch(env, batch, plan.target, f"{plan.kind} {name} ({', '.join(batch)})")
            except PlaybookFailed as e:
                entry.update(result="failed health", seconds=round(time.monotonic() - t, 1))
                entry["returned"] = _return_batch(env, plan, batch)
                raise ReleaseFailed(f"{name} ({', '.join(batch)}) failed: {e} {entry['returned']}.") from e
            held.check()
            if probe:
                time.sleep(1)   # let requests sent during the batch complete before judging it
                ok, reasons = probe.report().phase_within(name, slo)
                entry["gate"] = "passed" if ok else "failed: " + "; ".join(reasons)
                if not ok:
                    entry.update(result="failed gate", seconds=round(time.monotonic() - t, 1))
                    entry["returned"] = _return_batch(env, plan, batch)
                    raise ReleaseFailed(f"{name} ({', '.join(batch)}) missed the SLO: {'; '.join(reasons)}. "
                                        f"{entry['returned']}.")
            entry.update(result="passed", seconds=round(time.monotonic() - t, 1))
            log(f"{name} done in {entry['seconds']}s")
        if probe:
            probe.mark("after")
            time.sleep(2)


def _mark_good(env: Env, plan: Plan) -> None:
    """Mark the release good on every host: retention never deletes the newest good release."""
    run_playbook(env, "mark-good.yml", what="marking the release good",
                 extra_vars={"opsbook_release_version": plan.target})


def _write_record(env: Env, run: Run, record_id: str) -> None:
    from opsbook import runbooks

    data = run.data()
    with tempfile.TemporaryDirectory(prefix="opsbook-release-") as tmp:
        path = Path(tmp) / "release.json"
        path.write_text(json.dumps(data, indent=2, default=str))
        try:
            runbooks.run("release", env, {"release_data": str(path)}, record_id=record_id, started=run.started)
        except runbooks.RunbookFailed:
            if run.outcome == "succeeded":
                raise
