"""Zeek conn.log readers: the ASCII (TSV) writer's format and the JSON one.

TSV: the ``#separator``/``#fields``/``#types`` header may list the columns in any
order and may lack optional ones (they read as null) or carry extra ones (ignored).
The header's ``#unset_field`` (``-``) reads as null; ``#empty_field`` (``(empty)``)
reads as the empty string in string columns and as null in the label columns.
``\\xHH`` escapes are undone. ``#close`` and other ``#`` lines end a block of rows; a
new ``#fields`` line (concatenated logs) starts one with its own columns.
The rows of a block are split in C by pyarrow.csv; the exact line of any bad row is
still known and reported. A last row with all its fields but no newline, in a log
without any ``#close`` line, is kept with a warning: Zeek may still be writing the
log, so its last value may be cut.

Labels: Stratosphere's separate ``label``/``detailedlabel`` columns, and IoT-23's
layout where ``tunnel_parents   label   detailed-label`` share the last field joined by
runs of spaces (also found when the header names only ``tunnel_parents`` but its
values carry the extra parts). ``label_detail`` is the detailed label when set, else
the label text (``Benign``, ``Background``...). ``stats["labels"]`` counts the label
values as written in the file, in the rows kept.

TSV numbers are ASCII decimal, as Zeek writes them (``443``, ``0.017912``; an
exponent, ``1.6e9``, reads too): ``0x1bb``, ``1_000`` or other scripts' digits
(``４４３``) are bad values (see ``flows.readers._convert.to_number``).

JSON: ``ts`` may be epoch seconds, ISO-8601 text (``JSON::TS_ISO8601``) or integer
milliseconds (``JSON::TS_MILLIS``, told apart by size); omitted keys read as null.
Every field holds one value: a list or an object (``"proto": ["tcp"]``,
``"service": {"a": 1}``) makes the row a bad row, naming the key.
A line nested too deeply for Python's json is a bad line; pyarrow.json never sees
a piece with a line of many brackets (it would crash on it, see ``_FAST_OPENS``).

Both formats are read from pieces of whole lines (a regular file in pieces of about
``flows.readers._source.CHUNK_BYTES``, other input as one piece): the result is the
same however the text is cut.

Zeek's test harness masks times as ``XXXXXXXXXX.XXXXXX``; such a ``ts`` reads as null
and is counted in ``stats["masked_ts"]`` (in the rows kept). A ``ts`` that is not
finite, lies before 1970 (below 0) or at or past the year 10000
(``flows.record.TS_LIMIT``) makes the row a bad row
(``flows.record.time_problem``), as a capture's packet time does.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from flows.errors import BadInputError, json_problem
from flows.readers import labels as labelmod
from flows.readers._convert import (
    BadRows,
    arrow_type,
    check_addresses,
    check_counts,
    check_finite,
    check_ports,
    check_protos,
    check_times,
    null_tokens,
    parse_problem,
    to_number,
    unescape,
    value_counts,
)
from flows.readers._finish import Problem, finish
from flows.readers._lazy import LazyModule
from flows.readers._source import MAX_LINE_BYTES, Source, long_lines, too_long
from flows.readers._table import not_utf8, split_rows
from flows.readers.result import ReadResult
from flows.record import (
    ADDRESS_FIELDS,
    CONN_FIELD_KINDS,
    CONN_FIELD_NAMES,
    COUNT_FIELDS,
    PORT_FIELDS,
    TS_LIMIT,
    conn_schema,
    field_problem,
    field_value_problem,
    proto_text,
    time_problem,
    value_problem,
)

pa = LazyModule("pyarrow")
pc = LazyModule("pyarrow.compute")

# Zeek conn.log column -> canonical field.
ZEEK_TO_CANON: dict[str, str] = {
    "ts": "ts",
    "uid": "uid",
    "id.orig_h": "src_ip",
    "id.orig_p": "src_port",
    "id.resp_h": "dst_ip",
    "id.resp_p": "dst_port",
    "proto": "proto",
    "service": "service",
    "duration": "duration",
    "orig_bytes": "orig_bytes",
    "resp_bytes": "resp_bytes",
    "orig_pkts": "orig_pkts",
    "resp_pkts": "resp_pkts",
    "orig_ip_bytes": "orig_ip_bytes",
    "resp_ip_bytes": "resp_ip_bytes",
    "conn_state": "conn_state",
    "history": "history",
    "missed_bytes": "missed_bytes",
}
CANON_TO_ZEEK = {canon: zeek for zeek, canon in ZEEK_TO_CANON.items()}
REQUIRED = ("ts", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "proto")
LABEL_NAMES = ("label",)
DETAIL_NAMES = ("detailedlabel", "detailed-label", "detailed_label")
# Zeek's JSON::TS_MILLIS writes ts as integer milliseconds; as seconds such a value
# would lie past the year 5000, so numbers from here on are read as milliseconds.
MILLIS_FROM = 10**11
# The first millisecond of the year 10000 (``flows.record.TS_LIMIT``): a ts in
# milliseconds from here on is refused, naming the number the file holds.
MILLIS_LIMIT = TS_LIMIT * 1000
_JSON_NULLS = ("", "-", "(empty)")
_JSON_ADDRESSES = ("id.orig_h", "id.resp_h")
_MASKED_TS = re.compile(r"X+\.X+")
# pyarrow.json parses nested values by recursion in C: a line nested some 20,000
# deep overflows the stack and kills the process. A conn.log line opens one object
# and an array or two; a piece with a line that opens more brackets than this
# (``{`` and ``[``, in strings too) is read line by line, which names a line nested
# too deeply as a bad line.
_FAST_OPENS = 64
_SPACES = re.compile(r"\s+")


class _Header:
    """The state set by ``#`` lines: separators, null tokens and the column names."""

    def __init__(self) -> None:
        self.separator = "\t"
        self.set_separator = ","
        self.empty = "(empty)"
        self.unset = "-"
        self.fields: list[str] | None = None
        self.fields_line = 0

    def copy(self) -> _Header:
        other = _Header()
        other.__dict__.update(self.__dict__)
        return other


def _decode_escapes(text: str) -> str:
    """Turn the ``\\x09`` spelling used in ``#separator`` into the character."""
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), text)


def _directive(header: _Header, line: str, line_no: int, path: str) -> _Header:
    """Apply one ``#`` line to a copy of the header state (blocks keep theirs)."""
    header = header.copy()
    if line.startswith("#separator"):
        separator = _decode_escapes(line[len("#separator") :].strip()) or "\t"
        if len(separator) != 1 or (not " " <= separator <= "~" and separator != "\t"):
            raise BadInputError(
                f"#separator {separator!r} is not supported (one printable ASCII "
                "character or a tab)",
                path=path,
                line=line_no,
            )
        header.separator = separator
        header.fields = None
        return header
    key, _, value = line[1:].partition(header.separator)
    if key.startswith("fields") and key != "fields":
        raise BadInputError(
            f"#fields is not followed by the separator {header.separator!r} "
            "(set by #separator or the tab default)",
            path=path,
            line=line_no,
        )
    if key == "set_separator":
        header.set_separator = value
    elif key == "empty_field":
        header.empty = value
    elif key == "unset_field":
        header.unset = value
    elif key == "fields":
        header.fields = value.split(header.separator)
        header.fields_line = line_no
    return header


def _refuse_first(problems: list[Problem], path: str) -> None:
    """Raise the first of ``problems`` (header lines over the limit), if any: when
    no ``#fields`` line was read, the one over the limit is the likely cause."""
    if problems:
        raise BadInputError(problems[0].message, path=path, line=problems[0].line)


def _no_fields(path: str, cut: str | None) -> str:
    """Why a Zeek TSV text without a ``#fields`` line is refused: the header is
    missing, or the input was cut (a gzip stream without its end) before the
    header reached its ``#fields`` line, which then says where."""
    if cut is None:
        return "no #fields line (expected a Zeek header)"
    return (
        "no #fields line (expected a Zeek header) before the input was cut short: "
        + cut.removeprefix(f"{path}: ")
    )


def read_tsv(src: Source, on_error: str) -> ReadResult:
    """Read a Zeek TSV conn.log (already in memory) into canonical records."""
    return read_tsv_blocks([src.data], src.path, on_error, lambda: src.cut)


def read_tsv_blocks(
    blocks: Iterable[bytes],
    path: str,
    on_error: str,
    cut: Callable[[], str | None],
) -> ReadResult:
    """Read a Zeek TSV conn.log given as pieces of whole lines, one at a time.

    The pieces (each ending at a newline, but the last) joined are the text a
    whole read takes; the result, errors included, is the same. ``cut()`` is the
    input's cut (``Source.cut``), asked once every piece is read. Raises
    :class:`Redo` where only a whole read decides as a whole read does.
    """
    reader = _TsvReader(path)
    for data in blocks:
        reader.feed(data)
        del data  # not held while the next piece is read
    return reader.result(on_error, cut())


class Redo(Exception):
    """A piecewise read met a case that a read of the whole text must decide."""


class _RowBlock:
    """The rows between two ``#`` lines, as far as they were fed."""

    def __init__(self, header: _Header, start: int) -> None:
        self.header = header
        self.start = start  # its first line
        self.content = False  # whether a line that is not blank was seen
        self.pending: list[tuple[bytes, int]] = []  # blank pieces before that
        self.state = _BlockState()


class _BlockState:
    """What one call on a piece of a row block leaves for the next pieces of it."""

    def __init__(self) -> None:
        self.hidden = False  # IoT-23 labels found inside tunnel_parents
        self.plain_rows = 0  # rows read before that, as a plain tunnel_parents
        # An empty line drops the lines of spaces of the whole block (split_rows).
        self.empty = False  # a piece had an empty line
        self.spaces = False  # a piece before that split a line of spaces
        # Per float column: whether a piece needed the slow parse (as the whole
        # block then does), and the rows noted by the fast one, to word again.
        self.slow: set[str] = set()
        self.fast_notes: dict[str, list[tuple[int, str]]] = {}
        self.new_notes: list[tuple[str, int, str]] = []  # of the last piece


class _TsvReader:
    """The state of a Zeek TSV read between pieces of text (see read_tsv_blocks).

    The ``#`` lines are applied as they come and each row block is converted
    piece by piece. An error in a row block is kept and raised only once every
    line was scanned, since the scan's own errors (a bad ``#separator``, rows
    before ``#fields``) come first in a whole read, whatever follows them.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.header = _Header()
        self.line_no = 1
        self.long_heads: list[Problem] = []  # '#' lines over the limit, unread
        self.block: _RowBlock | None = None
        self.any_rows = False  # a row block that is not blank was seen
        self.failed: Exception | None = None
        self.tables: list[pa.Table] = []
        self.line_arrays: list[np.ndarray] = []
        self.problems: list[Problem] = []
        self.row_problems: dict[int, Problem] = {}
        self.offset = 0
        self.cut: str | None = None
        self.stats: dict = {"labels": {}, "masked_ts": 0, "labeled": False}
        self.closed = False  # a #close line was seen
        self.open_row: int | None = None  # a whole last row without its newline
        self.warnings: list[str] = []
        # Per row of every block: the label as written, and whether ts was masked.
        self.per_row: dict[str, list] = {"label": [], "masked": []}

    def feed(self, data: bytes) -> None:
        """Take the next piece of text (whole lines, but for the last piece)."""
        if b"\r\n" in data:
            data = data.replace(b"\r\n", b"\n")
        pos, n = 0, len(data)
        while pos < n:
            if data[pos] == 0x23:  # '#'
                self._end_block()
                end = data.find(b"\n", pos)
                end = n if end < 0 else end
                if end - pos > MAX_LINE_BYTES:  # as the line-by-line reader does
                    self.long_heads.append(
                        Problem(self.line_no, None, too_long(end - pos))
                    )
                else:
                    self.closed = self.closed or data.startswith(b"#close", pos)
                    text = data[pos:end].decode("utf-8", "replace")
                    self.header = _directive(
                        self.header, text, self.line_no, self.path
                    )
                pos, self.line_no = end + 1, self.line_no + 1
                continue
            nxt = data.find(b"\n#", pos)
            end = n if nxt < 0 else nxt + 1
            self._rows(data[pos:end])
            pos = end

    def _rows(self, piece: bytes) -> None:
        """Take a piece of a row block; a blank one waits for the rest of it."""
        start = self.line_no
        self.line_no += piece.count(b"\n")
        if self.block is None:
            self.block = _RowBlock(self.header, start)
        block = self.block
        if not block.content:
            if piece.isspace():
                block.pending.append((piece, start))
                return
            if block.header.fields is None:
                _refuse_first(self.long_heads, self.path)
                raise BadInputError(
                    "rows before any #fields line (expected a Zeek header)",
                    path=self.path,
                    line=block.start,
                )
            block.content = self.any_rows = True
            for text, line in block.pending:
                self._convert(text, line)
            block.pending = []
        self._convert(piece, start)

    def _end_block(self) -> None:
        """A ``#`` line or the end: a row block that was blank throughout is no
        block; the float notes of the one that ends are worded as a whole read
        words them."""
        block, self.block = self.block, None
        if block is None or self.failed is not None:
            return
        for column, notes in block.state.fast_notes.items():
            if column not in block.state.slow:
                continue
            for row, text in notes:
                old = self.row_problems[row]
                self.row_problems[row] = Problem(
                    old.line, old.column, parse_problem(text, "f64")
                )

    def _convert(self, piece: bytes, start: int) -> None:
        if self.failed is not None:
            return  # the error is raised after the scan; the rows are not needed
        block = self.block
        try:
            part, lines, problems, rows, cut = _read_block(
                piece,
                block.header,
                start,
                self.path,
                self.stats,
                self.warnings,
                self.per_row,
                block.state,
            )
        except BadInputError as exc:
            self.failed = exc
            return
        self.cut = self.cut or cut
        self._note_open_row(piece, start, lines, rows)
        self.tables.append(part)
        self.line_arrays.append(lines)
        self.problems.extend(problems)
        self.row_problems.update({self.offset + r: p for r, p in rows.items()})
        state = block.state
        for column, row, text in state.new_notes:
            state.fast_notes.setdefault(column, []).append((self.offset + row, text))
        state.new_notes = []
        self.offset += len(part)

    def _note_open_row(
        self, piece: bytes, start: int, lines: np.ndarray, rows: dict
    ) -> None:
        """Remember the last line when the text ends inside it (no newline) and it
        still became a good row: all its fields are there, but not maybe all of
        its last value."""
        if piece.endswith(b"\n") or not len(lines):
            return
        last = start + piece.count(b"\n")
        if int(lines[-1]) == last and len(lines) - 1 not in rows:
            self.open_row = last

    def result(self, on_error: str, src_cut: str | None) -> ReadResult:
        """Check the end of the text and build the result of the whole read."""
        self._end_block()
        path, header = self.path, self.header
        if header.fields is None and not self.any_rows:
            _refuse_first(self.long_heads, path)
            raise BadInputError(_no_fields(path, src_cut or self.cut), path=path)
        if self.failed is not None:
            raise self.failed
        if not self.any_rows:
            _check_fields(header, path)
        tables, stats, warnings = self.tables, self.stats, self.warnings
        table = pa.concat_tables(tables) if tables else conn_schema().empty_table()
        lines = (
            np.concatenate(self.line_arrays)
            if self.line_arrays
            else np.zeros(0, np.int64)
        )
        if not stats["labeled"] and path.endswith(".labeled"):
            warnings.append(
                f"{path}: the name says labeled, but no label column was found "
                "(looked for label, detailedlabel and IoT-23's joined field); "
                "labels are null, not benign"
            )
        if self.open_row is not None and not self.closed:
            warnings.append(
                f"{path}: line {self.open_row} has no newline at its end and the log "
                "no #close line: Zeek may still be writing it, and the last value "
                "may be cut short (the row is kept)"
            )
        per_row = self.per_row
        masked = (
            np.concatenate(per_row["masked"])
            if per_row["masked"]
            else np.zeros(0, bool)
        )

        def tally(keep: np.ndarray) -> tuple[dict, list[str]]:
            """The masked ts values in the rows kept."""
            count = int(np.count_nonzero(masked & keep))
            notes = [
                f"{path}: {count} ts value(s) masked as XXXXXXXXXX.XXXXXX "
                "(Zeek test output) read as null"
            ] if count else []
            return {"masked_ts": count}, notes

        return finish(
            table,
            lines,
            self.long_heads + self.problems,
            path=path,
            on_error=on_error,
            fmt="zeek-tsv",
            family="conn",
            cut=src_cut or self.cut,
            stats=stats,
            warnings=warnings,
            row_problems=self.row_problems,
            label_text=(
                pa.chunked_array(per_row["label"], type=pa.string())
                if stats["labeled"]
                else None
            ),
            tally=tally,
        )


def _check_fields(header: _Header, path: str) -> None:
    """Fail with the missing column's name when a required Zeek column is absent."""
    names = _expand_names(header.fields or [])
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise BadInputError(
                f"#fields names {name!r} twice", path=path, line=header.fields_line,
                column=name,
            )
        seen.add(name)
    for name in REQUIRED:
        if name not in names:
            raise BadInputError(
                f"#fields has no {name!r} column (required: {', '.join(REQUIRED)})",
                path=path,
                line=header.fields_line,
                column=name,
            )


def _expand_names(fields: list[str]) -> list[str]:
    """The column names, with IoT-23's space-joined last field split into parts."""
    out: list[str] = []
    for name in fields:
        out.extend(
            _SPACES.split(name.strip()) if _SPACES.search(name.strip()) else [name]
        )
    return out


def _read_block(
    block: bytes,
    header: _Header,
    start: int,
    path: str,
    stats: dict,
    warnings: list[str],
    per_row: dict[str, list],
    state: _BlockState | None = None,
) -> tuple[pa.Table, np.ndarray, list[Problem], dict[int, Problem], str | None]:
    """Split one block of rows, convert it, and say which rows and lines were bad.

    Each row's label as written and whether its ts was masked go to ``per_row``.
    ``state`` carries what earlier pieces of the same block decided (None: the
    block is whole).
    """
    _check_fields(header, path)
    fields = header.fields or []
    names = [f"c{i}" for i in range(len(fields))]
    wanted = [i for i, f in enumerate(fields) if _wanted(f)]
    state = state or _BlockState()
    blank = {"drop": state.empty}
    strings, lines, problems, cut = split_rows(
        block,
        fields,
        header.separator,
        path=path,
        first_line=start,
        include=wanted,
        blank=blank,
    )
    if blank["empty"] and not state.empty:
        if state.spaces:
            raise Redo("an empty line after a line of spaces, in another piece")
        state.empty = True
    state.spaces = state.spaces or blank["spaces"]

    columns = {fields[i]: strings.column(names[i]).combine_chunks() for i in wanted}
    bad = BadRows()
    table = _to_canonical(
        columns, header, bad, stats, warnings, path, per_row, state
    )
    row_problems = {
        row: Problem(int(lines[row]), column, message)
        for row, (column, message) in bad.rows.items()
    }
    return table, lines, problems, row_problems, cut


def _wanted(field: str) -> bool:
    """Whether a Zeek column feeds the canonical record (or holds a label)."""
    name = field.strip()
    return (
        name in ZEEK_TO_CANON
        or name.lower() in LABEL_NAMES + DETAIL_NAMES
        or name == "tunnel_parents"
        or bool(_SPACES.search(name))
    )


def _split_joined(
    columns: dict[str, pa.Array],
    bad: BadRows,
    warnings: list[str],
    path: str,
    state: _BlockState,
) -> dict[str, pa.Array]:
    """Split IoT-23's space-joined field (named so, or hidden in tunnel_parents).

    Hidden labels found in one piece of a block hold for the pieces after it;
    found after rows read without them, they raise :class:`Redo`.
    """
    out = dict(columns)
    for name in columns:
        parts = _SPACES.split(name.strip())
        if len(parts) > 1:
            break
    else:
        arr = columns.get("tunnel_parents")
        has_label = any(n.lower() in LABEL_NAMES for n in columns)
        if arr is None or has_label:
            return out
        if not state.hidden:
            if not pc.any(pc.match_substring_regex(arr, r"\S\s+\S")).as_py():
                state.plain_rows += len(arr)
                return out
            if state.plain_rows:
                raise Redo("IoT-23 labels in tunnel_parents after rows without them")
            state.hidden = True
            warnings.append(
                f"{path}: tunnel_parents holds space-joined label parts (IoT-23 "
                "layout under a plain header); read them as label and "
                "detailed-label"
            )
        name, parts = "tunnel_parents", ["tunnel_parents", "label", "detailed-label"]
    del out[name]
    arr = columns[name]
    split = pc.split_pattern_regex(
        pc.utf8_trim_whitespace(arr), r"\s+", max_splits=len(parts) - 1
    )
    sizes = np.asarray(pc.list_value_length(split).fill_null(0))
    wrong = np.flatnonzero(sizes != len(parts))
    for row in wrong:
        bad.add(
            int(row),
            name,
            f"expected {len(parts)} space-separated parts "
            f"({', '.join(parts)}), found {int(sizes[row])}",
        )
    padded = pc.if_else(
        pa.array(sizes == len(parts)),
        split,
        pa.scalar([""] * len(parts), type=split.type),
    )
    for i, part in enumerate(parts):
        out[part] = pc.list_element(padded, i)
    return out


def _to_canonical(
    columns: dict[str, pa.Array],
    header: _Header,
    bad: BadRows,
    stats: dict,
    warnings: list[str],
    path: str,
    per_row: dict[str, list],
    state: _BlockState,
) -> pa.Table:
    """Convert string columns named as in Zeek into a canonical Arrow table.

    Appends the label of each row as written (null without a label column) to
    ``per_row["label"]`` and whether its ts was masked to ``per_row["masked"]``.
    ``state`` is the block's, for a block read in pieces (see _BlockState).
    """
    columns = _split_joined(columns, bad, warnings, path, state)
    n = len(next(iter(columns.values()))) if columns else 0
    masked_rows = np.zeros(n, dtype=bool)
    arrays = {}
    for zeek_name, canon in ZEEK_TO_CANON.items():
        arr = columns.get(zeek_name)
        kind = CONN_FIELD_KINDS[canon]
        if arr is None:
            arrays[canon] = pa.nulls(n, type=_type(kind))
            continue
        arr = null_tokens(arr, (header.unset,))
        if kind == "str":
            if header.empty:
                hit = pc.equal(arr, header.empty)
                arr = pc.if_else(hit, pa.scalar("", pa.string()), arr)
            arrays[canon] = unescape(arr)
            continue
        if canon == "ts":
            masked = pc.match_substring_regex(arr, r"^X+\.X+$")
            if pc.any(masked).as_py():
                masked_rows = np.asarray(masked.fill_null(False), dtype=bool)
                arr = pc.if_else(masked, pa.scalar(None, pa.string()), arr)
        noted = len(bad.rows)
        arrays[canon], _ = to_number(arr, kind, zeek_name, bad)
        if kind == "f64":
            _note_parse_path(arr, zeek_name, bad, noted, state)
    check_endpoints(arrays, bad)

    label_col = next((c for c in columns if c.lower() in LABEL_NAMES), None)
    detail_col = next((c for c in columns if c.lower() in DETAIL_NAMES), None)
    per_row["masked"].append(masked_rows)
    if label_col is None:
        arrays["label"] = pa.nulls(n, type=pa.int8())
        arrays["label_detail"] = pa.nulls(n, type=pa.string())
        per_row["label"].append(pa.nulls(n, type=pa.string()))
    else:
        stats["labeled"] = True
        raw = unescape(columns[label_col])
        per_row["label"].append(raw)
        text = null_tokens(raw, (header.unset, header.empty, ""))
        arrays["label"] = labelmod.zeek_label(text, label_col, bad)
        detail = (
            null_tokens(unescape(columns[detail_col]), (header.unset, header.empty, ""))
            if detail_col is not None
            else pa.nulls(n, type=pa.string())
        )
        arrays["label_detail"] = pc.coalesce(detail, text)
    return pa.Table.from_arrays(
        [arrays[name] for name in CONN_FIELD_NAMES], schema=conn_schema()
    )


def _note_parse_path(
    arr: pa.Array, column: str, bad: BadRows, noted: int, state: _BlockState
) -> None:
    """Remember how ``to_number`` parsed a float column of one piece of a block.

    It casts the whole column in C, and only when some value does not cast
    parses every value one by one; the two word an infinity or NaN differently.
    A whole block parses one way: when one piece needed the slow way, the notes
    the fast way left in the others are worded again (see ``_TsvReader``).
    """
    try:
        pc.cast(arr, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        state.slow.add(column)
        return
    for row in list(bad.rows)[noted:]:
        state.new_notes.append((column, row, arr[row].as_py()))


def check_endpoints(
    arrays: dict[str, pa.Array], bad: BadRows, zeek_names: bool = True
) -> None:
    """Note rows whose addresses are not IP addresses, ports are not 0..65535,
    ``proto`` names no protocol, durations or counts are negative, times and
    durations are not finite, or times are below 0 (before 1970).

    ``arrays`` holds canonical columns; problems name Zeek's column (``id.orig_h``)
    or, with ``zeek_names=False``, the canonical one (``src_ip``).
    """
    def name(canon: str) -> str:
        return CANON_TO_ZEEK.get(canon, canon) if zeek_names else canon

    for canon in ADDRESS_FIELDS:
        check_addresses(arrays[canon], name(canon), bad)
    for canon in PORT_FIELDS:
        check_ports(arrays[canon], name(canon), bad)
    check_protos(arrays["proto"], name("proto"), bad)
    check_times(arrays["ts"], name("ts"), bad)
    check_finite(arrays["duration"], name("duration"), bad)
    for canon in COUNT_FIELDS:
        check_counts(arrays[canon], name(canon), bad)


def _type(kind: str) -> pa.DataType:
    return arrow_type(kind)


# ---------------------------------------------------------------------------- JSON


def read_json(src: Source, on_error: str) -> ReadResult:
    """Read a Zeek JSON conn.log (one object per line) into canonical records.

    A clean piece of text is parsed in C by pyarrow.json; anything the fast path
    cannot take exactly as the line-by-line path would (ISO times, nested ``id``,
    odd types, bad lines, deep nesting, unknown labels) is read line by line,
    naming bad lines.
    """
    return read_json_blocks([src.data], src.path, on_error, lambda: src.cut)


def read_json_blocks(
    blocks: Iterable[bytes],
    path: str,
    on_error: str,
    cut: Callable[[], str | None],
) -> ReadResult:
    """Read a Zeek JSON conn.log given as pieces of whole lines, one at a time.

    The pieces (each ending at a newline, but the last) joined are the text a
    whole read takes, and the result, errors included, is the same: every line
    stands alone, so each piece is read by the fast path when it can be, else line
    by line. ``cut()`` is the input's cut (``Source.cut``), asked once every piece
    is read; it comes before the note of a last line cut short, as in a whole read.
    """
    reader = _JsonReader(path)
    for data in blocks:
        reader.feed(data)
        del data  # not held while the next piece is read
    return reader.result(on_error, cut())


class _JsonReader:
    """What a Zeek JSON read keeps between pieces of text (see read_json_blocks).

    Every piece is read to its end, also after a bad line that stops a read with
    ``on_error="fail"``: ``stats["labeled"]`` says whether any line of the whole
    text carries a label, as a whole read says.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.line_no = 1  # the line the next piece starts on
        self.tables: list[pa.Table] = []
        self.line_arrays: list[np.ndarray] = []
        self.problems: list[Problem] = []
        self.labels: list[pa.Array] = []  # each row's label as written, per piece
        self.labeled = False
        self.cut: str | None = None  # the last line, cut short

    def feed(self, data: bytes) -> None:
        """Read the next piece of text (whole lines, but for the last piece)."""
        fast = _json_fast(data)
        if fast is not None:
            table, label_raw = fast
            lines = np.arange(self.line_no, self.line_no + len(table))
            labeled = label_raw.null_count < len(label_raw)
        else:
            part = _json_lines(data, self.line_no, self.path)
            table, lines = part.table, part.lines
            label_raw, labeled = part.labels
            self.problems += part.problems
            self.cut = self.cut or part.cut

        self.tables.append(table)
        self.line_arrays.append(lines)
        self.labels.append(label_raw)
        self.labeled = self.labeled or labeled
        self.line_no += data.count(b"\n")

    def result(self, on_error: str, src_cut: str | None) -> ReadResult:
        """The result of the whole read, once every piece is in."""
        tables = self.tables
        table = pa.concat_tables(tables) if tables else conn_schema().empty_table()
        lines = (
            np.concatenate(self.line_arrays)
            if self.line_arrays
            else np.zeros(0, np.int64)
        )
        return finish(
            table,
            lines,
            self.problems,
            path=self.path,
            on_error=on_error,
            fmt="zeek-json",
            family="conn",
            cut=src_cut or self.cut,
            stats={"labels": {}, "labeled": self.labeled},
            label_text=pa.chunked_array(self.labels, type=pa.string()),
        )


_JSON_LABELS = ("label",) + DETAIL_NAMES


def _read_json_fast(src: Source) -> tuple[pa.Table, dict, pa.Array] | None:
    """The pyarrow.json path on a whole text: the table, its stats and its labels
    as written; None whenever it could differ from the line-by-line path."""
    fast = _json_fast(src.data)
    if fast is None:
        return None
    table, label_raw = fast
    stats = {
        "labels": value_counts(label_raw),  # every row is kept on this path
        "labeled": label_raw.null_count < len(label_raw),
    }
    return table, stats, label_raw


def _json_fast(data: bytes) -> tuple[pa.Table, pa.Array] | None:
    """The pyarrow.json path on whole lines: the table and each row's label as
    written; None whenever it could differ from the line-by-line path."""
    import pyarrow.json as pajson

    if (
        not data.endswith(b"\n")
        or b"\n\n" in data
        or b"\r" in data
        or b"\n#" in data
        or not data.startswith(b"{")
        or long_lines(data)
        or (not data.isascii() and not_utf8(data))
        or _many_opens(data)
    ):
        return None  # the line path names bad lines (pyarrow.json keeps bad UTF-8)
    try:
        first = json.loads(data[: data.find(b"\n")])
    except (ValueError, RecursionError):
        return None
    if not isinstance(first, dict) or not isinstance(first.get("ts"), (int, float)):
        return None
    if "id" in first:
        return None

    fields = [
        pa.field(zeek, arrow_type(CONN_FIELD_KINDS[canon]))
        for zeek, canon in ZEEK_TO_CANON.items()
    ] + [pa.field(name, pa.string()) for name in _JSON_LABELS]
    try:
        raw = pajson.read_json(
            io.BytesIO(data),
            read_options=pajson.ReadOptions(use_threads=False, block_size=1 << 24),
            parse_options=pajson.ParseOptions(
                explicit_schema=pa.schema(fields),
                unexpected_field_behavior="infer",  # to see every key's name
                newlines_in_values=False,
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    if any(_other_label_key(name) for name in raw.column_names):
        return None
    # pyarrow skips a line of spaces and reads `{..} {..}` as two rows; the line
    # path skips the one and refuses the other: one row per line, or that path.
    if len(raw) != data.count(b"\n"):
        return None
    if any(raw.column(name).null_count for name in REQUIRED if name != "proto"):
        return None

    arrays = {}
    for zeek, canon in ZEEK_TO_CANON.items():
        arrays[canon] = raw.column(zeek).combine_chunks()
    ts = arrays["ts"]
    if pc.any(pc.greater_equal(ts, MILLIS_LIMIT)).as_py():
        return None  # the slow path names the milliseconds as written
    arrays["ts"] = pc.if_else(
        pc.greater_equal(ts, MILLIS_FROM), pc.divide(ts, 1000.0), ts
    )
    if not pc.all(pc.is_finite(arrays["ts"])).as_py():
        return None
    # pyarrow reads a number past float64 (10**400) as inf; the slow path names it.
    duration = pc.is_finite(arrays["duration"])
    if pc.all(pc.or_kleene(duration, pc.is_null(duration))).as_py() is False:
        return None
    endpoints = BadRows()
    check_endpoints(arrays, endpoints)
    if endpoints.rows:
        return None  # the line-by-line path names each bad line

    label_raw = raw.column("label").combine_chunks()
    details = [raw.column(name).combine_chunks() for name in DETAIL_NAMES]
    given = [column for column in details if column.null_count < len(column)]
    if len(given) > 1:
        # Two spellings in one object: the line path takes the one written first.
        spelled = sum(np.asarray(pc.is_valid(c), dtype=np.int8) for c in given)
        if spelled.max() > 1:
            return None
    detail = details[0]
    for column in details[1:]:
        detail = pc.coalesce(detail, column)
    bad = BadRows()
    text = null_tokens(label_raw, _JSON_NULLS)
    arrays["label"] = labelmod.zeek_label(text, "label", bad)
    if bad.rows:
        return None
    arrays["label_detail"] = pc.coalesce(null_tokens(detail, _JSON_NULLS), text)
    table = pa.Table.from_arrays(
        [arrays[name] for name in CONN_FIELD_NAMES], schema=conn_schema()
    )
    return table, label_raw


def _many_opens(data: bytes, limit: int = _FAST_OPENS) -> bool:
    """Whether a line of ``data`` holds more than ``limit`` opening brackets
    (``{`` or ``[``): too deep, maybe, for pyarrow.json (see ``_FAST_OPENS``).

    Scanned in C (numpy). A line that starts with a bracket holds at least that
    one, so no line holds more than the brackets of the text less those of the
    other lines that start with one: for a conn.log (one ``{`` a line) that bound
    settles it, and only otherwise are the brackets of each line counted.
    """
    buf = np.frombuffer(data, np.uint8)
    opens = buf == 0x7B
    opens |= buf == 0x5B
    total = np.count_nonzero(opens)
    if total <= limit:
        return False

    ends = np.flatnonzero(buf == 0x0A)
    ends = ends[ends + 1 < len(buf)]
    starting = np.count_nonzero(opens[ends + 1]) + bool(opens[0])
    if total - starting + 1 <= limit:
        return False

    # A line holds more than ``limit`` when the bracket ``limit`` places after
    # one of its brackets lies on it too.
    line_of = np.searchsorted(ends, np.flatnonzero(opens))
    return bool(np.any(line_of[limit:] == line_of[:-limit]))


def _other_label_key(name: str) -> bool:
    """Whether a key is one the line path reads and the fast path would not: a
    label key in another case (``Label``, ``Detailed-Label``; the line path takes
    any case) or a nested ``id``."""
    lowered = name.lower()
    return name == "id" or (
        lowered in LABEL_NAMES + DETAIL_NAMES and name not in _JSON_LABELS
    )


@dataclass
class _JsonPart:
    """What the line-by-line path read from one piece of text."""

    table: pa.Table
    lines: np.ndarray  # the line of each row
    problems: list[Problem]
    labels: tuple[pa.Array, bool]  # each row's label as written; any label seen
    cut: str | None  # the note of a last line cut short


def _read_json_lines(src: Source, on_error: str) -> ReadResult:
    """The line-by-line JSON path on a whole text, naming every bad line."""
    part = _json_lines(src.data, 1, src.path)
    label_text, labeled = part.labels
    return finish(
        part.table,
        part.lines,
        part.problems,
        path=src.path,
        on_error=on_error,
        fmt="zeek-json",
        family="conn",
        cut=src.cut or part.cut,
        stats={"labels": {}, "labeled": labeled},
        label_text=label_text,
    )


def _json_lines(data: bytes, first_line: int, path: str) -> _JsonPart:
    """Read whole lines of JSON (the first is line ``first_line``) one by one.

    Only a last line without its newline that does not parse is cut, not bad: the
    text ends inside it.
    """
    cols: dict[str, list] = {name: [] for name in CONN_FIELD_NAMES}
    lines: list[int] = []
    label_texts: list[str | None] = []  # each row's label as written
    problems: list[Problem] = []
    labeled = False
    text_lines = data.split(b"\n")
    cut = None
    last = len(text_lines) - 1

    for index, raw in enumerate(text_lines):
        line_no = first_line + index
        if len(raw) > MAX_LINE_BYTES:
            problems.append(Problem(line_no, None, too_long(len(raw))))
            continue
        raw = raw.strip()
        if not raw or raw.startswith(b"#"):
            continue
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError) as exc:
            if index == last and not data.endswith(b"\n"):
                cut = f"{path}: the last line ({line_no}) is cut short"
                continue
            # RecursionError: a nesting bomb ("[" * 100000) is one bad line.
            problems.append(Problem(line_no, None,
                                    f"expected one JSON object ({json_problem(exc)})"))
            continue
        text = _label_text(obj)
        labeled = labeled or text is not None
        try:
            record = json_record(obj)
        except _FieldError as exc:
            problems.append(Problem(line_no, exc.column, exc.message))
            continue
        for name in CONN_FIELD_NAMES:
            cols[name].append(record[name])
        lines.append(line_no)
        label_texts.append(text)

    from flows.record import columns_to_table

    return _JsonPart(
        columns_to_table(cols),
        np.array(lines, dtype=np.int64),
        problems,
        (pa.array(label_texts, type=pa.string()), labeled),
        cut,
    )


def _label_text(obj: dict) -> str | None:
    """The label of one JSON object as written (as text), None when it has none."""
    key = next((k for k in obj if k.lower() in LABEL_NAMES), None)
    text = obj.get(key) if key else None
    return None if text is None else _as_text(text)


def _as_text(value) -> str:
    """A JSON value (not null) as the text of a string field: a string as it is,
    anything else as JSON writes it (``true``, ``1.5``, ``[1, null]``)."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (ValueError, TypeError, RecursionError):
        return repr(value)  # not reached for what json.loads returns


def json_shown(value) -> str:
    """A value read from JSON, for a message: as the JSON wrote it (``true``,
    ``null``, ``[1, false]``), except that a string is quoted as the other readers
    quote text (``'x'``). Long values are cut short."""
    shown = repr(value) if isinstance(value, str) else _as_text(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."


class _FieldError(Exception):
    def __init__(self, column: str, message: str) -> None:
        super().__init__(message)
        self.column = column
        self.message = message


def json_record(
    obj: dict,
    stats: dict | None = None,
    on_unknown_label: Callable[[str], None] | None = None,
) -> dict:
    """One Zeek JSON object -> a canonical record dict (omitted keys -> None).

    A label no table names is a bad field, unless ``on_unknown_label`` is given:
    then it is called with the label's text and the record is kept unlabeled,
    that text in ``label_detail``."""
    record: dict = {}
    for zeek_name, canon in ZEEK_TO_CANON.items():
        value = obj.get(zeek_name)
        if value is None and zeek_name.startswith("id."):
            value = (
                (obj.get("id") or {}).get(zeek_name[3:])
                if isinstance(obj.get("id"), dict)
                else None
            )
        record[canon] = _json_value(zeek_name, CONN_FIELD_KINDS[canon], value)
    for name in REQUIRED:
        canon = ZEEK_TO_CANON[name]
        if record[canon] is None and name != "proto":
            how = "null" if _has_key(obj, name) else "missing"
            raise _FieldError(name, f"required key {name!r} is {how}")
    for canon in ADDRESS_FIELDS + PORT_FIELDS + ("proto",) + COUNT_FIELDS:
        problem = field_problem(canon, record[canon])
        if problem is not None:
            raise _FieldError(CANON_TO_ZEEK.get(canon, canon), problem)
    if record["ts"] is not None and (problem := time_problem(record["ts"])):
        raise _FieldError("ts", problem)

    label_key = next((k for k in obj if k.lower() in LABEL_NAMES), None)
    detail_key = next((k for k in obj if k.lower() in DETAIL_NAMES), None)
    text = _label_text(obj)
    detail = obj.get(detail_key) if detail_key else None
    record["label"] = None
    record["label_detail"] = None
    if text is not None:
        if stats is not None:
            stats["labeled"] = True
            stats["labels"][text] = stats["labels"].get(text, 0) + 1
        if text not in _JSON_NULLS:
            mapped = labelmod.ZEEK_LABELS.get(text.strip().lower(), "?")
            if mapped == "?" and on_unknown_label is not None:
                on_unknown_label(text)
                mapped = None
            if mapped == "?":
                raise _FieldError(
                    label_key,
                    f"unknown label {json_shown(obj[label_key])} (expected "
                    "Malicious, Benign, Background or Unknown)",
                )
            record["label"] = mapped
            record["label_detail"] = text
    if detail is not None and _as_text(detail) not in _JSON_NULLS:
        record["label_detail"] = _as_text(detail)
    return record


def _has_key(obj: dict, name: str) -> bool:
    """Whether a JSON object holds the key ``name`` (``id.*`` also nested)."""
    if name in obj:
        return True
    nested = obj.get("id")
    return name.startswith("id.") and isinstance(nested, dict) and name[3:] in nested


def _json_value(name: str, kind: str, value):
    """Check and convert one JSON value to the canonical kind."""
    if value is None:
        return None
    if kind == "str":
        if name in _JSON_ADDRESSES and not isinstance(value, str):
            raise _FieldError(
                name, f"expected an IPv4 or IPv6 address, found {json_shown(value)}"
            )
        # One value per field: a list or an object is not text to keep as
        # written (["tcp"] is no protocol "tcp", [6] no protocol 6), nor is true a
        # protocol named "true".
        if isinstance(value, list | dict) or (
                name == "proto" and isinstance(value, bool)):
            expected = "a string or a number" if name == "proto" else "a string"
            raise _FieldError(name, f"expected {expected}, found {json_shown(value)}")
        if name == "proto":
            value = proto_text(value)  # 6 and 6.0 are protocol 6, as in Parquet
        return _as_text(value)
    if name == "ts" and isinstance(value, str):
        try:
            stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise _FieldError(  # noqa: B904 - a plain message is clearer here
                name,
                f"expected epoch seconds or ISO-8601, found {json_shown(value)}",
            )
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        return stamp.timestamp()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        expected = "a number" if kind == "f64" else "an integer"
        raise _FieldError(name, f"expected {expected}, found {json_shown(value)}")
    # Range first: an integer past float64 or int64 must not reach Arrow.
    canon = ZEEK_TO_CANON.get(name)
    problem = (
        field_value_problem(canon, value) if canon else value_problem(kind, value)
    )
    if problem is not None:
        raise _FieldError(name, problem)
    if name == "ts" and value >= MILLIS_LIMIT:
        raise _FieldError(
            name,
            f"expected a time in epoch seconds before the year 10000 (from "
            f"{MILLIS_FROM} on, Zeek's JSON::TS_MILLIS milliseconds, below "
            f"{MILLIS_LIMIT:.0f}), found {value!r}",
        )
    if name == "ts" and value >= MILLIS_FROM:
        return value / 1000.0
    if kind == "f64":
        return float(value)
    return int(value)
