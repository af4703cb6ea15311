"""Splitting a delimited text block into string columns, keeping each row's line."""

from __future__ import annotations

import io
import re

import numpy as np

from flows.errors import BadInputError
from flows.readers._finish import Problem
from flows.readers._lazy import LazyModule
from flows.readers._source import MAX_LINE_BYTES, NOT_UTF8, long_lines, too_long

pa = LazyModule("pyarrow")
pacsv = LazyModule("pyarrow.csv")

_CR_AT_END = re.compile(rb"\r+\n")
_CR_INSIDE = "a carriage return (CR) inside the line, not at its end"
# A line of spaces or tabs only (not empty), inside a body and at its start.
_SPACES_LINE = re.compile(rb"\n[ \t\x0b\x0c]+(?:\n|\Z)")
_SPACES_FIRST = re.compile(rb"[ \t\x0b\x0c]+(?:\n|\Z)")


def split_rows(
    body: bytes,
    names: list[str],
    delimiter: str,
    *,
    path: str,
    first_line: int,
    quote: str | bool = False,
    include: list[int] | None = None,
    blank: dict | None = None,
) -> tuple[pa.Table, np.ndarray, list[Problem], str | None]:
    """Split ``body`` (rows only, no header) into string columns.

    Returns the table (column ``c<i>`` for ``names[i]``; only the indices in
    ``include`` when given), the line of each row, the lines that are bad (wrong
    number of fields, bytes that are not UTF-8, a CR inside the line, a line over
    ``MAX_LINE_BYTES``), and a note when the last line is cut short (no final
    newline and too few fields). CRs at the end of a line (CRLF files) are dropped.

    Lines of spaces only are dropped as blank when the body has an empty line too,
    else left to be split (one field). ``blank``, for a body that is one piece of
    a larger one: ``blank["drop"]`` true drops them in any case (an earlier piece
    had an empty line); set on return are ``blank["empty"]`` (this piece has an
    empty line) and ``blank["spaces"]`` (it left a line of spaces to be split).
    """
    line_map = None
    problems: list[Problem] = []

    # A line longer than pyarrow's block makes the whole split fail ("straddling
    # object"), losing every row: such lines go first, as bad lines.
    if long_lines(body):
        lengths: list[int] = []

        def over(raw: bytes) -> bool:
            if len(raw) > MAX_LINE_BYTES:
                lengths.append(len(raw))
                return True
            return False

        body, line_map, removed = _drop_lines(
            body, _numbering(line_map, first_line), over
        )
        problems += [
            Problem(n, None, too_long(size))
            for n, size in zip(removed, lengths, strict=True)
        ]

    # pyarrow ends a row at a lone CR too, which would shift every row number
    # after it: CRs that end a line go, a line with a CR inside it is a bad line.
    if b"\r" in body:
        body = _CR_AT_END.sub(b"\n", body).rstrip(b"\r")
        if b"\r" in body:
            body, line_map, removed = _drop_lines(
                body, _numbering(line_map, first_line), lambda ln: b"\r" in ln
            )
            problems += [Problem(n, None, _CR_INSIDE) for n in removed]

    # Blank lines are skipped; the line of every row kept is remembered.
    empty = b"\n\n" in body or body.startswith(b"\n")
    if blank is not None:
        blank["empty"] = empty
        blank["spaces"] = False
        if blank.get("drop"):
            empty = True
        elif not empty:
            blank["spaces"] = bool(
                _SPACES_LINE.search(body) or _SPACES_FIRST.match(body)
            )
    if empty:
        body, line_map, _ = _drop_lines(
            body, _numbering(line_map, first_line), lambda ln: not ln.strip()
        )

    # Lines that are not UTF-8 are bad lines, dropped before the parse: pyarrow would
    # refuse the block, and its invalid-row handler cannot decode such a line.
    if not body.isascii() and not_utf8(body):
        body, line_map, removed = _drop_lines(
            body, _numbering(line_map, first_line), not_utf8
        )
        problems += [Problem(n, None, NOT_UTF8) for n in removed]

    try:
        if body.strip(b"\n"):
            table, invalid = _parse(body, names, delimiter, quote, include)
        else:
            # No rows left (a header only, or every line dropped above): pyarrow
            # would refuse it as an "Empty CSV file"; the lines dropped are named.
            table, invalid = _no_rows(names, include), []
    except pa.ArrowInvalid as exc:
        raise BadInputError(f"cannot split rows ({exc})", path=path) from exc

    def line_of(physical: int) -> int:
        if line_map is not None:
            return int(line_map[physical - 1])
        return first_line + physical - 1

    n_physical = table.num_rows + len(invalid)
    good = np.ones(n_physical, dtype=bool)
    cut = None
    for number, actual in invalid:
        good[number - 1] = False
        line = line_of(number)
        last = number == n_physical and not body.endswith(b"\n")
        if last and actual < len(names):
            cut = (
                f"{path}: the last line ({line}) is cut short "
                f"({actual} of {len(names)} fields)"
            )
            continue
        problems.append(
            Problem(
                line,
                None,
                f"expected {len(names)} fields separated by {delimiter!r}, "
                f"found {actual}",
            )
        )
    physical = np.flatnonzero(good)
    lines = line_map[physical] if line_map is not None else physical + first_line
    return table, lines.astype(np.int64), problems, cut


def _parse(body, names, delimiter, quote, include):
    """One pyarrow.csv pass, every column as text; invalid rows are collected."""
    invalid: list[tuple[int, int]] = []

    def on_invalid(row) -> str:
        invalid.append((row.number, row.actual_columns))
        return "skip"

    cols = [f"c{i}" for i in range(len(names))]
    table = pacsv.read_csv(
        io.BytesIO(body),
        read_options=pacsv.ReadOptions(
            column_names=cols, use_threads=False, block_size=1 << 24
        ),
        parse_options=pacsv.ParseOptions(
            delimiter=delimiter,
            quote_char=quote,
            escape_char=False,
            newlines_in_values=False,
            ignore_empty_lines=True,
            invalid_row_handler=on_invalid,
        ),
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in cols},
            include_columns=None if include is None else [cols[i] for i in include],
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
            null_values=[],
        ),
    )
    return table, invalid


def _no_rows(names: list[str], include: list[int] | None) -> pa.Table:
    """The table of no rows :func:`_parse` would give: the same text columns."""
    keep = range(len(names)) if include is None else include
    return pa.table({f"c{i}": pa.array([], pa.string()) for i in keep})


def _numbering(line_map: np.ndarray | None, first_line: int):
    """``number_of`` for :func:`_drop_lines`: the file line of the body's line i."""
    if line_map is None:
        return lambda i: first_line + i
    return lambda i: int(line_map[i])


def _drop_lines(body: bytes, number_of, drop) -> tuple[bytes, np.ndarray, list[int]]:
    """Remove the lines for which ``drop(line)`` holds.

    ``number_of(i)`` is the file line of the body's line ``i``. Returns the new body
    (still unterminated when the old one was), the file line of each kept line, and
    the file lines removed.
    """
    if not body:  # every line went already (all of them bad, say): none to drop
        return body, np.zeros(0, dtype=np.int64), []
    parts = body.split(b"\n")
    terminated = body.endswith(b"\n")
    if terminated:
        parts.pop()
    kept, numbers, removed = [], [], []
    for i, raw in enumerate(parts):
        if drop(raw):
            removed.append(number_of(i))
            continue
        kept.append(raw)
        numbers.append(number_of(i))
    text = b"\n".join(kept)
    if kept and (terminated or numbers[-1] != number_of(len(parts) - 1)):
        text += b"\n"
    return text, np.array(numbers, dtype=np.int64), removed


def not_utf8(raw: bytes) -> bool:
    """Whether ``raw`` holds bytes that are not UTF-8."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def header_and_body(data: bytes) -> tuple[str, bytes]:
    """The first line (BOM and CR stripped) and the bytes after it."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    end = data.find(b"\n")
    end = len(data) if end < 0 else end
    return data[:end].decode("utf-8", "replace").rstrip("\r"), data[end + 1 :]
