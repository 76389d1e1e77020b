"""AWS environments as a whole (`invoke env.list`, `invoke env.resources`, `invoke env.destroy`).

`environments_text` lists every environment: the inventories' own, and the purpose environments
(`invoke env.create`) found by their tags in each AWS environment's account, with owner, age and
time left (expired ones flagged). An account it cannot check is named with the reason, not skipped
silently.

`resources` lists what is tagged for an environment (read-only). `destroy` deletes exactly that:
the list is shown first; an environment that asks for confirmation (`opsbook_confirm`, prod) also
needs a reason and the environment's name typed back (or `--confirm ENV`). The account guard runs
before anything is read. Deletion runs under the environment's lock, except the lock's own store,
deleted last once the lock is released.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from opsbook.core.errors import OpsbookError
from opsbook.core.inventory import Env
from opsbook.engines import aws
from opsbook.engines import lock as locks


class DestroyRefused(OpsbookError):
    """env.destroy was refused before deleting anything."""


def _log(msg: str) -> None:
    print(f"[opsbook] {msg}", flush=True)


def _span(delta: timedelta) -> str:
    seconds = int(abs(delta.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    return f"{days}d{hours}h" if days else f"{hours}h{minutes:02d}m" if hours else f"{minutes}m"


def _when(iso: str) -> datetime | None:
    try:
        return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def environments_text(envs: list[Env], now: datetime | None = None) -> str:
    """What `invoke env.list` prints: one line per environment; purpose ones with owner, age and TTL left."""
    now = now or datetime.now(UTC)
    rows = [("ENVIRONMENT", "KIND", "LIKE", "ACCOUNT", "OWNER", "AGE", "TIME LEFT")]
    notes = []
    for env in envs:
        if env.kind != "aws":
            rows.append((env.name, env.kind, "-", "-", "-", "-", "-"))
            continue
        t = aws.target(env)
        rows.append((env.name, "aws", "-", t.account_id, "-", "-", "-"))
        try:
            aws.check_account(env)
            found = aws.purpose_envs(t, env.name)
        except OpsbookError as e:
            notes.append(f"{env.name}'s purpose environments are not listed: {e}")
            continue
        for p in found:
            created, expires = _when(p.created), _when(p.expires)
            age = _span(now - created) if created else "?"
            if expires is None:
                left = "?"
            elif expires <= now:
                left = f"EXPIRED {_span(now - expires)} ago"
                notes.append(f"{p.name} expired at {p.expires}: `invoke env.destroy --env {p.name}` removes it")
            else:
                left = _span(expires - now)
            rows.append((p.name, "aws", p.like, t.account_id, p.owner, age, left))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines + notes)


def resources_text(env: Env) -> str:
    """What `invoke env.resources` prints: every resource tagged for the environment, and any role
    claimed twice."""
    who = aws.check_account(env)
    t = aws.target(env)
    found = aws.find(t)
    lines = [f"{env.name}: account {who.account} ({t.region}), {len(found)} resource(s) tagged "
             f"{aws.TAG_ENV}={env.name}"]
    lines += [f"  {r.describe()}" for r in found]
    for role, rs in sorted(aws.duplicates(found).items()):
        lines.append(f"  AMBIGUOUS role {role}: claimed by " + "; ".join(r.describe() for r in rs))
    return "\n".join(lines)


def destroy(env: Env, *, reason: str | None = None, confirm: str | None = None, dry_run: bool = False,
            ask: Callable[[str], str] | None = None) -> list[aws.Resource]:
    """Delete every resource tagged for `env` (and nothing else). Returns what was deleted."""
    who = aws.check_account(env)
    t = aws.target(env)
    found = aws.find(t)
    if not found:
        _log(f"nothing is tagged {aws.TAG_ENV}={env.name} in account {who.account} ({t.region}); nothing to delete")
        return []
    print(f"{env.name}: {len(found)} resource(s) tagged {aws.TAG_ENV}={env.name} in account {who.account} "
          f"({t.region}) would be deleted:", flush=True)
    for r in found:
        print(f"  {r.describe()}", flush=True)
    if dry_run:
        _log("dry run: nothing was deleted")
        return []
    guarded = bool(env.var("opsbook_confirm", False))
    if guarded:
        if not reason or not reason.strip():
            raise DestroyRefused(f"destroying {env.name} needs --reason (why it is destroyed; it is printed and "
                                 f"logged). Nothing was deleted.")
        typed = confirm
        if typed is None:
            if ask is None and not sys.stdin.isatty():
                raise DestroyRefused(f"destroying {env.name} needs its name typed back, and there is no terminal "
                                     f"to ask: pass --confirm {env.name}. Nothing was deleted.")
            typed = (ask or input)(f"type the environment's name ({env.name}) to delete these resources: ")
        if (typed or "").strip() != env.name:
            raise DestroyRefused(f"the name typed ({(typed or '').strip()!r}) is not {env.name!r}. Nothing was "
                                 f"deleted.")
        _log(f"destroying {env.name} for: {reason}")
    final = (f"opsbook-{env.name}-final-{datetime.now(UTC):%Y%m%d%H%M}"
             if env.var("opsbook_aws_destroy_final_snapshot", guarded) else None)
    recovery = int(env.var("opsbook_aws_secret_recovery_days", 7))
    lock_home = [r for r in found if r.role == "lock"]
    rest = [r for r in found if r.role != "lock"]
    deleted: list[aws.Resource] = []
    lock = locks.lock_for(env)
    try:
        held = lock.acquire(f"env.destroy ({reason or 'no reason given'})")
    except locks.LockHeld:
        raise
    except Exception as e:  # a lock store that is half gone: say so, change nothing
        raise DestroyRefused(f"the lock of {env.name} could not be taken ({type(e).__name__}: {e}). Nothing was "
                             f"deleted. If an earlier destroy deleted it, the environment is half gone: look at "
                             f"`invoke env.resources --env {env.name}`.") from e
    try:
        _log(held.message)
        deleted += aws.destroy(t, rest, log=_log, final_snapshot=final, secret_recovery_days=recovery)
    finally:
        held.release()
    deleted += aws.destroy(t, lock_home, log=_log, final_snapshot=final, secret_recovery_days=recovery)
    left = aws.find(t)
    if left:
        raise OpsbookError(f"{env.name}: {len(left)} resource(s) are still tagged for it after the destroy: "
                           + "; ".join(r.describe() for r in left)
                           + f". Run `invoke env.destroy --env {env.name}` again, or delete them by hand.")
    _log(f"{env.name}: deleted {len(deleted)} resource(s); nothing tagged {aws.TAG_ENV}={env.name} is left"
         + (f" (final database snapshots: {final}-*)"
            if final and any(r.kind in ("db-instance", "db-cluster") for r in deleted) else ""))
    return deleted
