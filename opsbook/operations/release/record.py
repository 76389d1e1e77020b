"""What the release and rollback records show. `runbooks/release.ipynb` renders a release's
data (written by steps.py as JSON) with these functions, so the record is a notebook like every
other operation's. The phases it shows are the ones plan.PHASES describes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from opsbook.core.errors import OpsbookError
from opsbook.operations.release.guardrails import notes as guardrail_notes
from opsbook.operations.release.plan import PHASES

# What runbooks/release.ipynb imports: a release starts its record's kernel when it begins and has
# it import these while the release runs (runner.WarmKernel); the record's cells find them loaded.
KERNEL_PRELOAD = ("import pandas, IPython.display\n"
                  "import opsbook.engines.records.guard, opsbook.engines.records.figures\n"
                  "import opsbook.operations.release.record")


class ReleaseFailed(OpsbookError):
    """The release (or rollback) this record describes failed; the record says where and why."""


def load(path: str) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def summary(data: dict[str, Any]) -> str:
    lines = [
        f"{data['kind']} of bl-api {data['version']} to {data['env']}: {data['outcome'].upper()}",
        f"  operator {data['operator']}, opsbook git sha {data['git_sha']}",
        f"  started {data['started_at']}, took {data['duration_s']:.0f} s",
        f"  artifact {data.get('artifact', {}).get('file')} sha256 {data.get('artifact', {}).get('sha256')}",
    ]
    if data.get("reason"):
        lines.append(f"  reason: {data['reason']}")
    if data.get("detail") and data["detail"] != data.get("reason"):
        lines.append("  detail:\n    " + data["detail"].replace("\n", "\n    "))
    if data.get("lock"):
        lines.append(f"  lock: {data['lock']}")
    for note in [*(data.get("notes") or []), *guardrail_notes(data.get("guardrails") or {})]:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def plan_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    plan = data["plan"]
    rows = []
    for i, batch in enumerate(plan["batches"], 1):
        for host in batch:
            rows.append({"batch": i, "host": host, "serves_before": plan["current"].get(host),
                         "target": plan["target"]})
    return rows


def phase_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Every phase the plan named, in order, with what it does (plan.PHASES) and the seconds it
    took; a phase the release did not reach says so."""
    took = data.get("phases", {})
    planned = list(data["plan"].get("phases") or []) or list(took)
    planned += [p for p in took if p not in planned]
    return [{"phase": p, "seconds": round(took[p], 1) if p in took else None,
             "ran": "yes" if p in took else "not reached", "what it does": PHASES.get(p, "")} for p in planned]


def batch_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    return data.get("batches", [])


def probe_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    probe = data.get("probe") or {}
    return [{"phase": name, **figs} for name, figs in (probe.get("phases") or {}).items()]


def key_figures(data: dict[str, Any]) -> dict[str, Any]:
    probe = data.get("probe") or {}
    figs = {
        "kind": data["kind"],
        "version": data["version"],
        "previous_versions": sorted({v for v in data["plan"]["current"].values() if v}),
        "outcome": data["outcome"],
        "duration_s": round(data["duration_s"], 1),
        "phase_seconds": {k: round(v, 1) for k, v in data.get("phases", {}).items()},
        "hosts": sum(len(b) for b in data["plan"]["batches"]),
        "batches": len(data["plan"]["batches"]),
        "commit_time": data.get("commit_time"),
        "requests": probe.get("requests"),
        "failed_requests": probe.get("failed"),
        "p50_ms": probe.get("p50_ms"),
        "p99_ms": probe.get("p99_ms"),
        "p99_ms_before": probe.get("p99_ms_before"),
        "p99_ms_during": probe.get("p99_ms_during"),
        "missing_acknowledged_writes": probe.get("missing_acknowledged_writes"),
        "migrations_applied": data.get("migrations", {}).get("applied", []),
        "contracts_pending": data.get("migrations", {}).get("contracts_pending", []),
        "artifact_sha256": (data.get("artifact") or {}).get("sha256"),   # the rehearsal gate matches on it
    }
    guard = data.get("guardrails") or {}
    if (guard.get("snapshot") or {}).get("id"):
        figs["snapshot"] = guard["snapshot"]["id"]            # the safety point (retention keeps it)
    if guard.get("rehearsal"):
        r = guard["rehearsal"]
        figs["rehearsal"] = ("skipped: " + r["skipped"]) if r.get("skipped") else (r.get("release") or "none required")
    if data.get("reason"):
        figs["reason"] = data["reason"]
    if data.get("converge"):
        figs["converged"] = data["converge"].get("converged", [])
    if data.get("interrupted_in"):
        figs["interrupted_in"] = data["interrupted_in"]
    if data.get("put_back"):
        figs["put_back"] = data["put_back"]
    gate = data.get("scale_gate")
    if gate:
        figs["scale_gate"] = ("skipped" if gate.get("skipped_reason")
                              else "passed" if gate.get("passed") else "refused")
        if gate.get("skipped_reason"):
            figs["scale_gate_skip_reason"] = gate["skipped_reason"]
        if gate.get("evidence"):
            figs["scale_check_record"] = gate["evidence"].get("id")
    return figs


def conclude(data: dict[str, Any]) -> None:
    """Raise when the release failed, so the record is stored as failed and the task exits non-zero."""
    if data["outcome"] != "succeeded":
        raise ReleaseFailed(f"{data['kind']} of {data['version']} to {data['env']} {data['outcome']}: "
                            f"{data.get('reason')}")
