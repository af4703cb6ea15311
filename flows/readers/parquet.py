"""Parquet input: canonical conn tables (and the other families) written by gatewatch.

The family comes from the ``gatewatch.family`` key of the file's metadata, else from
the columns (the canonical conn fields, or the NSL-KDD/UNSW/CIC labels). A conn
table is cast to the canonical schema, with any extra columns kept after it; a row
whose address is not an IP address, whose port is outside 0..65535, whose
``proto`` is neither a protocol name nor a number 0..255, whose duration
or count is negative or whose ``ts`` is not finite, lies before 1970 (below 0) or at
or past the year 10000 is a bad row, named by its 1-based row number (``on_error``
as for the text readers).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flows.errors import BadInputError, PartialInputError, one_line
from flows.readers._convert import BadRows, value_counts
from flows.readers._finish import Problem, finish
from flows.readers.result import Damage, ReadResult
from flows.record import CONN_FIELD_NAMES, conn_schema

FAMILY_KEY = b"gatewatch.family"


def read_parquet(
    path, on_error: str = "fail", name: str | None = None
) -> ReadResult:
    """Read a Parquet file; damage after some row groups keeps the groups before it
    (row groups are named counting from 1, as rows are: ``row group 2 of 3``).

    ``path`` may also be a pyarrow buffer reader (standard input), named ``name``.
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
        table = to_conn_table(table, path)

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


def to_conn_table(table: pa.Table, path: str = "") -> pa.Table:
    """Cast a table with the canonical columns to the canonical schema, extras after."""
    schema = conn_schema()
    missing = [n for n in CONN_FIELD_NAMES if n not in table.column_names]
    if missing:
        raise BadInputError(
            f"Parquet table lacks canonical columns {', '.join(missing)}",
            path=path or None,
            column=missing[0],
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
