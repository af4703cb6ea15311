"""The ``edge-agent`` command's first step, before the heavy imports.

``systemctl reload`` sends SIGHUP, whose default action ends a process, and
systemd counts an end by SIGHUP as a clean one, so ``Restart=on-failure`` would
not start the agent again: a reload in the second or so an agent spends importing
numpy and loading its model would leave the gateway unwatched. SIGHUP is ignored
here until ``run`` puts its reload handler in place (other commands get the
default back at once), and a Ctrl-C during the imports ends with the usual line
instead of a traceback.

SIGTERM (``systemctl stop``) gets the same care for ``run``, so that a stop at any
moment ends with a documented exit code and one line, never by the signal:

- while the agent starts (imports, model load, opening the source, waiting for an
  interface), a SIGTERM gives the start up at once: nothing was read, so nothing
  is lost, and the exit is 0 with one ``stopped:`` line
  (:data:`STOPPED_WHILE_STARTING`), as a run stopped before its first flow;
- while ``run`` opens its outbox and alerts file and builds the agent, a SIGTERM
  or Ctrl-C is held (:func:`hold_stops`): cut off between two of its setup steps,
  a new outbox file could be left half made, and the next run would refuse it as
  damaged. It is acted on once ``run``'s own handlers are in place
  (:func:`release_stops`);
- ``run``'s own handler makes a SIGTERM the orderly stop of a running agent;
- once the run's outcome is settled (:func:`settle`: its flows scored and its
  outbox closed), SIGTERM and SIGINT are ignored, also while Python shuts down,
  so the exit code is the run's own.
"""

from __future__ import annotations

import signal
import sys

EXIT_OK = 0  # as flows.errors.EXIT_OK, not imported yet
EXIT_INTERRUPTED = 130  # as flows.errors.EXIT_INTERRUPTED

STOPPED_WHILE_STARTING = (
    "stopped: SIGTERM came while the agent was starting, before it read any flow; "
    "nothing was lost (the outbox is kept as it was)"
)

# What a SIGTERM or SIGINT does, by the step the run is at (see the module doc).
_RAISE, _HOLD, _IGNORE = "raise", "hold", "ignore"
_STOPS = (signal.SIGTERM, signal.SIGINT)
_state: dict[str, object] = {"mode": _RAISE, "held": None}


class StoppedWhileStarting(BaseException):
    """A SIGTERM before ``run`` began reading: the start is given up (exit 0).

    A BaseException, as KeyboardInterrupt is, so that no ``except Exception`` on
    the way (a model load's fallback) takes it for an error and goes on."""


def _on_stop(signum: int, _frame: object) -> None:
    """The handler of SIGTERM and SIGINT outside ``run``'s own (see the module doc)."""
    mode = _state["mode"]
    if mode == _IGNORE:
        return

    if mode == _HOLD:
        if _state["held"] is None:  # the first stop decides
            _state["held"] = signum
        return

    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    _state["mode"] = _IGNORE  # one stop is enough: a second SIGTERM changes nothing
    raise StoppedWhileStarting


def hold_stops() -> None:
    """From now on a SIGTERM or SIGINT is noted, not acted on, until
    :func:`release_stops` (only where :func:`main` installed its handler)."""
    _state["mode"], _state["held"] = _HOLD, None


def release_stops() -> int | None:
    """End :func:`hold_stops`; the signal that came meanwhile, if any (the
    caller acts on it: its own handlers are in place by now)."""
    held = _state["held"]
    _state["mode"], _state["held"] = _RAISE, None
    return held  # type: ignore[return-value]


def settle() -> None:
    """The run's outcome is decided: from now on SIGTERM and SIGINT reaching
    :func:`main`'s handler change nothing."""
    _state["mode"] = _IGNORE


def _command(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names: its first word that is not an option (the
    options before it, ``-v`` and ``-q``, take no value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def main() -> int:
    """Entry point of ``edge-agent``: hold SIGHUP off (and, for ``run``, make
    SIGTERM and SIGINT end the start cleanly), then hand over to the CLI."""
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    guarded = _command(sys.argv[1:]) == "run"
    if guarded:
        _state["mode"], _state["held"] = _RAISE, None
        for signum in _STOPS:
            # One the agent was started with ignored (SIGINT of a job a script
            # put in the background) stays ignored.
            if signal.getsignal(signum) is not signal.SIG_IGN:
                signal.signal(signum, _on_stop)

    try:
        from edge_agent.cli import main as cli_main

        code = cli_main()
    except KeyboardInterrupt:
        settle()
        print("error: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except StoppedWhileStarting:
        settle()
        print(STOPPED_WHILE_STARTING, file=sys.stderr)
        code = EXIT_OK
    finally:
        if guarded:
            # Python puts the default action (an end by the signal) back for
            # signals it handles as it shuts down; an ignored one stays ignored.
            settle()
            for signum in _STOPS:
                signal.signal(signum, signal.SIG_IGN)
    return code
