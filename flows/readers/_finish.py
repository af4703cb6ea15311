"""The last step every reader shares: apply the on_error rule and build the result.

A reader hands over the rows it could convert, the file line of each row, and the
problems it found (bad values in rows it holds, or lines it could not split at all).
With ``on_error="fail"`` the first problem stops the read: the rows before it are
kept on the raised error as ``exc.result`` (a :class:`PartialInputError` when there
are such rows, a plain :class:`BadInputError` when there are none). With
``on_error="skip"`` every problem row is dropped and counted in ``skipped``.
A cut input (``cut``) is never an error: the rows before the cut are returned with
``partial=True`` and a warning saying where the input stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flows import logger
from flows.errors import BadInputError, PartialInputError
from flows.readers._lazy import LazyModule
from flows.readers.result import ReadResult

pa = LazyModule("pyarrow")

ON_ERROR = ("fail", "skip")


@dataclass(frozen=True)
class Problem:
    """One bad line: where it is, which column (if known) and what was wrong."""

    line: int
    column: str | None
    message: str


def finish(
    table: pa.Table,
    lines: np.ndarray,
    problems: list[Problem],
    *,
    path: str,
    on_error: str,
    fmt: str,
    family: str,
    cut: str | None = None,
    stats: dict | None = None,
    warnings: list[str] | None = None,
    row_problems: dict[int, Problem] | None = None,
    unit: str = "line",
) -> ReadResult:
    """Apply ``on_error`` to the problems found in one file and return its result.

    ``row_problems`` maps a row index of ``table`` to its problem; ``problems``
    holds the lines that never became rows. ``lines[i]`` is the line of row ``i``
    (with ``unit="row"``, for inputs without lines such as Parquet, its 1-based
    row number; messages then say "row").
    """
    stats = dict(stats or {})
    warnings = list(warnings or [])
    row_problems = row_problems or {}
    every = list(problems) + list(row_problems.values())

    if every and on_error == "fail":
        first = min(every, key=lambda p: p.line)
        kept = table.filter(pa.array(lines < first.line)) if len(table) else table
        note = f"{path}: stopped at {unit} {first.line}: {first.message}"
        result = ReadResult(
            kept, fmt, family, warnings=warnings + [note], partial=True, stats=stats
        )
        logger.info("read %s: stopped at %s %d", path, unit, first.line)
        cls = PartialInputError if len(kept) else BadInputError
        where = {"row": first.line} if unit == "row" else {"line": first.line}
        exc = cls(first.message, path=path, column=first.column, **where)
        exc.result = result
        raise exc

    skipped = 0
    if every:
        keep = np.ones(len(table), dtype=bool)
        if row_problems:
            keep[np.fromiter(row_problems, dtype=np.int64)] = False
        table = table.filter(pa.array(keep))
        skipped = len({p.line for p in every})
        first = min(every, key=lambda p: p.line)
        where = f"{unit} {first.line}" + (
            f", column {first.column!r}" if first.column else ""
        )
        warnings.append(
            f"{path}: skipped {skipped} bad {unit}(s); the first at {where}: "
            f"{first.message}"
        )
        stats["skipped_lines"] = sorted({p.line for p in every})[:20]

    if cut is not None:
        warnings.append(cut)
    logger.info(
        "read %s: %d rows (%s), %d skipped%s",
        path,
        len(table),
        fmt,
        skipped,
        ", cut short" if cut else "",
    )
    return ReadResult(
        table,
        fmt,
        family,
        skipped=skipped,
        warnings=warnings,
        partial=cut is not None,
        stats=stats,
    )


def check_on_error(on_error: str) -> None:
    """Refuse any on_error other than ``fail`` and ``skip``."""
    from flows.errors import UsageError

    if on_error not in ON_ERROR:
        raise UsageError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
