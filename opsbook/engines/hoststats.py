"""CPU and memory read from the hosts themselves while something runs, and from this machine.

``RemoteSampling.start(env, pattern, seconds)`` leaves a small shell loop on each host (one Ansible
``raw`` call for all of them) that prints a line a second into ``/run/opsbook-sampler-<id>.log``:

    <epoch> <cgroup cpu usec or -> <cpu ticks of every process> <rss bytes of every process>
    <machine busy ticks> <machine total ticks> <MemTotal kB> <MemAvailable kB> <cgroup memory bytes or ->
    (nine fields; numbers printed whole, never in awk's exponent form)

``collect()`` reads the logs back and stops the loops (a second ``raw`` call, by the pid each loop
wrote). In the lab each host is a container on this machine: ``/proc/stat`` there is the machine's,
so a host's own CPU is its cgroup's usage (or, without a readable cgroup, the sum over its processes,
which the pid namespace makes the container's); on an EC2 host the two agree. Sampling costs each
host a few forks a second and adds no Ansible run while the load is on.

``MachineSampler`` reads this machine's ``/proc/stat`` (every lab host and the load generator share
its cores) and, given a conninfo, the database's activity (``opsbook.engines.database.activity``),
in a thread.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

SAMPLER = r"""
echo $$ > {pid}
end=$(( $(date +%s) + {seconds} ))
hz=$(getconf CLK_TCK 2>/dev/null || echo 100)
echo "H $hz $(nproc)"
while [ "$(date +%s)" -lt "$end" ]; do
  t=$(date +%s.%N)
  cg=$(awk '/^usage_usec/ {{printf "%.0f", $2}}' /sys/fs/cgroup/cpu.stat 2>/dev/null)
  [ -n "$cg" ] || cg=$(awk '{{printf "%.0f", $1/1000}}' /sys/fs/cgroup/cpuacct/cpuacct.usage 2>/dev/null)
  ps=$(cat /proc/[0-9]*/stat 2>/dev/null |
     awk '{{sub(/^.*\) /, ""); u+=$12+$13; r+=$22}} END {{printf "%.0f %.0f", u, r*4096}}')
  st=$(awk '/^cpu / {{b=$2+$3+$4+$7+$8+$9; printf "%.0f %.0f", b, b+$5+$6}}' /proc/stat)
  mem=$(awk '/^MemTotal:/ {{t=$2}} /^MemAvailable:/ {{a=$2}} END {{printf "%.0f %.0f", t, a}}' /proc/meminfo)
  mc=$(cat /sys/fs/cgroup/memory.current 2>/dev/null || cat /sys/fs/cgroup/memory/memory.usage_in_bytes 2>/dev/null)
  echo "$t ${{cg:--}} $ps $st $mem ${{mc:--}}"
  sleep {every}
done
"""


@dataclass
class HostSample:
    t: float
    cgroup_usec: int | None
    proc_ticks: int
    rss_bytes: int
    machine_busy: int
    machine_total: int
    mem_total_kb: int
    mem_available_kb: int
    cgroup_mem: int | None


@dataclass
class HostSeries:
    host: str
    hz: int = 100
    cpus: int = 1
    samples: list[HostSample] = field(default_factory=list)
    problem: str = ""


def parse(host: str, text: str) -> HostSeries:
    series = HostSeries(host)
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "H" and len(parts) >= 3:
            series.hz, series.cpus = int(parts[1]), int(parts[2])
            continue
        if len(parts) != 9:
            continue
        try:
            t = float(parts[0])
            series.samples.append(HostSample(
                t, None if parts[1] == "-" else int(parts[1]), int(parts[2]), int(parts[3]), int(parts[4]),
                int(parts[5]), int(parts[6]), int(parts[7]), None if parts[8] == "-" else int(parts[8])))
        except ValueError:
            continue
    if not series.samples:
        series.problem = "no samples"
    return series


def host_window(series: HostSeries, start: float, end: float, *, container: bool) -> dict[str, Any] | None:
    """A host's CPU (cores it used, and that as a share of what it may use) and memory over [start, end]."""
    inside = [s for s in series.samples if start <= s.t <= end]
    if len(inside) < 2:
        near = sorted(series.samples, key=lambda s: abs(s.t - (start + end) / 2))[:2]
        inside = sorted(near, key=lambda s: s.t)
    if len(inside) < 2 or inside[-1].t <= inside[0].t:
        return None
    a, b = inside[0], inside[-1]
    dt = b.t - a.t
    if a.cgroup_usec is not None and b.cgroup_usec is not None:
        cores, source = (b.cgroup_usec - a.cgroup_usec) / 1e6 / dt, "cgroup"
    else:
        cores, source = (b.proc_ticks - a.proc_ticks) / series.hz / dt, "processes"
    machine = (b.machine_busy - a.machine_busy) / max(1, b.machine_total - a.machine_total)
    if not container:   # a host of its own: /proc/stat is the host
        cores, source = machine * series.cpus, "/proc/stat"
    mem = b.cgroup_mem if b.cgroup_mem is not None else (b.rss_bytes if container else
                                                         (b.mem_total_kb - b.mem_available_kb) * 1024)
    return {"cpu_cores": round(max(cores, 0.0), 3), "cpu_share": round(max(cores, 0.0) / series.cpus, 3),
            "cpu_source": source, "memory_mb": round(mem / 1e6, 1), "cpus": series.cpus}


class RemoteSampling:
    """Per-host samplers left running on the hosts (see the module doc)."""

    def __init__(self, env, pattern: str, run_id: str, hosts: list[str]):
        self.env, self.pattern, self.run_id, self.hosts = env, pattern, run_id, hosts
        self.started: dict[str, bool] = {}
        self.problem = ""

    @classmethod
    def start(cls, env, pattern: str = "all", seconds: float = 600, every: float = 1.0) -> RemoteSampling:
        from opsbook.engines import ansible

        run_id = uuid.uuid4().hex[:12]
        hosts = [h.name for h in env.hosts(pattern)]
        me = cls(env, pattern, run_id, hosts)
        log, pid = me._paths()
        script = SAMPLER.format(seconds=int(seconds) + 5, every=every, pid=pid)
        # Its own session (setsid -f), hangups ignored (nohup: the SSH session's pty closes at once, maybe
        # before the child has left it). The loop writes its pid (its process group) for `collect`.
        command = (f"nohup setsid -f sh -c '{script.replace(chr(39), chr(39) + chr(92) + chr(39) + chr(39))}' "
                   f"> {log} 2>/dev/null < /dev/null; echo started")
        answers = ansible.raw(env, pattern, command)
        me.started = {h: bool(a and a[0] == 0 and "started" in a[1]) for h, a in answers.items()}
        missing = [h for h, ok in me.started.items() if not ok]
        if missing:
            me.problem = f"no sampler on {', '.join(missing)} (did not answer)"
        return me

    def _paths(self) -> tuple[str, str]:
        return f"/run/opsbook-sampler-{self.run_id}.log", f"/run/opsbook-sampler-{self.run_id}.pid"

    def collect(self) -> dict[str, HostSeries]:
        """Read every host's samples and stop its loop (by the pid it wrote); remove its files."""
        from opsbook.engines import ansible

        log, pid = self._paths()
        command = (f"cat {log} 2>/dev/null; [ -s {pid} ] && kill -TERM -$(cat {pid}) 2>/dev/null; "
                   f"rm -f {log} {pid}; true")
        answers = ansible.raw(self.env, self.pattern, command)
        out = {}
        for host in self.hosts:
            a = answers.get(host)
            out[host] = parse(host, a[1]) if a else HostSeries(host, problem="did not answer")
        return out


class MachineSampler:
    """This machine's CPU (/proc/stat) and, given a conninfo, the database's activity, sampled in a thread."""

    def __init__(self, conninfo: str | None = None, every: float = 1.0):
        self.conninfo = conninfo
        self.every = every
        self.cpu: list[tuple[float, int, int]] = []           # (epoch, busy, total)
        self.db: list[tuple[float, dict[str, int]]] = []
        self.db_problem = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.cores = os.cpu_count() or 1

    @staticmethod
    def read_cpu() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        busy = fields[0] + fields[1] + fields[2] + sum(fields[5:8])
        return busy, busy + fields[3] + fields[4]

    def start(self) -> MachineSampler:
        self._thread = threading.Thread(target=self._loop, name="opsbook-machine-sampler", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        conn = None
        if self.conninfo:
            import psycopg

            try:
                conn = psycopg.connect(self.conninfo, autocommit=True, application_name="opsbook-scale-sampler")
            except psycopg.Error as e:
                self.db_problem = f"database not sampled: {str(e).strip()[:200]}"
        from opsbook.engines import database

        try:
            while not self._stop.is_set():
                t = time.time()
                self.cpu.append((t, *self.read_cpu()))
                if conn is not None:
                    try:
                        self.db.append((t, database.activity(conn)))
                    except Exception as e:  # noqa: BLE001 - a sampling failure is reported, never fatal
                        self.db_problem = f"database sampling stopped: {type(e).__name__}: {str(e)[:200]}"
                        conn = None
                self._stop.wait(self.every)
        finally:
            if conn is not None:
                conn.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.cpu.append((time.time(), *self.read_cpu()))

    def machine_cpu(self, start: float, end: float) -> float | None:
        """Share of this machine's CPU that was busy over [start, end] (0..1)."""
        before = [c for c in self.cpu if c[0] <= start] or self.cpu[:1]
        after = [c for c in self.cpu if c[0] >= end] or self.cpu[-1:]
        if not before or not after or after[0][0] <= before[-1][0]:
            return None
        a, b = before[-1], after[0]
        return round((b[1] - a[1]) / max(1, b[2] - a[2]), 3)

    def database(self, start: float, end: float) -> dict[str, Any] | None:
        from opsbook.engines import database

        return database.activity_between(self.db, start, end)
