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
import time
from dataclasses import dataclass
from pathlib import Path

from opsbook.core.errors import OpsbookError
from opsbook.core.inventory import ENV_NAME_VARIABLE, Env
from opsbook.core.paths import PLAYBOOKS, ROOT


class PlaybookFailed(OpsbookError):
    """ansible-playbook exited non-zero; the message names the failing tasks and hosts."""


def ansible_env(target: Env | None = None) -> dict[str, str]:
    """The process environment for ansible-playbook and testinfra: this checkout's ansible.cfg, and
    this virtualenv's tools first on PATH; for an AWS environment, its region, profile and endpoint
    (the aws_ec2 inventory plugin and the Secrets Manager lookups read them from there)."""
    env = dict(os.environ)
    env["ANSIBLE_CONFIG"] = str(ROOT / "ansible.cfg")
    env.setdefault("ANSIBLE_FORCE_COLOR", "0")
    venv_bin = Path(sys.executable).parent
    env["PATH"] = f"{venv_bin}:{env.get('PATH', '')}"
    if target is not None:
        env[ENV_NAME_VARIABLE] = target.name   # the aws_ec2 plugin's filter and opsbook_env_name read it
    if target is not None and target.kind == "aws":
        from opsbook.engines import aws

        env.update(aws.process_env(target))
    return env


def playbook_command(env: Env, playbook: str, *, extra_vars: dict | None = None, check: bool = False,
                     limit: str | None = None, tags: str | None = None) -> list[str]:
    cmd = ["ansible-playbook", "-i", str(env.path), str(PLAYBOOKS / playbook)]
    # The environment's name, which its names, buckets and tags derive from: a purpose environment
    # shares its inventory directory with the environment it is like (opsbook.core.inventory).
    cmd += ["-e", json.dumps({"opsbook_env_name": env.name, **(extra_vars or {})})]
    if check:
        cmd += ["--check", "--diff"]
    if limit:
        cmd += ["--limit", limit]
    if tags:
        cmd += ["--tags", tags]
    return cmd


def stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Stop an ansible-playbook process group in order: SIGINT (Ansible passes it to its workers and
    stops), then SIGTERM (the same, by its own handler), then SIGKILL. Waits for it to be gone.

    Ansible ends within a second of SIGINT as a rule. Not always: in one of six releases SIGTERM'd on
    the lab (ansible-core 2.19), its handler's KeyboardInterrupt was lost and the switch playbook ran
    on to its next gate, where it waited until SIGTERM; with 20 s of grace that release took 48 s to
    end in order instead of 23 s. Hence 5 s."""
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


def _spawn(cmd: list[str], target: Env | None = None) -> subprocess.Popen:
    # Its own process group: a Ctrl-C at the terminal reaches opsbook alone, which then stops
    # Ansible in order (`stop`) and puts hosts back; and Ansible dies with opsbook if opsbook is killed.
    # (`setpriv --pdeathsig`, from util-linux: a preexec_fn calling prctl is unsafe with our threads.)
    if shutil.which("setpriv"):
        cmd = ["setpriv", "--pdeathsig", "TERM", "--", *cmd]
    return subprocess.Popen(cmd, cwd=ROOT, env=ansible_env(target), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True)


class _Failures:
    """Keeps the failing tasks' lines of Ansible's output, so the error (and the release record)
    says which host failed and why."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._task = ""
        self._keep = 0

    def feed(self, line: str) -> None:
        if line.startswith("TASK ["):
            self._task = line.strip(" *\n")
        if line.startswith(("fatal:", "failed:")):
            self.lines.append(f"{self._task}: {line.strip()}")
            self._keep = 6
        elif self._keep and line.strip():
            self.lines.append("    " + line.strip()[:300])
            self._keep -= 1

    def error(self, env: Env, what: str, code: int) -> PlaybookFailed:
        detail = ("\n  " + "\n  ".join(self.lines[:24])) if self.lines else ""
        return PlaybookFailed(f"{what} failed on {env.name} (ansible-playbook exit {code}){detail}")


def run_playbook(env: Env, playbook: str, *, extra_vars: dict | None = None, check: bool = False,
                 limit: str | None = None, what: str = "", tags: str | None = None) -> dict[str, dict[str, int]]:
    """Run a playbook against an environment, streaming Ansible's progress to the terminal.
    Returns its recap: host -> {"ok": n, "changed": n, "failed": n, ...}."""
    proc = _spawn(playbook_command(env, playbook, extra_vars=extra_vars, check=check, limit=limit, tags=tags), env)
    failures = _Failures()
    recap: dict[str, dict[str, int]] = {}
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            failures.feed(line)
            _read_recap(line, recap)
    except BaseException:
        # Interrupted while Ansible runs: never leave it switching hosts behind our back.
        stop(proc)
        raise
    sys.stdout.flush()
    if proc.wait() != 0:
        raise failures.error(env, what or playbook, proc.returncode)
    return recap


def _read_recap(line: str, recap: dict[str, dict[str, int]]) -> None:
    """One PLAY RECAP line (`host : ok=3 changed=1 unreachable=0 failed=0 ...`) into `recap`."""
    import re

    m = re.match(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", line.strip())
    if m:
        recap[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}


class Background:
    """A playbook running beside other work (`start_playbook`). Its output is kept and shown when
    it is waited for, so it does not interleave with what runs meanwhile; or, with `echo`, shown
    as it comes (a playbook the operator watches while opsbook acts between its steps, as the
    rolling switch does). Use it as a context manager: leaving the block without having waited
    for it (an error, an interrupt) stops it."""

    def __init__(self, env: Env, proc: subprocess.Popen, what: str, *, echo: bool = False):
        import threading

        self.env, self.proc, self.what, self.echo = env, proc, what, echo
        self.started = time.monotonic()
        self.seconds: float | None = None   # how long it ran, once waited for
        self._lines: list[str] = []
        self._stopped_at: int | None = None   # lines read when opsbook stopped it (stop_in_order)
        self._reader = threading.Thread(target=self._read, name=f"ansible {what}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.append(line)
            if self.echo and self._stopped_at is None:
                sys.stdout.write(line)
                sys.stdout.flush()
        self.proc.wait()
        self.seconds = time.monotonic() - self.started

    def running(self) -> bool:
        """Whether the playbook still runs (its output not yet all read)."""
        return self._reader.is_alive()

    def wait(self) -> None:
        """Wait for it to end, show its output, and raise PlaybookFailed when it failed."""
        try:
            while self._reader.is_alive():
                self._reader.join(timeout=0.2)   # short joins: signals reach the main thread meanwhile
        except BaseException:
            self.stop_in_order()
            raise
        failures = _Failures()
        for line in self._lines[:self._stopped_at]:
            if not self.echo:
                sys.stdout.write(line)
            failures.feed(line)
        sys.stdout.flush()
        if self.proc.returncode != 0:
            raise failures.error(self.env, self.what, self.proc.returncode)

    def __enter__(self) -> Background:
        return self

    def stop_in_order(self) -> None:
        """Stop it (`stop`) if it still runs. What it prints from then on is Ansible shutting down, not
        the operator's business, and not always tidy: ansible-core's signal handler can end in its
        own traceback ("Unexpected Exception, this is probably a bug: process object is closed") when
        the signal meets a worker it has just closed. One line stands for it instead."""
        if self.proc.poll() is not None:
            return
        self._stopped_at = len(self._lines)
        stop(self.proc)
        self._reader.join(timeout=5)
        hidden = [line.strip() for line in self._lines[self._stopped_at:] if line.strip()]
        if hidden:
            tasks = [line.strip(" *") for line in hidden if line.startswith("TASK [")]
            went_on = f"it went on to {tasks[-1]} before it ended; " if tasks else ""
            print(f"[opsbook] {self.what}: ansible-playbook stopped by opsbook; {went_on}{len(hidden)} line(s) "
                  f"of its output after the stop not shown, the last: {hidden[-1][:200]}", flush=True)

    def __exit__(self, *exc) -> None:
        self.stop_in_order()


def start_playbook(env: Env, playbook: str, *, extra_vars: dict | None = None, limit: str | None = None,
                   what: str = "", echo: bool = False) -> Background:
    """Start a playbook in the background (see Background); `wait()` for it."""
    return Background(env, _spawn(playbook_command(env, playbook, extra_vars=extra_vars, limit=limit), env),
                      what or playbook, echo=echo)


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
        # An inventory may live outside the repository (OPSBOOK_INVENTORY_PATH): named from its parent.
        name = p.relative_to(ROOT) if p.is_relative_to(ROOT) else p.relative_to(env.path.parent)
        h.update(str(name).encode() + b"\0" + p.read_bytes() + b"\0")
    for name, value in sorted(env.secret_values().items()):
        h.update(f"{name}={value}\0".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class SshSettings:
    """How Ansible's ssh connection reaches one host, from the inventory: for whatever else opsbook runs
    over SSH to it (a port forward, a reachability check), so it takes the same path (ProxyJump too)."""

    user: str | None
    key_file: str | None   # absolute: the inventory's is relative to the repository
    common_args: str
    port: int


def ssh_settings(env: Env, host: str) -> SshSettings:
    key = env.host_var(host, "ansible_ssh_private_key_file", None)
    return SshSettings(user=env.host_var(host, "ansible_user", None) or None,
                       key_file=str(ROOT / str(key)) if key else None,
                       common_args=str(env.host_var(host, "ansible_ssh_common_args", "") or ""),
                       port=int(env.host_var(host, "ansible_port", 22) or 22))


def raw(env: Env, pattern: str, command: str) -> dict[str, tuple[int, str] | None]:
    """Run a shell command on the hosts matching `pattern`, all at once: host -> (exit code, stdout),
    None for a host that did not answer. The `raw` module: nothing but the command over the SSH
    connection (no Python module shipped to each host, half the time of `command`), read through
    Ansible's json callback, so the inventory's connection settings apply as for a playbook."""
    cmd = ["ansible", "-i", str(env.path), pattern, "-m", "ansible.builtin.raw", "-a", command]
    json_output = {"ANSIBLE_LOAD_CALLBACK_PLUGINS": "1", "ANSIBLE_STDOUT_CALLBACK": "json"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False,
                          env={**ansible_env(env), **json_output})
    return read_answers(proc.stdout, [h.name for h in env.hosts(pattern)])


def read_answers(stdout: str, hosts: list[str]) -> dict[str, tuple[int, str] | None]:
    """host -> (exit code, stdout) from the json callback's output of an ad hoc run (`raw`), None for
    a host with no answer in it. The first JSON document counts: a callback the operator enabled
    (ANSIBLE_CALLBACKS_ENABLED=profile_tasks, say) prints its own lines after it."""
    out: dict[str, tuple[int, str] | None] = dict.fromkeys(hosts)
    try:
        doc, _end = json.JSONDecoder().raw_decode(stdout, stdout.index("{"))
    except ValueError:
        return out
    for play in doc.get("plays", []):
        for task in play.get("tasks", []):
            for host, result in (task.get("hosts") or {}).items():
                if host in out and isinstance(result.get("rc"), int) and not result.get("unreachable"):
                    out[host] = (result["rc"], str(result.get("stdout", "")))
    return out


def converged_stamps(env: Env, pattern: str = "all") -> dict[str, str | None]:
    """host -> the fingerprint its stamp holds (None: no stamp, or the host did not answer; such a
    host counts as unconverged, and provisioning is idempotent)."""
    out: dict[str, str | None] = {}
    for host, answer in raw(env, pattern, f"cat {STAMP}").items():
        stamp = answer[1].strip() if answer and answer[0] == 0 else ""
        out[host] = stamp if len(stamp) == 16 else None
    return out
