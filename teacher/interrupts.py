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

import atexit
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["Closing", "held", "loading"]


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Run the block with Ctrl-C noted, not raised; raise KeyboardInterrupt after
    it when one came (and the handler it replaced would have raised one).

    A SIGTERM is held the same way where it would end the process (its default)
    or stop the command (:func:`flows.stops.stop_on_sigterm`), and raised after
    the block as :class:`flows.stops.Terminated` (before a Ctrl-C that also came).
    Outside the main thread, where Python's signal handlers do not run, or for a
    signal that is ignored (SIGINT of a job started with ``nohup``), the block
    just runs as far as that signal goes."""
    from flows.stops import Terminated, sigterm_is_a_stop

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}
    sigint = signal.getsignal(signal.SIGINT)
    if sigint not in (signal.SIG_IGN, None):  # ignored, or set outside Python
        previous[signal.SIGINT] = sigint
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or sigterm_is_a_stop():
        previous[signal.SIGTERM] = signal.getsignal(signal.SIGTERM)
    noted: list[int] = []

    def note(signum: int, frame: object) -> None:
        noted.append(signum)

    for signum in previous:
        signal.signal(signum, note)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if signal.SIGTERM in noted:
        raise Terminated
    if noted:
        handler = previous[signal.SIGINT]
        if handler is signal.SIG_DFL:
            raise KeyboardInterrupt
        handler(signal.SIGINT, None)


@contextlib.contextmanager
def loading() -> Iterator[None]:
    """:func:`held` around a command line's imports, and a Ctrl-C that came
    during them ends the command: ``error: interrupted``, exit 130 (a SIGTERM:
    ``error: stopped by SIGTERM``, exit 143)."""
    from flows.stops import stop_line

    try:
        with held():
            yield
    except KeyboardInterrupt as exc:
        line, code = stop_line(exc)
        print(f"error: {line}", file=sys.stderr)
        raise SystemExit(code) from None


class Closing:
    """Ctrl-C once a command's checkpoint is in place: noted, not raised.

    Used as ``with Closing(out) as closing:`` around ``teacher.cli._write_out``
    and the steps after it (the summary line, cleanup); ``thing`` names what is
    written in its messages (default ``the checkpoint OUT``; ``compress run``
    says ``the artifact in OUT``). Until :func:`_write_out` calls
    :meth:`hold`, just before it swaps the new checkpoint in, Ctrl-C stops the
    command as ever (exit 130, the new files removed). From then on the run's work
    is done: a Ctrl-C is noted and the closing steps go on, so the command ends
    with the finished run's exit code and :meth:`note` says that the checkpoint is
    complete. A second Ctrl-C, once the checkpoint is in place, stops the closing
    steps (exit 130, its message saying the same). Python's teardown after the
    command (over a second with torch loaded) then ignores Ctrl-C, as a signal
    there would end the finished run as killed by it (130 to the shell). Only in
    the main thread, where Python's signal handlers live.
    """

    def __init__(self, out: str | Path, thing: str | None = None) -> None:
        self.out = out
        self.thing = thing or f"the checkpoint {out}"
        self.interrupted = False
        self.in_place = False
        self._previous: dict[int, Any] = {}
        self._held = False
        self._by: int | None = None  # the first stop's signal

    def __enter__(self) -> Closing:
        return self

    def hold(self) -> None:
        """From now on a Ctrl-C, or a SIGTERM that the command turned into a stop
        (:func:`flows.stops.stop_on_sigterm`), is noted, not raised (until the
        ``with`` ends)."""
        if self._held or threading.current_thread() is not threading.main_thread():
            return
        self._previous = {signal.SIGINT: signal.signal(signal.SIGINT,
                                                       self._on_interrupt)}
        from flows.stops import sigterm_is_a_stop

        if sigterm_is_a_stop():
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM,
                                                           self._on_interrupt)
        self._held = True

    def placed(self) -> None:
        """The checkpoint is in place: the run has finished, whatever comes next."""
        self.in_place = True
        if self._held:
            _ignore_interrupts_at_exit(list(self._previous))

    def _on_interrupt(self, signum: int, frame: Any) -> None:
        if self.interrupted and self.in_place:
            from flows.stops import Terminated

            stop = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
            raise stop(f"after {self.thing} was written (it is complete)")
        self.interrupted = True
        self._by = self._by or signum

    def __exit__(self, *exc: Any) -> None:
        if self._held:
            for signum, previous in self._previous.items():
                signal.signal(signum, previous)
            self._held = False

    def note(self) -> None:
        """Say on stderr that a stop came once the checkpoint was in place."""
        if self.interrupted and self.in_place:
            how = ("stopped by SIGTERM" if self._by == signal.SIGTERM
                   else "interrupted")
            print(f"note: {how} after {self.thing} was written; it is "
                  "complete and the run has finished", file=sys.stderr)


_IGNORING_AT_EXIT: list[int] = []


def _ignore_interrupts_at_exit(signums: list[int] | None = None) -> None:
    """Make Python's teardown, once a checkpoint is written, ignore Ctrl-C (and
    SIGTERM where the command made it a stop; see :class:`Closing`). Registered
    once per signal and process; it acts only at exit, after the command has
    returned."""
    for signum in signums or [signal.SIGINT]:
        if signum not in _IGNORING_AT_EXIT:
            _IGNORING_AT_EXIT.append(signum)
            atexit.register(signal.signal, signum, signal.SIG_IGN)
