"""Provisioning (`invoke provision`): converge an environment.

The lab: its hosts, with playbooks/site.yml. An AWS environment: its resources, with
playbooks/provision-aws.yml (roles/aws_env), after the account guard (STS GetCallerIdentity
against the inventory's account) and a look at what is already tagged for it (two resources
claiming the same role stop it before any change), under the environment's lock, leaving a record
(runbooks/provision.ipynb) of what existed before, what Ansible changed and what exists after.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from opsbook.core import ages
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
        # Not app_restart_on_change: a changed unit or environment file would restart every app host at
        # once, with no draining (failed requests). Such a service runs on, started before its files
        # were written, and restart.yml restarts those, one at a time, drained, onto the release each serves.
        recap = ansible.run_playbook(env, "site.yml", check=check, limit=limit, what="provisioning",
                                     extra_vars={"opsbook_converge_fingerprint": ansible.fingerprint(env),
                                                 "app_restart_on_change": False})
        # Every time, not only when this run changed an app host: a provision stopped half-way (or
        # killed right after writing a file) leaves services older than their configuration, or hosts
        # out of rotation, and this one finishes them (restart.yml reads that state on each host).
        if not check and any(h.name in recap for h in env.hosts("app")):
            ansible.run_playbook(env, "restart.yml", limit=limit,
                                 what="the drained restart of app hosts whose service configuration changed")
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


def provision_aws(env: Env, check: bool = False, purpose=None) -> dict[str, Any]:
    """Create or converge an AWS environment's resources. Returns what the record holds.

    Refused before any change: credentials of another account (or none), or two resources tagged
    for the same role of this environment. The lock's own store (bucket or table) is created first,
    outside the lock, when it does not exist yet (a first provisioning); everything else is converged
    under the lock. A purpose environment keeps the tags it was created with (read from its VPC);
    `purpose` (an aws.PurposeEnv) is given by `create` only, for one that does not exist yet.
    """
    from opsbook.engines import aws
    from opsbook.engines.records import runner

    started = datetime.now(UTC)
    who = aws.check_account(env)                     # before anything else touches AWS
    t = aws.target(env)
    _log(f"{env.name}: caller {who.arn} is in account {who.account}, the environment's ({t.region})")
    before = aws.find(t)
    aws.check_unique(before, env.name)
    _log(f"{env.name}: {len(before)} resource(s) tagged opsbook:env={env.name} before provisioning")
    if env.like is not None and purpose is None:
        purpose = aws.purpose_env(t, env.name)
        if purpose is None:
            raise OpsbookError(
                f"{env.name} is a purpose environment like {env.like}, but nothing in account {who.account} "
                f"({t.region}) says it was created (no VPC tagged {aws.TAG_ENV}={env.name} with its owner and "
                f"expiry). Nothing was changed. Create it with `invoke env.create --name "
                f"{env.name[len(env.like) + 1:]} --like {env.like}`; `invoke env.list` shows the ones that exist.")
    extra: dict[str, Any] = {"opsbook_env_name": env.name}
    if purpose is not None:
        extra["aws_env_purpose_tags"] = purpose.tags()
    what = f"provisioning {env.name}" + (" (check mode)" if check else "")
    if not check and not _lock_home_exists(env, t):
        _log(f"{env.name}: the lock's store does not exist yet (first provisioning): creating it first")
        ansible.run_playbook(env, "provision-aws.yml", extra_vars=extra, what=f"{what}: the lock's store",
                             tags="aws_env_storage")
    data: dict[str, Any] = {"env": env.name, "account": who.account, "caller": who.arn, "region": t.region,
                            "check": check, "before": _counts(before), "outcome": "failed"}
    if purpose is not None:
        data["purpose"] = {"like": purpose.like, "owner": purpose.owner, "created": purpose.created,
                           "expires": purpose.expires}
    # Under the lock, recorded by runbooks/provision.ipynb whether it succeeds or fails (the same
    # locked, recorded run as a snapshot's and a refresh's).
    with runner.locked_record("provision", env, data, param="provision_data", record_id=None, started=started,
                              reason="provision" + (" (check mode)" if check else ""), log=_log):
        recap = ansible.run_playbook(env, "provision-aws.yml", check=check, what=what, extra_vars=extra)
        data["recap"] = recap
        data["changed"] = sum(r.get("changed", 0) for r in recap.values())
        after = aws.find(t)
        aws.check_unique(after, env.name)
        data["after"] = _counts(after)
        data["resources"] = [{"kind": r.kind, "role": r.role, "name": r.name, "id": r.id} for r in after]
    _log(f"provisioned {env.name} in {data['duration_s']:.0f}s: changed={data['changed']}, "
         f"{len(data['resources'])} resource(s) tagged for it")
    return data


# --- purpose environments (`invoke env.create`) ---------------------------------------------------
class CreateRefused(OpsbookError):
    """env.create was refused before anything was created."""


def parse_ttl(ttl: str) -> timedelta:
    """`8h`, `90m`, `2d` -> a timedelta; anything else is refused."""
    age = ages.parse(ttl, units="mhd")   # (a typo's 99999999999d is none either: it overflowed a date before)
    if not age:   # None, or zero
        raise CreateRefused(f"--ttl {ttl!r} is not a duration: give minutes, hours or days like 90m, 8h or 2d. "
                            f"Nothing was created.")
    return age


def create(like: Env, name: str, ttl: str | None = None, *, now: datetime | None = None) -> dict[str, Any]:
    """Make a short-lived environment shaped like `like` (`staging-<name>`): its own resources, tagged
    with its own name, owner, creation time and expiry, in `like`'s account, provisioned like any
    AWS environment (same lock, same record). Refused before anything is created: a `like` that is
    not an AWS environment, a bad name or TTL, a TTL over the inventory's limit, a name in use."""
    from opsbook.core.inventory import ENV_NAME, PURPOSE_SUFFIX
    from opsbook.engines import aws

    if like.kind != "aws":
        raise CreateRefused(f"--like {like.name}: {like.name} is a {like.kind} environment; purpose environments "
                            f"are made in AWS, like staging or prod. Nothing was created.")
    if like.like is not None:
        raise CreateRefused(f"--like {like.name}: that is itself a purpose environment; make one like "
                            f"{like.like} instead. Nothing was created.")
    full = f"{like.name}-{name}"
    if not PURPOSE_SUFFIX.match(name or "") or not ENV_NAME.match(full):
        raise CreateRefused(
            f"--name {name!r}: a purpose environment's name is lowercase letters, digits and inner hyphens, and "
            f"with its prefix ({full!r}) at most 21 characters (the longest AWS name made from it has a "
            f"32-character limit). Nothing was created.")
    lifetime = parse_ttl(ttl or like.var("opsbook_purpose_env_ttl", "8h"))
    limit = parse_ttl(like.var("opsbook_purpose_env_max_ttl", "7d"))
    if lifetime > limit:
        raise CreateRefused(f"--ttl {ttl}: longer than {like.name}'s limit for purpose environments "
                            f"(opsbook_purpose_env_max_ttl: {like.var('opsbook_purpose_env_max_ttl', '7d')}). "
                            f"Nothing was created. Ask for less, or change the limit in the inventory.")
    env = Env(full, path=like.path, like=like.name)
    who = aws.check_account(env)
    t = aws.target(env)
    existing = aws.find(t)
    if existing:
        raise CreateRefused(
            f"{full} already exists in account {who.account} ({len(existing)} resource(s) tagged "
            f"{aws.TAG_ENV}={full}). Nothing was created. Converge it with `invoke provision --env {full}`, or "
            f"destroy it first (`invoke env.destroy --env {full}`).")
    start = (now or datetime.now(UTC)).replace(microsecond=0)
    purpose = aws.PurposeEnv(name=full, like=like.name, owner=who.arn, created=_iso(start),
                             expires=_iso(start + lifetime), vpc_id="")
    _log(f"creating {full}, like {like.name}, for {who.arn}, until {purpose.expires} ({ttl or 'default TTL'})")
    data = provision_aws(env, purpose=purpose)
    _log(f"{full} is ready: `invoke release --env {full}` to use it, `invoke env.destroy --env {full}` when done "
         f"(it expires at {purpose.expires}; `invoke env.list` flags it then)")
    return data


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
