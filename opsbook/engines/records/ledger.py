"""Reading the ledger: the one place that says which entries are releases, rollbacks, or match an
operator's filters. Everything that reads the ledger (status, rollback, `invoke records`, the
release history) reads it through here."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from opsbook.core import ages
from opsbook.core.errors import OpsbookError
from opsbook.engines.records.store import OUTCOMES

RELEASE, ROLLBACK = "release", "rollback"


class Ledgers:
    """Ledger entries by environment name, each environment's store read at most once (`env`, when
    given, is used for its own name instead of being loaded again). A prod release's scale gate and
    rehearsal gate both read staging's ledger, and an S3 store is a request per entry. A store that
    cannot be read raises each time it is asked, so each gate reports it in its own words."""

    def __init__(self, env: Any = None):
        self._env = env
        self._entries: dict[str, list[dict[str, Any]]] = {}

    def of(self, name: str) -> list[dict[str, Any]]:
        if name not in self._entries:
            from opsbook.core.inventory import Env
            from opsbook.engines.records.store import store_for

            # Env(name), not inventory.load(name): load's cache would keep an environment read before
            # OPSBOOK_INVENTORY_PATH changed (the tests' inventories do).
            env = self._env if self._env is not None and self._env.name == name else Env(name)
            self._entries[name] = store_for(env).ledger()
        return self._entries[name]


def kind(entry: dict[str, Any]) -> str:
    """What the entry records: its runbook's name, except that `invoke rollback` writes its record
    with the release runbook, and its figures.kind says so."""
    runbook = entry.get("runbook", "")
    if runbook == RELEASE and (entry.get("figures") or {}).get("kind") == ROLLBACK:
        return ROLLBACK
    return runbook


def releases(entries: list[dict[str, Any]], *, outcome: str | None = None,
             kinds: tuple[str, ...] = (RELEASE, ROLLBACK)) -> list[dict[str, Any]]:
    """Release and rollback entries (the release runbook's), oldest first."""
    out = [e for e in entries if e.get("runbook") == RELEASE and kind(e) in kinds
           and (outcome is None or e.get("outcome") == outcome)]
    return sorted(out, key=lambda e: e.get("start", ""))


def parse_since(since: str | None, now: datetime | None = None) -> datetime | None:
    """``7d``, ``12h``, ``30m``, ``2w`` or an ISO date/time (UTC unless it says otherwise)."""
    if not since:
        return None
    now = now or datetime.now(UTC)
    age = ages.parse(since)
    if age is not None:
        return now - age
    try:
        when = datetime.fromisoformat(since.strip())
    except ValueError:
        raise OpsbookError(
            f"--since {since!r}: expected an age ({ages.FORMS}, at most 100 years) "
            "or an ISO date (2025-01-31, 2025-01-31T12:00)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def select(
    entries: list[dict[str, Any]],
    *,
    env: str | None = None,
    runbook: str | None = None,
    outcome: str | None = None,
    since: str | datetime | None = None,
) -> list[dict[str, Any]]:
    """Ledger entries matching every filter given."""
    if outcome and outcome not in OUTCOMES:
        raise OpsbookError(f"--outcome {outcome!r}: outcomes are {', '.join(OUTCOMES)}")
    cutoff = parse_since(since) if isinstance(since, str) else since
    out = []
    for e in entries:
        if env and e.get("env") != env:
            continue
        if runbook and e.get("runbook") != runbook:
            continue
        if outcome and e.get("outcome") != outcome:
            continue
        if cutoff and datetime.fromisoformat(e["start"]) < cutoff:
            continue
        out.append(e)
    return out
