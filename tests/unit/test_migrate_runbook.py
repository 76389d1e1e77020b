"""runbooks/migrate.ipynb run by the records runner (real papermill kernel) against a real Postgres."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import nbformat
import psycopg
import pytest

from opsbook.core.paths import ROOT
from opsbook.engines.migrations import run
from opsbook.engines.records import runner as runbooks
from opsbook.engines.records.store import LocalStore

pytestmark = [pytest.mark.postgres, pytest.mark.kernel]
APP = ROOT / "app" / "migrations"
EVENTS = 3000  # 2/3 record_response with a student, 1/3 roster updates without one


def seed(conninfo: str, tmp_path) -> None:
    """0001 applied (as app 1.0 would have it) and EVENTS rows in course_events."""
    only = tmp_path / "only-0001"
    only.mkdir()
    shutil.copy(APP / "0001_course_events.yml", only)
    run(conninfo, only, "expand")
    with psycopg.connect(conninfo) as conn:
        course = uuid.uuid4()
        conn.execute("INSERT INTO courses (course_uuid, ecosystem_uuid) VALUES (%s, %s)", (course, uuid.uuid4()))
        with conn.cursor().copy(
            "COPY course_events (event_uuid, course_uuid, sequence_number, event_type, data) FROM STDIN"
        ) as cp:
            for i in range(EVENTS):
                kind, data = (
                    ("record_response", {"student_uuid": str(uuid.uuid4())}) if i % 3
                    else ("update_roster", {"students": []})
                )
                cp.write_row((uuid.uuid4(), course, i, kind, json.dumps(data)))


def scratch_env(directory, name="migratetest"):
    """An environment of its own: no app hosts, records under `directory`/records."""
    from opsbook.core.inventory import Env

    inv = directory / "inv"
    (inv / "group_vars" / "all").mkdir(parents=True, exist_ok=True)
    (inv / "hosts.yml").write_text("all:\n  children:\n    app:\n      hosts: {}\n")
    (inv / "group_vars" / "all" / "main.yml").write_text(
        f"opsbook_env_kind: lab\nopsbook_record_store: {directory / 'records'}\n"
        f"opsbook_lock_path: {directory / 'release.lock'}\n")
    return Env(name, path=inv)


def run_migrate(store, conninfo, **params):
    """The runbook as `invoke migrate` starts it, pointed at the test database by the override."""
    return runbooks.run(
        "migrate", scratch_env(Path(store.root).parent / "env"),
        {"dsn_override": conninfo, "settings": {"max_canary_ms": 0}, **params},
        store=store, secrets={}, progress=False, log=lambda _m: None,
    )


def columns(conninfo) -> set[str]:
    with psycopg.connect(conninfo) as conn:
        return {r[0] for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'course_events'")}


def applied(conninfo) -> set[tuple[str, str]]:
    with psycopg.connect(conninfo) as conn:
        return set(conn.execute("SELECT migration, phase FROM opsbook_migrations").fetchall())


def stored_notebook(store, entry):
    return nbformat.reads(store.get(entry["notebook"]).decode(), as_version=4)


def test_expand_runs_as_a_record_with_plan_measurements_plot_and_figures(pg_db, tmp_path):
    seed(pg_db, tmp_path)
    store = LocalStore(tmp_path / "records")
    entry = run_migrate(store, pg_db, phase="expand")

    assert entry["outcome"] == "succeeded", entry["error"]
    f = entry["figures"]
    assert f["applied"] == ["0002_course_events_student_uuid", "0003_course_events_kind"]
    assert f["error"] is None
    assert f["steps_applied"] == f["pending_steps"] > 0
    assert f["backfill_rows_updated"] == EVENTS * 2 // 3 + EVENTS  # student_uuid for 2/3, kind for all
    assert f["backfill_rows_per_s"] > 0
    assert {"longest_lock_wait_s", "longest_wait_behind_migration_s", "writer_visible_wait_samples"} <= set(f)
    assert f["seconds"] > 0
    assert {"student_uuid", "kind", "event_type"} <= columns(pg_db)
    with psycopg.connect(pg_db) as conn:
        wrong = conn.execute(
            "SELECT count(*) FROM course_events WHERE student_uuid IS DISTINCT FROM (data->>'student_uuid')::uuid "
            "OR kind IS DISTINCT FROM event_type").fetchone()[0]
    assert wrong == 0

    nb = stored_notebook(store, entry)
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "CREATE INDEX CONCURRENTLY IF NOT EXISTS course_events_student_uuid_idx" in text  # the plan
    assert "no blocking sessions" in text
    assert "the contract gate does not apply" in text
    assert "batch: " in text  # progress
    pngs = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert pngs, "the measurements plot is in the record"
    assert "password" not in json.dumps(entry["parameters"])

    # Nothing pending any more: a second run applies nothing and still succeeds.
    again = run_migrate(store, pg_db, phase="expand")
    assert again["outcome"] == "succeeded"
    assert again["figures"]["applied"] == []
    assert again["figures"]["pending_steps"] == 0


def test_contract_refused_while_a_host_serves_an_old_version_names_it_and_changes_nothing(pg_db, tmp_path):
    seed(pg_db, tmp_path)
    run(pg_db, APP, "expand")
    store = LocalStore(tmp_path / "records")
    with pytest.raises(runbooks.RunbookFailed) as failed:
        run_migrate(store, pg_db, phase="contract", fleet_override={"app1": "1.1.0", "app2": "1.0.3"})
    entry = failed.value.entry
    assert entry["outcome"] == "failed"
    assert "refusing the contract phase" in entry["error"]
    assert "app2 serves 1.0.3" in entry["error"]
    assert "app1" not in entry["error"]
    # The refusal's record carries its figures: who blocked it, on which version, for which migrations.
    assert entry["figures"]["refused"] is True
    assert entry["figures"]["blocking_hosts"] == ["app2"]
    assert entry["figures"]["blocking_versions"] == {"app2": "1.0.3"}
    assert entry["figures"]["phase"] == "contract"
    assert entry["figures"]["refused_migrations"]
    assert "event_type" in columns(pg_db)  # nothing was changed
    assert not {p for _m, p in applied(pg_db)} & {"contract"}
    assert [e["outcome"] for e in store.ledger()] == ["failed"]

    # Once every host serves 1.1.0, the same contract runs.
    entry = run_migrate(store, pg_db, phase="contract", fleet_override={"app1": "1.1.0", "app2": "1.1.0"})
    assert entry["outcome"] == "succeeded", entry["error"]
    assert entry["figures"]["applied"] == [
        "0001_course_events", "0002_course_events_student_uuid", "0003_course_events_kind"]
    assert entry["figures"]["steps_applied"] > 0
    assert entry["figures"]["blocking_hosts"] == []
    assert "event_type" not in columns(pg_db)
    assert "kind" in columns(pg_db)


def test_dry_run_through_the_runbook_changes_nothing(pg_db, tmp_path):
    seed(pg_db, tmp_path)
    store = LocalStore(tmp_path / "records")
    entry = run_migrate(store, pg_db, phase="expand", dry_run=True)
    assert entry["outcome"] == "succeeded"
    assert entry["figures"]["dry_run"] is True
    assert entry["figures"]["pending_steps"] > 0
    assert "student_uuid" not in columns(pg_db)
    assert applied(pg_db) == {("0001_course_events", "expand")}


def test_invoke_migrate_refuses_a_dsn_with_a_password_before_anything_runs(pg_db, tmp_path, monkeypatch):
    from opsbook.engines.migrations import MigrationError
    from opsbook.operations import migrate as operator

    ran = []
    monkeypatch.setattr(runbooks, "run", lambda *a, **k: ran.append(a))
    with pytest.raises(MigrationError, match="PGPASSWORD"):
        operator.migrate(scratch_env(tmp_path), "expand", dsn=pg_db + " password=hunter2hunter2")
    assert ran == []


def test_invoke_migrate_runs_the_runbook_for_the_environment_with_its_parameters(pg_db, tmp_path):
    """What `invoke migrate --env E --dsn ... -a lock_timeout_ms=1500` does, on an environment
    whose record store is a local directory."""
    from opsbook.engines.migrations import MigrationError
    from opsbook.operations import migrate as operator

    env = scratch_env(tmp_path)
    seed(pg_db, tmp_path)
    entry = operator.migrate(env, "expand", dsn=pg_db, pairs=["lock_timeout_ms=1500", "max_canary_ms=0"],
                             out=lambda _m: None)
    assert entry["outcome"] == "succeeded", entry["error"]
    assert entry["parameters"]["settings"] == {"lock_timeout_ms": 1500, "max_canary_ms": None}
    assert entry["parameters"]["phase"] == "expand"
    assert [e["id"] for e in LocalStore(tmp_path / "records").ledger()] == [entry["id"]]
    with pytest.raises(MigrationError, match="with its own flag"):
        operator.migrate(env, "expand", dsn=pg_db, pairs=["phase=contract"])
    # An engine knob that does not exist, or of the wrong type, is refused before anything runs.
    with pytest.raises(MigrationError, match="lock_timeout_ms must be int"):
        operator.migrate(env, "expand", dsn=pg_db, pairs=["lock_timeout_ms=soon"])
    with pytest.raises(runbooks.RunbookFailed, match="unknown migration setting 'lock_timout_ms'"):
        runbooks.run("migrate", env, {"dsn_override": pg_db, "settings": {"lock_timout_ms": 5}},
                     progress=False, log=lambda _m: None)
    refused = LocalStore(tmp_path / "records").ledger()[-1]
    assert refused["outcome"] == "failed"
    assert "unknown migration setting" in refused["error"]
