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


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_an_interrupt_before_any_step_is_said_and_exits_130(signum):
    reached = []

    @operator_errors
    def release(_c):
        os.kill(os.getpid(), signum)
        time.sleep(5)            # the signal arrives during this
        reached.append("after")  # never

    with pytest.raises(Exit) as e:
        release(None)
    assert e.value.code == 130
    assert f"release interrupted by {signal.Signals(signum).name}" in e.value.message
    assert "invoke status" in e.value.message
    assert reached == []
    # the task's handlers are gone once it ended: the previous ones are back
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_an_operator_error_is_still_a_plain_error():
    from opsbook.core.errors import OpsbookError

    @operator_errors
    def status(_c):
        raise OpsbookError("no such environment: nope. Nothing was changed.")

    with pytest.raises(Exit) as e:
        status(None)
    assert e.value.code == 1
    assert e.value.message == "error: no such environment: nope. Nothing was changed."
