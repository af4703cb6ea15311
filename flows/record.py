"""The canonical flow record: one connection, with the meanings of Zeek's conn.log.

Every reader and the packet flow meter produce records with exactly these fields, in
this order. Unknown values are nulls (``None`` in Python, null in Arrow), never 0
and never the string ``"-"``. ``label`` is 1 for malicious, 0 for benign and null
where the source says nothing usable (Background, Unknown, no label column).

The field list and :func:`empty_columns` need only the standard library; the Arrow
schema needs pyarrow and is built on first use.
"""

from __future__ import annotations

from typing import Any

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

_ARROW_SCHEMA = None


def conn_schema():  # -> pyarrow.Schema
    """Return the Arrow schema of the canonical conn record (imports pyarrow)."""
    global _ARROW_SCHEMA
    if _ARROW_SCHEMA is None:
        import pyarrow as pa

        types = {"f64": pa.float64(), "i64": pa.int64(), "i8": pa.int8(), "str": pa.string()}
        _ARROW_SCHEMA = pa.schema(
            [pa.field(name, types[kind], nullable=True) for name, kind in CONN_FIELDS]
        )
    return _ARROW_SCHEMA


def empty_columns() -> dict[str, list[Any]]:
    """Return a dict of empty lists, one per canonical field, for building a batch."""
    return {name: [] for name in CONN_FIELD_NAMES}


def columns_to_table(columns: dict[str, list[Any]]):  # -> pyarrow.Table
    """Build a canonical Arrow table from per-field Python lists (missing fields null)."""
    import pyarrow as pa

    schema = conn_schema()
    n = max((len(v) for v in columns.values()), default=0)
    arrays = []
    for field in schema:
        values = columns.get(field.name)
        if values is None:
            values = [None] * n
        arrays.append(pa.array(values, type=field.type))
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
