"""An operator's Ctrl-C reaches opsbook, not the ssh processes it runs: a forward (engines/tunnel.py) and the
commands of an SshRunner (engines/remote.py) are in sessions of their own, so the interrupted operation's
clean-up can still reach the host and the database. Before, a terminal's SIGINT (or the one a runbook's
kernel gets for its process group) killed the forward under a refresh's masking step, which then failed
with "server closed the connection unexpectedly" instead of ending in order as interrupted.

`ssh` here is a stand-in on PATH that behaves as OpenSSH does for what is tested (a forward that listens
on its -L port until killed, a command that runs on "the host", default SIGINT handling); the operation
is opsbook's own code in a process of its own, interrupted as a terminal interrupts it: SIGINT to its
whole process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import yaml

from opsbook.core.inventory import INVENTORY_PATH_VARIABLE
from opsbook.core.paths import ROOT

FAKE_SSH = textwrap.dedent("""\
    #!{python}
    import os, signal, socket, sys, time
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # as ssh: a SIGINT that reaches it ends it
    args = sys.argv[1:]
    if "-L" in args:
        local = args[args.index("-L") + 1].split(":")
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((local[0], int(local[1])))
        server.listen()
        while True:
            conn, _ = server.accept()
            conn.sendall(b"forwarded")
            conn.close()
    command = args[-1]
    if "slow" in command:
        open(os.environ["MARK"], "w").close()
        time.sleep(60)
    print("ran", command.split()[-1])
""")

OPERATION = textwrap.dedent("""\
    import signal, socket
    signal.signal(signal.SIGINT, signal.default_int_handler)   # as in a terminal, even if pytest ignores it
    from opsbook.core.inventory import Env
    from opsbook.engines import remote, tunnel
    env = Env("fake")
    port = tunnel.forward_socket(env, "h1", "/run/postgresql/.s.PGSQL.5432")
    runner = remote.SshRunner(env, "h1")
    try:
        runner.run(["slow"], timeout=120)
        print("not interrupted")
    except KeyboardInterrupt:
        print("interrupted")
    # the clean-up an interrupted operation does: through the forward, then on the host
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        print(conn.recv(100).decode())
    print(runner.run(["cleanup"]).out.strip())
""")


def test_a_ctrl_c_leaves_the_forward_and_the_host_reachable_for_the_clean_up(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ssh = bin_dir / "ssh"
    ssh.write_text(FAKE_SSH.format(python=sys.executable))
    ssh.chmod(0o755)
    inventories = tmp_path / "inventories"
    (inventories / "fake").mkdir(parents=True)
    (inventories / "fake" / "hosts.yml").write_text(yaml.safe_dump(
        {"all": {"hosts": {"h1": {"ansible_host": "127.0.0.1", "ansible_port": 22}}}}))
    mark = tmp_path / "slow-started"
    environ = {**os.environ, INVENTORY_PATH_VARIABLE: str(inventories), "MARK": str(mark),
               "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    # A process group of its own, as a command typed in a terminal has: the SIGINT goes to all of it.
    proc = subprocess.Popen([sys.executable, "-c", OPERATION], cwd=ROOT, env=environ, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not mark.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mark.exists(), "the slow command never started"
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    assert out.split() == ["interrupted", "forwarded", "ran", "cleanup"], out
