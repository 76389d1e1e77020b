"""What each page of the records site shows, as plain data (dicts and lists of JSON values).

The builder hashes this data to decide whether a page must be rendered again, so everything a
page shows comes from here and nothing else: no clock, no store, no lookups in the templates.
Links are relative to the store's root (``records/<id>/record.html``); a template puts the
page's own way back to that root in front of them.
"""

from __future__ import annotations

import json
import urllib.parse
from datetime import UTC, datetime, timedelta
from typing import Any

from opsbook.engines.charts import Point, chart, number
from opsbook.engines.records import delivery, ledger

OUTCOMES = ("succeeded", "failed", "refused", "interrupted", "running")
TREND_RUNS = 200        # a runbook's charts show its newest runs, at most this many
MAX_FIGURE_CHARTS = 12  # per runbook page: the numeric key figures most runs report
MAX_TEXT = 60           # a parameter's value is cut to this many characters in a table


# Parameters no operator chose: where opsbook put a run's inputs (a release's data file, a copy of
# the migrations). The index leaves them out; the record has them.
PLUMBING = frozenset({"release_data", "migrations_dir"})


def _short(value: Any) -> str:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = ",".join(value)
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def key_parameters(entry: dict[str, Any]) -> str:
    """The parameters that matter, without the empty ones: ``phase=contract dry_run=true``. A release's
    (or rollback's) parameters are its plan, which its key figures hold: from which versions, how many
    hosts in how many batches."""
    params = {k: v for k, v in (entry.get("parameters") or {}).items() if k not in PLUMBING}
    if ledger.kind(entry) in (ledger.RELEASE, ledger.ROLLBACK):
        figures = entry.get("figures") or {}
        params |= {"from": figures.get("previous_versions"), "hosts": figures.get("hosts"),
                   "batches": figures.get("batches")}
    shown = [f"{k}={_short(v)}" for k, v in sorted(params.items()) if v not in (None, "", [], {})]
    return " ".join(shown)


def version_of(entry: dict[str, Any]) -> str:
    figures = entry.get("figures") or {}
    params = entry.get("parameters") or {}
    value = figures.get("version") or params.get("version") or ""
    return value if isinstance(value, str) else json.dumps(value)


def short_sha(sha: str | None) -> str:
    if not sha or sha == "unknown":
        return sha or ""
    base, dirty = (sha[:-6], "-dirty") if sha.endswith("-dirty") else (sha, "")
    return base[:10] + dirty


def _when(iso: str | None) -> str:
    if not iso:
        return ""
    try:
        return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return iso


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return ""
    s = float(seconds)
    if s < 90:
        return f"{s:.1f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def failing_cell(notebook: dict[str, Any]) -> str:
    """The anchor of the cell where an executed notebook failed, in its HTML rendering ("" if none).

    nbconvert gives every cell with an id the anchor ``cell-id=<id>``; a notebook without cell ids
    still has papermill's marker just above the failing cell (``papermill-error-cell``).
    """
    for cell in notebook.get("cells", []):
        if any(o.get("output_type") == "error" for o in cell.get("outputs") or []):
            return f"cell-id={cell['id']}" if cell.get("id") else "papermill-error-cell"
    for cell in notebook.get("cells", []):
        if "papermill-error-cell" in "".join(cell.get("source") or ""):
            return "papermill-error-cell"
    return ""


def row(entry: dict[str, Any], anchor: str = "") -> dict[str, Any]:
    """One run, as a line of a records table."""
    outcome = entry.get("outcome") or "unknown"
    html = entry.get("html") or ""
    return {
        "id": entry.get("id", ""),
        "runbook": ledger.kind(entry),
        "env": entry.get("env", ""),
        "parameters": key_parameters(entry),
        "outcome": outcome,
        "start": entry.get("start", ""),
        "start_shown": _when(entry.get("start")),
        "duration_s": entry.get("duration_s") if isinstance(entry.get("duration_s"), int | float) else None,
        "duration": _duration(entry.get("duration_s")),
        "operator": entry.get("operator", ""),
        "git_sha": short_sha(entry.get("git_sha")),
        "version": version_of(entry),
        "error": entry.get("error") or "",
        "href": html,
        "failing_href": f"{html}#{urllib.parse.quote(anchor, safe='=-_')}" if html and anchor else "",
    }


def running_row(holder: dict[str, Any], now: float) -> dict[str, Any]:
    """An operation that holds its environment's lock now (a release, a migration): it has no
    record yet, so it links nowhere."""
    reason = str(holder.get("reason", ""))
    what, _, rest = reason.partition(" ")
    started = datetime.fromtimestamp(float(holder.get("acquired_at", now)), UTC)
    return {
        "id": "", "runbook": what or "operation", "env": holder.get("env", ""), "parameters": rest,
        "outcome": "running", "start": started.isoformat(timespec="seconds"),
        "start_shown": started.strftime("%Y-%m-%d %H:%M"),
        "duration_s": round(now - started.timestamp(), 1), "duration": _duration(now - started.timestamp()) + " so far",
        "operator": holder.get("owner", ""), "git_sha": "", "version": "", "error": "", "href": "",
        "failing_href": "",
    }


def facets(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The values each filter offers: environments, runbooks and outcomes that occur."""
    present = {r["outcome"] for r in rows}
    return {
        "env": sorted({r["env"] for r in rows}),
        "runbook": sorted({r["runbook"] for r in rows}),
        "outcome": [o for o in OUTCOMES if o in present] + sorted(present - set(OUTCOMES)),
    }


def runbook_page(name: str, rows: list[dict[str, Any]], entries: list[dict[str, Any]]) -> dict[str, Any]:
    """A runbook's runs (newest first), the trend of their duration and of each numeric key
    figure its runs report (a scaling check's throughput, a snapshot's size: whatever it records)."""
    recent = entries[-TREND_RUNS:]
    counts: dict[str, int] = {}
    for e in recent:
        for k, v in (e.get("figures") or {}).items():
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "duration_s":
                counts[k] = counts.get(k, 0) + 1
    figure_names = sorted((k for k, c in counts.items() if c >= 2), key=lambda k: (-counts[k], k))
    figure_names = figure_names[:MAX_FIGURE_CHARTS]

    def series(get) -> list[list[Any]]:
        return [[_when(e.get("start")), get(e), e.get("outcome", ""), e.get("id", "")] for e in recent]

    outcomes = {o: sum(1 for r in rows if r["outcome"] == o) for o in OUTCOMES}
    last = entries[-1] if entries else {}
    return {
        "name": name,
        "rows": list(reversed(rows)),
        "facets": facets(rows),
        "outcomes": {k: v for k, v in outcomes.items() if v},
        "runs": len(entries),
        "shown_runs": len(recent),
        "durations": series(lambda e: e.get("duration_s") if isinstance(e.get("duration_s"), int | float) else None),
        "figures": {k: series(lambda e, k=k: _num((e.get("figures") or {}).get(k))) for k in figure_names},
        "last": {"id": last.get("id", ""), "outcome": last.get("outcome", ""), "start": _when(last.get("start")),
                 "figures": {k: _short(v) for k, v in sorted((last.get("figures") or {}).items())}},
    }


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def trend_chart(points: list[list[Any]], title: str, unit: str):
    """The chart of a runbook page's series ([start, value, outcome, id] per run)."""
    return chart([Point(label, value, outcome, f"{rid}: {number(value)} {unit} ({outcome})")
                  for label, value, outcome, rid in points], title=title, unit=unit)


def releases_page(entries: list[dict[str, Any]], rows: list[dict[str, Any]], today: str) -> dict[str, Any]:
    """The delivery figures per environment over the last 7 and 30 days (computed by
    opsbook.engines.records.delivery, as notebooks/release_history.ipynb computes them), with
    a chart per figure and window, and the releases and rollbacks of the last 30 days."""
    df = delivery.releases(entries)
    now = datetime.fromisoformat(today).replace(tzinfo=UTC)
    envs = []
    for env in sorted(df["env"].unique()) if len(df) else []:
        windows = {n: delivery.window(df, n, now).get(env, {}) for n in delivery.WINDOW_DAYS}
        charts = {n: delivery.daily(df, env, n, now) for n in delivery.WINDOW_DAYS}
        envs.append({"env": str(env), "windows": windows, "daily": charts})
    since = (now - timedelta(days=max(delivery.WINDOW_DAYS) - 1)).date().isoformat()
    recent = [r for r in rows if r["start"][:10] >= since]
    return {"today": today, "envs": envs, "rows": list(reversed(recent)), "facets": facets(recent),
            "figures": [list(f) for f in delivery.FIGURES], "days": list(delivery.WINDOW_DAYS)}


def delivery_chart(daily: list[dict[str, Any]], figure: str, title: str, unit: str):
    return chart([Point(d["day"][5:], _num(d[figure])) for d in daily], title=title, unit=unit, style="bars")
