"""Parquet input: canonical conn tables (and the other families) written by gatewatch.

The family comes from the ``gatewatch.family`` key of the file's metadata, else from
the columns (the canonical conn fields, or the NSL-KDD/UNSW/CIC labels). A conn
table is cast to the canonical schema, with any extra columns kept after it; a row
whose address is not an IP address, whose port is outside 0..65535, whose
``proto`` is neither a protocol name nor a number 0..255, whose duration
or count is negative or whose ``ts`` is not finite, lies before 1970 (below 0) or at
or past the year 10000 is a bad row, named by its 1-based row number (``on_error``
as for the text readers).

``ts`` is epoch seconds (a number), or an Arrow timestamp of any unit (``s``,
``ms``, ``us``, ``ns``), turned into epoch seconds as float64 without losing a
digit the float can hold (:func:`epoch_seconds`). A timestamp with a zone is an
instant already; one without a zone is the wall-clock time of the ``timezone``
the reader is given (an IANA name; default UTC), read as Argus binetflow start
times are (a time the clock shows twice is the first of the two).

A number field (``ts``, ``duration``, the ports and counts, ``label``) must be a
column of a number type (integer, floating point or decimal; a ``ts`` timestamp
too): one of another type (text, even of digits; booleans) refuses the file by
its column and type (:func:`number_column_problem`), in ``flows`` and the edge
agent's ``parquet:`` source alike, before any row is read.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flows.errors import BadInputError, PartialInputError, one_line
from flows.readers._convert import BadRows, value_counts
from flows.readers._finish import Problem, finish
from flows.readers.result import Damage, ReadResult
from flows.record import CONN_FIELD_NAMES, CONN_FIELDS, conn_schema

FAMILY_KEY = b"gatewatch.family"


def read_parquet(
    path, on_error: str = "fail", name: str | None = None, timezone: str = "UTC"
) -> ReadResult:
    """Read a Parquet file; damage after some row groups keeps the groups before it
    (row groups are named counting from 1, as rows are: ``row group 2 of 3``).

    ``path`` may also be a pyarrow buffer reader (standard input), named ``name``.
    ``timezone`` is the zone of a ``ts`` timestamp column without one (module doc).
    """
    source, path = path, name or str(path)
    try:
        handle = pq.ParquetFile(source)
    except (pa.ArrowInvalid, OSError) as exc:
        raise BadInputError(
            f"not a readable Parquet file ({one_line(exc)})", path=path
        ) from exc

    groups, partial_at = [], None
    for i in range(handle.num_row_groups):
        try:
            groups.append(handle.read_row_group(i))
        except (pa.ArrowInvalid, OSError) as exc:
            partial_at = (i, exc)
            break
    table = pa.concat_tables(groups) if groups else handle.schema_arrow.empty_table()
    metadata = handle.schema_arrow.metadata or {}
    family = metadata.get(FAMILY_KEY, b"").decode() or _family_from_columns(table, path)
    if family == "conn":
        table = to_conn_table(table, path, timezone=timezone)

    stats = {"labels": {}, "labeled": "label" in table.column_names}
    labels = None  # each row's label as written, counted over the rows kept
    if "label_detail" in table.column_names:
        labels = table.column("label_detail")
        if labels.type != pa.string():
            try:
                labels = labels.cast(pa.string())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                stats["labels"] = value_counts(labels)  # not text: as it is
                labels = None
    if family == "conn" and len(table):
        result = _check_rows(
            table, path, on_error, stats, partial_at is not None, labels
        )
    else:
        if labels is not None:
            stats["labels"] = value_counts(labels)
        result = ReadResult(
            table, "parquet", family, stats=stats, label_text=labels
        )
    if partial_at is not None:
        index, exc = partial_at
        # pyarrow's message ends with a newline and may span lines: one line here.
        problem = f"cannot be read ({one_line(exc)})"
        # Counted from 1, as rows are: "row group 1 of 2" is the first.
        place = f"row group {index + 1} of {handle.num_row_groups}"
        what = f"{place} {problem}"
        result.partial = True
        result.warnings.append(f"{path}: {what}")
        result.damage.append(Damage(path, problem, place=place))
        if not groups:
            raise BadInputError(what, path=path) from exc  # names the file once
        err = PartialInputError(what, path=path)
        err.result = result
        raise err from exc
    return result


def _check_rows(
    table: pa.Table,
    path: str,
    on_error: str,
    stats: dict,
    damaged: bool,
    labels: pa.ChunkedArray | None = None,
) -> ReadResult:
    """Apply the canonical record's rules (addresses, ports, counts, times)."""
    from flows.readers.zeek import check_endpoints
    from flows.record import ADDRESS_FIELDS, COUNT_FIELDS, PORT_FIELDS

    names = (*ADDRESS_FIELDS, *PORT_FIELDS, "proto", "ts", *COUNT_FIELDS)
    arrays = {name: table.column(name).combine_chunks() for name in names}
    bad = BadRows()
    check_endpoints(arrays, bad, zeek_names=False)
    row_problems = {
        row: Problem(row + 1, column, message)
        for row, (column, message) in bad.rows.items()
    }
    try:
        return finish(
            table,
            np.arange(1, len(table) + 1),
            [],
            path=path,
            on_error=on_error,
            fmt="parquet",
            family="conn",
            stats=stats,
            row_problems=row_problems,
            unit="row",
            label_text=labels,
        )
    except BadInputError as exc:
        if damaged:
            exc.result.partial = True  # the later row groups are unreadable too
        raise


def _family_from_columns(table: pa.Table, path: str) -> str:
    names = set(table.column_names)
    if {"src_ip", "dst_ip", "ts"} <= names:
        return "conn"
    if {"protocol_type", "dst_host_srv_rerror_rate"} <= names:
        return "nsl-kdd"
    if {"sbytes", "dbytes", "sttl"} <= names:
        return "unsw-nb15"
    if "Flow Duration" in names:
        return "cic"
    shown = ", ".join(sorted(names)[:8]) + (", ..." if len(names) > 8 else "")
    raise BadInputError(
        f"Parquet columns ({shown or 'none'}) match no known family: expected conn "
        "(src_ip, dst_ip, ts), nsl-kdd, unsw-nb15 or cic columns",
        path=path,
    )


def to_conn_table(
    table: pa.Table, path: str = "", *, timezone: str = "UTC"
) -> pa.Table:
    """Cast a table with the canonical columns to the canonical schema, extras after.

    A ``ts`` held as an Arrow timestamp becomes epoch seconds first
    (:func:`epoch_seconds`; ``timezone``: the zone of one without a zone).
    """
    schema = conn_schema()
    missing = [n for n in CONN_FIELD_NAMES if n not in table.column_names]
    if missing:
        raise BadInputError(
            f"Parquet table lacks canonical columns {', '.join(missing)}",
            path=path or None,
            column=missing[0],
        )
    wrong = number_column_problem(table.schema)
    if wrong is not None:
        name, problem = wrong
        raise BadInputError(problem, path=path or None, column=name)
    ts = table.column("ts")
    if pa.types.is_timestamp(ts.type):
        table = table.set_column(
            table.schema.get_field_index("ts"), "ts", epoch_seconds(ts, timezone)
        )
    arrays, fields = [], []
    for field in schema:
        try:
            arrays.append(table.column(field.name).cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise BadInputError(
                f"column cannot be read as {field.type} ({exc})",
                path=path or None,
                column=field.name,
            ) from exc
        fields.append(field)
    for name in table.column_names:
        if name not in CONN_FIELD_NAMES:
            arrays.append(table.column(name))
            fields.append(table.schema.field(name))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _is_number_type(kind, name: str) -> bool:
    """Whether a column of Arrow type ``kind`` holds numbers for the field ``name``
    (a ``ts`` timestamp is turned into numbers; an all-null column fits any)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return (
        pa.types.is_integer(kind)
        or pa.types.is_floating(kind)
        or pa.types.is_decimal(kind)
        or pa.types.is_null(kind)
        or (name == "ts" and pa.types.is_timestamp(kind))
    )


def number_column_problem(schema: pa.Schema) -> tuple[str, str] | None:
    """The first canonical number field whose column in ``schema`` is not of a
    number type, and what is wrong with it (``is string, expected a number
    type ...``); None when every one present is. The rule for ``flows`` and the
    edge agent's ``parquet:`` source alike: the column's type is refused, not a
    value of it that may look like a number (``'35740'``)."""
    kinds = dict(zip(schema.names, schema.types, strict=True))
    for name, kind in CONN_FIELDS:
        if kind == "str" or name not in kinds or _is_number_type(kinds[name], name):
            continue
        return name, f"is {kinds[name]}, " + _number_type_wanted(kinds[name], name)
    return None


def _number_type_wanted(kind: pa.DataType, name: str) -> str:
    """What a number field's column should be, for one of type ``kind``."""
    if pa.types.is_date(kind):
        return (
            "a calendar date, which names no time; expected epoch seconds (a number "
            "type) or a timestamp"
        )
    wanted = "expected a number type (integer or floating point)"
    if name == "ts":
        wanted += " or a timestamp"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        wanted += "; a column of numbers held as text is not read as numbers"
    return wanted


# Ticks per second of each Arrow timestamp unit.
_TICKS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
_FLOAT_EXACT = 1 << 53  # integers up to this size are exact as float64


def epoch_seconds(
    column: pa.Array | pa.ChunkedArray, timezone: str = "UTC"
) -> pa.Array:
    """An Arrow timestamp column as epoch seconds (float64; nulls stay null).

    A timestamp with a zone holds UTC ticks, whatever zone it is shown in; one
    without a zone holds wall-clock time, taken in ``timezone`` (an IANA name;
    ``UTC`` by default) as :mod:`flows.readers.binetflow` takes StartTime. Each
    value is the float64 nearest the exact number of seconds.
    """
    from flows.readers.binetflow import _local_to_utc, time_zone

    if isinstance(column, pa.ChunkedArray):
        column = (column.combine_chunks() if column.num_chunks
                  else pa.array([], type=column.type))
    kind = column.type
    ticks = _TICKS[kind.unit]
    valid = np.asarray(column.is_valid(), dtype=bool)
    counts = np.asarray(column.cast(pa.int64()).fill_null(0), dtype=np.int64)
    zone = time_zone(timezone) if kind.tz is None else None
    if zone is not None and valid.any():
        # Offsets by the wall-clock second (floor, also before 1970), as the
        # binetflow reader finds them; the ticks below a second are kept as they are.
        local = np.floor_divide(counts, ticks)
        utc = _local_to_utc(pa.array(local, mask=~valid), zone)
        offsets = local - np.asarray(utc.fill_null(0), dtype=np.int64)
        counts = counts - offsets * ticks
    seconds = _exact_seconds(counts, ticks)
    return pa.array(seconds, type=pa.float64(), mask=~valid)


def _exact_seconds(counts: np.ndarray, ticks: int) -> np.ndarray:
    """``counts / ticks`` for int64 ``counts``, each the float64 nearest the exact
    quotient.

    Up to 2**53 ticks both numbers are exact floats and one IEEE division rounds
    once. Past it (nanoseconds after mid-April 1970) the count is split into
    whole seconds and the rest: ``rest / ticks`` is off by at most 2**-54, and
    once the seconds reach 2**(ticks.bit_length() - 1) (2**29 s, 1987, for
    nanoseconds) no exact quotient lies that close to a rounding boundary of the
    sum, which then rounds right too. The few counts in between are divided by
    Python's integer division, which rounds correctly.
    """
    seconds = counts.astype(np.float64)
    if ticks == 1:
        return seconds
    seconds /= ticks
    big = (counts > _FLOAT_EXACT) | (counts < -_FLOAT_EXACT)
    if not big.any():
        return seconds
    where = np.flatnonzero(big)
    whole, rest = np.divmod(counts[where], ticks)
    seconds[where] = whole.astype(np.float64) + rest / ticks
    safe = 1 << (ticks.bit_length() - 1)
    near = where[(whole > -safe - 1) & (whole < safe + 1)]
    if len(near):
        seconds[near] = [count / ticks for count in counts[near].tolist()]
    return seconds
