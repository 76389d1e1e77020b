"""The service comes back within seconds of its database, not a minute later.

psycopg_pool retries a failed connection with a doubling delay (1, 2, 4, 8, 16 s ...) until its
reconnect_timeout; with the library's default (5 minutes) a database back after a 20 s outage is
only tried again ~31 s in. bl-api ends each chain of tries after BL_API_POOL_RECONNECT_TIMEOUT
and lets the next request start a new one. Checked on a private, real Postgres cluster that the
test stops and starts (the session's shared one stays up for the other tests)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.fixtures.postgres import PG_BIN, _as_postgres, _free_port

OUTAGE_S = 20


class Cluster:
    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="opsbook-pg-outage-"))
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres", "postgres")
        self.port = _free_port()
        subprocess.run(_as_postgres([str(PG_BIN / "initdb"), "-D", str(self.base / "data"), "-U", "postgres",
                                     "-A", "trust"]), check=True, capture_output=True)
        self.conninfo = f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres connect_timeout=2"

    def pg_ctl(self, *args: str) -> None:
        opts = f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.base} -c fsync=off"
        subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.base / "data"), "-o", opts,
                                     "-l", str(self.base / "log"), "-w", *args]), check=True, capture_output=True)


@pytest.fixture
def cluster():
    if not (PG_BIN / "initdb").exists():
        pytest.fail("postgresql-15 is not installed; ./run installs it (apt-get install postgresql-15)")
    c = Cluster()
    c.pg_ctl("start")
    try:
        yield c
    finally:
        subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(c.base / "data"), "-m", "immediate", "stop"]),
                       check=False, capture_output=True)
        shutil.rmtree(c.base, ignore_errors=True)


def _seconds_back_after_outage(cluster: Cluster, **db_kwargs) -> float:
    """Ping as haproxy does (every half second) through a 20 s outage; how long after the database
    is back until a ping succeeds."""
    from bl_api.db import Database

    db = Database(cluster.conninfo, max_size=2, timeout=1.0, **db_kwargs)
    try:
        db.ping(timeout=5)
        cluster.pg_ctl("-m", "immediate", "stop")
        end = time.monotonic() + OUTAGE_S
        while time.monotonic() < end:
            with contextlib.suppress(Exception):   # the outage: every ping fails, as it should
                db.ping(timeout=0.5)
            time.sleep(0.5)
        cluster.pg_ctl("start")
        back = time.monotonic()
        while time.monotonic() - back < 60:
            try:
                db.ping(timeout=0.5)
                return time.monotonic() - back
            except Exception:  # noqa: BLE001 - not back yet
                time.sleep(0.2)
        return float("inf")
    finally:
        db.close(timeout=1)


def test_after_a_database_outage_the_service_answers_again_within_seconds(cluster):
    seconds = _seconds_back_after_outage(cluster)   # the service's default reconnect timeout
    assert seconds < 6, f"the first successful ping came {seconds:.1f}s after the database was back"
