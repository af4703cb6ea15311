"""The ``edge-agent`` command's first step, before the heavy imports.

``systemctl reload`` sends SIGHUP, whose default action ends a process, and
systemd counts an end by SIGHUP as a clean one, so ``Restart=on-failure`` would
not start the agent again: a reload in the second or so an agent spends importing
numpy and loading its model would leave the gateway unwatched. SIGHUP is ignored
here until ``run`` puts its reload handler in place (other commands get the
default back at once), and a Ctrl-C during the imports ends with the usual line
instead of a traceback.
"""

from __future__ import annotations

import signal
import sys

EXIT_INTERRUPTED = 130  # as flows.errors.EXIT_INTERRUPTED, not imported yet


def main() -> int:
    """Entry point of ``edge-agent``: hold SIGHUP off, then hand over to the CLI."""
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        from edge_agent.cli import main as cli_main
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return cli_main()
