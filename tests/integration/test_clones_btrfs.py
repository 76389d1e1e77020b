"""The btrfs clone engine on this machine: a real source cluster (scram over TCP), a streaming standby
on a loop-mounted btrfs image, clones made by snapshot and promotion.

A clone matches the source at its point (manifest compared), is writable, and its writes do not
reach the source; a clone made while the source commits as fast as it can holds a prefix of those
commits and pg_amcheck finds nothing; a larger source clones as correctly (timings: the bench); the
switch serves a clone on the service port and gives the previous one back when the new one does not
start; pruning never deletes the serving clone; bad input (no btrfs tools, an unreachable source, a
slot another standby uses) is refused before anything is made."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import pytest

from opsbook.engines.clones.btrfs import CloneError, Settings, Source
from opsbook.engines.clones.runner import LocalRunner, write_file
from opsbook.engines.snapshots import manifest
from opsbook.engines.snapshots import pgbackrest as pgbr
from tests.fixtures.biglearn import apply_app_schema, load_course_events
from tests.fixtures.clones import clone_host, start_source
from tests.fixtures.postgres import PG_BIN, _as_postgres, _free_port

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
DB = "bl_api"


@pytest.fixture(scope="module")
def src():
    if not shutil.which("mkfs.btrfs"):
        pytest.fail("btrfs-progs is not installed; ./run installs it (apt-get install btrfs-progs)")
    c = start_source(DB)
    try:
        apply_app_schema(c.socket(DB))
        load_course_events(c.socket(DB), 5000, courses=5, students=100)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def workdir():
    d = Path(tempfile.mkdtemp(prefix="opsbook-clones-test-"))
    d.chmod(0o755)   # the postgres OS user works below it
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def host(src, workdir):
    """The clone engine with its standby of `src` streaming; torn down (clusters, mount, slot) after."""
    engine = clone_host(workdir / "clones")
    try:
        done = engine.ensure_standby(src.source())
        assert done["standby"] == "made (base backup)"
        yield engine
    finally:
        engine.remove_all(src.source())


def private(host, clone, dbname=DB) -> str:
    return host.conninfo(clone.private_port, dbname)


def count(dsn: str, sql: str = "SELECT count(*) FROM course_events") -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql).fetchone()[0]


def test_a_clone_matches_the_source_at_its_point_is_writable_and_does_not_reach_the_source(src, host):
    before = manifest.take(src.socket(DB), chunk_rows=1000)
    clone = host.clone("c-match", service_port=_free_port(), source=src.source())
    try:
        got = manifest.take(private(host, clone), chunk_rows=1000, like=before)
        assert manifest.compare(before, got) == []
        assert clone.clone_lsn
        assert clone.caught_up_to
        assert {"catch_up", "restartpoint", "snapshot", "start", "promote", "usable"} <= set(clone.seconds)

        with psycopg.connect(private(host, clone), autocommit=True) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0] is False
            settings = dict(conn.execute("SELECT name, setting FROM pg_settings WHERE name IN ('archive_mode', "
                                         "'primary_conninfo', 'primary_slot_name', 'listen_addresses', "
                                         "'full_page_writes', 'wal_recycle')").fetchall())
            assert settings == {"archive_mode": "off", "primary_conninfo": "", "primary_slot_name": "",
                                "listen_addresses": "",        # private mode: no TCP listener at all
                                "full_page_writes": "off",     # disposable while private
                                "wal_recycle": "off"}
            # its own timeline: WAL it writes can never be taken for the source's
            assert conn.execute("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)").fetchone()[0] \
                == "00000002"
            conn.execute("INSERT INTO courses (course_uuid, ecosystem_uuid) VALUES (gen_random_uuid(), "
                         "gen_random_uuid())")
            conn.execute("DELETE FROM course_events WHERE sequence_number < 10")
        assert count(private(host, clone)) < 5000
        # The source did not see the clone's writes, and its only slot is the standby's, streaming.
        assert manifest.compare(before, manifest.take(src.socket(DB), chunk_rows=1000, like=before)) == []
        with psycopg.connect(src.socket(), autocommit=True) as conn:
            slots = conn.execute("SELECT slot_name, active FROM pg_replication_slots").fetchall()
            clients = conn.execute("SELECT application_name FROM pg_stat_replication").fetchall()
        assert slots == [("opsbook_refresh", True)]
        assert clients == [("opsbook_refresh",)]
    finally:
        host.discard(clone.name)
    assert clone.name not in host.names()


def test_a_clone_made_while_the_source_commits_holds_a_prefix_of_its_commits(src, host):
    """Each writer transaction adds ledger row n and sets the counter to n: a consistent copy holds
    rows 1..k with no gap and the counter at k, whatever instant it was taken at."""
    with psycopg.connect(src.socket(DB), autocommit=True) as conn:
        conn.execute("CREATE TABLE ledger (n bigint PRIMARY KEY, at timestamptz DEFAULT now())")
        conn.execute("CREATE TABLE counter (id int PRIMARY KEY, n bigint NOT NULL)")
        conn.execute("INSERT INTO counter VALUES (1, 0)")
    stop = threading.Event()
    written = [0]

    def writer():
        with psycopg.connect(src.socket(DB)) as conn:
            while not stop.is_set():
                n = written[0] + 1
                conn.execute("INSERT INTO ledger (n) VALUES (%s)", (n,))
                conn.execute("UPDATE counter SET n = %s WHERE id = 1", (n,))
                conn.commit()
                written[0] = n

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        time.sleep(1.0)
        asked = written[0]
        clone = host.clone("c-writes", service_port=_free_port(), source=src.source())
        time.sleep(0.5)
    finally:
        stop.set()
        t.join()
    try:
        dsn = private(host, clone)
        k = count(dsn, "SELECT n FROM counter")
        assert k > 50
        assert count(dsn, "SELECT count(*) FROM ledger") == k
        assert count(dsn, "SELECT max(n) FROM ledger") == k
        assert k >= asked                 # caught up with what the source had committed when asked
        assert written[0] > k             # and the source went on without it
        scratch = pgbr.Scratch(Path(host.run_dir), Path(clone.data), clone.private_port, tuple(pgbr.local_run_as()))
        clean, said = pgbr.amcheck(scratch, DB)
        assert clean, said
    finally:
        host.discard(clone.name)


def test_a_larger_source_clones_as_correctly(src, host):
    load_course_events(src.socket(DB), 60_000, courses=5, students=100)
    before = manifest.take(src.socket(DB), chunk_rows=10_000)
    clone = host.clone("c-larger", service_port=_free_port(), source=src.source())
    try:
        assert manifest.compare(before, manifest.take(private(host, clone), chunk_rows=10_000, like=before)) == []
        assert host.usage(clone.name)["total_bytes"] > 20_000_000
    finally:
        host.discard(clone.name)


def test_the_switch_serves_a_clone_and_gives_the_previous_back_when_the_new_one_fails(src, host):
    port = _free_port()
    first = host.clone("20260101-000001-a", service_port=port, source=src.source())
    second = third = None
    try:
        host.finished(first.name)
        assert host.switch(first.name) is None
        assert host.current() == first.name
        with psycopg.connect(f"host=127.0.0.1 port={port} user=bl_api password=source-app-password dbname={DB}",
                             autocommit=True) as conn:
            conn.execute("INSERT INTO courses (course_uuid, ecosystem_uuid) VALUES "
                         "('00000000-0000-0000-0000-00000000aaaa', gen_random_uuid())")

        second = host.clone("20260101-000002-b", service_port=port, source=src.source())
        # A real fault: the new clone's configuration makes it fail to start in service mode.
        auto = f"{second.data}/postgresql.auto.conf"
        write_file(LocalRunner(), auto, Path(auto).read_text() + "shared_buffers = 'not a size'\n", user="postgres")
        with pytest.raises(CloneError, match=r"(?s)did not take over the service.*previous clone 20260101-000001-a was "
                                             r"started again"):
            host.switch(second.name)
        assert host.current() == first.name
        tcp = f"host=127.0.0.1 port={port} user=postgres password=source-admin-password dbname={DB}"
        assert count(tcp, "SELECT setting FROM pg_settings WHERE name = 'full_page_writes'") == "on"  # serving
        assert count(tcp, "SELECT count(*) FROM courses WHERE course_uuid = "
                          "'00000000-0000-0000-0000-00000000aaaa'") == 1   # the previous database, as it was

        third = host.clone("20260101-000003-c", service_port=port, source=src.source())
        host.finished(third.name)
        assert host.switch(third.name) == first.name
        assert host.current() == third.name
        assert not host.running(first.name)
        assert count(tcp, "SELECT count(*) FROM courses WHERE course_uuid = "
                          "'00000000-0000-0000-0000-00000000aaaa'") == 0   # the new one: the source's data
        gone = host.prune(keep=1)
        assert set(gone) == {first.name, second.name}
        assert host.names() == [third.name]
        assert host.running(third.name)
        assert host.unfinished() == []        # every clone's mark went with it or with the clone serving
    finally:
        for c in (first, second, third):
            if c is not None and c.name in host.names():
                host.discard(c.name)


# --- bad input: refused before anything is made --------------------------------------------------
def test_a_host_without_btrfs_tools_is_refused_before_anything(src, workdir):
    base = workdir / "no-btrfs"
    engine = clone_host(base)
    engine.r = LocalRunner(path=str(workdir / "empty-bin"))   # a real host whose PATH has no btrfs-progs
    with pytest.raises(CloneError, match=r"lacks mkfs\.btrfs, btrfs.*btrfs-progs.*Nothing was changed"):
        engine.ensure_standby(src.source())
    assert not base.exists()


def test_an_unreachable_source_is_refused_before_anything(workdir):
    base = workdir / "no-source"
    engine = clone_host(base)
    with pytest.raises(CloneError, match=r"127\.0\.0\.1:\d+ \(as postgres\) is not reachable.*Nothing was changed"):
        engine.ensure_standby(Source("127.0.0.1", _free_port(), "postgres", "x"))
    assert not base.exists()


def test_a_slot_another_standby_streams_from_is_refused_and_left_alone(src, host, workdir):
    # Another clone host configured with the same slot as the running standby.
    base = workdir / "second-host"
    other = clone_host(base)
    with pytest.raises(CloneError, match=r"slot opsbook_refresh .* is in use by another standby.*Nothing was changed"):
        other.ensure_standby(src.source())
    assert not base.exists()
    assert host.standby_running()

    # A slot held by a real WAL receiver (pg_receivewal), not by any opsbook standby.
    with psycopg.connect(src.socket(), autocommit=True) as conn:
        conn.execute("SELECT pg_create_physical_replication_slot('held_elsewhere')")
    wal = workdir / "receivewal"
    wal.mkdir()
    shutil.chown(wal, "postgres", "postgres")
    receiver = subprocess.Popen(_as_postgres([str(PG_BIN / "pg_receivewal"), "-D", str(wal), "-S", "held_elsewhere",
                                              "-d", src.socket()]), stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while count(src.socket(), "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'held_elsewhere' "
                                  "AND active") != 1:
            assert time.monotonic() < deadline, "pg_receivewal did not take its slot"
            time.sleep(0.2)
        engine = clone_host(workdir / "third-host", slot="held_elsewhere")
        with pytest.raises(CloneError, match=r"in use by another standby \(walsender pid \d+, client pg_receivewal"):
            engine.ensure_standby(src.source())
        assert not (workdir / "third-host").exists()
        assert count(src.socket(), "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'held_elsewhere' "
                                   "AND active") == 1
    finally:
        receiver.terminate()
        receiver.wait(10)
        time.sleep(0.5)
        with psycopg.connect(src.socket(), autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot('held_elsewhere')")


def test_settings_refuse_a_bad_slot_or_base():
    with pytest.raises(CloneError, match="lower-case letters"):
        Settings(base="/var/lib/x", slot="Bad-Slot")
    with pytest.raises(CloneError, match="absolute path"):
        Settings(base="relative/dir")
