"""Build the records site into a record store, rendering only the pages whose inputs changed.

The site lives in the store beside the records, under ``site/``, so its links to records are
relative (``../records/<id>/record.html``) and work from a directory (``file://``), from
``invoke records.serve`` and from a bucket alike::

    site/index.html              every run, newest first; filters and sorting in site/site.js
    site/runbooks/<name>.html    one page per runbook that has records: duration trend, key figures
    site/releases.html           delivery figures over 7 and 30 days (opsbook.engines.records.delivery)
    site/site.css, site/site.js
    site/manifest.json           what each page was made from (a hash per page), and the ledger as read

Incremental: ledger entries and the failing cell of a failed record are written once, so the
manifest keeps them and the next build reads only new ledger entries. Each page's inputs are
hashed (with the templates); a page whose hash is the manifest's, and that exists, is not
rendered again. Adding one record renders the index, its runbook's page and, for a release or
rollback, the release history; nothing else. The manifest is written last: a build that stops
half-way is redone by the next one.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opsbook.core.errors import OpsbookError
from opsbook.engines.records import ledger
from opsbook.engines.records.store import LEDGER, Store
from opsbook.operations.records_site import pages

SITE = "site"
MANIFEST = f"{SITE}/manifest.json"
FORMAT = 1  # what the manifest holds; another value and the site is built anew
HERE = Path(__file__).parent
TEMPLATES, STATIC = HERE / "templates", HERE / "static"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".js": "text/javascript; charset=utf-8", ".json": "application/json"}


@dataclass
class Built:
    """What one build did."""

    store: str
    index: str                      # where index.html is (a path or an s3:// URL)
    records: int
    running: int
    rendered: list[str] = field(default_factory=list)
    unchanged: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        what = ", ".join(self.rendered) if len(self.rendered) <= 6 else f"{len(self.rendered)} pages"
        return (f"site of {self.store}: {self.records} records, {self.running} running; rendered {what or 'nothing'}, "
                f"{self.unchanged} unchanged, in {self.seconds.get('total', 0):.2f} s\n  open {self.index}")


def _templates():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.globals.update(trend_chart=pages.trend_chart, delivery_chart=pages.delivery_chart, number=pages.number)
    return env


def _fingerprint() -> str:
    """Changes when anything that renders pages changes: templates, assets, this code."""
    h = hashlib.sha256(str(FORMAT).encode())
    for path in sorted([*TEMPLATES.iterdir(), *STATIC.iterdir(), HERE / "pages.py", HERE / "builder.py",
                        HERE.parents[1] / "engines" / "charts.py"]):
        if path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def slug(name: str) -> str:
    """A runbook's page name: its own name when that is safe in a path, else a safe form and a hash."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:60]
    return safe if safe == name and name else f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def _load_manifest(store: Store) -> dict[str, Any]:
    empty = {"format": FORMAT, "entries": {}, "anchors": {}, "pages": {}}
    try:
        manifest = json.loads(store.get(MANIFEST))
    except KeyError:
        return empty
    except ValueError:
        return empty  # unreadable: build everything again, and write a good one
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else empty


@dataclass(frozen=True)
class _Page:
    path: str                                  # under site/
    inputs: Any                                # everything the page is made from (hashed)
    template: str = ""                         # "" for a file copied from static/
    context: Callable[[], dict[str, Any]] = dict   # called only when the page is rendered


def _read_ledger(store: Store, cached: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every ledger entry by key: those the manifest holds (entries are never edited), and the new ones."""
    by_key: dict[str, dict[str, Any]] = {}
    for key in store.keys(f"{LEDGER}/"):
        if not key.endswith(".json"):
            continue
        entry = cached.get(key)
        if entry is None:
            try:
                entry = json.loads(store.get(key))
            except ValueError as e:
                raise OpsbookError(f"ledger entry {store.location(key)} is not JSON ({e}); the site was not "
                                   "changed. Records are never edited: find out what wrote it.") from None
        by_key[key] = entry
    return by_key


def _find_failing_cells(store: Store, entries: list[dict[str, Any]], anchors: dict[str, str]) -> None:
    """The failing cell of every record that did not succeed, read once from its notebook."""
    for e in entries:
        if e.get("outcome") != "succeeded" and e.get("id") not in anchors and e.get("notebook"):
            try:
                anchors[e["id"]] = pages.failing_cell(json.loads(store.get(e["notebook"])))
            except (KeyError, ValueError):
                anchors[e["id"]] = ""


def _plan(store: Store, entries: list[dict[str, Any]], anchors: dict[str, str],
          running_rows: list[dict[str, Any]], today: str) -> list[_Page]:
    """Every page of the site with what it is made from."""
    rows = [pages.row(e, anchors.get(e.get("id", ""), "")) for e in entries]
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        groups.setdefault(ledger.kind(e) or "unknown", []).append(i)
    nav = [{"name": name, "slug": slug(name)} for name in sorted(groups)]
    common = {"nav": nav, "store": store.url}
    all_rows = rows + running_rows

    def index() -> dict[str, Any]:
        counts = {o: n for o in pages.OUTCOMES if (n := sum(1 for r in all_rows if r["outcome"] == o))}
        return {"rows": list(reversed(all_rows)), "facets": pages.facets(all_rows), "counts": counts,
                "newest": rows[-1]["start_shown"] if rows else ""}

    todo = [_Page(name, name) for name in ("site.css", "site.js")]
    todo.append(_Page("index.html", [common, all_rows], "index.html.j2", index))
    for name, idx in groups.items():
        ge, gr = [entries[i] for i in idx], [rows[i] for i in idx]
        todo.append(_Page(f"runbooks/{slug(name)}.html", [common, name, ge, gr], "runbook.html.j2",
                          lambda n=name, ge=ge, gr=gr: {"page": pages.runbook_page(n, gr, ge)}))
    changes = [i for i, e in enumerate(entries) if ledger.kind(e) in (ledger.RELEASE, ledger.ROLLBACK)]
    ce, cr = [entries[i] for i in changes], [rows[i] for i in changes]
    todo.append(_Page("releases.html", [common, ce, cr, today], "releases.html.j2",
                      lambda: {"page": pages.releases_page(ce, cr, today)}))
    return [_Page(p.path, p.inputs, p.template, lambda p=p: {**common, **p.context()}) for p in todo]


def _render(templates, p: _Page) -> bytes:
    if not p.template:
        return (STATIC / p.path).read_bytes()
    up = "../" * p.path.count("/")
    return templates.get_template(p.template).render(site=up, root=up + "../", **p.context()).encode()


def build(store: Store, *, running: Iterable[dict[str, Any]] = (), today: str | None = None,
          log: Callable[[str], None] = print) -> Built:
    """Build (or bring up to date) the site of one store. `running`: lock holders (LockInfo dicts)
    of operations in progress, shown as running. `today` (ISO date, UTC; default today) ends the
    delivery figures' windows."""
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    manifest = _load_manifest(store)
    by_key = _read_ledger(store, manifest["entries"])
    entries = sorted(by_key.values(), key=lambda e: (e.get("start", ""), e.get("id", "")))
    anchors = manifest["anchors"]
    _find_failing_cells(store, entries, anchors)
    seconds["read ledger"] = time.perf_counter() - t0

    t = time.perf_counter()
    running_rows = [pages.running_row(h, time.time()) for h in running]
    todo = _plan(store, entries, anchors, running_rows, today or datetime.now(UTC).date().isoformat())
    fingerprint = _fingerprint()
    existing = set(store.keys(f"{SITE}/"))
    templates = _templates()
    built = Built(store=store.url, index=store.location(f"{SITE}/index.html"), records=len(entries),
                  running=len(running_rows))
    new_pages: dict[str, str] = {}
    for p in todo:
        digest = _hash(fingerprint, p.inputs)
        new_pages[p.path] = digest
        key = f"{SITE}/{p.path}"
        if manifest["pages"].get(p.path) == digest and key in existing:
            built.unchanged += 1
            continue
        t_page = time.perf_counter()
        store.put_replaceable(key, _render(templates, p), CONTENT_TYPES[Path(p.path).suffix])
        built.rendered.append(p.path)
        seconds[f"page {p.path}"] = time.perf_counter() - t_page
    seconds["pages"] = time.perf_counter() - t

    t = time.perf_counter()
    manifest = {"format": FORMAT, "entries": by_key, "anchors": anchors, "pages": new_pages}
    store.put_replaceable(MANIFEST, json.dumps(manifest, separators=(",", ":")).encode(), CONTENT_TYPES[".json"])
    seconds["write manifest"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    built.seconds = seconds
    log(built.summary())
    return built
