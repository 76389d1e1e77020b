"""The snapshot operation: `invoke snapshot`, `invoke snapshot.list`, `invoke snapshot.drill`.

`invoke snapshot --env E [--reason R] [--dry-run]`: under the environment's lock, a snapshot of its
database through its snapshot path (`opsbook.engines.snapshots.paths.for_env`: an RDS DB snapshot or an
Aurora cluster snapshot for an AWS environment; for the lab, a pgBackRest full backup of its database
host into the repository on its repository host (db2) with a restore point and the manifest of that
point), tagged with the env, the record id and the reason and waited for with progress; then retention
(`opsbook_snapshot_keep`, a count, and/or `opsbook_snapshot_max_age`, an age like 30d) deletes opsbook's
own older snapshots, never the newest and never the safety point of one of the environment's newest
release records (`opsbook_release_keep` of them). The record (runbooks/snapshot.ipynb) holds the
snapshot, its progress, what retention did and the manifest (the lab) or why none was taken (AWS). A
database that cannot be snapshotted now (the lab's does not answer, or pgBackRest does not; an RDS
database that is not `available` or already being snapshotted) is refused before the lock, with no
record.

`invoke snapshot.list --env E`: every snapshot of the environment with its age, size and the record that
took it. Read-only, no record.

`invoke snapshot.drill --env E [--snapshot ID]`: the restore drill, as a record
(runbooks/restore_drill.ipynb). The lab: the backup restored to its restore point in a scratch cluster
on the repository host (off the database host), its manifest recomputed and compared, pg_amcheck,
timings. From this controller an AWS snapshot cannot be restored and read, so the drill says NOT
VERIFIED and never passes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from opsbook.core import facts, settings
from opsbook.core.errors import OpsbookError
from opsbook.core.inventory import Env
from opsbook.engines.records import ledger, runner
from opsbook.engines.records.store import new_record_id, store_for
from opsbook.engines.snapshots import base, paths


class DrillNotPassed(OpsbookError):
    """A restore drill did not pass (it failed, or could not verify); its record says why."""


# --- what the Invoke tasks call ---------------------------------------------------------------
def retention_settings(env: Env) -> tuple[int | None, Any]:
    """(`opsbook_snapshot_keep`, `opsbook_snapshot_max_age` as a timedelta); None: no limit."""
    keep = env.var("opsbook_snapshot_keep", None)
    if keep in (None, ""):
        keep = None
    elif settings.NUMBERS["opsbook_snapshot_keep"].accepts(keep):   # the check every task makes on loading
        keep = int(float(keep))
    else:
        raise base.SnapshotError(f"opsbook_snapshot_keep: {keep!r} is not a number of snapshots (1 or more; leave "
                                 f"it unset for no count limit). Nothing was done. Fix it in "
                                 f"{env.path}/group_vars/all/.")
    return keep, base.parse_age(env.var("opsbook_snapshot_max_age", None), "opsbook_snapshot_max_age")


def protected_snapshots(env: Env) -> dict[str, str]:
    """snapshot id -> release record id: the safety points of the env's newest release records.
    Raises when the ledger cannot be read (then nobody can tell, and retention deletes nothing)."""
    keep = int(env.var("opsbook_release_keep", 5) or 5)
    return base.safety_points(ledger.releases(store_for(env).ledger()), keep)


def plan_retention(env: Env, path: base.SnapshotPath,
                   now: datetime | None = None) -> tuple[base.Retention, str | None]:
    """What retention would delete now, and a note when it deletes nothing because it cannot tell."""
    keep, max_age = retention_settings(env)
    snaps = path.list()
    if keep is None and max_age is None:
        return base.Retention(delete=[], keep={}), (
            "no retention set (opsbook_snapshot_keep, opsbook_snapshot_max_age): nothing is deleted")
    try:
        protected = protected_snapshots(env)
    except Exception as e:  # noqa: BLE001 - whatever stops the ledger being read: delete nothing
        return base.Retention(delete=[], keep={s.id: "kept: the release records could not be read" for s in snaps
                                               if s.ours}), (
            f"retention deleted nothing: the release records could not be read ({type(e).__name__}: {e}), so "
            f"opsbook cannot tell which snapshot is a release's safety point")
    return base.retention(snaps, keep=keep, max_age=max_age, protected=protected, in_use=path.in_use(), now=now), None


def take(env: Env, reason: str | None = None, *, dry_run: bool = False,
         out: Callable[[str], None] = print) -> dict[str, Any]:
    """Take a snapshot and apply retention, as a record; returns the record's data (with `record`).
    A dry run says which database would be snapshotted and what retention would delete now."""
    path = paths.for_env(env)                       # the lab: refused here, before anything
    reason = (reason or "").strip() or "operator request"
    if dry_run:
        db = getattr(path, "database", lambda: None)()
        plan, note = plan_retention(env, path)
        out(f"dry run: would take a {path.kind} snapshot of {env.name}'s database"
            + (f" {db.id}" if db is not None else "") + f" (reason: {reason}); nothing was changed")
        out(note or plan.text())
        return {"dry_run": True, "retention": [s.id for s in plan.delete]}
    # Before the lock, as the release's safety point asks: a backup of a database that does not answer
    # fails only once it has begun (pgBackRest's "unable to find primary cluster", under the lock).
    can, why_not = path.can_take()
    if not can:
        raise base.SnapshotError(f"no snapshot of {env.name} can be taken now: {why_not}. Nothing was changed and no "
                                 f"record was written. Fix that (`invoke status --env {env.name}` says whether the "
                                 f"database answers), then run `invoke snapshot --env {env.name}` again.")
    started = datetime.now(UTC)
    record_id = new_record_id("snapshot")
    data: dict[str, Any] = {"env": env.name, "kind": path.kind, "reason": reason, "operator": facts.operator(),
                            "started_at": started.isoformat(timespec="seconds"), "record": record_id,
                            "outcome": "failed", "progress": []}
    with _ends_in_order(env, "snapshot", "the backup it was making is deleted, or listed as incomplete and deleted "
                        "by the next snapshot; the lock is released",
                        lambda: (f"Record {record_id} says where it stopped" if data.get("lock") else
                                 "No record was written (it stopped before taking the lock)"),
                        f"invoke snapshot --env {env.name}"), \
            runner.locked_record("snapshot", env, data, param="snapshot_data", record_id=record_id, started=started,
                                 reason=f"snapshot (record {record_id})", log=out):
        snap = path.take(record_id=record_id, reason=reason, log=out, progress=data["progress"])
        data["snapshot"] = snap.to_dict()
        data["manifest"] = manifest_note(path)
        plan, note = plan_retention(env, path)
        deleted = []
        for s in plan.delete:
            path.delete(s, log=out)
            deleted.append(s.to_dict())
        data["retention"] = {"deleted": deleted, "kept": plan.keep, "note": note, "settings": _settings_text(env)}
        data["after"] = [s.to_dict() for s in path.list()]
    return data


@contextlib.contextmanager
def _ends_in_order(env: Env, what: str, left: str, recorded: Callable[[], str], again: str) -> Iterator[None]:
    """A snapshot or drill interrupted (Ctrl-C, SIGTERM, SIGHUP) ends with what it `left`, in a sentence:
    both clean up on their way out and neither changes the environment's database. `recorded()` says
    which record was written by then (or why none was); `again` is the command that runs it again."""
    from opsbook.engines.interrupts import Stopped, describe, signal_of

    try:
        yield
    except Stopped:
        raise
    except KeyboardInterrupt as e:
        raise Stopped(f"{what} of {env.name} {describe(e)}: {left}. {env.name}'s database was not changed. "
                      f"{recorded()}. "
                      f"Run `{again}` again when ready.", signal_of(e)) from None


def manifest_note(path: base.SnapshotPath) -> str:
    """What the path says about a manifest of its snapshot (AWS: none, and why)."""
    return str(getattr(path, "manifest_note", "") or "")


def _settings_text(env: Env) -> str:
    return (f"opsbook_snapshot_keep={env.var('opsbook_snapshot_keep', None)}, "
            f"opsbook_snapshot_max_age={env.var('opsbook_snapshot_max_age', None)}, "
            f"safety points of the newest {env.var('opsbook_release_keep', 5)} release record(s) kept")


def rows(snaps: list[base.Snapshot], now: datetime | None = None) -> list[dict[str, Any]]:
    """One row per snapshot, as `snapshot.list` and the records show them."""
    now = now or datetime.now(UTC)
    out = []
    for s in snaps:
        age = s.age(now)
        out.append({"snapshot": s.id, "kind": s.kind, "status": s.status, "taken": s.created,
                    "age": _age_text(age.total_seconds()) if age is not None else "?",
                    "size_gb": s.size_gb, "engine": f"{s.engine or '?'} {s.engine_version or ''}".strip(),
                    "taken_by": f"record {s.record_id}" if s.record_id else ("opsbook" if s.ours else "not opsbook"),
                    "reason": s.reason or ""})
    return out


def _age_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def list_snapshots(env: Env, out: Callable[[str], None] = print) -> list[base.Snapshot]:
    """Print every snapshot of the environment with age, size and the record that took it."""
    path = paths.for_env(env)
    snaps = path.list()
    table = rows(snaps)
    if not table:
        out(f"{env.name}: no snapshots (take one with `invoke snapshot --env {env.name} --reason R`)")
        return snaps
    cols = ["snapshot", "status", "taken", "age", "size_gb", "engine", "taken_by", "reason"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in table)) for c in cols}
    out("  ".join(c.ljust(widths[c]) for c in cols))
    for r in table:
        out("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    keep, _ = retention_settings(env)
    out(f"{len(snaps)} snapshot(s) of {env.name}; retention: keep {keep or 'any number'}, max age "
        f"{env.var('opsbook_snapshot_max_age', None) or 'none'} (opsbook's own snapshots only)")
    return snaps


def drill(env: Env, snapshot_id: str | None = None, *, out: Callable[[str], None] = print) -> dict[str, Any]:
    """The restore drill as a record. Raises DrillNotPassed unless it verified and passed."""
    path = paths.for_env(env)
    started = datetime.now(UTC)
    t0 = time.monotonic()
    record_id = new_record_id("restore_drill")
    try:
        verdict = path.drill(snapshot_id, log=out)
    except KeyboardInterrupt as e:
        data = {"env": env.name, "kind": path.kind, "snapshot": snapshot_id or "", "verified": False, "passed": False,
                "verdict": f"NOT VERIFIED: interrupted ({type(e).__name__}) {e}".strip(), "problem": "interrupted",
                "outcome": "interrupted",
                "details": {}, "operator": facts.operator(), "started_at": started.isoformat(timespec="seconds"),
                "duration_s": round(time.monotonic() - t0, 1)}
        recorded: list[str] = []
        with _ends_in_order(env, "restore drill", "it did not pass; what it restored is removed (whatever could "
                            "not be is removed by the next drill)",
                            lambda: recorded[0] if recorded else "No record was written (a second signal stopped it)",
                            f"invoke snapshot.drill --env {env.name}"):
            runner.record_data("restore_drill", env, {"drill_data": data}, record_id=record_id, started=started,
                               log=out)
            recorded.append(f"Record {record_id} says where it stopped")
            raise
    data = {"env": env.name, "kind": path.kind, "snapshot": verdict.snapshot, "verified": verdict.verified,
            "passed": verdict.passed, "verdict": verdict.verdict, "problem": verdict.problem,
            "outcome": "succeeded" if verdict.passed else "failed",
            "details": verdict.details, "operator": facts.operator(),
            "started_at": started.isoformat(timespec="seconds"), "duration_s": round(time.monotonic() - t0, 1)}
    out(verdict.verdict)
    entry = runner.record_data("restore_drill", env, {"drill_data": data}, record_id=record_id, started=started,
                               log=out)
    data["record"] = entry.get("id")
    if not verdict.passed:
        raise DrillNotPassed(f"restore drill of {env.name} {verdict.verdict} Record {record_id} says why. Nothing "
                             f"was changed.")
    return data
