"""What other clients felt while a migration ran, and how fast its backfills went.

A sampler thread with its own connection reads pg_locks / pg_stat_activity every
`interval` seconds: how many sessions wait on a lock (wait_event_type = 'Lock'), how many of those
wait behind one of the migration's sessions (pg_blocking_pids), and for how long (pg_locks.waitstart,
Postgres >= 14). The series are lists of small dataclasses: `[asdict(x) for x in result.lock_samples]`
feeds pandas / matplotlib directly.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field

from opsbook.engines.migrations.guards import APP_NAME

SAMPLE_SQL = """
SELECT a.pid,
       extract(epoch FROM now() - l.waitstart)::float8 AS waited_s,
       pg_blocking_pids(a.pid) AS blockers
FROM pg_stat_activity a
JOIN pg_locks l ON l.pid = a.pid AND NOT l.granted
WHERE a.wait_event_type = 'Lock' AND a.pid <> pg_backend_pid()
  AND coalesce(a.application_name, '') <> %s
"""


@dataclass(frozen=True)
class LockSample:
    t: float  # seconds since the run started
    waiting: int  # sessions waiting on a lock
    waiting_behind_migration: int
    longest_wait_s: float  # longest current wait among them (0 if none)
    longest_wait_behind_migration_s: float


@dataclass(frozen=True)
class BatchStat:
    t: float
    migration: str
    step: str
    batch: int
    rows_scanned: int
    rows_updated: int
    seconds: float
    rows_per_s: float
    attempts: int


@dataclass(frozen=True)
class StepResult:
    migration: str
    phase: str
    key: str
    kind: str
    sql: tuple[str, ...]
    started: float
    seconds: float
    attempts: int
    skipped: bool = False  # already in the ledger


@dataclass(frozen=True)
class ThrottleEvent:
    t: float
    step: str
    reasons: tuple[str, ...]
    slept_s: float


@dataclass
class RunResult:
    """What a run did and what it cost everyone else."""

    phase: str
    applied: list[str] = field(default_factory=list)  # migrations whose phase completed
    steps: list[StepResult] = field(default_factory=list)
    batches: list[BatchStat] = field(default_factory=list)
    lock_samples: list[LockSample] = field(default_factory=list)
    throttles: list[ThrottleEvent] = field(default_factory=list)
    lock_retries: list[dict] = field(default_factory=list)  # {t, step, attempt, error}
    seconds: float = 0.0
    error: str | None = None

    @property
    def longest_lock_wait_s(self) -> float:
        return max((s.longest_wait_s for s in self.lock_samples), default=0.0)

    @property
    def longest_wait_behind_migration_s(self) -> float:
        return max((s.longest_wait_behind_migration_s for s in self.lock_samples), default=0.0)

    @property
    def backfill_rows(self) -> int:
        return sum(b.rows_updated for b in self.batches)

    @property
    def backfill_rows_per_s(self) -> float:
        busy = sum(b.seconds for b in self.batches)
        return sum(b.rows_scanned for b in self.batches) / busy if busy else 0.0

    def summary(self) -> dict:
        return {
            "phase": self.phase,
            "applied": self.applied,
            "seconds": round(self.seconds, 3),
            "steps": len(self.steps),
            "lock_retries": len(self.lock_retries),
            "longest_lock_wait_s": round(self.longest_lock_wait_s, 3),
            "longest_wait_behind_migration_s": round(self.longest_wait_behind_migration_s, 3),
            "backfill_batches": len(self.batches),
            "backfill_rows_updated": self.backfill_rows,
            "backfill_rows_per_s": round(self.backfill_rows_per_s, 1),
            "throttled_s": round(sum(x.slept_s for x in self.throttles), 1),
            "error": self.error,
        }

    def as_dict(self) -> dict:
        return asdict(self) | {"summary": self.summary()}


class LockSampler:
    """Samples lock waits in a thread until stopped. `migration_pids` are the engine's sessions."""

    def __init__(
        self, conninfo: str, result: RunResult, t0: float, migration_pids: set[int], interval: float = 0.2
    ):
        self.conninfo, self.result, self.t0 = conninfo, result, t0
        self.migration_pids, self.interval = migration_pids, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="opsbook-lock-sampler", daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> LockSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        import psycopg

        try:
            with psycopg.connect(
                self.conninfo, autocommit=True, application_name=APP_NAME + "-sampler"
            ) as conn:
                while not self._stop.is_set():
                    self.sample(conn)
                    self._stop.wait(self.interval)
        except Exception as e:  # noqa: BLE001 - a dead sampler must not kill the migration; reported
            self.error = e

    def sample(self, conn) -> LockSample:
        rows = conn.execute(SAMPLE_SQL, (APP_NAME,)).fetchall()
        behind = [w or 0.0 for _pid, w, blockers in rows if set(blockers or ()) & self.migration_pids]
        s = LockSample(
            t=time.monotonic() - self.t0,
            waiting=len(rows),
            waiting_behind_migration=len(behind),
            longest_wait_s=max((w or 0.0 for _p, w, _b in rows), default=0.0),
            longest_wait_behind_migration_s=max(behind, default=0.0),
        )
        self.result.lock_samples.append(s)
        return s
