"""Facts of a Postgres data directory, read with Postgres' own tools on the host that holds it."""

from __future__ import annotations

from opsbook.engines.remote import Runner

PG_BIN = "/usr/lib/postgresql/15/bin"

# Recovery (a standby's, or a restore's) refuses to replay WAL with fewer of these than the primary
# had; pg_control records the primary's values.
_CONTROL_MINIMUMS = {
    "max_connections": "max_connections setting", "max_worker_processes": "max_worker_processes setting",
    "max_wal_senders": "max_wal_senders setting", "max_prepared_transactions": "max_prepared_xacts setting",
    "max_locks_per_transaction": "max_locks_per_xact setting",
}


def recovery_minimums(runner: Runner, data: str, *, user: str | None = "postgres",
                      pg_bin: str = PG_BIN) -> dict[str, int]:
    """The settings recovery needs at least as high as the cluster the data directory came from, read
    from its pg_control (a copy of a cluster configured outside its data directory, as Debian's are,
    has none of its settings)."""
    out = runner.run([f"{pg_bin}/pg_controldata", str(data)], user=user, check=False, timeout=60).out
    found = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    values = {}
    for setting, label in _CONTROL_MINIMUMS.items():
        raw = found.get(label, "").strip()
        if raw.isdigit():
            values[setting] = int(raw)
    return values
