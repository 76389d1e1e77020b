"""Which snapshot path an environment has: its kind decides (base.SnapshotPath is the interface).

- ``aws``: :class:`opsbook.engines.snapshots.aws.AwsSnapshots` (RDS or Aurora snapshots);
- ``lab``: pgBackRest on db1 over SSH, **not built yet**: refused with an operator message.
"""

from __future__ import annotations

from opsbook.engines.snapshots.aws import AwsSnapshots
from opsbook.engines.snapshots.base import PathNotBuilt, SnapshotError, SnapshotPath

LAB_NOT_BUILT = (
    "{env} is a lab environment, and the lab's snapshot path (pgBackRest on db1 over SSH, with the "
    "manifest and the restore drill in a scratch cluster) is not built yet. Nothing was done: no snapshot "
    "was taken, listed or deleted, and no record was written. What exists today: an AWS environment's "
    "snapshots (`invoke snapshot --env staging`), and the pgBackRest engine tested on a local cluster "
    "(opsbook/engines/snapshots/pgbackrest.py). Releases to {env} take no safety point "
    "(opsbook_release_snapshot: off).")


def for_env(env) -> SnapshotPath:
    """The snapshot path of an environment; refuses the lab (not built yet) and unknown kinds."""
    if env.kind == "aws":
        return AwsSnapshots(env)
    if env.kind == "lab":
        raise PathNotBuilt(LAB_NOT_BUILT.format(env=env.name))
    raise SnapshotError(f"{env.name} is a {env.kind} environment; opsbook takes snapshots of aws environments "
                        f"(and, later, of the lab). Nothing was done.")
