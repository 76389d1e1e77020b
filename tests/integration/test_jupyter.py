"""Operators in Jupyter: `invoke notebook`'s JupyterLab answers on loopback only with the project's
kernel, every runbook executed outside opsbook with its defaults changes nothing, and the release
history notebook runs as it is, against the default environment's record store."""

import asyncio
import hashlib
import json
import os
import stat
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from opsbook.core.paths import ROOT
from opsbook.operations import jupyter

pytestmark = pytest.mark.kernel

RUNBOOKS = sorted((ROOT / "runbooks").glob("*.ipynb"))
# What a runbook could touch if it acted: the tools that change hosts and databases, and the
# places where records, locks and artifacts live.
TOOLS = ("ansible-playbook", "ansible", "ansible-runner", "ssh", "scp", "podman", "psql", "pg_dump", "squawk",
         "testinfra", "py.test")
STATE = (ROOT / "records", ROOT / ".lab", ROOT / "dist")


async def _execute_in(lab, kernel_id: str, code: str) -> str:
    """Run `code` in a kernel of the server through its websocket, as JupyterLab's page does; its output."""
    from tornado.websocket import websocket_connect

    ws = await websocket_connect(f"ws://127.0.0.1:{lab.port}/api/kernels/{kernel_id}/channels?token={lab.token}")
    msg_id = uuid.uuid4().hex
    ws.write_message(json.dumps({
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test", "session": uuid.uuid4().hex,
                   "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell",
        "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                    "allow_stdin": False}}))
    out = []
    try:
        while True:
            message = json.loads(await asyncio.wait_for(ws.read_message(), 60))
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if message["msg_type"] == "stream":
                out.append(message["content"]["text"])
            elif message["msg_type"] == "error":
                out.append(f"{message['content']['ename']}: {message['content']['evalue']}")
            elif message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
                return "".join(out)
    finally:
        ws.close()


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on `port` (from /proc: no traffic needed)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


@pytest.fixture
def jupyter_dirs(tmp_path):
    """Jupyter's own config, runtime and workspace directories, private to the test."""
    names = ("JUPYTER_CONFIG_DIR", "JUPYTER_RUNTIME_DIR", "JUPYTERLAB_WORKSPACES_DIR", "JUPYTERLAB_SETTINGS_DIR")
    env = {}
    for name in names:
        (tmp_path / name).mkdir()
        env[name] = str(tmp_path / name)
    return env


def test_jupyterlab_starts_on_loopback_with_the_projects_kernel(tmp_path, jupyter_dirs):
    log = (tmp_path / "jupyter.log").open("wb")
    lab = jupyter.start(env=jupyter_dirs, output=log)
    try:
        assert jupyter.wait_ready(lab)["version"]
        assert lab.url.startswith("http://127.0.0.1:")
        assert _listening_addresses(lab.port) == {"0100007F"}, "bound to 127.0.0.1 and nothing else"
        specs = lab.api("/api/kernelspecs")
        assert specs["default"] == "python3"
        assert "python3" in specs["kernelspecs"]
        # The kernel really runs from the server, as when an operator opens a notebook there: this
        # checkout's opsbook, over Unix sockets in the server's private directory (no TCP).
        request = urllib.request.Request(
            f"http://127.0.0.1:{lab.port}/api/kernels", data=json.dumps({"name": "python3"}).encode(),
            headers={"Authorization": f"token {lab.token}", "Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=30) as answer:
            kernel = json.loads(answer.read())
        said = asyncio.run(_execute_in(lab, kernel["id"], "import opsbook; print(opsbook.__file__)"))
        assert said.strip() == str(ROOT / "opsbook" / "__init__.py")
        assert [p.name for p in lab.kernel_dir.iterdir()], "the kernel's sockets are files in its private directory"
        assert stat.S_IMODE(lab.kernel_dir.stat().st_mode) == 0o700
        # Without the token the server answers nothing.
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://127.0.0.1:{lab.port}/api/contents", timeout=5)
        assert info.value.code == 403
    finally:
        jupyter.stop(lab)
        log.close()
    assert lab.process.returncode is not None
    assert _listening_addresses(lab.port) == set(), "stopped"
    assert not lab.kernel_dir.exists()


def _snapshot() -> dict[str, str]:
    """Every file under the places a runbook could change, with a hash of its content and mode."""
    out = {}
    for base in STATE:
        for path in sorted(base.rglob("*")) if base.exists() else []:
            if path.is_file():
                st = path.stat()
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() + oct(stat.S_IMODE(st.st_mode))
    return out


@pytest.fixture
def sentinels(tmp_path, monkeypatch):
    """Tools that change hosts or databases, replaced on the kernel's PATH by ones that write down
    that they were called (and fail); the spool and home are the test's own."""
    bindir, calls = tmp_path / "bin", tmp_path / "calls"
    bindir.mkdir()
    for tool in TOOLS:
        script = bindir / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\nexit 1\n')
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("OPSBOOK_SPOOL", str(tmp_path / "spool"))
    return calls


def _execute(path: Path, cwd: Path):
    """Run a notebook as JupyterLab would: its own directory as the working directory, its defaults, no
    papermill and no opsbook runner. Returns the error (None when it ran to the end)."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(cwd)}})
    try:
        client.execute()
    except CellExecutionError as e:
        return e, nb
    return None, nb


# Runs with the lab tests, one after another: it compares the lab's lock, records and state before
# and after, which the lab tests change while they run (a release renews its lock every few seconds).
@pytest.mark.lab
@pytest.mark.parametrize("path", RUNBOOKS, ids=lambda p: p.stem)
def test_a_runbook_run_with_its_defaults_outside_opsbook_changes_nothing(path, sentinels, tmp_path):
    before = _snapshot()
    error, _nb = _execute(path, path.parent)
    assert _snapshot() == before, "no record, lock, artifact or lab state was written or changed"
    assert not sentinels.exists(), f"it ran {sentinels.read_text() if sentinels.exists() else ''}"
    assert not (tmp_path / "spool").exists(), "no record was kept for later either"
    if error is not None:
        assert error.ename == "NotARecord", f"it failed, but not by refusing: {error.ename}: {error.evalue}"
        assert "invoke " in error.evalue, "the refusal says which invoke command runs it as a record"
        assert "nothing was" in error.evalue


def test_release_history_notebook_runs_as_it_is(sentinels):
    error, nb = _execute(ROOT / "notebooks" / "release_history.ipynb", ROOT / "notebooks")
    assert error is None, f"{error.ename}: {error.evalue}" if error else ""
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "records" in text
    assert str(ROOT / "records" / "lab") in text, "the default environment's store"
    assert not sentinels.exists()
