"""Host checks: the testinfra suites in tests/infra/ run against an environment's inventory."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from typing import Any

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
    _judge(env, proc.returncode)


def _judge(env: Env, code: int) -> None:
    if code != 0:
        raise HostChecksFailed(
            f"host checks failed on {env.name} (pytest exit {code}); the failing checks and "
            f"hosts are listed above. The checks change nothing; fix the hosts (e.g. `invoke provision "
            f"--env {env.name}`) and run `invoke check --env {env.name}` again."
        )


class Background:
    """Host checks started now and judged later: a release starts its verify when the last batch
    takes traffic, beside that batch's gate (the checks change nothing, and the gate mostly waits).
    Their output is kept and shown when they are judged (`wait`), not mixed into the gate's.
    `stop` ends a run nobody will judge (the release failed or was interrupted meanwhile)."""

    def __init__(self, env: Env, extra: list[str] | None = None):
        self.env, self.extra = env, extra
        self.proc: subprocess.Popen | None = None
        self._out: Any = None

    def start(self) -> None:
        if self.proc is None:
            self._out = tempfile.TemporaryFile(mode="w+")   # noqa: SIM115 - closed by wait() or stop()
            self.proc = subprocess.Popen(host_check_command(self.env, self.extra), cwd=ROOT,
                                         env=host_check_environ(self.env), stdout=self._out,
                                         stderr=subprocess.STDOUT, text=True)

    def wait(self) -> None:
        """Wait for the checks (started now if they were not), show their output, raise if they failed."""
        self.start()
        code = self.proc.wait()
        self._out.seek(0)
        sys.stdout.write(self._out.read())
        sys.stdout.flush()
        self._out.close()
        _judge(self.env, code)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._out is not None and not self._out.closed:
            self._out.close()
