"""The records site built from a real local store: escaping, incremental rebuilds, the failing-cell
link, delivery figures, the loopback-only server, and the guard runbooks call. No kernel, no browser."""

import html.parser
import json
import threading
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta

import nbformat
import pytest

from opsbook.core.errors import OpsbookError
from opsbook.engines.charts import Point, chart
from opsbook.engines.records import delivery
from opsbook.engines.records.guard import NotARecord, require_record
from opsbook.engines.records.store import LocalStore, new_record_id
from opsbook.operations.records_site import builder, pages, server

T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
HOSTILE_PARAM = "<script>alert('p')</script>"
HOSTILE_RUNBOOK = "re\"lease's"
HOSTILE_ERROR = '"><img src=x onerror=alert(1)>'


def _entry(runbook="migrate", outcome="succeeded", at_h=0.0, env="lab", duration=30.0, **kw):
    start = T0 + timedelta(hours=at_h)
    return {
        "id": new_record_id(runbook if runbook.isidentifier() else "odd", start),
        "runbook": runbook, "env": env, "outcome": outcome,
        "start": start.isoformat(), "end": (start + timedelta(seconds=duration)).isoformat(),
        "duration_s": duration, "operator": "ops@host", "git_sha": "0123456789abcdef0123-dirty",
        "parameters": kw.pop("parameters", {"phase": "expand"}), "figures": kw.pop("figures", {}),
        "error": kw.pop("error", None), "parent_record_id": None, **kw,
    }


def _notebook(fail: bool) -> bytes:
    nb = nbformat.v4.new_notebook()
    ok = nbformat.v4.new_code_cell("x = 1", outputs=[])
    bad = nbformat.v4.new_code_cell("raise ValueError('boom')", outputs=[
        nbformat.v4.new_output("error", ename="ValueError", evalue="boom", traceback=[])] if fail else [])
    nb.cells = [ok, bad]
    return nbformat.writes(nb).encode()


def _write(store, entry, fail=None):
    fail = entry["outcome"] == "failed" if fail is None else fail
    return store.write_record(entry, _notebook(fail), b"<html><body>record</body></html>")


def _quiet(_msg):
    pass


@pytest.fixture
def store(tmp_path):
    s = LocalStore(tmp_path / "records")
    s.check()
    return s


class _Tags(html.parser.HTMLParser):
    """Every start tag with its attributes, as a browser's parser would see them."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _tags(page: str) -> list[tuple[str, dict]]:
    p = _Tags()
    p.feed(page)
    return p.tags


# -- what the pages show -----------------------------------------------------------------------
def test_hostile_text_is_shown_escaped_never_as_markup(store):
    _write(store, _entry(parameters={"note": HOSTILE_PARAM}))
    _write(store, _entry(runbook=HOSTILE_RUNBOOK, outcome="failed", at_h=1, error=HOSTILE_ERROR,
                         operator="<b>mallory</b>", figures={"version": "1.0\"<x>"}))
    built = builder.build(store, log=_quiet)
    site = store.root / "site"
    index = (site / "index.html").read_text()
    runbook_pages = sorted((site / "runbooks").iterdir())
    assert len(runbook_pages) == 2
    for path in [site / "index.html", *runbook_pages]:
        page = path.read_text()
        tags = _tags(page)
        scripts = [a for t, a in tags if t == "script"]
        assert scripts == [{"src": scripts[0]["src"], "defer": None}], f"{path.name}: only the site's own script"
        assert scripts[0]["src"].endswith("site.js")
        assert not [t for t, a in tags if t == "img"], f"{path.name}: the error text made an element"
        assert not [a for t, a in tags for k in a if k.startswith("on")], f"{path.name}: an event handler attribute"
        assert "<b>mallory</b>" not in page
    assert "&lt;script&gt;alert(&#39;p&#39;)&lt;/script&gt;" in index
    assert "re&#34;lease&#39;s" in index
    assert "&lt;b&gt;mallory&lt;/b&gt;" in index
    # The runbook's name reaches a path too: only a safe form of it does.
    assert all(p.name.replace(".html", "").replace("-", "").replace("_", "").isalnum() for p in runbook_pages)
    rows = [a for t, a in _tags(index) if t == "tr" and "data-runbook" in a]
    assert {r["data-runbook"] for r in rows} == {"migrate", HOSTILE_RUNBOOK}, "attribute values read back intact"
    assert built.records == 2


def test_index_has_one_row_per_run_with_its_columns_and_outcome_colour(store):
    ok = _write(store, _entry(figures={"version": "1.4.0"}, parameters={"phase": "contract", "dry_run": False,
                                                                         "settings": {}}))
    _write(store, _entry(runbook="release", at_h=0.5, parameters={"release_data": "/tmp/opsbook-x/release.json"},
                         figures={"kind": "rollback", "version": "1.3.0", "previous_versions": ["1.4.0"],
                                  "hosts": 3, "batches": 3}))
    for i, outcome in enumerate(("failed", "refused", "interrupted")):
        _write(store, _entry(outcome=outcome, at_h=i + 1))
    running = {"env": "lab", "owner": "ann@ctl", "pid": 1, "reason": "release 1.5.0 (record x)",
               "acquired_at": (datetime.now(UTC) - timedelta(seconds=75)).timestamp()}
    builder.build(store, running=[running], log=_quiet)
    index = (store.root / "site" / "index.html").read_text()
    tags = _tags(index)
    rows = [a for t, a in tags if t == "tr" and "data-outcome" in a]
    assert [r["data-outcome"] for r in rows] == ["running", "interrupted", "refused", "failed", "succeeded",
                                                 "succeeded"]
    assert [r["data-runbook"] for r in rows][-2:] == ["rollback", "migrate"], "a rollback is named so"
    assert "batches=3 from=1.4.0 hosts=3" in index, "a release's plan stands for its parameters"
    assert "release_data" not in index
    outcomes = [a["class"] for t, a in tags if t == "span" and "outcome" in a.get("class", "")]
    assert {"outcome succeeded", "outcome failed", "outcome refused", "outcome interrupted",
            "outcome running"} <= set(outcomes)
    css = (store.root / "site" / "site.css").read_text()
    colours = {o: css.split(f".outcome.{o} {{")[1].split("}")[0] for o in pages.OUTCOMES}
    assert len(set(colours.values())) == len(pages.OUTCOMES), "each outcome has its own colour"
    assert "phase=contract" in index
    assert "dry_run=false" in index
    assert "settings=" not in index, "empty parameters are left out"
    assert "1.4.0" in index
    assert "0123456789-dirty" in index
    assert "2025-03-03 09:00" in index
    assert "ops@host" in index
    assert f'href="../{ok["html"]}"' in index
    assert "ann@ctl" in index
    assert "release" in index


def test_a_failed_run_links_to_its_failing_cell(store):
    bad = _write(store, _entry(outcome="failed", error="cell 2: ValueError: boom"))
    nb = nbformat.reads(store.get(bad["notebook"]).decode(), as_version=4)
    builder.build(store, log=_quiet)
    index = (store.root / "site" / "index.html").read_text()
    links = [a["href"] for t, a in _tags(index) if t == "a" and a.get("class") == "failing"]
    assert links == [f"../{bad['html']}#cell-id={nb.cells[1].id}"]
    # nbconvert renders that anchor on the cell itself.
    from opsbook.engines.records.runner import render_html

    assert f'id="cell-id={nb.cells[1].id}"' in render_html(nb).decode()


def test_failing_cell_without_cell_ids_falls_back_to_papermills_marker():
    nb = {"cells": [{"cell_type": "code", "source": "1/0", "outputs": [{"output_type": "error"}]}]}
    assert pages.failing_cell(nb) == "papermill-error-cell"
    assert pages.failing_cell({"cells": [{"cell_type": "code", "outputs": []}]}) == ""


# -- incremental -------------------------------------------------------------------------------
def test_adding_one_record_renders_only_the_pages_it_changes(store):
    for i in range(60):
        _write(store, _entry(runbook=("migrate", "env_report", "release")[i % 3], at_h=i,
                             figures={"commit_time": (T0 + timedelta(hours=i - 2)).isoformat()}))
    first = builder.build(store, today="2025-03-06", log=_quiet)
    assert sorted(first.rendered) == ["index.html", "releases.html", "runbooks/env_report.html",
                                      "runbooks/migrate.html", "runbooks/release.html", "site.css", "site.js"]
    again = builder.build(store, today="2025-03-06", log=_quiet)
    assert again.rendered == []
    assert again.unchanged == 7

    _write(store, _entry(runbook="migrate", at_h=100))
    one = builder.build(store, today="2025-03-06", log=_quiet)
    assert sorted(one.rendered) == ["index.html", "runbooks/migrate.html"]
    _write(store, _entry(runbook="release", outcome="failed", at_h=101))
    release = builder.build(store, today="2025-03-06", log=_quiet)
    assert sorted(release.rendered) == ["index.html", "releases.html", "runbooks/release.html"]
    _write(store, _entry(runbook="snapshot", at_h=102, figures={"size_bytes": 10}))
    new_runbook = builder.build(store, today="2025-03-06", log=_quiet)
    assert "runbooks/snapshot.html" in new_runbook.rendered, "a new runbook gets its page when its first record arrives"
    assert "runbooks/migrate.html" in new_runbook.rendered, "every page's menu names the new runbook"
    next_day = builder.build(store, today="2025-03-07", log=_quiet)
    assert next_day.rendered == ["releases.html"], "a new day moves the windows"

    (store.root / "site" / "runbooks" / "env_report.html").unlink()
    assert builder.build(store, today="2025-03-07", log=_quiet).rendered == ["runbooks/env_report.html"]


def test_the_manifest_keeps_ledger_entries_so_a_rebuild_reads_only_new_ones(store, monkeypatch):
    for i in range(5):
        _write(store, _entry(at_h=i))
    builder.build(store, log=_quiet)
    read = []
    real_get = LocalStore.get

    def counting_get(self, key):
        read.append(key)
        return real_get(self, key)

    monkeypatch.setattr(LocalStore, "get", counting_get)
    added = _write(store, _entry(at_h=10))
    builder.build(store, log=_quiet)
    assert [k for k in read if k.startswith("ledger/")] == [f"ledger/{added['id']}.json"]


def test_a_broken_manifest_means_a_full_build_not_a_failure(store):
    _write(store, _entry())
    builder.build(store, log=_quiet)
    store.put_replaceable(builder.MANIFEST, b"{not json", "application/json")
    assert len(builder.build(store, log=_quiet).rendered) == 5
    assert json.loads(store.get(builder.MANIFEST))["format"] == builder.FORMAT


# -- per runbook and release history -----------------------------------------------------------
def test_runbook_page_draws_its_duration_and_numeric_figures(store):
    for i in range(4):
        _write(store, _entry(runbook="scale_check", at_h=i, duration=10.0 + i,
                             outcome="failed" if i == 2 else "succeeded",
                             figures={"rps": 100.0 * (i + 1), "verdict": "pass", "hosts": i + 1, "ok": True}))
    builder.build(store, log=_quiet)
    page = (store.root / "site" / "runbooks" / "scale_check.html").read_text()
    assert page.count('<svg class="chart"') == 3, "duration, rps, hosts (not the text or boolean figures)"
    dots = [a for t, a in _tags(page) if t == "circle"]
    assert len(dots) == 12
    assert [d["class"] for d in dots[:4]] == ["mark succeeded", "mark succeeded", "mark failed", "mark succeeded"]
    assert "verdict" in page
    assert "pass" in page


def test_release_page_shows_delivery_figures_from_the_shared_implementation(store):
    commit = lambda h: (T0 + timedelta(hours=h)).isoformat()  # noqa: E731
    _write(store, _entry("release", "succeeded", 0, env="prod", figures={"commit_time": commit(-4)}))
    _write(store, _entry("release", "failed", 24, env="prod", figures={"commit_time": commit(22)}))
    _write(store, _entry("release", "succeeded", 26, env="prod", figures={"commit_time": commit(22)}))
    _write(store, _entry("release", "succeeded", 24 * 20, env="prod", figures={"commit_time": commit(24 * 20 - 1)}))
    _write(store, _entry("migrate", "succeeded", 2, env="prod"))
    today = (T0 + timedelta(days=21)).date()
    df = delivery.releases(store.ledger())
    seven = delivery.window(df, 7, datetime(today.year, today.month, today.day, tzinfo=UTC))["prod"]
    thirty = delivery.window(df, 30, datetime(today.year, today.month, today.day, tzinfo=UTC))["prod"]
    assert seven["deployments"] == 1
    assert seven["change_failure_rate"] == 0.0
    assert thirty["deployments"] == 3
    assert thirty["releases"] == 4
    assert thirty["change_failure_rate"] == 0.25
    assert thirty["time_to_restore_h"] == 2.0
    assert 1.0 < thirty["lead_time_h"] < 4.6
    daily = delivery.daily(df, "prod", 30, datetime(today.year, today.month, today.day, tzinfo=UTC))
    assert len(daily) == 30
    assert sum(d["deployments"] for d in daily) == 3

    builder.build(store, today=today.isoformat(), log=_quiet)
    page = (store.root / "site" / "releases.html").read_text()
    assert "25% of 4" in page
    assert "0% of 1" in page
    assert page.count('<svg class="chart"') == 8, "4 figures x (7 and 30 days)"
    assert len([a for t, a in _tags(page) if t == "rect"]) >= 3
    assert "migrate" not in page.split("Releases and rollbacks")[1]


def test_release_page_without_releases_says_so(store):
    _write(store, _entry())
    builder.build(store, log=_quiet)
    assert "No release or rollback is recorded" in (store.root / "site" / "releases.html").read_text()


def test_chart_escapes_its_text_and_says_when_it_has_nothing():
    svg = chart([Point("a<b", 1.0, "fail\"ed", "</svg><script>")], title="t<itle", unit="u&")
    assert "<script>" not in svg
    assert "&lt;/svg&gt;&lt;script&gt;" in svg
    assert 'class="mark failed"' in svg
    assert "nothing in this span" in chart([Point("d", None)], title="x")


# -- serving -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bind", ["0.0.0.0", "::", "192.168.1.10", "localhost"])
def test_serve_refuses_any_address_but_loopback(bind, tmp_path):
    with pytest.raises(OpsbookError, match=r"binds 127\.0\.0\.1 only.*nothing was started"):
        server.make_server(tmp_path, 0, bind)


def test_serve_answers_on_loopback_without_listing_directories(store):
    _write(store, _entry())
    builder.build(store, log=_quiet)
    httpd = server.make_server(store.root, 0)
    assert httpd.server_address[0] == "127.0.0.1"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        with urllib.request.urlopen(f"{base}/site/index.html", timeout=5) as r:
            assert r.status == 200
            assert b"1 runs" in r.read()
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{base}/ledger/", timeout=5)
        assert info.value.code == 403
    finally:
        httpd.shutdown()
        httpd.server_close()


# -- runbooks outside opsbook ------------------------------------------------------------------
def test_a_runbook_outside_opsbook_refuses_to_change_anything():
    require_record("migrate", "20250101T000000Z-migrate-abcdef", "lab")  # opsbook's own run passes
    with pytest.raises(NotARecord, match=r"nothing was changed\. Run it through `invoke lock\.break"):
        require_record("lock_break", None, "lab", command="invoke lock.break --env ENV --reason WHY")
    with pytest.raises(NotARecord, match=r"env not set"):
        require_record("env_report", None, None, changes=False)
    with pytest.raises(NotARecord, match=r"release_data not set"):
        require_record("release", None, "lab", changes=False, required={"release_data": None})
    require_record("env_report", None, "lab", changes=False)  # a look that changes nothing


# -- every environment, and what runs now ------------------------------------------------------
def _inventory(root, name, store, lock):
    d = root / name
    (d / "group_vars" / "all").mkdir(parents=True)
    (d / "hosts.yml").write_text("all:\n  hosts: {}\n")
    (d / "group_vars" / "all" / "main.yml").write_text(
        f"opsbook_env_kind: lab\nopsbook_record_store: {store}\n"
        f"opsbook_lock_backend: file\nopsbook_lock_path: {lock}\n")
    from opsbook.core.inventory import Env

    return Env(name, d)


def test_site_of_several_environments_shows_what_runs_now_and_names_a_store_it_cannot_build(tmp_path):
    from opsbook.engines import lock
    from opsbook.operations import records_site

    shared = tmp_path / "shared-records"
    (tmp_path / "not-a-dir").write_text("x")
    alpha = _inventory(tmp_path / "inv", "alpha", shared, tmp_path / "alpha.lock")
    beta = _inventory(tmp_path / "inv", "beta", shared, tmp_path / "beta.lock")
    broken = _inventory(tmp_path / "inv", "gamma", tmp_path / "not-a-dir" / "records", tmp_path / "gamma.lock")
    store = LocalStore(shared)
    _write(store, _entry(env="alpha"))
    _write(store, _entry(env="beta", outcome="failed", at_h=1))
    held = lock.lock_for(beta).acquire("migrate contract")
    try:
        with pytest.raises(OpsbookError) as info:
            records_site.site([alpha, beta, broken], log=_quiet)
    finally:
        held.release()
    message = str(info.value)
    assert "gamma:" in message
    assert "cannot be created" in message
    assert f"Sites built: {store.url}." in message, "the stores that could be built were built"
    index = (shared / "site" / "index.html").read_text()
    rows = [a for t, a in _tags(index) if t == "tr" and "data-outcome" in a]
    assert [(r["data-env"], r["data-outcome"], r["data-runbook"]) for r in rows] == [
        ("beta", "running", "migrate"), ("beta", "failed", "migrate"), ("alpha", "succeeded", "migrate")]
    assert "contract" in index
    # Once the lock is free, nothing runs.
    assert [b.running for b in records_site.site([alpha, beta], log=_quiet)] == [0]
