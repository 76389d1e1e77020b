"""A release or rollback interrupted before it takes its lock (while it builds its artifact, reads the
fleet, plans or checks its guardrails) says so itself: nothing was released, there is no record, and
the step it stopped in. From the lock on, execute() takes interrupts in hand (the lab tests)."""

from __future__ import annotations

import os
import signal
import time

import pytest
from invoke.exceptions import Exit

from opsbook.core.inventory import load
from opsbook.engines import artifact, fleet
from opsbook.engines.interrupts import Stopped, interruptible
from opsbook.engines.records.store import store_for
from opsbook.operations import release as releases
from tasks import operator_errors


def _signal_then_wait(signum: int):
    def arrive(*_a, **_k):
        os.kill(os.getpid(), signum)
        time.sleep(5)   # the signal arrives during this
        pytest.fail("the interrupt did not stop the step")
    return arrive


@pytest.fixture
def lab():
    env = load("lab")
    before = len(store_for(env).ledger())
    yield env
    assert len(store_for(env).ledger()) == before   # no record was written


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_release_interrupted_before_its_lock_says_nothing_was_released(lab, monkeypatch, signum):
    monkeypatch.setattr(artifact, "find", _signal_then_wait(signum))
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with interruptible(), pytest.raises(Stopped) as e:
            releases.release(lab, "9.9.9")
    finally:
        signal.signal(signal.SIGINT, before)
    name = signal.Signals(signum).name
    assert e.value.signal == name
    said = "SIGINT (Ctrl-C)" if signum == signal.SIGINT else name
    assert str(e.value) == (
        f"the release of 9.9.9 to lab was interrupted by {said} before it took the lock (while building or "
        "finding its artifact): nothing was released and no record was written. `invoke status --env lab` "
        "shows what each host serves; run the release again when ready.")


def test_a_rollback_interrupted_before_its_lock_says_so_through_its_task(lab, monkeypatch):
    monkeypatch.setattr(fleet, "served_versions", _signal_then_wait(signal.SIGTERM))

    @operator_errors
    def rollback(_c):
        releases.rollback(lab, "1.0.0")

    with pytest.raises(Exit) as e:
        rollback(None)
    assert e.value.code == 130
    assert e.value.message.startswith(
        "error: the rollback of 1.0.0 to lab was interrupted by SIGTERM before it took the lock (while reading "
        "what the hosts serve): nothing was released and no record was written.")
