"""Splitting a delimited text block into string columns, keeping each row's line."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from flows.errors import BadInputError
from flows.readers._finish import Problem


def split_rows(
    body: bytes,
    names: list[str],
    delimiter: str,
    *,
    path: str,
    first_line: int,
    quote: str | bool = False,
) -> tuple[pa.Table, np.ndarray, list[Problem], str | None]:
    """Split ``body`` (rows only, no header) into string columns.

    Returns the table (column ``c<i>`` for ``names[i]``), the line of each row, the
    lines with the wrong number of fields, and a note when the last line is cut
    short (no final newline and too few fields).
    """
    if b"\r" in body:
        body = body.replace(b"\r\n", b"\n")
    line_map = None
    if b"\n\n" in body or body.startswith(b"\n"):
        kept = [(i, ln) for i, ln in enumerate(body.split(b"\n")) if ln.strip()]
        line_map = np.array([first_line + i for i, _ in kept], dtype=np.int64)
        body = b"\n".join(ln for _, ln in kept) + b"\n"
    invalid: list[tuple[int, int]] = []

    def on_invalid(row) -> str:
        invalid.append((row.number, row.actual_columns))
        return "skip"

    cols = [f"c{i}" for i in range(len(names))]
    try:
        table = pacsv.read_csv(
            io.BytesIO(body),
            read_options=pacsv.ReadOptions(
                column_names=cols, use_threads=False, block_size=1 << 24
            ),
            parse_options=pacsv.ParseOptions(
                delimiter=delimiter,
                quote_char=quote,
                escape_char=False,
                ignore_empty_lines=True,
                invalid_row_handler=on_invalid,
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in cols},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
                null_values=[],
            ),
        )
    except pa.ArrowInvalid as exc:
        raise BadInputError(f"cannot split rows ({exc})", path=path) from exc

    n_physical = table.num_rows + len(invalid)
    good = np.ones(n_physical, dtype=bool)
    problems, cut = [], None
    for number, actual in invalid:
        good[number - 1] = False
        line = (
            int(line_map[number - 1])
            if line_map is not None
            else first_line + number - 1
        )
        if number == n_physical and not body.endswith(b"\n") and actual < len(names):
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


def header_and_body(data: bytes) -> tuple[str, bytes]:
    """The first line (BOM and CR stripped) and the bytes after it."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    end = data.find(b"\n")
    end = len(data) if end < 0 else end
    return data[:end].decode("utf-8", "replace").rstrip("\r"), data[end + 1 :]
