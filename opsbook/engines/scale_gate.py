"""The demonstrated-at-scale gate: a release to an environment that asks for it
(`opsbook_require_scale_check: true`, prod) needs a *passing scaling check of the same artifact* (by
sha256), run on one of the environments it trusts (`opsbook_scale_check_from`, e.g. staging and the
lab), at or above its own target (`opsbook_scale_target`: rate, p99, error budget), younger than
`opsbook_scale_check_max_age`, with nothing lost.

It reads only the record ledgers (the `scaling_check` runbook's entries and their key figures), never
the scale_check operation. `decide` is the pure decision over ledger entries; `check_release` finds the
ledgers and raises `ScaleGateRefused` (saying what is missing and how to get it) unless the operator
overrode it with `--skip-scale-check --reason R`, which the release records.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from opsbook.core import ages
from opsbook.core.errors import OpsbookError
from opsbook.engines.records.ledger import Ledgers

RUNBOOK = "scaling_check"


class ScaleGateRefused(OpsbookError):
    """The release was refused: no passing scaling check of this artifact."""


@dataclass(frozen=True)
class Requirement:
    responses_per_s: float
    max_p99_ms: float
    max_error_rate: float
    max_age: timedelta
    from_envs: tuple[str, ...]


@dataclass
class Decision:
    required: bool
    passed: bool
    evidence: dict[str, Any] | None = None        # the ledger entry's id, env, start and key figures
    skipped_reason: str | None = None              # --skip-scale-check --reason R
    misses: list[str] = field(default_factory=list)   # why each near candidate did not count
    unreadable: list[str] = field(default_factory=list)   # ledgers that could not be read

    def text(self) -> str:
        if not self.required:
            return "scale gate: not required by this environment"
        if self.skipped_reason:
            return f"scale gate: SKIPPED by the operator (--skip-scale-check): {self.skipped_reason}"
        if self.passed and self.evidence:
            e = self.evidence
            return (f"scale gate: passed by record {e['id']} ({e['env']}, {e['start']}): "
                    f"{e['target_responses_per_s']:g} responses/s target met, "
                    f"p99 at target {e.get('p99_ms_at_target')} ms")
        return "scale gate: no passing scaling check of this artifact"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_age(value: Any) -> timedelta:
    """`7d`, `12h`, `30m`, `2w`, or seconds."""
    age = ages.parse(value, seconds=True)
    if age is None:
        raise OpsbookError(f"opsbook_scale_check_max_age {value!r}: expected an age like 7d, 12h, 30m or seconds "
                           f"(at most 100 years). Nothing was changed.")
    return age


def requirement(env) -> Requirement | None:
    """What `env` asks of a release, or None when it asks for no scaling check."""
    if not env.var("opsbook_require_scale_check", False):
        return None
    target = env.var("opsbook_scale_target", None)
    if not target:
        raise OpsbookError(f"{env.name} requires a scaling check (opsbook_require_scale_check) but declares no "
                           f"opsbook_scale_target in {env.path}/. Nothing was changed. Add the target.")
    return Requirement(float(target["responses_per_s"]), float(target["max_p99_ms"]),
                       float(target.get("max_error_rate", 0.0)),
                       parse_age(env.var("opsbook_scale_check_max_age", "7d")),
                       tuple(env.var("opsbook_scale_check_from", ["staging", "lab"])))


def _miss(entry: dict[str, Any], req: Requirement, sha256: str, now: datetime) -> str | None:  # noqa: PLR0911 - a reason per rule
    """Why this ledger entry is not the evidence (None: it is)."""
    f = entry.get("figures") or {}
    where = f"record {entry.get('id')} ({entry.get('env')}, {entry.get('start')})"
    if entry.get("env") not in req.from_envs:
        return f"{where}: run on {entry.get('env')}, not on {' or '.join(req.from_envs)}"
    if f.get("artifact_sha256") != sha256:
        other = str(f.get("artifact_sha256"))[:12]
        return f"{where}: measured another artifact ({f.get('version')}, sha256 {other}…)"
    if entry.get("outcome") != "succeeded" or f.get("verdict") != "pass":
        why = "; ".join(f.get("verdict_reasons") or [])
        return f"{where}: verdict {f.get('verdict') or entry.get('outcome')}: {why}"
    if float(f.get("target_responses_per_s") or 0) < req.responses_per_s:
        return f"{where}: passed at {f.get('target_responses_per_s')}/s, below the {req.responses_per_s:g}/s required"
    if float(f.get("target_p99_ms") or 1e12) > req.max_p99_ms:
        return f"{where}: judged against p99 ≤ {f.get('target_p99_ms')} ms, looser than {req.max_p99_ms:g} ms"
    if float(f.get("target_error_rate") or 0) > req.max_error_rate:
        return f"{where}: error budget {f.get('target_error_rate')}, looser than {req.max_error_rate}"
    if f.get("missing_acknowledged") != 0:
        return f"{where}: acknowledged responses missing: {f.get('missing_acknowledged')}"
    try:
        started = datetime.fromisoformat(str(entry.get("start")))
    except ValueError:
        return f"{where}: no readable start time"
    if started.tzinfo is None:
        started = started.replace(tzinfo=UTC)
    if now - started > req.max_age:
        return f"{where}: {(now - started).days} days old, older than {req.max_age}"
    return None


def decide(req: Requirement | None, sha256: str, entries: list[dict[str, Any]], *, now: datetime | None = None,
           skip_reason: str | None = None, unreadable: list[str] | None = None) -> Decision:
    """The gate's decision over ledger entries (every environment's, mixed): the newest qualifying
    scaling check is the evidence."""
    if req is None:
        return Decision(False, True)
    if skip_reason is not None and str(skip_reason).strip():
        return Decision(True, True, skipped_reason=str(skip_reason).strip(), unreadable=list(unreadable or []))
    now = now or datetime.now(UTC)
    misses = []
    checks = sorted((e for e in entries if e.get("runbook") == RUNBOOK), key=lambda e: str(e.get("start")),
                    reverse=True)
    for e in checks:
        why = _miss(e, req, sha256, now)
        if why is None:
            f = e.get("figures") or {}
            evidence = {"id": e.get("id"), "env": e.get("env"), "start": e.get("start"),
                        "target_responses_per_s": float(f.get("target_responses_per_s")),
                        "p99_ms_at_target": f.get("p99_ms_at_target"), "knee_responses_per_s":
                        f.get("knee_responses_per_s"), "version": f.get("version")}
            return Decision(True, True, evidence=evidence, misses=misses[:5], unreadable=list(unreadable or []))
        misses.append(why)
    return Decision(True, False, misses=misses[:5], unreadable=list(unreadable or []))


def refusal(env_name: str, version: str, sha256: str, req: Requirement, d: Decision) -> str:
    lines = [f"{env_name} requires a passing scaling check of this artifact before a release, and there is none: "
             f"bl-api {version} (sha256 {sha256[:16]}…) has no passing `scaling_check` record from "
             f"{' or '.join(req.from_envs)} at or above {req.responses_per_s:g} responses/s with p99 ≤ "
             f"{req.max_p99_ms:g} ms and errors ≤ {req.max_error_rate:.2%}, younger than {req.max_age}. "
             f"Nothing was changed."]
    if d.misses:
        lines.append("  nearest records, and why they do not count:")
        lines.extend(f"    {m}" for m in d.misses)
    for u in d.unreadable:
        lines.append(f"  not read: {u}")
    lines.append(f"  To get one: release {version} to {req.from_envs[0]} (`invoke release --env {req.from_envs[0]} "
                 f"--version {version}`), then `invoke scale.check --env {req.from_envs[0]} --target "
                 f"{req.responses_per_s:g}`. To release without it, say why: `--skip-scale-check --reason R` (the "
                 f"release's record keeps the reason).")
    return "\n".join(lines)


def ledgers(req: Requirement, env=None, read: Ledgers | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Every ledger entry of the trusted environments' record stores (`env` itself when it is one of them),
    through `read` when the caller shares one with another gate; the stores that could not be read."""
    read = read or Ledgers(env)
    entries, unreadable = [], []
    for name in req.from_envs:
        try:
            entries.extend(read.of(name))
        except Exception as e:  # noqa: BLE001 - an unreachable store is reported in the refusal, not fatal here
            unreadable.append(f"{name}'s record store ({type(e).__name__}: {str(e)[:160]})")
    return entries, unreadable


def check_release(env, version: str, sha256: str, *, skip_reason: str | None = None,
                  entries: list[dict[str, Any]] | None = None, now: datetime | None = None,
                  read: Ledgers | None = None) -> Decision:
    """Decide for a release of `sha256` to `env`; raise ScaleGateRefused when it is refused."""
    req = requirement(env)
    if req is None:
        return Decision(False, True)
    unreadable: list[str] = []
    if entries is None and not (skip_reason and str(skip_reason).strip()):
        entries, unreadable = ledgers(req, env, read)
    d = decide(req, sha256, entries or [], now=now, skip_reason=skip_reason, unreadable=unreadable)
    if not d.passed:
        raise ScaleGateRefused(refusal(env.name, version, sha256, req, d))
    return d
