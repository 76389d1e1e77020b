"""Release time against fleet size: 3 app hosts, then N (default 9), in the same number of batches.

    ./run python bench/release_scaling.py [--hosts 9] [--batches 3]

The goal (issue 10): a release's time grows with its batches, not its hosts; with 9 app hosts in
3 batches a release takes at most 1.5x the 3-host release (3 batches of 1). Both are measured in
one run, on the same machine, each as an operator runs it (`invoke release --env E --version V`),
each a release of a version the fleet does not serve yet, after a release that converged it:

1. the lab as its inventory says (3 app hosts): a release of version A, then the measured one of B;
2. the lab with app hosts up to N: an inventory of its own (environment `labscale`, a copy of the
   lab's with app4.. added at the next addresses of the lab's subnet, found through
   OPSBOOK_INVENTORY_PATH: the repository's inventories are not touched), whose extra hosts
   the lab engine's `up` creates and `invoke provision` converges (db1 must admit them); a release of A,
   then the measured one of B with `--batch N/batches`.

Prints each measured release's wall time, its record's phases and batches, failed requests and
lost writes, the machine's CPU over it (every process of this machine, the lab's hosts included: they
are containers on it) and the ratio. On this machine every host shares the same cores, so a release
cannot take less wall time than its CPU divided by the cores: that floor is printed too. Never
pass/fail. Touches only the lab (this machine's podman network).
At the end the extra hosts are removed, the lab is provisioned with its own inventory (lb1 back to
its backends, db1 to its clients) and released A, so it is left as its inventory says, serving a
release opsbook made.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from opsbook.core.inventory import INVENTORIES, INVENTORY_PATH_VARIABLE, load
from opsbook.core.paths import ROOT
from opsbook.engines import artifact
from opsbook.engines.hoststats import MachineSampler
from opsbook.engines.records import ledger
from opsbook.engines.records.store import store_for

SCALED = "labscale"


def machine_cpu_s() -> float:
    """CPU seconds this machine has spent busy since boot (every process and container)."""
    busy, _total = MachineSampler.read_cpu()
    return busy / os.sysconf("SC_CLK_TCK")


def invoke(*args: str, extra_env: dict[str, str] | None = None) -> float:
    """Run an invoke task as an operator does; returns its wall time, exits on failure."""
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ.get('PATH', '')}", **(extra_env or {})}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, check=False, timeout=1800)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"`invoke {' '.join(args)}` exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-2000:]}")
    return wall


def scaled_inventory(root: Path, hosts: int) -> tuple[Path, list[str]]:
    """A copy of the lab's inventory named SCALED with app hosts app1..app<hosts>; returns its
    directory's parent (for OPSBOOK_INVENTORY_PATH) and the names of the hosts it adds."""
    lab = load("lab")
    inv = root / SCALED
    shutil.copytree(INVENTORIES / "lab", inv)
    doc = yaml.safe_load((inv / "hosts.yml").read_text())
    apps = doc["all"]["children"]["app"]["hosts"]
    subnet = ipaddress.ip_network(lab.var("opsbook_lab_subnet"))
    taken = {h.address for h in lab.hosts()}
    last = max(ipaddress.ip_address(a["ansible_host"]) for a in apps.values())
    added = []
    n = len(apps)
    while len(apps) < hosts:
        n += 1
        last += 1
        while str(last) in taken:
            last += 1
        if last not in subnet:
            raise SystemExit(f"no free address for app{n} in the lab's subnet {subnet}")
        apps[f"app{n}"] = {"ansible_host": str(last)}
        added.append(f"app{n}")
    (inv / "hosts.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    # The lab's paths are relative to its inventory's place in the repository: the same lab directory
    # (keys, secrets, and the lock: one fleet, one lock), records of their own.
    main = inv / "group_vars" / "all" / "main.yml"
    text = main.read_text()
    for old, new in (('"{{ inventory_dir }}/../../.lab"', f'"{ROOT / ".lab"}"'),
                     ('"{{ inventory_dir }}/../../records/lab"', f'"{ROOT / "records" / SCALED}"')):
        if old not in text:
            raise SystemExit(f"the lab's inventory no longer says {old}; this bench needs updating")
        text = text.replace(old, new)
    main.write_text(text)
    return root, added


def measured(env_name: str, version: str, extra_env: dict[str, str] | None = None, *args: str) -> dict:
    cpu0 = machine_cpu_s()
    wall = invoke("release", "--env", env_name, "--version", version, *args, extra_env=extra_env)
    cpu = machine_cpu_s() - cpu0
    if extra_env:
        os.environ.update(extra_env)
    rec = ledger.releases(store_for(load(env_name)).ledger())[-1]
    figs = rec["figures"]
    return {"env": env_name, "wall_s": wall, "cpu_s": cpu, "record": rec["id"], "hosts": figs.get("hosts"),
            "batches": figs.get("batches"), "duration_s": figs.get("duration_s"),
            "phases": figs.get("phase_seconds") or {}, "failed": figs.get("failed_requests"),
            "lost": figs.get("missing_acknowledged_writes")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=9, help="app hosts of the scaled fleet (more than 3)")
    ap.add_argument("--batches", type=int, default=3, help="batches of the scaled release")
    args = ap.parse_args()
    lab = load("lab")
    base = len(lab.hosts("app"))
    if args.hosts <= base or args.batches < 1 or args.hosts % args.batches:
        raise SystemExit(f"--hosts must exceed the lab's {base} app hosts and divide into --batches")
    stem = artifact.default_version()
    a, b = f"{stem}.sa", f"{stem}.sb"
    for v in (a, b):
        artifact.build(v, log=lambda _m: None)
    print(f"[bench] {base} app hosts: release {a} (not measured), then {b}", flush=True)
    invoke("release", "--env", "lab", "--version", a)
    small = measured("lab", b)
    tmp = Path(tempfile.mkdtemp(prefix="opsbook-scaling-"))
    path, added = scaled_inventory(tmp, args.hosts)
    scaled_env = {INVENTORY_PATH_VARIABLE: str(path)}
    from opsbook.engines import lab as labs

    try:
        print(f"[bench] {args.hosts} app hosts (adding {', '.join(added)}): lab.up, release {a} (converges every "
              f"host; not measured), then {b} in {args.batches} batches", flush=True)
        os.environ.update(scaled_env)
        labs.up(load(SCALED))   # `invoke lab.up` manages the default lab; this creates the extra hosts
        # Every host, db1 included: its firewall and pg_hba must admit the new app hosts (a release
        # converges a database host only when it was never provisioned).
        invoke("provision", "--env", SCALED, extra_env=scaled_env)
        invoke("release", "--env", SCALED, "--version", a, "--batch", str(args.hosts // args.batches),
               extra_env=scaled_env)
        large = measured(SCALED, b, scaled_env, "--batch", str(args.hosts // args.batches))
    finally:
        for name in added:
            labs._remove(f"opsbook-lab-{name}")
        os.environ.pop(INVENTORY_PATH_VARIABLE, None)
        print(f"[bench] removed {', '.join(added)}; provisioning the lab with its own inventory and releasing {a}",
              flush=True)
        invoke("provision", "--env", "lab")
        invoke("release", "--env", "lab", "--version", a)
        shutil.rmtree(tmp, ignore_errors=True)
    cores = os.cpu_count() or 1
    print(f"\n{'fleet':<16} {'wall s':>7} {'record s':>8} {'cpu s':>6} {'floor s':>7} {'failed':>6} {'lost':>4}  "
          f"phases")
    for r in (small, large):
        phases = ", ".join(f"{k} {v:.1f}" for k, v in r["phases"].items())
        print(f"{r['hosts']} hosts/{r['batches']} batches {r['wall_s']:>5.1f} {r['duration_s']:>8.1f} "
              f"{r['cpu_s']:>6.1f} {r['cpu_s'] / cores:>7.1f} {r['failed']!s:>6} {r['lost']!s:>4}  {phases}")
    print(f"\n(cpu s: this machine's CPU over the release, the lab's hosts included; floor s: that CPU over its "
          f"{cores} cores, the least wall time it allows here)")
    print(f"\n{args.hosts} hosts / {base} hosts: {large['wall_s'] / small['wall_s']:.2f}x from the command "
          f"({large['duration_s'] / small['duration_s']:.2f}x by the records; "
          f"CPU {large['cpu_s'] / small['cpu_s']:.2f}x); "
          f"goal <= 1.5x")


if __name__ == "__main__":
    main()
