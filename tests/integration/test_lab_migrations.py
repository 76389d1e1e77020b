"""Online migrations on the lab, end to end and under a probe: a fleet on the 0001 schema,
0002/0003's expand while users write, a contract refused while old versions serve, a release
to the new version, the contract once no host needs the old schema, and no rollback below
what the contract needs."""

from __future__ import annotations

import shutil
import uuid

import psycopg
import pytest

from opsbook.core.paths import ROOT
from opsbook.engines import artifact, fleet
from opsbook.engines.database import admin_conninfo
from opsbook.engines.probe import Probe, probe_url
from opsbook.engines.records.store import store_for
from tests.fixtures.lab import http_json, invoke, ssh, write_course

pytestmark = [pytest.mark.lab, pytest.mark.slow]


@pytest.fixture(scope="module")
def old_version(tmp_path_factory):
    """A version that ships only migration 0001 and reports 1.0.0 (older than the contracts need)."""
    src = tmp_path_factory.mktemp("old") / "app"
    shutil.copytree(ROOT / "app", src, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for extra in src.joinpath("migrations").glob("000[2-9]_*.yml"):
        extra.unlink()
    version = f"1.0.0+{artifact.default_version().split('+', 1)[1]}.schema0001"
    artifact.build(version, log=lambda _m: None, source=src)
    return version


def last_ledger(env, runbook):
    return [e for e in store_for(env).ledger() if e["runbook"] == runbook][-1]


def seed(lb_url: str, courses: int = 5, per_course: int = 400) -> int:
    for _ in range(courses):
        write_course(lb_url, per_course)
    return courses * per_course


def test_expand_release_contract_under_the_probe(lab_env, lb_url, old_version, test_versions, serving_fleet):
    _a, new = test_versions
    # A fresh service database, and a fleet on the 0001 schema serving version 1.0.0, whatever the
    # lab's state: freshly started (db1's cluster runs only once provisioned), after the README's
    # first release, after an earlier suite run.
    ssh("db1", "runuser -u postgres -- dropdb --if-exists --force bl_api")
    # Hosts serve a version but its database is gone: a release refuses (it cannot know which
    # migrations ran) and changes nothing.
    refused = invoke("release", "--env", "lab", "--version", old_version)
    assert refused.returncode != 0
    assert "cannot read the applied migrations" in refused.stdout + refused.stderr
    assert set(fleet.served_versions(lab_env).values()) == {serving_fleet}
    invoke("provision", "--env", "lab", "--hosts", "db", check=True)   # creates the service database anew, empty
    invoke("release", "--env", "lab", "--version", old_version, check=True)
    assert set(fleet.served_versions(lab_env).values()) == {old_version}
    seeded = seed(lb_url)

    # The expand of 0002/0003 (a batched backfill, an index built concurrently) while users write.
    probe = Probe(probe_url(lab_env), rate=30, max_seconds=600).start("expand")
    invoke("migrate", "--env", "lab", check=True)
    report = probe.stop()
    assert report.failed == 0, report.errors()
    assert report.figures()["missing_acknowledged_writes"] == 0
    expand = last_ledger(lab_env, "migrate")
    assert expand["outcome"] == "succeeded"
    assert expand["figures"]["backfill_rows_updated"] >= seeded

    # The contract is refused while hosts serve a version that needs the old schema.
    refused = invoke("migrate", "--env", "lab", "--phase", "contract")
    assert refused.returncode != 0
    for h in lab_env.hosts("app"):
        assert h.name in refused.stdout + refused.stderr

    # The release to the new version, under the release's own probe; the contracts stay pending.
    invoke("release", "--env", "lab", "--version", new, check=True)
    rec = last_ledger(lab_env, "release")
    assert rec["outcome"] == "succeeded"
    assert rec["figures"]["failed_requests"] == 0
    assert rec["figures"]["missing_acknowledged_writes"] == 0
    assert len(rec["figures"]["contracts_pending"]) == 2

    # The contract, now allowed, under a probe of our own.
    probe = Probe(probe_url(lab_env), rate=30, max_seconds=600).start("contract")
    proc = invoke("migrate", "--env", "lab", "--phase", "contract", check=True)
    report = probe.stop()
    assert "REFUSED" not in proc.stdout
    assert report.failed == 0, report.errors()
    assert report.figures()["missing_acknowledged_writes"] == 0
    mig = last_ledger(lab_env, "migrate")
    assert mig["outcome"] == "succeeded"

    with psycopg.connect(admin_conninfo(lab_env)) as conn:
        cols = {r[0] for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'course_events'")}
        assert "kind" in cols
        assert "event_type" not in cols
        missing = conn.execute("SELECT count(*) FROM course_events WHERE data ? 'student_uuid' "
                               "AND student_uuid IS DISTINCT FROM (data->>'student_uuid')::uuid").fetchone()[0]
        assert missing == 0
        assert conn.execute("SELECT count(*) FROM course_events WHERE event_uuid IS NOT NULL").fetchone()[0] >= seeded

    # The service still writes and reads after the contract.
    course = str(uuid.uuid4())
    assert http_json(f"{lb_url}/create_course", {"course_uuid": course, "ecosystem_uuid": str(uuid.uuid4())})[0] == 200

    # And nothing rolls the fleet back below what the contract needs.
    below = invoke("rollback", "--env", "lab", "--to", old_version)
    assert below.returncode != 0
    assert "older than the schema of lab allows" in below.stdout + below.stderr
    assert set(fleet.served_versions(lab_env).values()) == {new}
