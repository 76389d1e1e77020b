"""The restore drill end to end on a local cluster that archives into a pgBackRest repository in a
temp dir: backups are listed; an unchanged snapshot's drill passes; a row tampered in the restored
copy, or a source changed between the manifest and the restore target, fails it; a drill that
cannot restore says it did not verify and does not pass."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from opsbook.engines.snapshots import pgbackrest as pgbr
from tests.fixtures.archived_pg import start_archived_cluster
from tests.fixtures.biglearn import apply_app_schema, load_course_events

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
DB = "blapi"


@pytest.fixture(scope="module")
def archived_cluster():
    """A Postgres 15 cluster on 127.0.0.1 whose WAL is archived by pgBackRest into a temp repository,
    with the app's schema and 5,000 events in database `blapi`. Yields (repo, conninfo of blapi)."""
    if not shutil.which("pgbackrest"):
        pytest.fail("pgbackrest is not installed; ./run installs it (apt-get install pgbackrest)")
    repo, admin, stop = start_archived_cluster()
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DB}")
        dsn = admin.replace("dbname=postgres", f"dbname={DB}")
        apply_app_schema(dsn)
        load_course_events(dsn, 5000, courses=5, students=100)
        yield repo, dsn
    finally:
        stop()


@pytest.fixture(scope="module")
def full_snapshot(archived_cluster):
    repo, dsn = archived_cluster
    return pgbr.snapshot(repo, dsn, kind="full", chunk_rows=1000)


def write(dsn, sql):
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql)


def test_backups_are_listed_with_id_time_and_size(archived_cluster, full_snapshot):
    repo, dsn = archived_cluster
    write(dsn, "UPDATE courses SET next_sequence_number = next_sequence_number + 1")
    incr = pgbr.backup(repo, "incr")
    listed = {b.id: b for b in pgbr.list_backups(repo)}
    full = listed[full_snapshot.backup.id]
    assert full.type == "full"
    assert full.size > 1_000_000
    assert full.started <= full.stopped
    assert listed[incr.id].type == "incr"
    assert listed[incr.id].prior == full.id
    assert listed[incr.id].repo_size < full.repo_size


def test_an_unchanged_snapshot_restores_and_passes(archived_cluster, full_snapshot):
    repo, dsn = archived_cluster
    write(dsn, "DELETE FROM course_events WHERE event_uuid IN (SELECT event_uuid FROM course_events LIMIT 10)")
    stored = json.loads(json.dumps(full_snapshot.to_dict()))  # what a record keeps
    result = pgbr.drill(repo, pgbr.Snapshot.from_dict(stored), DB)  # to the point, before this later delete
    assert result.verdict.startswith("passed"), (result.verdict, result.differences, result.problem)
    assert result.passed
    assert result.differences == []
    assert {"restore", "recovery", "usable", "manifest", "amcheck"} <= set(result.seconds)
    assert full_snapshot.manifest["tables"]["public.course_events"]["rows"] >= 5000
    assert full_snapshot.write_pause_ms < 2000


def test_a_snapshot_taken_under_steady_writes_restores_to_exactly_its_manifest(archived_cluster):
    """The point the manifest describes and the point the restore stops at are one instant, even
    while a writer commits events as fast as it can (the reason writes pause while it is marked)."""
    repo, dsn = archived_cluster
    stop = threading.Event()
    written = [0]

    def writer():
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute("INSERT INTO course_events (event_uuid, course_uuid, sequence_number, kind, data, "
                             "student_uuid) SELECT gen_random_uuid(), course_uuid, 200000 + %s, 'record_response', "
                             "'{}', NULL FROM courses ORDER BY course_uuid LIMIT 1", (written[0],))
                written[0] += 1

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        time.sleep(0.5)
        snap = pgbr.snapshot(repo, dsn, kind="incr", chunk_rows=1000)
        time.sleep(0.5)
    finally:
        stop.set()
        t.join()
    assert written[0] > 50
    result = pgbr.drill(repo, snap, DB)
    assert result.passed, (result.verdict, result.differences)


def test_a_long_transaction_makes_marking_the_point_refuse_in_words(archived_cluster):
    _, dsn = archived_cluster
    with psycopg.connect(dsn) as holder:
        holder.execute("LOCK TABLE courses IN ROW EXCLUSIVE MODE")
        with pytest.raises(pgbr.BackupError) as e:
            pgbr.mark_point(dsn, "blocked", lock_timeout_ms=300)
    assert "could not pause writes within 300 ms" in str(e.value)
    assert "retry when the long transaction has ended" in str(e.value)


def test_a_row_tampered_in_the_restored_copy_fails_the_drill(archived_cluster, full_snapshot):
    repo, _ = archived_cluster

    def tamper(scratch):
        write(scratch.db(DB), "UPDATE course_events SET data = data || '{\"is_correct\": \"tampered\"}'::jsonb "
                              "WHERE event_uuid = (SELECT event_uuid FROM course_events ORDER BY 1 LIMIT 1)")

    result = pgbr.drill(repo, full_snapshot, DB, before_verify=tamper)
    assert result.verified
    assert not result.passed
    assert result.verdict.startswith("FAILED")
    assert len(result.differences) == 1
    assert "table public.course_events: rows with event_uuid from the start up to" in result.differences[0]


def test_a_source_changed_after_the_manifest_fails_the_drill(archived_cluster, full_snapshot):
    """The manifest of one point, a restore to a later point after a row changed: they disagree."""
    repo, dsn = archived_cluster
    write(dsn, "UPDATE course_events SET kind = 'tampered' WHERE event_uuid = (SELECT event_uuid "
               "FROM course_events ORDER BY event_uuid DESC LIMIT 1)")
    later = "later-" + uuid.uuid4().hex[:8]
    lsn, _, _ = pgbr.mark_point(dsn, later, chunk_rows=1000)
    pgbr._run(repo, "check")
    moved = pgbr.Snapshot(full_snapshot.backup, later, lsn, 0, full_snapshot.manifest)
    result = pgbr.drill(repo, moved, DB)
    assert result.verified
    assert not result.passed
    assert any("different contents" in d for d in result.differences), result.differences


def test_a_drill_that_cannot_restore_does_not_pass(archived_cluster, full_snapshot):
    repo, _ = archived_cluster
    missing = pgbr.Snapshot(full_snapshot.backup, "no-such-point", "0/0", 0, full_snapshot.manifest)
    bogus = pgbr.Snapshot(pgbr.Backup(**{**full_snapshot.to_dict()["backup"], "id": "20000101-000000F"}),
                          full_snapshot.restore_point, "0/0", 0, full_snapshot.manifest)
    for snap in (bogus, missing):
        result = pgbr.drill(repo, snap, DB)
        assert not result.verified
        assert not result.passed
        assert result.verdict.startswith("NOT VERIFIED"), result.verdict


def test_a_drill_with_no_room_for_its_copy_is_refused_before_anything_is_restored(archived_cluster, full_snapshot):
    """The scratch copy shares its filesystem with the repository (the lab: db2's data volume): a
    restore that filled it would stop the repository taking WAL. On a real 8 MiB filesystem, smaller
    than the backup, pgBackRest never starts (without the check it writes until ENOSPC); on this
    machine's own disk, a reserve larger than what is free refuses the same way."""
    import os
    import subprocess

    repo, _ = archived_cluster
    assert full_snapshot.backup.size > 16 * 1024 * 1024
    if os.geteuid() != 0:
        pytest.fail("mounting the small filesystem needs root, as CI runs")
    small = Path(tempfile.mkdtemp(prefix="opsbook-small-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", str(small)], check=True)
    try:
        result = pgbr.drill(repo, full_snapshot, DB, scratch_parent=str(small))
        assert not result.verified
        assert not result.passed
        assert result.verdict.startswith("NOT VERIFIED: no room for the restored copy"), result.verdict
        assert "Nothing was restored" in result.verdict
        assert result.seconds == {}                      # no restore ran
        assert list(small.iterdir()) == []               # and its scratch directory is gone
        assert shutil.disk_usage(small).used < 1024 * 1024
    finally:
        subprocess.run(["umount", str(small)], check=True)
        small.rmdir()

    free = shutil.disk_usage(tempfile.gettempdir()).free
    result = pgbr.drill(repo, full_snapshot, DB, keep_free=free)
    assert not result.verified
    assert not result.passed
    assert "MiB must stay free there (opsbook_repo_keep_free_mb" in result.verdict, result.verdict
    # With the reserve the disk can spare, the same drill passes.
    result = pgbr.drill(repo, full_snapshot, DB, keep_free=64 * 1024 * 1024)
    assert result.passed, result.verdict


def test_a_corrupted_backup_file_is_not_verified(archived_cluster):
    """A byte flipped in the repository: pgBackRest's restore refuses it, and the drill says it could
    not verify (the GitLab lesson: a backup nobody restored is not a backup)."""
    repo, dsn = archived_cluster
    snap = pgbr.snapshot(repo, dsn, kind="full", chunk_rows=1000)
    files = (repo.config.parent / "repo" / "backup" / repo.stanza / snap.backup.id / "pg_data" / "base").rglob("*")
    biggest = max((p for p in files if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    biggest.write_bytes(bytes(data))
    result = pgbr.drill(repo, snap, DB)
    assert not result.verified
    assert not result.passed
    assert "pgbackrest restore failed" in result.verdict
    assert result.verdict.endswith("The drill did not pass.")


def test_an_index_that_disagrees_with_its_table_fails_pg_amcheck(archived_cluster, full_snapshot):
    """An expression index over a function declared IMMUTABLE whose result then changes: the index no
    longer finds the table's rows, which pg_amcheck --heapallindexed reports."""
    repo, _ = archived_cluster

    def break_an_index(scratch):
        with psycopg.connect(scratch.db(DB), autocommit=True) as conn:
            conn.execute("CREATE FUNCTION flip(int) RETURNS int IMMUTABLE LANGUAGE sql AS 'SELECT $1'")
            conn.execute("CREATE INDEX courses_flip ON courses (flip(next_sequence_number))")
            conn.execute("CREATE OR REPLACE FUNCTION flip(int) RETURNS int IMMUTABLE LANGUAGE sql "
                         "AS 'SELECT -$1 - 1'")

    result = pgbr.drill(repo, full_snapshot, DB, before_verify=break_an_index)
    assert result.verified
    assert not result.passed
    assert "courses_flip" in result.amcheck, result.amcheck


def test_retention_keeps_a_backup_while_a_drill_restores_it(archived_cluster):
    """Deleting a backup while a drill restores it made the drill end NOT VERIFIED on missing files (seen
    on the lab: a snapshot's retention during a drill of the oldest). The drill's scratch directory names
    the backup it restores; retention keeps a backup whose drill still runs, and deletes it once it ended."""
    from opsbook.engines.snapshots import base

    repo, dsn = archived_cluster
    snap = pgbr.snapshot(repo, dsn, kind="full", chunk_rows=1000)   # its own (the repository keeps few fulls)
    parent = Path(tempfile.mkdtemp(prefix="opsbook-drills-"))   # in /tmp: the cluster's user can reach it
    parent.chmod(0o777)
    snaps = [base.Snapshot(id=sid, kind="pgbackrest", source="main", status="available", created=created,
                           size_gb=None, engine=None, engine_version=None, ours=True)
             for sid, created in ((snap.backup.id, snap.backup.started), ("newer", "2999-01-01T00:00:00+00:00"))]
    seen = {}

    def during(_scratch):
        seen["in_use"] = pgbr.drills_in_progress(repo, str(parent))
        seen["retention"] = base.retention(snaps, keep=1, max_age=None, in_use=seen["in_use"])

    try:
        result = pgbr.drill(repo, snap, DB, scratch_parent=str(parent), before_verify=during)
        left = list(parent.iterdir())
        after = pgbr.drills_in_progress(repo, str(parent))
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    assert result.passed, result.verdict
    assert left == []
    assert list(seen["in_use"]) == [snap.backup.id]
    assert seen["in_use"][snap.backup.id].startswith("being drilled now (into ")
    assert seen["retention"].delete == []
    assert seen["retention"].keep[snap.backup.id].startswith("being drilled now")
    # The drill is over (its directory removed): nothing is in use, and retention deletes the older one.
    assert after == {}
    assert [s.id for s in base.retention(snaps, keep=1, max_age=None, in_use={}).delete] == [snap.backup.id]
