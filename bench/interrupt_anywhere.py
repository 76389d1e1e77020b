"""Releases stopped at random moments: does the lab always end in order, and does the next release converge?

    ./run python bench/interrupt_anywhere.py [--rounds 12] [--seed S] [--rate 20] [--new-versions]

The fault tests stop a release at chosen points (a batch draining, a host killed, the database
stopped). An operator's Ctrl-C, a closed terminal or a killed controller comes at any moment: while
Python imports, while the lock is taken, during preflight, a converge, staging, an expand migration,
the switch, the gate, marking the release good or writing its record. Each round here starts a
release of the other of two versions, sends one of SIGINT, SIGINT twice (1.5 s apart), SIGTERM or
SIGKILL after a random delay within the length of a release measured first, and then reads the lab:

- how the release ended: its exit code, how long it took to end after the signal, the phase it
  says it was in (its record's `interrupted_in`), and whether an `ansible-playbook` outlived it;
- every app host: the version it serves (one of the two) and its state in haproxy;
- the lock: free (a SIGKILLed holder keeps it until its lease expires, which status says);
- then the next release (`--wait` past the lease) must succeed, every host serving it, UP, the lock
  free;
- a steady probe of this bench's own through lb1 for the whole run: any failed request or lost
  acknowledged write in a round is a finding, whatever the releases' own records say.

Prints one row per round and every finding (a state that breaks what the README promises); exits 1
when there is a finding. Not part of the suite: its rounds are random by design (`--seed` repeats a
run's choices, not its timings). Touches only the lab (this machine's podman network). Leaves the
fleet on a release opsbook made.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import time

from opsbook.core.inventory import load
from opsbook.core.paths import ROOT
from opsbook.engines import artifact, fleet
from opsbook.engines.lock import lock_for
from opsbook.engines.probe import Probe, probe_url
from opsbook.engines.records.store import store_for

SIGNALS = {"int": (signal.SIGINT,), "int-twice": (signal.SIGINT, signal.SIGINT), "term": (signal.SIGTERM,),
           "kill": (signal.SIGKILL,)}
INVOKE = str(ROOT / ".venv" / "bin" / "invoke")


def invoke(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([INVOKE, *args], cwd=ROOT, capture_output=True, text=True, check=False, timeout=timeout)


def ansible_left() -> list[str]:
    out = subprocess.run(["pgrep", "-af", "ansible-playbook"], capture_output=True, text=True, check=False).stdout
    return [line for line in out.splitlines() if line.strip()]


def release_records(env) -> list[dict]:
    return [e for e in store_for(env).ledger() if e.get("runbook") == "release"]


def lab_state(env) -> tuple[dict[str, str | None], dict[str, str]]:
    versions = dict(fleet.served_versions(env))
    rot = {h: next(iter(lbs.values()), "unknown") for h, lbs in fleet.rotation(env).items()}
    return versions, rot


def versions_to_use(env, new: bool, run: str, rounds: int) -> list[str]:
    built = artifact.available()
    if new:
        local = artifact.default_version()
        out = []
        for i in range(rounds + 1):
            v = f"{local}.int{run}{i}"
            artifact.build(v, log=lambda _m: None)
            out.append(v)
        return out
    here = artifact.default_version()
    if here not in built:
        artifact.build(here, log=lambda _m: None)
    other = f"{here}.int{run}"
    artifact.build(other, log=lambda _m: None)
    return [here, other]


def interrupt(env, target: str, kind: str, delay: float) -> tuple[str, int | None, str, str, list[str]]:
    """Start a release of `target`, signal it after `delay` s; (ended, exit code, outcome, phase, findings)."""
    before = len(release_records(env))
    proc = subprocess.Popen([INVOKE, "release", "--env", env.name, "--version", target], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(delay)
    sent = time.monotonic()
    ended_before = proc.poll() is not None
    for i, sig in enumerate(SIGNALS[kind]):
        if i:
            time.sleep(1.5)
        if proc.poll() is None:
            proc.send_signal(sig)
    f: list[str] = []
    try:
        out, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        f.append(f"the release did not end within 600 s of {kind}")
    ended = "before" if ended_before else f"{time.monotonic() - sent:.1f}s"
    # Ansible dies with its controller (SIGTERM from its parent's death, or the put-back's end).
    deadline = time.monotonic() + (30 if kind == "kill" else 5)
    while ansible_left() and time.monotonic() < deadline:
        time.sleep(0.5)
    if ansible_left():
        f.append(f"ansible-playbook outlived the release: {ansible_left()[:2]}")
    recs = release_records(env)[before:]
    phase = (recs[-1].get("figures") or {}).get("interrupted_in") or "-" if recs else "-"
    outcome = recs[-1].get("outcome") if recs else "no record"
    if not ended_before and kind != "kill":
        f += orderly_end_findings(env, kind, proc.returncode, out, outcome)
    return ended, proc.returncode, outcome, phase, f


def orderly_end_findings(env, kind: str, code: int | None, out: str, outcome: str) -> list[str]:
    """What an interrupted release that ended by itself must leave: exit 130 (or 0 if it had finished),
    no traceback, the lock free, every host in rotation, a record that says so."""
    f = []
    if code not in (0, 130):
        f.append(f"exit code {code} after {kind} (expected 130, or 0 if it had finished): " + out.strip()[-600:])
    if "Traceback (most recent call last)" in out:
        f.append("a Python traceback reached the operator: " + out.split("Traceback", 1)[1][:600])
    holder = lock_for(env).holder()
    if holder is not None:
        f.append(f"the lock is still held after an orderly end: {holder}")
    _versions, rot = lab_state(env)
    down = {h: s for h, s in rot.items() if s != "UP"}
    if down:
        f.append(f"hosts left out of rotation after an orderly end: {down}")
    if code == 130 and outcome not in ("interrupted", "no record"):
        f.append(f"exit 130 but the record says {outcome}")
    return f


def next_release(env, target: str, lease: float) -> tuple[float, list[str]]:
    """The release after an interrupted one must converge: every host on `target`, UP, the lock free."""
    t1 = time.monotonic()
    nxt = invoke("release", "--env", env.name, "--version", target, "--wait", str(int(lease) + 30))
    took = time.monotonic() - t1
    if nxt.returncode != 0:
        return took, [f"the next release failed (exit {nxt.returncode}): {(nxt.stdout + nxt.stderr).strip()[-800:]}"]
    versions, rot = lab_state(env)
    f = []
    if set(versions.values()) != {target}:
        f.append(f"after the next release the hosts serve {versions}")
    if any(s != "UP" for s in rot.values()):
        f.append(f"after the next release haproxy says {rot}")
    if lock_for(env).holder() is not None:
        f.append("the lock is held after the next release ended")
    return took, f


def parse() -> tuple[argparse.Namespace, int, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="lab")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--rate", type=float, default=20.0, help="this bench's own probe, requests/s")
    ap.add_argument("--new-versions", action="store_true",
                    help="a version never staged for every round (interrupts staging too; builds one per round)")
    ap.add_argument("--signals", default=",".join(SIGNALS), help="which of " + ", ".join(SIGNALS))
    args = ap.parse_args()
    if not args.env.startswith("lab"):
        raise SystemExit("this bench interrupts releases on purpose: lab environments only")
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    kinds = [k.strip() for k in args.signals.split(",") if k.strip()]
    if unknown := [k for k in kinds if k not in SIGNALS]:
        raise SystemExit(f"unknown signal kind(s) {unknown}; choose from {', '.join(SIGNALS)}")
    return args, seed, kinds


def main() -> int:
    args, seed, kinds = parse()
    rng = random.Random(seed)
    env = load(args.env)
    lease = float(env.var("opsbook_lock_lease_seconds"))
    print(f"seed {seed}; building the versions to release ...", flush=True)
    versions = versions_to_use(env, args.new_versions, format(seed % 100000, "05d"), args.rounds)

    # A first release to one version, timed: the moments are drawn from its length.
    t0 = time.monotonic()
    done = invoke("release", "--env", env.name, "--version", versions[0], "--wait", str(int(lease) + 30))
    length = time.monotonic() - t0
    if done.returncode != 0:
        raise SystemExit(f"the first release failed; fix the lab first:\n{done.stdout[-2000:]}{done.stderr[-1500:]}")
    print(f"a release of {versions[0]} took {length:.1f} s; signals land 0 to {length * 1.1:.1f} s after a start",
          flush=True)

    probe = Probe(probe_url(env), rate=args.rate, max_seconds=3600).start("before")
    findings: list[str] = []
    ends: dict[str, list[float]] = {k: [] for k in kinds}
    current = versions[0]
    try:
        for r in range(1, args.rounds + 1):
            target = versions[r] if args.new_versions else versions[r % 2]
            kind, delay = rng.choice(kinds), rng.uniform(0, length * 1.1)
            probe.mark(f"round {r}")
            ended, code, outcome, phase, f = interrupt(env, target, kind, delay)
            versions_now, _rot = lab_state(env)
            if odd := {h: v for h, v in versions_now.items() if v not in (current, target)}:
                f.append(f"hosts serving neither {current} nor {target}: {odd}")
            took, g = next_release(env, target, lease)
            f += g
            current = target if not g else current
            ph = probe.results().phase(f"round {r}")
            if ph["failed"]:
                f.append(f"the bench's probe saw {ph['failed']} failed request(s) in this round")
            if ended != "before":
                ends[kind].append(float(ended[:-1]))
            print(f"round {r:2d}: {kind:9s} at {delay:5.1f}s  ended {ended:>7s}  exit {code!s:>4s}  "
                  f"record {outcome} ({phase})  next release {took:5.1f}s  probe {ph['requests']} req "
                  f"{ph['failed']} failed  findings {len(f)}", flush=True)
            findings += [f"round {r} ({kind} at {delay:.1f} s, {phase if phase != '-' else outcome}): {x}" for x in f]
    finally:
        probe.mark("after")
        results = probe.stop()
    lost = results.missing_acknowledged_writes or []
    if lost:
        findings.append(f"{len(lost)} acknowledged write(s) lost over the run: {lost[:3]}")
    print(f"\nseed {seed}: the bench's probe: {results.requests} requests, {results.failed} failed, "
          f"{len(lost)} acknowledged write(s) lost, p99 {results.p99_ms} ms"
          + ("" if results.verified else f" (writes not verified: {results.verify_error})"))
    for kind, seconds in ends.items():
        if seconds:
            print(f"  {kind:9s}: {len(seconds)} round(s) signalled mid-release; ended {min(seconds):.1f} to "
                  f"{max(seconds):.1f} s after the signal")
    print(f"findings: {len(findings)}")
    for x in findings:
        print("  - " + x)
    return 1 if findings else 0


if __name__ == "__main__":
    raise SystemExit(main())
