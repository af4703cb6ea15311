"""Turning columns of text into typed Arrow columns, remembering which rows were bad.

Readers parse a whole block of rows as strings first (fast, in C), then convert
each column here. A value that does not convert is not fatal at once: the row is
noted with its column and value, so that after every column is done the reader can
either stop at the first bad row (keeping the rows before it) or drop every bad row
and count them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from flows.readers._lazy import LazyModule

pa = LazyModule("pyarrow")
pc = LazyModule("pyarrow.compute")

# Record kind -> name of the pyarrow type factory (looked up on use: see _lazy).
_ARROW_TYPES = {"f64": "float64", "i64": "int64", "i8": "int8", "str": "string"}
# Numbers as the writers write them: ASCII digits only. Python's int() and float()
# also take ``1_000`` and other scripts' digits (``４４３``, ``٤٤٣``), and Arrow's
# cast to an integer takes ``0x1bb``: none of them is a value these files hold.
_INT_TEXT = re.compile(r"[+-]?[0-9]+\Z")
_FLOAT_TEXT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\Z")
_HEX_TEXT = re.compile(r"0[xX][0-9a-fA-F]+\Z")
# The spaces around a value that the slow parse drops (str.strip() would drop
# other scripts' spaces and the ASCII separators \x1c..\x1f too).
_SPACES = " \t\n\r\f\v"
_ESCAPE = re.compile(rb"\\x([0-9a-fA-F]{2})")


@dataclass
class BadRows:
    """Rows of one block that failed to convert: row -> (column, what was wrong)."""

    rows: dict[int, tuple[str, str]] = field(default_factory=dict)

    def add(self, row: int, column: str, message: str) -> None:
        """Note the first problem found in ``row`` (later ones in it are dropped)."""
        self.rows.setdefault(row, (column, message))

    def mask(self, n: int) -> np.ndarray:
        """A boolean mask of length ``n``, true for the good rows."""
        keep = np.ones(n, dtype=bool)
        if self.rows:
            keep[np.fromiter(self.rows, dtype=np.int64)] = False
        return keep


def check_addresses(arr: pa.Array, column: str, bad: BadRows) -> None:
    """Note the rows whose text is not an IP address (nulls pass); see ``record``.

    Dotted IPv4 is matched in C; the other distinct values (IPv6, bad ones) are
    checked one by one.
    """
    from flows.record import IPV4_PATTERN, address_problem

    if len(arr) == 0:
        return
    ipv4 = pc.match_substring_regex(arr, IPV4_PATTERN)
    rest = arr.filter(pc.invert(ipv4.fill_null(True)))
    _mark_distinct(arr, rest, address_problem, column, bad)


def _mark_distinct(arr: pa.Array, candidates: pa.Array, problem_of, column: str,
                   bad: BadRows) -> None:
    """Check each distinct value of ``candidates`` once with ``problem_of`` (a
    message or None) and note every row of ``arr`` holding a value with one."""
    wrong = {}
    for value in pc.unique(candidates).to_pylist():
        if value is not None:
            problem = problem_of(value)
            if problem is not None:
                wrong[value] = problem
    if not wrong:
        return
    hit = pc.is_in(arr, value_set=pa.array(list(wrong), type=pa.string()))
    for row in np.flatnonzero(np.asarray(hit.fill_null(False))):
        bad.add(int(row), column, wrong[arr[int(row)].as_py()])


def check_protos(arr: pa.Array, column: str, bad: BadRows) -> None:
    """Note the rows whose ``proto`` names no protocol (nulls pass); see
    ``record.proto_problem``. A column holds few distinct values: each is checked
    once."""
    from flows.record import proto_problem

    if len(arr) == 0:
        return
    _mark_distinct(arr, arr, proto_problem, column, bad)


def check_proto_numbers(arr: pa.Array, column: str, bad: BadRows) -> None:
    """Note the rows of a numeric protocol column (CICFlowMeter's ``Protocol``)
    whose value is not a whole number 0..255 (nulls pass); see
    ``record.proto_number_problem``."""
    from flows.record import PROTO_NUMBERS, proto_number_problem

    _check_whole_numbers(arr, PROTO_NUMBERS, proto_number_problem, column, bad)


def check_ports(arr: pa.Array, column: str, bad: BadRows) -> None:
    """Note the rows whose port is not a whole number in 0..65535 (nulls pass).

    A float column (UNSW-NB15 and CIC files) may also hold NaN or an infinity, or
    a value with a fraction (``1.5``): bad too; ``80.0`` is port 80.
    """
    from flows.record import PORT_RANGE, port_problem

    _check_whole_numbers(arr, PORT_RANGE, port_problem, column, bad)


def _check_whole_numbers(arr: pa.Array, bounds: tuple[int, int], problem_of,
                         column: str, bad: BadRows) -> None:
    """Note the rows of a numeric column outside ``bounds`` or, in a float column,
    NaN or with a fraction; ``problem_of(value)`` words each."""
    if len(arr) == 0:
        return
    low, high = bounds
    outside = pc.or_(pc.less(arr, low), pc.greater(arr, high))
    if pa.types.is_floating(arr.type):
        outside = pc.or_(outside, pc.is_nan(arr))
        outside = pc.or_(outside, fractional(arr))
    note_rows(outside, column, bad, lambda row: problem_of(arr[row].as_py()))


def fractional(arr: pa.Array) -> pa.Array:
    """True where a float column holds a finite value with a fraction (``3.5``).

    ``3.0`` is whole; NaN and the infinities are not fractional (other checks
    name them); an integer column has no fractions; null stays null.
    """
    if not pa.types.is_floating(arr.type):
        return pc.if_else(pc.is_valid(arr), False, pa.scalar(None, pa.bool_()))
    return pc.and_(pc.is_finite(arr), pc.not_equal(pc.floor(arr), arr))


def note_rows(
    mask: pa.Array, column: str, bad: BadRows, message: Callable[[int], str]
) -> None:
    """Note each row where ``mask`` is true (null is not) as bad in ``column``,
    with ``message(row)``; a mask with no true row costs one check."""
    if not pc.any(mask).as_py():
        return
    for row in np.flatnonzero(np.asarray(mask.fill_null(False))):
        bad.add(int(row), column, message(int(row)))


def check_counts(
    arr: pa.Array, column: str, bad: BadRows, *, whole: bool = False
) -> None:
    """Note the rows whose duration or count is below 0 (nulls pass); see ``record``.

    ``whole`` marks a packet or byte count held in a float column (UNSW-NB15, CIC):
    a value with a fraction (``3.5``) is bad too, ``3.0`` passes. A value both
    negative and fractional is named for being negative.
    """
    from flows.record import count_problem

    if len(arr) == 0:
        return
    note_rows(pc.less(arr, 0), column, bad, lambda row: count_problem(arr[row].as_py()))
    if whole:
        note_rows(
            fractional(arr),
            column,
            bad,
            lambda row: count_problem(arr[row].as_py(), whole=True),
        )


def check_rates(arr: pa.Array, column: str, bad: BadRows) -> None:
    """Note the rows whose rate (a share, as NSL-KDD's ``*_rate`` features) is
    outside 0..1; nulls pass (``to_number`` has already refused NaN and the
    infinities)."""
    from flows.record import _short

    if len(arr) == 0:
        return
    wrong = pc.or_(pc.less(arr, 0), pc.greater(arr, 1))
    note_rows(wrong, column, bad, lambda row: (
        f"expected a rate from 0 to 1, found {_short(arr[row].as_py())}"))


def check_times(arr: pa.Array, column: str, bad: BadRows) -> None:
    """Note the rows whose time is not finite, is below 0 (before 1970) or at or
    past ``record.TS_LIMIT`` (the year 10000); nulls pass.

    See ``record.time_problem``.
    """
    from flows.record import TS_LIMIT, time_problem

    if len(arr) == 0:
        return
    wrong = pc.or_(pc.less(arr, 0), pc.greater_equal(arr, TS_LIMIT))
    if pa.types.is_floating(arr.type):
        wrong = pc.or_(wrong, pc.invert(pc.is_finite(arr)))
    note_rows(wrong, column, bad, lambda row: time_problem(arr[row].as_py()))


def check_finite(arr: pa.Array, column: str, bad: BadRows) -> None:
    """Note the rows of a float column holding NaN or an infinity (nulls pass)."""
    if len(arr) == 0 or not pa.types.is_floating(arr.type):
        return
    note_rows(pc.invert(pc.is_finite(arr)), column, bad,
              lambda row: f"expected a finite number, found {arr[row]}")


def arrow_type(kind: str) -> pa.DataType:
    """The Arrow type of a record kind (``f64``, ``i64``, ``i8``, ``str``)."""
    return getattr(pa, _ARROW_TYPES[kind])()


def null_tokens(arr: pa.Array, tokens: tuple[str, ...]) -> pa.Array:
    """Replace each value equal to one of ``tokens`` by null."""
    if not tokens or len(arr) == 0:
        return arr
    hit = pc.is_in(arr, value_set=pa.array(list(tokens), type=pa.string()))
    if not pc.any(hit).as_py():
        return arr
    return pc.if_else(hit, pa.scalar(None, type=arr.type), arr)


def to_number(
    arr: pa.Array,
    kind: str,
    column: str,
    bad: BadRows,
    *,
    hex_ok: bool = False,
    non_finite_null: bool = False,
    non_finite_rows: np.ndarray | None = None,
) -> tuple[pa.Array, int]:
    """Convert a string column to ``kind``; bad values become null and are noted.

    With ``non_finite_null`` the texts Infinity, -Infinity, inf, NaN and the empty
    string read as null (the second value returned counts them, and each row's
    count is added to ``non_finite_rows`` when given); without it they are bad
    values. A number is ASCII decimal (``443``, ``-1.5e3``; spaces around it are
    dropped): ``1_000``, ``４４３`` and ``0x1bb`` are bad values, but for
    ``hex_ok``, which also accepts integers written ``0x...``.
    """
    target = arrow_type(kind)
    if non_finite_null:
        arr, n_non_finite = _null_non_finite(arr, non_finite_rows)
    else:
        n_non_finite = 0
    try:
        out = pc.cast(arr, target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        out = None
    if out is not None and kind != "f64" and not hex_ok and _any_hex(arr):
        out = None  # Arrow read 0x... as a number: parse one by one, naming it
    if out is not None:
        if kind == "f64" and not non_finite_null:
            out = _reject_non_finite(arr, out, column, bad)
        return out, n_non_finite
    if hex_ok and kind != "f64":
        out = _with_hex(arr, target)
        if out is not None:
            return out, n_non_finite

    values = []
    for row, text in enumerate(arr.to_pylist()):
        if text is None:
            values.append(None)
            continue
        value = _parse_one(text, kind, hex_ok)
        if value is None:
            bad.add(row, column, parse_problem(text, kind, hex_ok))
        values.append(value)
    return pa.array(values, type=target), n_non_finite


def _any_hex(arr: pa.Array | pa.ChunkedArray) -> bool:
    """Whether a column Arrow cast to integers holds a ``0x...`` value (Arrow
    reads ``0x1bb`` as 443, and only text that starts so).

    The text bytes of the column are searched for an ``x`` first (memchr speed:
    a column of numbers has none), and only then every value's start.
    """
    chunks = arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]
    for chunk in chunks:
        if not (pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type)):
            break  # another type: look at every value
        text = chunk.buffers()[2]
        raw = text.to_pybytes() if text is not None else b""
        if b"x" in raw or b"X" in raw:
            break
    else:
        return False
    return bool(pc.any(pc.starts_with(arr, "0x", ignore_case=True)).as_py())


def _with_hex(arr: pa.Array, target: pa.DataType) -> pa.Array | None:
    """Cast a column where some integers are ``0x...``; None if others are bad too."""
    is_hex = pc.match_substring_regex(arr, r"^0[xX][0-9a-fA-F]+$")
    try:
        decimal = pc.cast(pc.if_else(is_hex, pa.scalar(None, pa.string()), arr), target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    rows = np.flatnonzero(np.asarray(is_hex.fill_null(False)))
    if not len(rows):
        return decimal
    values = [int(arr[int(row)].as_py(), 16) for row in rows]
    limit = 127 if target == pa.int8() else 2**63 - 1
    if any(v > limit for v in values):
        return None
    merged = np.asarray(decimal.fill_null(0)).copy()
    merged[rows] = values
    nulls = np.asarray(pc.is_null(decimal))
    nulls[rows] = False
    return pa.array(merged, type=target, mask=nulls)


def _parse_one(text: str, kind: str, hex_ok: bool) -> int | float | None:
    """Parse one value the slow way; None when it is not a number of that kind."""
    text = text.strip(_SPACES)
    if kind == "f64":
        if not _FLOAT_TEXT.match(text):
            return None
        value = float(text)
        return value if np.isfinite(value) else None
    if _INT_TEXT.match(text):
        value = int(text)
    elif hex_ok and _HEX_TEXT.match(text):
        value = int(text, 16)
    else:
        return None
    limit = 127 if kind == "i8" else 2**63 - 1
    return value if -limit - 1 <= value <= limit else None


def parse_problem(text: str, kind: str, hex_ok: bool = False) -> str:
    """Why :func:`_parse_one` found no value of ``kind`` in ``text``: not a number
    at all, or a number past what the field holds (the limit named, since
    "expected an integer" about ``99999999999999999999999`` says the wrong
    thing)."""
    from flows.record import INT_RANGES, _short

    stripped = text.strip(_SPACES)
    if kind == "f64":
        # inf and nan spelled out do not match: only digits can run past float64.
        value = float(stripped) if _FLOAT_TEXT.match(stripped) else None
        if value is not None and not np.isfinite(value):
            return (f"number out of range, found {_short(text)}: a 64-bit float "
                    "holds at most about 1.8e308")
        return f"expected a number, found {_short(text)}"
    if _INT_TEXT.match(stripped):
        value = int(stripped)
    elif hex_ok and _HEX_TEXT.match(stripped):
        value = int(stripped, 16)
    else:
        return f"expected an integer, found {_short(text)}"
    low, high = INT_RANGES[kind]
    bound = f"at most {high}" if value > high else f"at least {low}"
    return f"integer out of range, found {_short(text)}: the field holds {bound}"


def _null_non_finite(
    arr: pa.Array, rows: np.ndarray | None = None
) -> tuple[pa.Array, int]:
    """Null out Infinity/NaN spellings; return the new column and their count.

    ``rows``, when given, gets 1 added in each row that held one.
    """
    lowered = pc.utf8_lower(pc.utf8_trim_whitespace(arr))
    hit = pc.is_in(
        lowered,
        value_set=pa.array(
            ["inf", "+inf", "-inf", "infinity", "+infinity", "-infinity", "nan", ""]
        ),
    )
    count = pc.sum(hit).as_py() or 0
    if count:
        arr = pc.if_else(hit, pa.scalar(None, type=arr.type), arr)
        if rows is not None:
            rows += np.asarray(hit.fill_null(False), dtype=rows.dtype)
    return arr, count


def _reject_non_finite(
    text: pa.Array, out: pa.Array, column: str, bad: BadRows
) -> pa.Array:
    """Note rows whose float parsed as inf or NaN: a conn record never holds them."""
    finite = pc.is_finite(out)
    if pc.all(pc.or_kleene(finite, pc.is_null(out))).as_py() is not False:
        return out
    rows = np.flatnonzero(~np.asarray(finite.fill_null(True)))
    for row in rows:
        bad.add(
            int(row), column, f"expected a finite number, found {text[row].as_py()!r}"
        )
    return pc.if_else(finite, out, pa.scalar(None, type=out.type))


def unescape(arr: pa.Array) -> pa.Array:
    """Undo Zeek's ``\\xHH`` escapes in a string column (only rows that hold one)."""
    if len(arr) == 0:
        return arr
    has = pc.match_substring(arr, "\\x")
    if not pc.any(has).as_py():
        return arr
    values = arr.to_pylist()
    for row in np.flatnonzero(np.asarray(has.fill_null(False))):
        raw = values[row].encode("utf-8", "surrogateescape")
        decoded = _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), raw)
        values[row] = decoded.decode("utf-8", "backslashreplace")
    return pa.array(values, type=pa.string())


def value_counts(arr: pa.Array | pa.ChunkedArray, null_as: str | None = None) -> dict:
    """``{value: count}`` of a column, nulls counted under ``null_as`` when given."""
    counts: dict = {}
    if len(arr) == 0:
        return counts
    for item in pc.value_counts(arr).to_pylist():
        key = item["values"]
        if key is None:
            if null_as is None:
                continue
            key = null_as
        counts[key] = counts.get(key, 0) + item["counts"]
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0]))))
