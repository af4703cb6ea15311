"""The canonical flow record: one connection, with the meanings of Zeek's conn.log.

Every reader and the packet flow meter produce records with exactly these fields, in
this order. Unknown values are nulls (``None`` in Python, null in Arrow), never 0
and never the string ``"-"``. ``label`` is 1 for malicious, 0 for benign and null
where the source says nothing usable (Background, Unknown, no label column).
``src_ip``/``dst_ip`` hold IPv4 or IPv6 addresses, ``src_port``/``dst_port``
numbers in 0..65535 and ``proto`` a protocol name or number 0..255
(:func:`field_problem`); ``ts`` is epoch seconds, finite and not
before 1970 (:func:`time_problem`); a reader treats a row breaking these rules as a
bad row (named by file and line, kept out of the table).

The field list and :func:`empty_columns` need only the standard library; the Arrow
schema needs pyarrow and is built on first use.
"""

from __future__ import annotations

import ipaddress
import math
import re
from functools import lru_cache
from typing import Any

from flows.errors import BadInputError

# (name, kind) in canonical order. Kinds: "f64", "i64", "i8", "str".
CONN_FIELDS: tuple[tuple[str, str], ...] = (
    ("ts", "f64"),
    ("uid", "str"),
    ("src_ip", "str"),
    ("src_port", "i64"),
    ("dst_ip", "str"),
    ("dst_port", "i64"),
    ("proto", "str"),
    ("service", "str"),
    ("duration", "f64"),
    ("orig_bytes", "i64"),
    ("resp_bytes", "i64"),
    ("orig_pkts", "i64"),
    ("resp_pkts", "i64"),
    ("orig_ip_bytes", "i64"),
    ("resp_ip_bytes", "i64"),
    ("conn_state", "str"),
    ("history", "str"),
    ("missed_bytes", "i64"),
    ("label", "i8"),
    ("label_detail", "str"),
)

CONN_FIELD_NAMES: tuple[str, ...] = tuple(name for name, _ in CONN_FIELDS)
CONN_FIELD_KINDS: dict[str, str] = dict(CONN_FIELDS)

# The integers each integer kind can hold (Arrow int64 and int8, SQLite INTEGER).
INT_RANGES: dict[str, tuple[int, int]] = {
    "i64": (-(2**63), 2**63 - 1),
    "i8": (-(2**7), 2**7 - 1),
}

# Fields whose values must also make sense as what they name, not only fit a kind.
ADDRESS_FIELDS: tuple[str, ...] = ("src_ip", "dst_ip")
PORT_FIELDS: tuple[str, ...] = ("src_port", "dst_port")
PORT_RANGE: tuple[int, int] = (0, 65535)
# ``proto`` names a protocol: a keyword of the IANA protocol list or Zeek's (tcp,
# ipv6-icmp, a/n, tp++, 3pc, unknown_transport: letters, digits, "-", "_", ".",
# "+", "/", at most 32 of them), or its number 0..255 (a CIC file writes 6).
PROTO_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+/-]{0,31}$"
_PROTO_NAME = re.compile(PROTO_NAME_PATTERN.replace("$", r"\Z"))
PROTO_NUMBERS: tuple[int, int] = (0, 255)
# Text that reads as a number (6.5, -4, 1e3, nan as a float column writes NaN): no
# protocol keyword looks like one, so such a ``proto`` is taken as a protocol
# number, and must be a whole number 0..255.
_NUMBER_TEXT = re.compile(
    r"[+-]?((\d+\.?\d*|\.\d+)(e[+-]?\d+)?|inf|infinity|nan)\Z", re.IGNORECASE
)
# The first epoch second Python's datetime cannot hold (10000-01-01 00:00:00 UTC):
# a captured packet stamped at or after it is damaged (:func:`packet_time_problem`).
TS_LIMIT = 253402300800.0
# Durations, byte and packet counts: never below 0 in a conn.log (Zeek's ``count``
# and ``interval`` of a connection).
COUNT_FIELDS: tuple[str, ...] = (
    "duration", "orig_bytes", "resp_bytes", "orig_pkts", "resp_pkts",
    "orig_ip_bytes", "resp_ip_bytes", "missed_bytes",
)
# Dotted IPv4 exactly as ``ipaddress`` takes it (0..255, no leading zeros): lets a
# reader pass most addresses in C and check only the rest one by one.
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
IPV4_PATTERN = rf"^({_OCTET}\.){{3}}{_OCTET}$"
_IPV4 = re.compile(IPV4_PATTERN.replace("$", r"\Z"))

_ARROW_SCHEMA = None


def conn_schema():  # -> pyarrow.Schema
    """Return the Arrow schema of the canonical conn record (imports pyarrow)."""
    global _ARROW_SCHEMA
    if _ARROW_SCHEMA is None:
        import pyarrow as pa

        types = {
            "f64": pa.float64(),
            "i64": pa.int64(),
            "i8": pa.int8(),
            "str": pa.string(),
        }
        _ARROW_SCHEMA = pa.schema(
            [pa.field(name, types[kind], nullable=True) for name, kind in CONN_FIELDS]
        )
    return _ARROW_SCHEMA


def value_problem(kind: str, value: Any) -> str | None:
    """Why ``value`` cannot be a field of ``kind``, or None when it can.

    Null is always allowed. ``f64`` takes a finite int or float; ``i64`` and ``i8``
    take an int (or an integral float) in the kind's range; ``str`` takes a str.
    Booleans are not numbers here.
    """
    if value is None:
        return None
    if kind == "str":
        if isinstance(value, str):
            return None
        return f"expected a string, found {_short(value)}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"expected a number, found {_short(value)}"
    if kind == "f64":
        try:
            finite = math.isfinite(value)
        except OverflowError:
            finite = False
        return None if finite else f"expected a finite number, found {_short(value)}"
    if isinstance(value, float) and not value.is_integer():
        return f"expected an integer, found {value!r}"
    low, high = INT_RANGES[kind]
    if not low <= value <= high:
        return f"expected an integer from {low} to {high}, found {_short(value)}"
    return None


def address_problem(text: str) -> str | None:
    """Why ``text`` is not an IPv4 or IPv6 address (an IPv6 zone is allowed), or None.

    The canonical ``src_ip``/``dst_ip`` hold addresses as Zeek writes them: dotted
    IPv4 (``10.0.0.1``) or IPv6 text (``fe80::1``, ``fe80::1%eth0``). Anything else
    (a host name, ``999.1.1.1``, a MAC address, an empty string) is a bad value.
    """
    return None if is_address(text) else (
        f"expected an IPv4 or IPv6 address, found {_short(text)}"
    )


_ZONE = re.compile(r"[A-Za-z0-9_.-]{1,32}")


@lru_cache(maxsize=65536)
def is_address(text: str) -> bool:
    """Whether ``text`` is an IPv4 or IPv6 address (see :func:`address_problem`)."""
    if _IPV4.match(text):
        return True
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    # Python takes any text after "%" as the zone; an interface name is short and
    # plain ("fe80::1%eth0"), never "(allowlisted, benign)" shown to an operator.
    _, percent, zone = text.partition("%")
    return not percent or bool(_ZONE.fullmatch(zone))


def proto_problem(text: str) -> str | None:
    """Why ``text`` is not a protocol (:data:`PROTO_NAME_PATTERN`, or a number
    0..255), or None. An empty string, a blank, a control character or a long
    text names no protocol, and text that reads as a number (``6.5``, ``-4``,
    ``1e3``) must be a whole number 0..255, not a name."""
    low, high = PROTO_NUMBERS
    if text.isascii() and text.isdigit():
        if low <= int(text) <= high:
            return None
        return f"expected a protocol number from {low} to {high}, found {_short(text)}"
    if _NUMBER_TEXT.match(text):
        return (
            f"expected a protocol number, a whole number from {low} to {high}, "
            f"found {_short(text)}"
        )
    if _PROTO_NAME.match(text):
        return None
    return (
        "expected a protocol name (letters, digits and - _ . + /, such as tcp or "
        f"ipv6-icmp) or number {low}..{high}, found {_short(text)}"
    )


def proto_text(value: Any) -> Any:
    """A protocol given as a number (a Parquet integer column, ``"proto": 6`` in
    JSON) as the text a canonical record holds: ``6`` and ``6.0`` become ``'6'``,
    as Arrow casts a number column to text; another float becomes its text
    (``'6.5'``), which :func:`proto_problem` then refuses. Text, null and
    booleans are returned as they are (a boolean is no protocol number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def proto_number_problem(value: float) -> str | None:
    """Why the number ``value`` is not a protocol number (a whole number 0..255),
    or None: the rule of :func:`proto_problem` for a column that holds protocols
    as numbers (CICFlowMeter's ``Protocol``). NaN is not one; ``6.0`` is 6."""
    low, high = PROTO_NUMBERS
    if low <= value <= high and float(value).is_integer():
        return None
    return (
        f"expected a protocol number, a whole number from {low} to {high}, "
        f"found {_short(value)}"
    )


def port_problem(value: float) -> str | None:
    """Why ``value`` is not a port number (a whole number 0..65535), or None.

    NaN is not one, and neither is a value with a fraction (``1.5``); ``80.0``, as
    a float column holds 80, is.
    """
    low, high = PORT_RANGE
    if not low <= value <= high:
        return f"expected a port from {low} to {high}, found {_short(value)}"
    if not float(value).is_integer():
        return (
            f"expected a port from {low} to {high} (a whole number), "
            f"found {_short(value)}"
        )
    return None


def count_problem(value: float, whole: bool = False) -> str | None:
    """Why ``value`` is not a duration or count (a number >= 0), or None.

    With ``whole`` it must be a packet or byte count, a whole number as well:
    ``3.0`` (how a float column holds 3) passes, ``3.5`` does not.
    """
    if not value >= 0:
        return f"expected a number >= 0, found {_short(value)}"
    if whole and not float(value).is_integer():
        return f"expected a whole number >= 0, found {_short(value)}"
    return None


def time_problem(value: float) -> str | None:
    """Why ``value`` is not a flow's start time, or None.

    A ``ts`` is epoch seconds: a finite number, not below 0 (before 1970) and
    below :data:`TS_LIMIT` (the year 10000, which no ``datetime`` can hold), the
    bounds the flow meter sets on packet times too (:func:`packet_time_problem`),
    so a text file and a capture refuse the same times. Null is not checked here
    (a reader passes it).
    """
    try:
        finite = math.isfinite(value)
    except OverflowError:
        finite = False
    if not finite:
        return f"expected a finite number, found {_short(value)}"
    if value < 0:
        return (
            f"expected a time in epoch seconds >= 0 (1970 or later), "
            f"found {_short(value)}"
        )
    if value >= TS_LIMIT:
        return (
            f"expected a time in epoch seconds below {TS_LIMIT:.0f} (before the "
            f"year 10000), found {_short(value)}"
        )
    return None


def packet_time_problem(value: float) -> str | None:
    """Why ``value`` cannot be a captured packet's time, or None.

    The bounds of :func:`time_problem`: a time past year 9999 (a pcapng
    ``if_tsoffset`` near 2**63, a damaged time stamp) is no date Python's
    ``datetime`` can hold, so the flow meter skips such a packet as damaged, as
    it does one stamped before 1970.
    """
    return time_problem(value)


def field_value_problem(name: str, value: Any) -> str | None:
    """:func:`value_problem` for the canonical field ``name``, worded for what the
    field holds: a number out of a port's range is "expected a port from 0 to
    65535", one out of a packet or byte count's range "expected a non-negative
    count", not the bounds of a 64-bit integer, which mean nothing to a user."""
    kind = CONN_FIELD_KINDS[name]
    problem = value_problem(kind, value)
    if problem is None or isinstance(value, bool) or not isinstance(value, int | float):
        return problem
    if name in PORT_FIELDS:
        return port_problem(value) or problem
    if name in COUNT_FIELDS and kind in INT_RANGES:
        high = INT_RANGES[kind][1]
        return f"expected a non-negative count (0 to {high}), found {_short(value)}"
    return problem


def field_problem(name: str, value: Any) -> str | None:
    """Why ``value`` cannot be the canonical field ``name``, or None when it can.

    :func:`value_problem` for the field's kind, then the meaning of the field:
    addresses must be IP addresses, ports must lie in 0..65535, ``proto`` must
    name a protocol (:func:`proto_problem`), durations and counts must not be
    negative. Null is allowed.
    """
    problem = field_value_problem(name, value)
    if problem is not None or value is None:
        return problem
    if name in ADDRESS_FIELDS:
        return address_problem(value)
    if name in PORT_FIELDS:
        return port_problem(int(value))
    if name == "proto":
        return proto_problem(value)
    if name in COUNT_FIELDS:
        return count_problem(value)
    return None


# The values an error message quotes by ``repr``: what JSON, text and numeric
# columns hold. Others (a Parquet timestamp's datetime, a decimal) are shown as
# plain text with their type's name, never as Python source.
_REPR_TYPES = (str, bytes, int, float, list, tuple, dict, type(None))


def _short(value: Any) -> str:
    """A value as an error message quotes it: ``repr``, cut to 40 characters (a
    hostile value can be huge).

    A float holding a whole number is quoted as that integer (``70000``, not
    ``70000.0``: a float column holds the file's ``70000`` so); one with a fraction
    (``1.5``), NaN, the infinities and whole floats past 2**53, which no longer
    name one integer (``1e+300``), keep their ``repr``. A value of another type
    is its plain text and type name: a time in ISO 8601
    (``2022-06-12T21:59:01 (a datetime)``), anything else as ``str`` writes it.
    """
    if not isinstance(value, _REPR_TYPES):
        shown = value.isoformat() if hasattr(value, "isoformat") else str(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        kind = type(value).__name__
        return f"{shown} ({'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind})"
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        value = int(value)
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**40 else None
    if text is None:
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= 40 else text[:37] + "..."


def empty_columns() -> dict[str, list[Any]]:
    """Return a dict of empty lists, one per canonical field, for building a batch."""
    return {name: [] for name in CONN_FIELD_NAMES}


def columns_to_table(columns: dict[str, list[Any]]):  # -> pyarrow.Table
    """Build a canonical Arrow table from per-field lists (missing fields null)."""
    import pyarrow as pa

    schema = conn_schema()
    n = max((len(v) for v in columns.values()), default=0)
    arrays = []
    for field in schema:
        values = columns.get(field.name)
        if values is None:
            values = [None] * n
        try:
            arrays.append(pa.array(values, type=field.type))
        except (OverflowError, TypeError, pa.ArrowException) as exc:
            # Readers check values first; this only keeps a missed one a gatewatch
            # error.
            raise BadInputError(
                f"a value does not fit {field.type} ({exc})", column=field.name
            ) from exc
    return pa.Table.from_arrays(arrays, schema=schema)


def table_to_columns(table) -> dict[str, Any]:
    """Turn an Arrow table into ``{name: numpy array}``; strings become object arrays.

    Numeric nulls become NaN in a float array, string nulls stay ``None``, so the
    encoder can tell a null from a zero.
    """
    import numpy as np

    out: dict[str, Any] = {}
    for name in table.column_names:
        col = table.column(name)
        if col.type == "string" or str(col.type) in ("string", "large_string"):
            out[name] = np.array(col.to_pylist(), dtype=object)
        else:
            out[name] = col.to_numpy(zero_copy_only=False).astype(np.float64)
    return out
