"""`staging.refresh` end to end on this machine: a source environment (`srcprod`) whose database is a
real local cluster with the app's schema, and a target (`srcstage`) whose clone host is this machine
(ansible_connection local, btrfs on a loop-mounted image). Both are inventories written for the run,
found through OPSBOOK_INVENTORY_PATH, with their own record stores and file locks; neither has app
hosts, so no lab host is touched.

Refusals change nothing and leave no record; a refresh makes the target serve a masked copy with its
own credentials and records it; a refresh that fails half-way (a masking rule that fails on the real
database) leaves the previous database serving; the record is what the rehearsal gate accepts; an
AWS refresh is refused as not built before anything is made in moto."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import psycopg
import pytest
import yaml

from opsbook.core.inventory import INVENTORY_PATH_VARIABLE, Env
from opsbook.core.paths import APP
from opsbook.engines import artifact, interrupts, rehearsal
from opsbook.engines import lock as locks
from opsbook.engines.clones import paths
from opsbook.engines.records.store import new_record_id, store_for
from opsbook.engines.snapshots.base import PathNotBuilt, SnapshotError
from opsbook.operations import staging_refresh as sr
from opsbook.operations.release import steps
from opsbook.operations.release.plan import RELEASE_PHASES, Plan
from tests.fixtures.biglearn import apply_app_schema, load_course_events
from tests.fixtures.clones import ADMIN_PASSWORD, APP_PASSWORD, start_source
from tests.fixtures.postgres import _free_port

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
DB = "bl_api"
STAGE_APP_PASSWORD = "staging-app-password"
STAGE_ADMIN_PASSWORD = "staging-admin-password"


def _inventory(root: Path, name: str, *, host: str, port: int, passwords: tuple[str, str], connection: str = "local",
               **extra) -> None:
    d = root / "inventories" / name
    (d / "group_vars" / "all").mkdir(parents=True)
    hosts = {"all": {"children": {"db": {"hosts": {host: {"ansible_host": "127.0.0.1",
                                                          "ansible_connection": connection}}}}}}
    (d / "hosts.yml").write_text(yaml.safe_dump(hosts))
    main = {"opsbook_env_kind": "lab", "opsbook_record_store": str(root / "records" / name),
            "opsbook_lock_backend": "file", "opsbook_lock_path": str(root / "locks" / f"{name}.lock"),
            "bl_api_db_host": host, "bl_api_db_port": port, "bl_api_db_name": DB, "bl_api_db_user": "bl_api",
            "bl_api_db_password": "{{ vault_bl_api_db_password }}", "opsbook_db_admin_user": "postgres",
            "opsbook_db_admin_password": "{{ vault_opsbook_db_admin_password }}", **extra}
    (d / "group_vars" / "all" / "main.yml").write_text(yaml.safe_dump(main))
    (d / "group_vars" / "all" / "vault.yml").write_text(yaml.safe_dump(
        {"vault_bl_api_db_password": passwords[0], "vault_opsbook_db_admin_password": passwords[1]}))


@pytest.fixture(scope="module")
def world():
    """(source cluster, work dir, service port): the source with the app's schema, 3,000 events and a
    second database; the two inventories; torn down with every cluster, the mount and the slot."""
    if not shutil.which("mkfs.btrfs"):
        pytest.fail("btrfs-progs is not installed; ./run installs it (apt-get install btrfs-progs)")
    src = start_source(DB)
    root = Path(tempfile.mkdtemp(prefix="opsbook-refresh-test-"))
    root.chmod(0o755)   # the postgres OS user works below it
    port = _free_port()
    try:
        apply_app_schema(src.socket(DB))
        load_course_events(src.socket(DB), 3000, courses=4, students=80)
        with psycopg.connect(src.socket(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE analytics")
        with psycopg.connect(src.socket("analytics"), autocommit=True) as conn:
            conn.execute("CREATE TABLE people AS SELECT 'someone@example.org' AS email")
        _inventory(root, "srcprod", host="db1", port=src.port, passwords=(APP_PASSWORD, ADMIN_PASSWORD),
                   opsbook_refresh_protected=True, opsbook_rehearsal_env="srcstage", opsbook_rehearsal_max_age="7d")
        _inventory(root, "srcstage", host="db2", port=port, passwords=(STAGE_APP_PASSWORD, STAGE_ADMIN_PASSWORD),
                   opsbook_refresh_host="db2", opsbook_refresh_dir=str(root / "refresh"), opsbook_refresh_image_gb=4,
                   opsbook_refresh_listen_addresses="127.0.0.1")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(INVENTORY_PATH_VARIABLE, str(root / "inventories"))
            yield src, root, port
            path = paths.btrfs_refresh(Env("srcprod"), Env("srcstage"), log=_quiet)
            path.engine.remove_all(path.source)
    finally:
        src.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def envs(world):
    return Env("srcprod"), Env("srcstage")


def _quiet(_m: str) -> None:
    pass


def _stage(port: int, user: str = "bl_api", password: str = STAGE_APP_PASSWORD, dbname: str = DB) -> str:
    return f"host=127.0.0.1 port={port} user={user} password={password} dbname={dbname} connect_timeout=5"


def _one(dsn: str, sql: str, params: tuple = ()):
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, params).fetchone()[0]


@contextlib.contextmanager
def _changed(src, do: list[str], undo: list[str]):
    """The source's database changed by `do` for the block, put back by `undo` after it."""
    with psycopg.connect(src.socket(DB), autocommit=True) as conn:
        for sql in do:
            conn.execute(sql)
    try:
        yield
    finally:
        with psycopg.connect(src.socket(DB), autocommit=True) as conn:
            for sql in undo:
                conn.execute(sql)


def _masking_file(tmp_path: Path, edit) -> Path:
    doc = yaml.safe_load((APP / "masking.yml").read_text())
    edit(doc["tables"])
    path = tmp_path / "masking.yml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _refreshes(env: Env) -> list[dict]:
    try:
        return [e for e in store_for(env).ledger() if e["runbook"] == "staging_refresh"]
    except Exception:  # noqa: BLE001 - a store never written to has no ledger yet
        return []


# --- refused before anything -----------------------------------------------------------------------
def test_refusals_change_nothing_and_leave_no_record(world, envs, tmp_path):
    src, root, _ = world
    prod, stage = envs
    with pytest.raises(sr.RefreshRefused, match=r"refusing to refresh srcprod: it is production .*Nothing was changed"):
        sr.refresh(stage, prod, out=_quiet)
    with pytest.raises(sr.RefreshRefused, match=r"from itself .*Nothing was changed"):
        sr.refresh(stage, stage, out=_quiet)
    with pytest.raises(sr.RefreshRefused, match=r"refusing to refresh prod: it is production"):
        sr.refuse_names("staging", "prod")

    unknown = _masking_file(tmp_path, lambda t: t["course_events"].update(nickname="hash"))
    with pytest.raises(sr.RefreshRefused, match=r"columns no migration creates .*: course_events\.nickname"):
        sr.refresh(prod, stage, masking_path=unknown, out=_quiet)
    undecided = _masking_file(tmp_path, lambda t: (t["course_events"].pop("kind"), t["courses"].pop("created_at")))
    with pytest.raises(sr.RefreshRefused, match=r"columns with no decision") as refused:
        sr.refresh(prod, stage, masking_path=undecided, out=_quiet)
    assert "courses.created_at (created by 0001_course_events)" in str(refused.value)
    assert "course_events.kind (created by 0003_course_events_kind)" in str(refused.value)

    # A column added to the source's database by hand, which no masking decision covers.
    with _changed(src, ["ALTER TABLE course_events ADD COLUMN nickname text"],
                  ["ALTER TABLE course_events DROP COLUMN nickname"]), \
            pytest.raises(sr.RefreshRefused, match=r"srcprod's database: refusing to mask: columns in the database "
                                                   r"with no decision in the masking file: course_events\.nickname"):
        sr.refresh(prod, stage, out=_quiet)

    with pytest.raises(PathNotBuilt, match=r"--snapshot nightly: srcprod's snapshots cannot be listed or restored"):
        sr.refresh(prod, stage, snapshot="nightly", out=_quiet)
    # The paths that are not built: the lab's (no clone host named), a clone host reached over SSH.
    with pytest.raises(PathNotBuilt, match=r"lab names no clone host .*Nothing was changed. The lab's staging is "
                                           r"lab-staging"):
        sr.refresh(prod, Env("lab"), out=_quiet)

    lines: list[str] = []
    plan = sr.refresh(prod, stage, dry_run=True, out=lines.append)
    assert plan["dry_run"]
    assert plan["masked_columns"] == ["course_events.data", "course_events.student_uuid"]
    assert "Nothing was changed" in lines[-1]

    assert sr.status_text(prod, stage).startswith("srcstage: no standby and no clone on db2 yet")
    assert not (root / "refresh").exists()          # no image, no standby, no clone
    assert _refreshes(stage) == []
    assert locks.lock_for(stage).holder() is None
    assert _one(src.socket(), "SELECT count(*) FROM pg_replication_slots") == 0


def test_an_interrupt_during_the_checks_says_nothing_was_changed(world, envs, monkeypatch):
    """A real SIGTERM to this process while the refresh reads the source's database for its checks (the
    moment is chosen by wrapping that check; the signal and its handling are the task's own)."""
    src, root, _ = world
    prod, stage = envs
    check = sr.masking.check_database

    def signalled_mid_check(conn, rules):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)   # the signal's handler raises here
        return check(conn, rules)

    monkeypatch.setattr(sr.masking, "check_database", signalled_mid_check)
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)   # as in a terminal, whatever pytest inherited
    try:
        # Any interrupt is caught, so that a regression fails this test instead of stopping pytest.
        with pytest.raises(KeyboardInterrupt) as stopped, interrupts.interruptible():
            sr.refresh(prod, stage, out=_quiet)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert isinstance(stopped.value, interrupts.Stopped), repr(stopped.value)
    assert stopped.value.signal == "SIGTERM"
    assert str(stopped.value) == ("the refresh of srcstage from srcprod was interrupted by SIGTERM while it made its "
                                  "checks, before it took srcstage's lock. Nothing was changed and no record was "
                                  "written. Refresh again when ready.")
    assert _refreshes(stage) == []
    assert locks.lock_for(stage).holder() is None
    assert not (root / "refresh").exists()
    assert _one(src.socket(), "SELECT count(*) FROM pg_replication_slots") == 0


# --- a refresh -------------------------------------------------------------------------------------
@pytest.mark.kernel
def test_a_refresh_serves_a_masked_copy_with_the_targets_credentials_and_records_it(world, envs):
    src, _, port = world
    prod, stage = envs
    lines: list[str] = []
    data = sr.refresh(prod, stage, out=lines.append)
    assert data["outcome"] == "succeeded"
    assert data["leaks"] == []
    assert data["dropped_databases"] == ["analytics", "postgres"]
    assert data["credentials"]["set"] == ["bl_api", "postgres"]
    assert data["serving"] == data["clone"]["name"]
    assert data["app_hosts"]["note"] == "srcstage has no app hosts: nothing to restart"
    assert any("course_events:" in line and "rows masked" in line for line in lines)   # progress
    # The source serves no version (no app hosts): this checkout's rules decide, and the record says so.
    assert data["masking_notes"][0] == "masking rules: this checkout's app/ (no app host answered /version)"

    # Staging's port serves the copy; staging's passwords open it, the source's do not.
    events = _one(src.socket(DB), "SELECT count(*) FROM course_events")
    assert _one(_stage(port), "SELECT count(*) FROM course_events") == events
    assert _one(_stage(port, "postgres", STAGE_ADMIN_PASSWORD), "SELECT count(*) FROM courses") == 4
    for user, password in (("bl_api", APP_PASSWORD), ("postgres", ADMIN_PASSWORD)):
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(_stage(port, user, password)).close()
    assert _one(_stage(port, "postgres", STAGE_ADMIN_PASSWORD, "postgres"),
                "SELECT count(*) FROM pg_database WHERE datname = 'analytics'") == 0

    # Masked: no learner id of the source left, joins inside staging still match.
    with psycopg.connect(src.socket(DB)) as conn:
        source_ids = {r[0] for r in conn.execute("SELECT DISTINCT student_uuid::text FROM course_events")}
    with psycopg.connect(_stage(port)) as conn:
        staged = {r[0] for r in conn.execute("SELECT DISTINCT student_uuid::text FROM course_events")}
        mismatched = conn.execute("SELECT count(*) FROM course_events WHERE data->>'student_uuid' IS DISTINCT FROM "
                                  "student_uuid::text").fetchone()[0]
    assert len(staged) == len(source_ids) == 80
    assert staged.isdisjoint(source_ids)
    assert mismatched == 0

    # The record, in the target's store: each step's time, the clone's size, masking, the leak scan.
    (entry,) = _refreshes(stage)
    assert entry["outcome"] == "succeeded"
    f = entry["figures"]
    assert (f["source"], f["target"], f["kind"], f["leaks"]) == ("srcprod", "srcstage", "btrfs", 0)
    assert f["masked_rows"] == events
    assert f["clone_total_bytes"] > f["clone_exclusive_bytes"] > 0
    assert set(f["step_seconds"]) == {"standby", "unfinished clones", "room", "clone", "only the service database",
                                      "mask", "verify", "credentials", "switch", "app hosts", "prune"}
    html = store_for(stage).get(entry["html"]).decode()
    for section in ("Steps and their times", "Leak scan", "0 leak(s)", "The clone"):
        assert section in html
    assert STAGE_APP_PASSWORD not in html
    assert _refreshes(prod) == []


@pytest.mark.kernel
def test_a_refresh_failing_half_way_leaves_the_previous_database_serving(world, envs):
    src, _, port = world
    prod, stage = envs
    serving = paths.btrfs_refresh(prod, stage).engine.current()
    assert serving, "the previous test's refresh serves"
    with psycopg.connect(_stage(port), autocommit=True) as conn:
        conn.execute("INSERT INTO courses (course_uuid, ecosystem_uuid) VALUES "
                     "('00000000-0000-0000-0000-0000000000aa', gen_random_uuid())")
    # A real fault: a constraint the masking file does not know of, which every hashed learner id breaks.
    fault = ["CREATE FUNCTION known_student(uuid) RETURNS boolean IMMUTABLE LANGUAGE sql AS $$ SELECT $1 IS NULL OR "
             "EXISTS (SELECT 1 FROM generate_series(0, 79) k WHERE md5('student' || k)::uuid = $1) $$",
             "ALTER TABLE course_events ADD CONSTRAINT known_students CHECK (known_student(student_uuid))"]
    with _changed(src, fault, ["ALTER TABLE course_events DROP CONSTRAINT known_students",
                               "DROP FUNCTION known_student(uuid)"]), \
            pytest.raises(sr.RefreshFailed, match=r"(?s)failed at step 'mask'.*known_students.*The clone \S+ was "
                                                  rf"deleted .*srcstage's previous database \({serving}\) serves"):
        sr.refresh(prod, stage, out=_quiet)
    engine = paths.btrfs_refresh(prod, stage).engine
    assert engine.current() == serving
    assert engine.names() == [serving]
    assert _one(_stage(port), "SELECT count(*) FROM courses WHERE course_uuid = "
                              "'00000000-0000-0000-0000-0000000000aa'") == 1     # the previous database, as it was
    failed = _refreshes(stage)[-1]
    assert failed["outcome"] == "failed"
    assert failed["figures"]["discarded"]
    assert failed["figures"]["serving"] == serving
    assert "known_students" in failed["error"]
    assert locks.lock_for(stage).holder() is None


@pytest.mark.kernel
def test_a_refresh_with_no_room_for_its_clone_is_refused_before_the_clone(world, envs):
    """The loop image is sparse and takes its growth from the filesystem under it, which the clone host's
    other data shares; a masked clone holds about twice its database of its own. A reserve this machine
    cannot keep free refuses the refresh before any clone is made, the previous database serving."""
    _src, root, port = world
    prod, stage = envs
    engine = paths.btrfs_refresh(prod, stage).engine
    serving, names = engine.current(), engine.names()
    assert serving, "an earlier test's refresh serves"
    # (main.yml itself: Ansible's group_vars plugin keeps the list of files it found for the process)
    main = root / "inventories" / "srcstage" / "group_vars" / "all" / "main.yml"
    before = main.read_text()
    main.write_text(yaml.safe_dump({**yaml.safe_load(before), "opsbook_refresh_keep_free_mb": 100_000_000}))  # 95 TiB
    try:
        with pytest.raises(sr.RefreshFailed, match=r"(?s)failed at step 'room': no room for a new clone on .*"
                                                   r"btrfs filesystem at .* MiB free.*the loop image .* may grow by.*"
                                                   r"Nothing of srcstage was changed"):
            sr.refresh(prod, Env("srcstage"), out=_quiet)   # read again, with the reserve
    finally:
        main.write_text(before)
    assert engine.current() == serving
    assert engine.names() == names
    failed = _refreshes(stage)[-1]
    assert failed["outcome"] == "failed"
    assert "no room for a new clone" in failed["error"]
    assert _one(_stage(port), "SELECT count(*) FROM courses") >= 4      # still served
    # The same, with the reserve the inventory leaves (unset: 1024 MiB), fits.
    size = _one(_stage(port, "postgres", STAGE_ADMIN_PASSWORD), f"SELECT pg_database_size('{DB}')")
    assert engine.room_problem(size) is None


@pytest.mark.kernel
def test_a_clone_a_killed_refresh_left_unmasked_is_deleted_by_the_next_and_never_kept(world, envs):
    """A refresh killed (SIGKILL) or cut off (its connection lost) after its clone step cannot delete its
    clone, which holds the source's data unmasked. Left here as such a refresh leaves it: made by the
    engine and never said finished. `staging.status` names it; the next refresh deletes it first and says
    so, and keeps the previous, masked clone to go back to (before, prune kept the newest two, so the
    unmasked one stayed, running, and the masked one was deleted: seen on the lab)."""
    prod, stage = envs
    path = paths.btrfs_refresh(prod, stage, log=_quiet)
    engine = path.engine
    serving = engine.current()
    assert serving, "an earlier test's refresh serves"
    left = f"{serving.split('-')[0]}-999999999-killed"       # sorts after the serving one, as a newer refresh's
    engine.clone(left, service_port=path.service_port, source=path.source)
    assert engine.unfinished() == [left]
    assert engine.running(left)
    assert f"{left}: running (not serving); UNFINISHED: left by a refresh stopped before it was masked" in (
        sr.status_text(prod, stage))

    data = sr.refresh(prod, stage, out=_quiet)
    assert data["outcome"] == "succeeded"
    assert data["unfinished_deleted"] == [left]
    assert engine.names() == [serving, data["serving"]]       # keep 2: the previous, masked one is kept
    assert engine.unfinished() == []
    entry = _refreshes(stage)[-1]
    assert "unfinished clones" in entry["figures"]["step_seconds"]


@pytest.mark.kernel
def test_the_rehearsal_gate_passes_on_a_release_after_a_refresh(world, envs, tmp_path):
    prod, stage = envs
    before = paths.btrfs_refresh(prod, stage).engine.current()
    if before is None:   # run on its own: the clone this refresh replaces is made here, not by another test
        sr.refresh(prod, stage, out=_quiet)
        before = paths.btrfs_refresh(prod, stage).engine.current()
    data = sr.refresh(prod, stage, out=_quiet)
    engine = paths.btrfs_refresh(prod, stage).engine
    assert engine.names() == sorted([before, data["clone"]["name"]])    # keep 2: the previous one, stopped
    assert not engine.running(before)
    status = sr.status_text(prod, stage)
    assert f"  {data['clone']['name']}: serves on port {world[2]}" in status
    assert f"  {before}: stopped" in status
    assert "the standby of 127.0.0.1:" in status

    art = artifact.Artifact("2.0.0+gabc", tmp_path / f"{artifact.NAME}-2.0.0+gabc.tar.gz")
    art.path.write_bytes(b"the bytes of bl-api 2.0.0")
    v = rehearsal.check(prod, art.version, art.sha256)
    assert not v.ok
    assert "no succeeded release of this artifact" in v.missing[0]
    assert v.refresh == data["record"]

    # A release of the artifact to srcstage after the refresh, written the way a release writes it.
    plan = Plan(env=stage.name, kind="release", target=art.version, artifact_file=art.path.name,
                artifact_sha256=art.sha256, current={}, batches=[], drain_timeout=30,
                migrations_pending=[], phases=list(RELEASE_PHASES))
    run = steps.Run(plan=plan, record_id=new_record_id("release", datetime.now(UTC) + timedelta(seconds=2)))
    run.started = datetime.now(UTC) + timedelta(seconds=2)
    run.phases = dict.fromkeys(RELEASE_PHASES, 1.0)
    run.outcome = "succeeded"
    steps._write_record(stage, run)
    v = rehearsal.check(prod, art.version, art.sha256)
    assert v.ok, v.text()
    assert (v.refresh, v.release) == (data["record"], run.record_id)


# --- AWS: refused as not built, before anything ----------------------------------------------------
@pytest.mark.moto
def test_an_aws_refresh_is_refused_as_not_built_before_anything(aws_inventory, aws):
    prod, staging = aws_inventory("prod"), aws_inventory("staging")
    rds = boto3.client("rds", endpoint_url=aws)
    tags = [{"Key": "opsbook:env", "Value": prod.name}, {"Key": "opsbook:managed-by", "Value": "opsbook"},
            {"Key": "opsbook:role", "Value": "db"}]
    rds.create_db_cluster(DBClusterIdentifier=f"opsbook-{prod.name}", Engine="aurora-postgresql",
                          EngineVersion="15.4", MasterUsername="opsbook", MasterUserPassword="not-a-secret-1",
                          Tags=tags)
    def made():
        return ([c["DBClusterIdentifier"] for c in rds.describe_db_clusters()["DBClusters"]],
                [i["DBInstanceIdentifier"] for i in rds.describe_db_instances()["DBInstances"]])

    before = made()
    with pytest.raises(SnapshotError, match=r"no snapshot 'no-such-snapshot' of .*Nothing was done"):
        sr.refresh(prod, staging, snapshot="no-such-snapshot", out=_quiet)
    with pytest.raises(PathNotBuilt, match=r"masking, verifying and re-keying an Aurora clone .* not built.*"
                                           r"Nothing was changed"):
        sr.refresh(prod, staging, out=_quiet)
    with pytest.raises(PathNotBuilt, match="not built"):
        sr.refresh(prod, staging, dry_run=True, out=_quiet)
    assert made() == before
    assert sr.status_text(prod, staging) == (f"{staging.name}: database address (none published)\n"
                                             f"  no clones made by staging.refresh")


def test_the_task_refuses_prod_and_dry_runs_through_the_command_line(world):
    from tests.fixtures.lab import invoke

    refused = invoke("staging.refresh", "--from", "staging", "--to", "prod")
    assert refused.returncode == 1
    assert "refusing to refresh prod: it is production" in refused.stderr
    planned = invoke("staging.refresh", "--from", "srcprod", "--to", "srcstage", "--dry-run")
    assert planned.returncode == 0, planned.stderr
    assert "dry run: would refresh srcstage from srcprod" in planned.stdout


class _Source:
    """A source environment's inventory, as the probe reads it, pointing at a real service on loopback."""

    name = "srcprod"

    def __init__(self, url: str):
        self.vars = {"opsbook_probe_url": url, "opsbook_probe_rate": 20}

    def var(self, name, default=None):
        return self.vars.get(name, default)


def test_the_source_is_under_the_probe_for_the_whole_refresh(bl_api_service, monkeypatch):
    """What a refresh's record keeps of its source's users (a real probe against a real service): requests,
    failed, lost writes, p99 before and during; an interrupt in the baseline is recorded too, with no
    `during`; a source that takes no traffic is refreshed unwatched, and the record says why."""
    import types

    lines: list[str] = []
    data: dict = {}
    with sr._watched(_Source(bl_api_service.url), data, lines.append):
        time.sleep(1.5)
    sp = data["source_probe"]
    assert sp["watched"] is True
    assert sp["requests"] > 20
    assert sp["failed"] == 0
    assert sp["missing_acknowledged_writes"] == 0
    assert sp["p99_ms_before"] is not None
    assert sp["p99_ms_during"] is not None
    assert any(line.startswith("srcprod under the probe during the refresh: ") for line in lines)

    def interrupted(_s):
        raise KeyboardInterrupt

    monkeypatch.setattr(sr, "time", types.SimpleNamespace(sleep=interrupted, monotonic=time.monotonic))
    data = {"target": "srcstage"}
    with pytest.raises(KeyboardInterrupt, match="the refresh of srcstage from srcprod was interrupted by SIGINT "
                                                 r"\(Ctrl-C\) before it began .*Nothing was changed"), \
            sr._watched(_Source(bl_api_service.url), data, lines.append):
        pytest.fail("the refresh must not start when its baseline was interrupted")
    assert data["source_probe"]["watched"] is True
    assert data["source_probe"]["p99_ms_during"] is None

    data = {}
    with sr._watched(_Source("http://127.0.0.1:9"), data, lines.append):   # nothing listens there
        pass
    assert data["source_probe"]["watched"] is False
    assert "srcprod is not watched during the refresh" in lines[-1]


@pytest.mark.kernel
def test_after_the_clone_host_restarts_status_says_so_and_the_next_refresh_serves_again(world, envs):
    """A restart of the clone host (seen on the lab: stg-db1 stopped, then started by provisioning) leaves
    the image unmounted: its clones and standby are stopped, and the target's database does not serve.
    status says that instead of "no clone yet"; the next refresh mounts it, restarts the standby from
    where it was (its slot on the source kept the WAL) and serves a new clone."""
    prod, stage = envs
    sr.refresh(prod, stage, out=_quiet)
    engine = paths.btrfs_refresh(prod, stage).engine
    for name in engine.names():                 # what a restart does: every server stopped, the mount gone
        if engine.running(name):
            engine.stop(name)
    engine._stop(engine.standby_data)   # the restart stops the standby too
    assert not engine.standby_running()
    engine.r.run(["umount", engine.mnt])
    status = sr.status_text(prod, stage)
    assert status.startswith(f"srcstage: the clone filesystem on db2 ({engine.image}) is not mounted"), status
    assert "does not serve until the next refresh" in status
    data = sr.refresh(prod, stage, out=_quiet)
    assert data["outcome"] == "succeeded"
    status = sr.status_text(prod, stage)
    assert f"  {data['clone']['name']}: serves on port" in status, status
    assert "the standby of 127.0.0.1:" in status, status
    assert "is running" in status, status
