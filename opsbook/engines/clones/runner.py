"""Where the clone machinery's commands run: the runners of ``opsbook.engines.remote`` (a local
subprocess, or an inventory host over SSH, as lab-staging's stg-db1 is reached). Every command the
clone engine runs goes through :meth:`Runner.run` as an argument list; files are read and written by
commands too; a cluster's Unix socket on a host over SSH is reached through an SSH forward
(``opsbook.engines.tunnel.SocketForwards``).
"""

from __future__ import annotations

from opsbook.engines.remote import CommandFailed, LocalRunner, Result, Runner, SshRunner, read_file, write_file

__all__ = ["CommandFailed", "LocalRunner", "Result", "Runner", "SshRunner", "for_host", "read_file", "write_file"]


def for_host(env, host_name: str) -> tuple[Runner, object | None]:
    """(runner, sockets) for an inventory host: this machine when its `ansible_connection` is
    `local` (sockets None: reached directly), else SSH with the inventory's settings and an SSH
    forward for each socket."""
    connection = env.host_var(host_name, "ansible_connection", "ssh")
    if connection == "local":
        return LocalRunner(host_name), None
    from opsbook.engines.tunnel import SocketForwards

    return SshRunner(env, host_name), SocketForwards(env, host_name)
