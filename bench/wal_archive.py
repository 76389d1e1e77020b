"""How fast the lab's database host archives WAL into its repository on another host.

    ./run python bench/wal_archive.py [--segments 60] [--sync-pushes 10]

db1 archives each WAL segment into the pgBackRest repository on db2 over SSH (roles/postgres,
backup_pair.yml), asynchronously (archive-async, two pushing processes). A large migration writes WAL
fast; if archiving falls behind, pg_wal grows on db1. This prints, in one run:

1. the configured path: N segments made as fast as db1 can (a row and `pg_switch_wal()` each, in a
   scratch database), and the seconds until the last of them is archived: segments/s and MB/s of WAL;
2. the baseline, one segment pushed synchronously (`archive-push --archive-async=n`, what each segment
   cost before: an SSH connection of its own), timed over K pushes of a segment already in the
   repository (pgBackRest checks it and answers; nothing is written twice): its segments/s.

Never pass/fail. Touches only the lab (this machine's podman network); the scratch database is dropped
at the end.
"""

from __future__ import annotations

import argparse
import sys
import time

from opsbook.core.inventory import load
from opsbook.engines.remote import SshRunner

SEGMENT_MB = 16
DB = "opsbook_walbench"


def segment_number(walfile: str) -> int:
    """A WAL file name's position: timeline (8 hex), log (8), segment in the log (8; 256 of 16 MB per log)."""
    return int(walfile[8:16], 16) * (0x100000000 // (SEGMENT_MB << 20)) + int(walfile[16:24], 16)


def psql(db1: SshRunner, sql: str, database: str = "postgres") -> str:
    return db1.run(["psql", "-Atq", "-d", database, "-c", sql], user="postgres", timeout=600).out.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--segments", type=int, default=60)
    ap.add_argument("--sync-pushes", type=int, default=10)
    args = ap.parse_args()
    env = load("lab")
    db_host = str(env.var("bl_api_db_host"))
    repo_host = str(env.host_var(db_host, "postgres_backup_repo_host", "") or db_host)
    db1 = SshRunner(env, db_host)
    print(f"lab: {db_host} archives into the repository on {repo_host}")
    psql(db1, f"DROP DATABASE IF EXISTS {DB}")
    psql(db1, f"CREATE DATABASE {DB}")
    try:
        psql(db1, "CREATE TABLE t (x int)", DB)
        t0 = time.monotonic()
        psql(db1, "DO $$ BEGIN FOR i IN 1.." + str(args.segments) + " LOOP INSERT INTO t VALUES (i); "
                  "PERFORM pg_switch_wal(); COMMIT; END LOOP; END $$", DB)
        last = psql(db1, "SELECT pg_walfile_name(pg_current_wal_lsn())")
        made = time.monotonic() - t0
        # the segment in use is not archived until it is switched: wait for the one before it
        want = segment_number(last) - 1
        while True:
            archived, failed = psql(db1, "SELECT coalesce(last_archived_wal, ''), failed_count FROM pg_stat_archiver"
                                    ).split("|")
            if archived and segment_number(archived) >= want:
                break
            if time.monotonic() - t0 > 600:
                print(f"not archived after 600 s (last archived {archived}, failures {failed})")
                return 1
            time.sleep(0.1)
        took = time.monotonic() - t0
        rate = args.segments / took
        print(f"configured (archive-async): {args.segments} segments made in {made:.1f} s, all archived after "
              f"{took:.1f} s: {rate:.1f} segments/s, {rate * SEGMENT_MB:.0f} MB/s of WAL")
        stanza = env.host_var(db_host, "postgres_backup_stanza", "main")
        version = env.host_var(db_host, "postgres_version", 15)
        cluster = env.host_var(db_host, "postgres_cluster", "main")
        path = f"/var/lib/postgresql/{version}/{cluster}/pg_wal/{archived}"
        if db1.run(["test", "-f", path], user="postgres", check=False, timeout=60).code != 0:
            print(f"baseline: skipped ({archived} is no longer in pg_wal to push again)")
            return 0
        t1 = time.monotonic()
        for _ in range(args.sync_pushes):
            db1.run(["pgbackrest", f"--stanza={stanza}", "--archive-async=n", "archive-push", path],
                    user="postgres", timeout=120)
        per = (time.monotonic() - t1) / args.sync_pushes
        print(f"baseline (synchronous, one SSH connection per segment): {per:.2f} s per segment, "
              f"{1 / per:.1f} segments/s, {SEGMENT_MB / per:.0f} MB/s of WAL (the bench's own ssh adds to it)")
        print(f"ratio: {rate * per:.1f}x the synchronous rate")
    finally:
        psql(db1, f"DROP DATABASE IF EXISTS {DB}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
