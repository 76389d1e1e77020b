"""Release and rollback of an environment (`invoke release`, `invoke rollback`).

A release: guardrails (known env, existing artifact; guardrails.py: the rehearsal gate and the
safety point), plan (hosts in batches, the version each
serves, migrations; plan.py), then under the environment's release lock and a probe driving
traffic through the load balancer, the phases described in plan.PHASES (steps.py): provision,
preflight, expand migrations (a child migrate record), stage, the rolling switch batch by batch
with a gate after each batch, probe read-back, mark good. A batch that fails its health check or
its gate is returned to the version it had and the release stops. Every release and rollback
ends with a record (runbooks/release.ipynb, record.py), succeeded or failed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from opsbook.core.errors import OpsbookError
from opsbook.core.inventory import Env
from opsbook.engines import artifact, fleet, interrupts, scale_gate
from opsbook.engines.records import ledger
from opsbook.engines.records.store import store_for
from opsbook.operations.release import guardrails
from opsbook.operations.release.plan import Plan, batches_of, check_batch, make_plan
from opsbook.operations.release.record import ReleaseFailed
from opsbook.operations.release.steps import execute, log

__all__ = ["Plan", "ReleaseFailed", "batches_of", "make_plan", "previous_good", "release", "rollback"]


def release(env: Env, version: str | None = None, *, batch: str | None = None, dry_run: bool = False,
            wait: int = 0, skip_rehearsal: bool = False, skip_scale_check: bool = False,
            reason: str | None = None) -> str:
    """Release `version` (default: the current code, built if missing) to `env`. Returns the version.

    An environment that asks for it (`opsbook_require_scale_check`) first needs a passing scaling check of
    this artifact (opsbook.engines.scale_gate), and one that names a rehearsal environment a rehearsal
    there (guardrails.py). `skip_scale_check` / `skip_rehearsal` with a `reason` override them; the
    record says so."""
    guardrails.check_overrides(skip_rehearsal=skip_rehearsal, skip_scale_check=skip_scale_check, reason=reason)
    _check_input(batch, wait)   # before anything is built or read
    with _before_the_lock("release", version or "the current code", env) as doing:
        doing.append("building or finding its artifact")
        art = artifact.find(version) if version else artifact.build()
        doing.append("checking the scaling gate")
        read = ledger.Ledgers(env)   # both gates read staging's ledger (for prod): once
        gate = scale_gate.check_release(env, art.version, art.sha256,
                                        skip_reason=reason if skip_scale_check else None, read=read)
        if gate.required:
            log(gate.text())
        if env.kind == "lab" and not dry_run:
            from opsbook.engines import lab

            doing.append("making the lab's missing hosts; one it was making is made again by the next release")
            lab.up(env)   # the lab's hosts must exist before they can be released to (no-op when up)
        doing.append("planning")
        plan = make_plan(env, art, kind="release", batch=batch)
        print(plan.text(), flush=True)
        doing.append("checking its guardrails")
        checked = guardrails.check(env, art, plan.migrations_pending, skip_rehearsal=skip_rehearsal, reason=reason,
                                   dry_run=dry_run, out=log, read=read)
    if dry_run:
        _say_restarts_owed(env, plan)
        log("dry run: nothing was locked or changed")
        return art.version
    return execute(env, plan, art, wait=wait, replan=lambda: make_plan(env, art, kind="release", batch=batch),
                   guardrails=checked, notes=[gate.text()] if gate.required else None,
                   scale_gate=gate.as_dict() if gate.required else None)


def rollback(env: Env, to: str | None = None, *, batch: str | None = None, dry_run: bool = False,
             wait: int = 0) -> str:
    """Roll `env` back to the newest earlier good release (or `to`). No database change."""
    _check_input(batch, wait)
    with _before_the_lock("rollback", to or "the previous good release", env) as doing:
        doing.append("reading what the hosts serve")
        current = fleet.served_versions(env)
        target = to or previous_good(env, exclude={v for v in current.values() if v})
        if not target:
            raise OpsbookError(f"no earlier good release of {env.name} is known to roll back to; name one with "
                               f"--to V (`invoke records --env {env.name} --runbook release`). Nothing was changed.")
        doing.append("planning")
        art = artifact.find(target)
        plan = make_plan(env, art, kind="rollback", batch=batch)
        print(plan.text(), flush=True)
    if dry_run:
        _say_restarts_owed(env, plan)
        log("dry run: nothing was locked or changed")
        return target
    return execute(env, plan, art, wait=wait, replan=lambda: make_plan(env, art, kind="rollback", batch=batch))


def _say_restarts_owed(env: Env, plan: Plan) -> None:
    """For a dry run: the hosts the plan shows as already there whose service predates its configuration
    are switched all the same (a drained restart). Read only here: it costs a real release an SSH read of
    every app host, and the switch reads it on each host itself."""
    owed = [h for h, o in fleet.restart_owed(env).items() if o]
    there = [h for h in owed if plan.current.get(h) == plan.target]
    if there:
        log(f"{', '.join(there)}: already serving {plan.target}, but the service started before its unit or "
            f"environment file was last written; the rolling switch restarts it there all the same, drained")


@contextlib.contextmanager
def _before_the_lock(kind: str, what: str, env: Env) -> Iterator[list[str]]:
    """An interrupt (SIGINT, SIGTERM, SIGHUP) before the release takes its lock, said in one sentence: no
    host was switched and there is no record (execute() takes interrupts in hand from the lock on). The
    caller appends what it is doing to the yielded list, so the sentence names the step it stopped in."""
    doing: list[str] = []
    try:
        yield doing
    except interrupts.Stopped:
        raise
    except KeyboardInterrupt as e:
        step = f" (while {doing[-1]})" if doing else ""
        raise interrupts.Stopped(
            f"the {kind} of {what} to {env.name} was {interrupts.describe(e)} before it took the lock{step}: "
            f"nothing was released and no record was written. `invoke status --env {env.name}` shows what each "
            f"host serves; run the {kind} again when ready.", interrupts.signal_of(e)) from None


def _check_input(batch: str | None, wait: int) -> None:
    check_batch(batch)
    if wait < 0:
        raise OpsbookError(f"--wait {wait}: give the seconds to wait for another operation's lock, 0 or more "
                           f"(0: do not wait). Nothing was changed.")


def previous_good(env: Env, exclude: set[str]) -> str | None:
    """The newest version whose release to this environment succeeded, other than `exclude`."""
    for e in reversed(ledger.releases(store_for(env).ledger(), outcome="succeeded")):
        v = (e.get("figures") or {}).get("version")
        if v and v not in exclude and artifact.artifact_path(v).exists():
            return v
    return None
