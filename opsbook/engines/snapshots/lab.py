"""Snapshots of a lab environment's database: pgBackRest on its repository host, over SSH.

The machinery is ``opsbook.engines.snapshots.pgbackrest`` (backup, the restore point the manifest
describes, the drill); this module points it at the host that keeps the environment's repository
through :class:`~opsbook.engines.remote.SshRunner`, and keeps what pgBackRest does not: which backups
opsbook took, for which record and reason, and the manifest of each one's point.

**Where things live** (the postgres role, ``postgres_backup: pgbackrest``, sets them up):

- the repository: ``postgres_backup_repo`` on the database host's ``postgres_backup_repo_host`` (the
  lab: db1's on db2, on its data volume, which outlives the container), so losing the database host
  does not lose its backups, and a drill there shows they restore without it. pgBackRest runs there
  and reads the cluster over SSH (a dedicated repository host); with ``postgres_backup_repo_host``
  empty the repository is on the database host itself, as before;
- WAL: archived into the repository by the cluster (``archive_command``, pushed over SSH), so a backup
  restores to any later point, and the drill to the snapshot's own restore point;
- opsbook's own record of a snapshot: ``<repo>/opsbook/<backup label>.json`` (env, record, reason,
  restore point and its LSN, the write pause, and the manifest), written as ``postgres`` 0640 next to
  the backup it describes. A backup without one was not taken by opsbook (or opsbook was killed
  between the backup and its point): it is listed, never deleted by retention, and a drill of it says
  NOT VERIFIED (there is no manifest to compare with).

**The drill** restores into a scratch directory under the repository host's data volume
(``/var/lib/postgresql``), a cluster with archiving off, no TCP listener and a socket in a 0700
directory; opsbook reads it through an SSH forward of that socket to a port on 127.0.0.1 of the
controller (``tunnel.SocketForwards``). The service cannot reach it, it cannot push WAL into the
repository, and it is stopped and removed when the drill ends, whatever the verdict. A drill whose
copy would leave less than ``opsbook_repo_keep_free_mb`` free on that volume is refused before
anything is restored: the repository shares the volume, and a full disk would stop it taking WAL.
A snapshot whose backup may not fit with that much left is refused the same way, before its lock.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opsbook.core import facts
from opsbook.engines.remote import CommandFailed, SshRunner, free_bytes, read_file, write_file
from opsbook.engines.snapshots import manifest as manifests
from opsbook.engines.snapshots import pgbackrest as pgbr
from opsbook.engines.snapshots.base import DrillVerdict, PathNotBuilt, Snapshot, SnapshotError, newest_first
from opsbook.engines.tunnel import SocketForwards

CONFIG = Path("/etc/pgbackrest.conf")          # where the postgres role writes it (pgBackRest's default)
SCRATCH_PARENT = "/var/lib/postgresql"        # the db host's data volume: room for a restored copy
# What a snapshot's backup or a drill's restored copy leaves free, at least, on the repository's volume (the
# drill's scratch copy shares it): `opsbook_repo_keep_free_mb` in the inventory, this when it is unset.
REPO_KEEP_FREE_MB = 1024


def _meta_dir(repo_path: str) -> str:
    return f"{repo_path.rstrip('/')}/opsbook"


# Reads every metadata file in one command (one SSH round trip for a whole list), without the
# manifests: `list` needs the record and reason only. python3 is on every lab host (Ansible needs it).
_READ_ALL = (
    "import glob, json, os, sys\n"
    "out = {}\n"
    "for p in sorted(glob.glob(os.path.join(sys.argv[1], '*.json'))):\n"
    "    try:\n"
    "        d = json.load(open(p))\n"
    "    except (OSError, ValueError):\n"
    "        continue\n"
    "    d.pop('manifest', None)\n"
    "    out[os.path.basename(p)[:-5]] = d\n"
    "print(json.dumps(out))\n"
)


ANNOTATION_ENV = "opsbook-env"         # pgBackRest annotations on every backup opsbook takes
ANNOTATION_RECORD = "opsbook-record"


class LabSnapshots:
    """take / list / delete / drill for one lab environment (see the module's docstring)."""

    kind = "pgbackrest"

    def __init__(self, env, *, runner=None):
        self.env = env
        self.db_host = str(env.var("bl_api_db_host"))
        setting = env.host_var(self.db_host, "postgres_backup", "none")
        if setting != "pgbackrest":
            raise PathNotBuilt(
                f"{env.name}'s database host {self.db_host} has postgres_backup: {setting}, so its WAL is not archived "
                f"and there is no pgBackRest repository to snapshot into. Nothing was done. Set postgres_backup: "
                f"pgbackrest for {self.db_host} in {env.path}/group_vars/db/ and converge it (`invoke provision --env "
                f"{env.name} --hosts {self.db_host}`; the cluster restarts once to archive its WAL).")
        self.stanza = str(env.host_var(self.db_host, "postgres_backup_stanza", "main"))
        self.repo_path = str(env.host_var(self.db_host, "postgres_backup_repo", "/var/lib/postgresql/pgbackrest"))
        # Where the repository is and pgBackRest's commands run: another host (the lab: db2), or db1 itself.
        self.repo_host = str(env.host_var(self.db_host, "postgres_backup_repo_host", "") or self.db_host)
        version = env.host_var(self.db_host, "postgres_version", 15)
        cluster = env.host_var(self.db_host, "postgres_cluster", "main")
        self.runner = runner or SshRunner(env, self.repo_host)
        self.repo = pgbr.Repository(self.stanza, CONFIG, Path(f"/var/lib/postgresql/{version}/{cluster}"),
                                    runner=self.runner, sockets=SocketForwards(env, self.repo_host),
                                    cluster_elsewhere=self.repo_host != self.db_host)
        self.manifest_note = ""

    # -- opsbook's metadata beside each backup -------------------------------------------------
    def _meta_path(self, label: str) -> str:
        return f"{_meta_dir(self.repo_path)}/{label}.json"

    def _all_meta(self) -> dict[str, dict[str, Any]]:
        r = self.runner.run(["python3", "-c", _READ_ALL, _meta_dir(self.repo_path)], user="postgres", timeout=60)
        return json.loads(r.out or "{}")

    def _meta(self, label: str) -> dict[str, Any] | None:
        text = read_file(self.runner, self._meta_path(label), user="postgres")
        try:
            return json.loads(text) if text else None
        except ValueError:
            return None

    def _write_meta(self, label: str, meta: dict[str, Any]) -> None:
        self.runner.run(["install", "-d", "-m", "0750", _meta_dir(self.repo_path)], user="postgres", timeout=60)
        write_file(self.runner, self._meta_path(label), json.dumps(meta), user="postgres", mode="0640")

    def _snapshot(self, b: pgbr.Backup, meta: dict[str, Any] | None) -> Snapshot:
        # A backup opsbook started carries its annotation from the start; one without the metadata written
        # after it is what a snapshot stopped half-way (interrupted, killed) left: opsbook's, incomplete.
        annotated = b.annotation.get(ANNOTATION_ENV) == self.env.name
        ours = (bool(meta) and meta.get("env") == self.env.name) or (not meta and annotated)
        has_point = bool(meta and meta.get("restore_point"))
        reason = (meta or {}).get("reason")
        if annotated and not meta:
            reason = "left by a snapshot stopped before its restore point was marked (the next snapshot deletes it)"
        return Snapshot(
            id=b.id, kind=self.kind, source=f"{self.db_host} (stanza {self.stanza}, repository on {self.repo_host})",
            status="available" if has_point else ("incomplete" if meta or annotated else "available"),
            created=(meta or {}).get("point_at") or b.stopped,
            size_gb=round(b.size / 1e9, 3), engine="postgres",
            engine_version=str((meta or {}).get("server_version") or "") or None,
            ours=ours, record_id=(meta or {}).get("record_id") or b.annotation.get(ANNOTATION_RECORD), reason=reason)

    # -- the interface ------------------------------------------------------------------------
    def database(self):
        return None

    def can_take(self) -> tuple[bool, str]:
        """Whether a snapshot can be taken now: the repository answers on its host, and so does
        the database (a backup of a stopped cluster fails only once it has started, and the restore
        point needs a session)."""
        import psycopg

        from opsbook.engines.database import admin_conninfo

        try:
            code, message, backups = pgbr.stanza_status(self.repo)
        except (pgbr.BackupError, CommandFailed) as e:
            return False, f"pgBackRest on {self.repo_host} (the repository of {self.db_host}) does not answer ({e})"
        if code not in pgbr.STANZA_USABLE:
            # e.g. a repository host recreated and not converged since: Debian's own pgbackrest.conf answers
            # `info` for a repository that does not exist, and the backup would fail once started
            return False, (f"pgBackRest on {self.repo_host} has no usable stanza {self.stanza} for {self.db_host} "
                           f"({message}); converge both with `invoke provision --env {self.env.name} --hosts "
                           f"{','.join(dict.fromkeys([self.db_host, self.repo_host]))}`")
        try:
            with psycopg.connect(admin_conninfo(self.env)) as conn:
                size = int(conn.execute("SELECT sum(pg_database_size(oid)) FROM pg_database").fetchone()[0])
        except psycopg.Error as e:
            return False, f"the database on {self.db_host} does not answer ({str(e).strip().splitlines()[0]})"
        return self._room_for_backup(size, backups)

    def _keep_free(self) -> int:
        return int(float(self.env.var("opsbook_repo_keep_free_mb", REPO_KEEP_FREE_MB)) * 1024 * 1024)  # checked on load

    def _room_for_backup(self, cluster_bytes: int, backups: list[pgbr.Backup]) -> tuple[bool, str]:
        """Whether a full backup of a cluster of `cluster_bytes` fits in the repository holding `backups`
        (oldest first), leaving the reserve free.
        pgBackRest compresses, so the newest full backup's ratio (repository bytes per database byte) sizes
        the new one, with 10 % for growth; with no backup yet, the database's own size (no compression
        assumed). pgBackRest's backup checks no space itself: it writes until the disk is full, which would
        also stop the repository taking the cluster's WAL. Retention deletes old snapshots only once the new
        one exists, so the room must be there first."""
        fulls = [b for b in backups if b.type == "full" and b.size]
        ratio = (fulls[-1].repo_size / fulls[-1].size) if fulls else 1.0
        need = int(cluster_bytes * min(1.0, ratio) * 1.1)
        free, keep = free_bytes(self.runner, self.repo_path), self._keep_free()
        if free - need >= keep:
            return True, ""
        mb = 1024 * 1024
        return False, (f"no room for a full backup in the repository on {self.repo_host}: the cluster on "
                       f"{self.db_host} holds {cluster_bytes / mb:,.0f} MiB, which "
                       + (f"compresses like its last full backup to about {need / mb:,.0f} MiB" if fulls else
                          f"with no earlier backup to size it may take {need / mb:,.0f} MiB")
                       + f"; {self.repo_path} has {free / mb:,.0f} MiB free, and {keep / mb:,.0f} MiB must stay free "
                       f"there (opsbook_repo_keep_free_mb). Free {(need + keep - free) / mb:,.0f} MiB on "
                       f"{self.repo_host} (`invoke snapshot.list --env {self.env.name}` shows what each snapshot "
                       f"holds), then snapshot again")

    def in_use(self) -> dict[str, str]:
        """The backups a drill restores now (retention keeps them: deleting one under its restore makes the
        drill fail on missing files, seen on the lab)."""
        return pgbr.drills_in_progress(self.repo, SCRATCH_PARENT)

    def list(self) -> list[Snapshot]:
        """Every backup in the repository, newest first; opsbook's carry their record and reason."""
        try:
            backups = pgbr.list_backups(self.repo)
            metas = self._all_meta() if backups else {}
        except CommandFailed as e:
            raise SnapshotError(f"cannot list {self.env.name}'s snapshots: {e}. Nothing was changed.") from None
        return newest_first(self._snapshot(b, metas.get(b.id)) for b in backups)

    def take(self, *, record_id: str, reason: str, log: Callable[[str], None] = print,
             progress: list[dict[str, Any]] | None = None) -> Snapshot:
        """A full backup, then the restore point the manifest describes (writes to user tables pause
        for milliseconds), its manifest, and opsbook's metadata beside the backup. A point that cannot
        be marked deletes the backup it made: nothing half-made is left to be mistaken for a snapshot."""
        import time

        from opsbook.engines.database import admin_conninfo

        steps = progress if progress is not None else []
        t0 = time.monotonic()

        def say(step: str) -> None:
            steps.append({"seconds": round(time.monotonic() - t0, 1), "status": step})
            log(f"{self.env.name}: {step}")

        # Under the environment's lock (a snapshot's or a release's): no other snapshot is being made, so
        # an incomplete one of opsbook's was left by a snapshot that was stopped; it goes once the new
        # backup exists (pgBackRest never expires a repository's only full backup: a first snapshot
        # stopped half-way left exactly that, and deleting it first failed, seen on the lab).
        left = [s for s in self.list() if s.ours and s.status == "incomplete"]
        say(f"full backup of {self.db_host} (stanza {self.stanza}) with pgBackRest into its repository on "
            f"{self.repo_host}")
        b = pgbr.backup(self.repo, "full", annotations={ANNOTATION_ENV: self.env.name, ANNOTATION_RECORD: record_id})
        say(f"backup {b.id}: {b.size / 1e6:.1f} MB of database, {b.repo_size / 1e6:.1f} MB in the repository")
        for old in left:
            say(f"deleting backup {old.id}, left incomplete by a snapshot that was stopped (record {old.record_id})")
            self._forget(old.id, log)
        meta = {"env": self.env.name, "record_id": record_id, "reason": reason, "operator": facts.operator(),
                "backup": b.id}
        self._write_meta(b.id, meta)
        name = f"opsbook-{record_id}"
        say(f"restore point {name} and its manifest (writes pause while the point is marked)")
        try:
            lsn, pause_ms, m = pgbr.mark_point(admin_conninfo(self.env), name)
            pgbr._run(self.repo, "check", timeout=300)   # archives the segment that holds the point
        except BaseException as e:
            self._forget(b.id, log)
            if isinstance(e, Exception):
                raise SnapshotError(f"{self.env.name}: backup {b.id} was taken but its restore point and manifest "
                                    f"could not be ({type(e).__name__}: {e}); the backup was deleted again. The "
                                    f"database was not changed. Retry `invoke snapshot --env {self.env.name}`.") from e
            raise
        tables = m.get("tables") or {}
        meta.update({"restore_point": name, "restore_point_lsn": lsn, "write_pause_ms": pause_ms,
                     "point_at": m.get("taken_at"), "server_version": m.get("server_version"),
                     "database": m.get("database"), "manifest": m})
        self._write_meta(b.id, meta)
        rows = sum(int(t.get("rows") or 0) for t in tables.values())
        self.manifest_note = (
            f"manifest of {m.get('database')} at restore point {name} (LSN {lsn}; writes paused {pause_ms} ms): "
            f"{len(tables)} tables, {rows} rows, {len(m.get('sequences') or {})} sequences, schema hash "
            f"{(m.get('schema') or {}).get('hash', '?')[:16]}; read at "
            f"{(m.get('figures') or {}).get('mb_per_s')} MB/s. "
            f"Kept beside the backup in {self._meta_path(b.id)} on {self.repo_host}; `invoke snapshot.drill --env "
            f"{self.env.name} --snapshot {b.id}` restores the backup to that point and compares.")
        say(f"snapshot {b.id} at {name}: {len(tables)} tables, {rows} rows; writes paused {pause_ms} ms")
        return self._snapshot(b, meta)

    def _forget(self, label: str, log: Callable[[str], None]) -> None:
        """Delete a backup and its metadata (best effort; says what it could not)."""
        try:
            pgbr._run(self.repo, "expire", f"--set={label}", timeout=600)
            self.runner.run(["rm", "-f", "--", self._meta_path(label)], user="postgres", timeout=60)
        except (pgbr.BackupError, CommandFailed) as e:
            log(f"{self.env.name}: could not delete the unfinished backup {label} ({e}); it is listed as "
                f"`incomplete` and never drilled as a snapshot. Delete it with `pgbackrest --stanza={self.stanza} "
                f"expire --set={label}` on {self.repo_host}.")

    def delete(self, snapshot: Snapshot, *, log: Callable[[str], None] = print) -> None:
        """Delete one of opsbook's own snapshots of this environment (its metadata re-read here decides)."""
        meta = self._meta(snapshot.id)
        if not meta or meta.get("env") != self.env.name:
            raise SnapshotError(f"backup {snapshot.id} was not taken by opsbook for {self.env.name} (no metadata of "
                                f"its own says so); opsbook never deletes it. Nothing was deleted.")
        pgbr._run(self.repo, "expire", f"--set={snapshot.id}", timeout=600)
        self.runner.run(["rm", "-f", "--", self._meta_path(snapshot.id)], user="postgres", timeout=60)
        log(f"{self.env.name}: deleted snapshot {snapshot.id} (taken {snapshot.created}, record {snapshot.record_id})")

    def drill(self, snapshot_id: str | None = None, *, log: Callable[[str], None] = print,
              before_verify: Callable[[pgbr.Scratch], None] | None = None) -> DrillVerdict:
        """Restore the snapshot into a scratch cluster on the repository host, recompute and compare its
        manifest, run pg_amcheck, time it. `before_verify` (tests) sees the restored cluster first."""
        snaps = self.list()
        if snapshot_id:
            found = [s for s in snaps if s.id == snapshot_id]
            if not found:
                known = ", ".join(s.id for s in snaps[:10]) or "none"
                raise SnapshotError(f"no snapshot {snapshot_id!r} of {self.env.name} (its snapshots, newest first: "
                                    f"{known}). Nothing was done. `invoke snapshot.list --env {self.env.name}` "
                                    f"lists them.")
            snap = found[0]
        else:
            usable = [s for s in snaps if s.ours and s.status == "available"]
            if not usable:
                return DrillVerdict(snapshot="", verified=False, passed=False,
                                    problem=f"{self.env.name} has no snapshot taken by opsbook to drill (take one with "
                                            f"`invoke snapshot --env {self.env.name}`).")
            snap = usable[0]
        meta = self._meta(snap.id) or {}
        details: dict[str, Any] = {**snap.to_dict(), "restore_point": meta.get("restore_point")}
        if not meta.get("manifest") or not meta.get("restore_point"):
            return DrillVerdict(snapshot=snap.id, verified=False, passed=False, details=details,
                                problem=f"backup {snap.id} has no restore point and manifest taken by opsbook, so "
                                        f"nothing can say what its restored copy must hold.")
        backup = next(b for b in pgbr.list_backups(self.repo) if b.id == snap.id)
        ps = pgbr.Snapshot(backup, meta["restore_point"], meta.get("restore_point_lsn", ""),
                           float(meta.get("write_pause_ms") or 0), meta["manifest"])
        log(f"{self.env.name}: drilling snapshot {snap.id} (restore point {ps.restore_point}) on {self.repo_host}"
            + (f", off {self.db_host}" if self.repo_host != self.db_host else ""))
        result = pgbr.drill(self.repo, ps, meta["manifest"]["database"], scratch_parent=SCRATCH_PARENT,
                            before_verify=before_verify, progress=lambda m: log(f"{self.env.name}: {m}"),
                            workers=manifests.DEFAULT_WORKERS, keep_free=self._keep_free())
        details.update({"seconds": result.seconds, "differences": result.differences[:50],
                        "differences_total": len(result.differences), "amcheck": result.amcheck[-2000:],
                        "database": meta["manifest"]["database"], "size_mb": round(backup.size / 1e6, 1)})
        problem = result.problem
        if result.verified and not result.passed:
            found = result.differences[:3] + ([f"pg_amcheck: {result.amcheck[:300]}"] if result.amcheck else [])
            problem = f"{len(result.differences)} difference(s) from the manifest: " + "; ".join(found)
        return DrillVerdict(snapshot=snap.id, verified=result.verified, passed=result.passed, problem=problem,
                            details=details)
