"""Provisioning (`invoke provision`): converge an environment's hosts with playbooks/site.yml."""

from __future__ import annotations

import time

from opsbook.core.inventory import Env
from opsbook.engines import ansible
from opsbook.engines import lock as locks


def provision(env: Env, check: bool = False) -> None:
    """Converge every host (idempotent: a second run reports changed=0); `check` changes nothing."""
    if env.kind == "lab":
        from opsbook.engines import lab

        lab.up(env)   # the lab's hosts must exist before they can be provisioned (no-op when up)
    t0 = time.monotonic()
    # Every host is converged and stamped with the configuration's fingerprint, so that releases
    # converge a host only when its configuration changed since. Under the environment's lock:
    # provisioning restarts services a release or a migration may be relying on.
    with locks.lock_for(env).hold("provision" + (" (check mode)" if check else ""), wait=0):
        ansible.run_playbook(env, "site.yml", check=check, what="provisioning",
                             extra_vars={"opsbook_converge_fingerprint": ansible.fingerprint(env)})
    print(f"[opsbook] provisioned {env.name} in {time.monotonic() - t0:.0f}s" + (" (check mode)" if check else ""),
          flush=True)
