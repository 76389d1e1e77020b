import os
import tempfile

# Records a store refuses are kept in a spool (opsbook.engines.records.spool): the suite's own,
# never the operator's ~/.local/state/opsbook.
os.environ.setdefault("OPSBOOK_SPOOL", tempfile.mkdtemp(prefix="opsbook-test-spool-"))

pytest_plugins = [
    "tests.fixtures.lab",
    "tests.fixtures.postgres",
    "tests.fixtures.moto",
    "tests.fixtures.aws_env",
    "tests.fixtures.service",
]


def pytest_sessionfinish(session, exitstatus):
    """A run in which nothing passed (all skipped or deselected) is a failure, like "no tests ran"."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if exitstatus == 0 and reporter is not None and not reporter.stats.get("passed"):
        session.exitstatus = 5
