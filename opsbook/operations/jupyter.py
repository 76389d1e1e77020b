"""`invoke notebook`: JupyterLab over this checkout, on 127.0.0.1 only, with the project's kernel.

Operators open runbooks and the analysis notebooks (`notebooks/`) there. A runbook run there is
not a record, so every runbook refuses to change anything outside opsbook
(`opsbook.engines.records.guard`): its defaults change nothing, and it says which `invoke`
command runs it as a record. The server gets a fresh token each start (printed in its URL), takes
no remote connections, and asks the network for nothing (no news, no update check).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from opsbook.core.errors import OpsbookError
from opsbook.core.paths import ROOT

LOOPBACK = "127.0.0.1"
KERNEL = "python3"          # the kernel ./run installs into .venv, the one papermill runs runbooks with
DEFAULT_PORT = 8888


@dataclass
class Lab:
    process: subprocess.Popen
    port: int
    token: str
    kernel_dir: Path

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/lab?token={self.token}"

    def api(self, path: str = "/api", timeout: float = 2.0) -> dict:
        request = urllib.request.Request(f"http://{LOOPBACK}:{self.port}{path}",
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310 - our own loopback URL
            return json.loads(answer.read())


def free_port(preferred: int | None = None) -> int:
    """`preferred` if it is free on 127.0.0.1, else any free port."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OpsbookError("no free port on 127.0.0.1; nothing was started.")


def command(port: int, token: str, kernel_dir: Path, root: Path = ROOT) -> list[str]:
    # Kernels talk to the server over Unix sockets in `kernel_dir` (0700), as runbook kernels do
    # under opsbook, not over unencrypted loopback TCP. Root is how these machines run everything
    # (Jupyter refuses it unless told); the extension manager is read-only, so the page never asks
    # PyPI for anything.
    as_root = ["--ServerApp.allow_root=True"] if os.geteuid() == 0 else []
    return [
        sys.executable, "-m", "jupyterlab", "--no-browser",
        f"--ServerApp.ip={LOOPBACK}", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        "--ServerApp.allow_remote_access=False", f"--ServerApp.root_dir={root}",
        f"--IdentityProvider.token={token}", "--JupyterApp.answer_yes=True",
        f"--MultiKernelManager.default_kernel_name={KERNEL}",
        "--KernelManager.transport=ipc", f"--KernelManager.ip={kernel_dir / 'kernel'}",
        "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly", *as_root,
    ]


def start(port: int | None = None, *, root: Path = ROOT, env: dict[str, str] | None = None,
          output=None) -> Lab:
    """Start JupyterLab (not waited for; see :func:`wait_ready`) in its own session, so a terminal's
    Ctrl-C reaches opsbook, which stops it; and it dies with opsbook if opsbook is killed (the
    parent-death signal, through util-linux's `setpriv`, as Ansible is started)."""
    port = free_port(port)
    token = secrets.token_urlsafe(24)
    kernel_dir = Path(tempfile.mkdtemp(prefix="opsbook-jupyter-"))   # 0700
    environ = {**os.environ, **(env or {})}
    bindir = str(Path(sys.executable).parent)   # the kernel's `python` is .venv's
    environ["PATH"] = f"{bindir}{os.pathsep}{environ.get('PATH', '')}"
    cmd = command(port, token, kernel_dir, root)
    if shutil.which("setpriv"):
        cmd = ["setpriv", "--pdeathsig", "TERM", "--", *cmd]
    proc = subprocess.Popen(cmd, env=environ, stdout=output, stderr=output,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    return Lab(proc, port, token, kernel_dir)


def wait_ready(lab: Lab, timeout: float = 60.0) -> dict:
    """Wait until the server answers /api on loopback; its answer (the server's version)."""
    deadline = time.monotonic() + timeout
    while True:
        if lab.process.poll() is not None:
            raise OpsbookError(f"JupyterLab exited with status {lab.process.returncode} before it answered; "
                               "nothing else was started. Its output above says why.")
        try:
            return lab.api("/api")
        except OSError:
            if time.monotonic() > deadline:
                stop(lab)
                raise OpsbookError(f"JupyterLab did not answer on {LOOPBACK}:{lab.port} within {timeout:.0f} s; "
                                   "it was stopped.") from None
            time.sleep(0.25)


def stop(lab: Lab, timeout: float = 15.0) -> int:
    """Stop the server (SIGTERM: it shuts its kernels down), then kill it if it will not go."""
    if lab.process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(lab.process.pid, signal.SIGTERM)
        try:
            lab.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(lab.process.pid, signal.SIGKILL)
            lab.process.wait()
    shutil.rmtree(lab.kernel_dir, ignore_errors=True)
    return lab.process.returncode


@contextlib.contextmanager
def running(port: int | None = None, **kw) -> Iterator[Lab]:
    lab = start(port, **kw)
    try:
        wait_ready(lab)
        yield lab
    finally:
        stop(lab)


def notebook(port: int | None = None, log: Callable[[str], None] = print) -> None:
    """`invoke notebook`: start JupyterLab, print its URL, run until Ctrl-C (or SIGTERM, SIGHUP)."""
    from opsbook.engines.interrupts import interruptible

    with interruptible(), running(port or DEFAULT_PORT) as lab:
        log(f"JupyterLab on {LOOPBACK} only, over {ROOT}, kernel {KERNEL}:\n  open {lab.url}\n"
            "Runbooks run there are not records: with their defaults they change nothing, and each says which "
            "`invoke` command runs it as one. Ctrl-C stops the server.")
        try:
            lab.process.wait()
        except KeyboardInterrupt:
            log("stopping JupyterLab")
