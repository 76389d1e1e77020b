"""Reading a load curve: the knee, the resource that limits it, and the verdict against a target.

Plain functions over plain rows (dicts per step), so they are tested on real data structures and
reused by the scaling check's runbook, its bench and the release gate's tests.

**The knee** is the highest offered step such that it and every step below it *pass*:
p99 (from the scheduled send time) ≤ the SLO, achieved/offered ≥ 0.98, errors < 1 % of requests.
"Offered" there is what the step really sent (its Poisson arrivals scatter around the nominal rate);
the curve is drawn against the nominal rate.
A step that passes above a failing one does not count: the curve has already bent.

**The limiting resource** is named from the first step above the knee (or the last step, when no
step failed): whichever figure is closest to its ceiling among the load generator's CPU, the
machine's CPU (in the lab every host is a container sharing this machine's cores), each host's
CPU, the database's lock waits, and the service's own errors (503 = database pool or database down).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

ACHIEVED_MIN = 0.98          # achieved / offered
ERROR_RATE_MAX = 0.01        # errors / requests answered or timed out
TARGET_MIN = 0.97            # achieved / target at the step that meets it (Poisson arrivals scatter ~1-2 %)
SATURATED = 0.90             # a CPU this busy (fraction of what it has) is a ceiling


@dataclass(frozen=True)
class KneeRule:
    p99_ms: float
    achieved_min: float = ACHIEVED_MIN
    error_rate_max: float = ERROR_RATE_MAX

    def text(self) -> str:
        return (f"the highest step at which it and every lower step had p99 ≤ {self.p99_ms:g} ms (from the "
                f"scheduled send time), achieved/offered ≥ {self.achieved_min:g} and errors < "
                f"{self.error_rate_max:.0%} of requests")

    def failures(self, row: dict[str, Any]) -> list[str]:
        out = []
        p99 = row.get("p99_ms")
        if p99 is None:
            out.append("no answer at all")
        elif p99 > self.p99_ms:
            out.append(f"p99 {p99:.0f} ms > {self.p99_ms:g} ms")
        if row.get("achieved_ratio", 0) < self.achieved_min:
            out.append(f"achieved {row.get('achieved_ratio', 0):.2f} of offered < {self.achieved_min:g}")
        if row.get("error_rate", 0) >= self.error_rate_max:
            out.append(f"errors {row.get('error_rate', 0):.1%} ≥ {self.error_rate_max:.0%}")
        return out


@dataclass
class Knee:
    index: int | None                    # 1-based step index of the knee (None: no step passed)
    offered: float | None                # offered rate at the knee
    achieved: float | None
    p99_ms: float | None
    first_failing: int | None            # the step above the knee that broke the rule
    failing_reasons: list[str] = field(default_factory=list)
    rule: str = ""


def knee(rows: list[dict[str, Any]], rule: KneeRule) -> Knee:
    """The knee of a curve (rows in step order, each with offered, achieved, p99_ms, achieved_ratio,
    error_rate)."""
    best = None
    for row in rows:
        reasons = rule.failures(row)
        if reasons:
            return Knee(best["index"] if best else None, best["offered"] if best else None,
                        best["achieved"] if best else None, best["p99_ms"] if best else None,
                        row["index"], reasons, rule.text())
        best = row
    if best is None:
        return Knee(None, None, None, None, None, ["no step ran"], rule.text())
    return Knee(best["index"], best["offered"], best["achieved"], best["p99_ms"], None, [], rule.text())


@dataclass
class Limit:
    resource: str            # generator | machine cpu | host cpu <name> | database locks | service errors | none
    detail: str


def limiting_resource(row: dict[str, Any], *, shared_cores: int | None = None) -> Limit:
    """Name what limited the step `row` (the first failing step, or the highest one).

    `row` carries the step's figures: generator_cpu (cores), machine_cpu (0..1 of the machine, when the
    hosts share it: the lab), hosts {name: {cpu_cores, cpu_share}}, db {lock_waits_max, ...},
    errors_by_kind, error_rate, send_lag_p99_ms."""
    candidates: list[tuple[float, Limit]] = []
    gen = row.get("generator_cpu") or 0.0
    if gen >= SATURATED:
        candidates.append((gen / 1.0 + 0.05, Limit(
            "load generator", f"the load generator used {gen:.2f} of its one core: it, not the service, set the pace "
                              "(its send lag shows how late requests left)")))
    machine = row.get("machine_cpu")
    if machine is not None and machine >= SATURATED:
        cores = f"{shared_cores} cores" if shared_cores else "its cores"
        candidates.append((machine, Limit(
            "machine cpu", f"this machine's CPU was {machine:.0%} busy: every lab host (load balancer, app hosts, "
                           f"database) and the load generator share {cores}, so adding app hosts cannot add "
                           "capacity here")))
    for host, h in sorted((row.get("hosts") or {}).items()):
        share = h.get("cpu_share")
        if share is not None and share >= SATURATED:
            candidates.append((share, Limit(f"host cpu {host}", f"{host} used {h.get('cpu_cores', 0):.2f} cores, "
                                                                f"{share:.0%} of what it has")))
    db = row.get("db") or {}
    waits = db.get("lock_waits_max") or 0
    if waits >= 5:
        candidates.append((0.5 + min(waits, 50) / 100, Limit(
            "database locks", f"up to {waits} sessions waited for locks (pg_locks): writes queue on row locks")))
    errors = row.get("errors_by_kind") or {}
    unavailable = sum(v for k, v in errors.items() if k in ("HTTP 503", "HTTP 502", "HTTP 504"))
    if unavailable and row.get("error_rate", 0) >= ERROR_RATE_MAX:
        candidates.append((0.85, Limit(
            "service errors", f"{unavailable} requests answered 502/503/504: the service or its database pool "
                              "refused work (pool timeout, or no healthy backend)")))
    refused = sum(v for k, v in errors.items() if "Refused" in k or "Reset" in k or k == "timeout")
    if refused and row.get("error_rate", 0) >= ERROR_RATE_MAX:
        # Most requests unanswered: nothing else measured matters (the service is not there).
        score = 2.0 if row.get("error_rate", 0) >= 0.5 else 0.8
        candidates.append((score, Limit("connection errors", f"{refused} requests got no answer (refused, reset or "
                                                             "timed out): the target is unreachable or overwhelmed")))
    if not candidates:
        return Limit("none identified", "no CPU, lock or error figure was near its ceiling: latency rose without a "
                                        "saturated resource measured here (look at the service's workers and "
                                        "the database's per-statement times)")
    return max(candidates, key=lambda c: c[0])[1]


# --- the verdict against a declared target -----------------------------------------------------------
@dataclass(frozen=True)
class Target:
    responses_per_s: float
    max_p99_ms: float
    max_error_rate: float = 0.0          # the error budget: errors / requests at the target step
    responses_per_request: float | None = None   # informational: the shape the target was set in
    mix: str | None = None

    @classmethod
    def from_inventory(cls, doc: dict[str, Any]) -> Target:
        return cls(float(doc["responses_per_s"]), float(doc["max_p99_ms"]), float(doc.get("max_error_rate", 0.0)),
                   doc.get("responses_per_request"), doc.get("mix"))


@dataclass
class Verdict:
    passed: bool
    reasons: list[str]
    step: int | None            # the step that meets the target (or the one closest to it)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def verdict(rows: list[dict[str, Any]], target: Target, *, missing_acknowledged: int | None,
            achieved_min: float = ACHIEVED_MIN) -> Verdict:
    """Pass when some step offered at least the target rate (nominally) and, at that step, achieved ≥
    achieved_min of what it really offered and ≥ TARGET_MIN of the target itself, had p99 ≤ the target's and
    errors within its budget; and no acknowledged response is missing."""
    reasons: list[str] = []
    if missing_acknowledged is None:
        reasons.append("acknowledged responses were not counted in the database, so nothing-lost is unproven")
    elif missing_acknowledged > 0:
        reasons.append(f"{missing_acknowledged} acknowledged responses are missing from the database")
    at_target = [r for r in rows if r["offered"] >= target.responses_per_s * 0.999]
    if not at_target:
        top = max((r["offered"] for r in rows), default=0)
        reasons.append(f"no step offered the target {target.responses_per_s:g}/s (highest: {top:g}/s)")
        return Verdict(False, reasons, None)
    good = None
    problems: list[str] = []
    for r in at_target:
        why = []
        if r.get("p99_ms") is None or r["p99_ms"] > target.max_p99_ms:
            why.append(f"p99 {r.get('p99_ms')} ms > {target.max_p99_ms:g} ms")
        if r.get("achieved_ratio", 0) < achieved_min:
            why.append(f"achieved {r.get('achieved', 0):.0f}/s, {r.get('achieved_ratio', 0):.2f} of offered")
        elif r.get("achieved", 0) < target.responses_per_s * TARGET_MIN:
            why.append(f"achieved {r.get('achieved', 0):.0f}/s, under {TARGET_MIN:.0%} of the target")
        if r.get("error_rate", 0) > target.max_error_rate:
            why.append(f"errors {r.get('error_rate', 0):.2%} > budget {target.max_error_rate:.2%}")
        if not why:
            good = r
            break
        problems.append(f"step {r['index']} ({r['offered']:g}/s): " + ", ".join(why))
    if good is None:
        reasons.extend(problems[:1])
        return Verdict(False, reasons, at_target[0]["index"])
    return Verdict(not reasons, reasons, good["index"])
