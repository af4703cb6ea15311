"""The last step every reader shares: apply the on_error rule and build the result.

A reader hands over the rows it could convert, the file line of each row, and the
problems it found (bad values in rows it holds, or lines it could not split at all).
With ``on_error="fail"`` the first problem stops the read: the rows before it are
kept on the raised error as ``exc.result`` (a :class:`PartialInputError` when there
are such rows, a plain :class:`BadInputError` when there are none). With
``on_error="skip"`` every problem row is dropped and counted in ``skipped``.
A cut input (``cut``) is never an error: the rows before the cut are returned with
``partial=True`` and a warning saying where the input stopped.

What a reader counts over its rows (``stats["labels"]`` from ``label_text``, and
whatever its ``tally`` counts) is counted over the rows kept only, never over bad
rows or rows after the first bad one. The result's ``recount`` counts the tally
again when rows are left out later (``drop_unlabeled``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from flows import logger
from flows.errors import BadInputError, PartialInputError
from flows.readers._convert import value_counts
from flows.readers._lazy import LazyModule
from flows.readers.result import Damage, ReadResult

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
    label_text: pa.Array | pa.ChunkedArray | None = None,
    tally: Callable[[np.ndarray], tuple[dict, list[str]]] | None = None,
    non_ip: np.ndarray | None = None,
) -> ReadResult:
    """Apply ``on_error`` to the problems found in one file and return its result.

    ``row_problems`` maps a row index of ``table`` to its problem; ``problems``
    holds the lines that never became rows. ``lines[i]`` is the line of row ``i``
    (with ``unit="row"``, for inputs without lines such as Parquet, its 1-based
    row number; messages then say "row").

    ``label_text`` holds each row's label as written (``stats["labels"]`` counts
    it over the rows kept). ``tally(keep)`` is given a mask of the rows kept (one
    entry per row of ``table``) and returns the stats it counts over them and the
    warnings that say so; they follow the reader's own ``warnings``.

    ``non_ip`` marks the rows of ``table`` that are records of no IP flow; the
    result keeps it, and ``lines``, for the rows it holds (``row_lines``).
    """
    stats = dict(stats or {})
    warnings = list(warnings or [])
    row_problems = row_problems or {}
    every = list(problems) + list(row_problems.values())

    def count_kept(keep: np.ndarray) -> tuple[object, list[str]]:
        """Count the reader's per-row facts over the rows ``keep`` marks."""
        labels = label_text
        if labels is not None:
            if len(labels) != len(table):
                raise ValueError("label_text must hold one value per row of table")
            if not keep.all():
                labels = labels.filter(pa.array(keep))
            stats["labels"] = value_counts(labels)
        notes: list[str] = []
        if tally is not None:
            more, notes = tally(keep)
            stats.update(more)
        return labels, notes

    if every and on_error == "fail":
        first = min(every, key=lambda p: p.line)
        keep = np.asarray(lines < first.line, dtype=bool)
        kept = table.filter(pa.array(keep)) if len(table) else table
        labels, notes = count_kept(keep)
        note = f"{path}: stopped at {unit} {first.line}: {first.message}"
        result = ReadResult(
            kept,
            fmt,
            family,
            warnings=warnings + notes + [note],
            partial=True,
            stats=stats,
            label_text=labels,
        )
        result.recount = Recount.of(tally, keep, notes)
        _place_rows(result, lines, keep, unit, non_ip)
        logger.info("read %s: stopped at %s %d", path, unit, first.line)
        cls = PartialInputError if len(kept) else BadInputError
        where = {"row": first.line} if unit == "row" else {"line": first.line}
        exc = cls(first.message, path=path, column=first.column, **where)
        exc.result = result
        raise exc

    skipped = 0
    keep = np.ones(len(table), dtype=bool)
    if row_problems:
        keep[np.fromiter(row_problems, dtype=np.int64)] = False
    labels, notes = count_kept(keep)
    warnings += notes
    if every:
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

    damage = []
    if cut is not None:
        warnings.append(cut)
        what = cut.removeprefix(f"{path}: ")
        damage.append(Damage(path, what, stopped=True))
    logger.info(
        "read %s: %d rows (%s), %d skipped%s",
        path,
        len(table),
        fmt,
        skipped,
        ", cut short" if cut else "",
    )
    result = ReadResult(
        table,
        fmt,
        family,
        skipped=skipped,
        warnings=warnings,
        partial=cut is not None,
        stats=stats,
        damage=damage,
        label_text=labels,
    )
    result.recount = Recount.of(tally, keep, notes)
    _place_rows(result, lines, keep, unit, non_ip)
    return result


def _place_rows(
    result: ReadResult,
    lines: np.ndarray,
    keep: np.ndarray,
    unit: str,
    non_ip: np.ndarray | None,
) -> None:
    """Keep the line (or row number) of each row ``result`` holds, and which of
    them are records of no IP flow, for callers that name rows one by one."""
    lines = np.asarray(lines)
    if len(lines) != len(keep):
        return  # a reader that numbers its rows otherwise: no places to give
    result.row_lines = lines[keep]
    result.row_unit = unit
    if non_ip is not None and len(non_ip) == len(keep):
        result.non_ip = np.asarray(non_ip, dtype=bool)[keep]


@dataclass
class Recount:
    """A reader's ``tally``, kept to count its stats again over fewer rows.

    ``rows`` are the indices, in the table the reader built (``size`` rows), of
    the rows of the result; ``notes`` the warnings the last count gave (a new
    count replaces them).
    """

    tally: Callable[[np.ndarray], tuple[dict, list[str]]]
    rows: np.ndarray
    size: int
    notes: list[str]

    @classmethod
    def of(cls, tally, keep: np.ndarray, notes: list[str]) -> Recount | None:
        """The Recount of a result holding the rows ``keep`` marks; None without
        a tally."""
        if tally is None:
            return None
        return cls(tally, np.flatnonzero(keep), len(keep), list(notes))

    def __call__(self, mask: np.ndarray) -> tuple[dict, list[str], list[str]]:
        """Count over the result's rows ``mask`` marks: the stats, the new notes,
        and the old notes they replace."""
        keep = np.zeros(self.size, dtype=bool)
        keep[self.rows[np.asarray(mask, dtype=bool)]] = True
        stats, notes = self.tally(keep)
        old, self.notes = self.notes, list(notes)
        self.rows = np.flatnonzero(keep)
        return stats, notes, old


def check_on_error(on_error: str) -> None:
    """Refuse any on_error other than ``fail`` and ``skip``."""
    from flows.errors import UsageError

    if on_error not in ON_ERROR:
        raise UsageError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
