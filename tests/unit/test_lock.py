"""The release lock's file backend, across real processes (a holder killed with SIGKILL included)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from opsbook.core.inventory import load
from opsbook.core.paths import ROOT
from opsbook.engines.lock import FileLockStore, LeaseLost, LockHeld, ReleaseLock, lock_for

# A release in another process: takes the lock, says HELD, holds it for a while, releases.
HOLDER = """
import sys, time
from opsbook.engines.lock import FileLockStore, ReleaseLock
path, lease, hold = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
lock = ReleaseLock("lab", FileLockStore(path), lease_seconds=lease, poll_seconds=0.1)
with lock.hold("release 1.2.3 from another process") as held:
    print("HELD", flush=True)
    time.sleep(hold)
print("RELEASED", flush=True)
"""


def start_holder(path, lease: float, hold: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), str(lease), str(hold)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    line = proc.stdout.readline()
    if line.strip() != "HELD":
        proc.kill()
        pytest.fail(f"holder did not take the lock: {line!r} {proc.stderr.read()}")
    return proc


@pytest.fixture
def lock_path(tmp_path):
    return tmp_path / "lab" / "release.lock"


def make_lock(path, lease=30.0) -> ReleaseLock:
    return ReleaseLock("lab", FileLockStore(path), lease_seconds=lease, poll_seconds=0.1)


def test_second_acquirer_is_refused_and_told_who_holds_it(lock_path):
    holder = start_holder(lock_path, lease=30, hold=30)
    try:
        with pytest.raises(LockHeld) as refused:
            make_lock(lock_path).acquire("release 2.0.0")
        message = str(refused.value)
        assert f"pid {holder.pid}" in message
        assert "release 1.2.3 from another process" in message
        assert " since " in message
        assert "Nothing was changed" in message
        assert refused.value.holder.pid == holder.pid
        # Refusal changed nothing: the holder is still the holder.
        assert make_lock(lock_path).holder().pid == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_wait_succeeds_once_the_holder_releases(lock_path):
    holder = start_holder(lock_path, lease=30, hold=1.5)
    try:
        with make_lock(lock_path).hold("release 2.0.0", wait=15) as held:
            assert held.waited >= 0.5
            assert held.previous_expired is None      # released cleanly, not expired
            assert "waiting" in held.message
            assert make_lock(lock_path).holder().token == held.info.token
        assert holder.wait(timeout=10) == 0
        assert make_lock(lock_path).holder() is None  # released on exit
    finally:
        holder.kill()
        holder.wait()


def test_wait_gives_up_after_the_wait_and_names_the_holder(lock_path):
    holder = start_holder(lock_path, lease=30, hold=30)
    try:
        started = time.monotonic()
        with pytest.raises(LockHeld, match=f"pid {holder.pid}.*waited 1 s"):
            make_lock(lock_path).acquire("release 2.0.0", wait=1)
        assert 0.9 <= time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait()


def test_sigkilled_holder_blocks_until_its_lease_expires_then_the_next_release_proceeds(lock_path):
    lease = 2.0
    holder = start_holder(lock_path, lease=lease, hold=60)
    time.sleep(1.0)                                  # at least one renewal happened
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    killed_at = time.time()
    dead = make_lock(lock_path).holder()
    assert dead.pid == holder.pid
    assert not dead.expired()
    # Refused while the lease runs: the message says the process is gone and when the lease ends.
    with pytest.raises(LockHeld, match=f"process {holder.pid} no longer runs"):
        make_lock(lock_path).acquire("release 2.0.0")
    with make_lock(lock_path).hold("release 2.0.0", wait=10) as held:
        acquired_at = time.time()
        assert acquired_at >= dead.lease_expires         # not before the lease ran out
        assert acquired_at - killed_at <= lease + 1.5    # and soon after
        assert held.previous_expired is not None
        assert held.previous_expired.pid == holder.pid
        assert "previous lease expired" in held.message
        assert f"pid {holder.pid}" in held.message


def test_the_heartbeat_keeps_a_short_lease_alive(lock_path):
    with make_lock(lock_path, lease=0.9).hold("release 2.0.0") as held:
        first_expiry = held.info.lease_expires
        time.sleep(2.0)                               # more than two leases
        with pytest.raises(LockHeld):
            make_lock(lock_path).acquire("release 2.0.1")
        assert make_lock(lock_path).holder().lease_expires > first_expiry
        held.check()


def test_break_returns_the_holder_and_the_broken_release_notices(lock_path):
    lock = make_lock(lock_path, lease=0.9)
    held = lock.acquire("release 2.0.0")
    try:
        broken = make_lock(lock_path).break_("release 2.0.0 hung", by="oncall@example")
        assert broken.token == held.info.token
        assert broken.reason == "release 2.0.0"
        assert make_lock(lock_path).holder() is None
        with make_lock(lock_path).hold("release 2.0.1") as other:
            time.sleep(0.8)                           # the broken release's heartbeat runs
            with pytest.raises(LeaseLost, match="broken or taken over"):
                held.check()
            held.release()                            # must not remove the new holder's lock
            assert make_lock(lock_path).holder().token == other.info.token
    finally:
        held.release()
    assert make_lock(lock_path).break_("nothing to break") is None


def test_a_reason_is_required(lock_path):
    with pytest.raises(Exception, match="needs a reason"):
        make_lock(lock_path).acquire("  ")
    assert make_lock(lock_path).holder() is None


def test_lab_inventory_uses_a_file_lock_under_the_lab_dir():
    lock = lock_for(load("lab"))
    assert isinstance(lock.store, FileLockStore)
    assert lock.store.path == (ROOT / ".lab" / "release-lab.lock").resolve()
    assert lock.lease_seconds > 0
