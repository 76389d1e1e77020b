"""Snapshots of the lab's database (db1) with pgBackRest, its repository on db2, over SSH, through the
invoke tasks: a snapshot with its restore point and manifest, kept on db2 and not on db1, listed with
the record that took it; a drill that restores it in a scratch cluster on db2, compares and passes
(also with db1's database stopped); the same drill with one row tampered
in the restored copy fails; an unknown snapshot is refused with the list; retention keeps the
inventory's count; the scratch cluster is gone afterwards whatever the verdict."""

from __future__ import annotations

import json
import signal

import psycopg
import pytest

from opsbook.engines.database import admin_conninfo
from opsbook.engines.records.store import store_for
from opsbook.engines.snapshots import pgbackrest as pgbr
from opsbook.engines.snapshots.lab import ANNOTATION_ENV, ANNOTATION_RECORD, LabSnapshots
from opsbook.operations.snapshot import protected_snapshots
from tests.fixtures.lab import invoke, ssh, start_invoke, write_course

pytestmark = [pytest.mark.lab, pytest.mark.slow]


@pytest.fixture
def backed_up(lab_env, serving_fleet, lb_url):
    """db1 archives its WAL into a pgBackRest stanza on db2, and the service database holds rows (written
    through the service), whatever the lab's state (a fresh lab has never been released to; an older
    checkout's db1 did not archive, or kept its repository itself)."""
    write_course(lb_url, 50)
    with psycopg.connect(admin_conninfo(lab_env), autocommit=True) as conn:
        archiving = conn.execute("SHOW archive_mode").fetchone()[0] == "on"
    stanza = ssh("db2", "test -f /var/lib/postgresql/pgbackrest/backup/main/backup.info && echo yes || echo no")
    remote = ssh("db1", "grep -qx 'repo1-host=.*' /etc/pgbackrest.conf && echo yes || echo no")
    if not archiving or stanza != "yes" or remote != "yes":
        invoke("provision", "--env", "lab", "--hosts", "db1,db2", check=True)
    return lab_env


def newest(env, runbook: str) -> dict:
    return sorted((e for e in store_for(env).ledger() if e.get("runbook") == runbook), key=lambda e: e["start"])[-1]


def scratch_dirs() -> set[str]:
    return set(ssh("db2", "ls -d /var/lib/postgresql/opsbook-drill-* 2>/dev/null || true").split())


def test_snapshot_list_drill_tamper_and_retention_off_db1(backed_up):
    env = backed_up
    path = LabSnapshots(env)
    earlier = scratch_dirs()
    # What a snapshot stopped during its backup leaves (interrupted or killed; pgBackRest finishes the
    # backup on db2): a backup carrying opsbook's annotation and no metadata. It is listed as opsbook's,
    # incomplete, with the record that started it, and the next snapshot deletes it once it has its own.
    left = pgbr.backup(path.repo, "full", annotations={ANNOTATION_ENV: "lab", ANNOTATION_RECORD: "20260101T000000Z-x"})
    listed = {s.id: s for s in path.list()}
    assert listed[left.id].ours
    assert listed[left.id].status == "incomplete"
    assert listed[left.id].record_id == "20260101T000000Z-x"
    before = {s.id for s in path.list() if s.ours and s.status == "available"}

    taken = invoke("snapshot", "--env", "lab", "--reason", "suite: lab snapshot path", check=True)
    assert f"deleting backup {left.id}, left incomplete by a snapshot that was stopped" in taken.stdout
    assert left.id not in {s.id for s in path.list()}
    entry = newest(env, "snapshot")
    assert entry["outcome"] == "succeeded", entry.get("error")
    sid = entry["figures"]["snapshot"]
    assert sid in taken.stdout
    assert entry["figures"]["manifest"].startswith("manifest of bl_api at restore point")   # not "none: ..."
    ours = [s for s in path.list() if s.ours]
    assert ours[0].id == sid
    assert ours[0].status == "available"
    assert ours[0].record_id == entry["id"]
    assert ours[0].reason == "suite: lab snapshot path"
    # The backup and opsbook's metadata are on the repository host, not on the database host.
    assert ssh("db2", f"test -d /var/lib/postgresql/pgbackrest/backup/main/{sid} && "
                      f"test -f /var/lib/postgresql/pgbackrest/opsbook/{sid}.json && echo yes") == "yes"
    assert ssh("db1", f"ls -d /var/lib/postgresql/pgbackrest/backup/main/{sid} 2>/dev/null || echo none") == "none"

    # Retention: the inventory keeps 3 of opsbook's own; what went is exactly what the record says it deleted.
    # A release's safety point is kept beside them while its record is among the newest (an earlier
    # release with opsbook_release_snapshot: required can have left some).
    keep = int(env.var("opsbook_snapshot_keep"))
    protected = protected_snapshots(env)
    assert len([s for s in ours if s.id not in protected]) <= keep
    deleted = set(entry["figures"]["deleted"])
    assert (before | {sid}) - {s.id for s in ours} == deleted
    assert len(before) + 1 <= keep or deleted

    listed = invoke("snapshot.list", "--env", "lab", check=True)
    assert sid in listed.stdout
    assert f"record {entry['id']}" in listed.stdout

    drilled = invoke("snapshot.drill", "--env", "lab", "--snapshot", sid)
    assert drilled.returncode == 0, drilled.stdout[-3000:] + drilled.stderr[-3000:]
    drill = newest(env, "restore_drill")
    assert drill["outcome"] == "succeeded"
    assert drill["figures"]["passed"] is True
    assert drill["figures"]["snapshot"] == sid
    assert drill["figures"]["differences"] == 0
    assert drill["figures"]["usable_s"] > 0
    assert scratch_dirs() <= earlier   # its own is gone (a drill stopped minutes ago can have left one)

    # One row deleted from the restored copy (never from db1): the drill finds it and fails.
    tampered: list[str] = []

    def tamper(scratch) -> None:
        with psycopg.connect(scratch.db("bl_api"), autocommit=True) as conn:
            conn.execute("SET session_replication_role = replica")   # no foreign key stops the tampering
            tables = [r[0] for r in conn.execute("SELECT format('%I.%I', schemaname, relname) FROM pg_stat_user_tables "
                                                 "ORDER BY relname").fetchall()]
            # the restored copy's statistics are reset by recovery: find a row by looking
            table = next(t for t in tables if conn.execute(
                f"DELETE FROM {t} WHERE ctid = (SELECT ctid FROM {t} LIMIT 1)").rowcount == 1)
            tampered.append(table)

    verdict = path.drill(sid, log=lambda _m: None, before_verify=tamper)
    assert verdict.verified
    assert not verdict.passed
    assert verdict.verdict.startswith("FAILED: ")
    assert f"table {tampered[0]}: " in verdict.problem
    assert "rows expected" in verdict.problem
    assert scratch_dirs() <= earlier   # its own is gone (a drill stopped minutes ago can have left one)
    with psycopg.connect(admin_conninfo(env), autocommit=True) as conn:   # db1 itself untouched: it drills clean
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0] is False

    unknown = invoke("snapshot.drill", "--env", "lab", "--snapshot", "20200101-000000F")
    assert unknown.returncode == 1
    assert "no snapshot '20200101-000000F' of lab" in unknown.stderr
    assert sid in unknown.stderr
    assert "Nothing was done" in unknown.stderr


def test_a_release_that_requires_a_safety_point_takes_one_on_db1_or_uses_a_recent_one(backed_up, monkeypatch):
    """The lab releases with opsbook_release_snapshot off (fast releases); where the inventory says
    required (prod's does), the release's safety-point step (what a release runs under its lock
    before its expand migrations) takes a pgBackRest backup of db1, tagged with the release's record,
    which names it; with db1's database stopped it cannot take one (a drill of it on db2 still passes:
    the repository is off db1), and a snapshot younger than
    opsbook_release_snapshot_max_age stands in; with none that young, the release is refused."""
    from opsbook.core.errors import OpsbookError
    from opsbook.engines.records.store import new_record_id
    from opsbook.engines.snapshots import safety
    from opsbook.operations.release import record, steps
    from opsbook.operations.release.plan import RELEASE_PHASES, Plan

    env = backed_up
    vars_ = {"opsbook_release_snapshot": "required", "opsbook_release_snapshot_max_age": "1h"}
    real = env.var
    monkeypatch.setattr(env, "var", lambda name, default=...: vars_[name] if name in vars_ else real(name, default))
    plan = Plan(env=env.name, kind="release", target="9.9.9", artifact_file="f", artifact_sha256="0" * 64,
                current={}, batches=[], drain_timeout=30, migrations_pending=["0099_example"],
                phases=list(RELEASE_PHASES))
    run = steps.Run(plan=plan, record_id=new_record_id("release"), guardrails={})
    steps._safety_point(env, run)
    assert run.guardrails["snapshot"]["action"] == safety.TAKE
    sid = run.guardrails["snapshot"]["id"]
    snap = next(s for s in LabSnapshots(env).list() if s.id == sid)
    assert snap.status == "available"
    assert snap.record_id == run.record_id
    assert snap.reason == "safety point of release 9.9.9"
    run.outcome = "succeeded"
    assert record.key_figures(run.data())["snapshot"] == sid

    ssh("db1", "systemctl stop 'postgresql@*' postgresql")   # the cluster's own unit: waited for until stopped
    try:
        # The repository is off db1: its snapshot restores and verifies on db2 without db1's database.
        drilled = invoke("snapshot.drill", "--env", "lab", "--snapshot", sid)
        assert drilled.returncode == 0, drilled.stdout[-3000:] + drilled.stderr[-3000:]
        assert "on db2, off db1" in drilled.stdout
        assert newest(env, "restore_drill")["figures"]["passed"] is True
        used = safety.decide_for(env, ["0099_example"])
        assert used.action == safety.USE, used.why
        assert used.snapshot["id"] == sid
        assert "the database on db1 does not answer" in used.why
        vars_["opsbook_release_snapshot_max_age"] = ""   # no age set: none may stand in
        refused = safety.decide_for(env, ["0099_example"])
        assert refused.action == safety.REFUSE
        assert "invoke snapshot --env lab" in refused.why
        run = steps.Run(plan=plan, record_id=new_record_id("release"), guardrails={})
        with pytest.raises(OpsbookError, match=r"safety point: .*Nothing was changed"):
            steps._safety_point(env, run)
        # Nor does `invoke snapshot` begin a backup that could only fail: refused before its lock.
        records = len(store_for(env).ledger())
        taken = invoke("snapshot", "--env", "lab")
        assert taken.returncode == 1, taken.stdout + taken.stderr
        assert ("error: no snapshot of lab can be taken now: the database on db1 does not answer"
                in taken.stdout + taken.stderr), taken.stdout + taken.stderr
        assert "Nothing was changed and no record was written" in taken.stdout + taken.stderr
        assert len(store_for(env).ledger()) == records
        assert "free" in invoke("lock", "--env", "lab", check=True).stdout
    finally:
        ssh("db1", "systemctl start postgresql")


def test_a_repository_host_not_converged_is_refused_before_anything(backed_up):
    """db2 recreated and not converged since keeps Debian's own pgbackrest.conf, whose `info` answers for a
    repository that does not exist: `invoke snapshot` is refused before its lock, naming the converge, with
    no record (before, the backup began and failed under the lock: "backup command requires option:
    pg1-path"). Simulated by moving db2's configuration aside and putting back Debian's."""
    env = backed_up
    records = len(store_for(env).ledger())
    ssh("db2", "mv /etc/pgbackrest.conf /etc/pgbackrest.conf.suite && "
               "printf '[global]\\nrepo1-path=/var/lib/pgbackrest\\n' > /etc/pgbackrest.conf && "
               "chown root:postgres /etc/pgbackrest.conf && chmod 0640 /etc/pgbackrest.conf")
    try:
        taken = invoke("snapshot", "--env", "lab", "--reason", "suite: db2 not converged")
        out = taken.stdout + taken.stderr
        assert taken.returncode == 1, out
        assert "pgBackRest on db2 has no usable stanza main for db1 (missing stanza path)" in out, out
        assert "`invoke provision --env lab --hosts db1,db2`" in out, out
        assert "Nothing was changed and no record was written" in out, out
        assert len(store_for(env).ledger()) == records
        assert "free" in invoke("lock", "--env", "lab", check=True).stdout
    finally:
        ssh("db2", "mv /etc/pgbackrest.conf.suite /etc/pgbackrest.conf")


def test_the_host_checks_pass_a_repository_that_holds_no_backup_yet(backed_up):
    """A new lab (db2's volume new, no `invoke snapshot` yet) keeps a stanza with no backup in it, which
    pgBackRest reports as "no valid backups" (status 2). The host checks, which a release runs in its
    preflight, must pass it: they failed there, so the README's first command failed on a new machine.
    Made as a second stanza of db1's cluster in db2's repository, named only in a copy of db2's
    configuration (db1 keeps archiving into main); both are put back."""
    stanza, repo = "opsbook-suite-new", "/var/lib/postgresql/pgbackrest"
    ssh("db2", "cp -p /etc/pgbackrest.conf /etc/pgbackrest.conf.suite && "
               f"sed -i 's/^\\[main\\]$/[{stanza}]/' /etc/pgbackrest.conf")
    try:
        ssh("db2", f"runuser -u postgres -- pgbackrest --stanza={stanza} stanza-create")
        info = json.loads(ssh("db2", "runuser -u postgres -- pgbackrest --output=json info"))
        assert {s["name"]: s["status"]["code"] for s in info}[stanza] == 2, info   # main is there too
        checked = invoke("check", "--env", "lab")
        assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-2000:]
    finally:
        ssh("db2", f"mv /etc/pgbackrest.conf.suite /etc/pgbackrest.conf && rm -rf {repo}/archive/{stanza} "
                   f"{repo}/backup/{stanza}")
    after = json.loads(ssh("db2", "runuser -u postgres -- pgbackrest --output=json info"))
    assert [s["name"] for s in after] == ["main"]


def test_no_room_on_the_repository_host_refuses_a_snapshot_and_a_drill_before_they_write(backed_up, monkeypatch):
    """db2's volume keeps the repository and takes a drill's restored copy; pgBackRest checks no space and
    writes until the disk is full, which would also stop it taking db1's WAL. With a reserve of everything
    db2 has free (the inventory's opsbook_repo_keep_free_mb, set here on the engine: changing the lab's
    inventory would make every host need a converge), both are refused before anything is written; the
    free space, the database's size and the backups are read from the lab itself."""
    env = backed_up
    snaps = LabSnapshots(env)
    if not [s for s in snaps.list() if s.ours and s.status == "available"]:
        invoke("snapshot", "--env", "lab", "--reason", "suite: a snapshot to drill", check=True)
    backups = [b.id for b in pgbr.list_backups(snaps.repo)]
    earlier = scratch_dirs()
    free = int(ssh("db2", "df -B1 --output=avail /var/lib/postgresql/pgbackrest | tail -1"))
    monkeypatch.setattr(LabSnapshots, "_keep_free", lambda self: free)
    can, why = snaps.can_take()
    assert not can
    assert why.startswith("no room for a full backup in the repository on db2: the cluster on db1 holds"), why
    assert "compresses like its last full backup" in why, why
    verdict = snaps.drill(log=lambda _m: None)
    assert not verdict.verified
    assert not verdict.passed
    assert verdict.problem.startswith("no room for the restored copy on db2"), verdict.problem
    assert "Nothing was restored" in verdict.problem
    assert scratch_dirs() == earlier
    assert [b.id for b in pgbr.list_backups(snaps.repo)] == backups
    monkeypatch.undo()
    assert snaps.can_take() == (True, "")


def test_a_drill_stopped_while_it_restores_leaves_nothing_on_db2(backed_up):
    """SIGTERM while pgBackRest restores into the scratch cluster: the restore goes on on db2 when its ssh
    client dies, so the drill stops it before it removes the directory; the task says what it left, the
    record says the drill did not pass. A scratch directory that lost its owner file (a drill stopped
    while making or removing it) is removed by the next drill once it is old enough to be no live drill's."""
    env = backed_up
    if not [s for s in LabSnapshots(env).list() if s.ours and s.status == "available"]:
        invoke("snapshot", "--env", "lab", "--reason", "suite: a snapshot to drill", check=True)
    orphan = "/var/lib/postgresql/opsbook-drill-suiteOrphan"
    ssh("db2", f"install -d -o postgres -g postgres -m 0700 {orphan}/data && touch -d '20 minutes ago' {orphan}")
    earlier = scratch_dirs()
    proc = start_invoke("snapshot.drill", "--env", "lab", PYTHONUNBUFFERED="1")
    seen: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if "lab: restoring " in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=300)
    out = "".join(seen) + rest
    assert proc.returncode == 130, out[-3000:]
    assert "restore drill of lab interrupted by SIGTERM: it did not pass" in out, out[-3000:]
    assert f"removed {orphan} on db2" in out
    assert scratch_dirs() <= earlier - {orphan}, out[-3000:]
    assert ssh("db2", "pgrep -af 'pgbackres[t].* restore' || true") == ""
    drill = newest(env, "restore_drill")
    assert drill["figures"]["passed"] is False
    assert drill["outcome"] == "interrupted", drill.get("error")
