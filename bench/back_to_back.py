"""Five releases in a row, the practice this toolkit exists for, against a naive sequence, in one run.

    ./run python bench/back_to_back.py [--releases 5] [--rate 30]

Each opsbook release ships one new migration (add a column with a default, build an index on it
concurrently) through its expand, and after it the previous migration's contract (drop that
index and column) runs with `invoke migrate --phase contract`, all under one steady probe through
lb1. The naive sequence, in the same run and under the same probe, does what teams without the
method do: stop every app host, run the same DDL plainly (`CREATE INDEX`, `ALTER TABLE`), start
every host. Prints per release: wall time, its phases, failed requests, lost acknowledged writes,
p99 during; and the totals. Bounded: the probe stops by itself after 30 minutes.

Touches only the lab (this machine's podman network). Leaves the fleet on a release opsbook made.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from opsbook.core.inventory import load
from opsbook.core.paths import APP, ROOT
from opsbook.engines import artifact, database
from opsbook.engines.probe import Probe, probe_url
from opsbook.engines.records import ledger
from opsbook.engines.records.store import store_for

MIGRATION = """description: back-to-back bench column {col}
contract_requires_version: "{version}"
expand:
  - add_column: {{table: course_events, column: {col}, type: text, default: "'b2b'"}}
  - create_index: {{table: course_events, name: {col}_idx, columns: [{col}]}}
contract:
  - drop_index: {{name: {col}_idx}}
  - drop_column: {{table: course_events, column: {col}}}
"""


def build_versions(run: str, n: int) -> list[tuple[str, str]]:
    """n versions of the current code; version i ships migrations 0001.. plus bench migrations 1..i.
    Returns (version, column of its own migration)."""
    local = artifact.default_version().split("+", 1)[1]
    out = []
    src = Path(tempfile.mkdtemp(prefix="opsbook-b2b-")) / "app"
    shutil.copytree(APP, src, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for i in range(1, n + 1):
        version = f"1.1.{i}+{local}.b2b{run}"
        col = f"b2b_{run}_{i}"
        (src / "migrations" / f"09{i:02d}_b2b_{run}_{i}.yml").write_text(MIGRATION.format(col=col, version=version))
        artifact.build(version, log=lambda _m: None, source=src)
        out.append((version, col))
    return out


def invoke(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / ".venv" / "bin" / "invoke"), *args], cwd=ROOT, capture_output=True,
                          text=True, check=False, timeout=1800)


def last_release(env) -> dict:
    return ledger.releases(store_for(env).ledger())[-1]


def opsbook_sequence(env, probe, versions) -> list[dict]:
    rows = []
    for i, (version, _col) in enumerate(versions, 1):
        name = f"release {i}"
        probe.mark(name)
        t0 = time.monotonic()
        proc = invoke("release", "--env", env.name, "--version", version)
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
        rec = last_release(env)
        contract_s = None
        if i > 1:
            probe.mark(f"contract {i - 1}")
            t1 = time.monotonic()
            c = invoke("migrate", "--env", env.name, "--phase", "contract")
            contract_s = time.monotonic() - t1
            if c.returncode != 0:
                raise SystemExit(f"contract after {name} failed:\n{c.stdout[-3000:]}")
        rows.append({"step": name, "wall_s": wall, "contract_s": contract_s, "record": rec["id"],
                     "phases": rec["figures"].get("phase_seconds") or {}})
    return rows


def naive_sequence(env, probe, cols: list[str]) -> list[dict]:
    """Stop all, plain DDL, start all, once per column."""
    apps = [h.name for h in env.hosts("app")]
    rows = []
    for i, col in enumerate(cols, 1):
        name = f"naive {i}"
        probe.mark(name)
        t0 = time.monotonic()
        _ansible(env, "app", "systemctl stop bl-api")
        with database.Admin(env) as db:
            db.conn.execute(f"ALTER TABLE course_events ADD COLUMN IF NOT EXISTS {col} text DEFAULT 'naive'")
            db.conn.execute(f"CREATE INDEX IF NOT EXISTS {col}_idx ON course_events ({col})")
            db.conn.execute(f"DROP INDEX IF EXISTS {col}_idx")
            db.conn.execute(f"ALTER TABLE course_events DROP COLUMN IF EXISTS {col}")
        _ansible(env, "app", "systemctl start bl-api")
        _wait_serving(env, apps)
        rows.append({"step": name, "wall_s": time.monotonic() - t0, "contract_s": None, "record": "", "phases": {}})
    return rows


def _ansible(env, pattern: str, command: str) -> None:
    from opsbook.engines.ansible import ansible_env

    subprocess.run(["ansible", "-i", str(env.path), pattern, "-m", "ansible.builtin.shell", "-a", command],
                   cwd=ROOT, env=ansible_env(), check=True, capture_output=True)


def _wait_serving(env, apps, timeout: float = 60) -> None:
    from opsbook.engines import fleet

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(fleet.served_versions(env, timeout=1).values()):
            return
        time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="lab")
    ap.add_argument("--releases", type=int, default=5)
    ap.add_argument("--rate", type=float, default=30.0, help="probe requests per second")
    args = ap.parse_args()
    env = load(args.env)
    if env.kind != "lab":
        raise SystemExit("this bench stops every app host: it runs on the lab only")
    run = uuid.uuid4().hex[:6]
    versions = build_versions(run, args.releases)
    probe = Probe(probe_url(env), rate=args.rate, max_seconds=1800).start("before")
    time.sleep(2)
    t0 = time.monotonic()
    rows = opsbook_sequence(env, probe, versions)
    opsbook_total = time.monotonic() - t0
    t0 = time.monotonic()
    rows += naive_sequence(env, probe, [f"b2b_{run}_naive_{i}" for i in range(1, args.releases + 1)])
    naive_total = time.monotonic() - t0
    probe.mark("after")
    time.sleep(2)
    results = probe.stop()
    print(f"{'step':<11} {'wall s':>7} {'contract s':>10} {'failed':>6} {'lost':>5} {'p99 ms':>8}  phases")
    for r in rows:
        ph = results.phase(r["step"])
        phases = ", ".join(f"{k} {v:.1f}" for k, v in r["phases"].items())
        contract = f"{r['contract_s']:.1f}" if r["contract_s"] is not None else "-"
        print(f"{r['step']:<11} {r['wall_s']:>7.1f} {contract:>10} {ph.get('failed', 0):>6} "
              f"{ph.get('missing_acknowledged_writes', 0):>5} {ph.get('p99_ms') or 0:>8.1f}  {phases}")
    figs = results.figures()
    print(f"\nopsbook: {args.releases} releases with migrations in {opsbook_total:.0f} s "
          f"(goal: 5 in <= 240 s); naive: {naive_total:.0f} s")
    print(f"whole run: {figs.get('requests')} requests, {figs.get('failed')} failed, "
          f"{figs.get('missing_acknowledged_writes')} acknowledged writes missing")
    print(json.dumps({"opsbook_total_s": round(opsbook_total, 1), "naive_total_s": round(naive_total, 1)}))
    # Leave the fleet on a release opsbook made.
    invoke("release", "--env", env.name, "--version", versions[-1][0])


if __name__ == "__main__":
    main()
