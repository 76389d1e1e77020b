"""`invoke status`: what an environment runs now. Read-only, fast, writes no record."""

from __future__ import annotations

from opsbook import fleet
from opsbook.inventory import load


def status_text(env_name: str) -> str:
    from opsbook import lock as locks
    from opsbook.record_store import store_for

    env = load(env_name)
    lines = [f"environment {env.name} ({env.kind})"]
    versions = fleet.served_versions(env)
    lines.append("app hosts:")
    for host, version in versions.items():
        why = "" if version else f"  ({versions.reasons.get(host, 'no answer')})"
        lines.append(f"  {host:<10} {version or 'not serving'}{why}")
    served = {v for v in versions.values() if v}
    if len(served) > 1:
        lines.append("  the fleet serves mixed versions: a release stopped half-way, or is running")
    lines.append("lock: " + locks.status_text(locks.lock_for(env)))
    try:
        releases = [e for e in store_for(env).ledger() if e.get("runbook") == "release"]
    except Exception as e:  # noqa: BLE001 - status reports an unreadable store instead of failing
        lines.append(f"last release: record store not readable ({e})")
    else:
        if releases:
            last = releases[-1]
            figs = last.get("figures") or {}
            lines.append(f"last {figs.get('kind', 'release')}: {figs.get('version')} {last.get('outcome')} "
                         f"at {last.get('end')} (record {last.get('id')})")
        else:
            lines.append("last release: none recorded")
    lines.append("migrations: " + _pending(env))
    return "\n".join(lines)


def _pending(env) -> str:
    """What this checkout's migrations would still apply; a release reads its artifact's instead."""
    from opsbook import ROOT
    from opsbook.release import pending_migrations

    try:
        expand, contracts = pending_migrations(env, ROOT / "app" / "migrations")
    except Exception as e:  # noqa: BLE001 - status reports an unreachable database instead of failing
        return f"database not reachable ({str(e).splitlines()[0]})"
    return f"expand pending: {', '.join(expand) or 'none'}; contract pending: {', '.join(contracts) or 'none'}"
