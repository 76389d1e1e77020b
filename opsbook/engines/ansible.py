"""The Ansible runner: run a playbook against an environment's inventory, streaming its progress.

A failure raises :class:`PlaybookFailed`, whose message names the failing task and host and the
lines Ansible printed about it (the release record keeps them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from opsbook.core.errors import OpsbookError
from opsbook.core.inventory import Env
from opsbook.core.paths import PLAYBOOKS, ROOT


class PlaybookFailed(OpsbookError):
    """ansible-playbook exited non-zero; the message names the failing tasks and hosts."""


def ansible_env() -> dict[str, str]:
    """The process environment for ansible-playbook and testinfra: this checkout's ansible.cfg, and
    this virtualenv's tools first on PATH."""
    env = dict(os.environ)
    env["ANSIBLE_CONFIG"] = str(ROOT / "ansible.cfg")
    env.setdefault("ANSIBLE_FORCE_COLOR", "0")
    venv_bin = Path(sys.executable).parent
    env["PATH"] = f"{venv_bin}:{env.get('PATH', '')}"
    return env


def playbook_command(env: Env, playbook: str, *, extra_vars: dict | None = None, check: bool = False,
                     limit: str | None = None) -> list[str]:
    cmd = ["ansible-playbook", "-i", str(env.path), str(PLAYBOOKS / playbook)]
    if extra_vars:
        cmd += ["-e", json.dumps(extra_vars)]
    if check:
        cmd += ["--check", "--diff"]
    if limit:
        cmd += ["--limit", limit]
    return cmd


def stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """Stop an ansible-playbook process group in order: SIGINT (Ansible ends the task it is in and
    stops), then SIGTERM, then SIGKILL. Waits for it to be gone."""
    import signal

    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        return


def run_playbook(env: Env, playbook: str, *, extra_vars: dict | None = None, check: bool = False,
                 limit: str | None = None, what: str = "") -> None:
    """Run a playbook against an environment, streaming Ansible's progress to the terminal."""
    cmd = playbook_command(env, playbook, extra_vars=extra_vars, check=check, limit=limit)
    # Ansible's output streams to the terminal as it comes; the failing task's lines are also
    # kept, so the error (and the release record) says which host failed and why.
    # Its own process group: a Ctrl-C at the terminal reaches opsbook alone, which then stops
    # Ansible in order (below) and puts hosts back; and Ansible dies with opsbook if opsbook is killed.
    # (`setpriv --pdeathsig`, from util-linux: a preexec_fn calling prctl is unsafe with our threads.)
    if shutil.which("setpriv"):
        cmd = ["setpriv", "--pdeathsig", "TERM", "--", *cmd]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ansible_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True)
    failures: list[str] = []
    task = ""
    keep = 0
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            if line.startswith("TASK ["):
                task = line.strip(" *\n")
            if line.startswith(("fatal:", "failed:")):
                failures.append(f"{task}: {line.strip()}")
                keep = 6
            elif keep and line.strip():
                failures.append("    " + line.strip()[:300])
                keep -= 1
    except BaseException:
        # Interrupted while Ansible runs: never leave it switching hosts behind our back.
        stop(proc)
        raise
    sys.stdout.flush()
    if proc.wait() != 0:
        detail = ("\n  " + "\n  ".join(failures[:24])) if failures else ""
        raise PlaybookFailed(
            f"{what or playbook} failed on {env.name} (ansible-playbook exit {proc.returncode}){detail}"
        )


# --- converging only what changed -----------------------------------------------------------
STAMP = "/etc/opsbook/converged"   # on each host: the fingerprint of the configuration it was converged to


def fingerprint(env: Env) -> str:
    """A hash of everything that decides a host's configuration: the roles, the playbooks, the
    environment's inventory, ansible.cfg and the secrets' values (hashed, never stored). A host whose
    stamp matches it needs no provisioning; `invoke provision` always converges everything."""
    import hashlib

    h = hashlib.sha256()
    paths = [ROOT / "ansible.cfg", *(p for top in (ROOT / "roles", PLAYBOOKS, env.path)
                                     for p in sorted(top.rglob("*")) if p.is_file())]
    for p in paths:
        if "__pycache__" in p.parts:
            continue
        h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    for name, value in sorted(env.secret_values().items()):
        h.update(f"{name}={value}\0".encode())
    return h.hexdigest()[:16]


def converged_stamps(env: Env, pattern: str = "all") -> dict[str, str | None]:
    """host -> the fingerprint its stamp holds (None: no stamp, or the host did not answer). One
    ad-hoc Ansible run for every host at once, read through Ansible's json callback."""
    cmd = ["ansible", "-i", str(env.path), pattern, "-m", "ansible.builtin.command", "-a", f"cat {STAMP}"]
    json_output = {"ANSIBLE_LOAD_CALLBACK_PLUGINS": "1", "ANSIBLE_STDOUT_CALLBACK": "json"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False,
                          env={**ansible_env(), **json_output})
    out: dict[str, str | None] = {h.name: None for h in env.hosts(pattern)}
    try:
        doc = json.loads(proc.stdout[proc.stdout.index("{"):])
    except ValueError:
        return out   # nothing readable: every host counts as unconverged (provisioning is idempotent)
    for play in doc.get("plays", []):
        for task in play.get("tasks", []):
            for host, result in (task.get("hosts") or {}).items():
                stamp = str(result.get("stdout", "")).strip()
                if host in out and result.get("rc") == 0 and len(stamp) == 16:
                    out[host] = stamp
    return out
