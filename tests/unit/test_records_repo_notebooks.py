"""Runbooks and notebooks in the repo: sources without outputs, python3 metadata, documented parameters."""

import subprocess
import sys
from pathlib import Path

import nbformat
import papermill
import pytest

from opsbook.core.paths import ROOT
from opsbook.engines.records.runner import INJECTED

NOTEBOOKS = sorted([*(ROOT / "runbooks").glob("*.ipynb"), *(ROOT / "notebooks").glob("*.ipynb")])


def problems(path: Path) -> list[str]:
    """What is wrong with a committed notebook source (empty when nothing)."""
    nb = nbformat.read(path, as_version=4)
    out = []
    if nb.metadata.get("kernelspec", {}).get("name") != "python3":
        out.append("kernelspec is not python3")
    if nb.metadata.get("language_info", {}).get("name") != "python":
        out.append("language_info.name is not python")
    if out:
        return out  # papermill cannot read parameters without a kernel name
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None):
            out.append(f"cell {i} has outputs (strip them: the executed copy is the record)")
    code = [c for c in nb.cells if c.cell_type == "code"]
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    if len(tagged) != 1 or not code or code[0] is not tagged[0]:
        out.append("the first code cell, and only it, must be tagged `parameters`")
        return out
    assignments = [
        line for line in tagged[0].source.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    declared = papermill.inspect_notebook(str(path))
    if len(declared) != len(assignments):
        out.append(
            f"papermill reads {len(declared)} of {len(assignments)} parameter lines "
            "(one `name: type = default  # comment` per line; no '=' in comments)"
        )
    for p in declared.values():
        if p["inferred_type_name"] == "None" or not p["help"]:
            out.append(f"parameter {p['name']} needs a type and a comment")
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_committed_notebook_is_a_clean_documented_source(path):
    assert problems(path) == []


@pytest.mark.parametrize("path", sorted((ROOT / "runbooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_runbook_declares_what_opsbook_injects_and_papermill_documents_it(path):
    declared = papermill.inspect_notebook(str(path))
    assert set(INJECTED) <= set(declared)
    helped = subprocess.run(
        [sys.executable, "-m", "papermill", "--help-notebook", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name, p in declared.items():
        assert f"{name}: {p['inferred_type_name']}" in helped
        assert p["help"][:30] in helped


def test_the_check_catches_outputs_and_missing_metadata(tmp_path):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("rows: int = 5  # rows per batch (a=b)")
    params.metadata["tags"] = ["parameters"]
    ran = nbformat.v4.new_code_cell(
        "print(1)", execution_count=1, outputs=[nbformat.v4.new_output("stream", text="1\n")]
    )
    nb.cells = [params, ran]
    nbformat.write(nb, tmp_path / "x.ipynb")
    assert problems(tmp_path / "x.ipynb") == ["kernelspec is not python3", "language_info.name is not python"]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.write(nb, tmp_path / "x.ipynb")
    found = problems(tmp_path / "x.ipynb")
    assert "cell 1 has outputs (strip them: the executed copy is the record)" in found
    assert any("papermill reads 0 of 1" in p for p in found)


def test_there_are_notebooks_to_check():
    assert {"env_report.ipynb", "release_history.ipynb"} <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", sorted((ROOT / "runbooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_runbook_refuses_to_act_outside_opsbook_before_anything_else(path):
    """Opened in JupyterLab, a runbook is not a record: its first cell after the parameters calls
    require_record (opsbook.engines.records.guard) before it imports or does anything else."""
    code = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    statements = [line for line in code[1].source.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert statements[0] == "from opsbook.engines.records.guard import require_record"
    assert statements[1].startswith(f'require_record("{path.stem}", record_id, env')
