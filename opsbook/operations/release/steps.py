"""Running a release or rollback: under the environment's lock and a probe driving traffic
through the load balancer, the phases of the plan (plan.PHASES) one after another, a gate after
each batch, and a record whatever happens."""

from __future__ import annotations

import contextlib
import json
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opsbook.core import facts
from opsbook.core.errors import OpsbookError
from opsbook.core.inventory import Env
from opsbook.engines import ansible, artifact, database, fleet, hostchecks, interrupts
from opsbook.engines import lock as locks
from opsbook.engines import probe as probes
from opsbook.engines.ansible import PlaybookFailed
from opsbook.engines.records import runner
from opsbook.engines.records.store import new_record_id
from opsbook.engines.rotation import rotation_for
from opsbook.operations.release.plan import PHASES, Plan
from opsbook.operations.release.record import KERNEL_PRELOAD, ReleaseFailed

# The probe's phases that change nothing users see: what they feel then is the baseline a slow
# service is judged against (`ProbeResults.baseline_slo`), with no wait of its own. (Staging only
# unpacks the release beside the one serving.)
BASELINE_PHASES = ("before", "preflight", "stage")


def log(msg: str) -> None:
    print(f"[opsbook] {msg}", flush=True)


class _RecordAhead:
    """What the record needs that can be made while the release still waits on its hosts (marking it good
    takes about a second): the probe's plot drawn (matplotlib, with its import, about 1.5 s here) and the
    record's libraries imported (`runner.preload`), in a thread of its own, started once the probe has
    stopped, so that it never shares the interpreter with the probe's measurements. The record waits for it
    (`take`); a plot that could not be drawn is said there, as when it is drawn in line."""

    def __init__(self, results: Any, title: str) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="opsbook-release-")
        self.plot: Path | None = None
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._make, args=(results, title), name="opsbook-record-ahead",
                                        daemon=True)
        self._thread.start()

    def _make(self, results: Any, title: str) -> None:
        try:
            self.plot = results.plot(Path(self.dir.name) / "probe.png", title=title)
        except Exception as e:  # noqa: BLE001 - said in the record (take)
            self.error = e
        with contextlib.suppress(Exception):   # only sooner: runner.run imports them itself
            runner.preload()

    def take(self) -> tuple[Path | None, Exception | None]:
        self._thread.join()
        return self.plot, self.error


@dataclass
class Run:
    """What a release or rollback did, for its record."""

    plan: Plan
    record_id: str
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
    probe_results: Any = None   # the probe's results, drawn as probe_plot when the record is written
    record_ahead: _RecordAhead | None = None   # the record's plot and libraries, made once the probe stopped
    live_probe: Any = None   # the running Probe, so its samples are labelled with the phase
    converge: dict[str, Any] = field(default_factory=dict)   # what the provision phase converged
    current_phase: str | None = None   # the phase running now
    interrupted_in: str | None = None  # the phase an interrupt stopped (the record names it)
    interrupted_by: str | None = None  # the signal's name (the task exits 130 for it, as for any interrupt)
    in_flight: list[str] | None = None   # the batch being switched, if any
    put_back: str | None = None   # after a failure: whether every answering host is back in rotation
    notes: list[str] = field(default_factory=list)   # what the record should say besides the outcome
    guardrails: dict[str, Any] = field(default_factory=dict)   # rehearsal gate and safety point (guardrails.py)
    staged_s: float | None = None   # how long staging ran (beside preflight; its phase is what remained)
    batch_t0: float = 0.0   # when the batch in flight began
    scale_gate: dict[str, Any] | None = None   # the demonstrated-at-scale gate's decision (opsbook.engines.scale_gate)
    switching: Any = None   # the rolling switch's playbook, which marks the release good when told (_Switching)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        assert name in PHASES, name   # every phase is described once, in plan.PHASES
        t = time.monotonic()
        self.current_phase = name
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
            "operator": facts.operator(), "git_sha": facts.git_sha(), "commit_time": facts.commit_time(),
            "started_at": self.started.isoformat(timespec="seconds"), "duration_s": time.monotonic() - self.t0,
            "artifact": {"file": self.plan.artifact_file, "sha256": self.plan.artifact_sha256},
            "plan": asdict(self.plan), "phases": self.phases, "batches": self.batches,
            "migrations": self.migrations, "outcome": self.outcome, "reason": self.reason, "detail": self.detail,
            "lock": self.lock, "probe": self.probe, "probe_plot": self.probe_plot, "converge": self.converge,
            "interrupted_in": self.interrupted_in,
            "put_back": self.put_back, "notes": self.notes, "staged_s": self.staged_s,
            "guardrails": self.guardrails,
            "scale_gate": self.scale_gate,
        }


def execute(env: Env, plan: Plan, art: artifact.Artifact, *, wait: int, replan=None,
            guardrails: dict[str, Any] | None = None, notes: list[str] | None = None,
            scale_gate: dict[str, Any] | None = None) -> str:
    """Run the plan under the lock and the probe; always leave a record. Returns the version.

    `replan()` makes the plan again once the lock is held (the fleet may have changed while this
    release waited for it). SIGINT, SIGTERM and SIGHUP end it in order: Ansible is stopped, the
    batch in flight goes back to the version it had, every answering host is put back in the
    load balancer, the record says `interrupted` and where, and the lock is released.
    """
    run = Run(plan=plan, record_id=new_record_id(plan.kind), guardrails=guardrails or {}, notes=list(notes or []),
              scale_gate=scale_gate)
    slo = probes.slo_for(env)
    lock = locks.lock_for(env)
    # The record's kernel starts now and imports what the record uses while the release waits on hosts.
    with runner.WarmKernel(KERNEL_PRELOAD) as kernel:
        _execute_run(env, plan, art, run, lock=lock, slo=slo, wait=wait, replan=replan, kernel=kernel)
    if run.outcome != "succeeded":
        said = (f"{plan.kind} of {plan.target} to {env.name} {run.outcome}: {run.reason}. Record {run.record_id} "
                f"has the details; `invoke status --env {env.name}` shows what each host serves now.")
        if run.outcome == "interrupted":   # ended in order: the task exits 130, as every interrupted task does
            raise interrupts.Stopped(said, run.interrupted_by or "SIGINT")
        raise ReleaseFailed(said)
    log(f"{plan.kind} of {plan.target} to {env.name} succeeded in {time.monotonic() - run.t0:.0f}s "
        f"(record {run.record_id})")
    return plan.target


def _execute_run(env: Env, plan: Plan, art: artifact.Artifact, run: Run, *, lock, slo, wait: int, replan,
                 kernel: runner.WarmKernel) -> None:
    with interrupts.interruptible():
        try:
            with lock.hold(f"{plan.kind} {plan.target} (record {run.record_id})", wait=wait, on_wait=log) as held:
                log(held.message)
                run.lock = held.message
                if replan is not None:
                    run.plan = plan = _replanned(plan, replan())
                _run_phases(env, plan, art, run, held=held, slo=slo)
        except KeyboardInterrupt as e:   # interrupted while waiting for the lock, or while ending in order
            if run.outcome != "interrupted":
                run.interrupted_in = run.current_phase or "waiting for the lock"
                run.outcome, run.reason = "interrupted", f"{interrupts.describe(e)} during {run.interrupted_in}"
                run.interrupted_by = interrupts.signal_of(e)
        except locks.LockHeld:
            raise   # refused: nothing ran, nothing to record
        except Exception as e:  # noqa: BLE001 - the lock itself failed (its store, its lease): still a record
            if run.outcome == "succeeded":
                run.outcome = "failed"
            run.reason = run.reason or f"{type(e).__name__}: {e}"
            run.detail = run.detail or str(e)
    with interrupts.shielded():
        _write_record(env, run, kernel)


def _replanned(before: Plan, after: Plan) -> Plan:
    if after.current != before.current or after.batches != before.batches:
        log("the fleet changed while waiting for the lock; the plan was made again:\n" + after.text())
    return after


def _run_phases(env: Env, plan: Plan, art: artifact.Artifact, run: Run, *, held, slo) -> None:
    # What the rolling switch starts (its playbook, its gate files) lives until the release is marked good
    # or has ended otherwise: the same playbook run marks it good when told (switch.yml's last play).
    with contextlib.ExitStack() as keep:
        _phases_and_mark_good(env, plan, art, run, held=held, slo=slo, keep=keep)


def _phases_and_mark_good(env: Env, plan: Plan, art: artifact.Artifact, run: Run, *, held, slo,
                          keep: contextlib.ExitStack) -> None:
    try:
        if any(plan.current.values()):
            _start_probe(run, env, "before", required=False)
        _steps(env, plan, art, run, held=held, slo=slo, keep=keep)
        run.outcome = "succeeded"
    except KeyboardInterrupt as e:
        run.outcome = "interrupted"
        run.interrupted_by = interrupts.signal_of(e)
        run.interrupted_in = run.current_phase or "the plan"
        run.reason = f"{interrupts.describe(e)} during {run.interrupted_in}"
        log(f"{plan.kind} INTERRUPTED: {run.reason}; putting things back in order")
        _end_switching(run, f"interrupted: {run.reason}")
        _put_back(env, plan, run)
    except Exception as e:  # noqa: BLE001 - whatever failed (a playbook, the database, a disk), a record
        run.reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, OpsbookError):
            run.reason = f"{type(e).__name__}: {run.reason}"
        run.detail = str(e)
        log(f"{plan.kind} FAILED: {run.reason}")
        _end_switching(run, f"failed: {run.reason}")
        if isinstance(e, locks.LeaseLost):
            run.put_back = "not attempted: this release no longer holds the lock, someone else may be acting"
        else:
            _put_back(env, plan, run)
    finally:
        if run.live_probe is not None:
            live, run.live_probe = run.live_probe, None
            with run.phase("probe read-back"):
                results = live.stop()
            run.probe = _probe_figures(results)
            run.probe_results = results   # drawn beside the record's data, which removes it (_write_record)
            with contextlib.suppress(Exception):   # no thread to be had: the record draws it (_write_record)
                run.record_ahead = _RecordAhead(results, _plot_title(run, env))
            ok, reasons = results.within(results.baseline_slo(slo, BASELINE_PHASES)[0])
            if not ok and run.outcome == "succeeded":
                run.outcome, run.reason = "failed", "SLO missed: " + "; ".join(reasons)
    if run.outcome != "succeeded":
        _end_switching(run, f"not good: {run.reason}")
        return
    _mark_good(run, held)


def _mark_good(run: Run, held) -> None:
    """Every host switched and the release passed: mark it good on every app host (retention never
    deletes it), through the switch's own playbook run (every plan has at least one batch, so a
    succeeded release always ran one)."""
    again = (f"every host serves {run.plan.target} and passed, but marking it good did not finish on every host "
             f"(retention does not count it as good where it is not); release it again to mark it: "
             f"`invoke release --env {run.plan.env} --version {run.plan.target}`")
    try:
        held.renew()
        with run.phase("mark good"):
            run.switching.mark_good()
    except KeyboardInterrupt as e:   # an interrupt, as anywhere else: the task ends 130, its record interrupted
        run.outcome, run.interrupted_by, run.interrupted_in = "interrupted", interrupts.signal_of(e), "mark good"
        run.reason = f"{interrupts.describe(e)} during mark good: {again}"
        _end_switching(run, "stopped")
    except Exception as e:  # noqa: BLE001 - every host switched: say what is missing
        # (it said "marking the release good failed: ." for an exception with no text, and so for a Ctrl-C)
        what = str(e).splitlines()[0] if str(e) else type(e).__name__
        run.outcome, run.reason = "failed", f"marking the release good failed ({what}): {again}"
        run.detail = str(e)
        _end_switching(run, "stopped")


def _put_back(env: Env, plan: Plan, run: Run) -> None:
    """After a failure or an interrupt: the batch in flight goes back to the version it had (the
    safer path: the new version has not passed its gate on it), then every app host that answers
    is put back in the load balancer. A second interrupt skips the batch's return but never the
    putting back, which runs shielded from signals (it takes seconds)."""
    entry = run.batches[-1] if run.batches else None
    if run.in_flight and entry is not None:
        try:
            entry["returned"] = _return_batch(env, plan, run.in_flight)
        except KeyboardInterrupt as e:
            entry["returned"] = f"not returned: {interrupts.describe(e)} while returning it"
            run.outcome = "interrupted"
            run.interrupted_by = run.interrupted_by or interrupts.signal_of(e)
        log(f"batch {entry['batch']}: {entry['returned']}")
        run.detail = f"{run.detail}\n{entry['returned']}" if run.detail else entry["returned"]
        if entry.get("result") in (None, "switching"):
            entry["result"] = run.outcome
    run.in_flight = None
    with interrupts.held(log, "hosts were put back", "they were"):
        try:
            ansible.run_playbook(env, "rotation.yml", what="putting answering hosts back in the load balancer")
            rotation_for(env).put_back()   # an ALB's answering hosts (haproxy's: rotation.yml above)
            run.put_back = _rotation_after_put_back(env)
        except Exception as e:  # noqa: BLE001 - the record says what could not be done
            run.put_back = f"could not put every host back in the load balancer: {e}"
        if run.put_back != PUT_BACK:
            log(run.put_back)


PUT_BACK = "every app host that answers /ping is enabled in the load balancer"


def _rotation_after_put_back(env: Env) -> str:
    """What putting hosts back left, read back from each haproxy, not assumed: rotation.yml skips a load
    balancer it cannot reach (so that the others are still done), and a host it could not enable stays
    in MAINT. (Found by killing lb1 in the middle of a release: the record said every answering host
    was back in rotation.) An ALB's put-back raises when it cannot be done."""
    if env.var("opsbook_lb_kind", "haproxy") != "haproxy":
        return PUT_BACK
    seen = fleet.rotation(env)
    silent = sorted({lb for by_lb in seen.values() for lb, s in by_lb.items() if s == "unknown"})
    held = sorted(h for h, by_lb in seen.items() if any(s.startswith("MAINT") for s in by_lb.values()))
    if not silent and not held:
        return PUT_BACK
    said = ([f"load balancer {', '.join(silent)} did not answer: no host could be put back there"] if silent
            else []) + ([f"still out of rotation (MAINT): {', '.join(held)}"] if held else [])
    return (f"{'; '.join(said)}. `invoke status --env {env.name}` shows how each load balancer sees each host; "
            f"once it answers, the next release (or `ansible-playbook playbooks/rotation.yml`) puts every "
            f"answering host back")


def _probe_figures(results) -> dict[str, Any]:
    figs = dict(results.figures())
    phases = {name: results.phase(name) for name in results.phase_names()}
    figs["phases"] = phases
    during = [p for n, p in phases.items() if n.startswith("batch")]
    figs["p99_ms_before"] = results.baseline(BASELINE_PHASES).get("p99_ms")
    figs["p99_ms_during"] = max((p.get("p99_ms") or 0 for p in during), default=None)
    return figs


def _start_probe(run: Run, env: Env, phase: str, *, required: bool) -> None:
    """Start the probe; a service that cannot take the probe's first writes is down. When the release
    needs it (`required`), the service gets the health timeout to come back (a database that was
    just restarted, hosts the balancer still marks DOWN) before the release gives up."""
    deadline = time.monotonic() + (float(env.var("opsbook_release_health_timeout", 20)) if required else 0)
    while True:
        probe = probes.probe_for(env)
        try:
            probe.start(phase)
            break
        except probes.ProbeError as e:
            if not required:
                log(f"the service does not take traffic before the {run.plan.kind} ({e}); the probe starts "
                    f"after the expand migrations")
                return
            if time.monotonic() >= deadline:
                raise ReleaseFailed(f"the service does not take traffic even after the expand migrations, so "
                                    f"the release cannot be judged: {e}") from e
            log(f"the service does not take traffic yet ({str(e)[:120]}); waiting for it")
            time.sleep(1)
    run.live_probe = probe
    # No wait for a baseline here: what users feel before anything changes is measured while the
    # read-only phases run (BASELINE_PHASES).


def _converge(env: Env, run: Run) -> None:
    """Converge the app and load-balancer hosts whose configuration changed since they were last
    converged (their stamp differs from the inventory's fingerprint), and database hosts only when
    they were never provisioned: a release never restarts Postgres for a configuration change
    (`invoke provision` does that). Preflight then checks the result."""
    want = ansible.fingerprint(env)
    stamps = ansible.converged_stamps(env)
    release_hosts = {h.name for h in env.hosts("app")} | {h.name for h in env.hosts("lb")}
    stale = sorted(h for h, stamp in stamps.items() if stamp != want and (h in release_hosts or stamp is None))
    drifted = sorted(h for h, stamp in stamps.items() if h not in release_hosts and stamp not in (None, want))
    run.converge = {"fingerprint": want, "converged": stale, "left_for_provision": drifted}
    for h in drifted:
        log(f"{h}: its configuration differs from the inventory's; a release does not change database hosts. "
            f"Run `invoke provision --env {env.name}` when a restart of its services is acceptable.")
    if not stale:
        log(f"every host is converged to this configuration ({want}); nothing to provision")
        return
    log(f"converging {', '.join(stale)} (configuration {want}); app hosts take a new service configuration when "
        f"the rolling switch restarts them, drained, batch by batch")
    # Not app_restart_on_change: a changed unit or environment file would restart every app host at
    # once, with no draining (failed requests); the switch restarts each host of every batch anyway.
    ansible.run_playbook(env, "site.yml", limit=",".join(stale), what="provisioning",
                         extra_vars={"opsbook_converge_fingerprint": want, "app_restart_on_change": False})


def _preflight(env: Env, plan: Plan) -> None:
    # Everything but what the release itself converges (services up, hosts in rotation): a host
    # left out of rotation by a failed release is what the next release is there to fix.
    hostchecks.run_host_checks(env, extra=["-m", "not converges"])
    try:
        with database.Admin(env) as db:
            blocking = db.blocking_sessions()
    except database.DatabaseUnreachable as e:
        if any(plan.current.values()):
            raise ReleaseFailed(f"preflight: {e}") from e
        blocking = []
    if blocking:
        raise ReleaseFailed("preflight: sessions that would block migrations: "
                            + "; ".join(str(b) for b in blocking))


def _safety_point(env: Env, run: Run) -> None:
    """Decide the safety point again, under the lock and on the plan made under it (the guardrails
    decided it before the lock, to refuse early; the pending migrations may have changed since), then
    take the snapshot when that is the decision, tagged with this release's record id; the record
    names it. A refusal now, or a snapshot that cannot be taken, fails the release before any
    migration runs."""
    from opsbook.engines.snapshots import paths, safety

    decided = safety.decide_for(env, run.plan.migrations_pending)
    run.guardrails["snapshot"] = decided.to_record()
    if decided.refused:
        raise ReleaseFailed(f"safety point: {decided.why}")
    if decided.action != safety.TAKE:
        log(decided.text())
        return
    snap = paths.for_env(env).take(record_id=run.record_id, reason=f"safety point of {run.plan.kind} "
                                   f"{run.plan.target}", log=log)
    run.guardrails["snapshot"].update(snapshot=snap.to_dict(), id=snap.id)


def _expand(env: Env, art: artifact.Artifact, run: Run) -> None:
    """The artifact's pending expand phases, run by the migrate runbook as a child record of the
    release (its lock waits and batch throughput are measured and kept there)."""
    with tempfile.TemporaryDirectory(prefix="opsbook-migrations-") as tmp, database.Admin(env) as db:
        mig_dir = art.extract_migrations(Path(tmp))
        pending = db.pending(mig_dir).expand
        applied: list[str] = []
        child = None
        if pending:
            try:
                entry = runner.run("migrate", env, {"phase": "expand", "migrations_dir": str(mig_dir)},
                                   parent_record_id=run.record_id, progress=False,
                                   log=lambda m: log(f"migrate: {m}"))
            except runner.RunbookFailed as e:
                run.migrations = {"applied": [], "record": e.entry["id"], "error": e.entry.get("error")}
                raise ReleaseFailed(f"expand migrations failed: {e.entry.get('error')} (record "
                                    f"{e.entry['id']})") from e
            applied, child = list(entry["figures"].get("applied") or []), entry["id"]
        contracts = db.pending(mig_dir).contracts
    run.migrations = {"applied": applied, "contracts_pending": contracts, "record": child}
    for c in contracts:
        log(f"contract pending: {c} (run `invoke migrate --env {env.name} --phase contract` once "
            f"every app host serves the version it needs)")


def _switch(env: Env, hosts: list[str], version: str, what: str) -> None:
    """Switch hosts to a release already staged on them (switch.yml never needs the artifact), as
    one batch with no gate: what returning a failed batch runs."""
    lb = rotation_for(env)   # haproxy drains and re-enables inside switch.yml; an ALB around it
    lb.drain(hosts)
    ansible.run_playbook(env, "switch.yml", limit=",".join(hosts), what=what, extra_vars={
        "opsbook_release_version": version,
        "opsbook_switch_hosts": hosts,
        # `serial` is read before inventory variables exist; a batch is switched one host after
        # another inside it, so a failing host stops its batch early.
        "opsbook_switch_batches": [len(hosts)],
    })
    lb.enable(hosts)


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


def _steps(env: Env, plan: Plan, art: artifact.Artifact, run: Run, *, held, slo, keep: contextlib.ExitStack) -> None:
    if "provision" in plan.phases:
        held.renew()
        with run.phase("provision"):
            _converge(env, run)
    held.renew()
    if "stage" in plan.phases:
        _before_the_switch(env, plan, art, run, held=held, keep=keep)
    elif run.live_probe is None and any(plan.current.values()):
        _start_probe(run, env, "before", required=True)
    # Verify: the checks of what a release changes (`converges`: each app host serves the release,
    # its service runs and answers, every backend is UP), on the whole fleet, not only the hosts
    # switched. The others ran in preflight, before anything changed, and the release changes
    # nothing they check; together the two are every host check (`invoke check` runs them all).
    # They start when the last batch takes traffic, beside its gate (every host is switched and
    # enabled then; the gate mostly waits): the verify phase is what is left of them after the gate.
    # The probe's "verify" is the traffic after the change (checks change nothing on the hosts).
    verify = hostchecks.Background(env, extra=["-m", "converges"])
    keep.callback(verify.stop)   # a release that ends before judging them stops them
    with run.phase("rolling switch"):
        # A plan without its own stage phase (a rollback) stages in the switch's run, where missing.
        _rolling_switch(env, plan, run, held=held, probe=run.live_probe, slo=slo, keep=keep,
                        stage=None if "stage" in plan.phases else art, at_last_gate=verify.start)
    with run.phase("verify"):
        verify.wait()


def _before_the_switch(env: Env, plan: Plan, art: artifact.Artifact, run: Run, *, held,
                       keep: contextlib.ExitStack) -> None:
    """A release's phases before its rolling switch. Staging only unpacks the release beside the one
    serving, so it runs beside preflight and the expand migrations (checks and the database; neither
    needs it nor is touched by it). It is waited for, its output shown, before any host is switched;
    leaving early stops it."""
    with ansible.start_playbook(env, "stage.yml", what=f"staging {plan.target}", extra_vars={
            "opsbook_release_version": plan.target, "opsbook_release_artifact": str(art.path)}) as staging:
        if "preflight" in plan.phases:
            with run.phase("preflight"):
                _preflight(env, plan)
        if "safety point" in plan.phases:
            held.renew()
            with run.phase("safety point"):
                _safety_point(env, run)
        if "expand migrations" in plan.phases:
            held.renew()
            with run.phase("expand migrations"):
                _expand(env, art, run)
        if run.live_probe is None and any(plan.current.values()):
            _start_probe(run, env, "stage", required=True)
        # The switch's Ansible run starts now, while staging finishes; it touches nothing until told.
        _start_switching(env, plan, run, keep, early=True)
        with run.phase("stage"):
            staging.wait()
        run.staged_s = staging.seconds


def _start_switching(env: Env, plan: Plan, run: Run, keep: contextlib.ExitStack, *,
                     stage: artifact.Artifact | None = None, early: bool = False) -> None:
    """Start the rolling switch's ansible-playbook (run.switching); `keep` holds it and its gate files.
    `early`: it starts while the release is still being staged (Ansible's start-up, about 1.5 s, is
    then off the release's path) and reads no host before opsbook's START_VERDICT says `passed`."""
    gates = Path(keep.enter_context(tempfile.TemporaryDirectory(prefix="opsbook-gate-")))
    switching = keep.enter_context(ansible.start_playbook(
        env, "switch.yml", limit=",".join(h for b in plan.batches for h in b), what=f"{plan.kind} rolling switch",
        echo=True, extra_vars={
            "opsbook_release_version": plan.target,
            # The plan's order (hosts serving nothing first), not the inventory's.
            "opsbook_switch_hosts": [h for b in plan.batches for h in b],
            "opsbook_switch_batches": [len(b) for b in plan.batches],
            "opsbook_gate_dir": str(gates),
            "opsbook_gate_names": [b[0] for b in plan.batches],
            **({"opsbook_switch_start_gate": True} if early else {}),
            **({"opsbook_release_artifact": str(stage.path)} if stage is not None else {})}))
    run.switching = _Switching(switching, gates)


def _rolling_switch(env: Env, plan: Plan, run: Run, *, held, probe, slo, keep: contextlib.ExitStack,
                    stage: artifact.Artifact | None = None, at_last_gate=None) -> None:
    """Every batch in one ansible-playbook run (switch.yml with opsbook_gate_dir): when a batch is
    switched the playbook writes which hosts it switched; opsbook judges the batch's gate and
    writes the verdict, and the next batch only reads its hosts until the verdict is `passed`
    (anything else stops the playbook before it drains one). One run instead of one per batch: no
    Ansible start-up or new SSH connections between batches, and the next batch's reads overlap
    the gate. After the last batch the same run waits for the verdict on the whole release and
    marks it good when told (run.switching); `keep` holds it (and its gate files) until then.

    With `stage` (a rollback), the same run first stages the release on every host that lacks it
    (one stat where it is there): no Ansible run of its own for what is nearly always there already.
    `at_last_gate()` is called when the last batch takes traffic, before its gate is judged."""
    held.renew()   # the lease is verified before any host of the first batch is touched
    lb = rotation_for(env)   # haproxy drains and re-enables inside switch.yml; an ALB around each batch
    _begin_batch(run, probe, 1, plan.batches[0])
    lb.drain(plan.batches[0])
    if run.switching is None:
        _start_switching(env, plan, run, keep, stage=stage)
    else:   # started while the release was staged; it waits for this word before it reads a host
        _verdict(run.switching.gates, START_VERDICT, "passed")
    switching, gates = run.switching.playbook, run.switching.gates
    for i, batch in enumerate(plan.batches, 1):
        entry = run.batches[-1]
        switched = _switched(switching, gates / f"{batch[0]}.switched")
        if switched is None:   # the playbook ended before the batch was switched
            try:
                switching.wait()
            except PlaybookFailed as e:
                if stage is not None and not (gates / STAGED).exists():
                    # Staging failed: no host was drained by the playbook (nothing to return).
                    run.in_flight = None
                    entry.update(result="failed staging", seconds=round(time.monotonic() - run.batch_t0, 1))
                    raise ReleaseFailed(f"staging {plan.target} on the hosts that lacked it failed, before any "
                                        f"host was switched: {e}") from e
                entry.update(result="failed health", seconds=round(time.monotonic() - run.batch_t0, 1))
                raise ReleaseFailed(f"batch {i} ({', '.join(batch)}) failed: {e}") from e
            raise ReleaseFailed(f"batch {i} ({', '.join(batch)}): switch.yml ended without switching it")
        if switched != batch:   # cannot happen: the playbook takes the plan's order and sizes
            run.in_flight = sorted(set(batch) | set(switched))   # put back whatever it touched
            _verdict(gates, batch[0], "stopped: the hosts switched are not the plan's")
            raise ReleaseFailed(f"batch {i}: Ansible switched {', '.join(switched)}, the plan said "
                                f"{', '.join(batch)}; the release stopped before the next batch")
        lb.enable(batch)   # the gate judges the batch's hosts taking traffic
        if i == len(plan.batches) and at_last_gate is not None:
            at_last_gate()
        verdict = _judge_batch(env, run, i, batch, held=held, probe=probe, slo=slo)
        if verdict != "passed":
            _verdict(gates, batch[0], verdict)
            raise ReleaseFailed(f"batch {i} ({', '.join(batch)}) missed the SLO: {verdict}.")
        entry.update(result="passed", seconds=round(time.monotonic() - run.batch_t0, 1))
        # Said before the verdict is written: the next batch's output comes after it.
        log(f"batch {i} done in {entry['seconds']}s")
        run.in_flight = None
        if i < len(plan.batches):
            held.renew()   # the lease is verified before any host of the next batch is touched
            _begin_batch(run, probe, i + 1, plan.batches[i])
            lb.drain(plan.batches[i])
        _verdict(gates, batch[0], "passed")
    run.switching.switched = True


STAGED = "@staged"   # switch.yml's staging play writes <gate dir>/@staged when every host has the release
START_VERDICT = "@start"   # an early-started switch.yml reads no host before <gate dir>/@start.verdict is `passed`
RELEASE_VERDICT = "@release"   # switch.yml's last play waits for <gate dir>/@release.verdict (no host has an @)


@dataclass
class _Switching:
    """The rolling switch's playbook after its batches: it waits for opsbook's verdict on the whole
    release (verify, the probe read back) and marks it good when that is `good`."""

    playbook: ansible.Background
    gates: Path
    switched: bool = False   # every batch passed: the playbook waits for the release verdict

    def mark_good(self) -> None:
        _verdict(self.gates, RELEASE_VERDICT, "good")
        self.playbook.wait()


def _end_switching(run: Run, why: str) -> None:
    """After a failure or an interrupt, before anything is put back: the switch playbook ends. One
    that switched every batch waits for the release verdict (it is told, and ends without marking
    anything); one still switching is stopped in order, as leaving its block always did. Shielded:
    it takes seconds, and the put-back after it must not overlap it."""
    switching, run.switching = run.switching, None
    if switching is None or not switching.playbook.running():
        return
    with interrupts.shielded():
        if switching.switched:
            _verdict(switching.gates, RELEASE_VERDICT, why.replace("\n", " ")[:500] or "stopped")
            deadline = time.monotonic() + 10
            while switching.playbook.running() and time.monotonic() < deadline:
                time.sleep(0.05)
        switching.playbook.stop_in_order()


def _verdict(gates: Path, name: str, text: str) -> None:
    """Write a verdict for the playbook, whole or not at all (a rename): the playbook polls for the
    file and must never read it half-written. `name`: a batch's first host, or RELEASE_VERDICT (the
    verdict on the whole release, after the last batch)."""
    tmp = gates / f".{name}.verdict.tmp"
    tmp.write_text(text)
    tmp.replace(gates / f"{name}.verdict")


def _begin_batch(run: Run, probe, i: int, batch: list[str]) -> None:
    if probe:
        probe.mark(f"batch {i}")
    run.batch_t0 = time.monotonic()
    run.batches.append({"batch": i, "hosts": ", ".join(batch), "result": "switching"})
    # A failure from here on leaves the batch in flight: _put_back returns it, whatever the failure was.
    run.in_flight = batch


def _switched(switching: ansible.Background, path: Path) -> list[str] | None:
    """The hosts the playbook says it switched (it writes `path` when a batch is done), or None
    when the playbook ended first."""
    while True:
        running = switching.running()
        if path.exists():
            return path.read_text().split()
        if not running:
            return None
        time.sleep(0.05)


def _judge_batch(env: Env, run: Run, i: int, batch: list[str], *, held, probe, slo) -> str:
    """The batch's gate: "passed", or what it missed."""
    held.check()
    if not probe:
        return "passed"
    name = f"batch {i}"
    # The switched hosts take traffic for a while (`opsbook_release_gate_seconds`), then every
    # request sent during the batch has its answer, or counts with how long it has waited.
    time.sleep(float(env.var("opsbook_release_gate_seconds", 2)))
    gate, note = probe.results().baseline_slo(slo, BASELINE_PHASES)
    probe.settle(name, within_s=float(gate.get("max_p99_ms") or 2000) / 1000 + 0.5)
    results = probe.results()
    if note and note not in run.notes:
        run.notes.append(note)
        log(note)
    ok, reasons = results.phase_within(name, gate)
    entry = run.batches[-1]
    entry["gate"] = "passed" if ok else "failed: " + "; ".join(reasons)
    if not ok:
        entry.update(result="failed gate", seconds=round(time.monotonic() - run.batch_t0, 1))
        return "; ".join(reasons)
    return "passed"


def _plot_title(run: Run, env: Env) -> str:
    return f"{run.plan.kind} {run.plan.target} to {env.name}"


def _write_record(env: Env, run: Run, kernel: runner.WarmKernel | None = None) -> None:
    """Run the release runbook over the run's data; the data and the probe's plot live in a temporary
    directory until the record (which embeds the plot) is written."""
    ahead, run.record_ahead = run.record_ahead, None
    with ahead.dir if ahead is not None else tempfile.TemporaryDirectory(prefix="opsbook-release-") as tmp:
        plot, error = None, None
        if ahead is not None:
            plot, error = ahead.take()
        elif run.probe_results is not None:
            try:
                plot = run.probe_results.plot(Path(tmp) / "probe.png", title=_plot_title(run, env))
            except Exception as e:  # noqa: BLE001 - a plot that cannot be drawn never costs the record
                error = e
        if plot is not None:
            run.probe_plot = str(plot)
        if error is not None:
            run.notes.append(f"the probe's plot could not be drawn ({type(error).__name__}: {error}); its figures "
                             "are in the record")
        data = run.data()
        path = Path(tmp) / "release.json"
        path.write_text(json.dumps(data, indent=2, default=str))
        try:
            runner.run("release", env, {"release_data": str(path)}, record_id=run.record_id, started=run.started,
                       kernel=kernel)
        except runner.RunbookFailed:
            if run.outcome == "succeeded":
                raise
