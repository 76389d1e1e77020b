"""Operator interrupts: SIGINT (Ctrl-C), SIGTERM and SIGHUP end an operation the same, orderly way.

Python turns SIGINT into KeyboardInterrupt; `interruptible()` does the same for SIGTERM and SIGHUP
(an `Interrupted`, which is a KeyboardInterrupt naming its signal), so one `except KeyboardInterrupt`
puts things back in order whatever the signal was. `shielded()` holds signals back for a short
step that must not be cut in half (putting hosts back in the load balancer); they are re-raised
once it is done.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

HANDLED = (signal.SIGTERM, signal.SIGHUP)
AGAIN_AFTER = 0.05   # seconds: an interrupt lost in a finalizer is sent again this long after (`redelivered`)


class Interrupted(KeyboardInterrupt):
    """The operation was interrupted by a signal (`.signal` names it)."""

    def __init__(self, signum: int):
        self.signal = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.signal}")


class Stopped(KeyboardInterrupt):
    """An operation was interrupted and has ended in order (what it changed is put back or recorded);
    its text is the whole message for the operator, `.signal` the signal's name."""

    def __init__(self, message: str, signal: str = "SIGINT"):
        self.signal = signal
        super().__init__(message)


def signal_of(e: BaseException) -> str:
    """The name of the signal an interrupt came from (Interrupted and Stopped carry it; a bare
    KeyboardInterrupt is Python's SIGINT)."""
    return getattr(e, "signal", None) or "SIGINT"


def describe(e: BaseException) -> str:
    if isinstance(e, Interrupted) or (isinstance(e, Stopped) and e.signal != "SIGINT"):
        return f"interrupted by {e.signal}"
    return "interrupted by SIGINT (Ctrl-C)"


def interrupt_for(signum: int) -> KeyboardInterrupt:
    """The exception a signal raises: KeyboardInterrupt for SIGINT (as Python's own), else Interrupted."""
    return KeyboardInterrupt() if signum == signal.SIGINT else Interrupted(signum)


@contextmanager
def handling(signals: tuple[int, ...], handler) -> Iterator[bool]:
    """`handler` for `signals` while the block runs, the previous handlers back after it. Only in the
    main thread (yields False elsewhere: nothing installed). A signal ignored when the block starts stays
    ignored: under `nohup` (SIGHUP ignored) a hangup of the terminal must not stop an operation, nor may a
    background job's SIGINT."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = {s: signal.signal(s, handler) for s in signals if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield True
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM and SIGHUP raise Interrupted in the main thread while the block runs, and an interrupt that
    Python could not deliver is delivered again (`redelivered`)."""
    def handler(signum, _frame):
        raise Interrupted(signum)

    with handling(HANDLED, handler), redelivered():
        yield


@contextmanager
def redelivered() -> Iterator[None]:
    """An interrupt raised while the main thread ran a finalizer or a weakref callback (a signal handler's
    exception goes wherever the interpreter happens to be) cannot propagate: Python prints it as "Exception
    ignored in ...: Traceback ... KeyboardInterrupt" and goes on as if no signal had come (seen: an operator's
    second Ctrl-C during a migration's clean-up, lost, with that text on the terminal). While the block
    runs, such an interrupt is not printed but sent again, from a thread of its own AGAIN_AFTER seconds
    later, when the finalizer and this hook are long left (sent at once, the handler would run inside the
    hook, where it is lost the same way): the handler in place then takes it, as it would have. Once the
    block has ended nothing is sent (what it ran is over). Other unraisable exceptions go to the hook before."""
    import os

    previous, running = sys.unraisablehook, threading.Event()
    running.set()

    def again(signum: int) -> None:
        if running.is_set():
            os.kill(os.getpid(), signum)

    def hook(unraisable) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, KeyboardInterrupt) and threading.current_thread() is threading.main_thread():
            timer = threading.Timer(AGAIN_AFTER, again, (getattr(signal, signal_of(exc), signal.SIGINT),))
            timer.daemon, timer.name = True, "opsbook-interrupt-again"
            try:
                timer.start()
            except RuntimeError:   # no new thread (the interpreter is ending): said, as Python would
                previous(unraisable)
            return
        previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        running.clear()
        sys.unraisablehook = previous


@contextmanager
def shielded() -> Iterator[list[int]]:
    """Hold SIGINT, SIGTERM and SIGHUP back while the block runs; the signals that arrived are
    listed in the yielded list (the caller decides what to do once the block is done)."""
    arrived: list[int] = []

    def hold(signum, _frame):
        arrived.append(signum)

    with handling((signal.SIGINT, *HANDLED), hold):
        yield arrived


@contextmanager
def held(say: Callable[[str], None], while_: str, until: str) -> Iterator[None]:
    """The block runs shielded (a clean-up, a read-back, a record: seconds an operator's second Ctrl-C must
    not cut short); a signal that arrived meanwhile is then said, as `SIGINT (Ctrl-C) arrived while
    <while_>; it was held until <until>`, and the caller goes on ending as it was (an operation that had
    finished its work when the signal came still succeeds)."""
    with shielded() as arrived:
        yield
    if arrived:
        names = dict.fromkeys(signal.Signals(s).name + (" (Ctrl-C)" if s == signal.SIGINT else "") for s in arrived)
        say(f"{' and '.join(names)} arrived while {while_}; it was held until {until}")
