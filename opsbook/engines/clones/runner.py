"""Where the clone machinery's commands run: a small runner with one method, so the same code can
drive the database host it is on (:class:`LocalRunner`, a subprocess) and, later, a database host
reached over SSH (the lab's ``db2``). Every command the clone engine runs goes through
:meth:`Runner.run` as an argument list; files are read and written by commands too (``cat``,
``sh -c 'cat > FILE'``), never with Python's own file functions, so nothing assumes the host is
this machine.

Only :class:`LocalRunner` exists. A runner over SSH is not built: :func:`for_host` refuses an
inventory host that is not this machine (``ansible_connection: local``) with
:class:`~opsbook.engines.snapshots.base.PathNotBuilt`.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from opsbook.core.errors import OpsbookError
from opsbook.engines.snapshots.base import PathNotBuilt


class CommandFailed(OpsbookError):
    """A command on the clone host exited non-zero (or could not start); the message quotes it."""

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
        shown = shlex.join(str(a) for a in argv)
        try:
            proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, check=False,
                                  env=env)
        except FileNotFoundError as e:
            result = Result(127, "", str(e))
        except subprocess.TimeoutExpired as e:
            raise CommandFailed(f"on {self.host}: `{shown}` did not finish within {timeout:.0f} s and was stopped",
                                -1, str(e.stdout or ""), str(e.stderr or "")) from None
        else:
            result = Result(proc.returncode, proc.stdout, proc.stderr)
        if check and result.code != 0:
            said = (result.err.strip() or result.out.strip())[-1500:]
            raise CommandFailed(f"on {self.host}: `{shown}` failed (exit {result.code}): {said}", result.code,
                                result.out, result.err)
        return result


def read_file(runner: Runner, path: str, *, user: str | None = None) -> str | None:
    """A text file's content on the runner's host, or None when it does not exist."""
    r = runner.run(["cat", path], user=user, check=False)
    return r.out if r.code == 0 else None


def write_file(runner: Runner, path: str, text: str, *, user: str | None = None, mode: str = "0600") -> None:
    """Write a text file on the runner's host (created with `mode`, owned by `user`)."""
    runner.run(["/bin/sh", "-c", f'umask 077 && cat > "$1" && chmod {mode} "$1"', "sh", path], user=user,
               stdin=text)


def for_host(env, host_name: str) -> Runner:
    """The runner for an inventory host: this machine when its `ansible_connection` is `local`;
    any other host needs a runner over SSH, which is not built."""
    connection = env.host_var(host_name, "ansible_connection", "ssh")
    if connection == "local":
        return LocalRunner(host_name)
    raise PathNotBuilt(
        f"{env.name}'s refresh host {host_name} is reached over SSH, and the runner that would run the clone "
        f"machinery's commands there (opsbook/engines/clones/runner.py: only LocalRunner exists) is not built. "
        f"Nothing was changed. Until it is, the clone host must be the controller itself (ansible_connection: "
        f"local).")
