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
from opsbook.engines.interrupts import Interrupted, Stopped, interruptible
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


# --- marking good, the release's last step ----------------------------------------------------------
class _Held:
    def renew(self) -> None:
        pass


class _Marking:
    """The switch's playbook run as _mark_good sees it: marking good raises `error` (a signal's, or a
    failure's); the playbook has ended, so there is nothing to stop."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.playbook = self

    def running(self) -> bool:
        return False

    def mark_good(self) -> None:
        raise self.error


def _switched_run(error: BaseException):
    from opsbook.operations.release.plan import Plan
    from opsbook.operations.release.steps import Run

    plan = Plan(env="lab", kind="release", target="2.0.0", artifact_file="bl-api-2.0.0.tar.gz",
                artifact_sha256="0" * 64, current={"app1": "1.9.0"}, batches=[["app1"]], drain_timeout=30,
                migrations_pending=[], phases=["rolling switch", "mark good"])
    run = Run(plan=plan, record_id="20261203T000000Z-release-abcdef", outcome="succeeded")
    run.switching = _Marking(error)
    return run


AGAIN = ("every host serves 2.0.0 and passed, but marking it good did not finish on every host (retention does not "
         "count it as good where it is not); release it again to mark it: `invoke release --env lab --version 2.0.0`")


@pytest.mark.parametrize(("error", "by", "said"), [(KeyboardInterrupt(), "SIGINT", "SIGINT (Ctrl-C)"),
                                                   (Interrupted(signal.SIGTERM), "SIGTERM", "SIGTERM")])
def test_an_interrupt_while_the_hosts_mark_the_release_good_ends_it_interrupted_saying_what_is_missing(error, by,
                                                                                                      said):
    """It ended `failed`, exit 1, saying "marking the release good failed: ." (a KeyboardInterrupt has no text)."""
    from opsbook.operations.release.steps import _mark_good

    run = _switched_run(error)
    _mark_good(run, _Held())
    assert (run.outcome, run.interrupted_by, run.interrupted_in) == ("interrupted", by, "mark good")
    assert run.reason == f"interrupted by {said} during mark good: {AGAIN}"
    assert run.switching is None


@pytest.mark.parametrize(("error", "what"), [(RuntimeError(), "RuntimeError"),
                                             (RuntimeError("app2 unreachable\nmore"), "app2 unreachable")])
def test_a_failure_while_the_hosts_mark_the_release_good_says_what_failed_and_what_is_missing(error, what):
    from opsbook.operations.release.steps import _mark_good

    run = _switched_run(error)
    _mark_good(run, _Held())
    assert (run.outcome, run.interrupted_in) == ("failed", None)
    assert run.reason == f"marking the release good failed ({what}): {AGAIN}"
