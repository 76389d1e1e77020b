"""Clones of a service database for a staging refresh: copies whose time does not grow with the size.

- runner: where the clone machinery's commands run (a local subprocess today; over SSH later)
- btrfs: a streaming standby of the source on a btrfs filesystem, snapshotted and promoted as a
  separate cluster (the lab's path, and any clone host with btrfs)
- aurora: an Aurora copy-on-write clone of an AWS environment's cluster (RestoreDBClusterToPointInTime
  with RestoreType copy-on-write), tagged, waited for, published in the target's SSM parameter
- handover: a promoted clone made the target's own (only the service database; the target's
  credentials, every other password removed)
- paths: which clone path a refresh from one environment into another has
"""
