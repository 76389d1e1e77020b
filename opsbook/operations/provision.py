"""Provisioning (`invoke provision`): converge an environment's hosts with playbooks/site.yml."""

from __future__ import annotations

import time

from opsbook.core.errors import OpsbookError
from opsbook.core.inventory import Env
from opsbook.engines import ansible
from opsbook.engines import lock as locks


def provision(env: Env, check: bool = False, hosts: str | None = None) -> None:
    """Converge every host (idempotent: a second run reports changed=0), or only `hosts` (host and
    group names of the inventory, comma-separated); `check` changes nothing."""
    limit = _limit(env, hosts) if hosts else None
    if env.kind == "lab":
        from opsbook.engines import lab

        lab.up(env)   # the lab's hosts must exist before they can be provisioned (no-op when up)
    t0 = time.monotonic()
    # Every host is converged and stamped with the configuration's fingerprint, so that releases
    # converge a host only when its configuration changed since. Under the environment's lock:
    # provisioning restarts services a release or a migration may be relying on.
    what = "provision" + (f" of {limit}" if limit else "") + (" (check mode)" if check else "")
    with locks.lock_for(env).hold(what, wait=0):
        ansible.run_playbook(env, "site.yml", check=check, limit=limit, what="provisioning",
                             extra_vars={"opsbook_converge_fingerprint": ansible.fingerprint(env)})
    print(f"[opsbook] provisioned {limit or env.name} in {time.monotonic() - t0:.0f}s"
          + (" (check mode)" if check else ""), flush=True)


def _limit(env: Env, hosts: str) -> str:
    """The inventory's hosts and groups named in `hosts`, as an Ansible limit; an unknown name is
    refused before anything runs (Ansible would skip it and converge nothing, saying little)."""
    names = [n.strip() for n in hosts.split(",") if n.strip()]
    known = sorted({h.name for h in env.hosts()} | {g for h in env.hosts() for g in h.groups})
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise OpsbookError(f"--hosts {hosts!r}: {', '.join(unknown) or 'no name'} is not a host or group of the "
                           f"{env.name} inventory (it has {', '.join(known)}). Nothing was changed.")
    return ",".join(names)
