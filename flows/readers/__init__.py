"""Readers for every input format gatewatch accepts, behind one function: :func:`read`.

The format is found from the content (magic bytes, a Zeek header, a CSV header's
column names, the NSL-KDD row shape), not from the file name. Gzip is undone first,
whatever the name. Conn-like inputs (Zeek TSV and JSON, Argus binetflow, Parquet in
the canonical schema, pcap/pcapng through the flow meter) become canonical records
(family ``conn``); NSL-KDD, UNSW-NB15 and CICFlowMeter CSVs keep their own columns
(families ``nsl-kdd``, ``unsw-nb15``, ``cic``).

Errors: with ``on_error="fail"`` the first bad line raises an error naming the file,
the line and the column; the rows before it ride on the error as ``exc.result``
(:class:`~flows.errors.PartialInputError` when there are some). With
``on_error="skip"`` bad lines are dropped and counted in ``ReadResult.skipped``.
A cut input (a gzip stream without its end, a last line cut short) keeps every
complete row before the cut and sets ``ReadResult.partial``.

The path ``-`` reads standard input (named ``<stdin>`` in messages): any text
format, gzip or not, and Parquet; a packet capture must be given by file name.

``timezone`` (an IANA name such as ``Europe/Prague``; default ``UTC``) is the zone
an Argus binetflow ``StartTime`` is written in: Argus writes local time without a
zone. So is a Parquet ``ts`` held as an Arrow timestamp without a zone (one with a
zone is an instant, read as such). The other formats carry epoch times and do not
use it. An unknown name is a :class:`~flows.errors.UsageError`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from flows.errors import BadInputError, PartialInputError
from flows.readers._finish import check_on_error
from flows.readers._lazy import LazyModule
from flows.readers._source import Source, load, read_stream
from flows.readers.detect import FORMATS, sniff_binary, sniff_text
from flows.readers.result import ReadResult

pa = LazyModule("pyarrow")
pc = LazyModule("pyarrow.compute")

__all__ = [
    "FORMATS",
    "ReadResult",
    "detect_format",
    "iter_records",
    "read",
    "write_conn_log",
    "write_parquet",
]


def detect_format(path: str | Path) -> str:
    """Name the format of one file from its content (see :data:`FORMATS`)."""
    kind = _sniff_head(path)
    if kind is not None:
        return kind
    src = load(path)
    _check_not_empty(src)
    return sniff_text(src.data, src.path)


def read(
    path_or_paths: str | Path | Iterable[str | Path],
    on_error: str = "fail",
    drop_unlabeled: bool = False,
    timezone: str = "UTC",
) -> ReadResult:
    """Read one file or several (same family) into one table; see the module doc.

    ``drop_unlabeled`` removes rows whose label is null (Background, Unknown); on
    an input without any label column it is an error, since it would drop all.
    ``timezone`` is the zone of binetflow start times (see the module doc).
    """
    check_on_error(on_error)
    check_timezone(timezone)
    paths = (
        [path_or_paths]
        if isinstance(path_or_paths, (str, Path))
        else list(path_or_paths)
    )
    if not paths:
        raise BadInputError("no input files given")

    results: list[ReadResult] = []
    for path in paths:
        try:
            result = _read_one(path, on_error, timezone)
        except BadInputError as exc:
            done = getattr(exc, "result", None)
            if results or done is not None:
                parts = results + ([done] if done is not None else [])
                combined = _combine(parts)
                if drop_unlabeled:
                    combined = _drop_unlabeled(
                        combined, str(path), strict=False, parts=parts
                    )
                if len(combined.table) and not isinstance(exc, PartialInputError):
                    new = PartialInputError(
                        str(exc)[len(exc._where()) :],
                        path=exc.path,
                        line=exc.line,
                        column=exc.column,
                        offset=exc.offset,
                        row=getattr(exc, "row", None),
                    )
                    new.result = combined
                    raise new from exc
                exc.result = combined
            raise
        results.append(result)

    combined = _combine(results)
    if drop_unlabeled:
        combined = _drop_unlabeled(
            combined, ", ".join(map(str, paths)), parts=results
        )
    return combined


STDIN = "-"
STDIN_NAME = "<stdin>"


def _read_stdin(on_error: str, timezone: str) -> ReadResult:
    """Read standard input whole, in whatever format its content shows."""
    import sys

    try:
        src = read_stream(STDIN_NAME, sys.stdin.buffer, on_error == "fail")
    except (OSError, ValueError, AttributeError) as exc:
        raise BadInputError(f"cannot be read ({exc})", path=STDIN_NAME) from exc
    return _read_buffered(src, on_error, timezone)


def _read_buffered(src: Source, on_error: str, timezone: str) -> ReadResult:
    """Read an input read whole first (stdin, a pipe), which cannot be reopened."""
    kind = None if src.compressed else sniff_binary(src.data[:4])
    if kind == "parquet":
        from flows.readers.parquet import read_parquet

        return read_parquet(
            pa.BufferReader(src.data), on_error, name=src.path, timezone=timezone
        )
    if kind in ("pcap", "pcapng"):
        from flows.errors import UsageError

        raise UsageError(
            f"{src.path}: a {kind} capture is not read from a pipe or standard "
            "input; give its file name"
        )
    return _read_source(src, on_error, timezone)


def _is_pipe(path: str | Path) -> bool:
    """Whether ``path`` names a FIFO (``<(zcat ...)``), which can be read only once."""
    import stat

    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False  # the open that follows names the problem


def _read_one(path: str | Path, on_error: str, timezone: str) -> ReadResult:
    """Read one file in whatever format its content shows."""
    if str(path) == STDIN:
        return _read_stdin(on_error, timezone)
    # Failing at the first bad line, a gzip input need not be inflated past a line
    # over the length limit (which is bad): see flows.readers._source.
    fail_early = on_error == "fail"
    if _is_pipe(path):
        return _read_buffered(load(path, fail_early), on_error, timezone)
    kind = _sniff_head(path)
    if kind == "parquet":
        from flows.readers.parquet import read_parquet

        return read_parquet(str(path), on_error, timezone=timezone)
    if kind in ("pcap", "pcapng"):
        return _read_capture(str(path), on_error)

    from flows.readers._chunked import read_in_pieces

    result = read_in_pieces(path, on_error, timezone)
    if result is not None:
        return result
    return _read_source(load(path, fail_early), on_error, timezone)


def _read_source(src: Source, on_error: str, timezone: str) -> ReadResult:
    """Read the text of one input (already gunzipped) in the format it shows."""
    _check_not_empty(src)
    check_wide_text(src.data, src.path)
    if src.compressed and sniff_binary(src.data[:4]) is not None:
        raise BadInputError(
            f"gzip-compressed {sniff_binary(src.data[:4])}: gunzip it first",
            path=src.path,
        )
    fmt = sniff_text(src.data, src.path)
    if fmt in ("binetflow", "unsw-nb15", "cic-csv"):
        _check_header_length(src)
    if fmt == "zeek-tsv":
        from flows.readers.zeek import read_tsv

        return read_tsv(src, on_error)
    if fmt == "zeek-json":
        from flows.readers.zeek import read_json

        return read_json(src, on_error)
    if fmt == "nsl-kdd":
        from flows.readers.nslkdd import read_kdd

        return read_kdd(src, on_error)
    if fmt == "binetflow":
        from flows.readers.binetflow import read_binetflow

        return read_binetflow(src, on_error, timezone=timezone)
    from flows.readers.csvflows import read_cic, read_unsw

    return read_unsw(src, on_error) if fmt == "unsw-nb15" else read_cic(src, on_error)


def _check_header_length(src: Source) -> None:
    """Refuse a CSV header line over the length limit, as a row that long is.

    A header cannot be skipped like a bad row, and a gzip input holds only the
    start of such a line (see flows.readers._source), which would name other
    columns.
    """
    from flows.readers._source import MAX_LINE_BYTES, UTF8_BOM, too_long

    end = src.data.find(b"\n")
    length = len(src.data) if end < 0 else end
    if src.data.startswith(UTF8_BOM):
        length -= len(UTF8_BOM)
    if length > MAX_LINE_BYTES:
        raise BadInputError(too_long(length), path=src.path, line=1)


def check_timezone(timezone: str) -> None:
    """Refuse a binetflow time zone that is not an IANA name (or UTC): UsageError."""
    if timezone != "UTC":
        from flows.readers.binetflow import time_zone

        time_zone(timezone)


def _sniff_head(path: str | Path) -> str | None:
    """Magic-byte formats (parquet, pcap, pcapng) from the first four bytes."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except FileNotFoundError:
        raise BadInputError("no such file", path=str(path)) from None
    except IsADirectoryError:
        raise BadInputError("is a folder, expected a file", path=str(path)) from None
    except OSError as exc:
        raise BadInputError(f"cannot be read ({exc.strerror})", path=str(path)) from exc
    return sniff_binary(head)


def check_wide_text(data: bytes, path: str) -> None:
    """Refuse UTF-16 and UTF-32 text by name (Windows tools write it); we take UTF-8."""
    head = data[:512]

    # Byte-order marks; UTF-32 first, as its little-endian mark starts like UTF-16's.
    width = None
    if head[:4] in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"):
        width, how = 32, "a UTF-32 byte-order mark"
    elif head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        width, how = 16, "a UTF-16 byte-order mark"

    # Without a mark, ASCII text shows NUL bytes at fixed places: three of every
    # four bytes in UTF-32, one of every two in UTF-16.
    if width is None:
        quarter = len(head) // 4
        lanes = sorted(head[i::4].count(0) for i in range(4))
        half = len(head) // 2
        pairs = sorted((head[0::2].count(0), head[1::2].count(0)))
        if quarter >= 4 and lanes[1] > 0.75 * quarter and lanes[0] < 0.125 * quarter:
            width, how = 32, "three NUL bytes in every four"
        elif half >= 4 and pairs[1] > 0.75 * half and pairs[0] < 0.125 * half:
            width, how = 16, "a NUL byte in every other place"

    if width is not None:
        raise BadInputError(
            f"is UTF-{width} text ({how}); expected UTF-8 text: convert it first, "
            f"e.g. iconv -f UTF-{width} -t UTF-8",
            path=path,
        )


def _check_not_empty(src: Source) -> None:
    if not src.data or src.data.isspace():
        what = "holds no text after gunzip" if src.compressed else "is empty"
        if src.cut:
            what += f" ({src.cut})"
        raise BadInputError(what, path=src.path)


def _read_capture(path: str, on_error: str) -> ReadResult:
    """Hand a pcap/pcapng to the flow meter (helper package ``flows.meter``)."""
    try:
        from flows.meter import read_capture
    except ImportError as exc:
        raise BadInputError(
            "is a packet capture, but the flow meter (flows.meter.read_capture) is "
            f"not available in this install ({exc})",
            path=path,
        ) from exc
    return read_capture(path, on_error=on_error)


def _combine(results: list[ReadResult]) -> ReadResult:
    """Concatenate the results of several files of one family."""
    if len(results) == 1:
        return results[0]
    families = {r.family for r in results}
    if len(families) > 1:
        raise BadInputError(
            "inputs of different families cannot be read together: "
            + ", ".join(sorted(families))
        )
    formats = list(dict.fromkeys(r.format for r in results))
    try:
        table = pa.concat_tables([r.table for r in results], promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise BadInputError(f"inputs have columns that do not match ({exc})") from exc
    stats: dict = {"files": [r.stats for r in results]}
    labels: dict = {}
    for r in results:
        for key, count in r.stats.get("labels", {}).items():
            labels[key] = labels.get(key, 0) + count
    stats["labels"] = labels
    stats["labeled"] = any(r.stats.get("labeled") for r in results)
    label_text = None
    if any(r.label_text is not None for r in results):
        chunks = []
        for r in results:
            text = r.label_text
            if text is None:
                text = pa.nulls(len(r.table), type=pa.string())
            chunks += text.chunks if isinstance(text, pa.ChunkedArray) else [text]
        label_text = pa.chunked_array(chunks, type=pa.string())
    return ReadResult(
        table,
        "+".join(formats),
        families.pop(),
        skipped=sum(r.skipped for r in results),
        warnings=[w for r in results for w in r.warnings],
        partial=any(r.partial for r in results),
        stats=stats,
        damage=[d for r in results for d in r.damage],
        label_text=label_text,
    )


def _drop_unlabeled(
    result: ReadResult,
    where: str,
    strict: bool = True,
    parts: list[ReadResult] | None = None,
) -> ReadResult:
    """Keep the rows with a 0/1 label; refuse when the input has no labels at all.

    ``parts`` are the results of each input that ``result`` combines, in order:
    their own stats (``stats["files"]``) then count the rows each kept too. What
    each reader counts per row (``masked_ts``, ``non_ip``, ``dir``...) and the
    warnings that say so are counted again over the rows kept.
    """
    from flows.readers._convert import value_counts

    table = result.table
    if "label" not in table.column_names or (
        strict and not result.stats.get("labeled", True)
    ):
        raise BadInputError(
            "drop_unlabeled was asked for, but the input has no label column "
            "(every row would be dropped)",
            path=where,
        )
    keep = pc.is_valid(table.column("label"))
    dropped = len(table) - (pc.sum(keep).as_py() or 0)
    _recount_tallies(parts or [result], keep, result)
    result.table = table.filter(keep)
    result.stats["dropped_unlabeled"] = dropped
    import numpy as np

    kept = np.asarray(keep.to_numpy(zero_copy_only=False), dtype=bool)
    if result.row_lines is not None and len(result.row_lines) == len(kept):
        result.row_lines = result.row_lines[kept]
    if result.non_ip is not None and len(result.non_ip) == len(kept):
        result.non_ip = result.non_ip[kept]
    if result.label_text is not None:
        # The label counts describe the rows kept: not the ones dropped here.
        result.label_text = result.label_text.filter(keep)
        result.stats["labels"] = value_counts(result.label_text)
    if parts and len(parts) > 1:
        _recount_parts(parts, keep)
    return result


def _recount_tallies(parts: list[ReadResult], keep, combined: ReadResult) -> None:
    """Count each input's per-row stats again over the rows of it ``keep`` marks
    (one entry per row of the inputs' tables, in order, before the drop), and put
    the warnings of the new count where those of the old one were, in
    ``combined`` too."""
    import numpy as np

    mask = np.asarray(keep.to_numpy(zero_copy_only=False), dtype=bool)
    start = 0
    at = 0  # where the next input's warnings may start in combined.warnings
    for part in parts:
        n = len(part.table)
        mine = mask[start : start + n]
        start += n
        if part.recount is None:
            continue
        stats, new, old = part.recount(mine)
        part.stats.update(stats)
        _swap_notes(part.warnings, old, new)
        if combined.warnings is not part.warnings:
            at = _swap_notes(combined.warnings, old, new, at)


def _swap_notes(
    warnings: list[str], old: list[str], new: list[str], at: int = 0
) -> int:
    """Put ``new`` in place of the run of ``old`` in ``warnings`` (found from ``at``
    on); return where the search for the next run may start."""
    if not old:  # new is empty too: over fewer rows no count grows
        warnings.extend(new)
        return at
    for i in range(at, len(warnings) - len(old) + 1):
        if warnings[i : i + len(old)] == old:
            warnings[i : i + len(old)] = new
            return i + len(new)
    return at


def _recount_parts(parts: list[ReadResult], keep) -> None:
    """Count each input's labels, in its own stats, over the rows of it ``keep``
    (one entry per row of the inputs' tables, in order) marks as kept."""
    import numpy as np

    from flows.readers._convert import value_counts

    mask = np.asarray(keep.to_numpy(zero_copy_only=False), dtype=bool)
    start = 0
    for part in parts:
        n = len(part.table)
        mine = mask[start : start + n]
        start += n
        part.stats["dropped_unlabeled"] = int(n - mine.sum())
        if part.label_text is not None:
            part.stats["labels"] = value_counts(part.label_text.filter(pa.array(mine)))


def iter_records(
    path: str | Path,
    on_error: str = "fail",
    drop_unlabeled: bool = False,
    timezone: str = "UTC",
    damage: list | None = None,
    on_skip: Callable[[BadInputError], None] | None = None,
    on_unknown_label: Callable[[str, int], None] | None = None,
    place: Any = None,
    on_non_ip: Callable[[int | None], None] | None = None,
) -> Iterator[dict]:
    """Yield the canonical records of a conn-family file one by one, as dicts;
    ``damage`` (a list) receives what was found damaged, by kind; ``on_skip`` is
    called with the error of each Zeek line ``on_error`` "skip" passes over;
    ``on_unknown_label`` keeps a Zeek line whose label no table names, unlabeled
    (see :func:`flows.readers.stream.iter_records`); ``place`` (a
    :class:`flows.readers.stream.Place`) is kept at the line of the record yielded
    last; ``on_non_ip`` takes records of no IP flow out, called with their line."""
    from flows.readers.stream import iter_records as _iter

    yield from _iter(
        path, on_error=on_error, drop_unlabeled=drop_unlabeled, timezone=timezone,
        damage=damage, on_skip=on_skip, on_unknown_label=on_unknown_label,
        place=place, on_non_ip=on_non_ip,
    )


def write_conn_log(
    table: pa.Table, path: str | Path, *, name: str | Path | None = None
) -> None:
    """Write canonical records as a Zeek-style TSV conn.log (see ``writers``);
    messages name ``name`` when given (the final output of a temporary file)."""
    from flows.readers.writers import write_conn_log as _write

    _write(table, path, name=name)


def write_parquet(
    table: pa.Table,
    path: str | Path,
    family: str = "conn",
    *,
    name: str | Path | None = None,
) -> None:
    """Write a table as Parquet, recording its feature family in the file metadata;
    messages name ``name`` when given (the final output of a temporary file)."""
    from flows.readers.writers import write_parquet as _write

    _write(table, path, family=family, name=name)
