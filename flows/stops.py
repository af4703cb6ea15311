"""SIGTERM as a stop the command line reports, like a Ctrl-C.

A service manager or job scheduler stops a command with SIGTERM. By default the
signal ends the process at once: no line says why, and a half-written output or
temporary folder stays behind. :func:`stop_on_sigterm` makes the signal raise
:class:`Terminated` where it lands instead, a KeyboardInterrupt, so the clean-up
each command already does for a Ctrl-C runs; the entry point then prints one
``error: stopped by SIGTERM`` line and exits :data:`EXIT_TERMINATED`. Standard
library only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = [
    "EXIT_TERMINATED",
    "Terminated",
    "deferred",
    "sigterm_is_a_stop",
    "stop_line",
    "sigterm_stops",
    "stop_on_sigterm",
]

# 128 + SIGTERM: what a shell reports for a process the signal ended, so a
# caller sees the same code whether the handler or the signal ended the run.
EXIT_TERMINATED = 128 + int(signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """A SIGTERM, raised where it lands as a Ctrl-C is (see the module)."""


def stop_line(exc: KeyboardInterrupt) -> tuple[str, int]:
    """What a command line says of a stop, after ``error:``, and its exit code:
    ``stopped by SIGTERM`` and :data:`EXIT_TERMINATED` for :class:`Terminated`,
    ``interrupted`` and 130 for a Ctrl-C; the stop's own text after it (what it
    left behind, from :class:`teacher.interrupts.Closing`)."""
    from flows.errors import EXIT_INTERRUPTED

    said = f" {exc}" if str(exc) else ""
    if isinstance(exc, Terminated):
        return f"stopped by SIGTERM{said}", EXIT_TERMINATED
    return f"interrupted{said}", EXIT_INTERRUPTED


def _raise_terminated(_signum: int, _frame: object) -> None:
    raise Terminated


def stop_on_sigterm() -> Any:
    """Make a SIGTERM raise :class:`Terminated` from now on; return the handler it
    replaced, to put back when the command ends (None where nothing was replaced:
    outside the main thread, or a SIGTERM the process was started ignoring)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    before = signal.getsignal(signal.SIGTERM)
    if before in (signal.SIG_IGN, None):
        return None
    signal.signal(signal.SIGTERM, _raise_terminated)
    return before


def sigterm_is_a_stop() -> bool:
    """Whether a SIGTERM raises :class:`Terminated` now (:func:`stop_on_sigterm`
    was called and its handler is still in place)."""
    return signal.getsignal(signal.SIGTERM) is _raise_terminated


@contextlib.contextmanager
def sigterm_stops(exiting: bool = False) -> Iterator[None]:
    """Within the block a SIGTERM stops the command as a Ctrl-C does
    (:func:`stop_on_sigterm`); the handler in place before is put back after it.

    ``exiting``: the block is a command line's whole run, and the process ends
    after it. When a stop (Ctrl-C or SIGTERM) ends the block, further stops are
    then only noted (:func:`_after_the_stop`) rather than put back to their
    default, which would end the process by the signal while it reports the first
    one and exits (a second SIGTERM, or a SIGTERM after a Ctrl-C)."""
    before = stop_on_sigterm()
    stopped = False
    try:
        yield
    except KeyboardInterrupt:
        stopped = True
        raise
    finally:
        if stopped and exiting:
            _after_the_stop()
        elif before is not None:
            signal.signal(signal.SIGTERM, before)


def _noted(_signum: int, _frame: object) -> None:
    """A stop that comes while the process ends because of an earlier one."""


def _after_the_stop() -> None:
    """Note, and do nothing else on, every further Ctrl-C or SIGTERM (a Python
    handler, not SIG_IGN: programs this one starts get the default back)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) not in (signal.SIG_IGN, None):
            signal.signal(signum, _noted)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within the block a Ctrl-C or SIGTERM is noted and acted on only once it
    ends: for a clean-up step a stop must not cut short (removing a temporary or
    replaced folder). The handlers in place are put back, and the first stop
    noted is then handed to its handler (raised as it would have been, or, for a
    signal left to its default action, sent again). Main thread only; a signal
    that is ignored stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous: dict[int, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if handler in (signal.SIG_IGN, None):
            continue
        previous[signum] = handler
        signal.signal(signum, lambda signum, _frame: noted.append(signum))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if noted:
            signum = noted[0]
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            else:  # SIG_DFL: what the signal would have done
                os.kill(os.getpid(), signum)
