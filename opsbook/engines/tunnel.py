"""A local port forwarded over SSH, through one of an environment's hosts, to an address only its hosts
can reach: how opsbook's own database connections (plans, migrations, checks) get to a managed database
in private subnets whose security group admits the app hosts only (`opsbook_db_reach: ssh`).

The forward is `ssh -N -L 127.0.0.1:<free port>:<address>:<port>` to the first app host that takes it,
with the SSH arguments Ansible uses for that host (`ansible_ssh_common_args`, so through the bastion
when the inventory composes a ProxyJump; its key and user), one per process and destination, closed
when the process ends (at exit, and by the kernel's parent-death signal if the process is killed).
Why `ssh` and not a Python SSH library: the forward must take exactly the path Ansible's connections
take, ProxyJump and the operator's ssh config included, and only OpenSSH itself reads those.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import shlex
import signal
import socket
import subprocess
import tempfile
import threading
import time

from opsbook.core.errors import OpsbookError
from opsbook.core.inventory import Env
from opsbook.core.paths import ROOT

_PR_SET_PDEATHSIG = 1
_open: dict[tuple[str, str, int], tuple[subprocess.Popen, int]] = {}


class TunnelFailed(OpsbookError):
    pass


# Runs in the child before exec: SIGTERM when opsbook dies. The kernel sends it when the *thread*
# that started the child ends, so forward() is for the main thread (operations call it there, in
# admin_conninfo, before any worker threads take the conninfo string).
def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ssh_command(env: Env, host: str, forward: str) -> list[str]:
    """ssh forwarding `forward` (-L's argument) through `host`, as Ansible connects to it."""
    from opsbook.engines.ansible import ssh_settings

    ssh = ssh_settings(env, host)
    return [
        "ssh", "-N", "-o", "ExitOnForwardFailure=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
        # Its own connection: never a client of a master Ansible keeps open (first -o wins in ssh).
        "-o", "ControlMaster=no", "-o", "ControlPath=none",
        *shlex.split(ssh.common_args),
        *(["-i", ssh.key_file] if ssh.key_file else []),
        *(["-l", ssh.user] if ssh.user else []),
        "-p", str(ssh.port),
        "-L", forward, env.host(host).address,
    ]


def forward(env: Env, address: str, port: int, via: str = "app", timeout: float = 20.0) -> int:
    """A local port on 127.0.0.1 that reaches `address`:`port` through one of `via`'s hosts."""
    if threading.current_thread() is not threading.main_thread():
        raise TunnelFailed("a port forward is opened from the main thread only (its end is tied to the "
                           "thread that starts it); make the conninfo before starting worker threads.")
    key = (env.name, address, port)
    known = _open.get(key)
    if known and known[0].poll() is None:
        return known[1]
    hosts = [h.name for h in env.hosts(via)]
    if not hosts:
        raise TunnelFailed(f"{env.name} has no {via} host to reach {address}:{port} through (its security "
                           f"group admits only them). Nothing was changed. Provision the environment first "
                           f"(`invoke provision --env {env.name}`).")
    failures = []
    for host in hosts:
        local, why = _start(env, host, (address, port), timeout, key)
        if local:
            return local
        failures.append(f"{host}: {why}")
    raise TunnelFailed(f"cannot reach {address}:{port} of {env.name} through its {via} hosts over SSH: "
                       f"{'; '.join(failures)}. Nothing was changed. Check that the hosts answer "
                       f"(`invoke check --env {env.name}`) and that their group reaches the database.")


def _start(env: Env, host: str, target: tuple[str, int] | str, timeout: float, key: tuple) -> tuple[int, str]:
    """(local port, "") once the forward through `host` to `target` (an address and port, or the path of
    a Unix socket on `host`) accepts connections, or (0, why not)."""
    local = _free_port()
    remote = target if isinstance(target, str) else f"{target[0]}:{target[1]}"
    # ssh's errors go to a file, not a pipe: nobody reads them while the forward lives.
    with tempfile.TemporaryFile(mode="w+") as errors:
        proc = subprocess.Popen(ssh_command(env, host, f"127.0.0.1:{local}:{remote}"), cwd=ROOT,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors,
                                text=True, preexec_fn=_die_with_parent,  # noqa: PLW1509 - prctl only, no locks
                                # Its own session: an operator's Ctrl-C (SIGINT to the terminal's process
                                # group, or to a runbook kernel's) must not cut the forward an interrupted
                                # operation's clean-up still needs (dropping a half-masked clone, say).
                                start_new_session=True)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", local), timeout=1):
                _open[key] = (proc, local)
                atexit.register(_close, proc)
                return local, ""
            time.sleep(0.1)
        _close(proc)
        errors.seek(0)
        return 0, errors.read().strip()[-300:] or f"no forward within {timeout:.0f} s"


def forward_socket(env: Env, host: str, path: str, timeout: float = 20.0) -> int:
    """A local port on 127.0.0.1 that reaches the Unix socket `path` on `host` (e.g. a scratch
    Postgres cluster that listens on no TCP address at all). The socket must exist when this is called:
    ssh connects to it for each connection, so a port that accepts is not proof; the caller's first
    connection is. Closed by :func:`close` or when the process ends."""
    if threading.current_thread() is not threading.main_thread():
        raise TunnelFailed("a port forward is opened from the main thread only (its end is tied to the "
                           "thread that starts it); make the conninfo before starting worker threads.")
    key = (env.name, f"{host}:{path}", 0)
    known = _open.get(key)
    if known and known[0].poll() is None:
        return known[1]
    local, why = _start(env, host, path, timeout, key)
    if not local:
        raise TunnelFailed(f"cannot forward a local port to {path} on {host} over SSH: {why}. Nothing was changed.")
    return local


def close(local: int) -> None:
    """End the forward listening on local port `local` (no-op when there is none)."""
    for key, (proc, port) in list(_open.items()):
        if port == local:
            _close(proc)
            del _open[key]


def _close(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


class SocketForwards:
    """How the controller reaches a Unix socket directory on an inventory host (the pgBackRest
    engine's `sockets`): a forwarded local port per socket, closed with :meth:`close`."""

    def __init__(self, env: Env, host: str):
        self.env, self.host = env, host

    def conninfo(self, directory, port: int) -> str:
        return f"host=127.0.0.1 port={forward_socket(self.env, self.host, f'{directory}/.s.PGSQL.{port}')}"

    def close(self, directory, port: int) -> None:
        known = _open.get((self.env.name, f"{self.host}:{directory}/.s.PGSQL.{port}", 0))
        if known:
            close(known[1])
