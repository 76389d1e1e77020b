"""Host checks: the testinfra suites in tests/infra/ run against an environment's inventory."""

from __future__ import annotations

import subprocess
import sys

from opsbook import ROOT
from opsbook.errors import OpsbookError
from opsbook.inventory import load
from opsbook.release import ansible_env


class HostChecksFailed(OpsbookError):
    pass


def host_check_command(env_name: str, extra: list[str] | None = None) -> list[str]:
    env = load(env_name)
    return [
        sys.executable, "-m", "pytest", str(ROOT / "tests" / "infra"),
        "-p", "no:cacheprovider", "-q",
        "--rootdir", str(ROOT),
        f"--ansible-inventory={env.path}",
        "--connection=ansible",
        *(extra or []),
    ]


def run_host_checks(env_name: str, extra: list[str] | None = None) -> None:
    proc = subprocess.run(host_check_command(env_name, extra), cwd=ROOT, env=ansible_env(), check=False)
    if proc.returncode != 0:
        raise HostChecksFailed(
            f"host checks failed on {env_name} (pytest exit {proc.returncode}); the failing checks and "
            f"hosts are listed above. The checks change nothing; fix the hosts (e.g. `invoke provision "
            f"--env {env_name}`) and run `invoke check --env {env_name}` again."
        )
