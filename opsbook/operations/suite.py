"""The whole test suite, as CI runs it (`invoke test`): lab up, then pytest over tests/."""

from __future__ import annotations

import subprocess
import sys

from opsbook.core.inventory import Env
from opsbook.core.paths import ROOT
from opsbook.engines.ansible import ansible_env


def run_suite(lab_env: Env | None, k: str | None = None, workers: int = 2) -> int:
    """Bring the lab (`lab_env`) up unless it is None, then run pytest; "no tests ran" is a failure."""
    if lab_env is not None:
        from opsbook.engines import lab

        print("[test] bringing the lab up (hosts the suite releases to and checks)", flush=True)
        lab.up(lab_env)
    # Two workers: the lab tests (one fleet, so one worker, in order) beside everything else.
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--durations=15", "-n", str(workers),
           "--dist", "loadgroup"]
    if k:
        cmd += ["-k", k]
    code = subprocess.run(cmd, cwd=ROOT, env=ansible_env(), check=False).returncode
    if code == 5:
        print("[test] pytest collected no tests: that is a failure here", flush=True)
        return 1
    return code
