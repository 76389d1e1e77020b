"""The records site in a real browser: Debian's headless Chromium driven by Playwright, the site
served from 127.0.0.1. A real failed runbook run (papermill, through opsbook's runner) gives the
record whose failing cell the index must link to. A screenshot is kept under tests/artifacts/.

Chromium reaches nothing but loopback: every other request is aborted before it leaves, and its
resolver maps every other name to nowhere.
"""

import shutil
import threading
import urllib.parse
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nbformat
import pytest

from opsbook.core.inventory import load
from opsbook.core.paths import ROOT
from opsbook.engines.records import runner
from opsbook.engines.records.runner import RunbookFailed
from opsbook.engines.records.store import LocalStore, new_record_id
from opsbook.operations.records_site import builder, server

pytestmark = pytest.mark.kernel

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
HOSTILE = "<script>alert('owned')</script>"


def _failing_runbook(directory: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    params = nbformat.v4.new_code_cell(
        'env: str = None  # environment; set by opsbook\nrecord_id: str = None  # set by opsbook\n'
        'parent_record_id: str = None  # set by opsbook\nrows: int = 3  # rows to check')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# Check\n" + "Filler so the failing cell is far down.\n\n" * 40),
                params,
                *[nbformat.v4.new_code_cell(f"print('step {i}')") for i in range(30)],
                nbformat.v4.new_code_cell("raise ValueError(f'{rows} rows missing')"),
                nbformat.v4.new_code_cell("print('never runs')")]
    nbformat.write(nb, directory / "check.ipynb")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A store with one real failed run and synthetic runs of every outcome, its site built, served on loopback."""
    tmp = tmp_path_factory.mktemp("site")
    store = LocalStore(tmp / "records")
    (tmp / "runbooks").mkdir()
    _failing_runbook(tmp / "runbooks")
    with pytest.raises(RunbookFailed) as info:
        runner.run("check", load("lab"), {"rows": 3}, store=store, secrets={}, runbooks_dir=tmp / "runbooks",
                   progress=False, log=lambda _m: None)
    failed = info.value.entry
    now = datetime.now(UTC).replace(microsecond=0)
    outcomes = ["succeeded", "failed", "refused", "interrupted"]
    for i in range(24):
        start = now - timedelta(hours=6 * i + 1)
        runbook = ("release", "migrate", "env_report")[i % 3]
        entry = {"id": new_record_id(runbook, start), "runbook": runbook, "env": ("lab", "prod")[i % 2],
                 "outcome": outcomes[i % 4] if i % 3 else "succeeded", "start": start.isoformat(),
                 "end": (start + timedelta(seconds=30 + i)).isoformat(), "duration_s": 30.0 + i,
                 "operator": "ops@ctl", "git_sha": "abcdef0123456789", "parameters": {"note": HOSTILE},
                 "figures": {"version": f"1.{i}.0", "commit_time": (start - timedelta(hours=2)).isoformat()},
                 "error": None, "parent_record_id": None}
        store.write_record(entry, b'{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}',
                           b"<html><body>record</body></html>")
    builder.build(store, log=lambda _m: None)
    httpd = server.make_server(store.root, 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"url": f"http://127.0.0.1:{httpd.server_address[1]}/site/", "failed": failed, "store": store}
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing; ./run installs Debian's chromium and chromium-driver")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 900})

        def loopback_only(route):
            host = urllib.parse.urlsplit(route.request.url).hostname
            if host == "127.0.0.1" or route.request.url.startswith(("data:", "file:")):
                route.continue_()
            else:
                route.abort()

        context.route("**/*", loopback_only)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser):
    page = browser.new_page()
    page.problems = []
    page.on("console", lambda m: page.problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: page.problems.append(f"page error: {e}"))
    page.on("dialog", lambda d: (page.problems.append(f"dialog: {d.message}"), d.dismiss()))
    yield page
    page.close()


def test_index_loads_cleanly_filters_by_outcome_and_sorts(site, page):
    page.goto(site["url"] + "index.html")
    rows = page.locator("table.records tbody tr")
    assert rows.count() == 25
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "records-site-index.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")

    page.select_option("select[data-filter=outcome]", "failed")
    visible = page.locator("table.records tbody tr:visible")
    outcomes = visible.evaluate_all("rows => rows.map(r => r.dataset.outcome)")
    assert outcomes
    assert set(outcomes) == {"failed"}
    expected = page.locator("table.records tbody tr[data-outcome=failed]").count()
    assert len(outcomes) == expected
    assert page.locator(".filters .shown").inner_text() == str(expected)
    assert page.url.endswith("#outcome=failed"), "the filter is in the address, to share"

    page.select_option("select[data-filter=outcome]", "")
    page.get_by_role("button", name="duration").click()
    durations = page.locator("table.records tbody tr td:nth-child(6)").evaluate_all(
        "cells => cells.map(c => Number(c.dataset.value))")
    assert durations == sorted(durations)
    page.get_by_role("button", name="duration").click()
    durations = page.locator("table.records tbody tr td:nth-child(6)").evaluate_all(
        "cells => cells.map(c => Number(c.dataset.value))")
    assert durations == sorted(durations, reverse=True)

    # Hostile text is text: shown as typed, never run.
    assert page.locator("td.params", has_text=HOSTILE).count() == 24
    assert page.evaluate("document.scripts.length") == 1
    assert page.problems == []


def test_a_failed_runs_link_lands_on_its_failing_cell(site, page):
    page.goto(site["url"] + "index.html")
    failed = site["failed"]
    row = page.locator("tr", has=page.locator(f"a.record:text-is('{failed['id']}')"))
    assert page.problems == []
    row.locator("a.failing").click()
    page.wait_for_load_state()
    assert page.url.split("#")[0].endswith(failed["html"])
    anchor = urllib.parse.unquote(page.url.split("#")[1])
    assert anchor.startswith("cell-id=")
    landed = page.evaluate("""id => {
        const el = document.getElementById(id);
        if (!el) return null;
        const box = el.getBoundingClientRect();
        return {text: el.textContent, top: box.top, height: window.innerHeight, scrolled: window.scrollY};
    }""", anchor)
    assert landed is not None, f"no element {anchor} in the record"
    assert "ValueError" in landed["text"]
    assert "3 rows missing" in landed["text"]
    assert landed["scrolled"] > 0, "the page scrolled down to the cell"
    assert 0 <= landed["top"] < landed["height"], "the failing cell is in view"


@pytest.mark.parametrize(("path", "marks"), [
    pytest.param("runbooks/release.html", "svg.chart circle.mark", id="runbook-duration-trend"),
    pytest.param("releases.html", "svg.chart rect.mark", id="delivery-figures"),
])
def test_charts_render(site, page, path, marks):
    page.goto(site["url"] + path)
    charts = page.locator("svg.chart")
    assert charts.count() >= 1
    box = charts.first.bounding_box()
    assert box is not None
    assert box["width"] > 100
    assert box["height"] > 50
    sizes = page.locator(marks).evaluate_all(
        "marks => marks.map(m => { const b = m.getBoundingClientRect(); return [b.width, b.height]; })")
    assert sizes
    assert all(w > 0 and h > 0 for w, h in sizes), "every mark is drawn"
    assert max(h for _, h in sizes) > 3
    assert page.problems == []
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"records-site-{path.replace('/', '-').replace('.html', '')}.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")


def test_the_site_opens_from_the_directory_too(site, page):
    """No server needed: the same pages work from file://."""
    index = Path(site["store"].location("site/index.html"))
    page.goto(index.as_uri())
    page.select_option("select[data-filter=outcome]", "refused")
    outcomes = page.locator("table.records tbody tr:visible").evaluate_all("rows => rows.map(r => r.dataset.outcome)")
    assert outcomes
    assert set(outcomes) == {"refused"}
    assert page.problems == []
    assert shutil.which("chromium") or Path(CHROMIUM).exists()
