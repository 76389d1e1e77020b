"""The clone machinery over SSH on the lab's db2: a streaming standby of db1 (the lab's production
database) on a btrfs filesystem inside db2, and a copy-on-write clone of it that holds exactly what db1
held when it was asked for, reached from the controller through an SSH forward of its private socket;
writes to the clone never reach db1; everything is removed at the end (the standby, its slot on db1,
the filesystem's contents), whatever the lab's state before."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from opsbook.engines.clones.btrfs import BtrfsClones, Settings, Source
from opsbook.engines.database import address, admin_conninfo
from opsbook.engines.remote import SshRunner, write_file
from opsbook.engines.snapshots import manifest as manifests
from opsbook.engines.tunnel import SocketForwards
from tests.fixtures.lab import http_json

pytestmark = [pytest.mark.lab, pytest.mark.slow]

BASE = "/var/lib/postgresql/opsbook-refresh-suite"   # on db2's data volume
SLOT = "opsbook_refresh_suite"


@pytest.fixture
def clones(lab_env, serving_fleet):
    """(engine on db2, the source db1): a clean start and a clean end, whatever an earlier run left."""
    # A clone in service mode would admit the app hosts by this file (never started in service mode here).
    settings = Settings(base=BASE, image_gb=4, slot=SLOT, timeout=300, hba_file=f"{BASE}/run/service.hba")
    engine = BtrfsClones(SshRunner(lab_env, "db2"), settings, log=lambda _m: None,
                         sockets=SocketForwards(lab_env, "db2"))
    source = Source(host=address(lab_env), port=int(lab_env.var("bl_api_db_port")),
                    user=str(lab_env.var("opsbook_replication_user")),
                    password=str(lab_env.var("opsbook_replication_password")),
                    dbname=str(lab_env.var("bl_api_db_name")))
    engine.remove_all(source)
    yield engine, source
    engine.remove_all(source)
    with psycopg.connect(admin_conninfo(lab_env), autocommit=True) as conn:
        left = conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (SLOT,)).fetchone()[0]
    assert left == 0


def test_a_clone_of_db1_on_db2_holds_what_db1_held_and_nothing_flows_back(lab_env, lb_url, clones):
    engine, source = clones
    course = str(uuid.uuid4())
    status, _ = http_json(f"{lb_url}/create_course", {"course_uuid": course, "ecosystem_uuid": str(uuid.uuid4())})
    assert status == 200

    done = engine.ensure_standby(source)
    assert done["standby"] == "made (base backup)"
    assert done["filesystem"]["how"] in ("made and mounted", "mounted")
    write_file(engine.r, engine.s.hba_file, "local all all peer\n", user="postgres")

    clone = engine.clone("suite-1", service_port=int(lab_env.var("bl_api_db_port")), source=source)
    assert clone.clone_lsn
    dbname = str(lab_env.var("bl_api_db_name"))
    # db1 is quiet (no probe, no load): the clone's manifest is db1's, row for row.
    expected = manifests.take(admin_conninfo(lab_env))
    actual = manifests.take(engine.conninfo(clone.private_port, dbname), like=expected)
    assert manifests.compare(expected, actual) == []
    with psycopg.connect(engine.conninfo(clone.private_port, dbname), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM courses WHERE course_uuid = %s", (course,)).fetchone()[0] == 1
        conn.execute("CREATE TABLE written_on_the_clone (n int)")            # the clone is its own database
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0] is False
    with psycopg.connect(admin_conninfo(lab_env), autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('written_on_the_clone')").fetchone()[0] is None
    usage = engine.usage("suite-1")
    assert usage["shared_bytes"] > usage["exclusive_bytes"]          # copy-on-write: it shares the standby's blocks

    again = engine.ensure_standby(source)                              # the standby is kept: no second base backup
    assert again["standby"] == "running"
