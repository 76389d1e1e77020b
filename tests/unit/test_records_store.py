"""Record store, ledger filters, redaction and parameter checks: no kernel, no network."""

import json
import os
import stat
from datetime import UTC, datetime

import nbformat
import pytest

from opsbook.core.errors import OpsbookError
from opsbook.core.redaction import Redactor
from opsbook.engines.records import runner as runbooks
from opsbook.engines.records import views as record_views
from opsbook.engines.records.figures import FIGURES_MIMETYPE, figures_in, record_figures
from opsbook.engines.records.ledger import parse_since, select
from opsbook.engines.records.store import (
    LocalStore,
    RecordExists,
    StoreUnreachable,
    UnknownRecord,
    new_record_id,
    open_store,
)


def _entry(runbook="migrate", env="lab", outcome="succeeded", start="2025-01-02T10:00:00+00:00", **kw):
    rid = new_record_id(runbook, datetime.fromisoformat(start))
    return {
        "id": rid,
        "runbook": runbook,
        "env": env,
        "outcome": outcome,
        "start": start,
        "end": start,
        "duration_s": 1.5,
        "operator": "ops@host",
        "figures": {},
        **kw,
    }


# -- local store -------------------------------------------------------------------------------
def test_local_record_is_written_once_and_read_only(tmp_path):
    store = LocalStore(tmp_path / "records" / "lab")
    store.check()
    stored = store.write_record(_entry(), b'{"nb": 1}', b"<html>1</html>")
    for key in (stored["notebook"], stored["html"], f"ledger/{stored['id']}.json"):
        mode = os.stat(store.location(key)).st_mode
        assert not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH), key
        assert not mode & stat.S_IROTH, f"{key} is world-readable"
    with pytest.raises(RecordExists, match="never rewritten"):
        store.put_once(stored["notebook"], b"changed", "application/x-ipynb+json")
    assert store.get(stored["notebook"]) == b'{"nb": 1}'
    assert store.entry(stored["id"]) == stored
    assert not list((tmp_path / "records").rglob(".*")), "temporary files are cleaned up"


def test_ledger_is_oldest_first_and_filters_combine(tmp_path):
    store = LocalStore(tmp_path)
    a = store.write_record(_entry(start="2025-01-03T00:00:00+00:00"), b"{}", b"")
    b = store.write_record(
        _entry(runbook="release", outcome="failed", start="2025-01-01T00:00:00+00:00"), b"{}", b""
    )
    c = store.write_record(
        _entry(runbook="release", env="staging", start="2025-01-05T00:00:00+00:00"), b"{}", b""
    )
    ids = lambda es: [e["id"] for e in es]  # noqa: E731
    assert ids(store.ledger()) == [b["id"], a["id"], c["id"]]
    assert ids(select(store.ledger(), runbook="release")) == [b["id"], c["id"]]
    assert ids(select(store.ledger(), runbook="release", env="lab", outcome="failed")) == [b["id"]]
    assert ids(select(store.ledger(), since="2025-01-02")) == [a["id"], c["id"]]
    with pytest.raises(OpsbookError, match="outcomes are succeeded, failed"):
        select(store.ledger(), outcome="broken")


def test_since_accepts_ages_and_dates_and_names_the_forms():
    now = datetime(2025, 1, 10, tzinfo=UTC)
    assert parse_since("2d", now) == datetime(2025, 1, 8, tzinfo=UTC)
    assert parse_since("12h", now) == datetime(2025, 1, 9, 12, tzinfo=UTC)
    assert parse_since("2025-01-01T06:00", now) == datetime(2025, 1, 1, 6, tzinfo=UTC)
    for bad in ("last tuesday", "99999999w", "7"):   # a typo's age (past any date) and a bare number too
        with pytest.raises(OpsbookError, match=r"30m, 12h, 7d or 2w, at most 100 years\) or an ISO date"):
            parse_since(bad, now)


def test_unwritable_local_store_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StoreUnreachable, match="Nothing was run"):
        LocalStore(tmp_path / "afile" / "lab").check()


def test_record_ids_are_checked_before_any_path_is_built(tmp_path):
    store = LocalStore(tmp_path)
    with pytest.raises(UnknownRecord, match="is not a record id"):
        store.entry("../../etc/passwd")
    with pytest.raises(UnknownRecord, match="invoke records"):
        store.entry(new_record_id("migrate"))


def test_store_url_forms(tmp_path):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    with pytest.raises(OpsbookError, match="only a directory or s3://"):
        open_store("gs://bucket/x")


def test_views_list_show_and_index(tmp_path):
    store = LocalStore(tmp_path)
    ok = store.write_record(_entry(figures={"rows": 5}), b"{}", b"")
    bad = store.write_record(_entry(outcome="failed", error="cell 2: ValueError: <boom>"), b"{}", b"")
    listing = record_views.table(store.ledger())
    assert ok["id"] in listing
    assert "failed" in listing
    shown = record_views.show(store, bad["id"])
    assert store.location(bad["html"]) in shown
    assert '"outcome": "failed"' in shown
    where = record_views.write_index(store, store.ledger(), "lab records")
    page = (tmp_path / "index.html").read_text()
    assert where == str(tmp_path / "index.html")
    assert f'href="{ok["html"]}"' in page
    assert f'href="{bad["notebook"]}"' in page
    assert "&lt;boom&gt;" in page
    assert "<boom>" not in page
    assert (tmp_path / ok["html"]).parent.is_dir()


# -- redaction ---------------------------------------------------------------------------------
SECRET = "pa55\"w&rd<x>\\'é"


def test_redactor_replaces_every_serialized_form():
    r = Redactor({"vault_db": SECRET, "vault_empty": ""})
    doc = {"text": f"pw={SECRET}", "list": [SECRET], SECRET: 1}
    assert r.obj(doc) == {
        "text": "pw=[secret:vault_db]",
        "list": ["[secret:vault_db]"],
        "[secret:vault_db]": 1,
    }
    for blob in (
        json.dumps(doc).encode(),
        json.dumps(doc, ensure_ascii=False).encode(),
        __import__("html").escape(SECRET).encode(),
        repr(SECRET).encode(),
    ):
        assert r.leaks(blob) == ["vault_db"]
        assert r.leaks(r.bytes(blob)) == []


def test_longer_secret_containing_a_shorter_one_is_replaced_whole():
    r = Redactor({"vault_short": "abc123", "vault_long": "xxabc123yy"})
    assert r.text("xxabc123yy abc123") == "[secret:vault_long] [secret:vault_short]"


# -- parameters --------------------------------------------------------------------------------
DECLARED = [
    runbooks.Parameter("env", "str", '"lab"', "environment; set by opsbook"),
    runbooks.Parameter("version", "str", "None", "required: artifact version to release"),
    runbooks.Parameter("rows", "int", "1000", "rows per batch"),
    runbooks.Parameter("ratio", "float", "0.5", "share of hosts per batch"),
    runbooks.Parameter("dry_run", "bool", "False", "plan only"),
    runbooks.Parameter("hosts", "list", "[]", "hosts to act on"),
    runbooks.Parameter("note", "None", "''", "free text"),
]


@pytest.mark.parametrize(
    ("given", "message"),
    [
        pytest.param({"version": "1.0", "rowz": 5}, r"unknown parameter 'rowz'", id="unknown-name"),
        pytest.param({"rows": 5}, r"missing required parameter 'version'", id="missing-required"),
        pytest.param({"version": None}, r"missing required parameter 'version'", id="required-given-none"),
        pytest.param({"version": "1", "rows": "5"}, r"'rows' must be int, got str '5'", id="wrong-type"),
        pytest.param({"version": "1", "rows": True}, r"'rows' must be int, got bool", id="bool-is-not-int"),
        pytest.param({"version": "1", "env": "prod"}, r"'env' is set by opsbook", id="injected-name"),
    ],
)
def test_bad_parameters_are_refused_with_the_signature(given, message):
    with pytest.raises(runbooks.RunbookError, match=message) as info:
        runbooks.check_parameters("release", DECLARED, given)
    text = str(info.value)
    assert "Nothing was run" in text
    assert "version: str = None  # required: artifact version to release" in text
    assert "rows: int = 1000  # rows per batch" in text
    assert "env:" not in text.split("takes:")[1], "injected parameters are not the operator's to give"


def test_good_parameters_pass_and_ints_are_floats():
    given = {"version": "1.2", "ratio": 1, "dry_run": True, "hosts": ["app1"], "note": {"any": "thing"}}
    assert runbooks.check_parameters("release", DECLARED, given) == given


def test_cli_parameters_are_converted_by_declared_type():
    got = runbooks.parse_cli_parameters(
        "release", DECLARED, ["version=1.10", "rows=5", "ratio=0.25", "dry_run=yes", "hosts=[app1, app2]"]
    )
    assert got == {"version": "1.10", "rows": 5, "ratio": 0.25, "dry_run": True, "hosts": ["app1", "app2"]}
    with pytest.raises(runbooks.RunbookError, match=r"rows='many' is not a valid int"):
        runbooks.parse_cli_parameters("release", DECLARED, ["rows=many"])
    with pytest.raises(runbooks.RunbookError, match="expected NAME=VALUE"):
        runbooks.parse_cli_parameters("release", DECLARED, ["rows"])


@pytest.mark.parametrize(("name", "task"), [("release", "invoke release"), ("snapshot", "invoke snapshot"),
                                             ("restore_drill", "invoke snapshot.drill"),
                                             ("staging_refresh", "invoke staging.refresh"),
                                             ("provision", "invoke provision")])
def test_a_runbook_only_its_task_writes_is_refused_by_hand_before_any_record(name, task, tmp_path):
    """Run by hand with any file as its data, `invoke runbook release` stored a failed release record in the
    environment's ledger (seen on the lab); the real runbooks and the real runner, with a store of its own."""
    from opsbook.core.inventory import Env

    class _Lab(Env):   # the lab's inventory, with a record store in tmp_path: nothing may be written there
        def var(self, var_name, default=...):
            store = f"file://{tmp_path}/records"
            return store if var_name == "opsbook_record_store" else super().var(var_name, default)

    data = next(p.name for p in runbooks.parameters(name) if p.name.endswith("_data"))
    with pytest.raises(runbooks.RunbookError) as refused:
        runbooks.run_cli(name, _Lab("lab"), [f"{data}=/etc/passwd"])
    assert str(refused.value) == (f"runbook {name} is the record `{task}` writes of what it did (its "
                                  f"{data} is that task's own); run `{task}` instead "
                                  f"(`invoke --help {task.split()[1]}`). Nothing was run.")
    assert not (tmp_path / "records").exists()


def test_unknown_runbook_names_the_ones_that_exist(tmp_path):
    nbformat.write(nbformat.v4.new_notebook(), tmp_path / "migrate.ipynb")
    nbformat.write(nbformat.v4.new_notebook(), tmp_path / "snapshot.ipynb")
    with pytest.raises(
        runbooks.RunbookError, match=r"no runbook 'migrat' .* migrate, snapshot\. Nothing was run"
    ):
        runbooks.path_of("migrat", tmp_path)
    with pytest.raises(runbooks.RunbookError, match="no runbook"):
        runbooks.path_of("../migrate", tmp_path)


# -- figures -----------------------------------------------------------------------------------
def test_figures_are_picked_from_the_custom_mimetype_later_values_winning():
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            outputs=[
                nbformat.v4.new_output(
                    "display_data", data={FIGURES_MIMETYPE: {"rows": 1, "host": "app1"}, "text/plain": "x"}
                )
            ]
        ),
        nbformat.v4.new_code_cell(
            outputs=[
                nbformat.v4.new_output(
                    "display_data", data={"application/json": {"rows": 99}, "text/plain": "not figures"}
                )
            ]
        ),
        nbformat.v4.new_code_cell(
            outputs=[
                nbformat.v4.new_output(
                    "display_data", data={FIGURES_MIMETYPE: {"rows": 2}, "text/plain": "x"}
                )
            ]
        ),
    ]
    assert figures_in(nb) == {"rows": 2, "host": "app1"}


def test_report_refuses_values_that_are_not_json():

    with pytest.raises(TypeError, match=r"record_figures\(when=\.\.\.\).*not a JSON value"):
        record_figures(when=datetime.now(UTC))
    with pytest.raises(TypeError, match="not a JSON value"):
        record_figures(x=float("nan"))
    with pytest.raises(ValueError, match="small summary"):
        record_figures(big="x" * 20_000)
