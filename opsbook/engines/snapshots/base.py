"""What every snapshot path offers, whatever takes the snapshot: take, list, delete, drill.

An environment's snapshot path is chosen by its kind (``opsbook.engines.snapshots.paths.for_env``):

- an AWS environment: RDS DB snapshots (``aws_env_db_kind: rds``) or Aurora cluster snapshots
  (``aurora``) of the database tagged for it (``opsbook.engines.snapshots.aws``);
- the lab: pgBackRest on the repository host (``db2``) of its database host (``db1``), over SSH
  (``opsbook.engines.snapshots.lab`` over the machinery in ``opsbook.engines.snapshots.pgbackrest``).

Retention (:func:`retention`) and the ages an inventory writes (``7d``, ``12h``) are the same for
every path. Only snapshots opsbook took (tagged so) are ever deleted; never the newest; never one
a release record still points at as its safety point.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from opsbook.core import ages
from opsbook.core.errors import OpsbookError


class SnapshotError(OpsbookError):
    """A snapshot could not be taken, listed, deleted or drilled; the message says what was left."""


class PathNotBuilt(SnapshotError):
    """This environment's snapshot path does not exist yet; nothing was done."""


@dataclass(frozen=True)
class Snapshot:
    """One snapshot of an environment's database, as every path describes it."""

    id: str
    kind: str                      # rds | aurora | pgbackrest
    source: str                    # what it is a snapshot of (DB instance, cluster, stanza)
    status: str                    # available | creating | failed | ...
    created: str | None            # ISO 8601 UTC; None while the service has not said
    size_gb: float | None          # as the service reports it (RDS: allocated storage)
    engine: str | None
    engine_version: str | None
    ours: bool                     # taken by opsbook (tagged opsbook:managed-by=opsbook for this env)
    record_id: str | None = None   # the record of the run that took it
    reason: str | None = None

    def created_at(self) -> datetime | None:
        return datetime.fromisoformat(self.created) if self.created else None

    def age(self, now: datetime | None = None) -> timedelta | None:
        when = self.created_at()
        return None if when is None else (now or datetime.now(UTC)) - when

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DrillVerdict:
    """What a restore drill could say. `passed` only when it restored, read and compared the data."""

    snapshot: str
    verified: bool
    passed: bool
    problem: str | None = None
    details: dict[str, Any] | None = None

    @property
    def verdict(self) -> str:
        if not self.verified:
            return f"NOT VERIFIED: {self.problem} The drill did not pass."
        return "passed" if self.passed else f"FAILED: {self.problem}"


class SnapshotPath(Protocol):
    """The snapshot machinery of one environment (one implementation per kind of environment)."""

    kind: str

    def take(self, *, record_id: str, reason: str, log: Callable[[str], None] = print,
             progress: list[dict[str, Any]] | None = None) -> Snapshot: ...

    def list(self) -> list[Snapshot]: ...

    def can_take(self) -> tuple[bool, str]: ...

    def in_use(self) -> dict[str, str]: ...    # snapshot id -> why retention must not delete it now

    def delete(self, snapshot: Snapshot, *, log: Callable[[str], None] = print) -> None: ...

    def drill(self, snapshot_id: str | None = None, *, log: Callable[[str], None] = print) -> DrillVerdict: ...


# --- ages and retention ---------------------------------------------------------------------


def parse_age(value: Any, setting: str) -> timedelta | None:
    """An inventory age (``30m``, ``12h``, ``7d``, ``2w``; empty or None: no limit) -> timedelta."""
    if value is None or str(value).strip() in ("", "none", "None", "off"):
        return None
    age = ages.parse(value)
    if age is None:
        raise SnapshotError(f"{setting}: {value!r} is not an age; write minutes, hours, days or weeks like 30m, "
                            f"12h, 7d or 2w, at most 100 years (or leave it empty for no limit). Nothing was done.")
    return age


@dataclass(frozen=True)
class Retention:
    """What a retention pass deletes and why each other opsbook snapshot stays."""

    delete: list[Snapshot]
    keep: dict[str, str]           # snapshot id -> why it stays

    def text(self) -> str:
        lines = [f"retention: delete {len(self.delete)}, keep {len(self.keep)} of opsbook's snapshots"]
        lines += [f"  delete {s.id} (taken {s.created}, record {s.record_id})" for s in self.delete]
        lines += [f"  keep {sid}: {why}" for sid, why in self.keep.items()]
        return "\n".join(lines)


def newest_first(snapshots: Iterable[Snapshot]) -> list[Snapshot]:
    """Newest first. Services give creation times to the second: of two taken in the same second,
    opsbook's own comes first (a drill with no snapshot named takes the first available one, and a
    snapshot opsbook just took is the one meant; AWS takes its automated one as it makes a database)."""
    return sorted(snapshots, key=lambda s: (s.created or "", s.ours, s.id), reverse=True)


def retention(snapshots: Iterable[Snapshot], *, keep: int | None, max_age: timedelta | None,
              protected: dict[str, str] | None = None, in_use: dict[str, str] | None = None,
              now: datetime | None = None) -> Retention:
    """Which of opsbook's own available snapshots a retention pass deletes: beyond the `keep` newest,
    or older than `max_age`. Never a snapshot opsbook did not take, never one that is not available
    (being made, failed: the service is still working on it or an operator should look), never the
    newest, never one in `protected` (id -> the release record that points at it), never one `in_use`
    (id -> why: a drill restoring it now). With neither `keep` nor `max_age`, nothing is deleted."""
    now = now or datetime.now(UTC)
    protected = protected or {}
    in_use = in_use or {}
    ours = sorted((s for s in snapshots if s.ours and s.status == "available" and s.created),
                  key=lambda s: (s.created or "", s.id), reverse=True)
    delete: list[Snapshot] = []
    kept: dict[str, str] = {}
    for i, s in enumerate(ours):
        age = s.age(now)
        too_many = keep is not None and i >= keep
        too_old = max_age is not None and age is not None and age > max_age
        if i == 0:
            kept[s.id] = "the newest"
        elif s.id in protected:
            kept[s.id] = f"the safety point of release record {protected[s.id]}"
        elif s.id in in_use:
            kept[s.id] = in_use[s.id]
        elif too_many or too_old:
            delete.append(s)
        else:
            kept[s.id] = "within the inventory's retention"
    return Retention(delete=delete, keep=kept)


def safety_points(release_entries: list[dict[str, Any]], newest: int) -> dict[str, str]:
    """snapshot id -> release record id, for the `newest` release records (ledger entries of the
    release runbook, oldest first) that name a safety point (figures.snapshot): a version still
    kept on the hosts can be returned to, and its safety point with it."""
    out: dict[str, str] = {}
    for e in release_entries[-newest:] if newest > 0 else []:
        sid = (e.get("figures") or {}).get("snapshot")
        if sid:
            out[str(sid)] = str(e.get("id"))
    return out
