"""CPU per 1,000 requests of bl-api (gunicorn workers) and of Postgres, A/B between versions of app/.

    ./run python bench/app_cpu.py --variant base=main --variant new=. [--mix biglearn] [--rate 1500]
                                  [--seconds 20] [--rounds 3] [--workers 2] [--threads 8]
                                  [--pg SETTING=VALUE ...] [--env-of new:BL_API_THREADS=4] [--contract-of new]

Everything runs on loopback: one throwaway, durable Postgres 15 cluster under /tmp (fsync, full_page_writes
and synchronous_commit on; --pg adds settings), and per variant a fresh database with app/migrations
applied and a gunicorn on 127.0.0.1 serving that variant's app/ (`.` is this checkout, anything else a git
ref whose app/ is exported). The load is opsbook's own open-model generator at a fixed rate. The figure is
CPU seconds (user + system, read from /proc, reaped children included) of the gunicorn process tree and of
the Postgres cluster's process tree per 1,000 answered requests: wall-clock throughput on a shared machine
is noise, CPU per request is not. Variants are interleaved round by round so drift hits each alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psycopg

from opsbook.engines import load
from opsbook.engines.migrations import apply_pending
from opsbook.engines.snapshots.pgbackrest import free_port, local_run_as  # the engine's own

ROOT = Path(__file__).resolve().parent.parent
PG_BIN = Path("/usr/lib/postgresql/15/bin")
TICK = os.sysconf("SC_CLK_TCK")


def as_postgres(cmd: list[str]) -> list[str]:
    return [*local_run_as(), *cmd]


def stat(pid: int) -> tuple[int, float] | None:
    """(ppid, cpu seconds incl. reaped children) of a process, None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = raw[raw.rindex(")") + 2:].split()
    return int(f[1]), sum(int(x) for x in f[11:15]) / TICK


def tree_cpu(root: int) -> float:
    """CPU seconds of `root` and its live descendants (exited ones are in their parent's cutime)."""
    procs = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            s = stat(int(d))
            if s:
                procs[int(d)] = s
    total, todo = 0.0, [root]
    while todo:
        p = todo.pop()
        if p in procs:
            total += procs[p][1]
            todo.extend(c for c, (pp, _) in procs.items() if pp == p)
    return total


class Cluster:
    def __init__(self, settings: list[str]):
        self.base = Path(tempfile.mkdtemp(prefix="appcpu-pg-"))
        self.data = self.base / "data"
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres", "postgres")
        self.port = free_port()
        subprocess.run(as_postgres([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                                    "-E", "UTF8"]), check=True, capture_output=True)
        # The lab role's settings (roles/postgres/defaults) plus the caller's; durability left at its defaults.
        opts = ["listen_addresses=127.0.0.1", f"port={self.port}", f"unix_socket_directories={self.base}",
                "max_connections=200", "shared_buffers=256MB", *settings]
        subprocess.run(as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data),
                                    "-o", " ".join(f"-c {o}" for o in opts), "-l", str(self.base / "log"),
                                    "-w", "start"]), check=True, capture_output=True)
        self.conninfo = f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])

    def database(self) -> str:
        name = "b_" + uuid.uuid4().hex[:10]
        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.conninfo.replace("dbname=postgres", f"dbname={name}")

    def stop(self) -> None:
        subprocess.run(as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"]),
                       check=False, capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)


def export_app(ref: str, into: Path) -> Path:
    if ref == ".":
        return ROOT / "app"
    dest = into / ref.replace("/", "_")
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "app"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "app"


class Gunicorn:
    def __init__(self, app_dir: Path, conninfo: str, env: dict[str, str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        e = {k: v for k, v in os.environ.items() if not k.startswith("BL_API_")}
        e.update({"PYTHONPATH": str(app_dir), "DATABASE_URL": conninfo, "BL_API_BIND": f"127.0.0.1:{self.port}",
                  "BL_API_ACCESS_LOG": "0", **env})
        self.proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "python:bl_api.gunicorn_conf",
                                      "bl_api.wsgi:app"], env=e, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                                     cwd=app_dir)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/ping", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"gunicorn for {app_dir} not ready; see {log}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=40)


def drive(url: str, mix: str, rate: float, seconds: float, courses: list[str]) -> tuple[int, int, float | None]:
    m = load.mix_named(mix)
    plan = load.LoadPlan(base_url=url, steps=load.make_steps([rate], seconds, m), mix=mix, courses=courses,
                         max_seconds=seconds + 5, timeout_s=10, max_in_flight=128)
    result = load.run(plan)
    Path(result.acknowledged_file).unlink(missing_ok=True)   # not counted here: the bench measures CPU
    s = result.steps[0]
    return s.ok, s.error_count, s.p99_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", required=True, help="name=ref (. for this checkout)")
    ap.add_argument("--env-of", action="append", default=[], help="name:KEY=VALUE for that variant's gunicorn")
    ap.add_argument("--mix", default="biglearn")
    ap.add_argument("--rate", type=float, default=1500, help="responses/s offered")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", default="2")
    ap.add_argument("--threads", default="8")
    ap.add_argument("--courses", type=int, default=50)
    ap.add_argument("--contract-of", action="append", default=[],
                    help="name: that variant's database also gets the migrations' contract phase")
    ap.add_argument("--pg", action="append", default=[], help="extra postgres setting KEY=VALUE")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="appcpu-"))
    cluster = Cluster(args.pg)
    services = {}
    try:
        for spec in args.variant:
            name, ref = spec.split("=", 1)
            env = {"BL_API_WORKERS": args.workers, "BL_API_THREADS": args.threads, "BL_API_POOL_MAX": "10"}
            for e in args.env_of:
                who, kv = e.split(":", 1)
                if who == name:
                    k, v = kv.split("=", 1)
                    env[k] = v
            app_dir = export_app(ref, work)
            conninfo = cluster.database()
            apply_pending(conninfo, ROOT / "app" / "migrations", log=lambda _m: None)
            if name in args.contract_of:
                from opsbook.engines.migrations.engine import run as migrate  # the fleet: this one gunicorn

                migrate(conninfo, ROOT / "app" / "migrations", "contract", fleet_versions={"local": "1.1.0"})
            g = Gunicorn(app_dir, conninfo, env, work / f"{name}.log")
            courses = [str(uuid.uuid4()) for _ in range(args.courses)]
            drive(g.url, args.mix, args.rate / 3, 4, courses)   # warm-up: pools filled, courses created
            services[name] = (g, courses, env)
        figures: dict[str, list[tuple[float, float]]] = {n: [] for n in services}
        print(f"mix {args.mix}, {args.rate:g} responses/s offered for {args.seconds:g} s, "
              f"pg {args.pg or 'defaults'}", flush=True)
        for rnd in range(1, args.rounds + 1):
            for name, (g, courses, _env) in services.items():
                a0, p0 = tree_cpu(g.proc.pid), tree_cpu(cluster.pid)
                ok, errors, p99 = drive(g.url, args.mix, args.rate, args.seconds, courses)
                a1, p1 = tree_cpu(g.proc.pid), tree_cpu(cluster.pid)
                app_ms, pg_ms = (a1 - a0) / ok * 1000, (p1 - p0) / ok * 1000
                figures[name].append((app_ms, pg_ms))
                print(f"round {rnd} {name:>10}: {ok:6d} ok {errors:3d} err  app {app_ms:6.3f} s/1000req  "
                      f"pg {pg_ms:6.3f} s/1000req  p99 {p99 or 0:7.1f} ms  load {os.getloadavg()[0]:.1f}",
                      flush=True)
        print("\nmedian CPU seconds per 1,000 requests (= ms per request):")
        for name, rows in figures.items():
            apps, pgs = [r[0] for r in rows], [r[1] for r in rows]
            print(f"  {name:>10}: app {statistics.median(apps):.3f} (min {min(apps):.3f} max {max(apps):.3f})  "
                  f"pg {statistics.median(pgs):.3f} (min {min(pgs):.3f} max {max(pgs):.3f})  {services[name][2]}")
    finally:
        for g, _, _ in services.values():
            g.stop()
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
