"""The exception tree and exit codes shared by every gatewatch package.

Every error a user can cause or meet derives from :class:`GatewatchError`, so a
command-line entry point catches one type, prints its message and exits with the
code the error carries. Third-party errors are translated where they enter and
chained (``raise ... from exc``)::

    GatewatchError
    ├── UsageError            wrong flags or settings (exit 2)
    ├── BadInputError         input that cannot be read at all (exit 3)
    │   └── PartialInputError input damaged part way; what came before is kept (4)
    ├── DataMissingError      a dataset file is absent or fails its checksum (exit 3)
    ├── ModelError            a model, checkpoint or artifact is unusable (exit 1)
    │   └── ExportError       a converter failed or crashed for a target (exit 1)
    ├── GateError             no compressed artifact met the quality gate (exit 5)
    ├── TransportError        the broker cannot be reached or refused us (exit 6)
    └── OutboxError           the outbox file refused a read or a write (exit 6)

This module imports nothing outside the standard library: the edge agent uses it.
"""

from __future__ import annotations

import re

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_PARTIAL_INPUT = 4
EXIT_GATE = 5
EXIT_UNAVAILABLE = 6
EXIT_INTERRUPTED = 130


class GatewatchError(Exception):
    """Root of every error gatewatch raises on purpose.

    Its text is always one line without control characters (see :func:`one_line`):
    every tool prints it as ``error: <text>``, and a file name or a quoted value in
    a message must not break that line or reach the terminal as an escape code.
    """

    exit_code = EXIT_FAILURE

    def __str__(self) -> str:
        return one_line(super().__str__())


_LINE_BREAK = re.compile(r"\s*[\r\n]+\s*")
_BREAK_AFTER_STOP = re.compile(r"(?<=[.,;:!?])\s*[\r\n]+\s*")
_BREAK_BEFORE_CLOSE = re.compile(r"\s*[\r\n]+\s*(?=[)\]]|$)")
# C0 and C1 controls (U+009B is an 8-bit CSI, a terminal escape on its own), DEL,
# and the line and paragraph separators, which split what a terminal or log shows.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def json_problem(exc: BaseException) -> str:
    """What was wrong with a JSON text, for an error message: the parser's words,
    or "nested too deeply" for a RecursionError (``[[[...]]]`` thousands of levels
    deep), whose own words mean nothing to a user."""
    if isinstance(exc, RecursionError):
        return "arrays or objects nested too deeply"
    return str(exc)


def one_line(text: object) -> str:
    """``text`` (or ``str()`` of an exception) on one line.

    A library's message quoted inside ours (pyarrow's end with a newline, some
    hold one sentence a line) must not break the ``error:`` line. A line break,
    with the blanks around it, goes before a closing bracket or at the end,
    becomes a space after a stop (``.``, ``;``...) and ``; `` elsewhere. Any
    other control character (a byte of the damaged file that pyarrow quotes) is
    written ``\\xNN``, so nothing reaches the terminal as a control code.
    """
    text = _BREAK_BEFORE_CLOSE.sub("", str(text))
    text = _BREAK_AFTER_STOP.sub(" ", text)
    text = _LINE_BREAK.sub("; ", text)
    return _CONTROL.sub(_escape_control, text)


def printable(text: object) -> str:
    """``text`` (a file name, most often) with every control character escaped.

    A name is quoted exactly, so nothing in it becomes a line break: a newline is
    written ``\\x0a`` (not joined as :func:`one_line` joins a library's lines),
    ESC ``\\x1b``, a C1 control ``\\x9b``, the line and paragraph separators
    ``\\u2028`` and ``\\u2029``; a file named to forge a second ``error:`` line, or
    to colour the terminal, shows as what it is. Other text is returned unchanged.
    """
    text = str(text)
    if not _CONTROL.search(text):
        return text
    return _CONTROL.sub(_escape_control, text)


def _escape_control(match: re.Match) -> str:
    """One control character as ``\\xNN`` (``\\uNNNN`` past U+00FF), as Zeek and
    the edge agent's ``escape_text`` write it."""
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


class UsageError(GatewatchError):
    """A flag, setting or argument that is not allowed."""

    exit_code = EXIT_USAGE


class BadInputError(GatewatchError):
    """Input that cannot be read; names the file, the place and what was expected."""

    exit_code = EXIT_BAD_INPUT

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        column: str | None = None,
        offset: int | None = None,
        row: int | None = None,
    ) -> None:
        self.path = path
        self.line = line
        self.column = column
        self.offset = offset
        self.row = row  # for inputs without lines (Parquet): the 1-based row
        # One line, whatever the quoted library message held: see one_line.
        super().__init__(self._where() + one_line(message))

    def _where(self) -> str:
        parts = []
        if self.path is not None:
            parts.append(printable(self.path))
        if self.line is not None:
            parts.append(f"line {self.line}")
        if getattr(self, "row", None) is not None:
            parts.append(f"row {self.row}")
        if self.offset is not None:
            parts.append(f"byte offset {self.offset}")
        if self.column is not None:
            parts.append(f"column {self.column!r}")
        return ": ".join([", ".join(parts), ""]) if parts else ""


class PartialInputError(BadInputError):
    """Input damaged part way; the rows or packets read before the damage are kept."""

    exit_code = EXIT_PARTIAL_INPUT


class DataMissingError(GatewatchError):
    """A dataset file is missing or its checksum does not match the registry."""

    exit_code = EXIT_BAD_INPUT


class ModelError(GatewatchError):
    """A model, checkpoint or artifact that cannot be built, loaded or trusted."""


class ExportError(ModelError):
    """A converter failed, or crashed in its subprocess, for one target."""


class GateError(GatewatchError):
    """No compressed artifact met the quality gate."""

    exit_code = EXIT_GATE


class TransportError(GatewatchError):
    """The MQTT broker cannot be reached, or refused a connection or a message."""

    exit_code = EXIT_UNAVAILABLE


class OutboxError(GatewatchError):
    """The outbox file refused a read or a write (disk full, I/O error, late damage).

    Exit 6 like a broker outage: escalations could not be kept for delivery.
    """

    exit_code = EXIT_UNAVAILABLE

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        super().__init__(f"{printable(path)}: {message}" if path else message)
