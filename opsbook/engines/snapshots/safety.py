"""A release's safety point: the snapshot a release whose plan has expand migrations can point
back to.

The inventory decides (``opsbook_release_snapshot``): ``required`` (staging, prod) or ``off`` (the
lab, where releases come fast). When required and the plan has expand migrations, the
release takes a snapshot first through the environment's snapshot path (its record names it);
where taking one is not possible (no path for the environment, or its database is not in a state
to be snapshotted), it goes ahead only on a snapshot younger than
``opsbook_release_snapshot_max_age`` that exists already, and refuses otherwise.

:func:`decide` is the rule, on plain values (tested with moto's snapshots and ledger entries);
:func:`decide_for` reads them for an environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from opsbook.engines.snapshots.base import PathNotBuilt, Snapshot, SnapshotError, parse_age

SETTINGS = ("required", "off")
TAKE, USE, NONE, REFUSE = "take", "use", "none", "refuse"


@dataclass
class Decision:
    action: str                      # take | use | none | refuse
    why: str
    snapshot: dict[str, Any] | None = None   # the snapshot used (or, once taken, the one taken)

    @property
    def refused(self) -> bool:
        return self.action == REFUSE

    def text(self) -> str:
        return f"safety point: {self.action}: {self.why}"

    def to_record(self) -> dict[str, Any]:
        return {"action": self.action, "why": self.why, "snapshot": self.snapshot,
                "id": (self.snapshot or {}).get("id")}


def decide(*, env: str, setting: str, expand_pending: list[str], can_take: bool, why_not: str = "",
           snapshots: list[Snapshot], max_age: timedelta | None, now: datetime | None = None) -> Decision:
    """The safety point of a release (see the module's docstring)."""
    now = now or datetime.now(UTC)
    if setting not in SETTINGS:
        raise SnapshotError(f"opsbook_release_snapshot of {env} is {setting!r}; it must be one of "
                            f"{', '.join(SETTINGS)}. Nothing was changed. Fix it in the inventory.")
    if setting == "off":
        return Decision(NONE, f"opsbook_release_snapshot is off for {env}")
    if not expand_pending:
        return Decision(NONE, "the plan has no expand migrations: the release changes no schema")
    if can_take:
        return Decision(TAKE, f"the plan has expand migrations ({', '.join(expand_pending)}): a snapshot is taken "
                              f"before they run")
    recent = [s for s in snapshots if s.status == "available" and s.age(now) is not None
              and max_age is not None and s.age(now) <= max_age]
    if recent:
        best = max(recent, key=lambda s: s.created or "")
        return Decision(USE, f"a snapshot cannot be taken now ({why_not}); {best.id}, taken {best.created}, is "
                             f"younger than opsbook_release_snapshot_max_age", snapshot=best.to_dict())
    limit = "no opsbook_release_snapshot_max_age is set" if max_age is None else \
        f"none is younger than opsbook_release_snapshot_max_age ({max_age})"
    return Decision(REFUSE, f"the plan has expand migrations ({', '.join(expand_pending)}) and {env} requires a "
                            f"safety point, but a snapshot cannot be taken now ({why_not}) and {limit}. Nothing was "
                            f"changed. Take one (`invoke snapshot --env {env} --reason R`) and release again, or"
                            f", where the inventory allows it, set opsbook_release_snapshot: off")


def decide_for(env, expand_pending: list[str], now: datetime | None = None) -> Decision:
    """The decision for a release to `env` whose plan has `expand_pending` migrations."""
    from opsbook.engines.snapshots.paths import for_env

    setting = str(env.var("opsbook_release_snapshot", "required") or "required")
    max_age = parse_age(env.var("opsbook_release_snapshot_max_age", None), "opsbook_release_snapshot_max_age")
    if setting == "off" or not expand_pending:
        return decide(env=env.name, setting=setting, expand_pending=expand_pending, can_take=False,
                      snapshots=[], max_age=max_age, now=now)
    try:
        path = for_env(env)
    except PathNotBuilt as e:
        return decide(env=env.name, setting=setting, expand_pending=expand_pending, can_take=False,
                      why_not=str(e).split(". Nothing was done")[0], snapshots=[], max_age=max_age, now=now)
    can, why_not = path.can_take()
    snaps = [] if can else path.list()
    return decide(env=env.name, setting=setting, expand_pending=expand_pending, can_take=can, why_not=why_not,
                  snapshots=snaps, max_age=max_age, now=now)
