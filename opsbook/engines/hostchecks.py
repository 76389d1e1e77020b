"""Host checks: the testinfra suites in tests/infra/ run against an environment's inventory."""

from __future__ import annotations

import subprocess
import sys

from opsbook.core.errors import OpsbookError
from opsbook.core.inventory import Env
from opsbook.core.paths import HOST_CHECKS, ROOT
from opsbook.engines.ansible import ansible_env


class HostChecksFailed(OpsbookError):
    pass


def host_check_command(env: Env, extra: list[str] | None = None) -> list[str]:
    return [
        sys.executable, "-m", "pytest", str(HOST_CHECKS),
        "-p", "no:cacheprovider", "-q",
        "--rootdir", str(ROOT),
        f"--ansible-inventory={env.path}",
        "--connection=ansible",
        *(extra or []),
    ]


def run_host_checks(env: Env, extra: list[str] | None = None) -> None:
    proc = subprocess.run(host_check_command(env, extra), cwd=ROOT, env=ansible_env(env), check=False)
    if proc.returncode != 0:
        raise HostChecksFailed(
            f"host checks failed on {env.name} (pytest exit {proc.returncode}); the failing checks and "
            f"hosts are listed above. The checks change nothing; fix the hosts (e.g. `invoke provision "
            f"--env {env.name}`) and run `invoke check --env {env.name}` again."
        )
