"""How long the records site takes to build from a large ledger, and what one new record costs.

Writes N records (a ledger entry, a small notebook and HTML each; one run in 15 fails) of five
runbooks and two environments into a fresh local store, then times: the first build, a build
with nothing new, a build after one new record, and after one new release. Prints seconds, the
pages each build rendered, and the index's size.

    python bench/records_site.py [--records 5000] [--store DIR]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

# Import the opsbook of this checkout, not whichever one is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nbformat

from opsbook.engines.records.store import LocalStore, new_record_id
from opsbook.operations.records_site import builder

RUNBOOKS = ("release", "migrate", "env_report", "lock_break", "snapshot")


def notebook(failed: bool) -> bytes:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("check()")
    if failed:
        cell.outputs = [nbformat.v4.new_output("error", ename="ValueError", evalue="boom", traceback=[])]
    nb.cells = [nbformat.v4.new_code_cell("x = 1"), cell]
    return nbformat.writes(nb).encode()


def entry(i: int, start: datetime, rng: random.Random) -> dict:
    runbook = RUNBOOKS[i % len(RUNBOOKS)]
    outcome = "failed" if i % 15 == 7 else "refused" if i % 97 == 3 else "succeeded"
    duration = rng.uniform(20, 90)
    return {
        "id": new_record_id(runbook, start), "runbook": runbook, "env": ("lab", "prod")[i % 2],
        "outcome": outcome, "start": start.isoformat(timespec="seconds"),
        "end": (start + timedelta(seconds=duration)).isoformat(timespec="seconds"),
        "duration_s": round(duration, 3), "operator": "ops@bench", "git_sha": f"{i:040x}",
        "parameters": {"phase": "expand", "rows": i},
        "error": "cell 2: ValueError: boom" if outcome == "failed" else None,
        "figures": {"version": f"1.{i // 100}.{i % 100}", "commit_time": (start - timedelta(hours=3)).isoformat(),
                    "rows": i * 10, "p99_ms": rng.uniform(20, 90)},
        "parent_record_id": None,
    }


def fill(store: LocalStore, n: int) -> datetime:
    rng = random.Random(14)
    start = datetime.now(UTC) - timedelta(days=60)
    step = timedelta(days=60) / n
    bad, good = notebook(True), notebook(False)
    for i in range(n):
        e = entry(i, start + i * step, rng)
        store.write_record(e, bad if e["outcome"] == "failed" else good, b"<html><body>record</body></html>")
    return start + n * step


def timed(store: LocalStore, label: str) -> builder.Built:
    t = time.perf_counter()
    built = builder.build(store, log=lambda _m: None)
    took = time.perf_counter() - t
    shown = ", ".join(built.rendered) if len(built.rendered) <= 6 else f"{len(built.rendered)} pages"
    index = built.seconds.get("page index.html")
    print(f"{label:<34} {took:6.2f} s   rendered: {shown or 'nothing'}"
          + (f"   (index.html {index:.2f} s)" if index is not None else ""))
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--store", help="directory for the store (default: a temporary one, removed after)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="opsbook-bench-site-") as tmp:
        store = LocalStore(Path(args.store or tmp) / "records")
        store.check()
        t = time.perf_counter()
        last = fill(store, args.records)
        print(f"{args.records} records written in {time.perf_counter() - t:.1f} s to {store.url}")
        first = timed(store, "first build")
        for k in ("read ledger", "page index.html", "page releases.html", "write manifest"):
            print(f"    {k:<30} {first.seconds.get(k, 0):6.2f} s")
        timed(store, "again, nothing new")
        rng = random.Random(1)
        e = entry(args.records + 1, last, rng)
        e = {**e, "runbook": "migrate", "id": new_record_id("migrate", last)}
        store.write_record(e, notebook(False), b"<html></html>")
        timed(store, "after one new migrate record")
        e = {**entry(args.records + 2, last + timedelta(minutes=5), rng), "runbook": "release",
             "id": new_record_id("release", last + timedelta(minutes=5))}
        store.write_record(e, notebook(False), b"<html></html>")
        timed(store, "after one new release record")
        index = Path(store.location("site/index.html"))
        manifest = Path(store.location(builder.MANIFEST))
        print(f"index.html {index.stat().st_size / 1e6:.1f} MB, manifest.json {manifest.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
