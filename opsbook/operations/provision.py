"""Provisioning (`invoke provision`): converge an environment.

The lab: its hosts, with playbooks/site.yml. An AWS environment: its resources, with
playbooks/provision-aws.yml (roles/aws_env), after the account guard (STS GetCallerIdentity
against the inventory's account) and a look at what is already tagged for it (two resources
claiming the same role stop it before any change), under the environment's lock, leaving a record
(runbooks/provision.ipynb) of what existed before, what Ansible changed and what exists after.
"""

from __future__ import annotations

import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opsbook.core.errors import OpsbookError
from opsbook.core.inventory import Env
from opsbook.engines import ansible
from opsbook.engines import lock as locks


def provision(env: Env, check: bool = False, hosts: str | None = None) -> dict[str, Any] | None:
    """Converge every host (idempotent: a second run reports changed=0), or only `hosts` (host and
    group names of the inventory, comma-separated); `check` changes nothing."""
    if env.kind == "aws":
        if hosts:
            raise OpsbookError(f"--hosts names hosts of an inventory of hosts (the lab); {env.name}'s AWS "
                               f"resources are converged together. Nothing was changed.")
        return provision_aws(env, check=check)
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
    return None


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


def _log(msg: str) -> None:
    print(f"[opsbook] {msg}", flush=True)


def _counts(resources) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in resources:
        out[r.kind] = out.get(r.kind, 0) + 1
    return dict(sorted(out.items()))


def _lock_home_exists(env: Env, t) -> bool:
    """Whether the store the environment's lock lives in exists yet (a first provisioning creates it)."""
    from botocore.exceptions import ClientError

    from opsbook.engines import aws

    backend = env.var("opsbook_lock_backend", "s3")
    try:
        if backend == "s3":
            aws.client(t, "s3").head_bucket(Bucket=env.var("opsbook_lock_bucket"))
        elif backend == "dynamodb":
            aws.client(t, "dynamodb").describe_table(TableName=env.var("opsbook_lock_table"))
    except ClientError:
        return False
    return True


def provision_aws(env: Env, check: bool = False) -> dict[str, Any]:
    """Create or converge an AWS environment's resources. Returns what the record holds.

    Refused before any change: credentials of another account (or none), or two resources tagged
    for the same role of this environment. The lock's own store (bucket or table) is created first,
    outside the lock, when it does not exist yet (a first provisioning); everything else is converged
    under the lock.
    """
    from opsbook.engines import aws
    from opsbook.engines.records import runner

    started = datetime.now(UTC)
    t0 = time.monotonic()
    who = aws.check_account(env)                     # before anything else touches AWS
    t = aws.target(env)
    _log(f"{env.name}: caller {who.arn} is in account {who.account}, the environment's ({t.region})")
    before = aws.find(t)
    aws.check_unique(before, env.name)
    _log(f"{env.name}: {len(before)} resource(s) tagged opsbook:env={env.name} before provisioning")
    extra = {"opsbook_env_name": env.name}
    what = f"provisioning {env.name}" + (" (check mode)" if check else "")
    if not check and not _lock_home_exists(env, t):
        _log(f"{env.name}: the lock's store does not exist yet (first provisioning): creating it first")
        ansible.run_playbook(env, "provision-aws.yml", extra_vars=extra, what=f"{what}: the lock's store",
                             tags="aws_env_storage")
    data: dict[str, Any] = {"env": env.name, "account": who.account, "caller": who.arn, "region": t.region,
                            "check": check, "before": _counts(before), "outcome": "failed"}
    try:
        with locks.lock_for(env).hold("provision" + (" (check mode)" if check else ""), wait=0) as held:
            _log(held.message)
            data["lock"] = held.message
            recap = ansible.run_playbook(env, "provision-aws.yml", check=check, what=what, extra_vars=extra)
            data["recap"] = recap
            data["changed"] = sum(r.get("changed", 0) for r in recap.values())
            after = aws.find(t)
            aws.check_unique(after, env.name)
            data["after"] = _counts(after)
            data["resources"] = [{"kind": r.kind, "role": r.role, "name": r.name, "id": r.id} for r in after]
            data["outcome"] = "succeeded"
    except locks.LockHeld:
        raise   # refused: nothing ran, nothing to record
    except Exception as e:
        data["error"] = str(e)
        raise
    finally:
        data["duration_s"] = round(time.monotonic() - t0, 1)
        if "lock" in data:
            _record(env, data, started, runner)
    _log(f"provisioned {env.name} in {data['duration_s']:.0f}s: changed={data['changed']}, "
         f"{len(data['resources'])} resource(s) tagged for it")
    return data


def _record(env: Env, data: dict[str, Any], started: datetime, runner) -> None:
    with tempfile.TemporaryDirectory(prefix="opsbook-provision-") as tmp:
        path = Path(tmp) / "provision.json"
        path.write_text(json.dumps(data, indent=2, default=str))
        try:
            entry = runner.run("provision", env, {"provision_data": str(path)}, started=started, progress=False,
                               log=_log)
        except runner.RunbookFailed as e:
            entry = e.entry
        data["record"] = entry.get("id")
