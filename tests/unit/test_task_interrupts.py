"""An interrupt no operation took in hand (it came while a task loaded, planned or checked its
guardrails) ends the task with a sentence and exit code 130, whichever of SIGINT, SIGTERM or SIGHUP
it was, instead of Invoke's silent exit 1 (SIGINT) or a silent death (SIGTERM, SIGHUP)."""

from __future__ import annotations

import os
import signal
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
