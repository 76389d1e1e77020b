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


# The host checks need two pytest plugins: testinfra's, and pytest-timeout (pyproject's `timeout`
# option is unknown without it, and unknown options are errors there). Every other plugin installed
# in the venv (locust's imports gevent, Faker, xdist, anyio) cost 0.7 s of CPU at each start, twice in
# every release; pytest loads only those named when its autoload is off.
HOST_CHECK_PLUGINS = ("testinfra.plugin", "pytest_timeout")


def host_check_command(env: Env, extra: list[str] | None = None) -> list[str]:
    """The pytest command line of the host checks (run with `host_check_environ`)."""
    return [
        sys.executable, "-m", "pytest", str(HOST_CHECKS),
        *(arg for plugin in HOST_CHECK_PLUGINS for arg in ("-p", plugin)),
        "-p", "no:cacheprovider", "-q",
        "--rootdir", str(ROOT),
        f"--ansible-inventory={env.path}",
        "--connection=ansible",
        *(extra or []),
    ]


def host_check_environ(env: Env) -> dict[str, str]:
    """Ansible's environment for `env`, with pytest's plugin autoload off (HOST_CHECK_PLUGINS)."""
    return {**ansible_env(env), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}


def run_host_checks(env: Env, extra: list[str] | None = None) -> None:
    proc = subprocess.run(host_check_command(env, extra), cwd=ROOT, env=host_check_environ(env), check=False)
    if proc.returncode != 0:
        raise HostChecksFailed(
            f"host checks failed on {env.name} (pytest exit {proc.returncode}); the failing checks and "
            f"hosts are listed above. The checks change nothing; fix the hosts (e.g. `invoke provision "
            f"--env {env.name}`) and run `invoke check --env {env.name}` again."
        )
