"""The release's guardrails (issue 11): the rehearsal gate and the safety point.

The rehearsal gate is tested with a lab pair standing in for prod and staging: two copies of the
lab inventory (`labprod`, `labstage`, found through OPSBOOK_INVENTORY_PATH), each with its own
local record store. Staging's releases are written the way a release writes its record
(steps.Run -> release.ipynb -> the store), so the gate reads what a real release leaves; the
refresh record is written to the store by hand (tests/integration/test_staging_refresh.py checks that a
real refresh writes one the gate accepts). No lab
host is touched: the gate and the guardrail path are called directly (a release or its dry run
would ask the lab's hosts what they serve).

The safety point is tested against moto's RDS: taken when it can be, a recent one used when it
cannot, refused otherwise, and the release phase that takes it tags it with the release's record.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta

import boto3
import pytest
import yaml

from opsbook.core.inventory import INVENTORY_PATH_VARIABLE, Env
from opsbook.core.paths import INVENTORIES
from opsbook.engines import artifact, rehearsal
from opsbook.engines.records import ledger
from opsbook.engines.records.store import new_record_id, store_for
from opsbook.engines.snapshots import safety
from opsbook.engines.snapshots.aws import AwsSnapshots
from opsbook.engines.snapshots.base import Snapshot
from opsbook.operations.release import guardrails, record, steps
from opsbook.operations.release.plan import RELEASE_PHASES, Plan

SEVEN_DAYS = timedelta(days=7)


# --- the lab pair ------------------------------------------------------------------------------
@pytest.fixture
def pair(tmp_path, monkeypatch):
    """(labprod, labstage): lab inventories with their own record stores; labprod is rehearsed on labstage."""
    root = tmp_path / "inventories"
    for name, extra in (("labprod", {"opsbook_rehearsal_env": "labstage", "opsbook_rehearsal_max_age": "7d"}),
                        ("labstage", {})):
        shutil.copytree(INVENTORIES / "lab", root / name)
        values = {"opsbook_record_store": str(tmp_path / "records" / name), **extra}
        (root / name / "group_vars" / "all" / "zz-test.yml").write_text(yaml.safe_dump(values))
    monkeypatch.setenv(INVENTORY_PATH_VARIABLE, str(root))
    return Env("labprod"), Env("labstage")


@pytest.fixture
def art(tmp_path):
    """An artifact as the gate sees it: a version and the sha256 of its bytes."""
    path = tmp_path / "dist" / f"{artifact.NAME}-2.0.0+gabc.tar.gz"
    path.parent.mkdir()
    path.write_bytes(b"the bytes of bl-api 2.0.0")
    return artifact.Artifact("2.0.0+gabc", path)


def _refresh(env: Env, start: datetime, *, outcome: str = "succeeded", source: str | None = "labprod") -> str:
    """A staging_refresh ledger entry, written through the environment's real record store."""
    rid = new_record_id("staging_refresh", start)
    store_for(env).write_record(
        {"id": rid, "runbook": rehearsal.REFRESH_RUNBOOK, "env": env.name, "outcome": outcome,
         "start": start.isoformat(timespec="seconds"),
         "end": (start + timedelta(minutes=5)).isoformat(timespec="seconds"),
         "parameters": {"source": source} if source else {}, "figures": {}},
        b"{}", b"<html></html>")
    return rid


def _release(env: Env, art: artifact.Artifact, *, outcome: str = "succeeded",
             phases: tuple[str, ...] = RELEASE_PHASES) -> str:
    """A release record of `art` to `env`, written the way a release writes it (release.ipynb)."""
    plan = Plan(env=env.name, kind="release", target=art.version, artifact_file=art.path.name,
                artifact_sha256=art.sha256, current={"app1": "1.9.0"}, batches=[["app1"]], drain_timeout=30,
                migrations_pending=["0007_add_course_id"], phases=list(RELEASE_PHASES))
    run = steps.Run(plan=plan, record_id=new_record_id("release"))
    run.phases = dict.fromkeys(phases, 1.0)
    run.outcome = outcome
    if outcome != "succeeded":
        run.reason = "batch 1 failed its gate"
    steps._write_record(env, run)
    return run.record_id


@pytest.mark.kernel
def test_the_gate_passes_only_a_rehearsal_of_the_same_bytes_on_a_fresh_refresh(pair, art, tmp_path):
    prod, stage = pair

    # Nothing rehearsed yet: no refresh, no release. The refusal names both and the commands.
    v = rehearsal.check(prod, art.version, art.sha256)
    assert not v.ok
    assert "no succeeded refresh of labstage from labprod" in v.missing[0]
    assert v.commands == ["invoke staging.refresh --from labprod --to labstage",
                          f"invoke release --env labstage --version {art.version}"]

    # Released to staging before its refresh: the refresh replaced that database.
    before = _release(stage, art)
    _refresh(stage, datetime.now(UTC) + timedelta(seconds=1))
    v = rehearsal.check(prod, art.version, art.sha256, now=datetime.now(UTC) + timedelta(minutes=10))
    assert not v.ok
    assert f"released to labstage (record {before}) before the newest refresh" in v.missing[0]
    assert v.commands == [f"invoke release --env labstage --version {art.version}"]

    # Other bytes under the same version do not count; a failed release does not count.
    other = artifact.Artifact(art.version, tmp_path / "other.tar.gz")
    other.path.write_bytes(b"other bytes, same version")
    later = datetime.now(UTC) + timedelta(minutes=10)
    _release(stage, other)   # started before the refresh ended, in any case
    assert not rehearsal.check(prod, art.version, art.sha256, now=later).ok


@pytest.mark.kernel
def test_a_release_on_the_fresh_refresh_passes_and_an_old_refresh_does_not(pair, art):
    prod, stage = pair
    refreshed = _refresh(stage, datetime.now(UTC) - timedelta(hours=2))
    failed = _release(stage, art, outcome="failed")
    v = rehearsal.check(prod, art.version, art.sha256)
    assert not v.ok, "a failed release to staging is no rehearsal"
    assert "no succeeded release of this artifact" in v.missing[0]

    # The same version built again (other bytes) and released on the fresh refresh: not this artifact.
    other = artifact.Artifact(art.version, art.path.with_name("other.tar.gz"))
    other.path.write_bytes(b"other bytes, same version")
    rebuilt = _release(stage, other)
    v = rehearsal.check(prod, art.version, art.sha256)
    assert not v.ok
    assert f"record {rebuilt} released version {art.version} but does not carry this artifact's sha256" in v.missing[0]

    good = _release(stage, art)
    v = rehearsal.check(prod, art.version, art.sha256)
    assert v.ok, v.text()
    assert (v.release, v.refresh) == (good, refreshed)
    assert good != failed

    # Eight days later the same rehearsal is too old: a refresh (and a release on it) is needed.
    v = rehearsal.check(prod, art.version, art.sha256, now=datetime.now(UTC) + timedelta(days=8))
    assert not v.ok
    assert "opsbook_rehearsal_max_age is 7d" in v.missing[0]
    assert v.commands[0] == "invoke staging.refresh --from labprod --to labstage"


@pytest.mark.kernel
def test_a_release_that_did_not_run_its_expand_migrations_is_no_rehearsal(pair, art):
    prod, stage = pair
    _refresh(stage, datetime.now(UTC) - timedelta(hours=1))
    _release(stage, art, phases=tuple(p for p in RELEASE_PHASES if p != "expand migrations"))
    v = rehearsal.check(prod, art.version, art.sha256)
    assert not v.ok
    assert "did not run its expand migrations phase" in v.missing[0]


def test_a_refresh_of_another_source_or_a_failed_one_does_not_count(pair, art):
    prod, stage = pair
    _refresh(stage, datetime.now(UTC) - timedelta(hours=1), source="somewhere-else")
    _refresh(stage, datetime.now(UTC) - timedelta(minutes=30), outcome="failed")
    v = rehearsal.check(prod, art.version, art.sha256)
    assert not v.ok
    assert "no succeeded refresh" in v.missing[0]


def test_an_environment_without_a_rehearsal_env_is_not_gated(pair, art):
    _, stage = pair
    v = rehearsal.check(stage, art.version, art.sha256)
    assert v.ok
    assert v.rehearsal_env is None


# --- the guardrail path of a release -----------------------------------------------------------
@pytest.mark.kernel
def test_the_release_guardrails_refuse_then_an_override_is_written_in_the_release_record(pair, art):
    prod, _ = pair
    said: list[str] = []
    with pytest.raises(guardrails.GuardrailRefused) as refused:
        guardrails.check(prod, art, ["0007_add_course_id"], out=said.append)
    message = str(refused.value)
    assert "has not been rehearsed on labstage" in message
    assert "invoke staging.refresh --from labprod --to labstage" in message
    assert "--skip-rehearsal --reason R" in message
    assert "Nothing was locked or changed" in message

    with pytest.raises(guardrails.GuardrailRefused, match="--skip-rehearsal needs --reason"):
        guardrails.check(prod, art, [], skip_rehearsal=True, reason="  ")

    # A dry run says it would be refused and refuses nothing.
    dry = guardrails.check(prod, art, [], dry_run=True, out=said.append)
    assert not dry["rehearsal"]["ok"]
    assert "dry run: the release would be refused by the rehearsal gate" in said

    checked = guardrails.check(prod, art, ["0007_add_course_id"], skip_rehearsal=True,
                               reason="hotfix for incident 7, staging is down", out=said.append)
    assert checked["rehearsal"]["skipped"] == "hotfix for incident 7, staging is down"
    assert checked["snapshot"]["action"] == safety.NONE     # the lab: opsbook_release_snapshot off

    # The release record keeps the override: its summary and its key figures.
    plan = Plan(env=prod.name, kind="release", target=art.version, artifact_file=art.path.name,
                artifact_sha256=art.sha256, current={"app1": "1.9.0"}, batches=[["app1"]], drain_timeout=30,
                phases=list(RELEASE_PHASES))
    run = steps.Run(plan=plan, record_id=new_record_id("release"), guardrails=checked)
    run.outcome = "succeeded"
    steps._write_record(prod, run)
    entry = store_for(prod).entry(run.record_id)
    assert entry["figures"]["rehearsal"] == "skipped: hotfix for incident 7, staging is down"
    assert entry["figures"]["artifact_sha256"] == art.sha256
    notebook = store_for(prod).get(entry["notebook"]).decode()
    assert "rehearsal gate SKIPPED (--skip-rehearsal): hotfix for incident 7" in notebook
    assert ledger.releases(store_for(prod).ledger())[-1]["id"] == run.record_id


def test_the_scale_gate_and_the_rehearsal_gate_read_the_staging_ledger_once(pair, art, monkeypatch):
    """A prod release asks both gates about staging's ledger; with one `Ledgers` they read its store
    once (on S3 that is a request per entry), and both still decide from it."""
    from opsbook.engines import scale_gate
    from opsbook.engines.records.store import LocalStore

    prod, stage = pair
    (prod.path / "group_vars" / "all" / "zz-scale.yml").write_text(yaml.safe_dump({
        "opsbook_require_scale_check": True, "opsbook_scale_check_from": ["labstage"],
        "opsbook_scale_target": {"responses_per_s": 3000, "max_p99_ms": 200}}))
    prod = Env("labprod")
    _refresh(stage, datetime.now(UTC) - timedelta(hours=1))
    reads: list[str] = []
    real = LocalStore.ledger

    def counted(self):   # the real read, counted
        reads.append(self.url)
        return real(self)

    monkeypatch.setattr(LocalStore, "ledger", counted)
    read = ledger.Ledgers(prod)
    with pytest.raises(scale_gate.ScaleGateRefused, match="labstage"):
        scale_gate.check_release(prod, art.version, art.sha256, read=read)
    verdict = rehearsal.check(prod, art.version, art.sha256, read=read)
    assert not verdict.ok
    assert verdict.refresh is not None, verdict.missing      # it saw the refresh in staging's ledger
    assert reads == [store_for(stage).url], reads


# --- the safety point ----------------------------------------------------------------------------
NOW = datetime(2026, 1, 31, 12, tzinfo=UTC)


def _snap(sid: str, hours: float, status: str = "available") -> Snapshot:
    return Snapshot(id=sid, kind="rds", source="db", status=status, created=(NOW - timedelta(hours=hours)).isoformat(),
                    size_gb=20, engine="postgres", engine_version="15.4", ours=True)


@pytest.mark.parametrize(("setting", "expand", "can_take", "snaps", "action"), [
    ("off", ["m1"], True, [], safety.NONE),
    ("required", [], True, [], safety.NONE),
    ("required", ["m1"], True, [], safety.TAKE),
    ("required", ["m1"], False, [_snap("recent", 3)], safety.USE),
    ("required", ["m1"], False, [_snap("old", 30)], safety.REFUSE),
    ("required", ["m1"], False, [_snap("making", 1, status="creating")], safety.REFUSE),
    ("required", ["m1"], False, [], safety.REFUSE),
], ids=["off", "no-expand", "take", "recent-one", "only-an-old-one", "only-one-being-made", "none"])
def test_the_safety_point_rule(setting, expand, can_take, snaps, action):
    d = safety.decide(env="prod", setting=setting, expand_pending=expand, can_take=can_take, why_not="stopped",
                      snapshots=snaps, max_age=timedelta(hours=24), now=NOW)
    assert d.action == action, d.why
    if action == safety.REFUSE:
        assert "Nothing was changed" in d.why
        assert "invoke snapshot --env prod" in d.why


def test_an_unknown_setting_is_refused():
    with pytest.raises(safety.SnapshotError, match="must be one of required, off"):
        safety.decide(env="prod", setting="maybe", expand_pending=["m1"], can_take=True, snapshots=[], max_age=None)


def test_a_required_safety_point_is_refused_where_the_database_host_keeps_no_backups(pair):
    prod, _ = pair
    (prod.path / "group_vars" / "all" / "zz-z.yml").write_text("opsbook_release_snapshot: required\n")   # read last
    (prod.path / "group_vars" / "db" / "zz-z.yml").write_text("postgres_backup: none\n")
    d = safety.decide_for(Env("labprod"), ["m1"])
    assert d.action == safety.REFUSE
    assert "db1 has postgres_backup: none" in d.why
    assert "invoke snapshot --env labprod" in d.why


def _rds_database(aws, env) -> str:
    rds = boto3.client("rds", endpoint_url=aws)
    s3 = boto3.client("s3", endpoint_url=aws)
    for bucket in (f"opsbook-records-{env.name}", f"opsbook-locks-{env.name}"):
        s3.create_bucket(Bucket=bucket)
    name = f"opsbook-{env.name}"
    rds.create_db_instance(DBInstanceIdentifier=name, Engine="postgres", EngineVersion="15.4",
                           DBInstanceClass="db.t4g.medium", AllocatedStorage=20, MasterUsername="opsbook",
                           MasterUserPassword="not-a-secret-1",
                           Tags=[{"Key": "opsbook:env", "Value": env.name},
                                 {"Key": "opsbook:managed-by", "Value": "opsbook"},
                                 {"Key": "opsbook:role", "Value": "db"}])
    return name


@pytest.mark.moto
def test_on_aws_a_release_takes_its_safety_point_and_its_record_names_it(aws_inventory, aws):
    env = aws_inventory("staging")
    _rds_database(aws, env)
    decided = safety.decide_for(env, ["0007_add_course_id"])
    assert decided.action == safety.TAKE, decided.why
    plan = Plan(env=env.name, kind="release", target="2.0.0", artifact_file="f", artifact_sha256="0" * 64,
                current={}, batches=[], drain_timeout=30, migrations_pending=["0007_add_course_id"],
                phases=list(RELEASE_PHASES))
    run = steps.Run(plan=plan, record_id=new_record_id("release"), guardrails={"snapshot": decided.to_record()})
    steps._safety_point(env, run)
    sid = run.guardrails["snapshot"]["id"]
    snap = AwsSnapshots(env).describe(sid)
    assert snap.status == "available"
    assert snap.record_id == run.record_id
    assert snap.reason == "safety point of release 2.0.0"
    run.outcome = "succeeded"
    assert record.key_figures(run.data())["snapshot"] == sid
    assert json.dumps(run.data(), default=str)

    # Decided again under the lock, on the plan made there: no expand migrations any more, no snapshot.
    run.plan.migrations_pending = []
    steps._safety_point(env, run)
    assert run.guardrails["snapshot"]["action"] == safety.NONE
    assert [s.id for s in AwsSnapshots(env).list() if s.ours] == [sid]


@pytest.mark.moto
def test_on_aws_a_stopped_database_uses_a_recent_snapshot_or_refuses(aws_inventory, aws):
    """A database that is not available cannot be snapshotted: a snapshot younger than
    opsbook_release_snapshot_max_age (24h for staging) stands in, AWS's automated ones included
    (moto makes one when the instance is created, as RDS does); without one the release is refused."""
    env = aws_inventory("staging")
    db = _rds_database(aws, env)
    boto3.client("rds", endpoint_url=aws).stop_db_instance(DBInstanceIdentifier=db)
    d = safety.decide_for(env, ["m1"])
    assert d.action == safety.USE, d.why
    assert d.snapshot["source"] == db
    assert "is stopped, not available" in d.why
    checked = guardrails.check(env, _FakeArt(), ["m1"], out=lambda _m: None)
    assert checked["snapshot"]["id"] == d.snapshot["id"]
    with pytest.raises(guardrails.GuardrailRefused, match=r"is stopped, not available.*Nothing was changed"):
        guardrails.check(env, _FakeArt(), ["m1"], now=datetime.now(UTC) + timedelta(days=2), out=lambda _m: None)


class _FakeArt:
    """Only what the guardrails read of an artifact (staging names no rehearsal env)."""

    version = "2.0.0"
    sha256 = "0" * 64


@pytest.mark.kernel
@pytest.mark.parametrize("ahead", [False, True], ids=["drawn-with-the-record", "drawn-ahead"])
def test_a_release_record_embeds_the_probe_plot_and_leaves_no_temporary_file(pair, art, tmp_path, monkeypatch,
                                                                              ahead):
    """The probe's plot is drawn beside the record's data and removed with it once the record embeds it
    (it was drawn into a directory of its own that nothing removed: one left in /tmp per release), whether
    it is drawn when the record is written or ahead of it, while the hosts mark the release good."""
    import tempfile

    from opsbook.engines.probe import ProbeResults, Sample

    prod, _ = pair
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    samples = [Sample(t=i / 10, at=1_700_000_000 + i / 10, phase="before" if i < 20 else "batch 1", kind="ping",
                      outcome="ok", status=200, error=None, latency_ms=5.0 + i % 7) for i in range(40)]
    results = ProbeResults(base_url="http://127.0.0.1:9", started_at=1_700_000_000, duration_s=4.0, samples=samples,
                           phases=[("before", 0.0, 2.0), ("batch 1", 2.0, 4.0)], acknowledged={},
                           missing_acknowledged_writes=[])
    plan = Plan(env=prod.name, kind="release", target=art.version, artifact_file=art.path.name,
                artifact_sha256=art.sha256, current={"app1": "1.9.0"}, batches=[["app1"]], drain_timeout=30,
                migrations_pending=[], phases=list(RELEASE_PHASES))
    run = steps.Run(plan=plan, record_id=new_record_id("release"), outcome="succeeded", probe_results=results)
    run.phases = dict.fromkeys(RELEASE_PHASES, 1.0)
    if ahead:
        run.record_ahead = steps._RecordAhead(results, "release to prod")
    steps._write_record(prod, run)
    entry = store_for(prod).entry(run.record_id)
    notebook = store_for(prod).get(entry["notebook"])
    assert b'"image/png"' in notebook
    assert (run.probe_plot or "").startswith(str(scratch))
    assert list(scratch.iterdir()) == []
    assert run.record_ahead is None
    assert not any("plot" in n for n in run.notes)


class _Unplottable:
    def plot(self, path, title=None):
        raise RuntimeError("no room on the canvas")


@pytest.mark.kernel
def test_a_probe_plot_that_cannot_be_drawn_ahead_is_said_in_the_record_which_is_still_written(pair, art):
    prod, _ = pair
    plan = Plan(env=prod.name, kind="release", target=art.version, artifact_file=art.path.name,
                artifact_sha256=art.sha256, current={"app1": "1.9.0"}, batches=[["app1"]], drain_timeout=30,
                migrations_pending=[], phases=list(RELEASE_PHASES))
    run = steps.Run(plan=plan, record_id=new_record_id("release"), outcome="succeeded")
    run.phases = dict.fromkeys(RELEASE_PHASES, 1.0)
    run.record_ahead = steps._RecordAhead(_Unplottable(), "release to prod")
    steps._write_record(prod, run)
    assert run.probe_plot is None
    assert run.notes == ["the probe's plot could not be drawn (RuntimeError: no room on the canvas); its figures "
                         "are in the record"]
    assert store_for(prod).entry(run.record_id)["outcome"] == "succeeded"
