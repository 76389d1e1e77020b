"""The release probe: steady traffic through the load balancer while a release runs.

``Probe(base_url, rate=20)`` creates a few courses, then sends requests at a fixed rate from
background threads: ``record_responses`` writes (small batches to those courses),
``fetch_course_events`` reads and ``/ping``. Every request becomes a sample: when it was
sent, the phase it was sent in (``probe.mark("batch 1")``), its kind, HTTP status or error,
and latency. Every response uuid the service acknowledged (200 with it in
``recorded_response_uuids``) is remembered; ``stop()`` reads every course back and reports the
acknowledged writes it cannot find.

Outcomes: ``ok`` (2xx), ``failed`` (connection error, timeout, 5xx: what a user would
suffer), ``client_error`` (4xx: the probe's requests are valid, so a 4xx is a finding, e.g. a
course the database no longer knows, counted apart from failures), ``skipped`` (the probe
had no free sender at a tick: requests were piling up). Latency percentiles are over every
sent request, failed ones included (a timeout counts as the time it took).

The probe is bounded: it stops sending after ``max_seconds`` even if ``stop()`` is never
called, and its threads are daemons.
"""

from __future__ import annotations

import itertools
import math
import queue
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opsbook.core.errors import OpsbookError
from opsbook.core.inventory import Env
from opsbook.engines import httpclient

OK, FAILED, CLIENT_ERROR, SKIPPED = "ok", "failed", "client_error", "skipped"
WRITE, READ, PING = "write", "read", "ping"
DEFAULT_MIX = {WRITE: 0.5, READ: 0.4, PING: 0.1}


class ProbeError(OpsbookError):
    pass


@dataclass(frozen=True)
class Sample:
    t: float                 # seconds since the probe started, when the request was sent
    at: float                # wall clock (epoch seconds) when it was sent
    phase: str
    kind: str                # write | read | ping
    outcome: str             # ok | failed | client_error | skipped
    status: int | None       # HTTP status, None if no answer
    error: str | None        # transport error or the first bytes of a non-2xx body
    latency_ms: float


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def _stats(samples: list[Sample]) -> dict[str, Any]:
    sent = [s for s in samples if s.outcome != SKIPPED]
    counts = Counter(s.outcome for s in samples)
    latencies = [s.latency_ms for s in sent]
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    return {
        "requests": len(sent),
        "failed": counts[FAILED],
        "client_errors": counts[CLIENT_ERROR],
        "skipped": counts[SKIPPED],
        "p50_ms": None if p50 is None else round(p50, 1),
        "p99_ms": None if p99 is None else round(p99, 1),
    }


@dataclass
class ProbeResults:
    base_url: str
    started_at: float                        # epoch seconds
    duration_s: float
    samples: list[Sample]
    phases: list[tuple[str, float, float]]   # (name, start t, end t), in order
    acknowledged: dict[str, str]             # response uuid -> phase it was acknowledged in
    missing_acknowledged_writes: list[str] | None   # None: not verified (yet, or it could not be)
    verify_error: str | None = None
    stopped_by: str = "stop()"               # stop() | max_seconds
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    # -- figures ------------------------------------------------------------------------
    @property
    def requests(self) -> int:
        return self.overall()["requests"]

    @property
    def failed(self) -> int:
        return self.overall()["failed"]

    @property
    def client_errors(self) -> int:
        return self.overall()["client_errors"]

    @property
    def p50_ms(self) -> float | None:
        return self.overall()["p50_ms"]

    @property
    def p99_ms(self) -> float | None:
        return self.overall()["p99_ms"]

    @property
    def verified(self) -> bool:
        return self.missing_acknowledged_writes is not None

    def overall(self) -> dict[str, Any]:
        if "overall" not in self._cache:
            self._cache["overall"] = _stats(self.samples)
        return self._cache["overall"]

    def phase_names(self) -> list[str]:
        return list(dict.fromkeys(name for name, _s, _e in self.phases))

    def phase(self, name: str) -> dict[str, Any]:
        """Figures of the requests sent during one phase (and its acknowledged and missing writes)."""
        if name not in self.phase_names():
            raise ProbeError(f"the probe has no phase {name!r}; its phases are {self.phase_names()}.")
        figures = _stats([s for s in self.samples if s.phase == name])
        figures["acknowledged_writes"] = sum(1 for p in self.acknowledged.values() if p == name)
        if self.missing_acknowledged_writes is not None:
            figures["missing_acknowledged_writes"] = sum(
                1 for u in self.missing_acknowledged_writes if self.acknowledged.get(u) == name)
        return figures

    def failures(self, limit: int = 5) -> list[tuple[tuple[str, str], int]]:
        """The most frequent (phase, failure description) pairs with their counts."""
        counts = Counter((s.phase, s.error or f"HTTP {s.status}") for s in self.samples
                         if s.outcome in {FAILED, CLIENT_ERROR})
        return counts.most_common(limit)

    def errors(self, limit: int = 10) -> list[tuple[str, int]]:
        """The most frequent failure descriptions with their counts."""
        counts = Counter((s.error or f"HTTP {s.status}") for s in self.samples
                         if s.outcome in {FAILED, CLIENT_ERROR})
        return counts.most_common(limit)

    def figures(self) -> dict[str, Any]:
        """Small, JSON-ready figures for a record's ledger entry."""
        return {
            "base_url": self.base_url,
            "started_at": datetime.fromtimestamp(self.started_at, UTC).isoformat(timespec="seconds"),
            "duration_s": round(self.duration_s, 1),
            **self.overall(),
            "acknowledged_writes": len(self.acknowledged),
            "missing_acknowledged_writes": (None if self.missing_acknowledged_writes is None
                                            else len(self.missing_acknowledged_writes)),
            "verify_error": self.verify_error,
            "stopped_by": self.stopped_by,
            "phases": {name: self.phase(name) for name in self.phase_names()},
        }

    # -- gates ----------------------------------------------------------------------------
    @staticmethod
    def _check(figures: dict[str, Any], slo: dict[str, Any], where: str) -> list[str]:
        reasons = []
        limit = slo.get("max_failed_requests")
        if limit is not None and figures["failed"] > limit:
            reasons.append(f"{where}: {figures['failed']} failed requests (SLO allows {limit})")
        limit = slo.get("max_client_errors", 0)
        if limit is not None and figures["client_errors"] > limit:
            reasons.append(f"{where}: {figures['client_errors']} requests answered 4xx (SLO allows {limit})")
        limit = slo.get("max_p99_ms")
        if limit is not None and figures["p99_ms"] is not None and figures["p99_ms"] > limit:
            reasons.append(f"{where}: p99 latency {figures['p99_ms']:.0f} ms (SLO allows {limit} ms)")
        if figures["requests"] == 0:
            reasons.append(f"{where}: no requests were sent, so nothing was measured")
        return reasons

    def within(self, slo: dict[str, Any]) -> tuple[bool, list[str]]:
        """Whole-run gate: (ok, reasons). ``slo`` as in the inventory's ``opsbook_release_slo``:
        max_failed_requests, max_p99_ms, max_client_errors (default 0),
        max_missing_acknowledged_writes (default 0; an unverified run fails)."""
        overall = self.overall()
        reasons = self._check(overall, slo, "whole run")
        if reasons and overall["failed"] + overall["client_errors"]:
            reasons.append("what failed: " + "; ".join(
                f"{n} x {what} (during {phase})" for (phase, what), n in self.failures()))
        limit = slo.get("max_missing_acknowledged_writes", 0)
        if self.missing_acknowledged_writes is None:
            why = self.verify_error or "probe not stopped"
            reasons.append(f"acknowledged writes were not verified ({why})")
        elif limit is not None and len(self.missing_acknowledged_writes) > limit:
            reasons.append(f"{len(self.missing_acknowledged_writes)} acknowledged writes are missing "
                           f"(SLO allows {limit}), e.g. {self.missing_acknowledged_writes[:3]}")
        return not reasons, reasons

    def baseline(self, phases: tuple[str, ...]) -> dict[str, Any]:
        """Figures of the requests sent during any of `phases` (those it has; empty when none)."""
        wanted = set(phases) & set(self.phase_names())
        return _stats([s for s in self.samples if s.phase in wanted])

    def baseline_slo(self, slo: dict[str, Any], baseline: tuple[str, ...] = ("before",),
                     headroom: float = 1.25) -> tuple[dict[str, Any], str | None]:
        """The SLO a change is judged by: `slo`, except that when the service already missed its
        latency objective before the change (the `baseline` phases), the change may not make it worse
        than `headroom` times that baseline. A change cannot fix what it is blamed for otherwise.
        Returns (slo, note) where the note says why it was relaxed (None when it was not)."""
        limit = slo.get("max_p99_ms")
        before = self.baseline(baseline).get("p99_ms")
        if limit is None or before is None or before <= limit:
            return slo, None
        relaxed = {**slo, "max_p99_ms": round(before * headroom)}
        return relaxed, (f"the service already missed its p99 objective before this change ({before:.0f} ms > "
                         f"{limit} ms): judged against that baseline, no worse than {relaxed['max_p99_ms']} ms")

    def phase_within(self, phase: str, slo: dict[str, Any]) -> tuple[bool, list[str]]:
        """One phase's gate (e.g. after each batch): (ok, reasons). Missing writes count only once
        the run is verified."""
        figures = self.phase(phase)
        reasons = self._check(figures, slo, f"phase {phase!r}")
        limit = slo.get("max_missing_acknowledged_writes", 0)
        missing = figures.get("missing_acknowledged_writes")
        if missing is not None and limit is not None and missing > limit:
            reasons.append(f"phase {phase!r}: {missing} acknowledged writes are missing (SLO allows {limit})")
        return not reasons, reasons

    # -- picture --------------------------------------------------------------------------
    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Latency and failures over time, phases shaded and named, as a PNG at ``path``."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        path = Path(path)
        fig = Figure(figsize=(11, 6), layout="constrained")
        FigureCanvasAgg(fig)
        ax_lat, ax_err = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
        colours = {OK: "tab:blue", CLIENT_ERROR: "tab:orange", FAILED: "tab:red"}
        for outcome, colour in colours.items():
            pts = [(s.t, max(s.latency_ms, 0.1)) for s in self.samples if s.outcome == outcome]
            if pts:
                ax_lat.scatter(*zip(*pts, strict=True), s=6, color=colour, alpha=0.6,
                               label=f"{outcome} ({len(pts)})")
        if self.p99_ms is not None:
            ax_lat.axhline(max(self.p99_ms, 0.1), color="grey", linestyle="--", linewidth=0.8,
                           label=f"p99 {self.p99_ms:.0f} ms")
        ax_lat.set_yscale("log")
        ax_lat.set_ylabel("latency (ms)")
        ax_lat.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
        # Failures per time bin: fine bins for short runs, coarser for long releases.
        width = next(w for w in (0.25, 1, 5, 15, 60, 300) if self.duration_s / w <= 240)
        bins = max(1, math.ceil(self.duration_s / width))
        counts: dict[str, list[int]] = {o: [0] * bins for o in (FAILED, CLIENT_ERROR, SKIPPED)}
        for s in self.samples:
            if s.outcome in counts:
                counts[s.outcome][min(int(s.t / width), bins - 1)] += 1
        bottom = [0] * bins
        for outcome, colour in ((FAILED, "tab:red"), (CLIENT_ERROR, "tab:orange"), (SKIPPED, "tab:grey")):
            # Only the bins that have any: a bar per empty bin (up to 240 of each kind, nearly all empty in
            # a good release) cost half a second of matplotlib in every release.
            shown = [i for i in range(bins) if counts[outcome][i]] or [0]   # one (empty) bar keeps its legend colour
            ax_err.bar([i * width for i in shown], [counts[outcome][i] for i in shown], width=width, align="edge",
                       bottom=[bottom[i] for i in shown], color=colour, label=f"{outcome} ({sum(counts[outcome])})")
            bottom = [b + v for b, v in zip(bottom, counts[outcome], strict=True)]
        ax_err.set_ylabel(f"requests per {width:g} s")
        ax_err.set_xlabel("seconds since the probe started")
        ax_err.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
        for i, (name, start, end) in enumerate(self.phases):
            for ax in (ax_lat, ax_err):
                ax.axvspan(start, end, color="0.92" if i % 2 else "white", zorder=0)
                ax.axvline(start, color="0.6", linewidth=0.6)
            ax_lat.annotate(name, (start, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -2),
                            textcoords="offset points", va="top", fontsize="small")
        ax_lat.set_xlim(0, max(self.duration_s, 1))
        o = self.overall()
        fig.suptitle(title or (f"probe {self.base_url}: {o['requests']} requests, {o['failed']} failed, "
                               f"missing writes {self.figures()['missing_acknowledged_writes']}"))
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        return path


class Probe:
    """Steady traffic against ``base_url``; ``start()``, ``mark(phase)``, ``stop() -> ProbeResults``."""

    def __init__(self, base_url: str, rate: float = 20.0, *, mix: dict[str, float] | None = None,
                 courses: int = 3, batch_size: int = 3, senders: int = 8, timeout: float = 5.0,
                 max_seconds: float = 3600.0, seed: int | None = None):
        if rate <= 0:
            raise ProbeError(f"probe rate must be positive (got {rate}); nothing was sent.")
        self.base_url = base_url.rstrip("/")
        self.rate = float(rate)
        self.mix = dict(mix or DEFAULT_MIX)
        self.course_count = courses
        self.batch_size = batch_size
        self.senders = senders
        self.timeout = timeout
        self.max_seconds = max_seconds
        self._random = random.Random(seed)  # noqa: S311 - picks which course to hit, nothing secret
        self._samples: list[Sample] = []
        self._acknowledged: dict[str, str] = {}          # response uuid -> phase
        self._read_offsets: dict[str, int] = {}
        self._inflight: dict[int, tuple[str, str, float]] = {}   # request -> (phase, kind, sent at t)
        self._requests = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._jobs: queue.Queue = queue.Queue(maxsize=senders)
        self._threads: list[threading.Thread] = []
        self._phases: list[tuple[str, float]] = []
        self._phase = "before"
        self._t0 = 0.0
        self._wall0 = 0.0
        self._stopped_by = "stop()"
        self._ended: float | None = None
        self.courses: list[str] = []
        self._report: ProbeResults | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, phase: str = "before") -> Probe:
        """Create the probe's courses, then send traffic in the background from now on."""
        import httpx

        if self._threads:
            raise ProbeError("this probe is already running; stop() it and start a new Probe.")
        with httpclient.client(base_url=self.base_url, timeout=self.timeout) as client:
            for _ in range(self.course_count):
                course = str(uuid.uuid4())
                body = {"course_uuid": course, "ecosystem_uuid": str(uuid.uuid4())}
                last = ""
                for _attempt in range(3):
                    try:
                        r = client.post("/create_course", json=body)
                    except httpx.HTTPError as e:
                        last = f"{type(e).__name__}: {e}"
                    else:
                        if r.status_code == 200:
                            break
                        last = f"HTTP {r.status_code} {r.text[:200]}"
                    time.sleep(0.5)
                else:
                    raise ProbeError(
                        f"the probe could not create its courses through {self.base_url} ({last}); it sent "
                        f"no traffic. Check the service answers there (`invoke report`), then retry.")
                self.courses.append(course)
                self._read_offsets[course] = 0
        self._t0 = time.monotonic()
        self._wall0 = time.time()
        self._phase = phase
        self._phases.append((phase, 0.0))
        for i in range(self.senders):
            t = threading.Thread(target=self._sender, name=f"probe-sender-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        ticker = threading.Thread(target=self._ticker, name="probe-ticker", daemon=True)
        ticker.start()
        self._threads.append(ticker)
        return self

    def mark(self, phase: str) -> None:
        """Label the requests sent from now on with ``phase`` (e.g. "batch 1", "after")."""
        with self._lock:
            self._phase = phase
            self._phases.append((phase, self._now()))

    def _now(self) -> float:
        return time.monotonic() - self._t0

    def settle(self, phase: str, within_s: float) -> None:
        """Wait until every request sent during `phase` has an answer, or has waited `within_s` (a
        request that slow is judged by how long it has waited so far: see `results`)."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            with self._lock:
                now = self._now()
                waiting = [t for p, _k, t in self._inflight.values() if p == phase and now - t < within_s]
            if not waiting:
                return
            time.sleep(0.05)

    def results(self) -> ProbeResults:
        """The figures so far (acknowledged writes not verified yet); the probe keeps running. A
        request still waiting for its answer counts with the time it has waited so far: a server
        too slow to answer is not a server without slow requests."""
        with self._lock:
            now_t = self._now()
            waiting = [Sample(t, self._wall0 + t, p, k, OK, None, "no answer yet", (now_t - t) * 1000)
                       for p, k, t in self._inflight.values()]
            samples = list(self._samples) + waiting
            acknowledged = dict(self._acknowledged)
            now = self._ended if self._ended is not None else self._now()
            phases = [(name, start, self._phases[i + 1][1] if i + 1 < len(self._phases) else now)
                      for i, (name, start) in enumerate(self._phases)]
        return ProbeResults(self.base_url, self._wall0, now, samples, phases, acknowledged, None,
                           stopped_by=self._stopped_by)

    def stop(self, verify: bool = True) -> ProbeResults:
        """Stop sending, wait for requests in flight, verify acknowledged writes; the report."""
        if self._report is not None:
            return self._report
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout + 5)
        with self._lock:
            if self._ended is None:
                self._ended = self._now()
        report = self.results()
        if verify:
            try:
                report.missing_acknowledged_writes = self._verify()
            except ProbeError as e:
                report.verify_error = str(e)
        else:
            report.verify_error = "verification was not asked for"
        self._report = report
        return report

    # -- sending --------------------------------------------------------------------------
    def _schedule(self):
        """Smooth weighted round robin over the mix: the kinds interleave evenly, deterministically."""
        weights = {k: v for k, v in self.mix.items() if v > 0}
        total = sum(weights.values())
        current = dict.fromkeys(weights, 0.0)
        while True:
            for k, w in weights.items():
                current[k] += w
            pick = max(current, key=current.__getitem__)
            current[pick] -= total
            yield pick

    def _ticker(self) -> None:
        kinds = self._schedule()
        interval = 1.0 / self.rate
        n = 0
        while not self._stop.is_set():
            if self._now() >= self.max_seconds:
                self._stopped_by = "max_seconds"
                with self._lock:
                    self._ended = self._now()
                break
            kind = next(kinds)
            try:
                self._jobs.put_nowait(kind)
            except queue.Full:
                self._add(Sample(self._now(), time.time(), self._phase, kind, SKIPPED, None,
                                 "no free sender", 0.0))
            n += 1
            delay = n * interval - self._now()
            if delay > 0:
                self._stop.wait(delay)
        for _ in range(self.senders):
            try:
                self._jobs.put(None, timeout=self.timeout + 5)
            except queue.Full:
                break

    def _add(self, sample: Sample) -> None:
        with self._lock:
            self._samples.append(sample)

    def _sender(self) -> None:
        with httpclient.client(base_url=self.base_url, timeout=self.timeout) as client:
            while True:
                try:
                    kind = self._jobs.get(timeout=0.5)
                except queue.Empty:
                    if self._stop.is_set():
                        return
                    continue
                if kind is None:
                    return
                self._send(client, kind)

    def _request(self, kind: str, course: str) -> tuple[str, str, Any, list[str]]:
        """(method, path, JSON body, response uuids sent) of one request of this kind."""
        if kind == WRITE:
            sent = [str(uuid.uuid4()) for _ in range(self.batch_size)]
            return "POST", "/record_responses", {"responses": [_response(u, course) for u in sent]}, sent
        if kind == READ:
            return "POST", "/fetch_course_events", {"course_event_requests": [{
                "request_uuid": str(uuid.uuid4()), "course_uuid": course,
                "sequence_number_offset": self._read_offsets.get(course, 0), "max_num_events": 100}]}, []
        return "GET", "/ping", None, []

    def _send(self, client, kind: str) -> None:
        import httpx

        with self._lock:
            phase = self._phase
        course = self._random.choice(self.courses)
        method, path, body, sent = self._request(kind, course)
        t, at = self._now(), time.time()
        started = time.perf_counter()
        status, error, answer = None, None, None
        with self._lock:
            token = next(self._requests)
            self._inflight[token] = (phase, kind, t)
        try:
            r = client.request(method, path, json=body)
            status = r.status_code
            if 200 <= status < 300:
                answer = r.json()
            else:
                error = f"HTTP {status}: {r.text[:120]}"
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {e}"[:200]
        except ValueError as e:                       # a 2xx that is not JSON
            error = f"bad JSON in a {status} answer: {e}"[:200]
            status = None
        latency = (time.perf_counter() - started) * 1000
        outcome = FAILED if status is None or status >= 500 else CLIENT_ERROR if status >= 400 else OK
        with self._lock:
            self._inflight.pop(token, None)
            self._samples.append(Sample(t, at, phase, kind, outcome, status, error, latency))
            if outcome == OK:
                self._remember(kind, course, phase, sent, answer)

    def _remember(self, kind: str, course: str, phase: str, sent: list[str], answer: Any) -> None:
        """Note acknowledged writes, and how far reads got (called holding the lock)."""
        if kind == WRITE:
            recorded = set(answer.get("recorded_response_uuids", []))
            for u in sent:
                if u in recorded:
                    self._acknowledged[u] = phase
        elif kind == READ:
            for resp in answer.get("course_event_responses", []):
                events = resp.get("events") or []
                if events:
                    self._read_offsets[course] = max(self._read_offsets.get(course, 0),
                                                     events[-1]["sequence_number"])

    # -- verification -----------------------------------------------------------------------
    def _verify(self, attempts: int = 5) -> list[str]:
        """Read every course from the start; acknowledged response uuids not found, in ack order."""
        import httpx

        seen: set[str] = set()
        with httpclient.client(base_url=self.base_url, timeout=max(self.timeout, 10)) as client:
            for course in self.courses:
                offset = 0
                while True:
                    answer = None
                    last = ""
                    for _attempt in range(attempts):
                        try:
                            r = client.post("/fetch_course_events", json={"course_event_requests": [{
                                "request_uuid": str(uuid.uuid4()), "course_uuid": course,
                                "sequence_number_offset": offset, "max_num_events": 1000}]})
                        except httpx.HTTPError as e:
                            last = f"{type(e).__name__}: {e}"
                        else:
                            if r.status_code == 200:
                                answer = r.json()["course_event_responses"][0]
                                break
                            last = f"HTTP {r.status_code} {r.text[:200]}"
                        time.sleep(1.0)
                    if answer is None:
                        raise ProbeError(
                            f"could not read course {course} back through {self.base_url} after "
                            f"{attempts} attempts ({last}); acknowledged writes are unverified.")
                    events = answer["events"]
                    seen.update(e["event_uuid"] for e in events)
                    if answer["is_end"] or not events:
                        break
                    offset = events[-1]["sequence_number"] + 1
        with self._lock:
            return [u for u in self._acknowledged if u not in seen]


def _response(response_uuid: str, course: str) -> dict[str, Any]:
    return {
        "response_uuid": response_uuid, "course_uuid": course,
        "ecosystem_item_uuid": str(uuid.uuid4()), "trial_uuid": str(uuid.uuid4()),
        "student_uuid": str(uuid.uuid4()), "exercise_uuid": str(uuid.uuid4()),
        "is_correct": True, "is_real_response": True,
        "responded_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def probe_url(env: Env) -> str:
    """Where a release's probe sends traffic: ``opsbook_probe_url``, else the environment's ALB, else
    the first `lb` host."""
    url = env.var("opsbook_probe_url", None)
    if url:
        return str(url)
    if env.var("opsbook_lb_kind", "haproxy") == "alb":   # an AWS environment: its ALB's DNS name
        from opsbook.engines.rotation import rotation_for

        return rotation_for(env).entry_url()
    lbs = env.hosts("lb")
    if not lbs:
        raise ProbeError(f"environment {env.name!r} has no `lb` host and no opsbook_probe_url; the probe "
                         f"has nowhere to send traffic. Add one to {env.path}/. Nothing was changed.")
    port = env.host_var(lbs[0].name, "lb_http_port", 80)
    return f"http://{lbs[0].address}:{port}"


def probe_for(env: Env, **overrides: Any) -> Probe:
    """A Probe for an environment, configured from its inventory."""
    e = env
    kwargs: dict[str, Any] = {"rate": float(e.var("opsbook_probe_rate", 20)),
                              "max_seconds": float(e.var("opsbook_probe_max_seconds", 3600))}
    kwargs.update(overrides)
    return Probe(probe_url(e), **kwargs)


def slo_for(env: Env) -> dict[str, Any]:
    """The environment's release SLO (``opsbook_release_slo``)."""
    return dict(env.var("opsbook_release_slo", {"max_failed_requests": 0, "max_p99_ms": 2000}))
