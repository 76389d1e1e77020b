"""`invoke status`: what an environment runs now. Read-only, fast, writes no record."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from opsbook.core.inventory import Env
from opsbook.core.paths import APP_MIGRATIONS
from opsbook.engines import database, fleet, rotation
from opsbook.engines import lock as locks
from opsbook.engines.records import ledger
from opsbook.engines.records.store import store_for


def status_text(env: Env) -> str:
    lines = [f"environment {env.name} ({env.kind})"]
    # Three reads of different hosts (app hosts over HTTP or SSH, the load balancers, SSH to the app
    # hosts), each mostly waiting on the network: side by side.
    with ThreadPoolExecutor(max_workers=3) as pool:
        versions_read = pool.submit(fleet.served_versions, env)
        seen_by_read = pool.submit(lambda: rotation.rotation_for(env).status())   # haproxy's or an ALB's
        owed_read = pool.submit(fleet.restart_owed, env)
        versions, seen_by, owed = versions_read.result(), seen_by_read.result(), owed_read.result()
    lines.append("app hosts (version served; how each load balancer sees it):")
    out_of_rotation = []
    for host, version in versions.items():
        why = "" if version else f"  ({versions.reasons.get(host, 'no answer')})"
        seen = seen_by.get(host, {})
        lb = ", ".join(f"{name} {state}" for name, state in seen.items()) or "no load balancer"
        if any(state != "UP" for state in seen.values()):
            out_of_rotation.append(host)
        lines.append(f"  {host:<10} {version or 'not serving'}{why}  [{lb}]")
    if out_of_rotation:
        lines.append(f"  out of rotation: {', '.join(out_of_rotation)} (not UP in a load balancer: a release "
                     f"or provision stopped half-way, or the host is down); the next release puts answering hosts "
                     f"back, and the next provision those it was restarting")
    if any(owed.values()):
        lines.append(f"  restart owed: {', '.join(h for h, o in owed.items() if o)} (the service runs but started "
                     f"before its unit or environment file was last written: a provision or release stopped "
                     f"half-way, or a file edited by hand); `invoke provision --env {env.name} --hosts app` restarts "
                     f"them, drained")
    served = {v for v in versions.values() if v}
    if len(served) > 1:
        lines.append("  the fleet serves mixed versions: a release stopped half-way, or is running")
    lines.append("lock: " + locks.status_text(locks.lock_for(env)))
    try:
        releases = ledger.releases(store_for(env).ledger())
    except Exception as e:  # noqa: BLE001 - status reports an unreadable store instead of failing
        lines.append(f"last release: record store not readable ({e})")
    else:
        if releases:
            last = releases[-1]
            lines.append(f"last {ledger.kind(last)}: {(last.get('figures') or {}).get('version')} "
                         f"{last.get('outcome')} at {last.get('end')} (record {last.get('id')})")
        else:
            lines.append("last release: none recorded")
    lines.append("migrations: " + _pending(env))
    return "\n".join(lines)


def _pending(env: Env) -> str:
    """What this checkout's migrations would still apply; a release reads its artifact's instead."""
    try:
        with database.Admin(env) as db:
            pending = db.pending(APP_MIGRATIONS)
    except Exception as e:  # noqa: BLE001 - status reports an unreachable database instead of failing
        return f"database not reachable ({str(e).splitlines()[0]})"
    return (f"expand pending: {', '.join(pending.expand) or 'none'}; "
            f"contract pending: {', '.join(pending.contracts) or 'none'}")
