"""lab-staging, the lab's staging, as an operator uses it: `invoke staging.refresh --from lab --to
lab-staging` makes its database a copy of the lab's (a streaming standby of db1 on stg-db1's btrfs,
snapshotted and promoted; reached over SSH), masked, with lab-staging's own credentials, serving its
app host; a release to lab-staging on it is a real rehearsal, and the rehearsal gate passes for that
artifact (the lab pair standing in for prod and staging) and refuses another."""

from __future__ import annotations

import uuid
from datetime import timedelta

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from opsbook.core.inventory import load
from opsbook.engines import ansible, artifact, fleet, rehearsal
from opsbook.engines.database import admin_conninfo
from opsbook.engines.records.store import store_for
from tests.fixtures.lab import ensure_converged, invoke, write_course

pytestmark = [pytest.mark.lab, pytest.mark.slow]


@pytest.fixture
def staging(lab_env, fleet):
    """lab-staging, its hosts up and converged; the lab serving a release of this code (so its schema is
    the one app/masking.yml decides) and its db1 converged (its replication role)."""
    ensure_converged(lab_env)
    # Events the scaling check's load generator wrote before it kept students, exercises and items apart
    # (one pool of ids for all three): a student id that is also an exercise's survives masking in the
    # exercise's field, and the refresh's leak scan rightly refuses that copy. No real learner shares an
    # id with an exercise; an earlier suite run's lab can hold such events, and they go.
    with psycopg.connect(admin_conninfo(lab_env), autocommit=True) as conn:
        conn.execute("DELETE FROM course_events WHERE data->>'exercise_uuid' IN (SELECT student_uuid::text FROM "
                     "course_events WHERE student_uuid IS NOT NULL) OR data->>'ecosystem_item_uuid' IN (SELECT "
                     "student_uuid::text FROM course_events WHERE student_uuid IS NOT NULL)")
    st = load("lab-staging")
    ensure_converged(st)   # also creates lab-staging's hosts when they are not there
    return st


def _newest(env, runbook: str) -> dict:
    return sorted((e for e in store_for(env).ledger() if e.get("runbook") == runbook), key=lambda e: e["start"])[-1]


def _count(conninfo: str, sql: str, *args) -> int:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        return conn.execute(sql, args).fetchone()[0]


def test_refresh_then_a_release_on_it_is_a_rehearsal_the_gate_accepts(lab_env, lb_url, staging, test_versions):
    st = staging
    student = str(uuid.uuid4())
    course = write_course(lb_url, 1, student=student)

    # A clone host changed since its last provision (here: its stamp moved away) is refused before
    # anything is touched, with the command that converges it; put back, the refresh goes ahead.
    ansible.raw(st, "stg-db1", f"mv {ansible.STAMP} {ansible.STAMP}.away")
    try:
        refused = invoke("staging.refresh", "--from", "lab", "--to", "lab-staging")
    finally:
        ansible.raw(st, "stg-db1", f"mv {ansible.STAMP}.away {ansible.STAMP}")
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0, said[-3000:]
    assert "stg-db1 are not up or not converged" in said, said[-3000:]
    assert "invoke provision --env lab-staging" in said
    assert "Nothing was changed" in said

    with psycopg.connect(admin_conninfo(lab_env)) as conn:   # the courses before the refresh (and its probe)
        known = [str(r[0]) for r in conn.execute("SELECT course_uuid FROM courses")]
    refreshed = invoke("staging.refresh", "--from", "lab", "--to", "lab-staging", timeout=900)
    assert refreshed.returncode == 0, refreshed.stdout[-3000:] + refreshed.stderr[-3000:]
    entry = _newest(st, "staging_refresh")
    assert entry["outcome"] == "succeeded"
    assert entry["figures"]["source"] == "lab"
    # The masking rules are those of the version the lab serves, from its artifact.
    served = set(fleet.served_versions(lab_env).values())
    assert len(served) == 1, served
    assert f"masking rules: those of {served.pop()}, which lab serves" in refreshed.stdout

    # The lab (production here) was under the release probe for the whole refresh, and saw nothing.
    probe = entry["figures"]
    assert probe["source_failed_requests"] == 0, refreshed.stdout[-3000:]
    assert probe["source_lost_writes"] == 0
    assert probe["source_p99_ms_during"] is not None
    assert "lab under the probe during the refresh: " in refreshed.stdout

    lab_db, st_db = admin_conninfo(lab_env), admin_conninfo(st)
    # A copy of the lab as of the refresh, masked: every event of the courses it had (the probe's own went on).
    assert _count(st_db, "SELECT count(*) FROM courses WHERE course_uuid = %s", course) == 1
    in_known = "SELECT count(*) FROM course_events WHERE course_uuid = ANY(%s::uuid[])"
    assert _count(st_db, in_known, known) == _count(lab_db, in_known, known)
    assert _count(lab_db, "SELECT count(*) FROM course_events WHERE student_uuid = %s", student) == 1
    assert _count(st_db, "SELECT count(*) FROM course_events WHERE student_uuid = %s", student) == 0
    assert _count(st_db, "SELECT count(*) FROM course_events WHERE course_uuid = %s AND student_uuid IS NOT NULL",
                  course) == 1
    # lab-staging's own credentials: the lab's admin password does not open it.
    lab_password = str(lab_env.var("opsbook_db_admin_password"))
    assert lab_password != str(st.var("opsbook_db_admin_password"))
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(make_conninfo(**{**conninfo_to_dict(st_db), "password": lab_password})).close()

    # A release to lab-staging on the refreshed database: the rehearsal.
    version = test_versions[0]
    invoke("release", "--env", "lab-staging", "--version", version, check=True)
    assert set(fleet.served_versions(st).values()) == {version}
    release = _newest(st, "release")
    assert release["outcome"] == "succeeded"
    assert "expand migrations" in release["figures"]["phase_seconds"]

    ledger = store_for(st).ledger()
    sha = artifact.find(version).sha256
    ok = rehearsal.decide(target_env="lab", rehearsal_env="lab-staging", version=version, sha256=sha,
                          rehearsal_ledger=ledger, max_age=timedelta(days=7))
    assert ok.ok, ok.missing
    assert ok.refresh == entry["id"]
    assert ok.release == release["id"]
    other = rehearsal.decide(target_env="lab", rehearsal_env="lab-staging", version=test_versions[1], sha256="0" * 64,
                             rehearsal_ledger=ledger, max_age=timedelta(days=7))
    assert not other.ok
    assert other.commands == [f"invoke release --env lab-staging --version {test_versions[1]}"]

    shown = invoke("staging.status", "--from", "lab", "--to", "lab-staging", check=True)
    assert f"{entry['figures'].get('serving') or ''}" in shown.stdout
    assert "serves on port" in shown.stdout
