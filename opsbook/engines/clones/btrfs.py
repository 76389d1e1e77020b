"""Copy-on-write clones of a Postgres cluster on btrfs: a streaming standby of the source, kept on a
btrfs filesystem, snapshotted and promoted as a separate cluster.

**The mechanism.** On the clone host (the lab's ``db2``; in tests, this machine) a btrfs filesystem
(a loop-mounted image file under the configured base directory, or a btrfs device an operator
mounted at ``<base>/mnt``) holds a streaming standby of the source cluster in a subvolume, fed through
a physical replication slot on the source (the source keeps the WAL the standby has not received, so
a standby that was down catches up instead of needing a new base backup). A clone is:

1. *catch up*: the source's current WAL position is read and the standby waited for until it has
   received (and written to its ``pg_wal``) at least that much: the clone holds every transaction the
   source had committed when the clone was asked for;
2. *restartpoint*: ``CHECKPOINT`` on the standby, so the clone's crash recovery starts from a recent
   point (its cost is the standby's dirty buffers, not the database's size);
3. *snapshot*: ``btrfs subvolume snapshot`` of the standby's subvolume, an atomic copy-on-write copy
   of the whole data directory (metadata only; it takes the same time for 1 GB or 1 TB);
4. *promote*: the copy's own settings are rewritten (no ``primary_conninfo``, no slot, no
   ``restore_command``, ``archive_mode=off`` and an empty ``archive_command`` so it can never push WAL
   into the source's archive, no synchronous standbys, its own port and ``cluster_name``), it is
   started in *private mode* (no TCP listener, its socket in the base directory's 0700 ``run/``
   directory, an hba that admits only local socket connections) and promoted (``pg_ctl promote``: a new
   timeline, so its WAL can never be mistaken for the source's). Nobody but the clone host's postgres
   and root can reach the unmasked copy while it is masked;
5. *switch* (:meth:`BtrfsClones.switch`): the clone is restarted in *service mode* (the service port,
   its listen addresses and hba) in place of the clone that served before; that one is stopped but
   kept until the new one has started, and started again if the new one does not.

**Why a crash-consistent copy is enough.** A btrfs snapshot is atomic over the subvolume: the copy
holds every file as it was at one instant, including data written but not yet flushed (btrfs flushes
the subvolume's pending writes as it snapshots). That is what Postgres' own crash safety is built
for: after a power loss the data files may hold any mix of old and new pages, and WAL replay from the
last checkpoint (restartpoint, on a standby) repairs it, with full-page images covering torn pages.
The snapshot is strictly better than a power loss (no write is lost), provided the data files,
``pg_wal`` and ``pg_control`` are in the same snapshot: they are (one subvolume), and a source with
tablespaces outside its data directory is refused, since those would not be. The clone's point is
exact and recorded: the end of the WAL it holds, which its timeline history file names after the
promotion (``clone_lsn``).

**Time does not grow with the size**: catch-up depends on the standby's lag, the restartpoint on its
dirty buffers, the snapshot on metadata, recovery on the WAL since the last checkpoint (bounded by
``checkpoint_timeout`` / ``max_wal_size``). Only setting the standby up (``pg_basebackup``, once per
clone host and source) copies the whole database. What a clone then does costs space as it changes
blocks: masking rewrites every masked row, so a masked clone holds its own copy of those tables
(``btrfs filesystem du``'s *exclusive* figure, which :meth:`BtrfsClones.usage` reports).

Every command runs through a :class:`~opsbook.engines.clones.runner.Runner` (local subprocess today;
the same calls over SSH later), as root or as the cluster's OS user; only the checks of the source (is
it reachable, its slot, its system identifier) connect from the controller with psycopg.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from opsbook.core.errors import OpsbookError
from opsbook.engines.clones.runner import CommandFailed, Runner, read_file, write_file
from opsbook.engines.pgcluster import recovery_minimums
from opsbook.engines.remote import LOCAL_SOCKETS, free_bytes

PG_BIN = "/usr/lib/postgresql/15/bin"
SLOT_RE = re.compile(r"^[a-z0-9_]{1,63}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MASK_GROWTH = 2.5                        # what a masked clone holds of its own, per byte of its database
CLONE_WAL_ALLOWANCE = 256 * 1024 * 1024  # a clone's crash recovery, promotion and checkpoint write WAL
BTRFS_TOOLS = ("mkfs.btrfs", "btrfs", "mount", "umount", "mountpoint", "truncate", "stat")
PG_TOOLS = ("pg_basebackup", "pg_ctl", "pg_controldata", "psql")
# Settings a clone never keeps from the standby it was copied from (they are set again below).
CLONE_RESET = ("primary_conninfo", "primary_slot_name", "restore_command", "archive_mode", "archive_command",
               "archive_library", "synchronous_standby_names", "cluster_name", "port", "listen_addresses",
               "unix_socket_directories", "hba_file", "ident_file", "external_pid_file", "hot_standby",
               "recovery_target", "recovery_target_lsn", "recovery_target_name", "recovery_target_time",
               "recovery_target_xid", "recovery_target_action", "promote_trigger_file", "recovery_init_sync_method",
               "wal_init_zero", "wal_recycle")


# PostgreSQL's advice for copy-on-write filesystems: new WAL segments are not zero-filled first and old
# ones are not recycled (on btrfs both only cost writes: a recycled segment is rewritten elsewhere anyway).
COW_WAL = {"wal_init_zero": "off", "wal_recycle": "off"}


class CloneError(OpsbookError):
    """The clone machinery refused or failed; the message says what was left as it was."""


@dataclass(frozen=True)
class Source:
    """The cluster to clone: where the standby (on the clone host) and the controller reach it, as a
    role that may replicate (REPLICATION or superuser)."""

    host: str
    port: int
    user: str
    password: str | None = None
    dbname: str = "postgres"           # the controller's checks connect here

    def conninfo(self) -> str:
        from psycopg.conninfo import make_conninfo

        return make_conninfo(host=self.host, port=self.port, user=self.user, password=self.password or None,
                             dbname=self.dbname, connect_timeout=5, application_name="opsbook-refresh")

    def describe(self) -> str:
        return f"{self.host}:{self.port} (as {self.user})"


@dataclass(frozen=True)
class Settings:
    """Where and how the clone host keeps the standby and its clones (an inventory's choices)."""

    base: str                                  # base directory on the clone host
    image_gb: int = 20                         # size of the loop image (sparse) when opsbook makes one
    standby_port: int = 5499                   # the standby's port (socket only: it never listens on TCP)
    private_port: int = 5470                   # first port tried for a clone in private mode (socket only)
    slot: str = "opsbook_refresh"              # the physical replication slot on the source
    listen_addresses: str | None = None        # a clone's in service mode (None: what its configuration says)
    hba_file: str | None = None                # a clone's pg_hba.conf in service mode (None: its data directory's)
    pg_bin: str = PG_BIN
    os_user: str = "postgres"
    timeout: float = 600                       # seconds any one step may take
    keep_free_mb: float = 1024                 # what a refresh leaves free at least, in the image and under it

    def __post_init__(self) -> None:
        if not SLOT_RE.match(self.slot):
            raise CloneError(f"replication slot name {self.slot!r}: lower-case letters, digits and _ only (at most "
                             f"63). Nothing was changed.")
        if not self.base.startswith("/") or self.base.rstrip("/") in ("", "/"):
            raise CloneError(f"the clone base directory must be an absolute path below / (got {self.base!r}). "
                             "Nothing was changed.")


@dataclass
class Clone:
    """A clone made from the standby: its subvolume, data directory and the point it holds."""

    name: str
    path: str
    data: str
    private_port: int
    clone_lsn: str | None = None               # the end of the source's WAL the clone holds
    caught_up_to: str | None = None            # the source's WAL position it was asked to include
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quote(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _conf_key(line: str) -> str | None:
    m = re.match(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*=", line)
    return m.group(1).lower() if m else None


def rewrite_auto_conf(text: str, settings: dict[str, str | None]) -> str:
    """postgresql.auto.conf with every key in `settings` removed, then set again (None: left unset)."""
    marker = "# set by opsbook's clone machinery (opsbook/engines/clones/btrfs.py)"
    kept = [ln for ln in text.splitlines() if _conf_key(ln) not in settings and ln != marker]
    added = [f"{k} = {_quote(v)}" for k, v in settings.items() if v is not None]
    return "\n".join([*kept, marker, *added]) + "\n"


class BtrfsClones:
    """The standby and clones of one source on one clone host (see the module's docstring)."""

    def __init__(self, runner: Runner, settings: Settings, *, log: Callable[[str], None] = print, sockets=None):
        self.r = runner
        self.s = settings
        self.log = log
        self.sockets = sockets or LOCAL_SOCKETS   # how this machine reaches the clone host's socket directory
        base = settings.base.rstrip("/")
        self.base = base
        self.image = f"{base}/btrfs.img"
        self.mnt = f"{base}/mnt"
        self.run_dir = f"{base}/run"
        self.private_hba = f"{base}/run/private.hba"
        self.passfile = f"{base}/run/replication.pgpass"
        self.standby = f"{self.mnt}/standby"
        self.standby_data = f"{self.standby}/data"
        self.clones_dir = f"{self.mnt}/clones"
        self.unfinished_dir = f"{self.mnt}/unfinished"
        self.current_link = f"{self.mnt}/current"

    def __repr__(self) -> str:
        return f"BtrfsClones({self.r.host}:{self.base})"

    # -- small helpers -------------------------------------------------------------------------
    def _pg(self, tool: str) -> str:
        return f"{self.s.pg_bin}/{tool}"

    def _exists(self, path: str) -> bool:
        return self.r.run(["test", "-e", path], check=False).code == 0

    def _sql(self, port: int, sql: str, *, dbname: str = "postgres") -> str:
        """One statement through psql on the clone host's socket, as the cluster's OS user."""
        return self.r.run([self._pg("psql"), "-h", self.run_dir, "-p", str(port), "-U", self.s.os_user, "-d", dbname,
                           "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql],
                          user=self.s.os_user, timeout=self.s.timeout).out.strip()

    def _log_tail(self, name: str) -> str:
        text = read_file(self.r, f"{self.run_dir}/{name}.log") or ""
        return text.strip()[-800:]

    def clone_path(self, name: str) -> str:
        return f"{self.clones_dir}/{name}"

    def conninfo(self, port: int, dbname: str = "postgres") -> str:
        """Superuser conninfo through the clone host's socket directory: the socket itself when the
        host is this machine, an SSH forward of it otherwise (`sockets`). The cluster must be running."""
        return f"{self.sockets.conninfo(self.run_dir, port)} user={self.s.os_user} dbname={dbname}"

    # -- tools and the filesystem ----------------------------------------------------------------
    def check_host(self) -> None:
        """Refuse, before anything is changed, a clone host without btrfs (tools or kernel), without
        Postgres 15's tools, or where this runner is not root (mounting needs it)."""
        missing = [t for t in BTRFS_TOOLS
                   if self.r.run(["/bin/sh", "-c", 'command -v "$1"', "sh", t], check=False).code != 0]
        if missing:
            raise CloneError(f"{self.r.host} lacks {', '.join(missing)}: btrfs-progs (and util-linux) must be "
                             f"installed there (`apt-get install btrfs-progs`; ./run installs it on the controller). "
                             f"Nothing was changed: no filesystem, standby or clone was made.")
        kernel = self.r.run(["/bin/sh", "-c", "grep -qw btrfs /proc/filesystems || modprobe btrfs"], check=False)
        if kernel.code != 0:
            raise CloneError(f"the kernel of {self.r.host} has no btrfs (not in /proc/filesystems, and `modprobe "
                             f"btrfs` failed: {kernel.err.strip()[-300:]}). Nothing was changed. Use a host whose "
                             f"kernel has btrfs.")
        pg_missing = [t for t in PG_TOOLS if self.r.run(["test", "-x", self._pg(t)], check=False).code != 0]
        if pg_missing:
            raise CloneError(f"{self.r.host} lacks {', '.join(pg_missing)} in {self.s.pg_bin} (postgresql-15). "
                             f"Nothing was changed.")
        if self.r.run(["id", "-u"]).out.strip() != "0":
            raise CloneError(f"the clone machinery on {self.r.host} must run as root (it mounts a filesystem). "
                             f"Nothing was changed.")

    def ensure_filesystem(self) -> dict[str, Any]:
        """The btrfs filesystem at <base>/mnt: mounted already, or the loop image made (first time)
        and mounted. Returns its size, use and how it came to be."""
        run = self.r.run
        run(["mkdir", "-p", self.mnt, self.run_dir])
        run(["chown", f"{self.s.os_user}:", self.run_dir])
        run(["chmod", "0700", self.run_dir])
        if run(["test", "-w", self.run_dir], user=self.s.os_user, check=False).code != 0:
            raise CloneError(f"{self.s.os_user} cannot reach {self.run_dir} on {self.r.host} (a directory above "
                             f"{self.base} is closed to it). Nothing else was changed. Choose a base directory "
                             f"{self.s.os_user} can traverse (opsbook_refresh_dir).")
        how = "already mounted"
        if run(["mountpoint", "-q", self.mnt], check=False).code != 0:
            if not self._exists(self.image):
                self.log(f"{self.r.host}: making a {self.s.image_gb} GB btrfs image (sparse) at {self.image}")
                run(["truncate", "-s", f"{int(self.s.image_gb)}G", self.image])
                run(["mkfs.btrfs", "-q", "-L", "opsbook-clones", self.image])
                how = "made and mounted"
            else:
                how = "mounted"
            run(["mount", "-o", "loop,noatime", self.image, self.mnt])
        kind = run(["stat", "-f", "-c", "%T", self.mnt]).out.strip()
        if kind != "btrfs":
            raise CloneError(f"{self.mnt} on {self.r.host} is a {kind} filesystem, not btrfs: snapshots need btrfs. "
                             f"Nothing was changed. Unmount it, or choose another opsbook_refresh_dir.")
        run(["mkdir", "-p", self.clones_dir])
        if not self._exists(self.private_hba):
            write_file(self.r, self.private_hba, "local all all trust\n", user=self.s.os_user)
        return {**self.fs_usage(), "how": how}

    def room_problem(self, database_bytes: int) -> str | None:
        """Why a clone of a database of `database_bytes`, masked, may not fit (None: it fits), checked before
        the clone is made. Masking rewrites every masked row and builds indexes again, so a masked clone
        comes to hold about twice its database of its own (measured: 10.8 GB for a 6.1 GB database, 2.9
        GB for 1.2 GB); MASK_GROWTH of the size, plus the WAL a clone's start and promotion write, must be
        free in the btrfs filesystem, and the loop image, sparse, takes whatever it grows by from the
        filesystem under it, which the clone host's own data (its database, a repository) shares. Both
        keep `keep_free_mb` free. A filesystem that fills half-way turns btrfs read-only under the
        standby and the serving clone; this refuses first."""
        mb = 1024 * 1024
        keep = int(self.s.keep_free_mb * mb)
        need = int(MASK_GROWTH * database_bytes) + CLONE_WAL_ALLOWANCE
        problems = []
        inside = self.fs_usage()["free_bytes"]
        if inside - need < keep:
            problems.append(f"the btrfs filesystem at {self.mnt} has {inside / mb:,.0f} MiB free, and a masked clone "
                            f"of the {database_bytes / mb:,.0f} MiB database needs about {need / mb:,.0f} MiB with "
                            f"{keep / mb:,.0f} MiB left free (opsbook_refresh_keep_free_mb): discard older clones "
                            f"(opsbook_refresh_keep) or make the image larger (opsbook_refresh_image_gb)")
        if self._exists(self.image):
            size, blocks, block = (int(x) for x in self.r.run(["stat", "-c", "%s %b %B", self.image]).out.split())
            grows = max(0, min(need, size - blocks * block))   # what the sparse image can still take
            under = free_bytes(self.r, self.base)
            if under - grows < keep:
                problems.append(f"the loop image {self.image} ({size / mb:,.0f} MiB, {blocks * block / mb:,.0f} MiB "
                                f"of it allocated) may grow by {grows / mb:,.0f} MiB, and the filesystem under it "
                                f"has {under / mb:,.0f} MiB free, {keep / mb:,.0f} MiB of which must stay free "
                                f"(opsbook_refresh_keep_free_mb): free space on {self.r.host}")
        if not problems:
            return None
        return f"no room for a new clone on {self.r.host}: " + "; ".join(problems) + "."

    def fs_usage(self) -> dict[str, int]:
        out = self.r.run(["df", "-B1", "--output=size,used,avail", self.mnt]).out.split()
        return {"size_bytes": int(out[-3]), "used_bytes": int(out[-2]), "free_bytes": int(out[-1])}

    def usage(self, name: str) -> dict[str, int]:
        """A clone's size: total bytes, bytes it holds alone (changed since the snapshot), bytes shared."""
        out = self.r.run(["btrfs", "filesystem", "du", "-s", "--raw", self.clone_path(name)]).out.splitlines()
        total, exclusive, shared = (int(x) for x in out[-1].split()[:3])
        return {"total_bytes": total, "exclusive_bytes": exclusive, "shared_bytes": shared}

    # -- the source --------------------------------------------------------------------------------
    def source_facts(self, source: Source) -> dict[str, Any]:
        """What the source says about itself and the slot (read-only, from the controller). Refuses a
        source that is unreachable, cannot stream to a standby, or has tablespaces."""
        import psycopg

        try:
            conn = psycopg.connect(source.conninfo(), autocommit=True)
        except psycopg.OperationalError as e:
            raise CloneError(f"the source {source.describe()} is not reachable: {' '.join(str(e).split())} Nothing was "
                             f"changed: no standby, slot or clone was made, and the clones on {self.r.host} are as "
                             f"they were. Check that it runs and admits {source.user}, then rerun.") from None
        with conn:
            row = conn.execute(
                "SELECT (SELECT system_identifier::text FROM pg_control_system()), current_setting('wal_level'), "
                "current_setting('max_wal_senders')::int, pg_is_in_recovery(), "
                "(SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user), "
                "(SELECT array_agg(spcname) FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global'))"
            ).fetchone()
            slot = conn.execute(
                "SELECT s.slot_type, s.active, s.active_pid, s.wal_status, r.application_name, r.client_addr::text "
                "FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid "
                "WHERE s.slot_name = %s", (self.s.slot,)).fetchone()
        facts = {"system_identifier": row[0], "wal_level": row[1], "max_wal_senders": row[2], "in_recovery": row[3],
                 "may_replicate": bool(row[4]), "tablespaces": row[5] or [],
                 "slot": None if slot is None else {"type": slot[0], "active": slot[1], "pid": slot[2],
                                                    "wal_status": slot[3], "client": slot[4], "address": slot[5]}}
        problems = []
        if facts["wal_level"] not in ("replica", "logical"):
            problems.append(f"wal_level is {facts['wal_level']} (a standby needs replica or logical)")
        if facts["max_wal_senders"] < 1:
            problems.append("max_wal_senders is 0")
        if not facts["may_replicate"]:
            problems.append(f"{source.user} has neither REPLICATION nor SUPERUSER")
        if facts["tablespaces"]:
            problems.append(f"it has tablespaces outside its data directory ({', '.join(facts['tablespaces'])}), "
                            "which one snapshot of the standby's data directory would not hold atomically")
        if facts["slot"] and facts["slot"]["type"] != "physical":
            problems.append(f"its slot {self.s.slot} is a {facts['slot']['type']} slot, not a physical one")
        if problems:
            raise CloneError(f"the source {source.describe()} cannot feed a standby: " + "; ".join(problems)
                             + ". Nothing was changed (no standby, slot or clone). Fix the source, then rerun.")
        return facts

    def refuse_slot_in_use(self, source: Source, facts: dict[str, Any]) -> None:
        slot = facts["slot"]
        if not slot or not slot["active"]:
            return
        mine = self.standby_exists() and self.standby_running() and self._streaming_on_slot()
        if not mine:
            raise CloneError(
                f"the replication slot {self.s.slot} on {source.describe()} is in use by another standby (walsender "
                f"pid {slot['pid']}, client {slot['client'] or '?'} at {slot['address'] or 'a local socket'}), not by "
                f"the standby on {self.r.host}. Nothing was changed: the slot, that standby and the clones on "
                f"{self.r.host} are as they were. Give this clone host its own slot (opsbook_refresh_slot), or stop "
                f"the other standby.")

    # -- the standby ---------------------------------------------------------------------------------
    def standby_exists(self) -> bool:
        return self._exists(f"{self.standby_data}/PG_VERSION")

    def standby_running(self) -> bool:
        return self.r.run([self._pg("pg_ctl"), "status", "-D", self.standby_data], user=self.s.os_user,
                          check=False).code == 0

    def _streaming_on_slot(self) -> bool:
        try:
            got = self._sql(self.s.standby_port,
                            "SELECT status || ' ' || coalesce(slot_name, '') FROM pg_stat_wal_receiver")
        except CommandFailed:
            return False
        return got == f"streaming {self.s.slot}"

    def _system_identifier(self, data: str) -> str:
        out = self.r.run([self._pg("pg_controldata"), "-D", data], user=self.s.os_user).out
        m = re.search(r"Database system identifier:\s*(\d+)", out)
        return m.group(1) if m else "?"

    def ensure_standby(self, source: Source) -> dict[str, Any]:
        """The standby of `source` on the clone host, streaming through the slot: made the first time
        (a base backup: the only step whose time grows with the database), started if it was stopped.
        Returns what was done and the source's facts."""
        self.check_host()
        facts = self.source_facts(source)          # refuses an unreachable or unfit source, changing nothing
        self.refuse_slot_in_use(source, facts)
        fs = self.ensure_filesystem()
        done: dict[str, Any] = {"filesystem": fs, "source": {k: v for k, v in facts.items() if k != "slot"}}
        t0 = time.monotonic()
        if not self.standby_exists():
            self._make_standby(source, facts)
            done["standby"] = "made (base backup)"
        else:
            have = self._system_identifier(self.standby_data)
            if have != facts["system_identifier"]:
                raise CloneError(
                    f"the standby on {self.r.host} ({self.standby_data}) follows another cluster (system identifier "
                    f"{have}; the source {source.describe()} is {facts['system_identifier']}): it was made from an "
                    f"earlier source. Nothing was changed. Remove it (stop it, then `btrfs subvolume delete "
                    f"{self.standby}`) and refresh again: a new base backup is taken.")
            # The source's address, role or password may have changed since the standby was made (a
            # password rotated, or a lab whose secrets another checkout made): it streams with today's.
            changed = self._write_passfile(source)
            auto = read_file(self.r, f"{self.standby_data}/postgresql.auto.conf", user=self.s.os_user) or ""
            wanted = rewrite_auto_conf(auto, self._standby_settings(source))
            if wanted != auto:
                write_file(self.r, f"{self.standby_data}/postgresql.auto.conf", wanted, user=self.s.os_user)
                changed = True
            if self.standby_running():
                if changed:
                    self.r.run([self._pg("pg_ctl"), "reload", "-D", self.standby_data], user=self.s.os_user)
                done["standby"] = "running" + (" (its connection to the source updated)" if changed else "")
            else:
                self._start(self.standby_data, "standby")
                done["standby"] = "started"
            self.resume_replay()   # a refresh stopped while its scan held the standby still leaves it paused
        self._wait_streaming(source)
        done["seconds"] = round(time.monotonic() - t0, 2)
        return done

    def _standby_settings(self, source: Source) -> dict[str, str | None]:
        from psycopg.conninfo import make_conninfo

        conn = make_conninfo(host=source.host, port=source.port, user=source.user, application_name=self.s.slot,
                             passfile=self.passfile if source.password else None, connect_timeout=10)
        return {
            "primary_conninfo": conn, "primary_slot_name": self.s.slot, "port": str(self.s.standby_port),
            "listen_addresses": "", "unix_socket_directories": self.run_dir, "hba_file": self.private_hba,
            "ident_file": f"{self.standby_data}/pg_ident.conf", "external_pid_file": "", "archive_mode": "off",
            "archive_command": "", "archive_library": "", "hot_standby": "on", "synchronous_standby_names": "",
            "cluster_name": f"opsbook-standby-{self.s.slot}", "restore_command": "", **COW_WAL,
        }

    def _make_standby(self, source: Source, facts: dict[str, Any]) -> None:
        run, user = self.r.run, self.s.os_user
        create_slot = facts["slot"] is None
        self.log(f"{self.r.host}: setting up the standby of {source.describe()} (base backup into {self.standby}; "
                 + ("creating" if create_slot else "reusing the inactive") + f" slot {self.s.slot})")
        if facts["slot"] and facts["slot"]["wal_status"] == "lost":
            raise CloneError(f"the slot {self.s.slot} on {source.describe()} has lost the WAL it held (wal_status "
                             f"lost), so no standby can start from it. Nothing was changed. Drop it on the source "
                             f"(SELECT pg_drop_replication_slot('{self.s.slot}')) and refresh again.")
        run(["btrfs", "subvolume", "create", self.standby])
        run(["chown", f"{user}:", self.standby])
        run(["chmod", "0700", self.standby])
        self._write_passfile(source)
        from psycopg.conninfo import make_conninfo

        conn = make_conninfo(host=source.host, port=source.port, user=source.user, application_name=self.s.slot,
                             passfile=self.passfile if source.password else None, connect_timeout=10)
        cmd = [self._pg("pg_basebackup"), "-D", self.standby_data, "-d", conn, "-X", "stream", "-S", self.s.slot,
               "-c", "fast", "-w", *(["-C"] if create_slot else [])]
        outcome: dict[str, Any] = {}

        def backup() -> None:
            try:
                run(cmd, user=user, timeout=24 * 3600)
            except CommandFailed as e:
                outcome["error"] = e

        worker = threading.Thread(target=backup, daemon=True)
        t0 = time.monotonic()
        worker.start()
        while worker.is_alive():
            worker.join(5)
            if worker.is_alive():
                self.log(f"{self.r.host}: base backup {self._backup_progress(source)}, {time.monotonic() - t0:.0f} s")
        if "error" in outcome:
            run(["btrfs", "subvolume", "delete", self.standby], check=False)
            dropped = self._drop_slot(source) if create_slot else False
            slot_note = ", and the slot it created dropped" if dropped else ""
            raise CloneError(f"the base backup of {source.describe()} failed: {outcome['error']}. The half-made "
                             f"standby on {self.r.host} was removed{slot_note}. Nothing else was changed. Fix the "
                             f"cause and rerun.")
        self.log(f"{self.r.host}: base backup done in {time.monotonic() - t0:.1f} s")
        if not self._exists(f"{self.standby_data}/postgresql.conf"):
            # Debian keeps a cluster's configuration in /etc/postgresql, outside what a base backup copies.
            write_file(self.r, f"{self.standby_data}/postgresql.conf",
                       "# written by opsbook: the source keeps its configuration outside its data directory\n",
                       user=user)
        if not self._exists(f"{self.standby_data}/pg_ident.conf"):
            write_file(self.r, f"{self.standby_data}/pg_ident.conf", "", user=user)
        auto = read_file(self.r, f"{self.standby_data}/postgresql.auto.conf", user=user) or ""
        minimums = {k: str(v) for k, v in recovery_minimums(self.r, self.standby_data, user=user,
                                                               pg_bin=self.s.pg_bin).items()}
        write_file(self.r, f"{self.standby_data}/postgresql.auto.conf",
                   rewrite_auto_conf(auto, {**minimums, **self._standby_settings(source)}), user=user)
        write_file(self.r, f"{self.standby_data}/standby.signal", "", user=user)
        self._start(self.standby_data, "standby")

    def _write_passfile(self, source: Source) -> bool:
        """The standby's password file for `source` (none without a password). True when it changed."""
        if not source.password:
            return False
        line = ":".join(x.replace("\\", "\\\\").replace(":", "\\:")
                        for x in (source.host, str(source.port), "*", source.user, source.password)) + "\n"
        if read_file(self.r, self.passfile, user=self.s.os_user) == line:
            return False
        write_file(self.r, self.passfile, line, user=self.s.os_user)
        return True

    def _backup_progress(self, source: Source) -> str:
        import psycopg

        try:
            with psycopg.connect(source.conninfo(), autocommit=True) as conn:
                row = conn.execute("SELECT phase, backup_streamed, backup_total FROM pg_stat_progress_basebackup"
                                   ).fetchone()
        except psycopg.Error:
            return "(progress unknown)"
        if not row:
            return "(no progress reported: starting, or writing its last WAL)"
        done = (row[1] or 0) / 1e6
        return f"{row[0]}: {done:,.0f} MB" + (f" of {row[2] / 1e6:,.0f} MB" if row[2] else "")

    def _drop_slot(self, source: Source) -> bool:
        import psycopg

        for _ in range(20):   # a walsender can take a moment to let go of the slot
            try:
                with psycopg.connect(source.conninfo(), autocommit=True) as conn:
                    row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                                       (self.s.slot,)).fetchone()
                    if row is None:
                        return False
                    if not row[0]:
                        conn.execute("SELECT pg_drop_replication_slot(%s)", (self.s.slot,))
                        return True
            except psycopg.Error:
                return False
            time.sleep(0.5)
        return False

    def _wait_streaming(self, source: Source) -> None:
        deadline = time.monotonic() + min(self.s.timeout, 120)
        while not self._streaming_on_slot():
            if time.monotonic() > deadline:
                raise CloneError(f"the standby on {self.r.host} does not stream from {source.describe()} through slot "
                                 f"{self.s.slot}; its log says: {self._log_tail('standby')[-800:]}. No clone was made; "
                                 f"the clones on {self.r.host} are as they were.")
            time.sleep(0.3)

    def standby_conninfo(self, dbname: str = "postgres") -> str:
        return self.conninfo(self.s.standby_port, dbname)

    def pause_replay(self) -> None:
        """Hold the standby at the point it has replayed to (long reads then meet no recovery conflict);
        the slot keeps the source's WAL meanwhile. :meth:`resume_replay` lets it go on."""
        self._sql(self.s.standby_port, "SELECT pg_wal_replay_pause()")

    def resume_replay(self) -> None:
        self._sql(self.s.standby_port, "SELECT pg_wal_replay_resume()")

    def catch_up(self, source: Source) -> str:
        """Wait until the standby has received everything the source had written when this was called;
        returns that WAL position."""
        import psycopg

        with psycopg.connect(source.conninfo(), autocommit=True) as conn:
            target = conn.execute("SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() "
                                  "ELSE pg_current_wal_flush_lsn() END::text").fetchone()[0]
        t0, last = time.monotonic(), 0.0
        while True:
            lag = self._sql(self.s.standby_port, f"SELECT coalesce(pg_wal_lsn_diff('{target}', "
                                                 "pg_last_wal_receive_lsn()), 1)::bigint")
            if int(lag) <= 0:
                return target
            if time.monotonic() - t0 > self.s.timeout:
                raise CloneError(f"the standby on {self.r.host} is still {int(lag):,} bytes behind {source.describe()} "
                                 f"after {self.s.timeout:.0f} s. No clone was made; the clones are as they were.")
            if time.monotonic() - last > 5:
                self.log(f"{self.r.host}: standby {int(lag):,} bytes behind the source, waiting")
                last = time.monotonic()
            time.sleep(0.1)

    # -- clusters ------------------------------------------------------------------------------------
    def _start(self, data: str, name: str, options: str | None = None) -> None:
        cmd = [self._pg("pg_ctl"), "-D", data, "-l", f"{self.run_dir}/{name}.log", "-w", "-t", str(int(self.s.timeout)),
               *(["-o", options] if options else []), "start"]
        try:
            self.r.run(cmd, user=self.s.os_user, timeout=self.s.timeout + 30)
        except CommandFailed as e:
            self.r.run([self._pg("pg_ctl"), "-D", data, "-m", "immediate", "stop"], user=self.s.os_user, check=False)
            raise CloneError(f"the cluster {name} on {self.r.host} did not start ({e}); its log: "
                             f"{self._log_tail(name)}") from None

    def _stop(self, data: str) -> None:
        self.r.run([self._pg("pg_ctl"), "-D", data, "-m", "fast", "-w", "-t", str(int(self.s.timeout)), "stop"],
                   user=self.s.os_user, check=False, timeout=self.s.timeout + 30)

    def running(self, name: str) -> bool:
        return self.r.run([self._pg("pg_ctl"), "status", "-D", f"{self.clone_path(name)}/data"], user=self.s.os_user,
                          check=False).code == 0

    def _private_port(self) -> int:
        port = self.s.private_port
        while self._exists(f"{self.run_dir}/.s.PGSQL.{port}") or port == self.s.standby_port:
            port += 1
        return port

    def _private_options(self, port: int) -> str:
        # A clone in private mode is disposable (any failure deletes it, and it serves only after a clean
        # shutdown and a restart with these back at their defaults), so masking's rewrite of every row
        # need not pay for torn-page protection or a flush per commit.
        return (f"-c port={port} -c listen_addresses='' -c hba_file={self.private_hba} -c full_page_writes=off "
                f"-c synchronous_commit=off")

    # -- clones --------------------------------------------------------------------------------------
    def clone(self, name: str, *, service_port: int, source: Source | None = None) -> Clone:
        """A new clone of the standby, promoted and running in private mode (see the module's
        docstring). With `source`, the standby first catches up with the source's current position.
        On failure the half-made clone is removed; the standby and other clones are untouched."""
        if not NAME_RE.match(name):
            raise CloneError(f"clone name {name!r}: letters, digits, _ . - (at most 63). Nothing was changed.")
        path = self.clone_path(name)
        if self._exists(path):
            raise CloneError(f"a clone named {name} exists on {self.r.host} already. Nothing was changed.")
        if not (self.standby_exists() and self.standby_running()):
            raise CloneError(f"no running standby on {self.r.host} to clone (ensure_standby makes it). Nothing was "
                             f"changed.")
        c = Clone(name=name, path=path, data=f"{path}/data", private_port=self._private_port())
        # Marked unfinished before it exists: until its maker calls finished(), it holds the source's data as
        # it is. A maker stopped for good (SIGKILL, a lost connection) leaves the mark, and discard_unfinished()
        # and prune() delete the clone whatever its age (see finished()).
        self.r.run(["install", "-d", "-m", "0700", self.unfinished_dir])
        self.r.run(["touch", f"{self.unfinished_dir}/{name}"])
        t0 = time.monotonic()
        try:
            if source is not None:
                c.caught_up_to = self.catch_up(source)
            c.seconds["catch_up"] = round(time.monotonic() - t0, 3)
            t = time.monotonic()
            self._sql(self.s.standby_port, "CHECKPOINT")
            c.seconds["restartpoint"] = round(time.monotonic() - t, 3)
            t = time.monotonic()
            self.r.run(["btrfs", "subvolume", "snapshot", self.standby, path])
            c.seconds["snapshot"] = round(time.monotonic() - t, 3)
            t = time.monotonic()
            self._prepare(c, service_port)
            self._start(c.data, name, self._private_options(c.private_port))
            c.seconds["start"] = round(time.monotonic() - t, 3)
            t = time.monotonic()
            self.r.run([self._pg("pg_ctl"), "-D", c.data, "-w", "-t", str(int(self.s.timeout)), "promote"],
                       user=self.s.os_user, timeout=self.s.timeout + 30)
            self._check_promoted(c)
            c.seconds["promote"] = round(time.monotonic() - t, 3)
            c.clone_lsn = self._clone_point(c)
        except (CloneError, CommandFailed) as e:
            self.discard(name)
            raise CloneError(f"clone {name} on {self.r.host} could not be made: {e}. The half-made clone was removed; "
                             f"the standby and the other clones are as they were.") from None
        c.seconds["usable"] = round(time.monotonic() - t0, 3)
        self.log(f"{self.r.host}: clone {name} usable after {c.seconds['usable']:.1f} s (snapshot "
                 f"{c.seconds['snapshot']:.2f} s, holds the source up to {c.clone_lsn})")
        return c

    def _check_promoted(self, c: Clone) -> None:
        if self._sql(c.private_port, "SELECT pg_is_in_recovery()") != "f":
            raise CloneError(f"clone {c.name} is still in recovery after its promotion")

    def _prepare(self, c: Clone, service_port: int) -> None:
        user = self.s.os_user
        self.r.run(["rm", "-f", f"{c.data}/postmaster.pid", f"{c.data}/postmaster.opts"])
        hba = self.s.hba_file or f"{c.data}/pg_hba.conf"
        if not self._exists(hba):
            raise CloneError(f"the clone has no pg_hba.conf at {hba} (the source keeps it outside its data directory, "
                             f"as Debian does): set opsbook_refresh_hba_file to the one staging's clones serve with")
        settings: dict[str, str | None] = dict.fromkeys(CLONE_RESET)
        settings.update({
            "primary_conninfo": "", "primary_slot_name": "", "restore_command": "", "archive_mode": "off",
            "archive_command": "", "archive_library": "", "synchronous_standby_names": "",
            "cluster_name": f"opsbook-clone-{c.name}", "port": str(service_port),
            "listen_addresses": self.s.listen_addresses, "unix_socket_directories": self.run_dir, "hba_file": hba,
            "ident_file": f"{c.data}/pg_ident.conf", "external_pid_file": "",
            # Crash recovery first fsyncs every file of the data directory, one by one (a walk that grows
            # with the database); syncfs makes it one call for the filesystem.
            "recovery_init_sync_method": "syncfs", **COW_WAL,
        })
        auto = read_file(self.r, f"{c.data}/postgresql.auto.conf", user=user) or ""
        write_file(self.r, f"{c.data}/postgresql.auto.conf", rewrite_auto_conf(auto, settings), user=user)
        write_file(self.r, f"{c.data}/standby.signal", "", user=user)

    def _clone_point(self, c: Clone) -> str | None:
        """Where the clone's history leaves the source's: its timeline history file's last switch point."""
        tli = self._sql(c.private_port, "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)")
        text = read_file(self.r, f"{c.data}/pg_wal/{tli}.history", user=self.s.os_user) or ""
        lines = [ln.split() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        return lines[-1][1] if lines and len(lines[-1]) > 1 else None

    def switch(self, name: str) -> str | None:
        """Serve clone `name` in service mode in place of the current one (stopped, kept). When it does
        not start, the previous one is started again. Returns the previous clone's name."""
        previous = self.current()
        try:
            self._stop(f"{self.clone_path(name)}/data")
            if previous and previous != name and self.running(previous):
                self._stop(f"{self.clone_path(previous)}/data")
            self._start(f"{self.clone_path(name)}/data", name)
            self._link_current(name)
        except BaseException as e:   # an interrupt half-way too: the previous clone must serve again
            if not isinstance(e, CloneError):
                self._stop(f"{self.clone_path(name)}/data")   # a start cut short may still be coming up
            if previous and previous != name:
                self._link_current(previous)
            back = ""
            if previous and previous != name:
                try:
                    if not self.running(previous):   # an interrupt may have come before its stop did
                        self._start(f"{self.clone_path(previous)}/data", previous)
                    back = f" The previous clone {previous} was started again and serves as before."
                except CloneError as again:
                    back = f" The previous clone {previous} did not start again either ({again}): start it by hand."
            else:
                back = " No earlier clone served here."
            if not isinstance(e, Exception):
                self.log(f"{self.r.host}: switch to {name} stopped.{back}")
                raise
            raise CloneError(f"clone {name} did not take over the service: {e}.{back}") from None
        return previous

    def _link_current(self, name: str) -> None:
        """Point `current` at clone `name` (atomically: a new link renamed over the old)."""
        self.r.run(["ln", "-sfn", f"clones/{name}", f"{self.current_link}.new"])
        self.r.run(["mv", "-T", f"{self.current_link}.new", self.current_link])

    def current(self) -> str | None:
        """The clone that serves (the `current` link), or None."""
        r = self.r.run(["readlink", self.current_link], check=False)
        return r.out.strip().rsplit("/", 1)[-1] if r.code == 0 and r.out.strip() else None

    def names(self) -> list[str]:
        """Every clone on the host, oldest first (names start with their time)."""
        r = self.r.run(["ls", "-1", self.clones_dir], check=False)
        return sorted(n for n in r.out.split() if n) if r.code == 0 else []

    def finished(self, name: str) -> None:
        """Say clone `name` is what its maker wanted (staging's refresh: masked, verified, its credentials
        given), so it may be kept and served. A clone is marked unfinished from before its snapshot until
        this is called; clones made before the mark existed have none and count as finished."""
        self.r.run(["rm", "-f", f"{self.unfinished_dir}/{name}"])

    def unfinished(self) -> list[str]:
        """Clones (or marks whose clone was never made) not yet said finished, oldest first."""
        r = self.r.run(["ls", "-1", self.unfinished_dir], check=False)
        return sorted(n for n in r.out.split() if n) if r.code == 0 else []

    def discard_unfinished(self) -> list[str]:
        """Delete every unfinished clone that does not serve: one its maker stopped before finishing (a
        refresh killed, or its connection lost, before masking ended holds unmasked data). Returns them."""
        current = self.current()
        gone = [n for n in self.unfinished() if n != current]
        for n in gone:
            self.discard(n)
            self.log(f"{self.r.host}: deleted clone {n}, left unfinished by a stopped maker")
        return gone

    def stop(self, name: str) -> None:
        self._stop(f"{self.clone_path(name)}/data")

    def discard(self, name: str) -> None:
        """Stop a clone and delete its subvolume (and its log; and the `current` link if it named it)."""
        path = self.clone_path(name)
        if self.current() == name:
            self.r.run(["rm", "-f", self.current_link])
        if self._exists(f"{path}/data"):
            self._stop(f"{path}/data")
        if self._exists(path):
            self.r.run(["btrfs", "subvolume", "delete", path])
        self.r.run(["rm", "-f", f"{self.run_dir}/{name}.log", f"{self.unfinished_dir}/{name}"])

    def prune(self, keep: int) -> list[str]:
        """Delete every unfinished clone but the current one, then all but the `keep` newest finished
        clones, never the current one (an unfinished clone never takes a finished one's place). Returns
        what was deleted."""
        gone = self.discard_unfinished()
        current = self.current()
        names = self.names()
        kept = {current} | set(names[-max(keep, 1):])
        for n in (n for n in names if n not in kept):
            self.discard(n)
            self.log(f"{self.r.host}: deleted clone {n}")
            gone.append(n)
        return gone

    def remove_all(self, source: Source | None = None) -> None:
        """Stop every clone and the standby, unmount, delete the base directory; drop the slot on
        `source` when given. For tests and benches: an operator's environment is never torn down so."""
        for n in self.names():
            self._stop(f"{self.clone_path(n)}/data")
        if self.standby_exists():
            self._stop(self.standby_data)
        if self.r.run(["mountpoint", "-q", self.mnt], check=False).code == 0:
            self.r.run(["umount", self.mnt], check=False)
        self.r.run(["rm", "-rf", self.base], check=False)
        if source is not None:
            self._drop_slot(source)
