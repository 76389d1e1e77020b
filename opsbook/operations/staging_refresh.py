"""The staging refresh: `invoke staging.refresh [--from prod] [--to staging] [--snapshot ID] [--dry-run]`.

The target environment's database becomes a copy of the source's as of now, anonymized, with the
target's own credentials; the target's app hosts are restarted onto it and checked. The record
(`runbooks/staging_refresh.ipynb`, in the target's record store) shows each step's time, the
clone's size, the masking figures and the leak scan; its key figure `source` is what the rehearsal
gate (`opsbook/engines/rehearsal.py`) matches a prod release against.

**Refused before anything is touched** (no lock, no record): a production target (`prod`, an
environment like it, or one whose inventory says `opsbook_refresh_protected: true`), source =
target (by name or by database), environments of different kinds, a masking file that leaves a
column undecided or names one that does not exist (against the migrations, `masking.lint`, and
against the source's database, `masking.check_database`: each list in the message), an unknown
`--snapshot`, and every path that is not built (:class:`PathNotBuilt`, naming what is missing).

**Steps**, under the target's lock, each timed:

1. *standby*: the clone host's standby of the source is made (first refresh: a base backup, the
   only step whose time grows with the database), started or found streaming;
2. *clone*: the standby catches up with the source, is snapshotted and the copy promoted, in
   private mode (no TCP listener: nobody can read the unmasked copy);
3. *only the service database*: every other database of the copied cluster is dropped;
4. *mask*: `masking.apply` with a secret made for this refresh (never stored);
5. *verify*: `masking.verify` against the standby (held still meanwhile; it holds the source's data up
   to and past the clone's point, so production is not read): no value of a masked source column may
   appear in the clone;
6. *credentials*: the target's service and admin roles get the target's passwords (its inventory's
   vault), every other password is removed;
7. *switch*: the clone serves on the target's database port in place of the previous one, which is
   stopped and kept; the target's credentials are tried there, and when they fail the previous clone
   serves again;
8. *app hosts*: those that serve a release are restarted onto it and asked for their version (a host
   never released to has nothing to restart: the record says so, and a release there comes next);
9. *prune*: clones beyond `opsbook_refresh_keep` (2) are deleted, never the serving one.

A clone is marked unfinished from before its snapshot until its credentials are given (after the
mask and the leak scan). A refresh stopped for good in between (SIGKILL, its SSH connection lost) cannot
delete its clone, which holds unmasked data: the next refresh deletes every unfinished clone first
(step *unfinished clones*), and so does *prune*; an unfinished clone never counts among the kept ones,
and `staging.status` names it.

A refresh that fails before the switch deletes its clone (it holds unmasked or half-masked data)
and leaves the target's previous database serving, untouched; the record says so. An interrupt
(SIGINT, SIGTERM, SIGHUP) ends it the same way and says where it stopped: during the checks (no lock
and no record yet), during the probe's baseline, or at a step.

The lab's staging is `lab-staging` (`invoke staging.refresh --from lab --to lab-staging`): its clone
host stg-db1 is reached over SSH, the clones' sockets through SSH forwards.

**Not built**, and refused as such: the AWS path's data plane (the Aurora clone itself is built and
tested against moto; masking it needs the port forward of ``engines/tunnel.py`` wired to the clone, and
moto has no data plane to test that against).
"""

from __future__ import annotations

import contextlib
import secrets
import shlex
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opsbook.core import facts
from opsbook.core.errors import OpsbookError
from opsbook.core.inventory import Env
from opsbook.core.paths import APP, APP_MIGRATIONS
from opsbook.engines import ansible, database, fleet, interrupts, masking
from opsbook.engines.clones import aurora, handover, paths
from opsbook.engines.records import runner
from opsbook.engines.records.store import new_record_id
from opsbook.engines.rehearsal import REFRESH_RUNBOOK
from opsbook.engines.snapshots import paths as snapshot_paths
from opsbook.engines.snapshots.aws import AwsSnapshots
from opsbook.engines.snapshots.base import PathNotBuilt

DEFAULT_SOURCE = "prod"
DEFAULT_TARGET = "staging"


class RefreshRefused(OpsbookError):
    """The refresh was refused before anything was touched."""


class RefreshFailed(OpsbookError):
    """A step of the refresh failed; its record says what was left as it was."""


# --- before anything ------------------------------------------------------------------------------
def refuse_names(source: str, target: str) -> None:
    """What can be refused from the names alone, before an environment is even loaded."""
    if target == "prod":
        raise RefreshRefused(f"refusing to refresh {target}: it is production, and a refresh replaces its database. "
                             f"Nothing was changed. Refresh a staging environment from it: `invoke staging.refresh "
                             f"--from prod --to staging`.")
    if source == target:
        raise RefreshRefused(f"refusing to refresh {target} from itself (--from and --to name the same environment). "
                             f"Nothing was changed.")


def _target_hosts_ready(target: Env) -> None:
    """A lab target whose clone host is a lab host (lab-staging): each of its hosts answers and carries
    the stamp of this checkout's configuration. One that is not up, or was made or changed since its
    last provision, is refused with the command that makes and converges it (a fresh clone host would
    still run Debian's own cluster on the clones' port). Read-only: a dry run makes this check too."""
    host = str(target.var("opsbook_refresh_host", "") or "")
    if target.kind != "lab" or not host or target.host_var(host, "ansible_connection", "ssh") == "local":
        return
    want = ansible.fingerprint(target)
    stale = sorted(h for h, stamp in ansible.converged_stamps(target).items() if stamp != want)
    if stale:
        raise RefreshRefused(f"{target.name}'s hosts {', '.join(stale)} are not up or not converged to this "
                             f"configuration (made or changed since their last provision). Nothing was changed. "
                             f"Run `invoke provision --env {target.name}` (it starts them too), then refresh again.")


def _refuse_targets(source: Env, target: Env) -> None:
    refuse_names(source.name, target.name)
    protected = target.like == "prod" or bool(target.var("opsbook_refresh_protected", False))
    if protected:
        raise RefreshRefused(f"refusing to refresh {target.name}: it is production (or marked "
                             f"opsbook_refresh_protected), and a refresh replaces its database. Nothing was changed. "
                             f"Refresh a staging environment from it: `invoke staging.refresh --from {target.name} "
                             f"--to staging`.")
    if source.kind != target.kind:
        raise RefreshRefused(f"{source.name} is a {source.kind} environment and {target.name} a {target.kind} one: a "
                             f"refresh copies between environments of the same kind. Nothing was changed.")


def _masking(masking_path: Path | None, migrations_dir: Path | None) -> tuple[masking.Masking, list[str]]:
    """The masking file, refused (with the lists) when it does not decide exactly the columns the
    migrations create."""
    mig = Path(migrations_dir or APP_MIGRATIONS)
    path = Path(masking_path or APP / masking.MASKING_FILE)
    try:
        notes = masking.lint(mig, path)
    except masking.MaskingError as e:
        raise RefreshRefused(f"refusing to refresh: {e}") from None
    return masking.load(path), notes


def _source_rules(source: Env) -> tuple[Path | None, Path | None, str]:
    """The masking rules and migrations of the version the source serves, from its artifact (they
    travel with it: the rules that decide the columns of the schema the source has), unpacked beside
    the artifact once (`dist/.rules/<version>/`: an artifact never changes); or (None, None, why) when
    the source serves no single version whose artifact is on this controller, and this checkout's
    app/ decides (its columns are still checked against the source's database before anything is
    copied)."""
    from opsbook.engines import artifact

    try:
        served = {v for v in fleet.served_versions(source).values() if v}
    except Exception as e:  # noqa: BLE001 - whatever stops the fleet being asked: say so, use this checkout's
        return None, None, f"this checkout's app/ (the version {source.name} serves could not be read: {e})"
    if len(served) != 1:
        why = "no app host answered /version" if not served else f"its hosts serve {', '.join(sorted(served))}"
        return None, None, f"this checkout's app/ ({why})"
    version = served.pop()
    try:
        art = artifact.find(version)
        rules, migrations = art.rules()
    except (artifact.ArtifactError, OSError) as e:
        return None, None, f"this checkout's app/ ({source.name} serves {version}: {str(e).split('. ')[0]})"
    return rules, migrations, f"those of {version}, which {source.name} serves (artifact {art.path.name})"


def plan(source: Env, target: Env, *, snapshot: str | None = None, masking_path: Path | None = None,
         migrations_dir: Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every check a refresh makes before it touches anything; raises RefreshRefused or PathNotBuilt,
    or returns the plan (`path` holds the path's machinery)."""
    _refuse_targets(source, target)
    _target_hosts_ready(target)
    chosen = "the masking file given"
    if masking_path is None and migrations_dir is None:
        masking_path, migrations_dir, chosen = _source_rules(source)
    rules, notes = _masking(masking_path, migrations_dir)
    notes = [f"masking rules: {chosen}", *notes]
    log(notes[0])
    if snapshot:
        if source.kind == "aws":
            AwsSnapshots(source).describe(snapshot)          # refuses an unknown id, naming it
        else:
            try:
                snapshot_paths.for_env(source)
            except PathNotBuilt as e:
                raise PathNotBuilt(f"--snapshot {snapshot}: {source.name}'s snapshots cannot be listed or restored. "
                                   f"{e}") from None
    if target.kind == "aws":
        aurora.AuroraClones(source, target, log=log).check()
        raise PathNotBuilt(aurora.DATA_PATH_NOT_BUILT.format(target=target.name))
    if target.kind != "lab":
        raise RefreshRefused(f"{target.name} is a {target.kind} environment; opsbook refreshes lab and aws ones. "
                             f"Nothing was changed.")
    if snapshot:
        raise PathNotBuilt(f"--snapshot {snapshot}: refreshing from a named snapshot on the btrfs path is not built. "
                           f"Nothing was changed.")
    path = paths.btrfs_refresh(source, target, log=log)
    target_db = (database.address(target), path.service_port)
    if (path.source.host, path.source.port) == target_db:
        raise RefreshRefused(f"{source.name} and {target.name} name the same database ({target_db[0]}:{target_db[1]}): "
                             f"a refresh would replace the source with its own copy. Nothing was changed.")
    path.engine.check_host()
    src_facts = path.engine.source_facts(path.source)
    path.engine.refuse_slot_in_use(path.source, src_facts)
    import psycopg

    try:
        with psycopg.connect(database.admin_conninfo(source)) as conn:
            cols = masking.check_database(conn, rules)
    except masking.MaskingError as e:
        raise RefreshRefused(f"{source.name}'s database: {e}") from None
    masking.refuse_unhashable(rules, cols)
    masked = rules.masked(cols)
    return {
        "source": source.name, "target": target.name, "kind": "btrfs", "how": path.describe(),
        "service_database": str(target.var("bl_api_db_name")), "masking_file": str(rules.path),
        "masking_notes": notes, "masked_columns": sorted(f"{t}.{c}" for t, cs in masked.items() for c in cs),
        "keep": path.keep, "source_system_identifier": src_facts["system_identifier"], "path": path,
    }


def status_text(source: Env, target: Env) -> str:
    """Read-only: the target's clones (which one serves, which run), its standby, or on AWS its clone
    clusters and the address its SSM parameter publishes."""
    if target.kind == "aws":
        clones = aurora.AuroraClones(source, target, log=lambda _m: None)
        rows = clones.clones()
        lines = [f"{target.name}: database address {clones.published() or '(none published)'}"]
        lines += [f"  clone {c['id']} {c['status']} at {c['endpoint']} (record {c['record']}, of {c['clone_of']})"
                  for c in rows]
        return "\n".join(lines + ([] if rows else ["  no clones made by staging.refresh"]))
    path = paths.btrfs_refresh(source, target, log=lambda _m: None)
    engine = path.engine
    if engine.r.run(["test", "-d", engine.clones_dir], check=False).code != 0:
        if engine.r.run(["test", "-f", engine.image], check=False).code == 0:
            # The host restarted (the image's loop mount does not survive it), so its standby and clones are
            # in the image but nothing serves from it; status reads only, the next refresh mounts it again.
            return (f"{target.name}: the clone filesystem on {path.host} ({engine.image}) is not mounted ({path.host} "
                    f"restarted?): its standby and clones are stopped, and {target.name}'s database does not serve "
                    f"until the next refresh (`invoke staging.refresh --to {target.name}`), which mounts it again")
        return f"{target.name}: no standby and no clone on {path.host} yet ({engine.base})"
    current = engine.current()
    lines = [f"{target.name}: clones on {path.host} ({engine.base}); the standby of {path.source.describe()} is "
             + ("running" if engine.standby_running() else "stopped")]
    unfinished = set(engine.unfinished())
    for name in engine.names():
        state = "serves on port " + str(path.service_port) if name == current else (
            "running (not serving)" if engine.running(name) else "stopped")
        if name in unfinished and name != current:
            state += ("; UNFINISHED: left by a refresh stopped before it was masked, so it may hold unmasked data "
                      "(the next refresh deletes it)")
        lines.append(f"  {name}: {state}")
    return "\n".join(lines)


# --- the refresh ---------------------------------------------------------------------------------
class _Steps:
    """Each step's time, status and result, in the order they ran (the record's table)."""

    def __init__(self, rows: list[dict[str, Any]], out: Callable[[str], None]):
        self.rows, self.out = rows, out

    @contextlib.contextmanager
    def __call__(self, name: str, what: str) -> Iterator[dict[str, Any]]:
        self.out(f"== {name}: {what}")
        row: dict[str, Any] = {"step": name, "what": what, "status": "running", "seconds": None}
        self.rows.append(row)
        t0 = time.monotonic()
        try:
            yield row
        except BaseException as e:
            row["status"], row["error"] = "failed", f"{type(e).__name__}: {e}"[:800]
            raise
        else:
            row["status"] = "done"
        finally:
            row["seconds"] = round(time.monotonic() - t0, 2)
            self.out(f"   {name}: {row['status']} in {row['seconds']:.1f} s")


def refresh(source: Env, target: Env, *, snapshot: str | None = None, dry_run: bool = False,
            masking_path: Path | None = None, migrations_dir: Path | None = None,
            out: Callable[[str], None] = print) -> dict[str, Any]:
    """Refresh `target`'s database from `source` (see the module's docstring); returns the record's data."""
    try:
        p = plan(source, target, snapshot=snapshot, masking_path=masking_path, migrations_dir=migrations_dir,
                 log=out)
    except KeyboardInterrupt as e:   # the checks read only: nothing to put back, and no record yet
        raise _stopped_before(target.name, source.name, e, f"while it made its checks, before it took {target.name}'s "
                              f"lock", " and no record was written") from None
    path = p.pop("path")
    if dry_run:
        out(f"dry run: would refresh {target.name} from {source.name}: {p['how']}; mask {len(p['masked_columns'])} "
            f"column(s) ({', '.join(p['masked_columns'])}) of {p['service_database']} with {p['masking_file']}, "
            f"verify, "
            f"give it {target.name}'s credentials, switch, restart {target.name}'s app hosts, keep {p['keep']} "
            f"clone(s). Nothing was changed.")
        return {"dry_run": True, **p}
    started = datetime.now(UTC)
    record_id = new_record_id(REFRESH_RUNBOOK)
    data: dict[str, Any] = {**p, "record": record_id, "operator": facts.operator(), "outcome": "failed",
                            "started_at": started.isoformat(timespec="seconds"), "steps": [], "snapshot": snapshot}
    with runner.locked_record(REFRESH_RUNBOOK, target, data, param="refresh_data", record_id=record_id,
                              started=started, reason=f"staging refresh from {source.name} (record {record_id})",
                              log=out), _watched(source, data, out):
        _Btrfs(source, target, path, data, out).run()
    return data


PROBE_BASELINE_S = 2.0   # the source's traffic measured before the refresh touches it


def _stopped_before(target: str, source: str, e: KeyboardInterrupt, when: str, recorded: str) -> interrupts.Stopped:
    """An interrupt that came before the refresh touched anything, in one sentence: `when` it came, and
    what its record is (`recorded`)."""
    return interrupts.Stopped(f"the refresh of {target} from {source} was {interrupts.describe(e)} {when}. Nothing "
                              f"was changed{recorded}. Refresh again when ready.", interrupts.signal_of(e))


@contextlib.contextmanager
def _watched(source: Env, data: dict[str, Any], out: Callable[[str], None]) -> Iterator[None]:
    """The source (production) under the release probe for the whole refresh, as under a release: the
    record shows what its users saw (requests, failed, acknowledged writes lost, p99 before the
    refresh began and during it) in `source_probe`. A source that takes no probe traffic (no load
    balancer; its service down) is refreshed all the same, and the record says it was not watched."""
    from opsbook.engines import probe as probes

    try:
        probe = probes.probe_for(source).start("before")
    except (probes.ProbeError, OpsbookError) as e:
        data["source_probe"] = {"watched": False, "why": str(e)}
        out(f"{source.name} is not watched during the refresh: {e}")
        yield
        return
    try:
        try:
            time.sleep(PROBE_BASELINE_S)
        except KeyboardInterrupt as e:
            raise _stopped_before(str(data.get("target")), source.name, e, f"before it began (while {source.name}'s "
                                  f"traffic was measured for the probe's baseline)", "; its record says so") from None
        probe.mark("refresh")
        yield
    finally:
        with interrupts.held(out, "the probe read its writes back", "it had"):   # seconds a second Ctrl-C must not lose
            results = probe.stop()
        figs = results.figures()
        before = results.phase("before")   # and no "refresh" phase when it was stopped during the baseline
        during = results.phase("refresh") if "refresh" in results.phase_names() else {}
        data["source_probe"] = {
            "watched": True, "url": figs.get("base_url"), "requests": figs.get("requests"),
            "failed": figs.get("failed"), "acknowledged_writes": figs.get("acknowledged_writes"),
            "missing_acknowledged_writes": figs.get("missing_acknowledged_writes"),
            "p99_ms_before": before.get("p99_ms"), "p99_ms_during": during.get("p99_ms"),
            "courses": list(probe.courses), "errors": results.errors(5)}
        sp = data["source_probe"]
        out(f"{source.name} under the probe during the refresh: {sp['requests']} requests, {sp['failed']} failed, "
            f"{sp['missing_acknowledged_writes']} acknowledged write(s) lost; p99 {sp['p99_ms_before']} ms before, "
            f"{sp['p99_ms_during']} ms during")


class _Btrfs:
    """One refresh on the btrfs path: its steps, in order, writing into the record's data."""

    def __init__(self, source: Env, target: Env, path: paths.BtrfsRefresh, data: dict[str, Any],
                 out: Callable[[str], None]):
        self.source, self.target, self.path, self.data, self.out = source, target, path, data, out
        self.engine, self.dbname = path.engine, data["service_database"]
        self.step = _Steps(data["steps"], out)
        self.rules = masking.load(Path(data["masking_file"]))
        self.name = f"{facts.time_key()}-{data['record'].rsplit('-', 1)[-1]}"
        self.private = ""

    def run(self) -> None:
        made = switched = False
        try:
            self.standby()
            self.leftovers()
            self.room()
            self.clone()
            made = True
            self.prepare()
            self.data["clone_size"] = {**self.engine.usage(self.name),
                                       "database_bytes": _database_bytes(self.private, self.dbname)}
            self.switch()
            switched = True
            self.finish()
        except BaseException as e:   # an interrupt too: an unmasked clone must never be left behind
            # Shielded: a second Ctrl-C (or SIGTERM) while the clone is deleted must not leave it half deleted,
            # nor replace this account with a bare interrupt; it is held until the clone is gone (about a second).
            with interrupts.held(self.out, "the refresh put things in order", "it had"):
                left, failed = self._put_in_order(made=made, switched=switched)
            if not isinstance(e, Exception):
                raise interrupts.Stopped(
                    f"the refresh of {self.target.name} from {self.source.name} was {interrupts.describe(e)} at step "
                    f"'{failed}' and ended in order. {left} Its record says so; refresh again to finish.",
                    interrupts.signal_of(e)) from None
            raise RefreshFailed(f"the refresh of {self.target.name} from {self.source.name} failed at step "
                                f"'{failed}': {e} {left} The record says more; fix the cause and refresh "
                                f"again.") from e
        finally:
            with interrupts.shielded():
                self.data["serving"] = self.engine.current()
                self.data["clones"] = self.engine.names()

    def _put_in_order(self, *, made: bool, switched: bool) -> tuple[str, str]:
        """After a failure or an interrupt: delete the clone unless it serves; (what is left, in a sentence;
        the step that failed)."""
        failed = next((r["step"] for r in reversed(self.data["steps"]) if r["status"] == "failed"), "?")
        # Made, or half made when the clone step itself was stopped: it holds unmasked data.
        discarded = not switched and (made or self.name in self.engine.names())
        if discarded:
            self.engine.discard(self.name)   # also drops the `current` link if a failed switch left it on it
            self.data["discarded"] = self.name
        serving = self.engine.current()
        if discarded:
            serves = ("serves as before" if serving and self.engine.running(serving) else
                      f"is NOT running: start it on {self.path.host} (`invoke staging.status --from "
                      f"{self.source.name} --to {self.target.name}` names it) or refresh again")
            left = (f"The clone {self.name} was deleted (it held unmasked or half-masked data); "
                    f"{self.target.name}'s previous database ({serving or 'none'}) {serves}.")
        elif switched:
            left = (f"The new database {self.name} serves {self.target.name} (masked, verified, with its "
                    f"credentials); the previous one ({self.data.get('previous') or 'none'}) is kept, stopped.")
        else:
            left = (f"Nothing of {self.target.name} was changed; its database ({serving or 'none'}) serves as "
                    f"before.")
        self.out(left)
        return left, failed

    def standby(self) -> None:
        with self.step("standby", f"the standby of {self.source.name} on {self.path.host}") as row:
            done = self.engine.ensure_standby(self.path.source)
            row["result"] = done["standby"]
            self.data["filesystem"] = done["filesystem"]

    def leftovers(self) -> None:
        with self.step("unfinished clones", "delete clones a stopped refresh left before they were masked") as row:
            # A refresh killed (SIGKILL) or cut off (its SSH connection lost) after its clone was made and
            # before it finished cannot delete it: the clone holds unmasked data. It is marked unfinished
            # from before its snapshot until it is masked, verified and has the target's credentials.
            gone = self.data["unfinished_deleted"] = self.engine.discard_unfinished()
            row["result"] = (f"deleted {', '.join(gone)} (left by a refresh stopped before it finished; it held "
                             f"unmasked data)" if gone else "none")

    def room(self) -> None:
        with self.step("room", f"space for a masked clone on {self.path.host}, in the image and under it") as row:
            # The source's size, not the standby's: the standby may still be replaying a backlog (the clone
            # step catches it up), and in the middle of it the database may not even exist (seen: the suite
            # dropped and made the service database again on the source).
            size = _database_bytes(self.path.source.conninfo(), self.dbname)
            problem = self.engine.room_problem(size)
            if problem:
                raise RefreshFailed(problem)
            row["result"] = f"the database is {size / 1024 / 1024:,.0f} MiB: room for it masked"

    def clone(self) -> None:
        with self.step("clone", "catch up, snapshot, promote (private: no TCP listener)") as row:
            c = self.engine.clone(self.name, service_port=self.path.service_port, source=self.path.source)
            self.data["clone"] = c.to_dict()
            self.private = self.engine.conninfo(c.private_port, self.dbname)
            row["result"] = (f"{self.name}, usable after {c.seconds['usable']:.1f} s, holds {self.source.name} up to "
                             f"{c.clone_lsn}")

    def prepare(self) -> None:
        """Only the service database, masked, verified, with the target's credentials."""
        data, rules = self.data, self.rules
        with self.step("only the service database", f"drop every database of the copy but {self.dbname}") as row:
            data["dropped_databases"] = handover.keep_only(self.private, self.dbname)
            row["result"] = f"dropped {', '.join(data['dropped_databases']) or 'none'}"
        with self.step("mask", f"{rules.path.name}: {len(data['masked_columns'])} column(s), a secret for this "
                               f"refresh") as row:
            result = masking.apply(self.private, rules, secrets.token_bytes(32), progress=self.out,
                                   progress_every=10)
            data["masking"] = {"tables": result.tables, "rows": sum(result.tables.values()), "batches": result.batches,
                               "seconds": round(result.seconds, 2), "rows_per_s": round(result.rows_per_s)}
            row["result"] = f"{data['masking']['rows']:,} rows, {data['masking']['rows_per_s']:,} rows/s"
        with self.step("verify", "no value of a masked column of the source (the standby, held still) is in the "
                                 "clone") as row:
            self.engine.pause_replay()
            try:
                leaks = masking.verify(self.engine.standby_conninfo(self.dbname), self.private, rules,
                                       progress=self.out)
            finally:
                self.engine.resume_replay()
            data["leaks"] = [str(x) for x in leaks]
            row["result"] = f"{len(leaks)} leak(s)"
            _refuse_leaks(data["leaks"])
        with self.step("credentials", f"{self.target.name}'s service and admin roles; every other password "
                                      f"removed") as row:
            t, s = self.target, self.source
            roles = {str(t.var("bl_api_db_user")): str(t.var("bl_api_db_password")),
                     str(t.var("opsbook_db_admin_user")): str(t.var("opsbook_db_admin_password"))}
            member_of = {str(t.var("bl_api_db_user")): str(s.var("bl_api_db_user")),
                         str(t.var("opsbook_db_admin_user")): str(s.var("opsbook_db_admin_user"))}
            done = data["credentials"] = handover.give_credentials(self.private, roles=roles, member_of=member_of)
            row["result"] = (f"set {', '.join(done['set'] + done['created'])}; cleared "
                             f"{', '.join(done['cleared']) or 'none'}")
        self.engine.finished(self.name)   # masked, verified, its credentials: it may be kept and served

    def switch(self) -> None:
        with self.step("switch", f"serve {self.name} on {self.path.host}:{self.path.service_port} in place of the "
                                 f"previous clone") as row:
            previous = self.data["previous"] = self.engine.current()
            try:
                self.engine.switch(self.name)
                self.data["database_check"] = _check_database(self.target, self.rules)
            except BaseException as e:   # an interrupt too: the new clone is deleted next, so the previous serves
                if previous and self.engine.current() == self.name:
                    self.engine.switch(previous)
                    self.out(f"switched back: {previous} serves again")
                if not isinstance(e, Exception):
                    raise
                raise RefreshFailed(f"{self.target.name}'s credentials do not work on the new clone ({e}); "
                                    + (f"the previous database {previous} serves again" if previous else
                                       "no earlier clone served here")) from e
            row["result"] = f"{self.name} serves (previous: {previous or 'none'})"

    def finish(self) -> None:
        with self.step("app hosts", f"restart {self.target.name}'s app hosts onto it and check them") as row:
            self.data["app_hosts"] = restart_app_hosts(self.target, self.out)
            row["result"] = self.data["app_hosts"]["note"]
        with self.step("prune", f"keep {self.path.keep} clone(s), never the serving one") as row:
            self.data["pruned"] = self.engine.prune(self.path.keep)
            row["result"] = f"deleted {', '.join(self.data['pruned']) or 'none'}"


def _refuse_leaks(leaks: list[str]) -> None:
    if leaks:
        raise RefreshFailed(f"the leak scan found source values in the masked clone: {'; '.join(leaks)}")


def _database_bytes(conninfo: str, dbname: str) -> int:
    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as conn:
        return int(conn.execute("SELECT pg_database_size(%s)", (dbname,)).fetchone()[0])


def _check_database(target: Env, rules: masking.Masking) -> dict[str, Any]:
    """The new database, reached as the target's service reaches it: its admin role, then its service
    role counting the rows of every table the masking file masks. The service role connects from one of
    the target's app hosts (an SSH forward through it: pg_hba admits the service role from there only),
    or straight from here where the target has no app hosts."""
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    admin = database.admin_conninfo(target)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("SELECT 1")
    params = conninfo_to_dict(admin)
    if target.hosts("app") and target.var("opsbook_db_reach", "direct") != "ssh":   # ssh: admin's is one already
        from opsbook.engines import tunnel

        params.update(host="127.0.0.1", port=tunnel.forward(target, database.address(target),
                                                            int(target.var("bl_api_db_port")), via="app"))
    app = make_conninfo(**{**params, "user": target.var("bl_api_db_user"),
                           "password": target.var("bl_api_db_password")})
    rows = {}
    with psycopg.connect(app, autocommit=True) as conn:
        for table in rules.masked():
            rows[table] = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()[0]
    return {"admin": "connected", "service_role_rows": rows}


NEVER_RELEASED = 3   # the exit code of the restart command on an app host that has no release yet


def restart_app_hosts(env: Env, out: Callable[[str], None]) -> dict[str, Any]:
    """Restart the service on every app host that serves a release (one Ansible `raw` call), then wait
    until each answers its /version. An environment without app hosts, or whose app hosts were never
    released to, has nothing to restart (said in the record: a release comes next)."""
    hosts = [h.name for h in env.hosts("app")]
    if not hosts:
        return {"hosts": [], "note": f"{env.name} has no app hosts: nothing to restart"}
    service = str(env.host_var(hosts[0], "app_service", "bl-api"))
    root = str(env.host_var(hosts[0], "app_root", f"/srv/{service}"))
    answers = ansible.raw(env, "app", f"test -e {shlex.quote(root + '/current')} || exit {NEVER_RELEASED}; "
                                      f"systemctl restart {shlex.quote(service)}")
    never = sorted(h for h, a in answers.items() if a is not None and a[0] == NEVER_RELEASED)
    failed = {h: a for h, a in answers.items() if a is None or a[0] not in (0, NEVER_RELEASED)}
    if failed:
        raise RefreshFailed(f"restarting {service} failed on {', '.join(sorted(failed))}: the database switched, those "
                            f"hosts may not serve. Run `invoke check --env {env.name}`.")
    hosts = [h for h in hosts if h not in never]
    if not hosts:
        return {"hosts": [], "never_released": never,
                "note": f"{env.name}'s app hosts ({', '.join(never)}) were never released to: nothing to restart; "
                        f"`invoke release --env {env.name}` next"}
    # The inventory's health timeout, the one a release gives a switched host.
    health_s = float(env.var("opsbook_release_health_timeout", 60))
    deadline = time.monotonic() + health_s
    while True:
        served = fleet.served_versions(env)
        down = {h: served.reasons.get(h, "") for h, v in served.items() if v is None and h in hosts}
        if not down:
            return {"hosts": hosts, "never_released": never, "versions": {h: served.get(h) for h in hosts},
                    "note": f"{len(hosts)} app host(s) restarted and serving"
                            + (f"; never released to: {', '.join(never)}" if never else "")}
        if time.monotonic() > deadline:
            raise RefreshFailed(f"after the restart {', '.join(f'{h} ({why})' for h, why in down.items())} did not "
                                f"answer /version within {health_s:g} s; the database switched. Run `invoke "
                                f"check --env {env.name}`.")
        out(f"waiting for {', '.join(down)} to answer /version")
        time.sleep(2)
