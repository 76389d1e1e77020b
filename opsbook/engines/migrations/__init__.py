"""Online schema migrations for Postgres (`app/migrations/NNNN_name.yml`).

- spec: the file format, its validation and the safe SQL each operation becomes (no database)
- linting: squawk over raw and generated SQL (no database)
- guards: timeouts, retries, blocking-session preflight, backfill throttle, contract gate
- measure: lock-wait sampler and the structured RunResult
- engine: `plan` (what would run) and `run` (run it, step by step, measured)
"""

from opsbook.engines.migrations.engine import (
    PendingContract,
    Plan,
    PlannedStep,
    applied_phases,
    apply_pending,
    pending_contracts,
    plan,
    run,
)
from opsbook.engines.migrations.guards import Settings
from opsbook.engines.migrations.linting import Finding, lint
from opsbook.engines.migrations.measure import RunResult
from opsbook.engines.migrations.spec import PHASES, Migration, MigrationError, Step, compile_phase, load_migrations

__all__ = [
    "PHASES",
    "Finding",
    "Migration",
    "MigrationError",
    "PendingContract",
    "Plan",
    "PlannedStep",
    "RunResult",
    "Settings",
    "Step",
    "applied_phases",
    "apply_pending",
    "compile_phase",
    "lint",
    "load_migrations",
    "pending_contracts",
    "plan",
    "run",
]
