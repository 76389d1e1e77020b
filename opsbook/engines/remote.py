"""Where a machinery's commands run: one small interface, so the same code drives the host it is on
(:class:`LocalRunner`, a subprocess) and an inventory host reached over SSH (:class:`SshRunner`).

Every command goes through :meth:`Runner.run` as an argument list; files are read and written by
commands too (``cat``, ``sh -c 'cat > FILE'``: :func:`read_file`, :func:`write_file`), never with
Python's own file functions, so nothing assumes the host is this machine. Used by the clone engine
(``engines/clones``) and the pgBackRest snapshot engine (``engines/snapshots/pgbackrest.py``).

Why ``ssh`` and not a Python SSH library (paramiko, asyncssh): the commands must take exactly the
path Ansible's connections take to the host (its key, user, port and ``ansible_ssh_common_args``,
ProxyJump included), and only OpenSSH itself reads those; ``engines/tunnel.py`` forwards ports the
same way. One master connection per host and process (``ControlMaster``) makes each further command
cost a round trip instead of a handshake.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from opsbook.core.errors import OpsbookError


class CommandFailed(OpsbookError):
    """A command on a host exited non-zero (or could not start); the message quotes it."""

    def __init__(self, message: str, code: int, out: str, err: str):
        super().__init__(message)
        self.code, self.out, self.err = code, out, err


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


class Runner(Protocol):
    """Runs commands on one host (as root, or as `user`)."""

    host: str        # what an operator calls the host (an inventory name, or "localhost")

    def run(self, argv: Sequence[str], *, user: str | None = None, stdin: str | None = None,
            timeout: float = 600, check: bool = True) -> Result: ...


def _complete(host: str, shown: str, cmd: list[str], *, stdin: str | None, timeout: float, check: bool,
              env: dict[str, str] | None = None, unreachable: int | None = None) -> Result:
    """Run `cmd` here and turn what happened into a Result, or CommandFailed when `check` (or when the
    host could not be reached: `unreachable` is the exit code that means so, 255 for ssh)."""
    try:
        # In a session of its own: a terminal's Ctrl-C, or the SIGINT a runbook's kernel gets for its
        # process group, reaches opsbook alone, which then stops this command itself (subprocess.run
        # kills it on KeyboardInterrupt) and runs its clean-up; the command is not killed under it first,
        # to be reported as a failure (or an unreachable host) instead of an interrupt.
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, check=False,
                              env=env, start_new_session=True)
    except FileNotFoundError as e:
        result = Result(127, "", str(e))
    except subprocess.TimeoutExpired as e:
        raise CommandFailed(f"on {host}: `{shown}` did not finish within {timeout:.0f} s and was stopped",
                            -1, str(e.stdout or ""), str(e.stderr or "")) from None
    else:
        result = Result(proc.returncode, proc.stdout, proc.stderr)
    if unreachable is not None and result.code == unreachable:
        said = result.err.strip()[-500:]
        raise CommandFailed(f"{host} did not answer over SSH ({said or 'no reason given'}); `{shown}` did not run. "
                            f"Check the host (`invoke lab.status` for the lab, `invoke check`).", result.code,
                            result.out, result.err)
    if check and result.code != 0:
        said = (result.err.strip() or result.out.strip())[-1500:]
        raise CommandFailed(f"on {host}: `{shown}` failed (exit {result.code}): {said}", result.code,
                            result.out, result.err)
    return result


class LocalRunner:
    """Commands on this machine, through subprocess. `user` commands run through `runuser` when this
    process is root (Postgres refuses to run as root); `path` replaces PATH for every command."""

    def __init__(self, host: str = "localhost", *, path: str | None = None):
        self.host = host
        self.path = path

    def __repr__(self) -> str:
        return f"LocalRunner({self.host!r})"

    def run(self, argv: Sequence[str], *, user: str | None = None, stdin: str | None = None,
            timeout: float = 600, check: bool = True) -> Result:
        cmd = [str(a) for a in argv]
        if user and user != "root" and os.geteuid() == 0:
            cmd = ["/usr/sbin/runuser", "-u", user, "--", *cmd]
        env = None if self.path is None else {**os.environ, "PATH": self.path}
        return _complete(self.host, shlex.join(str(a) for a in argv), cmd, stdin=stdin, timeout=timeout,
                         check=check, env=env)


_control_dir: str | None = None


def _control_path() -> str:
    """A private directory for this process's SSH master connections, removed at exit."""
    global _control_dir  # noqa: PLW0603 - one directory per process
    if _control_dir is None:
        _control_dir = tempfile.mkdtemp(prefix="opsbook-ssh-")
        atexit.register(shutil.rmtree, _control_dir, True)
    return os.path.join(_control_dir, "%C")


def ssh_base(env, host: str) -> list[str]:
    """`ssh` with the settings Ansible uses for the inventory host (key, user, port, common args)."""
    from opsbook.engines.ansible import ssh_settings

    ssh = ssh_settings(env, host)
    return [
        "ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
        *shlex.split(ssh.common_args),
        *(["-i", ssh.key_file] if ssh.key_file else []),
        *(["-l", ssh.user] if ssh.user else []),
        "-p", str(ssh.port),
    ]


class SshRunner:
    """Commands on an inventory host over SSH, as root (the login user, or through sudo when the
    inventory logs in as someone else); `user` commands run through `runuser` there. Arguments are
    quoted for the remote shell with shlex, so none is ever read as shell syntax."""

    def __init__(self, env, host: str):
        self.env = env
        self.host = host
        self.address = env.host(host).address
        from opsbook.engines.ansible import ssh_settings

        self._login = ssh_settings(env, host).user or "root"
        self._ssh = [*ssh_base(env, host), "-o", "ControlMaster=auto", "-o", f"ControlPath={_control_path()}",
                     "-o", "ControlPersist=60"]

    def __repr__(self) -> str:
        return f"SshRunner({self.host!r})"

    def run(self, argv: Sequence[str], *, user: str | None = None, stdin: str | None = None,
            timeout: float = 600, check: bool = True) -> Result:
        words = [str(a) for a in argv]
        if user and user != "root":
            words = ["runuser", "-u", user, "--", *words]
        if self._login != "root":
            words = ["sudo", "-n", "--", *words]
        remote = "cd / && " + shlex.join(words)   # runuser keeps the login's home, which postgres cannot read
        # stdin is always given (empty when none): ssh must never read the operator's terminal.
        return _complete(self.host, shlex.join(str(a) for a in argv), [*self._ssh, self.address, "--", remote],
                         stdin=stdin if stdin is not None else "", timeout=timeout, check=check, unreachable=255)

    def close(self) -> None:
        """End the master connection (also ended by ControlPersist a minute after the last command)."""
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run([*self._ssh, "-O", "exit", self.address], capture_output=True, timeout=10, check=False)


class LocalSockets:
    """How this machine reaches a Unix socket directory of a cluster on this machine: directly. (A
    cluster on another host is reached through ``opsbook.engines.tunnel.SocketForwards``.)"""

    def conninfo(self, directory, port: int) -> str:
        return f"host={directory} port={port}"

    def close(self, directory, port: int) -> None:
        pass


LOCAL_SOCKETS = LocalSockets()


def read_file(runner: Runner, path: str, *, user: str | None = None) -> str | None:
    """A text file's content on the runner's host, or None when it does not exist."""
    r = runner.run(["cat", path], user=user, check=False)
    return r.out if r.code == 0 else None


def free_bytes(runner: Runner, path: str) -> int:
    """Bytes available to an unprivileged writer on the filesystem holding `path` on the runner's host (df's avail)."""
    return int(runner.run(["df", "-B1", "--output=avail", path], timeout=60).out.split()[-1])


def write_file(runner: Runner, path: str, text: str, *, user: str | None = None, mode: str = "0600") -> None:
    """Write a text file on the runner's host (created with `mode`, owned by `user`)."""
    runner.run(["/bin/sh", "-c", f'umask 077 && cat > "$1" && chmod {mode} "$1"', "sh", path], user=user,
               stdin=text)
