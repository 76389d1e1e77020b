"""The records site: `invoke records.site` builds static pages of every run from a record store
(build.py says what they hold and how a build stays incremental); `invoke records.serve` shows a
local build on 127.0.0.1 (serve.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opsbook.core.errors import OpsbookError
from opsbook.core.inventory import Env
from opsbook.operations.records_site.builder import Built, build
from opsbook.operations.records_site.server import serve


def running(env: Env, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The operation that holds the environment's lock now, if any (an expired lease is not running)."""
    from opsbook.engines import lock

    try:
        holder = lock.lock_for(env).holder()
    except Exception as e:  # noqa: BLE001 - the site is still worth building without it; say so
        log(f"{env.name}: the release lock could not be read ({type(e).__name__}: {e}); the site shows no "
            "running operation for it")
        return []
    return [holder.to_dict()] if holder is not None and not holder.expired() else []


def site(envs: list[Env], log: Callable[[str], None] = print) -> list[Built]:
    """Build the site of each environment's record store (environments sharing a store share a site).
    A store that cannot be read is reported after the others are built."""
    from opsbook.engines.records.store import store_for

    by_store: dict[str, list[Env]] = {}
    for env in envs:
        by_store.setdefault(str(env.var("opsbook_record_store")), []).append(env)
    built, failed = [], []
    for group in by_store.values():
        names = ", ".join(e.name for e in group)
        try:
            store = store_for(group[0])
            store.check()
            built.append(build(store, running=[h for e in group for h in running(e, log)], log=log))
        except OpsbookError as e:
            failed.append(f"{names}: {e}")
        except Exception as e:  # noqa: BLE001 - one unreadable store (S3, network) must not hide the others
            failed.append(f"{names}: {type(e).__name__}: {e}")
    if failed:
        done = ", ".join(b.store for b in built) or "none"
        raise OpsbookError("the site could not be built for\n  " + "\n  ".join(failed) +
                           f"\nSites built: {done}. Nothing else was changed. Fix the cause above and run "
                           "`invoke records.site --env ENV` again for those environments.")
    return built


__all__ = ["Built", "build", "running", "serve", "site"]
