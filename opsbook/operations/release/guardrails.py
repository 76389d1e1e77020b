"""Guardrails a release passes before it locks anything, and what its record says about them.

- the rehearsal gate (`opsbook.engines.rehearsal`): an environment that names a rehearsal
  environment (prod: staging) takes only an artifact, by sha256, released successfully there on a
  fresh refresh with its expand migrations applied. `--skip-rehearsal --reason R` overrides it; the
  record says so.
- the safety point (`opsbook.engines.snapshots.safety`): a plan with expand migrations takes a
  snapshot first (the `safety point` phase, under the lock), or uses a recent one when it cannot
  take one, or is refused.

Both are decided here, before the lock; a refusal changes nothing and leaves no record.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from opsbook.core.errors import OpsbookError
from opsbook.core.inventory import Env
from opsbook.engines import artifact, rehearsal
from opsbook.engines.records import ledger
from opsbook.engines.snapshots import safety


class GuardrailRefused(OpsbookError):
    """A guardrail refused the release before anything was locked or changed."""


def check_overrides(*, skip_rehearsal: bool = False, skip_scale_check: bool = False, reason: str | None = None) -> None:
    """An override of a guardrail needs a reason (the release record keeps it): refused before anything else,
    the account check included (`invoke release` calls this first)."""
    if (reason or "").strip():
        return
    if skip_scale_check:
        raise GuardrailRefused("--skip-scale-check needs --reason R: say why this release goes out without a passing "
                               "scaling check (the release's record keeps it). Nothing was changed.")
    if skip_rehearsal:
        raise GuardrailRefused("--skip-rehearsal needs --reason R: say why this release cannot wait for a rehearsal "
                               "(the release's record keeps it). Nothing was changed.")


def check(env: Env, art: artifact.Artifact, expand_pending: list[str], *, skip_rehearsal: bool = False,
          reason: str | None = None, dry_run: bool = False, now: datetime | None = None,
          out: Callable[[str], None] = print, read: ledger.Ledgers | None = None) -> dict[str, Any]:
    """Decide the rehearsal gate and the safety point; return what the release record keeps.
    Raises GuardrailRefused (not on a dry run, which only says it would be refused)."""
    check_overrides(skip_rehearsal=skip_rehearsal, reason=reason)
    reason = (reason or "").strip()
    verdict = rehearsal.check(env, art.version, art.sha256, now=now, read=read)
    if not verdict.ok and skip_rehearsal:
        verdict.skipped = reason
    out(verdict.text())
    if not verdict.ok and not skip_rehearsal:
        message = (f"{verdict.text()}\nNothing was locked or changed. Provide the rehearsal, or override with "
                   f"`--skip-rehearsal --reason R` (written in the release record).")
        if not dry_run:
            raise GuardrailRefused(message)
        out("dry run: the release would be refused by the rehearsal gate")
    decision = safety.decide_for(env, expand_pending, now=now)
    out(decision.text())
    if decision.refused:
        if not dry_run:
            raise GuardrailRefused(f"safety point: {decision.why}")
        out("dry run: the release would be refused for want of a safety point")
    return {"rehearsal": verdict.to_record(), "snapshot": decision.to_record()}


def notes(guardrails: dict[str, Any]) -> list[str]:
    """What the release record's summary says about its guardrails."""
    out = []
    r = guardrails.get("rehearsal") or {}
    if r.get("skipped"):
        out.append(f"rehearsal gate SKIPPED (--skip-rehearsal): {r['skipped']}; missing: " + "; ".join(r.get("missing")
                                                                                                        or []))
    elif r.get("ok") and r.get("rehearsal_env"):
        out.append(f"rehearsed on {r['rehearsal_env']}: release record {r.get('release')}, refresh record "
                   f"{r.get('refresh')}")
    s = guardrails.get("snapshot") or {}
    if s.get("action") in (safety.TAKE, safety.USE):
        out.append(f"safety point ({s['action']}): {s.get('id') or 'not taken yet'}")
    return out
