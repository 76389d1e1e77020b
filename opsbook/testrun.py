"""The whole test suite, as CI runs it: lab up, then pytest over tests/ (unit, integration, infra)."""

from __future__ import annotations

import subprocess
import sys

from opsbook import ROOT
from opsbook.release import ansible_env


def run_suite(k: str | None = None, bring_lab_up: bool = True) -> int:
    if bring_lab_up:
        from opsbook import lab

        print("[test] bringing the lab up (hosts the suite releases to and checks)", flush=True)
        lab.up()
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--durations=15"]
    if k:
        cmd += ["-k", k]
    code = subprocess.run(cmd, cwd=ROOT, env=ansible_env(), check=False).returncode
    if code == 5:
        print("[test] pytest collected no tests: that is a failure here", flush=True)
        return 1
    return code
