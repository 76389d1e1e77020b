"""Release the lab fleet under load with opsbook, then with a naive deploy, in the same run.

    ./run python bench/release_vs_naive.py [--rate 40]

opsbook: `invoke release` (drain, switch, restart, health, re-enable, batch by batch).
naive:   every app host switched and restarted at once, no drain (what a bare
         `ansible app -m shell -a 'ln -sfn … && systemctl restart bl-api'` does).
For each, a probe of its own drives reads and writes through lb1 from before the deploy until
the fleet serves the new version, then reads back every acknowledged write. Prints wall time,
failed requests, missing acknowledged writes and p99 latency during the deploy.
Bounded: each probe stops by itself after 15 minutes.
"""

from __future__ import annotations

import argparse
import subprocess
import time

from opsbook.core.inventory import load
from opsbook.core.paths import ROOT
from opsbook.engines import artifact, fleet
from opsbook.engines.ansible import ansible_env
from opsbook.engines.probe import Probe, probe_url
from opsbook.engines.records import ledger
from opsbook.engines.records.store import store_for
from opsbook.operations import release as rel


def wait_for(env, version: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if set(fleet.served_versions(env).values()) == {version}:
            return
        time.sleep(0.5)
    raise SystemExit(f"fleet did not reach {version} within {timeout}s")


def measured(env, name: str, deploy, rate: float) -> dict:
    probe = Probe(probe_url(env), rate=rate, max_seconds=900).start("before")
    time.sleep(3)
    probe.mark("deploy")
    t0 = time.monotonic()
    deploy()
    wall = time.monotonic() - t0
    probe.mark("after")
    time.sleep(3)
    results = probe.stop()
    during = results.phase("deploy")
    return {"name": name, "wall_s": wall, "requests": results.requests, "failed": results.failed,
            "missing": results.figures().get("missing_acknowledged_writes"), "p99_during_ms": during.get("p99_ms"),
            "p99_before_ms": results.phase("before").get("p99_ms")}


def naive_deploy(env, version: str) -> None:
    # Everything at once: no drain, no batches, no health gate.
    cmd = (f"cd /srv/bl-api && ln -sfn /srv/bl-api/releases/{version} current.tmp && mv -T current.tmp current "
           f"&& systemctl restart bl-api")
    subprocess.run(["ansible", "app", "-i", str(env.path), "-f", "20", "-m", "ansible.builtin.shell", "-a", cmd],
                   cwd=ROOT, env=ansible_env(), check=True, capture_output=True)
    wait_for(env, version)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="lab")
    ap.add_argument("--rate", type=float, default=40.0, help="probe requests per second")
    args = ap.parse_args()
    env = load(args.env)
    base = artifact.default_version()
    a, b = f"{base}.bench-a", f"{base}.bench-b"
    for v in (a, b):
        artifact.build(v, log=lambda _m: None)
    print(f"setting up: fleet on {a}, {b} staged (not measured)", flush=True)
    rel.release(env, version=b)     # stages b and leaves it good on every host
    rel.release(env, version=a)
    rows = [measured(env, "opsbook release", lambda: rel.release(env, version=b), args.rate)]
    phases = ledger.releases(store_for(env).ledger())[-1]["figures"].get("phase_seconds") or {}
    rows.append(measured(env, "naive (all at once)", lambda: naive_deploy(env, a), args.rate))
    rel.release(env, version=b)     # leave the fleet on a release opsbook made
    print()
    print(f"{'deploy':<22} {'wall s':>7} {'requests':>9} {'failed':>7} {'missing acked':>14} "
          f"{'p99 before ms':>14} {'p99 during ms':>14}")
    for r in rows:
        print(f"{r['name']:<22} {r['wall_s']:>7.1f} {r['requests']:>9} {r['failed']:>7} {r['missing']!s:>14} "
              f"{r['p99_before_ms'] or 0:>14.1f} {r['p99_during_ms'] or 0:>14.1f}")
    print("\nopsbook release, by phase (from its record): "
          + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items()))


if __name__ == "__main__":
    main()
