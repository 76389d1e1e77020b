import atexit
import os
import shutil
import tempfile

# Records a store refuses are kept in a spool (opsbook.engines.records.spool): the suite's own,
# never the operator's ~/.local/state/opsbook, and removed when this pytest ends.
if "OPSBOOK_SPOOL" not in os.environ:
    os.environ["OPSBOOK_SPOOL"] = tempfile.mkdtemp(prefix="opsbook-test-spool-")
    atexit.register(shutil.rmtree, os.environ["OPSBOOK_SPOOL"], True)
# The suite reaches AWS only through the moto server on loopback that a test points it at. Any AWS
# client left unpointed (staging's and prod's real inventories name real AWS) goes to a closed
# loopback port instead, and nothing asks the instance metadata address for credentials: no test
# can send a packet off this machine, whatever it forgets.
os.environ.setdefault("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

pytest_plugins = [
    "tests.fixtures.lab",
    "tests.fixtures.postgres",
    "tests.fixtures.moto",
    "tests.fixtures.aws_env",
    "tests.fixtures.service",
]


def pytest_sessionfinish(session, exitstatus):
    """A run in which nothing passed (all skipped or deselected) is a failure, like "no tests ran"."""
    if session.config.option.collectonly:   # listing tests runs none: pytest's own status stands
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if exitstatus == 0 and reporter is not None and not reporter.stats.get("passed"):
        session.exitstatus = 5
