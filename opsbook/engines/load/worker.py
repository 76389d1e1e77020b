"""The load generator's child process: ``python -m opsbook.engines.load.worker < plan.json``.

Locust (imported here first: it monkey-patches the standard library with gevent) runs headless as a
library: a local runner with ``max_in_flight`` FastHttpUsers. The users do not pace themselves: each
takes the next *scheduled* request from one shared schedule (Poisson or uniform arrivals at the step's
rate), sleeps until its scheduled time, sends it, and records the latency from that scheduled time in
the step's HDR histogram. When every user is busy the schedule keeps its times, so the wait counts.

Writes one JSON line per event on stdout: ``setup`` (courses created), ``step`` (after the step's window
has ended and its requests have been answered or timed out), ``done``. See opsbook.engines.load.
"""

from __future__ import annotations

# Locust first: its import monkey-patches sockets, ssl, threading and time.sleep with gevent.
from locust import FastHttpUser, constant, task  # isort: skip
from locust.env import Environment  # isort: skip
from locust.exception import StopUser  # isort: skip

import json
import os
import random
import resource
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import gevent
from hdrh.histogram import HdrHistogram

RECORD, FETCH, CREATE, PING = "record_responses", "fetch_course_events", "create_course", "ping"
HIST_MAX_US = 3_600_000_000
JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
RESPONSE = ('{"response_uuid":"%s","course_uuid":"%s","ecosystem_item_uuid":"%s","trial_uuid":"%s",'
            '"student_uuid":"%s","exercise_uuid":"%s","is_correct":%s,"is_real_response":true,'
            '"responded_at":"%s"}')


def emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def new_uuid() -> str:
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:]}"


class StepStats:
    """What the requests *scheduled* in one step saw, and what completed in its window."""

    def __init__(self, index: int, step: dict[str, Any]):
        self.index = index
        self.offered_responses = float(step["responses_per_s"])
        self.offered_requests = float(step["requests_per_s"])
        self.planned_seconds = float(step["seconds"])
        self.start = 0.0          # monotonic
        self.end = 0.0
        self.hist = HdrHistogram(1, HIST_MAX_US, 3)
        self.service = HdrHistogram(1, HIST_MAX_US, 3)
        self.lag = HdrHistogram(1, HIST_MAX_US, 3)
        self.by_kind: dict[str, dict[str, Any]] = {}
        self.scheduled = self.sent = self.ok = self.acked = self.outstanding = 0
        self.scheduled_responses = 0
        self.errors: Counter[str] = Counter()
        self.window_ok = self.window_acked = 0
        self.max_in_flight = self.cap_hits = 0
        self.cpu_start = self.cpu_end = 0.0
        self.truncated = False
        self.emitted = False

    def kind(self, kind: str) -> dict[str, Any]:
        if kind not in self.by_kind:
            self.by_kind[kind] = {"ok": 0, "errors": 0, "hist": HdrHistogram(1, HIST_MAX_US, 3)}
        return self.by_kind[kind]


class Generator:
    def __init__(self, plan: dict[str, Any]):
        self.plan = plan
        self.random = random.Random(plan.get("seed", 0))  # noqa: S311 - load shapes, nothing secret
        self.steps = [StepStats(i, s) for i, s in enumerate(plan["steps"], 1)]
        self.kinds = [(k, float(w)) for k, w in plan["kinds"].items() if float(w) > 0]
        self.sizes = [(int(k), float(w)) for k, w in plan["batch_sizes"].items() if float(w) > 0]
        self.timeout = float(plan["timeout_s"])
        self.courses: list[str] = []            # courses that exist (created, acknowledged)
        self.setup_queue = list(plan.get("courses") or [])
        self.setup_errors: Counter[str] = Counter()
        self.setup_outstanding = 0
        self.events_per_course: Counter[str] = Counter()
        self.acked = bytearray()
        self.acked_total = 0
        self.in_flight = 0
        self.busy_users = 0
        self.users = int(plan["max_in_flight"])
        self.scheduled_total = 0
        self.stopped_by = "plan"
        self.stop_at: float | None = None
        self.phase = "setup"
        self.t0 = 0.0
        self.wall0 = 0.0
        self.current = 0                         # index into steps of the step being scheduled
        self.next_t = 0.0
        # Students, exercises and items each repeat, as in real traffic, and never share an id: a student's
        # id that is also an exercise's would survive masking in the exercise's field (the leak scan of a
        # staging refresh rightly finds it).
        self.students, self.exercises, self.items = ([new_uuid() for _ in range(500)] for _ in range(3))
        self.delay_header = {"X-Test-Delay": str(plan["ping_delay_s"])} if plan.get("ping_delay_s") else {}

    # -- the schedule ---------------------------------------------------------------------------
    def _interval(self, rate: float) -> float:
        if self.plan.get("arrivals", "poisson") == "uniform":
            return 1.0 / rate
        return self.random.expovariate(rate)

    def start_steps(self) -> None:
        self.t0 = time.monotonic() + 0.2
        self.wall0 = time.time() + 0.2
        t = self.t0
        for s in self.steps:
            s.start, s.end = t, t + s.planned_seconds
            t = s.end
        self.current = 0
        self.next_t = self.t0 + self._interval(self.steps[0].offered_requests)
        self.phase = "steps"

    def stop(self, why: str) -> None:
        if self.stop_at is None:
            self.stop_at = time.monotonic()
            self.stopped_by = why
            for s in self.steps:
                if s.start >= self.stop_at:
                    s.end = s.start          # never ran
                elif s.end > self.stop_at:
                    s.end, s.truncated = self.stop_at, True

    def take(self) -> tuple[float, StepStats, str, int] | None:
        """The next scheduled request: (scheduled monotonic time, its step, kind, batch size); None at the end."""
        while self.current < len(self.steps):
            step = self.steps[self.current]
            if self.stop_at is not None and self.next_t >= self.stop_at:
                return None
            if self.next_t < step.end:
                t = self.next_t
                self.next_t += self._interval(step.offered_requests)
                if self.scheduled_total >= self.plan["max_requests"]:
                    self.stop("max_requests")
                    return None
                if t - self.t0 >= self.plan["max_seconds"]:
                    self.stop("max_seconds")
                    return None
                self.scheduled_total += 1
                step.scheduled += 1
                kind = self._pick(self.kinds)
                size = self._pick(self.sizes) if kind == RECORD else 0
                step.scheduled_responses += size
                return t, step, kind, size
            self.current += 1
            if self.current < len(self.steps):
                nxt = self.steps[self.current]
                self.next_t = nxt.start + self._interval(nxt.offered_requests)
        return None

    def _pick(self, weighted: list[tuple[Any, float]]) -> Any:
        r = self.random.random() * sum(w for _, w in weighted)
        for value, w in weighted:
            r -= w
            if r <= 0:
                return value
        return weighted[-1][0]

    # -- requests -------------------------------------------------------------------------------
    def body(self, kind: str, size: int) -> tuple[str, str, bytes | None, list[str], list[str]]:
        """(method, path, body, response uuids, courses written) of one request."""
        if kind == RECORD:
            courses = self.courses or self.plan.get("courses") or [new_uuid()]
            # A small batch is one course's (one student's); large catch-up batches span a few courses.
            spread = [self.random.choice(courses) for _ in range(1 if size <= 20 else min(10, size // 20))]
            now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            uuids, parts, written = [], [], []
            choice = self.random.choice
            for i in range(size):
                u = new_uuid()
                course = spread[i % len(spread)]
                uuids.append(u)
                written.append(course)
                parts.append(RESPONSE % (u, course, choice(self.items), new_uuid(), choice(self.students),
                                         choice(self.exercises), "true" if i % 3 else "false", now))
            return "POST", "/record_responses", ('{"responses":[' + ",".join(parts) + "]}").encode(), uuids, written
        if kind == FETCH:
            course = self.random.choice(self.courses or self.plan.get("courses") or [new_uuid()])
            known = self.events_per_course.get(course, 0)
            offset = self.random.randint(0, max(0, known - 1)) if known else 0
            doc = {"course_event_requests": [{"request_uuid": new_uuid(), "course_uuid": course,
                                              "sequence_number_offset": offset, "max_num_events": 100}]}
            return "POST", "/fetch_course_events", json.dumps(doc).encode(), [], []
        if kind == CREATE:
            course = new_uuid()
            doc = {"course_uuid": course, "ecosystem_uuid": new_uuid()}
            return "POST", "/create_course", json.dumps(doc).encode(), [], [course]
        return "GET", "/ping", None, [], []

    def send(self, client, kind: str, size: int) -> tuple[str | None, int, float, bool]:
        """Send one request; (error or None, responses acknowledged, service seconds, counted as ok)."""
        method, path, body, uuids, written = self.body(kind, size)
        headers = JSON_HEADERS if body is not None else self.delay_header
        sent = time.monotonic()
        error, acked = None, 0
        with client.request(method, path, data=body, headers=headers, name=kind, catch_response=True) as resp:
            status = resp.status_code or 0
            if status == 0:
                e = getattr(resp, "error", None)
                name = type(e).__name__ if e is not None else "no answer"
                error = "timeout" if name in ("Timeout", "timeout", "TimeoutError") else name
                resp.failure(error)
            elif 200 <= status < 300:
                if kind == RECORD:
                    try:
                        recorded = set(json.loads(resp.content).get("recorded_response_uuids", []))
                    except ValueError:
                        recorded = set()
                    if all(u in recorded for u in uuids):
                        acked = len(uuids)
                        for u, course in zip(uuids, written, strict=True):
                            self.acked += bytes.fromhex(u.replace("-", ""))
                            self.events_per_course[course] += 1
                        self.acked_total += acked
                    else:
                        error = "200 without every response uuid"
                elif kind == CREATE:
                    self.courses.extend(written)
                if error is None:
                    resp.success()
                else:
                    resp.failure(error)
            else:
                error = f"HTTP {status}"
                resp.failure(error)
        return error, acked, time.monotonic() - sent, error is None

    def run_request(self, client, slot: tuple[float, StepStats, str, int]) -> None:
        t, step, kind, size = slot
        delay = t - time.monotonic()
        if delay > 0:
            gevent.sleep(delay)
        lag = max(0.0, time.monotonic() - t)
        self.in_flight += 1
        step.outstanding += 1
        step.sent += 1
        step.max_in_flight = max(step.max_in_flight, self.in_flight)
        if lag > 0.005 and self.busy_users >= self.users:
            step.cap_hits += 1
        try:
            error, acked, service, ok = self.send(client, kind, size)
        finally:
            self.in_flight -= 1
            step.outstanding -= 1
        done = time.monotonic()
        latency_us = max(1, int((done - t) * 1_000_000))
        k = step.kind(kind)
        step.hist.record_value(min(latency_us, HIST_MAX_US))
        k["hist"].record_value(min(latency_us, HIST_MAX_US))
        step.service.record_value(min(max(1, int(service * 1_000_000)), HIST_MAX_US))
        step.lag.record_value(min(max(1, int(lag * 1_000_000)), HIST_MAX_US))
        if ok:
            step.ok += 1
            step.acked += acked
            k["ok"] += 1
        else:
            step.errors[error or "error"] += 1
            k["errors"] += 1
        window = self.window_of(done)
        if window is not None and ok:
            window.window_ok += 1
            window.window_acked += acked

    def window_of(self, t: float) -> StepStats | None:
        for s in self.steps:
            if s.start <= t < s.end:
                return s
        return None

    def setup_request(self, client, course: str) -> None:
        self.setup_outstanding += 1
        try:
            body = json.dumps({"course_uuid": course, "ecosystem_uuid": new_uuid()}).encode()
            with client.request("POST", "/create_course", data=body, headers=JSON_HEADERS, name="setup",
                                catch_response=True) as resp:
                if 200 <= (resp.status_code or 0) < 300:
                    self.courses.append(course)
                    self.events_per_course[course] = 1
                    resp.success()
                else:
                    e = getattr(resp, "error", None)
                    why = f"HTTP {resp.status_code}" if resp.status_code else type(e).__name__ if e else "no answer"
                    self.setup_errors[why] += 1
                    resp.failure(why)
        finally:
            self.setup_outstanding -= 1

    # -- reports --------------------------------------------------------------------------------
    def report(self, s: StepStats) -> dict[str, Any]:
        window = max(s.end - s.start, 1e-9)

        def pct(h: HdrHistogram, p: float) -> float | None:
            return round(h.get_value_at_percentile(p) / 1000, 2) if h.get_total_count() else None

        return {
            "event": "step", "index": s.index,
            "offered_responses_per_s": s.offered_responses, "offered_requests_per_s": s.offered_requests,
            "start": self.wall0 + (s.start - self.t0), "end": self.wall0 + (s.end - self.t0),
            "seconds": round(s.end - s.start, 3),
            "scheduled": s.scheduled, "scheduled_responses": s.scheduled_responses,
            "sent": s.sent, "ok": s.ok, "errors": dict(s.errors),
            "acknowledged_responses": s.acked,
            "achieved_requests_per_s": round(s.window_ok / window, 2),
            "achieved_responses_per_s": round(s.window_acked / window, 2),
            "p50_ms": pct(s.hist, 50), "p95_ms": pct(s.hist, 95), "p99_ms": pct(s.hist, 99),
            "max_ms": round(s.hist.get_max_value() / 1000, 2) if s.hist.get_total_count() else None,
            "service_p99_ms": pct(s.service, 99), "send_lag_p99_ms": pct(s.lag, 99),
            "max_in_flight": s.max_in_flight, "in_flight_cap_hits": s.cap_hits,
            "generator_cpu": round((s.cpu_end - s.cpu_start) / window, 3),
            "by_kind": {k: {"ok": v["ok"], "errors": v["errors"], "p99_ms": pct(v["hist"], 99)}
                        for k, v in s.by_kind.items()},
            "histogram": s.hist.encode().decode() if s.hist.get_total_count() else "",
            "truncated": s.truncated,
        }


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def main() -> int:
    plan = json.loads(sys.stdin.read())
    gen = Generator(plan)

    class Client(FastHttpUser):
        host = plan["base_url"].rstrip("/")
        wait_time = constant(0)
        network_timeout = float(plan["timeout_s"])
        connection_timeout = float(plan["timeout_s"])
        max_retries = 0
        concurrency = 1

        @task
        def next_request(self) -> None:
            if gen.phase == "setup":
                if not gen.setup_queue:
                    gevent.sleep(0.01)
                    return
                gen.setup_request(self.client, gen.setup_queue.pop())
                return
            slot = gen.take()
            if slot is None:
                raise StopUser()
            gen.busy_users += 1
            try:
                gen.run_request(self.client, slot)
            finally:
                gen.busy_users -= 1

    env = Environment(user_classes=[Client], host=Client.host)
    runner = env.create_local_runner()
    users = gen.users
    runner.start(users, spawn_rate=100)
    # Setup: every simulated client started, the courses the writes go to created (not measured), bounded.
    deadline = time.monotonic() + gen.timeout * 3 + 5
    while runner.user_count < users and time.monotonic() < deadline:
        gevent.sleep(0.05)
    while (gen.setup_queue or gen.setup_outstanding) and time.monotonic() < deadline:
        gevent.sleep(0.05)
    emit({"event": "setup", "courses_created": len(gen.courses), "errors": dict(gen.setup_errors),
          "users": users})
    gen.start_steps()
    stop_when = plan.get("stop_when") or {}
    pending = list(gen.steps)
    while pending:
        s = pending[0]
        now = time.monotonic()
        for each in gen.steps:   # the generator's own CPU over each step's window
            if not each.cpu_start and now >= each.start:
                each.cpu_start = cpu_seconds() or 1e-9
            if each.cpu_start and not each.cpu_end and now >= each.end:
                each.cpu_end = cpu_seconds()
        if s.cpu_end and (s.outstanding == 0 or now >= s.end + gen.timeout + 1):
            if s.end > s.start:
                report = gen.report(s)
                emit(report)
                failing = (stop_when.get("error_rate") is not None and s.scheduled and
                           sum(s.errors.values()) / max(1, s.ok + sum(s.errors.values())) > stop_when["error_rate"]) \
                    or (stop_when.get("p99_ms") is not None and report["p99_ms"] is not None
                        and report["p99_ms"] > stop_when["p99_ms"])
                if failing:
                    gen.stop("stop_when")
            pending.pop(0)
            continue
        if gen.stop_at is not None and s.start >= gen.stop_at:
            pending.pop(0)
            continue
        gevent.sleep(0.02)
    # Requests still out (timed out ones end by the client's timeout) are done by now; stop the users.
    wait_until = time.monotonic() + gen.timeout + 1
    while gen.in_flight and time.monotonic() < wait_until:
        gevent.sleep(0.05)
    runner.quit()
    acked_file = plan.get("acked_file")
    if acked_file:
        with open(acked_file, "wb") as f:
            f.write(bytes(gen.acked))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    emit({"event": "done", "stopped_by": gen.stopped_by, "acknowledged_total": gen.acked_total,
          "courses": sorted(set(gen.courses) | set(plan.get("courses") or [])),
          "generator": {"pid": os.getpid(), "cpu_seconds": round(cpu_seconds(), 2),
                        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "users": users}})
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # noqa: BLE001 - the parent reads this line; the traceback goes to stderr
        import traceback

        traceback.print_exc()
        emit({"event": "error", "message": f"{type(e).__name__}: {e}"})
        sys.exit(2)
