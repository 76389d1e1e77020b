"""An interrupt no operation took in hand (it came while a task loaded, planned or checked its
guardrails) ends the task with a sentence and exit code 130, whichever of SIGINT, SIGTERM or SIGHUP
it was, instead of Invoke's silent exit 1 (SIGINT) or a silent death (SIGTERM, SIGHUP)."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest
from invoke.exceptions import Exit

from tasks import operator_errors


@pytest.fixture
def python_takes_sigint():
    """Python's own SIGINT handler (KeyboardInterrupt), whatever this process inherited: a process started
    as a background job inherits SIGINT ignored, and then Python never installs it."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_an_interrupt_before_any_step_is_said_and_exits_130(signum, python_takes_sigint):
    reached = []
    handlers_before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    for s, h in handlers_before.items():
        if h is signal.SIG_IGN:   # ignored (nohup): the task leaves it so, tested below; not this test's case
            signal.signal(s, signal.SIG_DFL)
            handlers_before[s] = signal.SIG_DFL

    @operator_errors
    def records_list(_c):
        os.kill(os.getpid(), signum)
        time.sleep(5)            # the signal arrives during this
        reached.append("after")  # never

    with pytest.raises(Exit) as e:
        records_list(None)
    assert e.value.code == 130
    assert f"records.list interrupted by {signal.Signals(signum).name}" in e.value.message
    assert "invoke status" in e.value.message
    assert "it stopped where it was" in e.value.message
    assert reached == []
    # the task's handlers are gone once it ended: the previous ones are back
    assert {s: signal.getsignal(s) for s in handlers_before} == handlers_before


def test_another_task_interrupted_says_it_stopped_where_it_was(python_takes_sigint):
    """lab.up interrupted while it makes a host left that host half made: the sentence says no more than
    that it stopped (a release says more itself, tests/unit/test_release_interrupts.py)."""
    @operator_errors
    def lab_up(_c):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)

    with pytest.raises(Exit) as e:
        lab_up(None)
    assert e.value.code == 130
    assert e.value.message.startswith("error: lab.up interrupted by SIGINT (Ctrl-C) outside any step that ends in "
                                      "order: it stopped where it was. ")
    assert "nothing was changed" not in e.value.message


class _SignalledInAFinalizer:
    """An object whose finalizer is where a signal's handler runs: the signal arrives while the main thread
    runs it (a weakref callback or __del__ during a clean-up), so the handler's exception is raised there."""

    def __init__(self, signum: int):
        self.signum = signum

    def __del__(self):
        os.kill(os.getpid(), self.signum)
        for _ in range(100_000):   # the handler runs at one of these instructions, inside the finalizer
            pass


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_that_lands_in_a_finalizer_is_not_lost_nor_printed(signum, python_takes_sigint, capfd):
    """Python cannot raise out of a finalizer: it prints "Exception ignored in ...: Traceback ...
    KeyboardInterrupt" and goes on as if no signal had come (seen: a second Ctrl-C during a migration's
    clean-up). The task takes it at its next instruction instead, and nothing of it is printed."""
    reached = []
    hook_before = sys.unraisablehook

    @operator_errors
    def migrate(_c):
        _SignalledInAFinalizer(signum)   # dropped at once: its finalizer runs here
        time.sleep(5)             # the clean-up goes on; the interrupt arrives during this
        reached.append("after")   # never: the interrupt ends the task

    with pytest.raises(Exit) as e:
        migrate(None)
    assert e.value.code == 130
    assert f"migrate interrupted by {signal.Signals(signum).name}" in e.value.message
    assert reached == []
    err = capfd.readouterr().err
    assert "Exception ignored" not in err, err
    assert "Traceback" not in err, err
    assert sys.unraisablehook is hook_before   # the task's hook is gone once it ended


def test_an_interrupt_lost_in_a_finalizer_of_a_task_that_then_ends_is_not_sent_after_it(python_takes_sigint, capfd):
    """The task had finished its work before the interrupt could be sent again: nothing comes after it."""
    @operator_errors
    def status(_c):
        _SignalledInAFinalizer(signal.SIGINT)
        return "done"

    assert status(None) == "done"
    time.sleep(0.3)   # a SIGINT sent now would raise KeyboardInterrupt here, failing the test
    assert "Exception ignored" not in capfd.readouterr().err


def test_other_unraisable_exceptions_still_reach_the_hook_before(python_takes_sigint):
    seen = []
    hook_before = sys.unraisablehook
    sys.unraisablehook = lambda u: seen.append(type(u.exc_value).__name__)
    try:
        class Broken:
            def __del__(self):
                raise ValueError("a finalizer's own bug")

        @operator_errors
        def status(_c):
            Broken()
            return "went on"

        assert status(None) == "went on"
        assert seen == ["ValueError"]
    finally:
        sys.unraisablehook = hook_before


def test_a_signal_ignored_before_the_task_stays_ignored():
    """Under `nohup` SIGHUP is ignored: closing the terminal must not stop a task."""
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        @operator_errors
        def scale_check(_c):
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.2)
            return "went on"

        assert scale_check(None) == "went on"
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


def test_an_operator_error_is_still_a_plain_error():
    from opsbook.core.errors import OpsbookError

    @operator_errors
    def status(_c):
        raise OpsbookError("no such environment: nope. Nothing was changed.")

    with pytest.raises(Exit) as e:
        status(None)
    assert e.value.code == 1
    assert e.value.message == "error: no such environment: nope. Nothing was changed."
