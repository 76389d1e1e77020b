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


# A fleet's checks run in parallel processes, each on a share of the hosts (on a real fleet a host's checks are
# its own remote commands, mostly waited on): one process up to HOSTS_PER_PROCESS hosts (the lab's six), more
# for a larger fleet, at most MAX_PROCESSES (each costs a pytest start, about 1.3 s of CPU).
HOSTS_PER_PROCESS = 6
MAX_PROCESSES = 4
SHARD_VARIABLE = "OPSBOOK_HOST_CHECK_HOSTS"   # tests/infra/conftest.py keeps only these hosts' checks
NO_TESTS = 5   # pytest's exit code when no test was collected


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
    """Ansible's environment for `env`, with pytest's plugin autoload off (HOST_CHECK_PLUGINS), and no
    share of hosts but the one opsbook gives a process (one left in the caller's environment would
    check only those hosts)."""
    environ = {**ansible_env(env), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    environ.pop(SHARD_VARIABLE, None)
    return environ


def shards(env: Env) -> list[list[str]]:
    """The hosts each check process takes (round robin, so each takes some of every group); one share
    with no list (every host) when one process is enough."""
    names = sorted(h.name for h in env.hosts())
    k = min(MAX_PROCESSES, -(-len(names) // HOSTS_PER_PROCESS))
    if k <= 1:
        return [[]]
    return [names[i::k] for i in range(k)]


def run_host_checks(env: Env, extra: list[str] | None = None) -> None:
    """Run the checks now and raise if any failed; one process's output is shown as it comes."""
    if len(shards(env)) == 1:
        proc = subprocess.run(host_check_command(env, extra), cwd=ROOT, env=host_check_environ(env), check=False)
        _judge(env, proc.returncode)
        return
    checks = Background(env, extra)
    try:
        checks.wait()
    finally:
        checks.stop()   # interrupted while it waited: no check process outlives the release


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
    Their output is kept and shown when they are judged (`wait`), not mixed into the gate's; with
    several processes (shards), each one's output in turn.
    `stop` ends a run nobody will judge (the release failed or was interrupted meanwhile)."""

    def __init__(self, env: Env, extra: list[str] | None = None):
        self.env, self.extra = env, extra
        self.procs: list[tuple[subprocess.Popen, Any]] = []

    def start(self) -> None:
        if self.procs:
            return
        for share in shards(self.env):
            out = tempfile.TemporaryFile(mode="w+")   # noqa: SIM115 - closed by wait() or stop()
            environ = host_check_environ(self.env)
            if share:
                environ[SHARD_VARIABLE] = ",".join(share)
            self.procs.append((subprocess.Popen(host_check_command(self.env, self.extra), cwd=ROOT, env=environ,
                                                stdout=out, stderr=subprocess.STDOUT, text=True), out))

    def wait(self) -> None:
        """Wait for the checks (started now if they were not), show their output, raise if they failed."""
        self.start()
        codes = []
        for proc, out in self.procs:
            codes.append(proc.wait())
            out.seek(0)
            sys.stdout.write(out.read())
            sys.stdout.flush()
            out.close()
        # A share whose hosts have no check of the kind asked for (pytest's "no tests ran", 5) is not
        # a failure while another share ran checks; every share empty is.
        ran = any(c != NO_TESTS for c in codes)
        _judge(self.env, next((c for c in codes if c not in (0, NO_TESTS)), 0 if ran else NO_TESTS))

    def stop(self) -> None:
        for proc, out in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if not out.closed:
                out.close()
