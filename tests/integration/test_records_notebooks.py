"""The repo's env_report runbook and release_history notebook, run for real; report pieces on loopback."""

import http.server
import socket
import threading
from datetime import UTC, datetime, timedelta

import nbformat
import papermill
import pytest

from opsbook.core.inventory import load
from opsbook.core.paths import ROOT
from opsbook.engines.records import delivery as history
from opsbook.engines.records import runner as runbooks
from opsbook.engines.records.store import LocalStore, new_record_id
from opsbook.operations import env_report


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- release history ---------------------------------------------------------------------------
T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)


def _write(store, runbook, outcome, at_h, env="prod", **figures):
    start = T0 + timedelta(hours=at_h)
    end = start + timedelta(minutes=30)
    entry = {
        "id": new_record_id(runbook, start),
        "runbook": runbook,
        "env": env,
        "outcome": outcome,
        "start": start.isoformat(),
        "end": end.isoformat(),
        "duration_s": 1800.0,
        "figures": figures,
        "parent_record_id": None,
    }
    return store.write_record(entry, b"{}", b"<html></html>")


@pytest.fixture
def ledger(tmp_path):
    """A real ledger written by the store: prod has 4 releases (one failed, one rolled back), staging 1."""
    store = LocalStore(tmp_path / "records")
    commit = lambda h: (T0 + timedelta(hours=h)).isoformat()  # noqa: E731
    _write(store, "release", "succeeded", 0, commit_time=commit(-4))  # lead 4.5 h
    _write(store, "snapshot", "succeeded", 1)  # not a release
    _write(store, "release", "failed", 24, commit_time=commit(22))  # failed change ...
    _write(store, "release", "succeeded", 26, commit_time=commit(22))  # ... restored 2 h later
    _write(store, "release", "succeeded", 48)  # rolled back ...
    _write(store, "rollback", "succeeded", 49)  # ... restored 1 h later
    _write(store, "release", "succeeded", 30, env="staging", commit_time=commit(29))
    return store


def test_release_figures_from_a_ledger(ledger):
    df = history.releases(ledger.ledger())
    prod = df[df["env"] == "prod"].reset_index(drop=True)
    assert list(prod["outcome"]) == ["succeeded", "failed", "succeeded", "succeeded"]
    assert list(prod["failed_change"]) == [False, True, False, True]
    assert list(prod["time_to_restore_h"].dropna()) == [2.0, 1.0]
    assert prod["lead_time_h"].iloc[0] == 4.5
    summary = history.summary(df).set_index("env")
    assert summary.loc["prod", "change_failure_rate"] == 0.5
    assert summary.loc["prod", "releases"] == 4
    assert summary.loc["prod", "median_time_to_restore_h"] == 1.5
    assert summary.loc["staging", "change_failure_rate"] == 0.0
    assert summary.loc["prod", "unrestored"] == 0


@pytest.mark.kernel
def test_release_history_notebook_draws_a_real_ledger(ledger, tmp_path):
    out = tmp_path / "history.ipynb"
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "release_history.ipynb"),
        str(out),
        parameters={"store": ledger.url},
        cwd=str(ROOT),
        progress_bar=False,
    )
    nb = nbformat.read(out, as_version=4)
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "7 records, 5 releases" in text
    assert "prod" in text
    assert "staging" in text
    assert any("image/png" in o.get("data", {}) for o in outputs), "the figures are drawn"


@pytest.mark.kernel
def test_release_history_notebook_on_an_empty_ledger(tmp_path):
    out = tmp_path / "history.ipynb"
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "release_history.ipynb"),
        str(out),
        parameters={"store": str(tmp_path / "empty")},
        cwd=str(ROOT),
        progress_bar=False,
    )
    text = "".join(
        o.get("text", "") for c in nbformat.read(out, as_version=4).cells for o in c.get("outputs", [])
    )
    assert "0 records, 0 releases" in text
    assert "no releases recorded yet: nothing to draw" in text


# -- env report --------------------------------------------------------------------------------
@pytest.mark.kernel
def test_env_report_runs_as_a_record_without_contacting_hosts(tmp_path):
    store = LocalStore(tmp_path / "records")
    earlier = _write(store, "release", "succeeded", 0, env="lab")
    entry = runbooks.run(
        "env_report",
        load("lab"),
        {"probe": False, "records_from": store.url},
        store=store,
        secrets={},
        progress=False,
        log=lambda _m: None,
    )
    assert entry["outcome"] == "succeeded"
    figures = entry["figures"]
    assert figures["hosts_total"] == len(load("lab").hosts())
    assert figures["hosts_answering"] == 0
    assert figures["db_status"] in ("not probed", "unreachable")
    notebook = store.get(entry["notebook"]).decode()
    assert "not probed" in notebook
    assert earlier["id"] in notebook, "the last records are listed"


def test_ssh_to_a_closed_port_is_unreachable_not_an_error():
    got = env_report.ssh_check(
        "127.0.0.1",
        port=_free_port(),
        user="root",
        timeout=2,
        common_args="-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
    )
    assert got["ssh"] == "unreachable"
    assert "refused" in got["detail"].lower()


class _App(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = {"/version": b'{"version": "1.4.2"}', "/ping": b"pong"}.get(self.path)
        self.send_response(200 if body else 404)
        self.end_headers()
        self.wfile.write(body or b"no")

    def log_message(self, *args):
        pass


@pytest.fixture
def app_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _App)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_checks_read_answers_and_name_failures(app_server):
    ok = env_report.http_get(f"{app_server}/version")
    assert ok["status"] == "ok"
    from opsbook.engines import fleet
    assert fleet.ask_version(f"{app_server}/version") == ("1.4.2", "")
    assert env_report.http_get(f"{app_server}/nope")["status"] == "HTTP 404"
    down = env_report.http_get(f"http://127.0.0.1:{_free_port()}/ping", timeout=2)
    assert down["status"] == "unreachable"
    assert down["detail"]


@pytest.mark.postgres
def test_database_state_reads_size_tables_and_migrations(pg_db):
    from opsbook.engines.migrations import apply_pending

    apply_pending(pg_db, ROOT / "app" / "migrations", log=lambda _m: None)
    state = env_report.database_state(pg_db)
    assert state["status"] == "ok"
    assert state["size_bytes"] > 1_000_000
    assert "public.course_events" in {t["table"] for t in state["largest_tables"]}
    assert ("0001_course_events", "expand") in {(m["migration"], m["phase"]) for m in state["migrations"]}


def test_database_that_does_not_answer_is_unreachable():
    state = env_report.database_state(f"host=127.0.0.1 port={_free_port()} dbname=x user=x", timeout=2)
    assert state["status"] == "unreachable"
    assert state["largest_tables"] == []
