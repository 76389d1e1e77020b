"""What the `invoke records` tasks print and render: a listing, one record, a static index page."""

from __future__ import annotations

import html
import json
from datetime import UTC, datetime
from typing import Any

from opsbook.core.inventory import Env
from opsbook.engines.records import ledger
from opsbook.engines.records.store import Store, store_for


def _duration(e: dict[str, Any]) -> str:
    d = e.get("duration_s")
    return f"{d:.1f}s" if isinstance(d, int | float) else "?"


def table(entries: list[dict[str, Any]]) -> str:
    """One line per record, oldest first: id, env, runbook, outcome, duration, operator."""
    if not entries:
        return "no records match."
    header = ("ID", "ENV", "RUNBOOK", "OUTCOME", "DURATION", "OPERATOR")
    rows = [header] + [
        (e["id"], e.get("env", ""), e.get("runbook", ""), e.get("outcome", ""), _duration(e),
         e.get("operator", ""))
        for e in entries
    ]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    lines = ("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows)
    return "\n".join(lines)


def show(store: Store, record_id: str) -> str:
    """A record's ledger entry and where its notebook and HTML are."""
    e = store.entry(record_id)
    lines = [json.dumps(e, indent=2, sort_keys=True), ""]
    lines.append(f"notebook: {store.location(e['notebook'])}")
    lines.append(f"html:     {store.location(e['html'])}")
    return "\n".join(lines)


def index_html(entries: list[dict[str, Any]], title: str) -> str:
    """A static page listing records (newest first) with outcome, duration and links.

    Links are relative to the store's root, where the page is written, so the page works from a
    local directory and from a bucket served as a website alike.
    """
    esc = html.escape
    rows = []
    for e in reversed(entries):
        shown = (e.get("figures") or {}).items()
        figures = ", ".join(f"{esc(str(k))}={esc(json.dumps(v))}" for k, v in shown)
        parent = e.get("parent_record_id")
        rows.append(
            f'<tr class="{esc(e.get("outcome", ""))}">'
            f"<td>{esc(e.get('start', ''))}</td>"
            f'<td><a href="{esc(e["html"])}">{esc(e["id"])}</a></td>'
            f"<td>{esc(e.get('env', ''))}</td><td>{esc(e.get('runbook', ''))}</td>"
            f"<td>{esc(e.get('outcome', ''))}</td><td>{esc(_duration(e))}</td>"
            f"<td>{esc(e.get('operator', ''))}</td>"
            f"<td>{esc(e.get('error') or '')}</td><td>{figures}</td>"
            f"<td>{esc(parent) if parent else ''}</td>"
            f'<td><a href="{esc(e["notebook"])}">ipynb</a></td></tr>'
        )
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }}
tr.failed td {{ background: #fde8e8; }}
tr.succeeded td:nth-child(5) {{ color: #17692f; }}
</style></head>
<body><h1>{esc(title)}</h1>
<p>{len(entries)} records, newest first. Generated {esc(generated)}; records themselves are never edited.</p>
<table><thead><tr><th>start</th><th>record</th><th>env</th><th>runbook</th><th>outcome</th><th>duration</th>
<th>operator</th><th>error</th><th>key figures</th><th>parent</th><th>notebook</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table></body></html>
"""


def write_index(store: Store, entries: list[dict[str, Any]], title: str) -> str:
    """Render the index into the store's root (index.html, the one replaceable object); its location."""
    store.put_replaceable("index.html", index_html(entries, title).encode(), "text/html; charset=utf-8")
    return store.location("index.html")


# -- what the Invoke tasks call ----------------------------------------------------------------
def list_cli(env: Env, runbook: str | None = None, outcome: str | None = None, since: str | None = None) -> str:
    return table(ledger.select(store_for(env).ledger(), env=env.name, runbook=runbook, outcome=outcome, since=since))


def show_cli(env: Env, record_id: str) -> str:
    return show(store_for(env), record_id)


def index_cli(env: Env) -> str:
    store = store_for(env)
    return write_index(store, store.ledger(), f"{env.name} records")
