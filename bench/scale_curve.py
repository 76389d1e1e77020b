"""The full scaling curve of an environment (default: the lab), printed as a table with the knee and
the limiting resource; with --hosts, the same curve with 1, 2, ... app hosts in rotation, and the
capacity per host.

    ./run python bench/scale_curve.py [--env lab] [--steps 1000,2000,...] [--step-seconds 15]
                                      [--mix record10] [--hosts 1,2,3]

The load goes to the environment's own load balancer through opsbook.engines.load (open model, latency
from scheduled send times); the figures are those `invoke scale.check` records. It holds the
environment's lock while it runs; it leaves no record (use `invoke scale.check` for evidence).
"""

from __future__ import annotations

import argparse
import os

from opsbook.core.inventory import load
from opsbook.engines import lock as locks
from opsbook.operations import scale_check as sc


def show(check: sc.CheckRun) -> None:
    print(f"{'offered':>8} {'achieved':>9} {'req/s':>7} {'p50':>7} {'p99':>8} {'svc p99':>8} {'err%':>6} "
          f"{'gen cpu':>7} {'machine':>7} {'db xact/s':>9} {'locks':>5}  hosts cpu (cores)")
    for r in check.rows:
        hosts = " ".join(f"{h}={v['cpu_cores']:.2f}" for h, v in sorted(r["hosts"].items()))
        db = r["db"] or {}
        machine = f"{r['machine_cpu']:.0%}" if r.get("machine_cpu") is not None else "-"
        print(f"{r['offered']:>8g} {r['achieved']:>9.0f} {r['achieved_requests_per_s']:>7.0f} "
              f"{r['p50_ms'] or 0:>7.1f} {r['p99_ms'] or 0:>8.1f} {r['service_p99_ms'] or 0:>8.1f} "
              f"{r['error_rate'] * 100:>6.2f} {r['generator_cpu']:>7.2f} {machine:>7} "
              f"{db.get('xact_per_s') or 0:>9.0f} {db.get('lock_waits_max') or 0:>5}  {hosts}")
    sc.summary(check)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="lab")
    ap.add_argument("--steps", default="")
    ap.add_argument("--step-seconds", type=float, default=15)
    ap.add_argument("--mix", default=None)
    ap.add_argument("--target", type=float, default=None)
    ap.add_argument("--hosts", default="", help="app host counts to measure in turn, e.g. 1,2,3")
    ap.add_argument("--max-in-flight", type=int, default=256)
    args = ap.parse_args()
    env = load(args.env)
    counts = [int(x) for x in args.hosts.split(",") if x.strip()] or [0]
    per_host = {}
    with locks.lock_for(env).hold("scale bench", wait=0):
        for n in counts:
            ctx = sc.prepare(env.name, env=env, target=args.target, steps=args.steps or None,
                             step_seconds=args.step_seconds, mix=args.mix, app_hosts=n,
                             max_in_flight=args.max_in_flight)
            print()
            sc.describe(ctx)
            sc.fleet(ctx, env)
            check = sc.run(ctx, env)
            show(check)
            per_host[len(ctx.app_hosts)] = (check.knee.achieved, check.capacity_per_host(), check.limit.resource)
    if len(per_host) > 1:
        print(f"\nhorizontal scaling on {os.cpu_count()} cores (every lab host and the generator share them):")
        print(f"{'app hosts':>9} {'knee /s':>9} {'per host':>9}  limit")
        for n, (knee, each, limit) in sorted(per_host.items()):
            print(f"{n:>9} {knee or 0:>9.0f} {each or 0:>9.0f}  {limit}")


if __name__ == "__main__":
    main()
