"""The contract gate fed by the fleet: versions read from real bl-api servers (gunicorn on 127.0.0.1),
`invoke migrate --dry-run` on an environment, and the contracts a release leaves pending."""

from __future__ import annotations

import socket
from pathlib import Path

import psycopg
import pytest
from bl_api import __version__

from opsbook.core.inventory import Env
from opsbook.engines import fleet
from opsbook.engines.migrations import MigrationError, pending_contracts, plan, run
from opsbook.engines.migrations.guards import contract_gate
from opsbook.operations import migrate as operator
from tests.fixtures.service import Service
from tests.unit.test_app import APP_MIGRATIONS, migrate_to

pytestmark = pytest.mark.postgres


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def inventory(tmp_path: Path, ports: dict[str, int], store: Path | None = None) -> Env:
    """An environment whose app hosts are local servers (all on 127.0.0.1, one port each)."""
    inv = tmp_path / "inv"
    (inv / "group_vars" / "all").mkdir(parents=True)
    hosts = "".join(
        f"        {h}:\n          ansible_host: 127.0.0.1\n          bl_api_port: {p}\n" for h, p in ports.items()
    )
    (inv / "hosts.yml").write_text(f"all:\n  children:\n    app:\n      hosts:\n{hosts}")
    (inv / "group_vars" / "all" / "main.yml").write_text(
        f"opsbook_env_kind: lab\nopsbook_record_store: {store or tmp_path / 'records'}\n"
    )
    return Env("fleettest", path=inv)


@pytest.fixture
def servers(tmp_path, pg_db):
    """Two real bl-api servers: one serving this version, one pretending to be 1.0.3."""
    started = []
    for name, extra in (("new", {}), ("old", {"BL_API_VERSION_OVERRIDE": "1.0.3"})):
        d = tmp_path / name
        d.mkdir()
        started.append(Service(pg_db, d, BL_API_WORKERS="1", BL_API_THREADS="2", **extra).launch())
    try:
        for s in started:
            s.wait_ready()
        yield {"new": started[0].port, "old": started[1].port}
    finally:
        for s in started:
            s.kill()


def test_served_versions_asks_every_app_host_and_says_why_one_has_none(tmp_path, servers):
    env = inventory(tmp_path, {"app1": servers["new"], "app2": servers["old"], "app3": closed_port()})
    got = fleet.served_versions(env, timeout=2)
    assert dict(got) == {"app1": __version__, "app2": "1.0.3", "app3": None}
    assert got.reasons["app3"].startswith("unreachable")
    assert set(got.reasons) == {"app3"}
    assert got.urls["app1"] == f"http://127.0.0.1:{servers['new']}/version"
    # The gate: the old host and the silent one block; the one on the required version does not.
    blocked = contract_gate("1.1.0", got)
    assert set(blocked) == {"app2", "app3"}
    assert blocked["app2"] == "1.0.3"
    assert blocked["app3"].startswith("unknown (unreachable")


def test_dry_run_on_an_environment_prints_plan_and_gate_verdict_and_changes_nothing(tmp_path, servers, pg_db):
    migrate_to(pg_db, "expand", tmp_path)
    env = inventory(tmp_path, {"app1": servers["new"], "app2": servers["old"], "app3": closed_port()})
    lines: list[str] = []
    p = operator.migrate(env, "contract", dry_run=True, dsn=pg_db, out=lines.append)
    text = "\n".join(lines)
    assert "contract gate: REFUSED, blocked by app2, app3" in text
    assert "app3 serves None (unreachable" in text
    assert "DROP COLUMN IF EXISTS event_type" in text  # the plan shows the SQL it would run
    assert {s.migration for s in p.pending} == {"0002_course_events_student_uuid", "0003_course_events_kind"}
    with psycopg.connect(pg_db) as conn:
        phases = {r[0] for r in conn.execute("SELECT phase FROM opsbook_migrations")}
    assert phases == {"expand"}
    assert not (tmp_path / "records").exists()  # a dry run leaves no record

    # Every host on the new version: the verdict flips. (--fleet overrides asking the hosts.)
    lines.clear()
    operator.migrate(env, "contract", dry_run=True, dsn=pg_db, fleet=f"app1={__version__},app2=1.1.0",
                     out=lines.append)
    assert "\ncontract gate: allowed" in "\n".join(lines)


def test_expand_dry_run_needs_no_fleet(tmp_path, pg_db):
    migrate_to(pg_db, "0001", tmp_path)
    env = inventory(tmp_path, {"app1": closed_port()})
    lines: list[str] = []
    p = operator.migrate(env, "expand", dry_run=True, dsn=pg_db, out=lines.append)
    assert len(p.pending) > 0
    assert not any("contract gate" in line for line in lines)
    with psycopg.connect(pg_db) as conn:
        migrations = conn.execute("SELECT migration, phase FROM opsbook_migrations").fetchall()
        cols = {r[0] for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'course_events'")}
    assert migrations == [("0001_course_events", "expand")]
    assert "student_uuid" not in cols


def test_bad_fleet_override_and_phase_are_refused(tmp_path):
    env = inventory(tmp_path, {})
    with pytest.raises(MigrationError, match="host=version pairs"):
        operator.migrate(env, "contract", dry_run=True, dsn="host=127.0.0.1", fleet="app1")
    with pytest.raises(MigrationError, match="unknown phase 'sideways'"):
        operator.migrate(env, "sideways", dry_run=True, dsn="host=127.0.0.1")


def test_pending_contracts_after_a_release_expand(tmp_path, pg_db):
    migrate_to(pg_db, "0001", tmp_path)
    assert pending_contracts(pg_db, APP_MIGRATIONS) == []  # 0001's contract is empty; 0002/0003 not expanded
    migrate_to(pg_db, "expand", tmp_path)
    pending = pending_contracts(pg_db, APP_MIGRATIONS)
    assert [(c.migration, c.requires) for c in pending] == [
        ("0002_course_events_student_uuid", "1.1.0"), ("0003_course_events_kind", "1.1.0")]
    assert "once every app host serves >= 1.1.0" in str(pending[0])
    run(pg_db, APP_MIGRATIONS, "contract", fleet_versions={"app1": "1.1.0"})
    assert pending_contracts(pg_db, APP_MIGRATIONS) == []


def test_the_contract_gate_fails_closed_on_an_empty_or_unknown_fleet():
    """No app host to ask, or no answer at all, is no evidence that old versions are gone."""
    assert set(contract_gate("1.1.0", {})) == {"<no app hosts>"}
    assert set(contract_gate("1.1.0", None)) == {"<fleet unknown>"}
    assert contract_gate("1.1.0", {"app1": "1.1.0"}) == {}


def test_a_contract_plan_on_an_empty_fleet_is_refused(tmp_path, pg_db):
    migrate_to(pg_db, "expand", tmp_path)
    p = plan(pg_db, APP_MIGRATIONS, "contract", fleet_versions={})
    assert not p.gate_allows
    assert "REFUSED, blocked by <no app hosts>" in p.gate_verdict()
