"""Throughput and latency of `record_responses` through the lab's load balancer.

    ./run python bench/record_responses.py [--env lab] [--concurrency 16] [--batch 10] [--seconds 20]

Prints responses/s, requests/s and p50/p99 latency at a fixed concurrency, plus the same
figures for a batch of 1 in the same run as a baseline (these machines are noisy: compare
ratios, not absolutes). Bounded: every loop stops after --seconds.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid

import httpx

from opsbook.core.inventory import load


def make_course(client: httpx.Client, base: str) -> str:
    course = str(uuid.uuid4())
    r = client.post(f"{base}/create_course", json={"course_uuid": course, "ecosystem_uuid": str(uuid.uuid4())})
    r.raise_for_status()
    return course


def response(course: str) -> dict:
    return {"response_uuid": str(uuid.uuid4()), "course_uuid": course, "ecosystem_item_uuid": str(uuid.uuid4()),
            "trial_uuid": str(uuid.uuid4()), "student_uuid": str(uuid.uuid4()),
            "exercise_uuid": str(uuid.uuid4()), "is_correct": True, "is_real_response": True,
            "responded_at": "2026-11-28T12:00:00Z"}


def run(base: str, concurrency: int, batch: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = 0
    recorded = 0
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker() -> None:
        nonlocal errors, recorded
        with httpx.Client(timeout=10) as client:
            course = make_course(client, base)   # one course per worker: realistic, no hot row
            while time.monotonic() < deadline:
                body = {"responses": [response(course) for _ in range(batch)]}
                t0 = time.perf_counter()
                try:
                    r = client.post(f"{base}/record_responses", json=body)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                dt = time.perf_counter() - t0
                with lock:
                    if ok:
                        latencies.append(dt)
                        recorded += batch
                    else:
                        errors += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {"responses_per_s": recorded / wall, "requests_per_s": len(latencies) / wall,
            "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000, "errors": errors, "requests": len(latencies)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="lab")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=20)
    args = ap.parse_args()
    env = load(args.env)
    lb = env.hosts("lb")[0]
    base = f"http://{lb.address}:{env.var('lb_http_port')}"
    print(f"record_responses through {lb.name} ({base}), concurrency {args.concurrency}, {args.seconds:.0f}s each")
    rows = []
    for batch in (1, args.batch):
        fig = run(base, args.concurrency, batch, args.seconds)
        rows.append((batch, fig))
    print(f"{'batch':>5} {'responses/s':>12} {'requests/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for batch, f in rows:
        print(f"{batch:>5} {f['responses_per_s']:>12.0f} {f['requests_per_s']:>11.0f} {f['p50_ms']:>8.1f} "
              f"{f['p99_ms']:>8.1f} {f['errors']:>7}")
    base_rps = rows[0][1]["responses_per_s"]
    print(f"batch {args.batch} vs batch 1: {rows[1][1]['responses_per_s'] / base_rps:.1f}x responses/s")


if __name__ == "__main__":
    main()
