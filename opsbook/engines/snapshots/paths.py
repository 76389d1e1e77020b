"""Which snapshot path an environment has: its kind decides (base.SnapshotPath is the interface).

- ``aws``: :class:`opsbook.engines.snapshots.aws.AwsSnapshots` (RDS or Aurora snapshots);
- ``lab``: :class:`opsbook.engines.snapshots.lab.LabSnapshots` (pgBackRest on the environment's database
  host over SSH, with the manifest and the restore drill).
"""

from __future__ import annotations

from opsbook.engines.snapshots.aws import AwsSnapshots
from opsbook.engines.snapshots.base import SnapshotError, SnapshotPath
from opsbook.engines.snapshots.lab import LabSnapshots


def for_env(env) -> SnapshotPath:
    """The snapshot path of an environment; refuses unknown kinds."""
    if env.kind == "aws":
        return AwsSnapshots(env)
    if env.kind == "lab":
        return LabSnapshots(env)
    raise SnapshotError(f"{env.name} is a {env.kind} environment; opsbook takes snapshots of aws and lab "
                        f"environments. Nothing was done.")
