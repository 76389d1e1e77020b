"""Snapshots of a database and the proof that they restore.

- manifest: what a database holds, from one consistent snapshot (row counts, per-key-range row
  checksums, sequences, a catalog hash of the schema), and `compare` in an operator's words
- pgbackrest: backups of a cluster with pgBackRest and the restore drill (restore into a scratch
  cluster nobody else can reach, recompute the manifest, compare, pg_amcheck, time to usable)
- base: the take / list / delete / drill interface every path offers, retention, ages
- lab: pgBackRest on a lab environment's database host (db1) over SSH, with opsbook's metadata
- aws: RDS DB snapshots and Aurora cluster snapshots of an AWS environment's database
- paths: which path an environment has
- safety: a release's safety point (take one, use a recent one, or refuse)
"""
