"""Provisioning and release of an environment.

A release: check the environment and the artifact, provision (idempotent), apply the
artifact's pending expand migrations, then roll the fleet batch by batch with
playbooks/deploy.yml (drain, switch `current`, restart, health, re-enable).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

from opsbook import ROOT, artifact, migrations
from opsbook.errors import OpsbookError
from opsbook.inventory import Env, load

PLAYBOOKS = ROOT / "playbooks"


class PlaybookFailed(OpsbookError):
    pass


def log(msg: str) -> None:
    print(f"[opsbook] {msg}", flush=True)


def ansible_env() -> dict[str, str]:
    env = dict(os.environ)
    env["ANSIBLE_CONFIG"] = str(ROOT / "ansible.cfg")
    env.setdefault("ANSIBLE_FORCE_COLOR", "0")
    venv_bin = Path(os.sys.executable).parent
    env["PATH"] = f"{venv_bin}:{env.get('PATH', '')}"
    return env


def run_playbook(env: Env, playbook: str, *, extra_vars: dict | None = None, check: bool = False,
                 limit: str | None = None, what: str = "") -> None:
    """Run a playbook against an environment, streaming Ansible's progress to the terminal."""
    import json

    cmd = ["ansible-playbook", "-i", str(env.path), str(PLAYBOOKS / playbook)]
    if extra_vars:
        cmd += ["-e", json.dumps(extra_vars)]
    if check:
        cmd += ["--check", "--diff"]
    if limit:
        cmd += ["--limit", limit]
    proc = subprocess.run(cmd, cwd=ROOT, env=ansible_env(), check=False)
    if proc.returncode != 0:
        raise PlaybookFailed(
            f"{what or playbook} failed on {env.name} (ansible-playbook exit {proc.returncode}); "
            f"the failing task and host are in the output above. Hosts that had not been reached "
            f"were left as they were."
        )


def provision(env_name: str, check: bool = False) -> None:
    env = load(env_name)
    if env.kind == "lab":
        from opsbook import lab

        lab.up()   # the lab's hosts must exist before they can be provisioned (no-op when up)
    t0 = time.monotonic()
    run_playbook(env, "site.yml", check=check, what="provisioning")
    log(f"provisioned {env.name} in {time.monotonic() - t0:.0f}s" + (" (check mode)" if check else ""))


def admin_conninfo(env: Env, host: str | None = None) -> str:
    """libpq conninfo for the admin role on the environment's service database."""
    host = host or env.var("bl_api_db_host")
    from psycopg.conninfo import make_conninfo

    return make_conninfo(
        host=env.host(host).address,
        port=env.var("bl_api_db_port"),
        dbname=env.var("bl_api_db_name"),
        user=env.var("opsbook_db_admin_user"),
        password=env.var("opsbook_db_admin_password"),
        connect_timeout=5,
        application_name="opsbook",
    )


def resolve_artifact(version: str | None) -> artifact.Artifact:
    if version:
        return artifact.find(version)
    return artifact.build()


def release(env_name: str, version: str | None = None) -> str:
    env = load(env_name)   # unknown environment: names the ones that exist, changes nothing
    art = resolve_artifact(version)
    t0 = time.monotonic()
    log(f"releasing bl-api {art.version} to {env.name} ({art.path.name}, sha256 {art.sha256[:12]}…)")
    provision(env.name)
    with tempfile.TemporaryDirectory(prefix="opsbook-migrations-") as tmp:
        mig_dir = art.extract_migrations(Path(tmp))
        applied = migrations.apply_pending(admin_conninfo(env), mig_dir, phase="expand",
                                           log=lambda m: log(f"migrate: {m}"))
    log(f"expand migrations applied: {', '.join(applied) if applied else 'none pending'}")
    run_playbook(
        env,
        "deploy.yml",
        extra_vars={
            "opsbook_release_version": art.version,
            "opsbook_release_artifact": str(art.path),
            # `serial` is read before inventory variables exist, so the batch size (from the
            # inventory) is passed as an extra var.
            "opsbook_release_batch_size": env.var("opsbook_release_batch_size"),
        },
        what=f"rolling deploy of {art.version}",
    )
    log(f"released {art.version} to {env.name} in {time.monotonic() - t0:.0f}s")
    return art.version
