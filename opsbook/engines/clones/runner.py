"""Where the clone machinery's commands run: the runners of ``opsbook.engines.remote`` (a local
subprocess, or an inventory host over SSH). Every command the clone engine runs goes through
:meth:`Runner.run` as an argument list; files are read and written by commands too.

The clone machinery has run on the controller only (:class:`LocalRunner`). :func:`for_host` still
refuses a clone host reached over SSH with :class:`~opsbook.engines.snapshots.base.PathNotBuilt`:
the runner exists (:class:`~opsbook.engines.remote.SshRunner`, which the lab's snapshots use), but a
btrfs filesystem and a standby inside a lab host have never been set up or tried.
"""

from __future__ import annotations

from opsbook.engines.remote import CommandFailed, LocalRunner, Result, Runner, SshRunner, read_file, write_file
from opsbook.engines.snapshots.base import PathNotBuilt

__all__ = ["CommandFailed", "LocalRunner", "Result", "Runner", "SshRunner", "for_host", "read_file", "write_file"]


def for_host(env, host_name: str) -> Runner:
    """The runner for an inventory host: this machine when its `ansible_connection` is `local`;
    a host reached over SSH is refused (the clone machinery was never tried there)."""
    connection = env.host_var(host_name, "ansible_connection", "ssh")
    if connection == "local":
        return LocalRunner(host_name)
    raise PathNotBuilt(
        f"{env.name}'s refresh host {host_name} is reached over SSH, and the clone machinery (a btrfs filesystem and a "
        f"streaming standby on that host) has never been set up or tried there: only a clone host that is the "
        f"controller is built. Nothing was changed. Until it is, the clone host must be the controller "
        f"itself (ansible_connection: local).")
