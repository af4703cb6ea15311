"""Where the agent's flows come from: files, a live interface, a growing log, stdin.

A source spec is one string: ``pcap:FILE`` (through the flow meter), ``iface:NAME``
(live capture), ``zeek:PATH`` (a conn.log, TSV or JSON; with ``follow`` it tails the
file and survives rotation), ``parquet:FILE`` (canonical records) or ``-`` (JSON
lines on stdin, one canonical record per line). :func:`open_source` returns a
:class:`Source` whose iterator yields canonical records as dicts.

Malformed stdin lines, and records with a value that does not fit its field (a
dict, an integer past int64, text in a number field), are rejected, counted in
``Source.rejected`` and logged once; the source goes on. Every record has every
canonical field (missing ones null).
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent import logger
from flows.errors import BadInputError, UsageError
from flows.record import CONN_FIELD_KINDS, CONN_FIELD_NAMES, value_problem

KINDS = ("pcap", "iface", "zeek", "parquet", "stdin")


@dataclass
class Source:
    """An iterable of canonical records plus what it had to reject on the way.

    ``finite`` is true for a file read once (the agent drains and exits at its end),
    false for a live interface, a followed log or stdin.
    """

    kind: str
    target: str
    finite: bool
    _factory: Callable[[Source], Iterator[dict]]
    rejected: dict[str, int] = field(default_factory=dict)

    def __iter__(self) -> Iterator[dict]:
        return self._factory(self)

    def reject(self, kind: str, message: str) -> None:
        """Count one rejected input item; log the first of each kind."""
        n = self.rejected.get(kind, 0) + 1
        self.rejected[kind] = n
        if n == 1:
            logger.warning(
                "source %s: rejected input (%s: %s); further ones only counted",
                self.target,
                kind,
                message,
            )


def canonical(record: dict[str, Any]) -> dict[str, Any]:
    """The record with exactly the canonical fields, missing ones null."""
    return {name: record.get(name) for name in CONN_FIELD_NAMES}


def parse_spec(spec: str) -> tuple[str, str]:
    """Split a source spec into ``(kind, target)``; UsageError when unknown."""
    if spec == "-":
        return "stdin", "-"
    kind, sep, target = spec.partition(":")
    if not sep or kind not in KINDS or not target:
        raise UsageError(
            f"source {spec!r}: expected pcap:FILE, iface:NAME, zeek:PATH, "
            "parquet:FILE or - (JSON lines on stdin)"
        )
    return kind, target


def open_source(
    spec: str,
    *,
    follow: bool = False,
    poll: float = 0.25,
    stdin: io.TextIOBase | None = None,
) -> Source:
    """Build the source a spec names (files are checked now, read lazily)."""
    kind, target = parse_spec(spec)
    if follow and kind != "zeek":
        raise UsageError("--follow applies to zeek:PATH sources only")
    if (
        kind in ("pcap", "zeek", "parquet")
        and not follow
        and not Path(target).is_file()
    ):
        raise BadInputError("no such file", path=target)
    if kind == "pcap":
        return Source(kind, target, True, lambda s: _pcap(s))
    if kind == "iface":
        return Source(kind, target, False, lambda s: _iface(s))
    if kind == "parquet":
        return Source(kind, target, True, lambda s: _parquet(s))
    if kind == "zeek" and follow:
        return Source(kind, target, False, lambda s: _follow(s, poll))
    if kind == "zeek":
        return Source(kind, target, True, lambda s: _zeek(s.target))
    stream = stdin if stdin is not None else sys.stdin
    return Source(kind, target, False, lambda s: _json_lines(s, stream))


def _pcap(src: Source) -> Iterator[dict]:
    """Flows of a capture file, through the packet flow meter."""
    from flows.meter import iter_flows

    for rec in iter_flows(src.target):
        yield canonical(rec)


def _iface(src: Source) -> Iterator[dict]:
    """Flows of a live interface as connections end (libpcap, needs privilege).

    A missing binding or privilege is a UsageError whose message says how to get it.
    """
    from flows.meter import iter_flows

    for rec in iter_flows(f"iface:{src.target}"):
        yield canonical(rec)


def iter_conn(path: str | Path, on_error: str = "fail") -> Iterator[dict]:
    """Canonical records of a Zeek conn.log, streamed by ``flows.readers``."""
    from flows.readers import iter_records

    for rec in iter_records(path, on_error=on_error):
        yield canonical(rec)


def _zeek(path: str) -> Iterator[dict]:
    yield from iter_conn(path)


def _parquet(src: Source) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(src.target)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types
        raise BadInputError(
            f"not a readable Parquet file ({exc})", path=src.target
        ) from exc
    missing = [n for n in ("src_ip", "dst_ip") if n not in pf.schema_arrow.names]
    if missing:
        raise BadInputError(
            f"Parquet file lacks canonical columns {missing}", path=src.target
        )
    for batch in pf.iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            yield canonical(rec)


def _json_lines(src: Source, stream) -> Iterator[dict]:
    for line in stream:
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except (RecursionError, ValueError) as exc:
            # RecursionError: a nesting bomb ("[" * 100000) must cost only its line.
            src.reject("malformed_json", f"{type(exc).__name__}: {exc}"[:200])
            continue
        if not isinstance(rec, dict) or "src_ip" not in rec:
            src.reject("not_a_record", "line is not a JSON object with src_ip")
            continue
        rec = canonical(rec)
        problem = _record_problem(rec)
        if problem is not None:
            src.reject("bad_value", problem)
            continue
        yield rec


def _record_problem(rec: dict[str, Any]) -> str | None:
    """Why a canonical record from stdin cannot be scored and sent, or None.

    Each field must fit its kind (numbers finite and in range, strings for text
    fields, null anywhere): the same check the re-scorer applies to escalations.
    """
    for name, value in rec.items():
        problem = value_problem(CONN_FIELD_KINDS[name], value)
        if problem is not None:
            return f"field {name!r}: {problem}"
    return None


# ---------------------------------------------------------------------------------
# following a growing conn.log


def _follow(src: Source, poll: float) -> Iterator[dict]:
    """Tail ``src.target``: new complete lines as they come, across rotations.

    Rotation is noticed when the path names a new file (another inode) or the file
    shrank; the old file is read to its end first, then the new one from its start.
    Lines are parsed one by one by ``flows.readers.stream`` (the same rules as a
    whole-file read); a line it cannot parse is rejected, counted and skipped.
    """
    from flows.readers.stream import TsvLineParser

    path = Path(src.target)
    handle, inode, parser = None, None, None
    partial, line_no = "", 0
    while True:
        if handle is None:
            try:
                handle = open(path, encoding="utf-8", errors="replace", newline="")
                inode = os.fstat(handle.fileno()).st_ino
                parser, partial, line_no = TsvLineParser(str(path)), "", 0
            except FileNotFoundError:
                time.sleep(poll)
                continue
        chunk = handle.read()
        if chunk:
            lines = (partial + chunk).split("\n")
            partial = lines.pop()
            for line in lines:
                line_no += 1
                rec = _parse_line(src, parser, line.rstrip("\r"), line_no)
                if rec is not None:
                    yield rec
            continue
        if _rotated(path, inode, handle):
            handle.close()
            handle = None
            continue
        time.sleep(poll)


def _rotated(path: Path, inode: int | None, handle) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    return st.st_ino != inode or st.st_size < handle.tell()


def _parse_line(src: Source, parser, line: str, line_no: int) -> dict | None:
    """One followed line: a header line, a TSV or JSON record, or a rejection."""
    from flows.readers.stream import parse_json_line

    if not line.strip():
        return None
    try:
        if line.startswith("#"):
            parser.header_line(line, line_no)
            return None
        if line.lstrip().startswith("{"):
            return canonical(parse_json_line(line, src.target, line_no))
        return canonical(parser.parse(line, line_no))
    except BadInputError as exc:
        src.reject("bad_line", str(exc))
        return None
