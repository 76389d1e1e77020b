"""Backups of a Postgres cluster with pgBackRest, and the restore drill that proves one restores.

pgBackRest (Debian's 2.45) does the backing up, checksumming, WAL archiving and restoring; this
module only drives its CLI (`--output=json` where it reads), writes its configuration, and runs the
drill around it. Commands run on the cluster's host through a runner (``opsbook.engines.remote``:
this machine, or an inventory host over SSH, as the lab's db1 is) as the cluster's OS user
(`runuser -u postgres --`), because pgBackRest and Postgres refuse to work on a data directory as
root. Connections to a cluster that listens on a Unix socket only (the drill's scratch cluster) go
through the repository's `sockets` (locally the socket itself; on a remote host an SSH forward of
that socket to a port on 127.0.0.1, ``opsbook.engines.tunnel.forward_socket``).

**A manifest that describes exactly what the backup restores to.** A backup alone restores to its
consistency point (the end of the backup), which is some instant of a live database nobody read.
So `snapshot` takes the backup, then marks a point the manifest and the restore share:

1. one connection locks every user table IN SHARE MODE (under a short `lock_timeout`): in-flight
   writers finish (their commits are then visible and in the WAL), new writers wait;
2. a second connection opens a REPEATABLE READ transaction and exports its snapshot: it sees every
   committed row and nothing can commit to a user table until step 3 ends;
3. the first connection writes a named restore point (`pg_create_restore_point`) into the WAL,
   commits (writers resume: the pause lasts milliseconds and is measured) and switches the WAL
   segment so the archive receives the restore point;
4. the manifest is read from the exported snapshot, at leisure, while the service writes again.

The drill restores the backup with `--type=name --target=<that restore point>`: WAL replay stops at
the same instant the snapshot saw, so the restored database must match the manifest row for row.
Why not the alternatives: restoring to the backup's own end (`--type=immediate`) and taking the
manifest "around" the backup cannot line the two up on a busy database; a REPEATABLE READ snapshot
has no LSN of its own, and the commit order in the WAL can differ from the order in which commits
become visible, which is why writes are paused (briefly) rather than an LSN merely recorded.
Limits, said plainly: sequences are not transactional (`nextval` is not paused; the manifest
tolerates a restored sequence up to 32 values ahead, as Postgres WAL-logs them ahead), and a table
created while the point is being marked is not locked (it would show as a schema difference).

**The scratch cluster cannot harm the real one.** It is restored into a new directory with
`--archive-mode=off` (pgBackRest sets archive_mode=off in its postgresql.auto.conf) and started with
`archive_mode=off`, an empty `archive_command`, no TCP listener at all (`listen_addresses=''`) and a
Unix socket in its own 0700 directory, under an `hba_file` that only admits local socket
connections: the service cannot reach it and it cannot push WAL into the repository.

A drill that could not verify (restore, start, manifest or pg_amcheck failed) says so and never
passes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opsbook.core.errors import OpsbookError
from opsbook.engines.pgcluster import recovery_minimums
from opsbook.engines.remote import (
    LOCAL_SOCKETS,
    CommandFailed,
    LocalRunner,
    Runner,
    free_bytes,
    read_file,
    write_file,
)
from opsbook.engines.snapshots import manifest as manifests

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PGBACKREST = "pgbackrest"
BACKUP_TYPES = ("full", "diff", "incr")


class BackupError(OpsbookError):
    """pgBackRest or the cluster refused a backup step."""


def local_run_as(user: str = "postgres") -> list[str]:
    """The prefix that runs a command as the cluster's OS user on this machine (nothing when we are it)."""
    return ["runuser", "-u", user, "--"] if os.geteuid() == 0 else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _OnHost:
    """Where a repository's or a scratch cluster's commands run, as whom, and how its sockets are reached."""

    run_as: tuple[str, ...]
    runner: Runner | None
    sockets: Any

    @property
    def host(self) -> Runner:
        return self.runner or LocalRunner()

    @property
    def user(self) -> str | None:
        """The OS user commands run as on the host (None: whoever runs them locally)."""
        return "postgres" if (self.run_as or self.runner is not None) else None

    @property
    def reach(self):
        return self.sockets or LOCAL_SOCKETS


@dataclass(frozen=True)
class Repository(_OnHost):
    """A pgBackRest stanza: the cluster it backs up and where its repository lives."""

    stanza: str
    config: Path                       # the pgbackrest.conf on the host the commands run on
    pg_path: Path                      # the cluster's data directory
    run_as: tuple[str, ...] = ()       # non-empty: commands run as the cluster's OS user (postgres)
    runner: Runner | None = None       # where the commands run (None: this machine)
    sockets: Any = None                # how a Unix socket directory on that host is reached (None: locally)
    # The commands run on a repository host whose configuration reaches the cluster on another host
    # (pg1-host): a restore there is local to this host (`--reset-pg1-host`, which pgBackRest also
    # writes into the restored cluster's restore_command, so its archive-get reads the repository here).
    cluster_elsewhere: bool = False

    @property
    def archive_command(self) -> str:
        """What the cluster's `archive_command` must be for this stanza."""
        return f"{PGBACKREST} --config={self.config} --stanza={self.stanza} archive-push %p"


def write_config(  # noqa: PLR0917 - one pgbackrest.conf's settings
    config: Path, stanza: str, repo_path: Path, pg_path: Path, pg_port: int, pg_socket: Path,
    *, retention_full: int = 2, process_max: int = 2, run_as: list[str] | None = None,
) -> Repository:
    """Write a pgbackrest.conf for one local stanza (repository, logs and locks under `repo_path`)."""
    repo_path = Path(repo_path)
    for d in (repo_path, repo_path / "log", repo_path / "lock"):
        d.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(d, "postgres", "postgres")
    repo_path.chmod(0o750)
    config.write_text(
        "[global]\n"
        f"repo1-path={repo_path}\n"
        f"repo1-retention-full={retention_full}\n"
        f"log-path={repo_path / 'log'}\n"
        f"lock-path={repo_path / 'lock'}\n"
        "log-level-console=warn\n"
        "log-level-file=info\n"
        f"process-max={process_max}\n"
        "start-fast=y\n"
        "compress-type=lz4\n"
        f"\n[{stanza}]\n"
        f"pg1-path={pg_path}\n"
        f"pg1-port={pg_port}\n"
        f"pg1-socket-path={pg_socket}\n"
    )
    config.chmod(0o644)
    return Repository(stanza, config, Path(pg_path), tuple(local_run_as() if run_as is None else run_as))


@dataclass(frozen=True)
class Backup:
    """One backup in the repository, as `pgbackrest info` reports it."""

    id: str              # pgBackRest's label, e.g. 20261130-094501F_20261130-095010I
    type: str            # full, diff, incr
    started: str         # ISO 8601, UTC
    stopped: str
    size: int            # bytes of the database it holds
    repo_size: int       # bytes it takes in the repository (compressed, incremental)
    lsn_start: str
    lsn_stop: str
    prior: str | None    # the backup an incremental builds on
    annotation: dict[str, str] = field(default_factory=dict)   # `backup --annotation` key/values


def _run(repo: Repository, *args: str, timeout: float = 3600) -> str:
    cmd = [PGBACKREST, f"--config={repo.config}", f"--stanza={repo.stanza}", *args]
    where = repo.host
    try:
        proc = where.run(cmd, user=repo.user, timeout=timeout, check=False)
    except CommandFailed as e:
        if e.code == -1:
            raise BackupError(f"pgbackrest {args[0]} on {where.host} did not finish within {timeout:.0f} s and was "
                              f"stopped; see its log under the log-path of {repo.config}. Rerun when the cause is "
                              "fixed.") from e
        raise BackupError(f"pgbackrest {args[0]} did not run: {e}") from e
    if proc.code == 127:
        raise BackupError(f"pgbackrest is not installed on {where.host} (./run installs Debian's pgbackrest here; "
                          "the lab image has it: `invoke lab.up` recreates a host that runs an older image); nothing "
                          "was done")
    if proc.code != 0:
        said = (proc.err.strip() or proc.out.strip())[-1500:]
        raise BackupError(f"pgbackrest {args[0]} failed on {where.host} (exit {proc.code}): {said}. pgBackRest's own "
                          f"log is under the log-path of {repo.config}; a backup that failed is never listed as one. "
                          "Fix the cause and rerun.")
    return proc.out


def stanza_create(repo: Repository) -> None:
    """Create the stanza (idempotent) and check that WAL archiving reaches the repository."""
    _run(repo, "stanza-create")
    _run(repo, "check", timeout=120)


def backup(repo: Repository, kind: str = "full", annotations: dict[str, str] | None = None) -> Backup:
    """Take a backup (`full`, `diff` or `incr`); returns it as listed afterwards. `annotations` are
    written into the backup's own manifest by pgBackRest (`--annotation`, 2.41+) from its start, so a
    backup whose caller was stopped before it could say anything more still says whose it is."""
    if kind not in BACKUP_TYPES:
        raise BackupError(f"unknown backup type {kind!r}; pgBackRest takes {', '.join(BACKUP_TYPES)}. "
                          "Nothing was done.")
    before = {b.id for b in list_backups(repo)}
    _run(repo, "backup", f"--type={kind}", *(f"--annotation={k}={v}" for k, v in (annotations or {}).items()))
    new = [b for b in list_backups(repo) if b.id not in before]
    if len(new) != 1:
        raise BackupError(f"pgbackrest reported success but {len(new)} new backup(s) are listed; check "
                          f"`pgbackrest --config={repo.config} info` before relying on this backup")
    return new[0]


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _stanza_info(repo: Repository) -> dict[str, Any] | None:
    """The stanza's entry in pgBackRest's `info --output=json` (None: the repository does not list it)."""
    return next((s for s in json.loads(_run(repo, "info", "--output=json") or "[]")
                 if s.get("name") == repo.stanza), None)


def _backups(stanza: dict[str, Any] | None) -> list[Backup]:
    return [Backup(
        id=b["label"], type=b["type"], started=_iso(b["timestamp"]["start"]),
        stopped=_iso(b["timestamp"]["stop"]), size=b["info"]["size"],
        repo_size=b["info"]["repository"]["delta"], lsn_start=b["lsn"]["start"],
        lsn_stop=b["lsn"]["stop"], prior=b.get("prior"),
        annotation={str(k): str(v) for k, v in (b.get("annotation") or {}).items()},
    ) for b in (stanza or {}).get("backup", [])]


def list_backups(repo: Repository) -> list[Backup]:
    """Every backup of the stanza, oldest first (pgBackRest's `info --output=json`)."""
    return _backups(_stanza_info(repo))


# pgBackRest's stanza status codes that still take a backup: ok, and "no valid backups" (a new stanza).
STANZA_USABLE = (0, 2)


def stanza_status(repo: Repository) -> tuple[int, str, list[Backup]]:
    """The stanza's status in the repository as `pgbackrest info` gives it, (code, message), e.g.
    (0, "ok"), (2, "no valid backups"), (1, "missing stanza path") where the host's configuration does
    not point at a repository holding the stanza (a repository host recreated and not converged); and
    its backups, oldest first, from the same `info` (one command over SSH for both)."""
    stanza = _stanza_info(repo)
    if stanza is None:
        return 99, f"no stanza {repo.stanza} in the repository", []
    status = stanza.get("status") or {}
    return int(status.get("code", 99)), str(status.get("message", "no status")), _backups(stanza)


# --- the point the manifest and the restore share ---------------------------------------------
@dataclass
class Snapshot:
    """A backup plus the restore point and manifest that describe the same instant."""

    backup: Backup
    restore_point: str
    restore_point_lsn: str
    write_pause_ms: float          # how long writers to user tables waited while the point was marked
    manifest: dict[str, Any] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Snapshot:
        return cls(**{**d, "backup": Backup(**d["backup"])})


def mark_point(
    conninfo: str, name: str, *, lock_timeout_ms: int = 2000, chunk_rows: int = manifests.DEFAULT_CHUNK_ROWS,
    workers: int = manifests.DEFAULT_WORKERS, progress: Callable[[str], None] | None = None,
) -> tuple[str, float, dict[str, Any]]:
    """Write restore point `name` and take the manifest of exactly that instant (see the module's
    docstring). Returns (restore point LSN, write pause in ms, manifest)."""
    import psycopg
    from psycopg import sql

    pauser = psycopg.connect(conninfo, autocommit=True, application_name="opsbook-restore-point")
    reader = psycopg.connect(conninfo, autocommit=True, application_name="opsbook-manifest")
    try:
        tables = [r[0] for r in pauser.execute(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = "
            "c.relnamespace WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', "
            "'information_schema') AND n.nspname !~ '^pg_(toast|temp)' ORDER BY 1").fetchall()]
        pauser.execute("BEGIN")
        pauser.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{lock_timeout_ms}ms")))
        t0 = time.monotonic()
        try:
            if tables:
                pauser.execute(f"LOCK TABLE {', '.join(tables)} IN SHARE MODE")
        except psycopg.errors.LockNotAvailable as e:
            pauser.execute("ROLLBACK")
            raise BackupError(f"could not pause writes within {lock_timeout_ms} ms to mark the snapshot's "
                              "point (a long transaction holds a table). The backup is kept but has no "
                              "manifest yet; retry when the long transaction has ended.") from e
        reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        snap = reader.execute("SELECT pg_export_snapshot()").fetchone()[0]
        lsn = pauser.execute("SELECT pg_create_restore_point(%s)::text", (name,)).fetchone()[0]
        pauser.execute("COMMIT")
        pause_ms = (time.monotonic() - t0) * 1000
        pauser.execute("SELECT pg_switch_wal()")
        m = manifests.take(conninfo, chunk_rows=chunk_rows, workers=workers, snapshot=snap, progress=progress)
        reader.execute("COMMIT")
    finally:
        pauser.close()
        reader.close()
    return lsn, round(pause_ms, 1), m


def snapshot(
    repo: Repository, conninfo: str, *, kind: str = "full", name: str | None = None,
    chunk_rows: int = manifests.DEFAULT_CHUNK_ROWS, workers: int = manifests.DEFAULT_WORKERS,
    progress: Callable[[str], None] | None = None,
) -> Snapshot:
    """A backup, then its restore point and the manifest of that point. The restore point's WAL is
    archived before this returns (pgBackRest `check` waits for the current segment)."""
    say = progress or (lambda _m: None)
    say(f"backup ({kind})")
    b = backup(repo, kind)
    name = name or f"opsbook-{b.id}"
    say(f"restore point {name} and its manifest")
    lsn, pause_ms, m = mark_point(conninfo, name, chunk_rows=chunk_rows, workers=workers, progress=progress)
    _run(repo, "check", timeout=300)  # archives a WAL switch: the restore point is in the repository
    return Snapshot(b, name, lsn, pause_ms, m)


# --- the drill ------------------------------------------------------------------------------
@dataclass
class Scratch(_OnHost):
    """A restored cluster only this process can reach (socket in a private directory, no TCP)."""

    base: Path
    data: Path
    port: int
    run_as: tuple[str, ...]
    runner: Runner | None = None       # the host it runs on (None: this machine)
    sockets: Any = None                # how its socket directory is reached (None: locally)

    @property
    def conninfo(self) -> str:
        return self.db("postgres")

    def db(self, name: str) -> str:
        return f"{self.reach.conninfo(self.base, self.port)} user=postgres dbname={name}"

    def stop(self) -> None:
        # the host did not answer, or pg_ctl hung: remove() says nothing either way
        with contextlib.suppress(CommandFailed):
            self.host.run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"], user=self.user,
                          check=False, timeout=120)

    def stop_now(self) -> None:
        """Stop it without waiting for clients (a cluster nobody should be using any more)."""
        with contextlib.suppress(CommandFailed):
            self.host.run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"], user=self.user,
                          check=False, timeout=120)

    def remove(self) -> None:
        self.reach.close(self.base, self.port)
        self.stop()
        _remove_dir(self.host, self.base)


# Stop whatever still works in a scratch directory (a restore whose drill was interrupted goes on
# writing there on the host: its ssh client died, the remote command did not), then remove it, the
# owner file last so that a removal that fails is still found, and retried, by the next drill.
# The path is passed with its first character in brackets, and used so as a pattern: it matches the
# processes that name the path and not the shells that carry it (pkill -f reads whole command lines,
# and the path itself must appear in none of ours).
_STOP_AND_REMOVE = (
    'pat="$1"; p=$(printf %s "$pat" | tr -d "[]"); '
    'if pgrep -f -- "$pat" >/dev/null; then pkill -TERM -f -- "$pat"; i=0; '
    'while pgrep -f -- "$pat" >/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; '
    'pkill -KILL -f -- "$pat"; fi; '
    'rm -rf --one-file-system -- "$p/data" && rm -rf --one-file-system -- "$p"')


def _remove_dir(host: Runner, path: Path) -> None:
    made_here = path.is_absolute() and path.name.startswith("opsbook-drill-")   # a name only mktemp here gives
    with contextlib.suppress(CommandFailed):
        if made_here:
            host.run(["/bin/sh", "-c", _STOP_AND_REMOVE, "sh", f"[{str(path)[0]}]{str(path)[1:]}"], check=False,
                     timeout=600)
        elif not isinstance(host, LocalRunner):
            host.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=False, timeout=600)
    if isinstance(host, LocalRunner):
        shutil.rmtree(path, ignore_errors=True)


def _private_dir(repo: Repository, base: Path) -> None:
    """Make `base` a 0700 directory owned by the cluster's user on the repository's host."""
    owner = ["-o", "postgres", "-g", "postgres"] if repo.user and (repo.runner is not None or os.geteuid() == 0) else []
    repo.host.run(["install", "-d", "-m", "0700", *owner, str(base)], timeout=60)


@dataclass
class DrillResult:
    """What a restore drill found. `passed` only when it verified and found no difference."""

    backup: str
    restore_point: str
    verified: bool = False                       # every check ran to the end
    passed: bool = False
    problem: str | None = None                   # why it could not verify
    differences: list[str] = field(default_factory=list)
    amcheck: str = ""                            # pg_amcheck's findings (empty: none)
    seconds: dict[str, float] = field(default_factory=dict)   # restore, recovery, usable, manifest, amcheck

    @property
    def verdict(self) -> str:
        if not self.verified:
            return f"NOT VERIFIED: {self.problem} The drill did not pass."
        if self.passed:
            return (f"passed: backup {self.backup} restored to {self.restore_point} matches its manifest "
                    f"and pg_amcheck found nothing; usable after {self.seconds.get('usable', 0):.1f} s")
        found = len(self.differences) + (1 if self.amcheck else 0)
        return f"FAILED: {found} problem(s) in the restored copy of {self.backup} (listed)"


# Room a restored copy needs beyond the backup's database size: archive recovery fetches one WAL segment at a
# time (RECOVERYXLOG, replaced by the next) and the promotion starts a new timeline and checkpoints, so a few
# segments; 64 MiB covers them with room to spare.
RESTORE_WAL_ALLOWANCE = 64 * 1024 * 1024


def room_problem(repo: Repository, snap: Snapshot, path: str, keep_free: int) -> str | None:
    """Why the filesystem holding `path` (a scratch directory) on the repository's host has no room for
    `snap` restored while leaving `keep_free` bytes free (None: it has). The drill's scratch copy usually
    shares that filesystem with the repository (the lab: db2's data volume), so a restore that filled it
    would stop the repository taking WAL and backups: refused before pgBackRest writes anything.
    pgBackRest's restore does not check this itself; it fails with ENOSPC once the disk is full."""
    free = free_bytes(repo.host, path)
    needed = snap.backup.size + RESTORE_WAL_ALLOWANCE
    if free - needed >= keep_free:
        return None
    mb = 1024 * 1024
    return (f"no room for the restored copy on {repo.host.host}: backup {snap.backup.id} restores to "
            f"{snap.backup.size / mb:,.0f} MiB of database (+{RESTORE_WAL_ALLOWANCE // mb} MiB for recovery's "
            f"WAL), the filesystem holding {Path(path).parent} has {free / mb:,.0f} MiB free, and "
            f"{keep_free / mb:,.0f} MiB must stay free there (opsbook_repo_keep_free_mb: the repository "
            f"shares it). Nothing was restored and the repository was not touched. Free "
            f"{(needed + keep_free - free) / mb:,.0f} MiB on {repo.host.host}, then drill again.")


def restore(repo: Repository, snap: Snapshot, base: Path, *, timeout: float = 1800) -> tuple[Scratch, dict]:
    """Restore `snap` into `base/data`, start it where only we can reach it, wait until it has
    replayed to the restore point and been promoted. Returns the cluster and its timings."""

    _private_dir(repo, base)
    data = base / "data"
    times: dict[str, float] = {}
    t0 = time.monotonic()
    _run(repo, "restore", *(["--reset-pg1-host"] if repo.cluster_elsewhere else []), f"--set={snap.backup.id}",
         f"--pg1-path={data}", "--type=name", f"--target={snap.restore_point}", "--target-action=promote",
         "--archive-mode=off", timeout=timeout)
    times["restore"] = time.monotonic() - t0
    # A cluster whose configuration lives outside its data directory (Debian's /etc/postgresql/…, as on a
    # lab db host) restores without postgresql.conf and pg_ident.conf: empty ones, the settings below.
    repo.host.run(["/bin/sh", "-c", 'for f; do [ -e "$f" ] || : > "$f"; done', "sh", str(data / "postgresql.conf"),
                   str(data / "pg_ident.conf")], user=repo.user, timeout=60)
    hba = base / "pg_hba.conf"
    write_file(repo.host, str(hba), "local all all trust\n", user=repo.user)
    port = free_port()   # names the socket file only: the cluster listens on no TCP port
    scratch = Scratch(base, data, port, repo.run_as, repo.runner, repo.sockets)
    opts = (f"-c port={port} -c listen_addresses='' -c unix_socket_directories={base} "
            f"-c archive_mode=off -c archive_command='' -c hba_file={hba} -c cluster_name=opsbook-drill"
            + "".join(f" -c {k}={v}" for k, v in recovery_minimums(repo.host, str(data), user=repo.user).items()))
    try:
        _start_and_wait(scratch, opts, snap.restore_point, timeout)
    except BaseException:
        scratch.stop()  # never leave a half-started cluster behind (the caller removes its directory)
        raise
    times["usable"] = time.monotonic() - t0
    times["recovery"] = times["usable"] - times["restore"]
    return scratch, times


def _start_and_wait(scratch: Scratch, opts: str, point: str, timeout: float) -> None:
    """Start the restored cluster and wait until it has replayed to `point` and been promoted."""
    import psycopg

    base = scratch.base
    proc = scratch.host.run(
        [str(PG_BIN / "pg_ctl"), "-D", str(scratch.data), "-o", opts, "-l", str(base / "log"),
         "-t", str(int(timeout)), "-w", "start"], user=scratch.user, check=False, timeout=timeout + 30)
    if proc.code != 0:
        log = (read_file(scratch.host, str(base / "log"), user=scratch.user) or proc.err)[-1500:]
        raise BackupError(f"the restored cluster did not start: {log.strip()}")
    deadline = time.monotonic() + timeout
    while True:
        with psycopg.connect(scratch.conninfo, autocommit=True) as conn:
            if not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                return
        if time.monotonic() > deadline:
            raise BackupError(f"the restored cluster was still recovering after {timeout:.0f} s (did the "
                              f"archive lose the WAL up to {point}?)")
        time.sleep(0.2)


def databases(conninfo: str) -> list[str]:
    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as conn:
        return [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1").fetchall()]


def amcheck(scratch: Scratch, dbname: str, *, timeout: float = 3600) -> tuple[bool, str]:
    """pg_amcheck over every relation of `dbname` (heap and btree indexes, every heap tuple looked
    up in its indexes). Installs the amcheck extension in the scratch copy only."""
    cmd = [str(PG_BIN / "pg_amcheck"), "-h", str(scratch.base), "-p", str(scratch.port),
           "-U", "postgres", "--install-missing", "--heapallindexed", "--no-strict-names", "-d", dbname]
    proc = scratch.host.run(cmd, user=scratch.user, check=False, timeout=timeout)
    said = (proc.out + proc.err).strip()
    if proc.code == 0:
        return True, said
    if proc.code == 2:  # pg_amcheck: corruption found
        return False, said
    raise BackupError(f"pg_amcheck could not run (exit {proc.code}): {said[-1000:]}")


ORPHAN_AGE_S = 600             # a scratch directory without an owner file older than this is no live drill's
OWNER_FILE = "opsbook-owner"   # in a scratch directory: "<controller host> <pid> <process start> <backup>" of its drill


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner(backup_id: str) -> str:
    return f"{socket.gethostname()} {os.getpid()} {_start_ticks(os.getpid())} {backup_id}\n"


def _scratch_listing(repo: Repository, parent: str) -> list[list[str]]:
    """Each scratch directory under `parent` with its owner ("<dir> <host> <pid> <ticks> [<backup>]": the
    backup is missing from an older opsbook's), or without one, its age in seconds ("<dir> - <age>": its
    drill stopped between making it and writing the owner, or while removing it)."""
    listing = repo.host.run(["/bin/sh", "-c", 'now=$(date +%s); for d in "$1"/opsbook-drill-*; do [ -d "$d" ] || '
                             'continue; if [ -f "$d/' + OWNER_FILE + '" ]; then printf "%s %s\\n" "$d" "$(head -c 200 '
                             '"$d/' + OWNER_FILE + '")"; else printf "%s - %s\\n" "$d" $((now - $(stat -c %Y "$d")));'
                             ' fi; done; true', "sh", parent], timeout=60, check=False).out
    return [line.split() for line in listing.splitlines()]


def _alive(host: str, pid: str, ticks: str) -> bool:
    """Whether the drill that wrote an owner file still runs: on this controller, its process with the same
    start time; on another, nobody here can tell, so it is taken as running."""
    return host != socket.gethostname() or (pid.isdigit() and _start_ticks(int(pid)) == ticks)


def drills_in_progress(repo: Repository, parent: str) -> dict[str, str]:
    """backup id -> what is drilling it now (a scratch directory whose drill still runs): retention keeps
    those, since deleting a backup while it is restored makes the drill fail on missing files."""
    found = {}
    for parts in _scratch_listing(repo, parent):
        if len(parts) == 5 and _alive(*parts[1:4]):
            found[parts[4]] = f"being drilled now (into {parts[0]} on {repo.host.host}, by {parts[1]} pid {parts[2]})"
    return found


def remove_stale_scratch(repo: Repository, parent: str, say: Callable[[str], None]) -> list[str]:
    """Stop and remove the scratch clusters under `parent` that a drill from this controller left
    when it was killed (its process is gone); a live drill's, or another controller's, is left and named.
    One without an owner older than ORPHAN_AGE_S is no live drill's: removed too."""
    removed = []
    for parts in _scratch_listing(repo, parent):
        if len(parts) == 3 and parts[1] == "-" and parts[2].lstrip("-").isdigit():
            if int(parts[2]) > ORPHAN_AGE_S:
                _remove_dir(repo.host, Path(parts[0]))
                removed.append(parts[0])
                say(f"removed {parts[0]} on {repo.host.host}: a scratch directory without its owner, "
                    f"{int(parts[2]) // 60} min old (a drill stopped while making or removing it)")
            continue
        if len(parts) not in (4, 5):
            continue
        base, host, pid, ticks = parts[:4]
        mine = host == socket.gethostname()
        if mine and not _alive(host, pid, ticks):
            Scratch(Path(base), Path(base) / "data", 0, repo.run_as, repo.runner, repo.sockets).stop_now()
            _remove_dir(repo.host, Path(base))
            removed.append(base)
            say(f"removed {base} on {repo.host.host}: the scratch cluster of a drill that was stopped before it could "
                f"clean up (pid {pid} is gone)")
        elif not mine or pid != str(os.getpid()):
            say(f"left {base} on {repo.host.host}: the scratch cluster of a drill still running"
                + ("" if mine else f" on {host}, or one {host} left (remove it there once no drill runs)"))
    return removed


def drill(
    repo: Repository, snap: Snapshot, dbname: str, *, scratch_dir: Path | None = None,
    scratch_parent: str | None = None, keep: bool = False,
    chunk_rows: int | None = None, workers: int = manifests.DEFAULT_WORKERS,
    before_verify: Callable[[Scratch], None] | None = None, progress: Callable[[str], None] | None = None,
    keep_free: int = 0,
) -> DrillResult:
    """Restore `snap` into a scratch cluster, recompute the manifest of `dbname` there, compare it
    with the one taken at the snapshot's point, run pg_amcheck, and time it all. Never raises for a
    failed check: the result says what failed, and a drill that could not verify does not pass.
    `before_verify` sees the restored cluster before it is checked (tests tamper with it there).
    The scratch cluster lives in `scratch_dir`, or a new directory under `scratch_parent` (default:
    the host's temporary directory) on the repository's host. `keep_free`: bytes that must stay free on
    the scratch directory's filesystem once the copy is restored (checked first: see `room_problem`)."""
    say = progress or (lambda _m: None)
    result = DrillResult(snap.backup.id, snap.restore_point)
    scratch = None
    base = None
    try:
        if scratch_parent and not scratch_dir:
            remove_stale_scratch(repo, scratch_parent, say)
        base = Path(scratch_dir) if scratch_dir else Path(repo.host.run(
            ["mktemp", "-d", *(["-p", scratch_parent] if scratch_parent else ["-t"]), "opsbook-drill-XXXXXXXX"],
            timeout=60).out.strip())
        write_file(repo.host, str(base / OWNER_FILE), _owner(snap.backup.id), mode="0644")
        result.problem = room_problem(repo, snap, str(base), keep_free)
        if result.problem is None:
            say(f"restoring {snap.backup.id} to {snap.restore_point} into {base}")
            scratch, times = restore(repo, snap, base)
            result.seconds.update({k: round(v, 2) for k, v in times.items()})
            if before_verify:
                before_verify(scratch)
            say("recomputing the manifest")
            t = time.monotonic()
            actual = manifests.take(scratch.db(dbname), chunk_rows=chunk_rows or snap.manifest["chunk_rows"],
                                    workers=workers, like=snap.manifest, progress=progress)
            result.seconds["manifest"] = round(time.monotonic() - t, 2)
            result.differences = manifests.compare(snap.manifest, actual)
            say("pg_amcheck")
            t = time.monotonic()
            clean, said = amcheck(scratch, dbname)
            result.seconds["amcheck"] = round(time.monotonic() - t, 2)
            result.amcheck = "" if clean else said
            result.verified = True
            result.passed = not result.differences and clean
    except Exception as e:  # noqa: BLE001 - any failure means "not verified", said in the result
        result.problem = f"{type(e).__name__}: {str(e).strip()}"
    finally:
        if scratch is not None and not keep:
            scratch.remove()
        elif scratch is None and not keep and base is not None:
            _remove_dir(repo.host, base)
    say(result.verdict)
    return result
