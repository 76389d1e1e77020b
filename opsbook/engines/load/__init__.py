"""The load driver: open-model, stepped load against an HTTP service, measured from scheduled times.

``run(plan)`` starts the generator in a child process (``python -m opsbook.engines.load.worker``,
the plan as JSON on its stdin, one JSON line per step on its stdout). The child is where Locust
(FastHttpUser, headless, as a library) runs: Locust monkey-patches the standard library with gevent
when it is imported, which must not happen in a Jupyter kernel or in the rest of opsbook. This module
never imports Locust.

The model is **open**: each step offers a fixed arrival rate; every request gets a scheduled send time
(Poisson arrivals at the step's rate), is sent at that time by whichever simulated client is free, and
its latency is measured *from the scheduled time*. A server that slows down cannot slow the load down
and so hide its slowness (coordinated omission): requests that wait for a free client, or in the
server's queue, count that wait. The service time alone (send to answer) is kept beside it.

Latencies go into HDR histograms (``hdrhistogram``), one per step; the child sends them encoded, so the
figures here are exact merges, not averages of percentiles.

The traffic is Biglearn-shaped (``MIXES``): ``record_responses`` batches (mostly about ten responses,
some up to a thousand), ``fetch_course_events`` reads, occasional ``create_course``. Every response uuid
the service acknowledges is written to a file (16 bytes each), so the caller can count them in the
database afterwards.

The generator is bounded (``max_seconds``, ``max_requests``), measures its own CPU per step (a
generator that is saturated is a limit too, and says so), and stops stepping up once a step breaks
``stop_when``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from opsbook.core.errors import OpsbookError

RECORD, FETCH, CREATE, PING = "record_responses", "fetch_course_events", "create_course", "ping"
KINDS = (RECORD, FETCH, CREATE, PING)


class LoadError(OpsbookError):
    """The load plan was refused (before any request was sent) or the generator failed."""


@dataclass(frozen=True)
class Mix:
    """What the traffic is: the share of each request kind, and the sizes of record_responses batches."""

    name: str
    kinds: dict[str, float]                 # kind -> share of requests
    batch_sizes: dict[int, float]           # responses per record_responses request -> share of those requests
    description: str

    @property
    def mean_batch(self) -> float:
        total = sum(self.batch_sizes.values())
        return sum(size * w for size, w in self.batch_sizes.items()) / total if total else 0.0

    @property
    def write_share(self) -> float:
        total = sum(self.kinds.values())
        return self.kinds.get(RECORD, 0.0) / total if total else 0.0

    def requests_per_s(self, responses_per_s: float) -> float:
        """The request rate that offers `responses_per_s` recorded responses (a mix without writes:
        the rate is taken as requests/s)."""
        per_request = self.write_share * self.mean_batch
        return responses_per_s / per_request if per_request else responses_per_s


# Biglearn's clients sent record_responses in chunks: mostly about ten responses, a few large
# catch-up batches up to the API's limit of 1,000. Reads are course event fetches; courses are
# created now and then. The shares are requests, not responses.
MIXES: dict[str, Mix] = {
    "biglearn": Mix(
        "biglearn", {RECORD: 0.88, FETCH: 0.115, CREATE: 0.005},
        {5: 0.30, 10: 0.55, 20: 0.14, 100: 0.008, 1000: 0.002},
        "record_responses 88 % of requests (batches of 5/10/20, 1 % of them 100 or 1,000), "
        "fetch_course_events 11.5 %, create_course 0.5 %",
    ),
    "record10": Mix("record10", {RECORD: 1.0}, {10: 1.0},
                    "record_responses only, 10 responses a request (the original full-scale measurement)"),
    "record1": Mix("record1", {RECORD: 1.0}, {1: 1.0}, "record_responses only, 1 response a request"),
    "ping": Mix("ping", {PING: 1.0}, {}, "GET /ping only: the stack without the event store (rates are requests/s)"),
}


def mix_named(name: str) -> Mix:
    if name not in MIXES:
        known = "; ".join(f"{m.name}: {m.description}" for m in MIXES.values())
        raise LoadError(f"unknown traffic mix {name!r}; mixes are {known}. No load was sent.")
    return MIXES[name]


# --- where traffic may go -------------------------------------------------------------------------
def check_target(url: str, allowed: list[str] | None) -> str:
    """Refuse a URL whose host is not an IP address inside `allowed` (CIDRs) or loopback. `allowed`
    None: any address (an AWS environment's own load balancer, resolved by name)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LoadError(f"the load target {url!r} is not an http(s) URL. No load was sent.")
    if allowed is None:
        return url
    try:
        address = ipaddress.ip_address(parts.hostname)
    except ValueError:
        raise LoadError(
            f"the load target {url!r} is a name, not an address; this environment only takes load at "
            f"loopback or {', '.join(allowed)}. No load was sent. Give the load balancer's address."
        ) from None
    if address.is_loopback or any(address in ipaddress.ip_network(n, strict=False) for n in allowed):
        return url
    raise LoadError(
        f"the load target {url} is outside this environment's networks (loopback, {', '.join(allowed)}); "
        f"load only goes to the environment's own load balancer. No load was sent.")


# --- the plan ---------------------------------------------------------------------------------------
@dataclass
class Step:
    responses_per_s: float       # offered (the mix's unit: responses/s; for `ping`, requests/s)
    requests_per_s: float        # offered requests/s that gives it
    seconds: float


@dataclass
class LoadPlan:
    base_url: str
    steps: list[Step]
    mix: str = "biglearn"
    courses: list[str] = field(default_factory=list)     # created before the first step; writes go to them
    timeout_s: float = 10.0                               # a request without an answer by then is an error
    max_in_flight: int = 256                              # simulated clients (greenlets), each one request at a time
    max_requests: int = 2_000_000                         # the generator stops scheduling after this many
    max_seconds: float = 900.0                            # ... or after this long (setup not included)
    stop_when: dict[str, float] | None = None             # {"error_rate": 0.5, "p99_ms": 5000}: stop stepping up
    arrivals: str = "poisson"                             # poisson | uniform
    seed: int = 0
    ping_delay_s: float = 0.0                             # tests: X-Test-Delay on /ping (a server started to honour it)
    acked_file: str = ""                                  # where the child writes acknowledged response uuids

    def to_json(self) -> str:
        mix = mix_named(self.mix)
        doc = asdict(self)
        doc["kinds"] = mix.kinds
        doc["batch_sizes"] = {str(k): v for k, v in mix.batch_sizes.items()}
        return json.dumps(doc)


def make_steps(responses_per_s: list[float], seconds: float, mix: Mix) -> list[Step]:
    return [Step(float(r), round(mix.requests_per_s(float(r)), 3), float(seconds)) for r in responses_per_s]


def validate(plan: LoadPlan) -> None:  # noqa: PLR0912 - one branch per refusal, each with its message
    """Refuse a plan that makes no sense, before anything is sent; the message says what to change."""
    mix = mix_named(plan.mix)
    problems = []
    if not plan.steps:
        problems.append("no steps: give at least one rate")
    for i, s in enumerate(plan.steps, 1):
        if not (isinstance(s.responses_per_s, int | float) and math.isfinite(s.responses_per_s)) \
                or s.responses_per_s <= 0:
            problems.append(f"step {i}: the rate must be a positive number, got {s.responses_per_s!r}")
        if not (math.isfinite(s.seconds) and s.seconds > 0):
            problems.append(f"step {i}: the step length must be positive seconds, got {s.seconds!r}")
    rates = [s.responses_per_s for s in plan.steps]
    if rates != sorted(rates):
        problems.append(f"steps must go up (the check raises the offered rate step by step), got {rates}")
    if plan.timeout_s <= 0:
        problems.append(f"timeout_s must be positive, got {plan.timeout_s}")
    if plan.max_in_flight < 1:
        problems.append(f"max_in_flight must be at least 1, got {plan.max_in_flight}")
    if plan.max_requests < 1 or plan.max_seconds <= 0:
        problems.append("max_requests and max_seconds must be positive (they bound the check)")
    if plan.arrivals not in ("poisson", "uniform"):
        problems.append(f"arrivals must be poisson or uniform, got {plan.arrivals!r}")
    if mix.write_share and not plan.courses:
        problems.append(f"mix {mix.name} writes responses: give courses to write to")
    planned = sum(s.seconds for s in plan.steps)
    if planned > plan.max_seconds:
        problems.append(f"the steps last {planned:.0f} s, more than max_seconds {plan.max_seconds:.0f} s")
    scheduled = sum(s.requests_per_s * s.seconds for s in plan.steps)
    if scheduled > plan.max_requests:
        problems.append(f"the steps would send about {scheduled:,.0f} requests, more than max_requests "
                        f"{plan.max_requests:,}")
    if problems:
        raise LoadError("the load plan is refused: " + "; ".join(problems) + ". No load was sent.")


# --- results ----------------------------------------------------------------------------------------
@dataclass
class StepResult:
    """What one step offered and achieved, as the child measured it (times are epoch seconds)."""

    index: int
    offered_responses_per_s: float
    offered_requests_per_s: float
    start: float
    end: float
    seconds: float                       # the window's real length (a truncated last step is shorter)
    scheduled: int                       # requests whose scheduled time fell in the step
    scheduled_responses: int             # responses in the step's scheduled record_responses requests
    sent: int
    ok: int
    errors: dict[str, int]               # kind of error -> requests ("HTTP 503", "timeout", "ConnectionRefusedError")
    acknowledged_responses: int          # of the step's requests
    achieved_requests_per_s: float       # OK answers received during the window / window
    achieved_responses_per_s: float      # responses acknowledged during the window / window
    p50_ms: float | None                 # from the scheduled time
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    service_p99_ms: float | None         # from the actual send (what a closed-loop tool would report)
    send_lag_p99_ms: float | None        # how late requests left after their scheduled time
    max_in_flight: int
    in_flight_cap_hits: int              # requests that waited because every simulated client was busy
    generator_cpu: float                 # cores the generator used during the window (1.0 = one core)
    by_kind: dict[str, dict[str, Any]]   # kind -> {ok, errors, p99_ms}
    histogram: str = field(default="", repr=False)   # HDR histogram (µs, from scheduled), encoded
    truncated: bool = False

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def error_rate(self) -> float:
        done = self.ok + self.error_count
        return self.error_count / done if done else (1.0 if self.scheduled else 0.0)

    @property
    def offered_actual(self) -> float:
        """What the step really offered (per second, the mix's unit): Poisson arrivals scatter around the
        nominal rate, by ±10 % over a short step at a low rate, and achieved is judged against what was sent."""
        if self.seconds <= 0:
            return 0.0
        if self.scheduled_responses:
            return self.scheduled_responses / self.seconds
        return self.scheduled / self.seconds

    @property
    def achieved_ratio(self) -> float:
        """Achieved over what was really offered, in the mix's unit (responses; requests without writes)."""
        offered = self.offered_actual
        if offered <= 0:
            return 0.0
        achieved = self.achieved_responses_per_s if self.scheduled_responses else self.achieved_requests_per_s
        return achieved / offered

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> StepResult:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in doc.items() if k in names})

    def row(self) -> dict[str, Any]:
        """A flat row for a table (no histogram)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("histogram", "by_kind", "errors")}
        d["errors"] = self.error_count
        d["error_rate"] = round(self.error_rate, 4)
        d["achieved_ratio"] = round(self.achieved_ratio, 3)
        d["errors_by_kind"] = ", ".join(f"{k}: {v}" for k, v in sorted(self.errors.items())) or ""
        return d


@dataclass
class LoadResult:
    plan: LoadPlan
    steps: list[StepResult]
    setup: dict[str, Any]                # courses created, setup errors
    stopped_by: str                      # "plan" | "stop_when" | "max_seconds" | "max_requests"
    acknowledged_file: str
    acknowledged_total: int
    generator: dict[str, Any]            # pid, cpu seconds, peak rss
    courses: list[str]                   # every course the traffic wrote to (given ones and created ones)
    stderr_tail: str = ""

    def overall_p99_ms(self) -> float | None:
        from hdrh.histogram import HdrHistogram

        total = HdrHistogram(1, 3_600_000_000, 3)
        for s in self.steps:
            if s.histogram:
                total.decode_and_add(s.histogram)
        return round(total.get_value_at_percentile(99) / 1000, 2) if total.get_total_count() else None


def read_acknowledged(path: str | Path) -> list[str]:
    """The acknowledged response uuids the child wrote (16 raw bytes each), as uuid strings."""
    import uuid

    data = Path(path).read_bytes() if path and Path(path).exists() else b""
    return [str(uuid.UUID(bytes=data[i:i + 16])) for i in range(0, len(data) - len(data) % 16, 16)]


def run(plan: LoadPlan, *, on_step: Callable[[StepResult], None] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None, python: str | None = None) -> LoadResult:
    """Run the plan in a child process; call `on_step` with each step as it ends. Returns every step.

    The child is bounded by the plan's caps; it is also killed if it outlives them by a margin."""
    validate(plan)
    made_file = not plan.acked_file
    if made_file:   # the caller reads it from the result (read_acknowledged) and removes it
        handle, plan.acked_file = tempfile.mkstemp(prefix="opsbook-load-acked-", suffix=".bin")
        os.close(handle)
    try:
        return _run_child(plan, on_step=on_step, on_event=on_event, python=python)
    except BaseException:
        if made_file:   # no result to read it from: nobody else would remove it
            with contextlib.suppress(OSError):
                os.unlink(plan.acked_file)
        raise


def _run_child(plan: LoadPlan, *, on_step: Callable[[StepResult], None] | None,  # noqa: PLR0915 - one child's lifecycle
               on_event: Callable[[dict[str, Any]], None] | None, python: str | None) -> LoadResult:
    cmd = [python or sys.executable, "-m", "opsbook.engines.load.worker"]
    from opsbook.core.paths import ROOT

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, bufsize=1, env=env, cwd=ROOT)
    stderr_lines: list[str] = []

    def drain_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            stderr_lines.append(line.rstrip())
            del stderr_lines[:-40]

    threading.Thread(target=drain_stderr, daemon=True).start()
    deadline = time.monotonic() + plan.max_seconds + 120 + plan.timeout_s * 2
    killer = threading.Timer(max(1.0, deadline - time.monotonic()), proc.kill)
    killer.daemon = True
    killer.start()
    steps: list[StepResult] = []
    done: dict[str, Any] | None = None
    setup: dict[str, Any] = {}
    try:
        assert proc.stdin is not None
        assert proc.stdout is not None
        try:
            proc.stdin.write(plan.to_json())
            proc.stdin.close()
        except BrokenPipeError:   # the child died before it read its plan: said below, with its last lines
            pass
        for line in proc.stdout:
            try:
                doc = json.loads(line)
            except ValueError:
                stderr_lines.append(f"(stdout) {line.rstrip()}")
                continue
            event = doc.get("event")
            if on_event is not None:
                on_event(doc)
            if event == "setup":
                setup = doc
            elif event == "step":
                step = StepResult.from_json(doc)
                steps.append(step)
                if on_step is not None:
                    on_step(step)
            elif event == "done":
                done = doc
            elif event == "error":
                raise LoadError(f"the load generator failed: {doc.get('message')}")
        code = proc.wait()
    finally:
        killer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if done is None:
        tail = "\n  ".join(stderr_lines[-15:])
        raise LoadError(f"the load generator exited {code} without its results (see its last lines below); the "
                        f"steps it finished are lost.\n  {tail}")
    return LoadResult(plan, steps, setup, done.get("stopped_by", "plan"), plan.acked_file,
                      int(done.get("acknowledged_total", 0)), done.get("generator", {}),
                      list(done.get("courses", [])), "\n".join(stderr_lines[-15:]))
