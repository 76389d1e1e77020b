"""Which clone path a refresh of one environment from another has, read from their inventories.

- two **lab-kind** environments: the btrfs path (:mod:`opsbook.engines.clones.btrfs`). The target's
  inventory names the clone host and where it keeps the standby and its clones:

  ``opsbook_refresh_host`` (required): the inventory host whose btrfs holds the standby and clones,
  which must also be the host the target's service connects to (``bl_api_db_host``); the clone that
  serves listens on the target's ``bl_api_db_port``.
  ``opsbook_refresh_dir`` (``/var/lib/opsbook/refresh``), ``opsbook_refresh_image_gb`` (20),
  ``opsbook_refresh_keep`` (2: the serving clone and the one before it), ``opsbook_refresh_keep_free_mb``
  (1024: what a refresh leaves free in the image and on the filesystem under it), ``opsbook_refresh_slot``
  (``opsbook_refresh_<target>``), ``opsbook_refresh_standby_port`` (5499),
  ``opsbook_refresh_listen_addresses`` and ``opsbook_refresh_hba_file`` (a clone's, when it serves;
  unset: what its copied configuration says).

  The standby reaches the source's database where the source's service does (``bl_api_db_address``
  or ``bl_api_db_host``, ``bl_api_db_port``) as ``opsbook_replication_user`` /
  ``opsbook_replication_password`` of the source (default: its admin role), which needs REPLICATION.
  A clone host is reached over SSH with the inventory's settings, or is this machine
  (``ansible_connection: local``): :func:`opsbook.engines.clones.runner.for_host`.
- two **AWS** environments: the Aurora path (:mod:`opsbook.engines.clones.aurora`), refused as not
  built until opsbook's port forward is wired to a clone's data (see its ``DATA_PATH_NOT_BUILT``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from opsbook.core.errors import OpsbookError
from opsbook.engines import database
from opsbook.engines.clones import runner as runners
from opsbook.engines.clones.btrfs import BtrfsClones, Settings, Source
from opsbook.engines.snapshots.base import PathNotBuilt

DEFAULT_DIR = "/var/lib/opsbook/refresh"
NO_CLONE_HOST = (
    "{target} names no clone host (opsbook_refresh_host), so there is nowhere to keep a standby of {source} and make "
    "its clones. Nothing was changed. The lab's staging is lab-staging (`invoke staging.refresh --from lab --to "
    "lab-staging`); for another environment, set opsbook_refresh_host (and opsbook_refresh_dir, "
    "opsbook_refresh_listen_addresses, opsbook_refresh_hba_file) in {path}/group_vars/all/.")


@dataclass
class BtrfsRefresh:
    """The btrfs path of one refresh: the engine on the clone host, the source it follows, and the
    port the serving clone listens on."""

    engine: BtrfsClones
    source: Source
    service_port: int
    keep: int
    host: str

    def describe(self) -> str:
        return (f"a streaming standby of {self.source.describe()} on {self.host}'s btrfs ({self.engine.base}), "
                f"snapshotted and promoted; the clone serves on {self.host}:{self.service_port}")


def slot_for(target_name: str) -> str:
    return re.sub(r"[^a-z0-9_]", "_", f"opsbook_refresh_{target_name}".lower())[:63]


def btrfs_refresh(source, target, *, log: Callable[[str], None] = print) -> BtrfsRefresh:
    """The btrfs path from the two inventories; refuses a target that does not say where its clones
    live, or whose service would not connect to them. Reads inventories only (changes nothing)."""
    host = str(target.var("opsbook_refresh_host", "") or "")
    if not host:
        raise PathNotBuilt(NO_CLONE_HOST.format(target=target.name, source=source.name, path=target.path))
    served_by = str(target.var("bl_api_db_host", "") or "")
    if served_by != host:
        raise OpsbookError(f"{target.name}'s service connects to {served_by or '(no bl_api_db_host)'}, but its clones "
                           f"would serve on {host} (opsbook_refresh_host): the app hosts would not see the refreshed "
                           f"database. Nothing was changed. Make the two the same host.")
    runner, sockets = runners.for_host(target, host)
    settings = Settings(
        base=str(target.var("opsbook_refresh_dir", DEFAULT_DIR)),
        image_gb=int(target.var("opsbook_refresh_image_gb", 20)),
        standby_port=int(target.var("opsbook_refresh_standby_port", 5499)),
        slot=str(target.var("opsbook_refresh_slot", "") or slot_for(target.name)),
        listen_addresses=target.var("opsbook_refresh_listen_addresses", None) or None,
        hba_file=target.var("opsbook_refresh_hba_file", None) or None,
        keep_free_mb=float(target.var("opsbook_refresh_keep_free_mb", 1024)),   # checked when the env loads
    )
    source_db = Source(
        host=database.address(source), port=int(source.var("bl_api_db_port")),
        user=str(source.var("opsbook_replication_user", None) or source.var("opsbook_db_admin_user")),
        password=str(source.var("opsbook_replication_password", None) or source.var("opsbook_db_admin_password")),
        dbname=str(source.var("bl_api_db_name")))
    return BtrfsRefresh(engine=BtrfsClones(runner, settings, log=log, sockets=sockets), source=source_db,
                        service_port=int(target.var("bl_api_db_port")),
                        keep=int(target.var("opsbook_refresh_keep", 2)), host=host)
