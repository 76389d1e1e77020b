"""The event store: courses and their append-only, gap-free course_events log.

Ordering guarantee operators rely on: within a course, sequence numbers are 0, 1, 2, ...
with no gap and no duplicate, and a reader never sees event N+1 before event N. Both hold
because each write takes the course row lock, assigns numbers from
`courses.next_sequence_number` and inserts its events in the same transaction; the next
writer of that course waits for the commit.
"""

from __future__ import annotations

import logging
import select
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

log = logging.getLogger(__name__)

# What "the database is not there right now" looks like from here: answered with 503.
DATABASE_UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)

_RECORD_ATTEMPTS = 3   # a concurrent duplicate on another course makes the loser retry once
SCHEMA_MAX_AGE_S = 60.0  # re-read the schema at least this often (a migration may run while we serve)
STUDENT_CHECK = "course_events_student_uuid_present"  # 0002's contract: rows naming a student set the column


@dataclass(frozen=True)
class Schema:
    """Which course_events columns exist. The service works against every schema a rollout passes
    through: 0001 only; 0002/0003 expanded (student_uuid and kind added, kept in sync by triggers);
    contracted (event_type gone, no triggers, so this version must write student_uuid and kind itself).
    """

    student_uuid: bool
    kind: bool
    event_type: bool

    @classmethod
    def detect(cls, conn: psycopg.Connection) -> Schema:
        cols = {r[0] for r in conn.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = 'course_events'"
        )}
        return cls("student_uuid" in cols, "kind" in cols, "event_type" in cols)

    @property
    def type_columns(self) -> list[str]:
        """Every event-type column that exists: writing both while both exist keeps them equal even
        before 0003's sync trigger is in place."""
        return [c for c, there in (("kind", self.kind), ("event_type", self.event_type)) if there] or ["event_type"]

    @property
    def type_expression(self) -> str:
        """What to read the event type from: kind once it exists (event_type while 0003's backfill
        has not reached a row yet)."""
        if self.kind and self.event_type:
            return "coalesce(kind, event_type)"
        return "kind" if self.kind else "event_type"


def _schema_changed(e: Exception) -> bool:
    """An error a newer schema than the one we detected explains: a column we name was dropped
    (contract of a rename) or a row we wrote lacks a column a contract now requires."""
    if isinstance(e, psycopg.errors.UndefinedColumn):
        return True
    return isinstance(e, psycopg.errors.CheckViolation) and e.diag.constraint_name == STUDENT_CHECK


class UnknownCourses(Exception):
    """Responses name courses that were never created; nothing from the batch was recorded."""

    def __init__(self, course_uuids: list[str]):
        super().__init__(f"unknown course(s): {', '.join(course_uuids)}")
        self.course_uuids = course_uuids


class EcosystemConflict(Exception):
    """create_course for an existing course with a different ecosystem; the course is unchanged."""

    def __init__(self, course_uuid: str, existing: str, requested: str):
        super().__init__(
            f"course {course_uuid} already exists with ecosystem {existing}, not {requested}"
        )
        self.course_uuid, self.existing, self.requested = course_uuid, existing, requested


class Database:
    """One connection pool per worker process, opened on first use (so always after fork)."""

    def __init__(self, conninfo: str, *, max_size: int, timeout: float, reconnect_timeout: float = 10.0):
        self._conninfo = conninfo
        self._max_size = max_size
        self._timeout = timeout
        self._reconnect_timeout = reconnect_timeout
        self._pool: ConnectionPool | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._schema: Schema | None = None
        self._schema_at = 0.0

    @property
    def pool(self) -> ConnectionPool:
        if self._pool is None:
            with self._lock:
                if self._closed:
                    raise psycopg.OperationalError("the service is shutting down")
                if self._pool is None:
                    kwargs = {}
                    if "connect_timeout" not in psycopg.conninfo.conninfo_to_dict(self._conninfo):
                        kwargs["connect_timeout"] = max(1, int(self._timeout))
                    pool = ConnectionPool(
                        self._conninfo, kwargs=kwargs, min_size=1, max_size=self._max_size,
                        timeout=self._timeout, name="bl-api", open=False,
                        # After a database restart or failover, stale connections are replaced
                        # instead of failing requests (see _check_connection: no round trip).
                        check=_check_connection,
                        # psycopg_pool retries a failed connection with a doubling delay and no
                        # ceiling until reconnect_timeout (default 5 minutes): after a one-minute
                        # database outage its next try could be a minute away, the service 503ing
                        # all along. A short timeout ends that chain of tries; the next request then
                        # starts a new one at a 1 s delay (the pool grows on demand), so the service
                        # is back within seconds of the database.
                        reconnect_timeout=self._reconnect_timeout,
                    )
                    pool.open(wait=False)
                    self._pool = pool
        return self._pool

    def close(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(timeout=timeout)
            log.info("database pool closed")

    # --- schema -------------------------------------------------------------------------

    def schema(self, conn: psycopg.Connection, *, refresh: bool = False) -> Schema:
        """The detected schema: read when the pool starts, re-read when stale or on `refresh`."""
        if refresh or self._schema is None or time.monotonic() - self._schema_at > SCHEMA_MAX_AGE_S:
            schema = Schema.detect(conn)
            if schema != self._schema:
                log.info("course_events schema: %s", schema)
            self._schema, self._schema_at = schema, time.monotonic()
        return self._schema

    def _run(self, work, timeout: float | None = None):
        """Run `work(conn)` on a pooled connection. When the connection turns out to be dead (the
        database dropped it an instant before the checkout looked at it: see _check_connection), the
        work runs again on another connection, as the pool's old round-trip check would have given: once
        per pooled connection at most (after a restart every one of them may be dead). Every caller's work
        may run more than once: writes are idempotent (a response already recorded is skipped;
        create_course repeats) and rolled back when they fail; reads have no effect."""
        attempts = self._max_size + 1
        for attempt in range(1, attempts + 1):
            conn = None
            try:
                with self.pool.connection(timeout=timeout) as conn:
                    return work(conn)
            except psycopg.OperationalError:
                if attempt == attempts or conn is None or not conn.broken:
                    raise
                log.info("a pooled connection was dropped by the database; retrying on another")
        raise AssertionError("unreachable")

    def _with_schema(self, work):
        """Run `work(conn, schema)`; when it fails because the schema changed under us (a contract
        ran while we serve), re-detect and run it once more. Its transaction was rolled back."""
        for attempt in (1, 2):
            try:
                return self._run(lambda conn: work(conn, self.schema(conn, refresh=attempt == 2)))  # noqa: B023
            except psycopg.Error as e:
                if attempt == 2 or not _schema_changed(e):
                    raise
                log.info("schema changed under a request (%s); re-reading it and retrying", type(e).__name__)
        raise AssertionError("unreachable")

    # --- health -------------------------------------------------------------------------

    def ping(self, timeout: float) -> None:
        """Raise unless the database answers `SELECT 1` within about `timeout` seconds."""
        def work(conn: psycopg.Connection) -> None:
            conn.execute("SELECT set_config('statement_timeout', %s, true)", [f"{int(timeout * 1000)}ms"])
            conn.execute("SELECT 1").fetchone()

        self._run(work, timeout)

    # --- writes -------------------------------------------------------------------------

    def create_course(self, course_uuid: str, ecosystem_uuid: str) -> None:
        """Create the course and its `create_course` event (sequence 0); repeatable."""
        self._with_schema(lambda conn, schema: _create_course(conn, schema, course_uuid, ecosystem_uuid))

    def record_responses(self, responses: list[dict[str, Any]]) -> list[str]:
        """Append each response not yet recorded, all-or-nothing; return every response uuid.

        A response already recorded (same response_uuid, by this or an earlier call) is
        skipped and consumes no sequence number. Any unknown course rejects the whole batch.
        """
        for attempt in range(1, _RECORD_ATTEMPTS + 1):
            try:
                return self._with_schema(lambda conn, schema: _record_responses(conn, schema, responses))
            except psycopg.errors.UniqueViolation as e:
                # Only possible when the same response_uuid is sent concurrently for two
                # different courses (different row locks). Retrying sees it as recorded.
                if attempt == _RECORD_ATTEMPTS:
                    raise
                log.info("record_responses: concurrent duplicate (%s); retrying", e.diag.constraint_name)
        raise AssertionError("unreachable")

    # --- reads --------------------------------------------------------------------------

    def fetch_course_events(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """For each request, events at or after the offset in sequence order, up to the limit."""
        return self._with_schema(lambda conn, schema: _fetch_course_events(conn, schema, requests))


def _create_course(conn: psycopg.Connection, schema: Schema, course_uuid: str, ecosystem_uuid: str) -> None:
    created = conn.execute(
        "INSERT INTO courses (course_uuid, ecosystem_uuid, next_sequence_number) "
        "VALUES (%s, %s, 1) ON CONFLICT (course_uuid) DO NOTHING RETURNING course_uuid",
        [course_uuid, ecosystem_uuid],
    ).fetchone()
    if created:
        types = schema.type_columns
        columns = ", ".join(types)
        conn.execute(
            f"INSERT INTO course_events (event_uuid, course_uuid, sequence_number, {columns}, data) "
            f"VALUES (%s, %s, 0, {', '.join(['%s'] * len(types))}, %s)",
            [uuid.uuid4(), course_uuid, *(["create_course"] * len(types)),
             Jsonb({"course_uuid": course_uuid, "ecosystem_uuid": ecosystem_uuid})],
        )
        return
    existing = conn.execute(
        "SELECT ecosystem_uuid FROM courses WHERE course_uuid = %s", [course_uuid]
    ).fetchone()[0]
    if str(existing) != ecosystem_uuid:
        raise EcosystemConflict(course_uuid, str(existing), ecosystem_uuid)


def _fetch_course_events(conn: psycopg.Connection, schema: Schema, requests: list[dict[str, Any]]) -> list[dict]:
    out = []
    event_type = schema.type_expression
    for req in requests:
        rows = conn.execute(
            f"SELECT sequence_number, event_uuid, {event_type}, data FROM course_events "
            "WHERE course_uuid = %s AND sequence_number >= %s "
            f"AND (%s::text[] IS NULL OR {event_type} = ANY(%s::text[])) "
            "ORDER BY sequence_number LIMIT %s",
            [req["course_uuid"], req["sequence_number_offset"],
             req["event_types"], req["event_types"], req["max_num_events"] + 1],
        ).fetchall()
        more = len(rows) > req["max_num_events"]
        out.append({
            "request_uuid": req["request_uuid"],
            "course_uuid": req["course_uuid"],
            "events": [
                {"sequence_number": seq, "event_uuid": str(ev), "event_type": et, "event_data": data}
                for seq, ev, et, data in rows[: req["max_num_events"]]
            ],
            # Sequence numbers are committed in order (see module docstring), so a
            # reader never sees a hole that a later commit would fill.
            "is_gap": False,
            "is_end": not more,
        })
    return out


def _record_responses(conn: psycopg.Connection, schema: Schema, responses: list[dict[str, Any]]) -> list[str]:
    """Two round trips, the commit in the second (the scaling check found the statements' round trips to
    be most of a write's cost): (1) lock the batch's course rows and, in the same pipeline, read which
    responses are already recorded; (2) one statement that bumps each course's next_sequence_number and
    inserts the new events numbered from the values it returned, then COMMIT, sent together.

    Pipelining keeps the order the guarantees need: the server runs the statements one after the other,
    and in READ COMMITTED the second takes its snapshot only once the first holds every course lock, so
    "already recorded" is read under the locks, exactly as when they were sent one at a time. If the insert
    fails, the server skips the COMMIT queued behind it (a pipeline stops at the first error until its
    sync) and the transaction is rolled back: all or nothing, as before."""
    all_uuids = list(dict.fromkeys(r["response_uuid"] for r in responses))
    if not responses:
        return []
    courses = sorted({r["course_uuid"] for r in responses})
    with conn.pipeline():
        # Lock every course row of the batch in one sorted order: two batches that share
        # courses queue behind each other instead of deadlocking.
        locking = conn.execute(
            "SELECT course_uuid FROM courses WHERE course_uuid = ANY(%s::uuid[]) "
            "ORDER BY course_uuid FOR UPDATE",
            [_array(courses)],
        )
        # Only once those locks are held is "already recorded" a stable answer for these courses.
        existing = conn.execute(
            "SELECT event_uuid FROM course_events WHERE event_uuid = ANY(%s::uuid[])", [_array(all_uuids)]
        )
        locked = {str(row[0]) for row in locking.fetchall()}   # the first round trip (a flush, no sync)
        missing = [c for c in courses if c not in locked]
        if missing:
            raise UnknownCourses(missing)
        recorded = {str(row[0]) for row in existing.fetchall()}
        new = []
        for r in responses:
            if r["response_uuid"] not in recorded:
                recorded.add(r["response_uuid"])
                new.append(r)
        if not new:
            return all_uuids
        _insert_new(conn, schema, new)
        # Queued behind the insert; both go with the pipeline's closing sync, the second round trip.
        # (conn.commit() would sync at once, and closing the pipeline would cost a third.)
        conn.execute("COMMIT")
    return all_uuids


def _insert_new(conn: psycopg.Connection, schema: Schema, new: list[dict[str, Any]]) -> None:
    counts = Counter(r["course_uuid"] for r in new)
    offset: Counter[str] = Counter()
    event_uuids, course_uuids, offsets, data = [], [], [], []
    for r in new:
        event_uuids.append(r["response_uuid"])
        course_uuids.append(r["course_uuid"])
        offsets.append(offset[r["course_uuid"]])   # its place among this batch's new events of its course
        offset[r["course_uuid"]] += 1
        data.append(Jsonb(r, dumps=orjson.dumps))   # validated: strings and booleans only
    types = schema.type_columns
    columns = ["event_uuid", "course_uuid", "sequence_number", *types, "data"]
    values = ["t.e", "t.c", "b.first + t.k", *(["'record_response'"] * len(types)), "t.d"]
    if schema.student_uuid:
        # The same value 0002's sync trigger computes; after its contract nothing else sets it.
        columns.append("student_uuid")
        values.append("(t.d->>'student_uuid')::uuid")
    conn.execute(
        "WITH bumped AS ("
        " UPDATE courses c SET next_sequence_number = c.next_sequence_number + n.n"
        " FROM unnest(%s::uuid[], %s::int[]) AS n(course_uuid, n)"
        " WHERE c.course_uuid = n.course_uuid"
        " RETURNING c.course_uuid, c.next_sequence_number - n.n AS first) "
        f"INSERT INTO course_events ({', '.join(columns)}) SELECT {', '.join(values)} "
        # The events' data as a binary jsonb[] (%b): psycopg's text array format escapes every quote
        # of every document in Python, which was a sixth of a write's CPU in the service.
        "FROM unnest(%s::uuid[], %s::uuid[], %s::int[], %b::jsonb[]) AS t(e, c, k, d) "
        "JOIN bumped b ON b.course_uuid = t.c",
        [_array(counts), _array(map(str, counts.values())), _array(event_uuids), _array(course_uuids),
         _array(map(str, offsets)), data],
    )


def _array(items) -> str:
    """A Postgres array literal of values that need no quoting: validated, lower-case UUIDs and decimal
    integers (validation.py guarantees the UUIDs' form). Sent as one text parameter and cast in the query
    (`%s::uuid[]`), it is what psycopg's list adapter would send, without its Python loop over every
    element (a quarter of a write's CPU in the service, with the loop's type checks and escaping)."""
    return "{" + ",".join(items) + "}"


def _check_connection(conn: psycopg.Connection) -> None:
    """The pool's check at checkout, without a round trip. An idle connection the database has dropped
    (restart, failover, pg_terminate_backend) has something to read: the server's last error message, or
    the end of the stream. Only then is the full check run (an empty query), which fails and makes the
    pool replace the connection. An idle, healthy connection has nothing to read: no query was sent.

    The empty query on every checkout was a quarter of a write's round trips, paid by the workers and by
    the database. A connection dropped an instant before this look is caught by Database._with_schema,
    which runs the work once more on another connection."""
    if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        ConnectionPool.check_connection(conn)
        return
    readable, _, _ = select.select([conn.fileno()], [], [], 0)
    if readable:
        ConnectionPool.check_connection(conn)
