"""Ctrl-C while a command loads its libraries: held until the loading is done.

A KeyboardInterrupt raised in the middle of an import can leave a library half
loaded, or worse: torch's C++ code imports numpy itself and, when that import
fails (a Ctrl-C in it), clears the error and carries on, so the Ctrl-C is lost
and the run dies later on ``module 'numpy' has no attribute 'nonzero'``; a
KeyboardInterrupt thrown through pybind11 while torch loads aborts the process.
:func:`held` replaces the SIGINT handler by one that only notes the signal, and
raises KeyboardInterrupt once its block is done (the command line turns that into
``error: interrupted``, exit 130). Standard library only: the entry points use it
before anything else is imported.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

__all__ = ["held", "loading"]


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Run the block with Ctrl-C noted, not raised; raise KeyboardInterrupt after
    it when one came (and the handler it replaced would have raised one).

    Outside the main thread, where Python's signal handlers do not run, or where
    SIGINT is ignored (a job started with ``nohup``), the block just runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous in (signal.SIG_IGN, None):  # ignored, or set outside Python
        yield
        return
    noted: list[int] = []

    def note(signum: int, frame: object) -> None:
        noted.append(signum)

    signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if noted:
        if previous is signal.SIG_DFL:
            raise KeyboardInterrupt
        previous(signal.SIGINT, None)


@contextlib.contextmanager
def loading() -> Iterator[None]:
    """:func:`held` around a command line's imports, and a Ctrl-C that came
    during them ends the command: ``error: interrupted``, exit 130."""
    try:
        with held():
            yield
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
