"""Operations stopped at random moments: do they end in order, and does the next run converge?

    ./run python bench/interrupt_anywhere.py [--rounds 12] [--seed S] [--rate 20] [--new-versions]
    ./run python bench/interrupt_anywhere.py --operation refresh [--env lab --to lab-staging] [--rounds 12]
    ./run python bench/interrupt_anywhere.py --operation snapshot [--rounds 12]
    ./run python bench/interrupt_anywhere.py --operation drill [--rounds 12]
    ./run python bench/interrupt_anywhere.py --operation migrate [--rows 300000] [--rounds 12]

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

`--operation snapshot` does the same to `invoke snapshot --env lab`: after an orderly end the lock is
free, no pgBackRest backup still runs on the repository host, and the repository still takes WAL
(`pgbackrest check`, and the snapshot's own can-take check); the next snapshot (a SIGKILLed holder's lease
waited out) must succeed, be the newest of opsbook's, available, and leave no incomplete one.
`--operation drill` does it to `invoke snapshot.drill --env lab` (a snapshot is taken first if there is
none): after an orderly end no scratch directory and no scratch cluster is left on the repository host;
the next drill must pass and leave none either (after a SIGKILL it removes what the dead one left).
The probe watches lab in both: neither may disturb the service.

`--operation migrate` does it to `invoke migrate --env lab --dsn D --phase expand|contract` (the phase drawn
each round; a contract with `--fleet` naming versions new enough) on a database of its own in a local
Postgres 15 cluster it starts (the lab's lock and records; no lab host is touched, so no probe): each round's
database is a copy (`CREATE DATABASE ... TEMPLATE`) of one seeded with `--rows` course_events on 0001's
schema, its expand run first for a contract round. After an orderly end: exit 130 (or 0), the lock free,
the record `interrupted`, and no statement of opsbook's still running in that database (a Ctrl-C must
cancel the backfill batch or index build it was in, not leave it running on the server). After any end,
a SIGKILL's too: the next run (a dead holder's lease waited out) must succeed and leave nothing pending in
the phase, no invalid index, no constraint left NOT VALID after a contract, and every record_response
event's student_uuid and kind filled.

Prints one row per round and every finding (a state that breaks what the README promises); exits 1
when there is a finding. Not part of the suite: its rounds are random by design (`--seed` repeats a
run's choices, not its timings). Touches only the lab (this machine's podman network). Leaves the
fleet on a release opsbook made.
"""

from __future__ import annotations

import argparse
import atexit
import os
import random
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import psycopg

from opsbook.core.inventory import load
from opsbook.core.paths import ROOT
from opsbook.engines import artifact, fleet
from opsbook.engines.clones import paths
from opsbook.engines.lock import lock_for
from opsbook.engines.migrations import plan as migration_plan
from opsbook.engines.probe import Probe, probe_url
from opsbook.engines.records.store import store_for
from opsbook.engines.snapshots import paths as snapshot_paths
from opsbook.engines.snapshots import pgbackrest as pgbr
from opsbook.engines.snapshots.lab import SCRATCH_PARENT

SIGNALS = {"int": (signal.SIGINT,), "int-twice": (signal.SIGINT, signal.SIGINT), "term": (signal.SIGTERM,),
           "kill": (signal.SIGKILL,)}
INVOKE = str(ROOT / ".venv" / "bin" / "invoke")


def invoke(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([INVOKE, *args], cwd=ROOT, capture_output=True, text=True, check=False, timeout=timeout)


RUN_TAG = "OPSBOOK_BENCH_RUN"   # in the environment of every run this bench starts, and so of its children


def ansible_left(tag: str) -> list[str]:
    """The ansible-playbook processes started by the run tagged `tag` still alive: those whose environment
    carries it (they inherit it), not another checkout's or another user's on this machine."""
    left = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            if "ansible-playbook" in cmdline and f"{RUN_TAG}={tag}".encode() in (proc / "environ").read_bytes():
                left.append(f"{proc.name} {cmdline}")
        except OSError:   # ended meanwhile, or not ours to read
            continue
    return left


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
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, RUN_TAG: tag})
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
    while ansible_left(tag) and time.monotonic() < deadline:
        time.sleep(0.5)
    if left := ansible_left(tag):
        f.append(f"ansible-playbook outlived it: {left[:2]}")
    if not ended_before and kind != "kill" and "Traceback (most recent call last)" in out:
        f.append("a Python traceback reached the operator: " + out.split("Traceback", 1)[1][:600])
    return ended_before, ended, proc.returncode, out, f


def orderly_end(kind: str, code: int | None, out: str, outcome: str, env) -> list[str]:
    """What every interrupted operation that ended by itself must leave: exit 130 (or 0 if it had finished),
    the environment's lock free (a drill takes none: free too), and a record that says interrupted when it
    exits 130."""
    f = []
    if code not in (0, 130):
        f.append(f"exit code {code} after {kind} (expected 130, or 0 if it had finished): " + out.strip()[-600:])
    if (holder := lock_for(env).holder()) is not None:
        f.append(f"{env.name}'s lock is still held after an orderly end: {holder}")
    if code == 130 and outcome not in ("interrupted", "no record"):
        f.append(f"exit 130 but the record says {outcome}")
    return f


class Operation:
    """One kind of operation this bench interrupts: how to run it, what an orderly end must leave, and
    what the next run must converge to. `env` is the environment the probe watches."""

    runbook = ""
    watches_service = True   # the bench's probe watches `env`'s service while it runs

    def __init__(self, args: argparse.Namespace, env, lease: float) -> None:
        self.args, self.env, self.lease = args, env, lease

    def argv(self, r: int) -> list[str]:
        raise NotImplementedError

    def record_env(self):
        return self.env

    def records(self) -> list[dict]:
        return [e for e in store_for(self.record_env()).ledger() if e.get("runbook") == self.runbook]

    def prepare(self, seed: int) -> None:
        """Whatever a first run needs (versions built, a target released to)."""

    def after_orderly_end(self, kind: str, code: int | None, out: str, outcome: str) -> list[str]:
        return orderly_end(kind, code, out, outcome, self.record_env())

    def after_any_end(self, r: int, out: str) -> list[str]:
        """Checked after every round, a SIGKILL's too (before the next run)."""
        return []

    def step_of(self, out: str, record: dict | None) -> str:
        return "-"

    def span(self, r: int, length: float) -> float:
        """Round r's signal lands within this many seconds of its start (the first run's length, and a bit)."""
        return length * 1.1

    def round(self, r: int, kind: str, delay: float) -> tuple[str, int | None, str, str, list[str]]:
        """Start the operation, signal it after `delay` s; (ended, exit code, outcome, step, findings)."""
        before = len(self.records())
        ended_before, ended, code, out, f = signal_during(self.argv(r), kind, delay)
        recs = self.records()[before:]
        outcome = recs[-1].get("outcome") if recs else "no record"
        step = self.step_of(out, recs[-1] if recs else None)
        if not ended_before and kind != "kill":
            f += self.after_orderly_end(kind, code, out, outcome)
        f += self.after_any_end(r, out)
        return ended, code, outcome, step, f

    def wait_out_a_dead_holder(self) -> None:
        if lock_for(self.record_env()).holder() is not None:
            time.sleep(self.lease + 2)

    def converge(self, r: int) -> tuple[float, list[str]]:
        """The run after an interrupted one must succeed and leave what the README promises."""
        self.wait_out_a_dead_holder()
        t1 = time.monotonic()
        done = invoke(*self.next_argv(r))
        took = time.monotonic() - t1
        if done.returncode != 0:
            return took, [f"the next {self.runbook} failed (exit {done.returncode}): "
                          f"{(done.stdout + done.stderr).strip()[-800:]}"]
        return took, self.after_next(r)

    def next_argv(self, r: int) -> list[str]:
        return self.argv(r)[1:]

    def after_next(self, r: int) -> list[str]:
        return []


class Release(Operation):
    """A release of the other of two versions (or of a new one each round, `--new-versions`)."""

    runbook = "release"

    def prepare(self, seed: int) -> None:
        print(f"seed {seed}; building the versions to release ...", flush=True)
        self.versions = versions_to_use(self.env, self.args.new_versions, format(seed % 100000, "05d"),
                                        self.args.rounds)
        self.current = self.versions[0]

    def version(self, r: int) -> str:
        return self.versions[r] if self.args.new_versions else self.versions[r % 2]

    def argv(self, r: int) -> list[str]:
        return [INVOKE, "release", "--env", self.env.name, "--version", self.version(r)]

    def next_argv(self, r: int) -> list[str]:
        return [*self.argv(r)[1:], "--wait", str(int(self.lease) + 30)]

    def wait_out_a_dead_holder(self) -> None:
        """`release --wait` waits for the lease itself."""

    def step_of(self, out: str, record: dict | None) -> str:
        return ((record or {}).get("figures") or {}).get("interrupted_in") or "-"

    def after_orderly_end(self, kind, code, out, outcome) -> list[str]:
        f = orderly_end(kind, code, out, outcome, self.env)
        _versions, rot = lab_state(self.env)
        if down := {h: s for h, s in rot.items() if s != "UP"}:
            f.append(f"hosts left out of rotation after an orderly end: {down}")
        return f

    def after_any_end(self, r: int, out: str) -> list[str]:
        versions_now, _rot = lab_state(self.env)
        if odd := {h: v for h, v in versions_now.items() if v not in (self.current, self.version(r))}:
            return [f"hosts serving neither {self.current} nor {self.version(r)}: {odd}"]
        return []

    def converge(self, r: int) -> tuple[float, list[str]]:
        took, f = super().converge(r)
        if not f:
            self.current = self.version(r)
        return took, f

    def after_next(self, r: int) -> list[str]:
        target = self.version(r)
        versions, rot = lab_state(self.env)
        f = []
        if set(versions.values()) != {target}:
            f.append(f"after the next release the hosts serve {versions}")
        if any(s != "UP" for s in rot.values()):
            f.append(f"after the next release haproxy says {rot}")
        if lock_for(self.env).holder() is not None:
            f.append("the lock is held after the next release ended")
        return f


class Refresh(Operation):
    """`invoke staging.refresh --from ENV --to TO`; the probe watches the source, which it must not disturb."""

    runbook = "staging_refresh"

    def __init__(self, args, env, lease) -> None:
        super().__init__(args, env, lease)
        self.target = load(args.to)

    def record_env(self):
        return self.target

    def argv(self, r: int) -> list[str]:
        return [INVOKE, "staging.refresh", "--from", self.env.name, "--to", self.target.name]

    def prepare(self, seed: int) -> None:
        if not all(dict(fleet.served_versions(self.target)).values()):   # the refresh restarts app hosts that serve
            print(f"releasing to {self.target.name} first (its app hosts serve nothing yet) ...", flush=True)
            rel = invoke("release", "--env", self.target.name, "--wait", str(int(self.lease) + 30))
            if rel.returncode != 0:
                raise SystemExit(f"the release to {self.target.name} failed:\n{rel.stdout[-2000:]}{rel.stderr[-1500:]}")

    def state(self) -> tuple[str | None, list[str], list[str], bool]:
        """(the serving clone, every clone, the unfinished ones, whether the serving one runs)."""
        engine = paths.btrfs_refresh(self.env, self.target, log=lambda _m: None).engine
        current = engine.current()
        return current, engine.names(), engine.unfinished(), bool(current) and engine.running(current)

    def step_of(self, out: str, record: dict | None) -> str:
        return m.group(1) if (m := re.search(r"at step '([^']+)'", out)) else "-"

    def after_orderly_end(self, kind, code, out, outcome) -> list[str]:
        f = orderly_end(kind, code, out, outcome, self.target)
        current, _names, unfinished, running = self.state()
        if left := [n for n in unfinished if n != current]:
            f.append(f"an orderly end left unfinished clone(s) {left} (unmasked data)")
        if not running and "is NOT running" not in out:
            f.append(f"the serving clone {current} does not run, and the output does not say so")
        if running and not all((answers := staging_answers(self.target)).values()):
            f.append(f"{self.target.name}'s app hosts do not answer: {answers}")
        return f

    def after_next(self, r: int) -> list[str]:
        current, names, unfinished, running = self.state()
        f = []
        if not names or current != names[-1] or not running:
            f.append(f"after the next refresh: serving {current} (running: {running}), clones {names}")
        if unfinished:
            f.append(f"after the next refresh, unfinished clones remain: {unfinished}")
        if not all((answers := staging_answers(self.target)).values()):
            f.append(f"after the next refresh {self.target.name}'s app hosts do not answer: {answers}")
        return f


class _Snapshots(Operation):
    """What the snapshot and the drill share: the environment's pgBackRest repository host."""

    def __init__(self, args, env, lease) -> None:
        super().__init__(args, env, lease)
        self.path = snapshot_paths.for_env(env)

    def on_repo_host(self, pattern: str) -> list[str]:
        """Processes on the repository host whose command line matches `pattern` (pgrep -f)."""
        res = self.path.repo.host.run(["pgrep", "-af", pattern], check=False, timeout=60)
        return [line for line in res.out.splitlines() if line.strip() and "pgrep" not in line]

    def scratch_left(self) -> list[str]:
        return [" ".join(p) for p in pgbr._scratch_listing(self.path.repo, SCRATCH_PARENT)]

    def step_of(self, out: str, record: dict | None) -> str:
        said = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith(f"{self.env.name}: ")]
        return (said[-1][:40] if said else "-")

    def health(self) -> list[str]:
        """The repository takes WAL and the snapshots read: what every later snapshot needs."""
        f = []
        can, why = self.path.can_take()
        if not can:
            f.append(f"no snapshot can be taken now: {why}")
        try:
            pgbr._run(self.path.repo, "check", timeout=300)
        except Exception as e:  # noqa: BLE001 - any failure is the finding
            f.append(f"pgbackrest check fails: {e}")
        return f


class Snapshot(_Snapshots):
    """`invoke snapshot --env ENV`: a backup, its restore point and manifest, and retention."""

    runbook = "snapshot"

    def argv(self, r: int) -> list[str]:
        return [INVOKE, "snapshot", "--env", self.env.name, "--reason", f"interrupt bench round {r}"]

    def after_orderly_end(self, kind, code, out, outcome) -> list[str]:
        f = orderly_end(kind, code, out, outcome, self.env)
        if left := self.on_repo_host("pgbackrest.*backup"):
            f.append(f"a pgBackRest backup still runs after an orderly end: {left[:2]}")
        return f + self.health()

    def after_next(self, r: int) -> list[str]:
        snaps = self.path.list()
        f = []
        if incomplete := [s.id for s in snaps if s.ours and s.status == "incomplete"]:
            f.append(f"after the next snapshot, incomplete snapshots remain: {incomplete}")
        newest = next((s for s in snaps if s.ours), None)
        if newest is None or newest.status != "available" or newest.reason != f"interrupt bench round {r}":
            f.append(f"after the next snapshot the newest of opsbook's is {newest}")
        if (holder := lock_for(self.env).holder()) is not None:
            f.append(f"the lock is held after the next snapshot ended: {holder}")
        return f + self.health()


class Drill(_Snapshots):
    """`invoke snapshot.drill --env ENV` of the newest snapshot (one is taken first)."""

    runbook = "restore_drill"

    def argv(self, r: int) -> list[str]:
        return [INVOKE, "snapshot.drill", "--env", self.env.name]

    def prepare(self, seed: int) -> None:
        if not [s for s in self.path.list() if s.ours and s.status == "available"]:
            print(f"taking a snapshot of {self.env.name} first (none to drill) ...", flush=True)
            done = invoke("snapshot", "--env", self.env.name, "--reason", "interrupt bench")
            if done.returncode != 0:
                raise SystemExit(f"the snapshot failed:\n{done.stdout[-2000:]}{done.stderr[-1500:]}")

    def after_orderly_end(self, kind, code, out, outcome) -> list[str]:
        f = orderly_end(kind, code, out, outcome, self.env)   # and its scratch cluster removed
        if left := self.scratch_left():
            f.append(f"an orderly end left scratch directories on the repository host: {left}")
        if running := self.on_repo_host("postgres.*opsbook-drill-"):
            f.append(f"an orderly end left a scratch cluster running: {running[:2]}")
        return f

    def after_next(self, r: int) -> list[str]:
        f = []
        if left := self.scratch_left():
            f.append(f"after the next drill, scratch directories remain: {left}")
        if running := self.on_repo_host("postgres.*opsbook-drill-"):
            f.append(f"after the next drill, a scratch cluster runs: {running[:2]}")
        return f + self.health()


class Migrate(Operation):
    """`invoke migrate --env E --dsn D` on a local database seeded with --rows events: expand, or contract
    after the expand, drawn each round. Touches no lab host: the service is not watched."""

    runbook = "migrate"
    watches_service = False
    CONTRACT_FLEET = "app1=1.1.0,app2=1.1.0,app3=1.1.0"   # what the contract gate needs (>= 1.1.0)

    def prepare(self, seed: int) -> None:
        import migrations_bench  # its local cluster and its seeding, shared (a sibling of this file)

        self.mb = mb = migrations_bench
        self.rng = random.Random(seed ^ 0x5EED)
        self.server, stop = mb.start_postgres()
        atexit.register(stop)
        print(f"seed {seed}; seeding {self.args.rows:,} course_events on 0001's schema in a local Postgres ...",
              flush=True)
        mb.seed(self.server, self.args.rows)   # bench_online: 0001 and the rows
        self.phases: dict[int, str] = {}
        self.contract_s: float | None = None
        self.round_db(0)

    def dsn(self, r: int) -> str:
        return self.mb.db(self.server, f"mig_r{r}")

    def round_db(self, r: int) -> None:
        """Round r's database, a copy of the seeded one; its expand run first when the round contracts."""
        self.phases[r] = self.rng.choice(("expand", "contract")) if r else "expand"
        with psycopg.connect(self.server, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS mig_r{r} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE mig_r{r} TEMPLATE bench_online")
        if self.phases[r] == "contract":
            done = invoke("migrate", "--env", self.env.name, "--dsn", self.dsn(r))
            if done.returncode != 0:
                raise SystemExit(f"the expand before round {r}'s contract failed:\n{done.stdout[-2000:]}")

    def span(self, r: int, length: float) -> float:
        """Within the drawn phase's own length: the first run's for an expand, a contract's timed once."""
        if r not in self.phases:
            self.round_db(r)
        if self.phases[r] == "expand":
            return length * 1.1
        if self.contract_s is None:   # round 0's database was expanded by the first run
            t0 = time.monotonic()
            done = invoke(*self.argv(0)[1:-2], "--phase", "contract", "--fleet", self.CONTRACT_FLEET)
            if done.returncode != 0:
                raise SystemExit(f"a first contract failed:\n{done.stdout[-2000:]}{done.stderr[-1500:]}")
            self.contract_s = time.monotonic() - t0
            print(f"a contract took {self.contract_s:.1f} s; contract rounds' signals land within "
                  f"{self.contract_s * 1.1:.1f} s", flush=True)
        return self.contract_s * 1.1

    def argv(self, r: int) -> list[str]:
        if r not in self.phases:
            self.round_db(r)
        phase = self.phases[r]
        return [INVOKE, "migrate", "--env", self.env.name, "--dsn", self.dsn(r), "--phase", phase,
                *(["--fleet", self.CONTRACT_FLEET] if phase == "contract" else [])]

    def step_of(self, out: str, record: dict | None) -> str:
        return self.phases.get(self.last_round, "-")

    def round(self, r: int, kind: str, delay: float):
        self.last_round = r
        return super().round(r, kind, delay)

    def still_running(self, r: int) -> list[str]:
        """Statements still running in round r's database (only the operation connects to it; this check's
        own session is left out)."""
        with psycopg.connect(self.server, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT application_name, state, left(query, 120) FROM pg_stat_activity WHERE datname = %s "
                "AND pid <> pg_backend_pid() AND state <> 'idle'", (f"mig_r{r}",)).fetchall()
        return [f"{a or '?'} ({st}): {q}" for a, st, q in rows]

    def after_orderly_end(self, kind, code, out, outcome) -> list[str]:
        f = orderly_end(kind, code, out, outcome, self.env)
        deadline = time.monotonic() + 5   # a cancel takes effect at the server's next check
        while (left := self.still_running(self.last_round)) and time.monotonic() < deadline:
            time.sleep(0.5)
        if left:
            f.append(f"statements still running in the database 5 s after an orderly end: {left[:3]}")
        return f

    def after_next(self, r: int) -> list[str]:
        phase, dsn = self.phases[r], self.dsn(r)
        f = []
        p = migration_plan(dsn, ROOT / "app" / "migrations", phase, gate=False)
        if p.pending:
            f.append(f"after the next {phase}, {len(p.pending)} step(s) still pending: "
                     f"{[(s.migration, s.key) for s in p.pending][:4]}")
        with psycopg.connect(dsn, autocommit=True) as conn:
            invalid = conn.execute("SELECT indexrelid::regclass::text FROM pg_index WHERE NOT indisvalid "
                                   "OR NOT indisready").fetchall()
            if invalid:
                f.append(f"invalid index(es) left: {[i for (i,) in invalid]}")
            if phase == "contract":
                unvalidated = conn.execute("SELECT conname FROM pg_constraint WHERE NOT convalidated").fetchall()
                if unvalidated:
                    f.append(f"constraint(s) left NOT VALID after the contract: {[c for (c,) in unvalidated]}")
            unfilled = conn.execute(
                "SELECT count(*) FROM course_events WHERE data ? 'student_uuid' AND (student_uuid IS NULL "
                "OR student_uuid <> (data->>'student_uuid')::uuid OR kind IS NULL)").fetchone()[0]
            if unfilled:
                f.append(f"{unfilled} event(s) with student_uuid or kind not filled after the next {phase}")
            rows = conn.execute("SELECT count(*) FROM course_events").fetchone()[0]
            if rows != self.args.rows:
                f.append(f"course_events holds {rows:,} rows, seeded {self.args.rows:,}")
        if r > 1:   # the round before's database: keep the disk for the next rounds
            with psycopg.connect(self.server, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS mig_r{r - 1} WITH (FORCE)")
        return f


OPERATIONS = {"release": Release, "refresh": Refresh, "snapshot": Snapshot, "drill": Drill, "migrate": Migrate}


def staging_answers(target, within: float = 20.0) -> dict[str, str | None]:
    """Each of the target's app hosts' version, waited for (an interrupt may come while they restart)."""
    deadline = time.monotonic() + within
    while True:
        versions = dict(fleet.served_versions(target))
        if all(versions.values()) or time.monotonic() > deadline:
            return versions
        time.sleep(1)


def parse() -> tuple[argparse.Namespace, int, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--operation", choices=tuple(OPERATIONS), default="release",
                    help="what to interrupt: a release, a snapshot, a restore drill or a migration (on a local "
                         "database, --env's lock and records) of --env, or a staging refresh from --env to --to")
    ap.add_argument("--env", default="lab")
    ap.add_argument("--to", default="lab-staging", help="the refresh's target (--operation refresh)")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--rate", type=float, default=20.0, help="this bench's own probe, requests/s")
    ap.add_argument("--rows", type=int, default=300_000, help="course_events seeded (--operation migrate)")
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


def first_run(op: Operation, seed: int) -> float:
    """A first run, timed: the moments are drawn from its length."""
    op.prepare(seed)
    t0 = time.monotonic()
    done = invoke(*op.next_argv(0))
    length = time.monotonic() - t0
    what = " ".join(op.next_argv(0))
    if done.returncode != 0:
        raise SystemExit(f"`invoke {what}` failed; fix the lab first:\n{done.stdout[-2000:]}{done.stderr[-1500:]}")
    print(f"seed {seed}; `invoke {what}` took {length:.1f} s; signals land 0 to {length * 1.1:.1f} s after a start",
          flush=True)
    return length


def summary(seed: int, env, operation: str, results, *, ends: dict[str, list[float]], findings: list[str]) -> int:
    if results is None:
        print(f"\nseed {seed}: no probe ({operation} touches no service)")
    else:
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
    # SIGINT as an operator's terminal has it, for this bench and the operations it starts: one started in
    # the background (`cmd &` in a script) inherits SIGINT ignored, which opsbook rightly keeps ignored, and
    # its Ctrl-C rounds would test nothing (seen: a snapshot sent SIGINT twice ran on and succeeded).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    rng = random.Random(seed)
    env = load(args.env)
    op = OPERATIONS[args.operation](args, env, float(env.var("opsbook_lock_lease_seconds")))
    length = first_run(op, seed)
    probe = Probe(probe_url(env), rate=args.rate, max_seconds=3600).start("before") if op.watches_service else None
    findings: list[str] = []
    ends: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        for r in range(1, args.rounds + 1):
            kind, delay = rng.choice(kinds), rng.uniform(0, op.span(r, length))
            if probe:
                probe.mark(f"round {r}")
            ended, code, outcome, step, f = op.round(r, kind, delay)
            took, g = op.converge(r)
            f += g
            ph = probe.results().phase(f"round {r}") if probe else {"requests": 0, "failed": 0}
            if ph["failed"]:
                f.append(f"the bench's probe saw {ph['failed']} failed request(s) on {env.name} in this round")
            if ended != "before":
                ends[kind].append(float(ended[:-1]))
            print(f"round {r:2d}: {kind:9s} at {delay:5.1f}s  ended {ended:>7s}  exit {code!s:>4s}  "
                  f"record {outcome} ({step})  next {args.operation} {took:5.1f}s  probe {ph['requests']} req "
                  f"{ph['failed']} failed  findings {len(f)}", flush=True)
            findings += [f"round {r} ({kind} at {delay:.1f} s, {step if step != '-' else outcome}): {x}" for x in f]
    finally:
        results = None
        if probe:
            probe.mark("after")
            results = probe.stop()
    return summary(seed, env, args.operation, results, ends=ends, findings=findings)


if __name__ == "__main__":
    raise SystemExit(main())
