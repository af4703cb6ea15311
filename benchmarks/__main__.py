"""``python -m benchmarks COMMAND``: the benchmark commands.

``run`` measures every model, target and pipeline stage and writes the report (see
:mod:`benchmarks.run`); ``demo`` is the end-to-end demo (:mod:`benchmarks.demo`).
"""

from __future__ import annotations

import sys

COMMANDS = {
    "run": "benchmarks.run",
    "demo": "benchmarks.demo",
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the command's own ``main``; returns its exit code."""
    import importlib

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in COMMANDS:
        print(
            "usage: python -m benchmarks {run,demo} [options]\n"
            "  run   measure every model, target and pipeline stage; write the report\n"
            "  demo  the main job end to end",
            file=sys.stderr,
        )
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    module = importlib.import_module(COMMANDS[args[0]])
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
