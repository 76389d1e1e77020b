"""The whole test suite, as CI runs it (`invoke test`): lab up, then pytest over tests/.

The lab is one fleet, so the lab tests run one after another in one pytest; every other test (the
service, the engine against a local Postgres, runbooks on a real kernel, moto) runs in a second
pytest beside them, and its report follows the lab's. Either failing fails the suite; "no tests
ran" in both is a failure too.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile

from opsbook.core.inventory import Env
from opsbook.core.paths import ROOT
from opsbook.engines.ansible import ansible_env

NO_TESTS = 5   # pytest's exit code when it collected nothing


def run_suite(lab_env: Env | None, k: str | None = None) -> int:
    """Bring the lab (`lab_env`) up unless it is None, then run both halves of the suite."""
    if lab_env is not None:
        from opsbook.engines import lab

        print("[test] bringing the lab up (hosts the suite releases to and checks)", flush=True)
        lab.up(lab_env)
    base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--durations=10"]
    if k:
        base += ["-k", k]
    with tempfile.TemporaryFile(mode="w+") as others_out:
        print("[test] tests that do not touch the lab: running beside the lab tests, reported after them",
              flush=True)
        others = subprocess.Popen([*base, "-m", "not lab"], cwd=ROOT, env=ansible_env(), stdout=others_out,
                                  stderr=subprocess.STDOUT, text=True)
        try:
            print("[test] lab tests (one fleet: one after another)", flush=True)
            lab_code = subprocess.run([*base, "-m", "lab"], cwd=ROOT, env=ansible_env(), check=False).returncode
        finally:
            others_code = others.wait()
        others_out.seek(0)
        print("\n[test] the tests that do not touch the lab:", flush=True)
        sys.stdout.write(others_out.read())
        sys.stdout.flush()
    codes = {"lab": lab_code, "others": others_code}
    if all(c == NO_TESTS for c in codes.values()):
        print("[test] pytest collected no tests: that is a failure here", flush=True)
        return 1
    failed = {name: c for name, c in codes.items() if c not in (0, NO_TESTS)}
    if failed:
        print(f"[test] FAILED: {', '.join(f'{n} (pytest exit {c})' for n, c in failed.items())}", flush=True)
        return 1
    return 0
