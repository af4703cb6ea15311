"""The ``flows`` command: look inside traffic record files and convert them.

``flows inspect FILE...`` says what a file is (format, rows, labels, nulls per
column, time span; for captures what the flow meter counted) and ``flows convert
FILE... -o OUT`` writes canonical Parquet or a Zeek-style conn.log. ``-`` as a
FILE reads standard input (any text format, gzip or not, or Parquet); a pcap or
pcapng capture is refused there (exit 2), as the flow meter needs its file name.
An ``-o`` file that already exists is refused (exit 2) unless ``--force`` is
given; the output is written beside it and renamed into place, so a failed write
keeps the old file.

Ctrl-C (SIGINT, exit 130) and SIGTERM (exit 143) end a run with one ``error:``
line; before ``convert``'s output is complete they leave an existing ``-o`` file
as it was and no temporary file. One that comes as the finished output is renamed
into place is dropped: the output is written, and the run ends as finished (its
``wrote`` line and exit code).

``flows inspect --json`` prints one JSON object on standard output whatever the
exit code: ``error`` (null, or the error line's text, which still goes to
standard error too), ``exit_code``, and what was read so far (``format``,
``rows``, ``labels``...) where anything was.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn

import pyarrow.compute as pc

from flows.argtypes import zone_name
from flows.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL_INPUT,
    EXIT_USAGE,
    BadInputError,
    GatewatchError,
    PartialInputError,
    UsageError,
    one_line,
    printable,
)
from flows.outfile import (
    check_output,
    put_in_place,
    refuse_existing,
    temporary_beside,
)
from flows.readers.result import damaged_packets
from flows.stops import EXIT_TERMINATED, stop_line, stop_on_sigterm

EPILOG = f"""\
exit codes:
  {EXIT_OK}    ok (with --on-error skip, skipped lines are counted on stderr)
  {EXIT_FAILURE}    failure: the output cannot be written
  {EXIT_USAGE}    usage: bad flags or arguments; a convert -o file that already
       exists (without --force); an -o that is empty, -, a folder, a
       device, FIFO or socket, or in a folder that does not exist or
       cannot be written in (with --force too; before anything is read)
  {EXIT_BAD_INPUT}    bad input: unknown format, a missing required column, a bad
       value with nothing read before it (--on-error fail), every line
       bad (--on-error skip; convert then writes nothing), or damage
       before the first row
  {EXIT_PARTIAL_INPUT}    partial input: damage part way (a cut gzip or last line,
       a bad line with --on-error fail: a bad value, an address that
       is not IPv4/IPv6, a port outside 0..65535, a proto that names
       no protocol (nor a number 0..255), a line over 1 MiB;
       gzip text past $GATEWATCH_MAX_INFLATED bytes, 2 GiB by
       default); the rows read before it are still shown or written.
       Damaged packets in a capture (a time before 1970 or past
       9999, a fraction of a second of a whole second or more,
       cut headers) are skipped and the read goes on: exit 4
       too, the error line saying how many and where the first was
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C, SIGINT)
  {EXIT_TERMINATED}  stopped by SIGTERM (in the first moments, while Python itself
       starts, SIGTERM ends the process by the signal: also {EXIT_TERMINATED})
a Ctrl-C or SIGTERM before convert's output is complete leaves an existing
-o file as it was and no temporary file; one that comes as the finished
output is renamed into place changes nothing: it is written, and the run
ends as finished (its "wrote" line and exit code)
a standard output whose reader went away (| head, a closed pipe) is not an
error: the rest of the output is dropped, errors still go to stderr and
the exit code is the read's own (0 when nothing else went wrong)
inspect --json prints one JSON object on stdout with every exit code:
"error" (null, or the error line, also on stderr), "exit_code", and
what was read so far where anything was
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``flows`` and its subcommands."""
    parser = _Parser(
        prog="flows",
        description="Inspect and convert traffic record files (Zeek conn.log TSV/JSON, "
        "Argus binetflow, NSL-KDD, UNSW-NB15, CICFlowMeter CSV, Parquet, pcap).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = _Parser(add_help=False)
    common.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="input file(s), read together (same family); - reads standard input "
        "(text or Parquet; a capture needs its file name)",
    )
    common.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default="fail",
        help="fail: stop at the first bad line, keeping the rows before it (exit "
        "4); skip: drop and count bad lines (default: fail)",
    )
    common.add_argument(
        "--data-dir",
        metavar="DIR",
        default=None,
        help="look up relative FILE names that are not found here under DIR "
        "(default: $GATEWATCH_DATA), e.g. nsl-kdd/KDDTest+.txt",
    )
    common.add_argument(
        "--timezone",
        metavar="ZONE",
        type=zone_name,
        default="UTC",
        help="the time zone an Argus binetflow file's StartTime is written in, as "
        "an IANA name such as Europe/Prague: Argus writes the local time of the "
        "machine it ran on, without a zone, and this turns it into epoch seconds "
        "(ts); so is a Parquet ts held as a timestamp without a zone (one with a "
        "zone is read as the instant it is); other formats carry epoch times and "
        "ignore it (default: UTC)",
    )
    common.add_argument(
        "--drop-unlabeled",
        action="store_true",
        help="leave out rows whose label is unknown (Background, Unknown) "
        "(default: keep them, label null)",
    )

    inspect = sub.add_parser(
        "inspect",
        parents=[common],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="format, rows, labels, nulls per column, time span",
        description="Say what is in a file (or several read together).",
    )
    inspect.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object instead of text (default: text)",
    )

    convert = sub.add_parser(
        "convert",
        parents=[common],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="write canonical Parquet or a Zeek-style conn.log",
        description="Convert input files into one output file.",
    )
    convert.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT",
        help="output file in an existing folder, written beside it and renamed "
        "into place once it is complete (required); an existing file is refused "
        "(a link too, a dangling one included) before anything is read, exit 2, "
        "unless --force; refused with --force too: an empty name, - (no standard "
        "output), a folder or a name ending in a slash (convert writes one "
        "file), a device, FIFO or socket, a folder that does not exist or "
        "cannot be written in",
    )
    convert.add_argument(
        "--force",
        action="store_true",
        help="let -o replace an existing regular file; a failed write keeps the "
        "old one; through a link the file it names is written and the link "
        "stays (default: refuse it)",
    )
    convert.add_argument(
        "--format",
        choices=("parquet", "zeek"),
        default=None,
        help="output format (default: zeek for a .log, .labeled or .conn.log "
        "name, parquet for a .parquet or .pq name or one without a suffix; "
        "without --format any other suffix, such as .csv or .feather, is "
        "refused, exit 2, as is a .log name with --format parquet or a "
        ".parquet one with --format zeek)",
    )
    return parser


class _ArgumentError(Exception):
    """A command line argparse refused: its message and the parser that said so."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser
        self.message = message


class _Parser(argparse.ArgumentParser):
    """argparse's parser, raising :class:`_ArgumentError` instead of exiting, so
    that ``inspect --json`` can print its JSON object for a usage error too."""

    def error(self, message: str) -> NoReturn:
        raise _ArgumentError(self, message)


def main(argv: list[str] | None = None) -> int:
    """Run ``flows``; returns the exit code (see the epilog)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    except BrokenPipeError:  # --help into a closed pipe
        _drop_stdout()
        return EXIT_OK
    except _ArgumentError as exc:
        # As argparse itself reports one: usage, then "PROG: error: MESSAGE".
        exc.parser.print_usage(sys.stderr)
        print(f"{exc.parser.prog}: error: {exc.message}", file=sys.stderr)
        if _wants_json(argv):
            _print_json({"error": exc.message, "exit_code": EXIT_USAGE})
        return EXIT_USAGE
    before = stop_on_sigterm()
    try:
        if args.command == "inspect":
            return _inspect(args)
        return _convert(args)
    except KeyboardInterrupt as exc:  # a Ctrl-C, or a SIGTERM (Terminated)
        line, code = stop_line(exc)
        print(f"error: {line}", file=sys.stderr)
        _failed_json(args, line, code)
        return code
    except GatewatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        _failed_json(args, str(exc), exc.exit_code, getattr(exc, "result", None))
        return exc.exit_code
    except MemoryError:
        # Past the readers' own checks (an input read whole says so itself): a
        # failure, not a traceback.
        error = f"{_where(args)}: ran out of memory while reading or writing it"
        print(f"error: {error}", file=sys.stderr)
        _failed_json(args, error, EXIT_FAILURE)
        return EXIT_FAILURE
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)


class _StopsHeld:
    """Inside the ``with`` block a Ctrl-C (SIGINT) or SIGTERM is dropped, not
    acted on; the handlers in place before are put back as it ends. For steps a
    stop must not split, after which nothing is left to stop: the finished
    output renamed into place and reported, a temporary file removed. Only in
    the main thread, and an ignored signal stays ignored."""

    def __init__(self) -> None:
        self._before: dict[int, object] = {}

    def __enter__(self) -> _StopsHeld:
        if threading.current_thread() is not threading.main_thread():
            return self
        try:
            for signum in (signal.SIGINT, signal.SIGTERM):
                before = signal.getsignal(signum)
                if before not in (signal.SIG_IGN, None):
                    self._before[signum] = before
                    signal.signal(signum, self._drop)
        except BaseException:
            self.__exit__()  # stopped half way in: the handlers are put back
            raise
        return self

    def _drop(self, _signum: int, _frame: object) -> None:
        """The handler while held: the stop changes nothing."""

    def __exit__(self, *_exc: object) -> None:
        for signum, before in self._before.items():
            signal.signal(signum, before)


def _wants_json(argv: list[str]) -> bool:
    """Whether a command line argparse refused asked for ``inspect --json``.

    argparse takes an unambiguous prefix of an option (``--js``); ``--j`` can
    only be ``--json`` among inspect's options. Words after ``--`` are files.
    """
    if not argv or argv[0] != "inspect":
        return False
    words = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
    return any(len(w) >= 3 and "--json".startswith(w) for w in words)


def _failed_json(args, error: str, code: int, result=None) -> None:
    """With ``inspect --json``, the JSON object of a run that ended in an error
    raised before its summary was printed: what was read so far (when the error
    carries a partial result), the error line's text and the exit code."""
    if args.command != "inspect" or not args.json:
        return
    summary = summarize(result) if result is not None else {}
    summary.update(error=error, exit_code=code)
    _print_json(summary)


def _print_json(summary: dict) -> None:
    """Print one JSON object on standard output (``inspect --json``)."""
    _emit(json.dumps(_jsonable(summary), indent=2, sort_keys=False))


def _emit(text: str) -> None:
    """Write ``text`` and a line end on standard output, flushed at once.

    When the reader of standard output went away (``| head``, ``| true``) the
    rest of the output is dropped and the run goes on, so what it has to say on
    standard error and its exit code do not depend on who reads standard output;
    so is it when standard output was closed before the start (``>&-``: Python
    then has no ``sys.stdout``, or one whose descriptor is not open).
    """
    if sys.stdout is None:
        return
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        _drop_stdout()
    except (OSError, ValueError):  # a closed descriptor (EBADF), a closed file
        sys.stdout = None


def _drop_stdout() -> None:
    """Point standard output at the null device: the reader of the pipe is gone,
    and what is still buffered, or written later, must not fail again (nor at
    exit, where Python would print "Exception ignored" and exit 120)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _read(args):
    """Read the inputs; a partial read returns its rows and the error to report."""
    from flows.readers import read

    if args.files.count("-") > 1:
        raise UsageError("- (standard input) can be given only once")
    files = [_locate(name, args.data_dir) for name in args.files]
    try:
        result = read(
            files,
            on_error=args.on_error,
            drop_unlabeled=args.drop_unlabeled,
            timezone=args.timezone,
        )
    except PartialInputError as exc:
        unread = _after(files, exc.path)
        if unread:
            print(
                f"warning: {len(unread)} input(s) after {printable(exc.path)} were "
                f"not read: {', '.join(map(printable, unread))} (--on-error skip "
                "reads past bad rows)",
                file=sys.stderr,
            )
        return exc.result, exc
    return result, None


def _after(files: list[str], path: str | None) -> list[str]:
    """The inputs listed after ``path``: those a read stopped at ``path`` missed."""
    for i, name in enumerate(files):
        if path is not None and (name == path or (
                name != "-" and Path(name).resolve() == Path(path).resolve())):
            return files[i + 1:]
    return []


def _locate(name: str, data_dir: str | None) -> str:
    """``name`` itself when it exists, else under the data folder when found there."""
    if name == "-":
        return name
    path = Path(name)
    base = data_dir or os.environ.get("GATEWATCH_DATA")
    if path.exists() or path.is_absolute() or not base:
        return name
    candidate = Path(base) / path
    return str(candidate) if candidate.exists() else name


def summarize(result) -> dict:
    """The facts ``flows inspect`` reports about a ReadResult, JSON-ready."""
    table = result.table
    summary: dict = {
        "format": result.format,
        "family": result.family,
        "rows": table.num_rows,
        # Counted over the rows kept (not bad rows, rows after a stop, or rows
        # --drop-unlabeled left out), as everything else here.
        "labels": result.stats.get("labels", {}),
        "label_values": _label_values(table),
        "nulls": {
            name: table.column(name).null_count
            for name in table.column_names
            if table.column(name).null_count
        },
        "skipped": result.skipped,
        "partial": result.partial,
        "warnings": result.warnings,
    }
    if "ts" in table.column_names and table.num_rows:
        low, high = pc.min_max(table.column("ts")).values()
        low, high = low.as_py(), high.as_py()
        summary["time_span"] = {
            "first": low,
            "last": high,
            "seconds": (
                round(high - low, 6) if low is not None and high is not None else None
            ),
        }
    extra = {k: v for k, v in result.stats.items() if k not in ("labels",)}
    if extra:
        summary["stats"] = extra
    return summary


def _label_values(table) -> dict:
    if "label" not in table.column_names:
        return {}
    counts = {"1": 0, "0": 0, "null": 0}
    for item in pc.value_counts(table.column("label")).to_pylist():
        key = "null" if item["values"] is None else str(item["values"])
        counts[key] = counts.get(key, 0) + item["counts"]
    return counts


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return str(value)


def _inspect(args) -> int:
    result, partial = _read(args)
    summary = summarize(result)
    if not args.json:
        _print_text(summary)
        return _finish_code(result, partial, _where(args))
    code, error = _ending(result, partial, _where(args))
    summary.update(error=error, exit_code=code)
    _print_json(summary)
    return code


def _print_text(summary: dict) -> None:
    """Print the summary for people on standard output (``inspect``)."""
    lines: list[str] = []
    add = lines.append
    add(f"format:   {summary['format']} (family {summary['family']})")
    add(f"rows:     {summary['rows']}")
    if summary.get("time_span"):
        span = summary["time_span"]
        add(f"ts:       {span['first']} .. {span['last']} ({span['seconds']} s)")
    if summary["labels"]:
        add("labels:")
        for key, count in summary["labels"].items():
            add(f"  {key!s:<40} {count}")
    if summary["label_values"]:
        values = summary["label_values"]
        add(f"label:    1={values['1']} 0={values['0']} null={values['null']}")
    if summary["nulls"]:
        add("nulls:")
        for key, count in summary["nulls"].items():
            add(f"  {key:<40} {count}")
    for key, value in summary.get("stats", {}).items():
        # files: one line per input would swamp the rest; format and the first
        # and last ts are shown above already.
        if key not in ("files", "format", "first_ts", "last_ts"):
            # A list of line numbers must not read as a count ("18").
            label = {"skipped_lines": "skipped at lines (first 20)"}.get(key, key)
            add(f"{label}: {_plain(value)}")
    if summary["skipped"]:
        add(f"skipped:  {summary['skipped']} bad {_unit(summary['format'])}")
    for note in summary["warnings"]:
        add(f"warning:  {one_line(note)}")
    _emit("\n".join(lines))


def _plain(value) -> str:
    """A stats value as text for people: ``a=1, b=2`` for a mapping, items joined
    by ``; `` for a list, ``-`` for none (not Python's reprs)."""
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_plain(v)}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        return "; ".join(_plain(v) for v in value) or "-"
    return str(value)


def _unit(fmt: str) -> str:
    """What a reader of this format skips: lines of text, or a capture's records."""
    return "packet record(s)" if fmt in ("pcap", "pcapng") else "line(s)"


def _finish_code(result, partial: PartialInputError | None, where: str) -> int:
    """Report on stderr how the read of ``where`` ended; return 0, 3 when nothing
    usable was read (every line skipped, or damage before the first row), or 4 for
    a partial input."""
    return _ending(result, partial, where)[0]


def _ending(
    result, partial: PartialInputError | None, where: str
) -> tuple[int, str | None]:
    """As :func:`_finish_code`, returning the exit code and the error line's text
    (None when there is none), for ``inspect --json``."""
    if partial is not None:
        error = str(partial)
        print(f"error: {error}", file=sys.stderr)
        return EXIT_PARTIAL_INPUT, error
    unit = _unit(result.format)
    if result.skipped:
        print(f"note: skipped {result.skipped} bad {unit}", file=sys.stderr)
    empty = result.table.num_rows == 0
    if empty and result.skipped:
        error = (
            f"{where}: every one of the {result.skipped} {unit} read was bad "
            "and skipped; nothing usable was read" + _first_damage(result)
        )
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT, error
    if result.partial:
        error = one_line(_damage_sentence(result, where, empty))
        print(f"error: {error}", file=sys.stderr)
        return (EXIT_BAD_INPUT if empty else EXIT_PARTIAL_INPUT), error
    return EXIT_OK, None


def _first_damage(result) -> str:
    """Why a capture's packets were skipped, for the error line of a read that
    kept none: ``; the first at byte offset 24: unknown link type 65535``, and the
    counts by reason when there are several; empty when no damaged packet was
    recorded."""
    # TODO(gap): skipped text lines (--on-error skip) are named only in the warning
    # line; tests/test_flows_cli.py pins that error line word for word.
    for found in result.damage:
        if not found.stopped and found.records:
            at = f" at {found.place}" if found.place else ""
            reasons = result.stats.get("skipped")
            counts = (
                f" (skipped by reason: {_plain(reasons)})"
                if isinstance(reasons, dict) and len(reasons) > 1 else ""
            )
            return f"; the first{at}: {found.what}{counts}"
    return ""


def _damage_sentence(result, where: str, empty: bool) -> str:
    """Where each input was damaged and what came of it, as one sentence.

    A read that stopped at the damage (a cut, bytes that are no record) kept only
    the rows before it; damaged packets a capture read went on past were skipped
    (or read as far as they go) and the other packets' rows were kept.
    """
    stopped_in = {found.path for found in result.damage if found.stopped}
    parts, last_path = [], None
    for found in result.damage:
        who = "then" if found.path == last_path else printable(found.path) + ":"
        last_path = found.path
        at = f" at {found.place}" if found.place else ""
        if found.stopped:
            parts.append(f"{who} damaged part way{at}: {found.what}")
            continue
        first = f"{at}" if found.records == 1 else f", the first{at}"
        part = f"{who} {damaged_packets(found)}{first}: {found.what}"
        if found.path not in stopped_in and not empty:
            one = found.records == 1
            part += (
                f"; the read went on past {'it' if one else 'them'} and kept the "
                "rows of the other packets"
            )
        parts.append(part)
    if not parts:  # partial, but no place known
        parts.append(f"{where}: damaged part way")
        stopped_in.add(where)
    if empty:
        tail = "nothing usable came before it" if stopped_in else (
            "nothing usable was read"
        )
    elif stopped_in and not any("complete line" in part for part in parts):
        tail = "the rows before it were kept"  # unless the place said so already
    else:
        return "; ".join(parts)
    return "; ".join(parts) + "; " + tail


def _where(args) -> str:
    """The inputs as the user named them, for messages."""
    return ", ".join("standard input" if f == "-" else printable(f) for f in args.files)


def _output_path(name: str) -> Path:
    """The file ``-o`` names, a symlink resolved to its target; refuses (exit 2)
    before anything is read an empty name, ``-``, a folder, a device node, FIFO
    or socket (the final rename would replace it with a regular file; with
    ``--force`` too) and a folder that does not exist or cannot be written in
    (:func:`flows.outfile.check_output`, shared with ``edge-agent pack-update``).
    """
    return check_output(name, "-o", "flows.parquet")


# What convert writes, by the name's suffix: the format each suffix means.
WRITTEN_SUFFIXES = {
    ".parquet": "parquet", ".pq": "parquet", ".log": "zeek", ".labeled": "zeek",
}
# Suffixes of formats convert reads but does not write, with the format's name
# for the message; any other suffix not in WRITTEN_SUFFIXES is refused too.
OTHER_SUFFIXES = {
    ".csv": "CSV", ".tsv": "TSV", ".txt": "text", ".json": "JSON",
    ".jsonl": "JSON lines", ".ndjson": "JSON lines", ".gz": "gzip",
    ".binetflow": "Argus binetflow", ".pcap": "pcap", ".pcapng": "pcapng",
    ".arff": "ARFF",
}


def _output_format(out: Path, given: str | None) -> str:
    """The format to write to ``out``: ``--format``, else what the suffix says
    (``.log``, ``.labeled``, ``.conn.log``: zeek; ``.parquet``, ``.pq`` or none:
    parquet). Without ``--format`` any other suffix (``x.csv``, ``x.feather``,
    ``x.log `` with a trailing space) is a usage error, as is the other written
    format's suffix with ``--format`` (``x.log`` with ``--format parquet``),
    rather than a file whose name misleads every later reader."""
    suffix = out.suffix.lower()
    if given is None and suffix and suffix not in WRITTEN_SUFFIXES:
        names = (
            f"{suffix} names {OTHER_SUFFIXES[suffix]}, which convert does not write"
            if suffix in OTHER_SUFFIXES
            else f"the suffix {suffix!r} is not one convert writes"
        )
        raise UsageError(
            f"-o {out.name}: {names}; it writes canonical Parquet (.parquet) or a "
            "Zeek-style conn.log (.log): name the output so (accepted: .parquet, "
            ".pq or no suffix for Parquet; .log, .labeled or .conn.log for Zeek), "
            "or, to keep the name, choose one of the two with --format"
        )
    named = WRITTEN_SUFFIXES.get(suffix)
    if given is not None and named is not None and named != given:
        raise UsageError(
            f"-o {out.name} names a {named} file, but --format is {given}; name "
            f"the output for {given} ({'.log' if given == 'zeek' else '.parquet'})"
        )
    return given or named or "parquet"


def _discard(tmp: Path) -> None:
    """Remove the temporary output if it is there; never raises (on a read-only
    file system or under a file there is nothing to remove, and the write's own
    error is the one to report)."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def _convert(args) -> int:
    from flows.readers import write_conn_log, write_parquet
    from flows.readers.writers import write_problem

    out = _output_path(args.output)
    fmt = _output_format(out, args.format)

    if args.files.count("-") > 1:
        raise UsageError("- (standard input) can be given only once")
    inputs: dict[Path, str] = {}
    for name in args.files:
        if name == "-":
            continue
        try:
            resolved = Path(name).resolve()
        except (RuntimeError, OSError) as exc:
            raise BadInputError(
                "cannot be read (a symbolic link loop or a bad path)", path=name
            ) from exc
        if resolved == out:
            raise UsageError(f"{out} is also an input; choose another output name")
        if resolved in inputs:
            raise UsageError(
                f"{name} is given twice (as {inputs[resolved]} too); its rows would "
                "be written twice"
            )
        inputs[resolved] = name
    # Refused before the read, as teacher baselines --out is: never overwritten
    # unasked. The name as given is looked at, so a link counts, a dangling one
    # too; with --force the file it points to (out) is written and the link stays.
    refuse_existing(args.output, "-o", args.force)
    result, partial = _read(args)
    if partial is None and result.table.num_rows == 0 and (
        result.skipped or result.partial
    ):
        # Nothing usable: no empty output file in place of what the user wanted
        # (and an existing one is left as it was).
        return _finish_code(result, partial, _where(args))
    if fmt == "zeek" and result.family != "conn":
        raise UsageError(
            f"--format zeek needs conn records; {result.format} is family "
            f"{result.family!r} (write Parquet instead)"
        )
    # One temporary name per process: two converts to one output must not share it.
    tmp = temporary_beside(out)
    try:
        try:
            if fmt == "zeek":
                write_conn_log(result.table, tmp, name=out)
            else:
                write_parquet(result.table, tmp, family=result.family, name=out)
        except OSError as exc:
            raise GatewatchError(
                f"{out}: cannot be written ({write_problem(exc, out)})"
            ) from exc

        # The output is complete: renamed into place and reported as one step. A
        # Ctrl-C or SIGTERM now is dropped; the run ends as finished, as it is.
        with _StopsHeld():
            try:
                put_in_place(tmp, out, args.force)
            except FileExistsError as exc:
                raise GatewatchError(
                    f"{out}: a file appeared there while the input was read; not "
                    "overwritten (--force overwrites it)"
                ) from exc
            except OSError as exc:
                raise GatewatchError(
                    f"{out}: cannot be written ({write_problem(exc, out)})"
                ) from exc
            finally:
                _discard(tmp)
            for note in result.warnings:
                print(f"warning: {one_line(note)}", file=sys.stderr)
            print(
                f"wrote {result.table.num_rows} rows ({result.format} -> {fmt}) to "
                f"{printable(out)}",
                file=sys.stderr,
            )
            return _finish_code(result, partial, _where(args))
    finally:
        # A failed or stopped write: the old output stays and the temporary
        # goes (a second Ctrl-C or a SIGTERM does not cut that short).
        with _StopsHeld():
            _discard(tmp)


if __name__ == "__main__":
    sys.exit(main())
