"""Releases (or staging refreshes) stopped at random moments: does the lab end in order, and the next one converge?

    ./run python bench/interrupt_anywhere.py [--rounds 12] [--seed S] [--rate 20] [--new-versions]
    ./run python bench/interrupt_anywhere.py --operation refresh [--env lab --to lab-staging] [--rounds 12]

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

`--operation refresh` does the same to `invoke staging.refresh --from lab --to lab-staging` (lab-staging
provisioned first: `invoke provision --env lab-staging`): after an orderly end, the target's lock is
free, no unfinished clone is left (it would hold unmasked data), the serving clone runs (or the
output says it does not) and the target's app hosts answer; after a SIGKILL, the next refresh (once
the dead holder's lease has expired) must delete what was left, serve its new clone and leave no
unfinished one; the probe watches the source (lab), which a refresh must not disturb.

Prints one row per round and every finding (a state that breaks what the README promises); exits 1
when there is a finding. Not part of the suite: its rounds are random by design (`--seed` repeats a
run's choices, not its timings). Touches only the lab (this machine's podman network). Leaves the
fleet on a release opsbook made.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import time
from typing import Any

from opsbook.core.inventory import load
from opsbook.core.paths import ROOT
from opsbook.engines import artifact, fleet
from opsbook.engines.clones import paths
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


def signal_during(argv: list[str], kind: str, delay: float) -> tuple[bool, str, int | None, str, list[str]]:
    """Start `argv`, send `kind`'s signal(s) after `delay` s; (ended before the signal, how long it took to
    end after it, exit code, output, findings)."""
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
        f.append(f"it did not end within 600 s of {kind}")
    ended = "before" if ended_before else f"{time.monotonic() - sent:.1f}s"
    # Ansible dies with its controller (SIGTERM from its parent's death, or the put-back's end).
    deadline = time.monotonic() + (30 if kind == "kill" else 5)
    while ansible_left() and time.monotonic() < deadline:
        time.sleep(0.5)
    if ansible_left():
        f.append(f"ansible-playbook outlived it: {ansible_left()[:2]}")
    if not ended_before and kind != "kill" and "Traceback (most recent call last)" in out:
        f.append("a Python traceback reached the operator: " + out.split("Traceback", 1)[1][:600])
    return ended_before, ended, proc.returncode, out, f


def interrupt(env, target: str, kind: str, delay: float) -> tuple[str, int | None, str, str, list[str]]:
    """Start a release of `target`, signal it after `delay` s; (ended, exit code, outcome, phase, findings)."""
    before = len(release_records(env))
    ended_before, ended, code, out, f = signal_during(
        [INVOKE, "release", "--env", env.name, "--version", target], kind, delay)
    recs = release_records(env)[before:]
    phase = (recs[-1].get("figures") or {}).get("interrupted_in") or "-" if recs else "-"
    outcome = recs[-1].get("outcome") if recs else "no record"
    if not ended_before and kind != "kill":
        f += orderly_end_findings(env, kind, code, out, outcome)
    return ended, code, outcome, phase, f


def orderly_end_findings(env, kind: str, code: int | None, out: str, outcome: str) -> list[str]:
    """What an interrupted release that ended by itself must leave: exit 130 (or 0 if it had finished),
    no traceback, the lock free, every host in rotation, a record that says so."""
    f = []
    if code not in (0, 130):
        f.append(f"exit code {code} after {kind} (expected 130, or 0 if it had finished): " + out.strip()[-600:])
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


# --- staging refresh ------------------------------------------------------------------------------
def refresh_records(target) -> list[dict]:
    return [e for e in store_for(target).ledger() if e.get("runbook") == "staging_refresh"]


def staging_state(source, target) -> tuple[str | None, list[str], list[str], bool]:
    """(the serving clone, every clone, the unfinished ones, whether the serving one runs)."""
    engine = paths.btrfs_refresh(source, target, log=lambda _m: None).engine
    current = engine.current()
    return current, engine.names(), engine.unfinished(), bool(current) and engine.running(current)


def staging_answers(target, within: float = 20.0) -> dict[str, str | None]:
    """Each of the target's app hosts' version, waited for (an interrupt may come while they restart)."""
    deadline = time.monotonic() + within
    while True:
        versions = dict(fleet.served_versions(target))
        if all(versions.values()) or time.monotonic() > deadline:
            return versions
        time.sleep(1)


def refresh_round(source, target, kind: str, delay: float) -> tuple[str, int | None, str, str, list[str]]:
    """Start a refresh, signal it after `delay` s; (ended, exit code, outcome, step, findings)."""
    before = len(refresh_records(target))
    ended_before, ended, code, out, f = signal_during(
        [INVOKE, "staging.refresh", "--from", source.name, "--to", target.name], kind, delay)
    recs = refresh_records(target)[before:]
    outcome = recs[-1].get("outcome") if recs else "no record"
    step = m.group(1) if (m := re.search(r"at step '([^']+)'", out)) else "-"
    if not ended_before and kind != "kill":
        if code not in (0, 130):
            f.append(f"exit code {code} after {kind} (expected 130, or 0 if it had finished): {out.strip()[-600:]}")
        if lock_for(target).holder() is not None:
            f.append(f"{target.name}'s lock is still held after an orderly end")
        current, _names, unfinished, running = staging_state(source, target)
        if left := [n for n in unfinished if n != current]:
            f.append(f"an orderly end left unfinished clone(s) {left} (unmasked data)")
        if not running and "is NOT running" not in out:
            f.append(f"the serving clone {current} does not run, and the output does not say so")
        if running and not all((answers := staging_answers(target)).values()):
            f.append(f"{target.name}'s app hosts do not answer: {answers}")
    return ended, code, outcome, step, f


def next_refresh(source, target, lease: float) -> tuple[float, list[str]]:
    """The refresh after an interrupted one must serve a new clone, leave no unfinished one, and its app
    hosts must answer. (A SIGKILLed holder's lock is waited out first: staging.refresh has no --wait.)"""
    holder = lock_for(target).holder()
    if holder is not None:
        time.sleep(lease + 2)
    t1 = time.monotonic()
    done = invoke("staging.refresh", "--from", source.name, "--to", target.name)
    took = time.monotonic() - t1
    if done.returncode != 0:
        return took, [f"the next refresh failed (exit {done.returncode}): {(done.stdout + done.stderr).strip()[-800:]}"]
    current, names, unfinished, running = staging_state(source, target)
    f = []
    if not names or current != names[-1] or not running:
        f.append(f"after the next refresh: serving {current} (running: {running}), clones {names}")
    if unfinished:
        f.append(f"after the next refresh, unfinished clones remain: {unfinished}")
    if not all((answers := staging_answers(target)).values()):
        f.append(f"after the next refresh {target.name}'s app hosts do not answer: {answers}")
    return took, f


def parse() -> tuple[argparse.Namespace, int, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--operation", choices=("release", "refresh"), default="release",
                    help="what to interrupt: a release of --env, or a staging refresh from --env to --to")
    ap.add_argument("--env", default="lab")
    ap.add_argument("--to", default="lab-staging", help="the refresh's target (--operation refresh)")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--rate", type=float, default=20.0, help="this bench's own probe, requests/s")
    ap.add_argument("--new-versions", action="store_true",
                    help="a version never staged for every round (interrupts staging too; builds one per round)")
    ap.add_argument("--signals", default=",".join(SIGNALS), help="which of " + ", ".join(SIGNALS))
    args = ap.parse_args()
    if not (args.env.startswith("lab") and args.to.startswith("lab")):
        raise SystemExit("this bench interrupts operations on purpose: lab environments only")
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    kinds = [k.strip() for k in args.signals.split(",") if k.strip()]
    if unknown := [k for k in kinds if k not in SIGNALS]:
        raise SystemExit(f"unknown signal kind(s) {unknown}; choose from {', '.join(SIGNALS)}")
    return args, seed, kinds


def first_run(args, env, lease: float, seed: int) -> tuple[Any, list[str], float]:
    """The versions to release (none for a refresh), and a first run, timed: the moments are drawn from
    its length. (the refresh's target, the versions, the length)"""
    target = load(args.to) if args.operation == "refresh" else None
    versions: list[str] = []
    if target is not None:
        if not all(dict(fleet.served_versions(target)).values()):   # the refresh restarts app hosts that serve
            print(f"releasing to {target.name} first (its app hosts serve nothing yet) ...", flush=True)
            rel = invoke("release", "--env", target.name, "--wait", str(int(lease) + 30))
            if rel.returncode != 0:
                raise SystemExit(f"the release to {target.name} failed:\n{rel.stdout[-2000:]}{rel.stderr[-1500:]}")
        t0 = time.monotonic()
        done = invoke("staging.refresh", "--from", env.name, "--to", target.name)
        what = f"a refresh of {target.name} from {env.name}"
    else:
        print(f"seed {seed}; building the versions to release ...", flush=True)
        versions = versions_to_use(env, args.new_versions, format(seed % 100000, "05d"), args.rounds)
        t0 = time.monotonic()
        done = invoke("release", "--env", env.name, "--version", versions[0], "--wait", str(int(lease) + 30))
        what = f"a release of {versions[0]}"
    length = time.monotonic() - t0
    if done.returncode != 0:
        raise SystemExit(f"{what} failed; fix the lab first:\n{done.stdout[-2000:]}{done.stderr[-1500:]}")
    print(f"seed {seed}; {what} took {length:.1f} s; signals land 0 to {length * 1.1:.1f} s after a start",
          flush=True)
    return target, versions, length


def summary(seed: int, env, operation: str, results, *, ends: dict[str, list[float]], findings: list[str]) -> int:
    lost = results.missing_acknowledged_writes or []
    if lost:
        findings.append(f"{len(lost)} acknowledged write(s) lost over the run: {lost[:3]}")
    print(f"\nseed {seed}: the bench's probe on {env.name}: {results.requests} requests, {results.failed} failed, "
          f"{len(lost)} acknowledged write(s) lost, p99 {results.p99_ms} ms"
          + ("" if results.verified else f" (writes not verified: {results.verify_error})"))
    for kind, seconds in ends.items():
        if seconds:
            print(f"  {kind:9s}: {len(seconds)} round(s) signalled mid-{operation}; ended {min(seconds):.1f} to "
                  f"{max(seconds):.1f} s after the signal")
    print(f"findings: {len(findings)}")
    for x in findings:
        print("  - " + x)
    return 1 if findings else 0


def main() -> int:
    args, seed, kinds = parse()
    rng = random.Random(seed)
    env = load(args.env)
    lease = float(env.var("opsbook_lock_lease_seconds"))
    target, versions, length = first_run(args, env, lease, seed)
    probe = Probe(probe_url(env), rate=args.rate, max_seconds=3600).start("before")
    findings: list[str] = []
    ends: dict[str, list[float]] = {k: [] for k in kinds}
    current = versions[0] if versions else ""
    try:
        for r in range(1, args.rounds + 1):
            kind, delay = rng.choice(kinds), rng.uniform(0, length * 1.1)
            probe.mark(f"round {r}")
            if args.operation == "refresh":
                ended, code, outcome, phase, f = refresh_round(env, target, kind, delay)
                took, g = next_refresh(env, target, lease)
            else:
                version = versions[r] if args.new_versions else versions[r % 2]
                ended, code, outcome, phase, f = interrupt(env, version, kind, delay)
                versions_now, _rot = lab_state(env)
                if odd := {h: v for h, v in versions_now.items() if v not in (current, version)}:
                    f.append(f"hosts serving neither {current} nor {version}: {odd}")
                took, g = next_release(env, version, lease)
                current = version if not g else current
            f += g
            ph = probe.results().phase(f"round {r}")
            if ph["failed"]:
                f.append(f"the bench's probe saw {ph['failed']} failed request(s) on {env.name} in this round")
            if ended != "before":
                ends[kind].append(float(ended[:-1]))
            print(f"round {r:2d}: {kind:9s} at {delay:5.1f}s  ended {ended:>7s}  exit {code!s:>4s}  "
                  f"record {outcome} ({phase})  next {args.operation} {took:5.1f}s  probe {ph['requests']} req "
                  f"{ph['failed']} failed  findings {len(f)}", flush=True)
            findings += [f"round {r} ({kind} at {delay:.1f} s, {phase if phase != '-' else outcome}): {x}" for x in f]
    finally:
        probe.mark("after")
        results = probe.stop()
    return summary(seed, env, args.operation, results, ends=ends, findings=findings)


if __name__ == "__main__":
    raise SystemExit(main())
