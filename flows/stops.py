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
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = [
    "EXIT_TERMINATED",
    "Terminated",
    "sigterm_is_a_stop",
    "sigterm_stops",
    "stop_on_sigterm",
]

# 128 + SIGTERM: what a shell reports for a process the signal ended, so a
# caller sees the same code whether the handler or the signal ended the run.
EXIT_TERMINATED = 128 + int(signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """A SIGTERM, raised where it lands as a Ctrl-C is (see the module)."""


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
def sigterm_stops() -> Iterator[None]:
    """Within the block a SIGTERM stops the command as a Ctrl-C does
    (:func:`stop_on_sigterm`); the handler in place before is put back after it."""
    before = stop_on_sigterm()
    try:
        yield
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)
