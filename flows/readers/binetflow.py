"""Argus bidirectional flow files (``.binetflow``, CTU-13 style), comma or tab.

Mapping onto the canonical conn record:

* ``StartTime`` (``YYYY/MM/DD HH:MM:SS.ffffff``) -> ``ts``. Argus writes the local
  time of the machine it ran on, without a zone: it is read in the ``timezone``
  option (an IANA name such as ``Europe/Prague``; default ``UTC``). In a zone, a
  time the clock shows twice (the hour repeated when summer time ends) is read as
  the first of the two, and a time it skips (the hour lost when summer time starts)
  with the offset from before the change (Python's ``fold=0``). A ``ts`` before 1970
  (below 0) makes the row a bad row, named ``StartTime``; so does a date that does
  not exist (``2011/02/30``, or ``2011/02/29`` in a year that is no leap year), as
  a month 13 or an hour 25 does: it is not moved on into the next month.
  ``Dur`` -> ``duration``; ``Proto`` -> ``proto`` (lower case; one that is neither
  a protocol name nor a number 0..255 makes the row a bad row);
  ``SrcAddr``/``Sport`` -> ``src_ip``/``src_port`` and ``DstAddr``/``Dport`` ->
  ``dst_ip``/``dst_port`` (hex ports such as ``0x0035`` are read as numbers); an
  address that is not IPv4/IPv6 or a port outside 0..65535 makes the row a bad
  row, except in Argus records of no IP flow (Proto ``man`` management records,
  layer-2 flows whose addresses are MAC addresses): their addresses read as
  null, counted in ``stats["non_ip"]`` with a warning;
  ``State`` -> ``conn_state`` (Argus's state names, not Zeek's).
* Argus byte counts include IP headers, so ``SrcBytes`` -> ``orig_ip_bytes`` and
  ``TotBytes - SrcBytes`` -> ``resp_ip_bytes``; ``SrcPkts`` -> ``orig_pkts`` and
  ``TotPkts - SrcPkts`` -> ``resp_pkts``. Without a ``SrcPkts`` column both packet
  fields are null: the split is unknown and is not guessed. ``orig_bytes``,
  ``resp_bytes`` (payload), ``uid``, ``service``, ``history`` and ``missed_bytes``
  are null. A negative ``Dur``, ``TotBytes``, ``SrcBytes``, ``TotPkts`` or
  ``SrcPkts`` makes the row a bad row named by that column; so does a total
  smaller than its ``Src`` part, named by the total.
* ``Dir`` is *not* used to swap the sides: Argus already names the side that
  started the flow ``Src``; ``<-`` only says that traffic was seen from Dst alone,
  and swapping would break the Src* counters. The counts of each ``Dir`` are in
  ``stats["dir"]``.
* ``Label``: ``From-Botnet``/``Botnet``/``Malware`` -> 1, ``Normal`` -> 0,
  ``Background`` or empty -> null; a label naming none of these (Slips data has
  ``flow=TCP-Established-To-Microsoft-7``) is null too, counted in a warning
  (see :func:`flows.readers.labels.ctu_label`);
  ``label_detail`` is the label as written.
"""

from __future__ import annotations

import calendar
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flows.errors import BadInputError, PartialInputError, UsageError
from flows.readers._convert import (
    BadRows,
    check_addresses,
    check_counts,
    check_ports,
    check_protos,
    check_times,
    note_rows,
    parse_problem,
    to_number,
    value_counts,
)
from flows.readers._finish import Problem, finish
from flows.readers._source import Source
from flows.readers._table import header_and_body, split_rows
from flows.readers.labels import ctu_label
from flows.readers.result import Damage, ReadResult
from flows.record import CONN_FIELD_NAMES, conn_schema

REQUIRED = ("StartTime", "Proto", "SrcAddr", "DstAddr")
# Columns of durations and packet/byte counts, never below 0.
COUNTS = ("Dur", "TotBytes", "SrcBytes", "TotPkts", "SrcPkts")
DEFAULT_TIMEZONE = "UTC"
# Files of the system's zone folder that zoneinfo opens but that name no zone:
# links to whatever zone this machine is set to (so a file would be read in a
# different zone on each machine), and tzdata's placeholder zone.
NOT_ZONES = frozenset({"localtime", "posixrules", "Factory"})


@functools.cache
def zone_names() -> frozenset[str]:
    """The IANA zone names this Python knows (the ``tzdata`` package's list and
    the system's zone folder; ``posix/`` and ``right/`` copies not included),
    less :data:`NOT_ZONES`. Read once: it opens every file of the folder."""
    return frozenset(available_timezones()) - NOT_ZONES


def time_zone(name: str) -> ZoneInfo | None:
    """The zone ``name`` (an IANA name) for reading StartTime; None for ``UTC``.

    A name that is not an IANA zone (not in :func:`zone_names`: a typo, a path,
    ``localtime``) is a UsageError. ``UTC`` needs no zone data.
    """
    if name == DEFAULT_TIMEZONE:
        return None
    expected = "expected an IANA name such as Europe/Prague or America/New_York, or UTC"
    if name in NOT_ZONES:
        raise UsageError(
            f"unknown time zone {name!r}: it names no zone of its own (a link to "
            f"this machine's zone, or a placeholder); {expected}"
        )
    try:
        if name not in zone_names():
            raise ZoneInfoNotFoundError(name)
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise UsageError(f"unknown time zone {name!r}: {expected}") from None


def read_binetflow(
    src: Source, on_error: str, timezone: str = DEFAULT_TIMEZONE
) -> ReadResult:
    """Read an Argus binetflow file into canonical conn records.

    ``timezone`` names the zone the file's StartTime is written in (see the module
    doc); an unknown name is a UsageError.
    """
    zone = time_zone(timezone)
    first, body = header_and_body(src.data)
    layout = _layout(first, src.path)
    rows = _convert(body, layout, zone, src.path, first_line=2)
    stats: dict = {"labels": {}, "labeled": "label" in layout.index, "non_ip": 0}
    if rows.label is not None:
        stats["labeled"] = rows.labeled()
    non_ip = rows.non_ip_mask()

    def tally(keep: np.ndarray) -> tuple[dict, list[str]]:
        """Records without IP addresses, Dir values and unknown labels in the rows
        kept."""
        notes: list[str] = []
        mask = pa.array(keep)
        lacking = np.flatnonzero(non_ip & keep)
        counted: dict = {"non_ip": len(lacking)}
        if len(lacking):
            first_line = int(rows.lines[lacking[0]])
            notes.append(non_ip_note(src.path, len(lacking), first_line))
        if rows.label is not None:
            notes += _unknown_labels(rows.label.filter(mask), src.path)
        if rows.direction is not None:
            counted["dir"] = value_counts(rows.direction.filter(mask), null_as="")
        return counted, notes

    return finish(
        rows.table,
        rows.lines,
        rows.problems,
        path=src.path,
        on_error=on_error,
        fmt="binetflow",
        family="conn",
        cut=src.cut or rows.cut,
        stats=stats,
        row_problems=rows.row_problems,
        label_text=rows.written,
        tally=tally,
        non_ip=non_ip,
    )


@dataclass(frozen=True)
class _Layout:
    """What a binetflow header line says: the delimiter, and each column's place
    (``index``: its name in lower case -> its position)."""

    delimiter: str
    names: list[str]
    index: dict[str, int]


def _layout(first: str, path: str) -> _Layout:
    """Read the header line (line 1); one without a :data:`REQUIRED` column is
    refused, naming it."""
    delimiter = "\t" if first.count("\t") > first.count(",") else ","
    names = [n.strip() for n in first.split(delimiter)]
    index = {n.lower(): i for i, n in enumerate(names)}
    for name in REQUIRED:
        if name.lower() not in index:
            raise BadInputError(
                f"header has no {name!r} column (required: {', '.join(REQUIRED)})",
                path=path,
                line=1,
                column=name,
            )
    return _Layout(delimiter, names, index)


@dataclass
class _Rows:
    """The canonical rows of (a block of) a binetflow body, before ``on_error``.

    ``lines`` holds each row's file line; ``problems`` the lines that never became
    rows, ``row_problems`` (row -> problem) the rows with a bad value; ``cut`` says
    when the last line is cut short. Per row: ``non_ip`` (a record of no IP flow),
    ``label`` (the label, null when empty), ``written`` (as written) and
    ``direction`` (``Dir``); the last three are None without their column.
    ``dur_slow`` and ``fast_dur`` (line -> text) are :func:`_dur_notes`'s.
    """

    table: pa.Table
    lines: np.ndarray
    problems: list[Problem]
    row_problems: dict[int, Problem]
    cut: str | None
    non_ip: pa.Array
    label: pa.Array | None
    written: pa.Array | None
    direction: pa.Array | None
    dur_slow: bool = False
    fast_dur: dict[int, str] = field(default_factory=dict)

    def non_ip_mask(self) -> np.ndarray:
        """``non_ip`` as a numpy mask (a null is no such record)."""
        return np.asarray(self.non_ip.fill_null(False))

    def labeled(self) -> bool:
        """Whether any row holds a label (``stats["labeled"]``)."""
        return self.label is not None and bool(pc.any(pc.is_valid(self.label)).as_py())


def _convert(
    body: bytes,
    layout: _Layout,
    zone: ZoneInfo | None,
    path: str,
    first_line: int,
    blank: dict | None = None,
) -> _Rows:
    """Split and convert the rows of ``body``, whose first line is ``first_line``
    of the file (``blank``: as :func:`~flows.readers._table.split_rows` takes it,
    for a body that is one block of a larger one)."""
    names, index = layout.names, layout.index
    strings, lines, problems, cut = split_rows(
        body, names, layout.delimiter, path=path, first_line=first_line, blank=blank
    )
    n = strings.num_rows
    bad = BadRows()

    def col(name: str) -> pa.Array | None:
        i = index.get(name.lower())
        if i is None:
            return None
        arr = pc.utf8_trim_whitespace(strings.column(f"c{i}").combine_chunks())
        return pc.if_else(pc.equal(arr, ""), pa.scalar(None, pa.string()), arr)

    def number(name: str, kind: str) -> pa.Array:
        arr = col(name)
        if arr is None:
            return pa.nulls(n, pa.float64() if kind == "f64" else pa.int64())
        return to_number(arr, kind, name, bad, hex_ok=kind == "i64")[0]

    out: dict[str, pa.Array] = {}
    out["ts"] = _start_time(col("StartTime"), bad, zone)
    check_times(out["ts"], "StartTime", bad)
    out["duration"] = number("Dur", "f64")
    slow, fast = _dur_notes(col("Dur"), bad)
    out["proto"] = pc.utf8_lower(col("Proto"))
    check_protos(out["proto"], "Proto", bad)
    out["src_ip"] = col("SrcAddr")
    out["dst_ip"] = col("DstAddr")
    out["src_port"] = number("Sport", "i64")
    out["dst_port"] = number("Dport", "i64")
    non_ip = _non_ip(out["proto"], out["src_ip"], out["dst_ip"])
    if pc.any(non_ip).as_py():
        for canon in ("src_ip", "dst_ip"):
            out[canon] = pc.if_else(non_ip, pa.scalar(None, pa.string()), out[canon])
    for canon, name in (("src_ip", "SrcAddr"), ("dst_ip", "DstAddr")):
        check_addresses(out[canon], name, bad)
    for canon, name in (("src_port", "Sport"), ("dst_port", "Dport")):
        check_ports(out[canon], name, bad)
    state = col("State")
    out["conn_state"] = state if state is not None else pa.nulls(n, pa.string())

    tot_bytes, src_bytes = number("TotBytes", "i64"), number("SrcBytes", "i64")
    tot_pkts, src_pkts = number("TotPkts", "i64"), number("SrcPkts", "i64")
    counts = (out["duration"], tot_bytes, src_bytes, tot_pkts, src_pkts)
    for arr, name in zip(counts, COUNTS, strict=True):
        check_counts(arr, name, bad)
    out["orig_ip_bytes"] = src_bytes
    out["resp_ip_bytes"] = _rest(tot_bytes, src_bytes, "SrcBytes", "TotBytes", bad)
    out["orig_pkts"] = src_pkts
    out["resp_pkts"] = _rest(tot_pkts, src_pkts, "SrcPkts", "TotPkts", bad)

    raw_label = col("Label")
    written = None
    if raw_label is not None:
        written = pc.utf8_trim_whitespace(
            strings.column(f"c{index['label']}").combine_chunks()
        )
        out["label"] = _labels(raw_label)
        out["label_detail"] = raw_label

    table = pa.Table.from_arrays(
        [
            out.get(name, pa.nulls(n, conn_schema().field(name).type))
            for name in CONN_FIELD_NAMES
        ],
        schema=conn_schema(),
    )
    row_problems = {
        row: Problem(int(lines[row]), column, message)
        for row, (column, message) in bad.rows.items()
    }
    return _Rows(
        table,
        lines,
        problems,
        row_problems,
        cut,
        non_ip,
        raw_label,
        written,
        col("Dir"),
        slow,
        {int(lines[row]): text for row, text in fast.items()},
    )


def _dur_notes(text: pa.Array | None, bad: BadRows) -> tuple[bool, dict[int, str]]:
    """Whether ``Dur`` took the slow parse (a value no cast reads as a number),
    and else the rows whose ``Dur`` it noted as not finite, with their text.

    The two parses word an ``inf`` differently, and a whole read takes the slow one
    for every row when a single value of the column is not a number: a reader of
    blocks words such a row's note again when another block went slow.
    """
    if text is None:
        return False, {}
    try:
        values = pc.cast(text, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return True, {}
    if not any(column == "Dur" for column, _ in bad.rows.values()):
        return False, {}
    rows = np.flatnonzero(~np.asarray(pc.is_finite(values).fill_null(True)))
    noted = {int(row): bad.rows.get(int(row), ("",))[0] for row in rows}
    return False, {
        row: text[row].as_py() for row, column in noted.items() if column == "Dur"
    }


def non_ip_note(path: str, count: int, first_line: int) -> str:
    """The warning on ``count`` records of no IP flow, the first at ``first_line``."""
    return (
        f"{path}: {count} Argus record(s) without IP addresses "
        "(management records, layer-2 flows with MAC addresses; the first "
        f"at line {first_line}) read with null src_ip/dst_ip"
    )


_MAC = r"^[0-9a-fA-F]{1,2}(:[0-9a-fA-F]{1,2}){5}$"


def _non_ip(proto: pa.Array, src: pa.Array, dst: pa.Array) -> pa.Array:
    """Rows that are Argus records of no IP flow: ``man`` records, MAC addresses.

    Argus writes management records (Proto ``man``, addresses ``0``) and layer-2
    flows (``llc``, ``arp`` replies...) whose addresses are MAC addresses.
    """
    man = pc.fill_null(pc.equal(proto, "man"), False)
    mac = pc.and_(
        pc.fill_null(pc.match_substring_regex(src, _MAC), True),
        pc.fill_null(pc.match_substring_regex(dst, _MAC), True),
    )
    any_mac = pc.or_(
        pc.fill_null(pc.match_substring_regex(src, _MAC), False),
        pc.fill_null(pc.match_substring_regex(dst, _MAC), False),
    )
    return pc.or_(man, pc.and_(mac, any_mac))


def _start_time(arr: pa.Array, bad: BadRows, zone: ZoneInfo | None) -> pa.Array:
    """``YYYY/MM/DD HH:MM:SS[.ffffff]`` (or with ``-``) as epoch seconds.

    The text is the local time of ``zone`` (None: UTC).
    """
    text = pc.replace_substring(arr, "-", "/")
    whole = pc.utf8_slice_codeunits(text, 0, 19)
    frac = pc.utf8_slice_codeunits(text, 19, 64)
    secs = pc.strptime(whole, format="%Y/%m/%d %H:%M:%S", unit="s", error_is_null=True)
    frac_ok = pc.or_(pc.equal(frac, ""), pc.match_substring_regex(frac, r"^\.\d+$"))
    fraction = pc.cast(
        pc.if_else(frac_ok, pc.binary_join_element_wise("0", frac, ""), "0"),
        pa.float64(),
    )
    wrong = pc.and_(pc.is_valid(arr), pc.or_(pc.is_null(secs), pc.invert(frac_ok)))
    if pc.any(wrong).as_py():
        for row in np.flatnonzero(np.asarray(wrong.fill_null(False))):
            bad.add(
                int(row),
                "StartTime",
                f"expected YYYY/MM/DD HH:MM:SS.ffffff, found {arr[row].as_py()!r}",
            )
    _impossible_dates(whole, secs, arr, bad)
    seconds = pc.cast(secs, pa.int64())
    if zone is not None:
        seconds = _local_to_utc(seconds, zone)
    return pc.add(pc.cast(seconds, pa.float64()), fraction)


def _impossible_dates(
    whole: pa.Array, secs: pa.Array, arr: pa.Array, bad: BadRows
) -> None:
    """Note the rows whose StartTime names a day its month does not have.

    Arrow's ``strptime`` takes any day from 1 to 31 and rolls the surplus into
    the next month (``2011/02/30`` reads as 2011-03-02): a parsed day that differs
    from the day written is such a date, and the row is a bad row named
    ``StartTime``, as a month 13 is.
    """
    day_written = r"^\d+/\d+/(?P<day>\d+) "
    written = pc.struct_field(pc.extract_regex(whole, day_written), "day")
    shifted = pc.not_equal(pc.day(secs), pc.cast(written, pa.int64()))
    rows = np.flatnonzero(np.asarray(shifted.fill_null(False)))
    for row in rows:
        text = arr[row].as_py()
        year, month = (int(part) for part in whole[row].as_py().split("/")[:2])
        days = calendar.monthrange(year, month)[1]
        bad.add(
            int(row),
            "StartTime",
            f"expected YYYY/MM/DD HH:MM:SS.ffffff with a day its month has, found "
            f"{text!r} ({year:04d}/{month:02d} has {days} days)",
        )


_EPOCH = datetime(1970, 1, 1)


def _local_to_utc(local: pa.Array, zone: ZoneInfo) -> pa.Array:
    """Whole seconds of wall-clock time in ``zone`` -> UTC epoch seconds.

    Each distinct second is looked up once: a file holds far fewer distinct
    seconds than rows. A time outside Python's years 1..9999 keeps offset 0 (a
    year 0 is before 1970, a bad row whatever the offset).
    """
    valid = np.asarray(pc.is_valid(local))
    if not valid.any():
        return local
    values = np.asarray(local.fill_null(0))
    distinct, where = np.unique(values[valid], return_inverse=True)
    offsets = np.zeros(len(distinct), dtype=np.int64)
    for i, second in enumerate(distinct.tolist()):
        try:
            wall = (_EPOCH + timedelta(seconds=second)).replace(tzinfo=zone)
            offsets[i] = int(wall.utcoffset().total_seconds())
        except (OverflowError, ValueError):
            continue
    utc = np.zeros(len(values), dtype=np.int64)
    utc[valid] = (distinct - offsets)[where]
    return pa.array(utc, type=pa.int64(), mask=~valid)


def _rest(
    total: pa.Array, part: pa.Array, part_name: str, total_name: str, bad: BadRows
) -> pa.Array:
    """``total - part``: the responder's share of a total that counts both sides.

    A row where it comes out below 0 is a bad row named by the total's column: it
    was expected to hold the part. (A negative total or part is noted before this,
    by ``check_counts``, and that note is the one kept.)
    """
    rest = pc.subtract(total, part)
    note_rows(
        pc.less(rest, 0),
        total_name,
        bad,
        lambda row: f"expected at least {part_name} ({part[row].as_py()}), "
        f"found {total[row].as_py()}",
    )
    return rest


def _labels(text: pa.Array) -> pa.Array:
    """Map CTU labels to 1/0/null; texts no rule knows read as null (see
    :func:`_unknown_labels` for the note)."""
    unique = pc.unique(text).to_pylist()
    mapped = {u: ctu_label(u) for u in unique if u is not None}
    keys = [k for k, v in mapped.items() if v in (0, 1)]
    values = pa.array([mapped[k] for k in keys], pa.int8())
    return pc.take(values, pc.index_in(text, value_set=pa.array(keys, pa.string())))


def _unknown_labels(text: pa.Array, path: str) -> list[str]:
    """A note on the rows whose CTU label no rule knows (read as null), if any."""
    unknown, count = unknown_labels(text)
    return [unknown_note(path, unknown, count)] if unknown else []


def unknown_labels(text: pa.Array) -> tuple[list[str], int]:
    """The CTU labels of ``text`` that no rule knows (read as null), sorted, and
    the number of rows that carry one."""
    unknown = sorted(
        u for u in pc.unique(text).to_pylist() if u is not None and ctu_label(u) == "?"
    )
    if not unknown:
        return [], 0
    return unknown, pc.sum(pc.is_in(text, value_set=pa.array(unknown))).as_py()


def unknown_note(path: str, unknown: list[str], count: int) -> str:
    """The warning on ``count`` rows whose label is one of ``unknown`` (sorted):
    the first five are named."""
    return (
        f"{path}: {count} row(s) carry CTU labels that name neither "
        f"Botnet/Malware, Normal nor Background; their label is null: "
        f"{', '.join(unknown[:5])}"
    )


# An empty line (or one of CRs only, which a CRLF file's reading leaves empty) at
# the start of a piece of text or after a newline.
_EMPTY_LINE = re.compile(rb"(?:\A|\n)\r*\n")


@dataclass
class Block:
    """The rows a :class:`BinetflowStream` yields at a time: the records kept (in
    the canonical schema), the file line of each, and which of them are records
    of no IP flow."""

    table: pa.Table
    lines: np.ndarray
    non_ip: np.ndarray


class BinetflowStream:
    """An Argus binetflow file read a block of a few thousand lines at a time, for
    a caller that takes its records as they come (the edge agent's file source).

    Memory stays bounded whatever the file's size: the text comes in pieces
    (:func:`flows.readers._chunked.stream_blocks`, gzip inflated as it goes), and
    each block's rows are yielded before the next block is read. Each block is
    split and converted as :func:`read_binetflow` converts a whole body, and
    ``on_error`` is applied as a whole read applies it, so that the rows, their
    lines, and the errors are a whole read's: with "fail" the rows before the
    first bad line are yielded and then its error is raised (a
    :class:`PartialInputError` when rows were kept before it, as from
    :func:`flows.readers.read`); with "skip" bad lines are left out.
    ``drop_unlabeled`` keeps the rows with a 0/1 label only; a file where no row
    has a label is refused at its end, as nothing was yielded by then.

    Once every block is out, ``warnings`` holds the notes a whole read gives
    (records of no IP flow, unknown labels, lines skipped, a cut) and ``damage``
    where the input was found cut short.
    """

    def __init__(
        self,
        path: str,
        on_error: str = "fail",
        timezone: str = DEFAULT_TIMEZONE,
        drop_unlabeled: bool = False,
    ) -> None:
        self.path = str(path)
        self.on_error = on_error
        self.zone = time_zone(timezone)
        self.drop_unlabeled = drop_unlabeled
        self.warnings: list[str] = []
        self.damage: list[Damage] = []
        # Whether lines of spaces are blank lines: a whole read drops them when
        # its body holds an empty line anywhere (None: not known yet).
        self._blank: bool | None = None
        self._kept = 0  # rows kept so far, before drop_unlabeled
        self._labeled = False  # a row held a label (stats["labeled"])
        self._skipped = 0
        self._first_bad: Problem | None = None
        self._non_ip = 0
        self._non_ip_line = 0
        self._unknown: list[str] = []  # the five first unknown labels, sorted
        self._unknown_rows = 0
        self._dur_slow = False  # a block's Dur took the slow parse
        self._fast_text: str | None = None  # _first_bad's Dur text, fast-worded
        self._layout: _Layout | None = None
        self._next_line = 2  # the line the piece after the last one starts at

    def __iter__(self) -> Iterator[Block]:
        """Read the header, then yield the rows kept of each block in turn."""
        from flows.readers import _check_header_length, _check_not_empty
        from flows.readers._chunked import stream_blocks

        blocks = stream_blocks(self.path, self.on_error)
        pieces = iter(blocks)
        cut = None
        try:
            head = next(pieces, b"")
            if not head:  # no text at all (a gzip stream cut in its first line)
                _check_not_empty(
                    Source(self.path, head, blocks.compressed, blocks.cut)
                )
            _check_header_length(Source(self.path, head))
            first, body = header_and_body(head)
            del head
            layout = self._layout = _layout(first, self.path)

            line = 2  # the file line the piece starts at
            piece: bytes | None = body
            del body
            while piece is not None:
                rows = self._rows(piece, layout, line)
                line = self._next_line = line + piece.count(b"\n")
                del piece  # not held while the block is yielded
                cut = cut or rows.cut
                block, error = self._apply(rows)
                del rows
                if len(block.table):
                    yield block
                if error is not None:
                    raise error
                piece = next(pieces, None)
        finally:
            pieces.close()
        self._end(blocks.cut or cut)

    def _rows(self, piece: bytes, layout: _Layout, line: int) -> _Rows:
        """Convert one piece, starting at file line ``line``, with the lines of
        spaces read as a whole read reads them."""
        blank = {"drop": False}
        rows = _convert(piece, layout, self.zone, self.path, line, blank)
        if blank["empty"]:
            self._blank = True  # and this piece's lines of spaces were dropped
        elif blank["spaces"]:
            # Split here, they are bad lines unless the body has an empty line
            # anywhere: look once (only a file with such lines pays for it).
            if self._blank is None:
                self._blank = self._has_empty_line()
            if self._blank:
                blank = {"drop": True}
                rows = _convert(piece, layout, self.zone, self.path, line, blank)
        return rows

    def _has_empty_line(self) -> bool:
        """Whether the file's body (line 2 on) holds an empty line, read again in
        pieces from the start."""
        from flows.readers._chunked import stream_blocks

        pieces = iter(stream_blocks(self.path, self.on_error))
        try:
            for i, piece in enumerate(pieces):
                if i == 0:
                    end = piece.find(b"\n")
                    piece = piece[end + 1 :] if end >= 0 else b""
                if _EMPTY_LINE.search(piece):
                    return True
        finally:
            pieces.close()
        return False

    def _dur_slow_later(self) -> bool:
        """Whether a block after the one read last holds a ``Dur`` that is not a
        number (a whole read then words every Dur note the slow way), read again
        in pieces: only a first bad line that is a Dur of ``inf`` asks."""
        from flows.readers._chunked import stream_blocks

        pieces = iter(stream_blocks(self.path, self.on_error))
        line = 1
        try:
            for piece in pieces:
                start, line = line, line + piece.count(b"\n")
                if start < self._next_line:
                    continue  # pieces are the same as the first time round
                rows = _convert(piece, self._layout, self.zone, self.path, start)
                if rows.dur_slow:
                    return True
        finally:
            pieces.close()
        return False

    def _apply(self, rows: _Rows) -> tuple[Block, BadInputError | None]:
        """The rows of one block that ``on_error`` (and ``drop_unlabeled``) keep,
        and the error to raise after them ("fail" and a bad line)."""
        problems = rows.problems + list(rows.row_problems.values())
        self._labeled = self._labeled or rows.labeled()
        self._dur_slow = self._dur_slow or rows.dur_slow
        if problems and self.on_error == "fail":
            first = min(problems, key=lambda p: p.line)
            text = rows.fast_dur.get(first.line) if first.column == "Dur" else None
            if text is not None and (self._dur_slow or self._dur_slow_later()):
                first = Problem(first.line, first.column, parse_problem(text, "f64"))
            keep = np.asarray(rows.lines < first.line, dtype=bool)
            self._kept += int(keep.sum())
            cls = PartialInputError if self._kept else BadInputError
            error = cls(
                first.message, path=self.path, column=first.column, line=first.line
            )
            return self._keep(rows, keep), error

        keep = np.ones(len(rows.table), dtype=bool)
        if rows.row_problems:
            keep[np.fromiter(rows.row_problems, dtype=np.int64)] = False
        if problems:
            if self._first_bad is None:  # the lines of later blocks come later
                first = self._first_bad = min(problems, key=lambda p: p.line)
                if first.column == "Dur":
                    self._fast_text = rows.fast_dur.get(first.line)
            self._skipped += len({p.line for p in problems})
        self._kept += int(keep.sum())
        return self._keep(rows, keep), None

    def _keep(self, rows: _Rows, keep: np.ndarray) -> Block:
        """The rows ``keep`` marks (less the unlabeled ones with
        ``drop_unlabeled``), counted for the notes at the end."""
        if self.drop_unlabeled:
            labeled = pc.is_valid(rows.table.column("label"))
            keep = keep & np.asarray(labeled.to_numpy(zero_copy_only=False), bool)
        non_ip = rows.non_ip_mask()
        lacking = np.flatnonzero(non_ip & keep)
        if len(lacking):
            if not self._non_ip:
                self._non_ip_line = int(rows.lines[lacking[0]])
            self._non_ip += len(lacking)
        if rows.label is not None:
            unknown, count = unknown_labels(rows.label.filter(pa.array(keep)))
            if count:
                self._unknown = sorted(set(self._unknown) | set(unknown))[:5]
                self._unknown_rows += count
        table = rows.table if keep.all() else rows.table.filter(pa.array(keep))
        return Block(table, rows.lines[keep], non_ip[keep])

    def _end(self, cut: str | None) -> None:
        """Once every block is read: refuse a drop_unlabeled read of a file
        without labels, and set ``warnings`` and ``damage`` as a whole read's."""
        if self.drop_unlabeled and not self._labeled:
            # As flows.readers.read refuses it.
            raise BadInputError(
                "drop_unlabeled was asked for, but the input has no label column "
                "(every row would be dropped)",
                path=self.path,
            )

        if self._non_ip:
            self.warnings.append(
                non_ip_note(self.path, self._non_ip, self._non_ip_line)
            )
        if self._unknown_rows:
            self.warnings.append(
                unknown_note(self.path, self._unknown, self._unknown_rows)
            )
        first = self._first_bad
        if first is not None and self._fast_text is not None and self._dur_slow:
            first = Problem(
                first.line, first.column, parse_problem(self._fast_text, "f64")
            )
        if first is not None:
            where = f"line {first.line}" + (
                f", column {first.column!r}" if first.column else ""
            )
            self.warnings.append(
                f"{self.path}: skipped {self._skipped} bad line(s); the first at "
                f"{where}: {first.message}"
            )
        if cut is not None:
            self.warnings.append(cut)
            what = cut.removeprefix(f"{self.path}: ")
            self.damage.append(Damage(self.path, what, stopped=True))
