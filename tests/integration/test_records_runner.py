"""The runbook runner with a real papermill kernel, against real local and S3 (moto) stores."""

import html
import json
import re
import stat
from pathlib import Path

import nbformat
import pytest

from opsbook.core.inventory import load
from opsbook.core.paths import ROOT
from opsbook.core.redaction import Redactor
from opsbook.engines.records import runner as runbooks
from opsbook.engines.records.store import LocalStore, S3Store, StoreUnreachable, new_record_id

LAB = load("lab")   # the environment the runs are for (their stores and secrets are given explicitly)

pytestmark = pytest.mark.kernel


def write_runbook(directory: Path, name: str, parameters: str, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    params = nbformat.v4.new_code_cell(parameters.strip())
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, *(nbformat.v4.new_code_cell(c.strip()) for c in cells)]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


INJECTED = """
env: str = "lab"  # environment; set by opsbook
record_id: str = None  # this run's record; set by opsbook
parent_record_id: str = None  # the run that started this one; set by opsbook
"""


@pytest.fixture
def book(tmp_path):
    """A runbooks directory with `count` (succeeds), `broken` (fails in cell 2) and `leaky` (secrets)."""
    d = tmp_path / "runbooks"
    write_runbook(
        d,
        "count",
        INJECTED + 'rows: int = None  # required: rows to count\nmarker: str = ""  # file to create when run',
        "import opsbook, pathlib\nfrom opsbook.engines.records.figures import record_figures\n"
        "if marker: pathlib.Path(marker).write_text('ran')",
        "print(f'env={env} record={record_id} parent={parent_record_id} opsbook={opsbook.__file__}')",
        "record_figures(rows=rows, doubled=rows * 2)\nrecord_figures(doubled=rows * 3, host='app1')",
    )
    write_runbook(
        d,
        "broken",
        INJECTED,
        "print('step one done')",
        "raise ValueError('disk full on db1')",
        "print('never printed')",
    )
    write_runbook(
        d,
        "leaky",
        INJECTED + "password: str = None  # required: a secret value, given by mistake\n"
        "fail: bool = False  # raise an error that carries the secret",
        "from opsbook.engines.records.figures import record_figures\nprint('the password is', password)\n"
        "print('computed:', 'zq7' + 'Kx9' + 'vv2')",
        "record_figures(leaked=password, nested={'k': [password]})\npassword",
        "if fail:\n    raise RuntimeError(f'cannot log in with {password!r}')",
    )
    return d


def _all_bytes_local(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_succeeded_run_stores_notebook_html_and_ledger_entry(book, tmp_path):
    store = LocalStore(tmp_path / "records")
    parent = new_record_id("release")
    entry = runbooks.run(
        "count",
        LAB,
        {"rows": 21},
        parent_record_id=parent,
        store=store,
        secrets={},
        runbooks_dir=book,
        progress=False,
        log=lambda _m: None,
    )
    assert entry["outcome"] == "succeeded"
    assert entry["error"] is None
    assert entry["parameters"] == {"rows": 21}
    assert entry["figures"] == {"rows": 21, "doubled": 63, "host": "app1"}
    assert entry["parent_record_id"] == parent
    assert entry["git_sha"] not in ("", "unknown")
    assert entry["duration_s"] > 0
    assert entry["start"] <= entry["end"]
    assert store.ledger() == [entry]
    nb = nbformat.reads(store.get(entry["notebook"]).decode(), as_version=4)
    printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    # env, record id and parent are injected; the kernel imports the opsbook that runs it.
    assert (
        f"env=lab record={entry['id']} parent={parent} opsbook={ROOT / 'opsbook' / '__init__.py'}" in printed
    )
    html = store.get(entry["html"]).decode()
    assert html.startswith("<!DOCTYPE html>")
    assert "doubled = 63" in html
    # It opens offline: no script or stylesheet comes from anywhere else (nbconvert's CDN scripts).
    assert not re.findall(r"""(?:src|href)=["']?(?:https?:)?//""", html), "the record loads something from elsewhere"
    assert not Path(store.location(entry["notebook"])).stat().st_mode & stat.S_IWUSR


def test_an_operation_that_records_itself_when_it_ends_keeps_its_own_start_and_duration(book, tmp_path):
    # A release writes its record after its last batch: the ledger must say when the release began
    # and how long it took, not how long rendering the record took.
    from datetime import UTC, datetime, timedelta

    store = LocalStore(tmp_path / "records")
    began = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=7)
    entry = runbooks.run("count", LAB, {"rows": 1}, started=began, store=store, secrets={}, runbooks_dir=book,
                         progress=False, log=lambda _m: None)
    assert entry["start"] == began.isoformat(timespec="seconds")
    assert 420 <= entry["duration_s"] < 420 + 120
    assert datetime.fromisoformat(entry["end"]) - began >= timedelta(minutes=7)


def test_failed_run_is_recorded_with_papermill_banner_then_raises(book, tmp_path):
    store = LocalStore(tmp_path / "records")
    with pytest.raises(runbooks.RunbookFailed, match=r"ValueError: disk full on db1") as info:
        runbooks.run(
            "broken", LAB, store=store, secrets={}, runbooks_dir=book, progress=False, log=lambda _m: None
        )
    entry = info.value.entry
    assert entry["id"] in str(info.value)
    assert store.location(entry["html"]) in str(info.value)
    assert store.ledger() == [entry]
    assert entry["outcome"] == "failed"
    assert entry["error"].endswith("ValueError: disk full on db1")
    nb_text = store.get(entry["notebook"]).decode()
    assert "An Exception was encountered" in nb_text  # papermill's error banner
    assert "step one done" in nb_text
    assert "never printed\\n" not in nb_text.split('"source"')[-1]
    assert "disk full on db1" in store.get(entry["html"]).decode()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        pytest.param({"rows": 5, "rowz": 1}, r"(?s)'rowz'.*rows: int = None  # required", id="unknown"),
        pytest.param({}, r"missing required parameter 'rows'", id="missing"),
        pytest.param({"rows": "5"}, r"'rows' must be int", id="wrong-type"),
    ],
)
def test_refused_run_executes_nothing_and_stores_nothing(book, tmp_path, params, message):
    store = LocalStore(tmp_path / "records")
    marker = tmp_path / "ran"
    with pytest.raises(runbooks.RunbookError, match=message):
        runbooks.run(
            "count",
            LAB,
            {**params, "marker": str(marker)},
            store=store,
            secrets={},
            runbooks_dir=book,
            progress=False,
        )
    assert not marker.exists()
    assert not (tmp_path / "records").exists()


def test_unwritable_store_is_refused_before_anything_runs(book, tmp_path):
    (tmp_path / "records").write_text("a file where the store should be")
    marker = tmp_path / "ran"
    with pytest.raises(StoreUnreachable, match="Nothing was run"):
        runbooks.run(
            "count",
            LAB,
            {"rows": 1, "marker": str(marker)},
            store=LocalStore(tmp_path / "records" / "x"),
            secrets={},
            runbooks_dir=book,
            progress=False,
        )
    assert not marker.exists()


# -- secrets -----------------------------------------------------------------------------------
PLANTED = {"vault_db_password": 'S3cr3t-"pw"&<db>\\x', "vault_api_token": "zq7Kx9vv2"}


def _strings(o):
    if isinstance(o, str):
        yield o
    elif isinstance(o, dict):
        for k, v in o.items():
            yield k
            yield from _strings(v)
    elif isinstance(o, list):
        for v in o:
            yield from _strings(v)


def _assert_no_secret_in(blobs: dict[str, bytes]):
    """Look for the values in the bytes, in every decoded JSON string and in the unescaped HTML text."""
    redactor = Redactor(PLANTED)
    assert blobs
    for name, data in blobs.items():
        texts = [data.decode()]
        if name.endswith((".json", ".ipynb")):
            texts += list(_strings(json.loads(data)))
        if name.endswith(".html"):
            texts.append(html.unescape(data.decode()))
        for value in PLANTED.values():
            for text in texts:
                assert value not in text, name
                assert repr(value)[1:-1] not in text, name
        assert redactor.leaks(data) == [], name


def _run_leaky(book, store):
    ok = runbooks.run(
        "leaky",
        LAB,
        {"password": PLANTED["vault_db_password"]},
        store=store,
        secrets=PLANTED,
        runbooks_dir=book,
        progress=False,
        log=lambda _m: None,
    )
    with pytest.raises(runbooks.RunbookFailed) as info:
        runbooks.run(
            "leaky",
            LAB,
            {"password": PLANTED["vault_db_password"], "fail": True},
            store=store,
            secrets=PLANTED,
            runbooks_dir=book,
            progress=False,
            log=lambda _m: None,
        )
    failed = info.value.entry
    # The secrets did reach the run (so the test can fail) and were replaced in the record.
    assert ok["parameters"]["password"] == "[secret:vault_db_password]"
    assert ok["figures"] == {
        "leaked": "[secret:vault_db_password]",
        "nested": {"k": ["[secret:vault_db_password]"]},
    }
    notebook = store.get(ok["notebook"]).decode()
    assert "the password is [secret:vault_db_password]" in notebook
    assert "computed: [secret:vault_api_token]" in notebook
    assert "[secret:vault_db_password]" in failed["error"]
    for value in PLANTED.values():
        assert value not in str(info.value)
    return ok, failed


def test_secrets_reach_no_stored_byte_local(book, tmp_path):
    store = LocalStore(tmp_path / "records")
    _run_leaky(book, store)
    _assert_no_secret_in(_all_bytes_local(tmp_path / "records"))


@pytest.mark.moto
def test_secrets_reach_no_stored_byte_s3(book, s3_bucket, aws):
    import boto3

    store = S3Store(f"s3://{s3_bucket}/lab")
    ok, failed = _run_leaky(book, store)
    s3 = boto3.client("s3", endpoint_url=aws)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert len(keys) == 6
    assert f"lab/ledger/{ok['id']}.json" in keys
    _assert_no_secret_in({k: s3.get_object(Bucket=s3_bucket, Key=k)["Body"].read() for k in keys})
    assert (
        json.loads(s3.get_object(Bucket=s3_bucket, Key=f"lab/ledger/{failed['id']}.json")["Body"].read())
        == failed
    )


@pytest.mark.moto
def test_missing_bucket_is_refused_before_anything_runs(book, tmp_path, aws):
    marker = tmp_path / "ran"
    with pytest.raises(StoreUnreachable, match=r"bucket 'no-such-bucket' does not exist\. Nothing was run"):
        runbooks.run(
            "count",
            LAB,
            {"rows": 1, "marker": str(marker)},
            store=S3Store("s3://no-such-bucket/lab"),
            secrets={},
            runbooks_dir=book,
            progress=False,
        )
    assert not marker.exists()


def test_the_kernel_talks_over_private_unix_sockets_not_loopback_tcp(tmp_path):
    # Loopback TCP is unencrypted and open to every local user; a runbook's traffic carries
    # connection strings. opsbook runs kernels over IPC sockets in a private temporary directory.
    write_runbook(tmp_path / "rb", "where", INJECTED,
                  "from ipykernel.kernelapp import IPKernelApp\nimport os, stat\napp = IPKernelApp.instance()\n"
                  "print('transport', app.transport)\n"
                  "print('private', stat.S_IMODE(os.stat(os.path.dirname(app.ip)).st_mode) == 0o700)")
    store = LocalStore(tmp_path / "records")
    entry = runbooks.run("where", LAB, store=store, secrets={}, runbooks_dir=tmp_path / "rb", progress=False,
                         log=lambda _m: None)
    printed = store.get(entry["notebook"]).decode()
    assert "transport ipc" in printed
    assert "private True" in printed


@pytest.mark.moto
def test_a_record_the_store_refuses_is_kept_here_and_uploaded_by_the_next_run(tmp_path, s3_bucket, aws, monkeypatch):
    """The bucket disappears while a run executes (after the store was checked): the record is
    kept on this machine, the operator is told where, and the next run that reaches the store
    uploads it before its own."""
    import boto3

    monkeypatch.setenv("OPSBOOK_SPOOL", str(tmp_path / "spool"))
    rb = tmp_path / "rb"
    write_runbook(rb, "vanish", INJECTED + "bucket: str = None  # required: the bucket to delete",
                  "import boto3\nboto3.client('s3').delete_bucket(Bucket=bucket)\nprint('the bucket is gone')")
    write_runbook(rb, "noop", INJECTED, "print('nothing to do')")
    store = S3Store(f"s3://{s3_bucket}/lab")
    said: list[str] = []
    entry = runbooks.run("vanish", LAB, {"bucket": s3_bucket}, store=store, secrets={}, runbooks_dir=rb,
                         progress=False, log=said.append)
    kept = Path(entry["spooled"])
    assert (kept / "entry.json").is_file()
    assert "the bucket is gone" in (kept / "notebook.ipynb").read_text()
    assert stat.S_IMODE(kept.stat().st_mode) == 0o700
    assert any(str(kept) in line and "uploads it" in line for line in said)

    boto3.client("s3", endpoint_url=aws).create_bucket(Bucket=s3_bucket)   # the store is back
    second = runbooks.run("noop", LAB, {}, store=store, secrets={}, runbooks_dir=rb, progress=False,
                          log=said.append)
    assert [e["id"] for e in store.ledger()] == [entry["id"], second["id"]]
    assert not kept.exists()
    assert b"the bucket is gone" in store.get(f"records/{entry['id']}/notebook.ipynb")


def _gone(pid: int) -> bool:
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:   # gone, or a zombie its parent has not reaped yet (it runs nothing)
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_a_kernel_started_ahead_runs_the_record_with_its_preload_and_is_stopped_after(tmp_path):
    # A release starts its record's kernel when it begins (runner.WarmKernel): the record must run in
    # that kernel, after the preload, and the kernel must not outlive the release.
    write_runbook(tmp_path / "rb", "pid", INJECTED,
                  "import os, sys\nprint('pid', os.getpid(), 'preloaded', getattr(sys, 'opsbook_warm', None))")
    store = LocalStore(tmp_path / "records")
    with runbooks.WarmKernel("import sys\nsys.opsbook_warm = 'yes'") as kernel:
        pid = kernel.km.provisioner.pid
        entry = runbooks.run("pid", LAB, store=store, secrets={}, runbooks_dir=tmp_path / "rb", progress=False,
                             log=lambda _m: None, kernel=kernel)
        assert kernel.take() is None   # one run per kernel: a second would see the first one's state
    printed = store.get(entry["notebook"]).decode()
    assert f"pid {pid} preloaded yes" in printed
    assert entry["outcome"] == "succeeded"
    assert _gone(pid), "the kernel started ahead outlived its block"


def test_a_kernel_started_ahead_that_died_or_was_not_used_changes_nothing(tmp_path):
    import os
    import signal

    write_runbook(tmp_path / "rb", "pid", INJECTED, "import os\nprint('pid', os.getpid())")
    store = LocalStore(tmp_path / "records")
    with runbooks.WarmKernel() as kernel:
        dead = kernel.km.provisioner.pid
        os.kill(dead, signal.SIGKILL)
        assert _gone(dead)
        entry = runbooks.run("pid", LAB, store=store, secrets={}, runbooks_dir=tmp_path / "rb", progress=False,
                             log=lambda _m: None, kernel=kernel)
    assert entry["outcome"] == "succeeded"
    printed = store.get(entry["notebook"]).decode()
    assert "pid " in printed
    assert f"pid {dead}" not in printed   # the run started a kernel of its own

    with runbooks.WarmKernel("import pandas") as unused:
        pid = unused.km.provisioner.pid
    assert _gone(pid), "an unused kernel started ahead outlived its block"


# An interrupt while a runbook's cell runs: the kernel gets it (as Jupyter's "interrupt" does), so the
# cell's own clean-up runs (a scaling check puts back the hosts it took out of the load balancer), no
# further cell starts, the record says `interrupted`, and the process ends with the runner's message.
_RUN_IN_A_CHILD = """
import signal
import sys
# As in an operator's terminal, whatever this test's own process inherited (a background job ignores SIGINT).
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGHUP, signal.SIG_DFL)
from pathlib import Path
from opsbook.core.inventory import load
from opsbook.engines.interrupts import Stopped, interruptible
from opsbook.engines.records import runner
from opsbook.engines.records.store import LocalStore
book, records, marker = map(Path, sys.argv[1:4])
try:
    with interruptible():
        runner.run("holds", load("lab"), {"marker": str(marker)}, store=LocalStore(records), secrets={},
                   runbooks_dir=book, progress=False, log=lambda m: print(m, flush=True))
except Stopped as e:
    print("STOPPED:", e, flush=True)
    sys.exit(130)
"""


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_an_interrupt_reaches_the_running_cell_whose_clean_up_runs(tmp_path, signum):
    import signal
    import subprocess
    import sys
    import time

    book = tmp_path / "runbooks"
    write_runbook(
        book, "holds", INJECTED + 'marker: str = ""  # where the cell notes what it took and put back',
        "import pathlib, time\nm = pathlib.Path(marker)\nm.write_text('taken\\n')\n"
        "try:\n    time.sleep(120)\nfinally:\n    m.write_text(m.read_text() + 'put back\\n')",
        "pathlib.Path(marker).write_text(pathlib.Path(marker).read_text() + 'next cell ran\\n')",
    )
    records, marker = tmp_path / "records", tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", _RUN_IN_A_CHILD, str(book), str(records), str(marker)],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (marker.exists() and marker.read_text() == "taken\n") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.read_text() == "taken\n", "the cell never started"
        child.send_signal(getattr(signal, signum))
        out, _ = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130, out
    assert marker.read_text() == "taken\nput back\n"          # its clean-up ran; the next cell did not
    assert f"interrupted by {signum}" in out, out
    [entry] = LocalStore(records).ledger()
    assert entry["outcome"] == "interrupted"
    assert "clean-up ran" in entry["error"]


def test_an_interrupt_while_the_kernel_starts_stops_the_run_before_its_first_cell_without_a_traceback(tmp_path):
    """Sent to a kernel still importing, the interrupt would kill it there, its traceback on the operator's
    terminal; the run stops before its first cell instead, and says so."""
    import signal
    import subprocess
    import sys
    import time

    book = tmp_path / "runbooks"
    write_runbook(book, "holds", INJECTED + 'marker: str = ""',
                  "import pathlib\npathlib.Path(marker).write_text('ran')")
    records, marker = tmp_path / "records", tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", _RUN_IN_A_CHILD, str(book), str(records), str(marker)],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def kernel_started() -> bool:
        for proc in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(proc.read_text().rsplit(")", 1)[1].split()[1]) == child.pid and \
                        b"ipykernel" in (proc.parent / "cmdline").read_bytes():
                    return True
            except (OSError, ValueError, IndexError):
                continue
        return False

    try:
        deadline = time.monotonic() + 60
        while not kernel_started() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert kernel_started(), "no kernel was started"
        child.send_signal(signal.SIGINT)   # the kernel is importing now (a second or two)
        out, _ = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130, out
    assert "Traceback" not in out, out
    assert not marker.exists()   # no cell ran
    [entry] = LocalStore(records).ledger()
    assert entry["outcome"] == "interrupted"


# An operation that records itself when it ends (a staging refresh, a snapshot, a drill, a provision),
# interrupted, then interrupted again while its record is written: the record is written all the same.
# Before, the second Ctrl-C reached the record's kernel (passed on as Jupyter's interrupt) and the
# operation, which had ended in order, left no record of what it did.
_LOCKED_IN_A_CHILD = """
import os
import signal
import sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from pathlib import Path
import opsbook.engines.lock as locks
import opsbook.engines.records.store as stores
from opsbook.core.inventory import load
from opsbook.engines.records import runner
book, records, lockfile = map(Path, sys.argv[1:4])
runner.RUNBOOKS = book                                             # this test's runbook, not the real ones
stores.store_for = lambda env: stores.LocalStore(records)           # and its own store
locks.lock_for = lambda env, **_kw: locks.ReleaseLock(env.name, locks.FileLockStore(lockfile))
from datetime import UTC, datetime
try:
    with runner.locked_record("slowrecord", load("lab"), {"done": "half"}, param="slow_data", reason="suite",
                              record_id=None, started=datetime.now(UTC), log=lambda m: print(m, flush=True)):
        os.kill(os.getpid(), signal.SIGINT)                        # the operator's first Ctrl-C
except KeyboardInterrupt:
    print("ENDED IN ORDER", flush=True)
    sys.exit(130)
"""


def test_a_second_interrupt_while_an_operation_writes_its_record_is_held_until_it_is_written(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    book, records, marker = tmp_path / "runbooks", tmp_path / "records", tmp_path / "rendering"
    write_runbook(
        book, "slowrecord", INJECTED + 'slow_data: str = ""  # what the operation did (JSON file)',
        f"import json, pathlib, time\npathlib.Path({str(marker)!r}).write_text('rendering')\ntime.sleep(4)",
        "print('rendered', json.loads(pathlib.Path(slow_data).read_text()))",
        "from opsbook.engines.records.figures import record_figures\n"
        "D = json.loads(pathlib.Path(slow_data).read_text())\nrecord_figures(outcome=D['outcome'])\n"
        "if D['outcome'] != 'succeeded':\n    raise RuntimeError(D['error'])",
    )
    child = subprocess.Popen([sys.executable, "-c", _LOCKED_IN_A_CHILD, str(book), str(records),
                              str(tmp_path / "lock")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.1)
        assert marker.exists(), "the record's runbook never started"
        child.send_signal(signal.SIGINT)                           # the second Ctrl-C, while the record renders
        out, _ = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130, out
    assert "SIGINT (Ctrl-C) arrived while the record was written; it was held until it was" in out, out
    assert "ENDED IN ORDER" in out, out
    [entry] = LocalStore(records).ledger()
    assert entry["runbook"] == "slowrecord"
    assert entry["outcome"] == "interrupted"                       # not "failed": the operator stopped it
    html_text = LocalStore(records).get(entry["html"]).decode()
    assert "rendered" in html_text                                 # every cell ran: the record is whole
    assert "half" in html_text
