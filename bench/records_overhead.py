"""What a record costs: a trivial runbook run via opsbook (validate, execute, redact, render HTML,
store, ledger) against the same notebook run by bare papermill. Prints seconds and bytes.

    python bench/records_overhead.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import papermill

# Import the opsbook of this checkout, not whichever one is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opsbook.core.inventory import load
from opsbook.core.paths import ROOT
from opsbook.engines.records import runner as runbooks
from opsbook.engines.records.store import LocalStore

PARAMS = """env: str = "lab"  # environment; set by opsbook
record_id: str = None  # this run's record id; set by opsbook
parent_record_id: str = None  # the run that started this one; set by opsbook
rows: int = 10  # rows to count"""


def trivial_runbook(directory: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    params = nbformat.v4.new_code_cell(PARAMS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Trivial\nCounts rows. Healthy: prints the count."),
        params,
        nbformat.v4.new_code_cell(
            "from opsbook.engines.records.figures import record_figures\nprint(sum(range(rows)))"),
        nbformat.v4.new_code_cell("record_figures(rows=rows, total=sum(range(rows)))"),
    ]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "trivial.ipynb"
    nbformat.write(nb, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        path = trivial_runbook(tmp / "runbooks")
        store = LocalStore(tmp / "records")
        secrets = {"vault_bench": "not-a-real-secret-0123456789"}
        bare, opsbook_runs, entries = [], [], []
        # One untimed run of each warms the import caches the same way for both.
        papermill.execute_notebook(str(path), str(tmp / "warm.ipynb"), parameters={"rows": 3}, cwd=str(ROOT),
                                   progress_bar=False)
        runbooks.run("trivial", load("lab"), {"rows": 3}, store=store, secrets=secrets, runbooks_dir=path.parent,
                     progress=False, log=lambda _m: None)
        for i in range(args.runs):  # alternate, so drift on the machine hits both alike
            t = time.perf_counter()
            papermill.execute_notebook(str(path), str(tmp / f"bare{i}.ipynb"), parameters={"rows": 1000},
                                       kernel_name="python3", cwd=str(ROOT), progress_bar=False)
            bare.append(time.perf_counter() - t)
            t = time.perf_counter()
            entries.append(runbooks.run("trivial", load("lab"), {"rows": 1000}, store=store, secrets=secrets,
                                        runbooks_dir=path.parent, progress=False, log=lambda _m: None))
            opsbook_runs.append(time.perf_counter() - t)
        e = entries[-1]
        sizes = {k: (tmp / "records" / key).stat().st_size
                 for k, key in (("notebook", e["notebook"]), ("html", e["html"]),
                                ("ledger entry", f"ledger/{e['id']}.json"))}
    med_bare, med_ops = statistics.median(bare), statistics.median(opsbook_runs)
    print(f"trivial runbook (4 cells), {args.runs} runs each, median seconds:")
    print(f"  bare papermill      {med_bare:6.2f} s   (min {min(bare):.2f}, max {max(bare):.2f})")
    lo, hi = min(opsbook_runs), max(opsbook_runs)
    print(f"  via opsbook+record  {med_ops:6.2f} s   (min {lo:.2f}, max {hi:.2f})")
    print(f"  record overhead     {med_ops - med_bare:6.2f} s   ({(med_ops / med_bare - 1) * 100:.0f}%)")
    print("typical record size (bytes):")
    for k, v in sizes.items():
        print(f"  {k:<13} {v:>9,}")
    print(f"  {'total':<13} {sum(sizes.values()):>9,}")


if __name__ == "__main__":
    main()
