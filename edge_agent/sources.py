"""Where the agent's flows come from: files, a live interface, a growing log, stdin.

A source spec is one string: ``pcap:FILE`` (through the flow meter), ``iface:NAME``
(live capture), ``zeek:PATH`` (a conn.log, TSV or JSON; with ``follow`` it tails the
file and survives rotation), ``parquet:FILE`` (canonical records) or ``-`` (JSON
lines on stdin, one record per line: canonical field names, or Zeek's JSON names
as ``LogAscii::use_json=T`` writes them, ``id.orig_h``...; one naming in a
record: one naming its endpoints both ways, ``src_ip`` with ``id.resp_h``, is a
``not_a_record`` naming the key; a UTF-8 byte-order mark before the first line is
read past, as ``flows`` reads one). :func:`open_source` returns a :class:`Source`
whose iterator yields canonical records as dicts.

A stdin record's text ``label`` is read as the Zeek readers read it
(``Malicious``/``Benign``/``Background``/``Unknown``, any case). Labels are not
used for scoring, so on stdin a label none of those name costs the flow nothing:
it is taken as no label (its text kept in ``label_detail``), counted in
``Source.unknown_labels`` and noted once with its value and line. A ``zeek:``
log, read once or followed, and a stdin object with Zeek's JSON names keep such
a flow the same way. A ``proto`` given
as a number (``"proto": 6`` on stdin, an integer column in Parquet) is protocol
number 6, held as the text ``"6"`` as ``flows`` reads it (``flows.record.proto_text``);
like a protocol name, it must then pass the record check (a number 0..255).

Malformed stdin lines, lines over ``MAX_LINE_BYTES``, and records with a value
that does not fit its field (a dict, an integer past int64, text in a number
field, an address that is no IP address, a port outside 0..65535, a ``ts`` before
1970 or from the year 10000 on, as ``flows`` refuses it) are rejected,
counted in ``Source.rejected`` (with the line of the first in ``first_rejected``)
and logged once; the source goes on. A line holding bytes that are not UTF-8 is a
``bad_line`` (``bytes that are not UTF-8``) in every text source (stdin, a
``zeek:`` file read once or followed), by its line, as ``flows`` refuses it: never
read with U+FFFD in a field. A ``zeek:`` source (read once or followed)
applies the same record check to what the readers give, so a flow with no address
(``-`` in a Zeek TSV log) is rejected the same way (by its file line; by its row
number in a file without lines), not escalated for the re-scorer to refuse. An
Argus record of no IP flow (a ``man`` management record, a layer-2 flow: what
``flows inspect`` counts as ``non_ip``) is no damage: it is skipped and counted
in ``Source.non_ip``. A ``parquet:`` file whose number field is a column of
another type (``ts`` as text, even of digits) is refused by that column before
any row, as ``flows`` refuses it; otherwise it stops at its first bad row, as a
``zeek:`` file read once stops at a row its reader refuses (a ``ts`` out of range):
the rows before it are scored, the row is named, and the run exits 4 (3 when it was
the first). Every record has every canonical field (missing ones null).

Damage a file source reads past or stops at (a capture's damaged packets, a cut
capture, gzip stream or last line) is kept by kind in ``Source.damage``, so the
agent's last line says whether the read went on past it or stopped there.
"""

from __future__ import annotations

import io
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent import logger
from edge_agent.protocol import ENDPOINTS
from flows.errors import (
    BadInputError,
    GatewatchError,
    UsageError,
    json_problem,
    one_line,
)
from flows.readers._source import MAX_LINE_BYTES, NOT_UTF8, not_utf8_text, too_long
from flows.readers.result import Damage, damaged_packets
from flows.record import CONN_FIELD_NAMES, field_problem, proto_text, time_problem

KINDS = ("pcap", "iface", "zeek", "parquet", "stdin")


@dataclass
class Source:
    """An iterable of canonical records plus what it had to reject on the way.

    ``finite`` is true for a file read once (the agent drains and exits at its end),
    false for a live interface, a followed log or stdin. With ``capture_errors``
    (set by a caller that iterates in a worker thread) an error that ends the
    iteration is kept in ``error`` instead of raised, for the caller to report
    (and the records yielded before it are not lost in a half-filled batch).
    Setting ``end`` asks a followed log to stop once it has yielded what the
    file holds now (Ctrl-C: what was read is still scored). ``lines`` counts the
    lines stdin held (blank ones included), so that an empty stdin (a restart
    that only replays its outbox) is told apart from one with no usable record.
    ``damage`` holds the damage a file read noted without raising, by kind
    (:class:`~flows.readers.result.Damage`): damaged packets of a capture that
    the read went on past (``stopped`` false), then a capture, gzip stream or
    last line cut short where it stopped (``stopped`` true). The caller reports
    it as partial input (exit 4), or bad input when no flow was read (3), in the
    words of :func:`damage_sentence`.
    """

    kind: str
    target: str
    finite: bool
    _factory: Callable[[Source], Iterator[dict]]
    rejected: dict[str, int] = field(default_factory=dict)
    first_rejected: str | None = None
    lines: int = 0
    damage: list[Damage] = field(default_factory=list)
    capture_errors: bool = False
    error: GatewatchError | None = None
    end: threading.Event = field(default_factory=threading.Event)
    unknown_labels: int = 0  # flows kept with a label no table names, as unlabeled
    # Records of no IP flow (Argus ``man`` management records, layer-2 flows)
    # skipped as no damage: there is no address to score or escalate.
    non_ip: int = 0
    # A capture's flow meter (pcap:, iface:), kept up to date as it reads:
    # ``evicted``, connections ended early because the table held max_flows, and
    # ``dropped``, packets libpcap or the interface dropped (iface: only).
    meter_counts: dict[str, int] = field(default_factory=dict)

    @property
    def finishing(self) -> bool:
        """True once ``end`` is set on a source that then yields what it still
        holds and stops by itself: a live interface, whose connections still open
        are ended and yielded (a stop must read them, not cut them off)."""
        return self.kind == "iface" and self.end.is_set()

    def __iter__(self) -> Iterator[dict]:
        try:
            yield from self._factory(self)
        except (GatewatchError, OSError) as exc:
            if isinstance(exc, OSError):
                exc = BadInputError(
                    f"cannot be read ({exc.strerror or exc})", path=self.target
                )
            self.error = exc
            if not self.capture_errors:
                raise exc from None
        except Exception as exc:
            if not self.capture_errors:
                raise
            # In a worker thread an unexpected error would print a traceback and
            # end the source silently: report it instead (the trace at debug level).
            logger.debug("source %s failed", self.target, exc_info=True)
            self.error = GatewatchError(
                f"source {self.target} failed: {type(exc).__name__}: {exc}"
            )

    def unknown_label(self, text: str, line: int | None = None) -> None:
        """Count a flow kept, as unlabeled, whose label no table names; note the
        first with its value and line."""
        self.unknown_labels += 1
        if self.unknown_labels == 1:
            where = f"line {line}: " if line is not None else ""
            logger.warning(
                "source %s: %sunknown label %r taken as no label (expected "
                "Malicious, Benign, Background or Unknown); the flow is scored, as "
                "labels are not used for scoring; further ones only counted",
                self.target,
                where,
                text[:40],
            )

    def skip_non_ip(self, line: int | None = None) -> None:
        """Count one record of no IP flow (an Argus ``man`` management record, a
        layer-2 flow) skipped: no damage, so not rejected; the first is noted at
        INFO level with its line."""
        self.non_ip += 1
        if self.non_ip == 1:
            where = f"line {line}: " if line is not None else ""
            logger.info(
                "source %s: %sa record of no IP flow (an Argus management record or "
                "layer-2 flow) skipped, as no flow to score; further ones counted "
                "as non_ip",
                self.target,
                where,
            )

    def reject(
        self,
        kind: str,
        message: str,
        line: int | None = None,
        *,
        record: int | None = None,
    ) -> None:
        """Count one rejected input item, by ``line`` or else by ``record`` number
        when given; log the first of each kind."""
        n = self.rejected.get(kind, 0) + 1
        self.rejected[kind] = n
        where = (
            f"line {line}: "
            if line is not None
            else f"record {record}: " if record is not None else ""
        )
        if self.first_rejected is None:
            self.first_rejected = f"{where}{kind}: {message}"
        if n == 1:
            logger.warning(
                "source %s: %srejected input (%s: %s); further ones only counted",
                self.target,
                where,
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
    timezone: str = "UTC",
    max_flows: int = 1_000_000,
    bpf: str | None = None,
    wait_interface: float = 0.0,
) -> Source:
    """Build the source a spec names (files are checked now, read lazily).

    ``timezone`` (an IANA name, checked by the caller) is the zone of flow-file
    times written without one, as ``flows`` reads them: an Argus binetflow
    StartTime (a ``zeek:`` file read once may be any conn-family file) and a
    Parquet ``ts`` held as a timestamp without a zone. The other sources carry
    epoch times. ``max_flows``: the open connections a capture (``pcap:``,
    ``iface:``) tracks at once (:class:`flows.meter.FlowMeter`); ``bpf``: the
    libpcap filter of an ``iface:`` capture (the packets it takes);
    ``wait_interface``: the seconds an ``iface:`` capture waits for an interface
    that is not there or not up yet when it starts (0: not at all).
    """
    kind, target = parse_spec(spec)
    if follow and kind != "zeek":
        raise UsageError("--follow applies to zeek:PATH sources only")
    if wait_interface and kind != "iface":
        raise UsageError("--wait-interface applies to iface:NAME sources only")
    if kind in _EXPECTED:
        _check_file(kind, Path(target), follow)
    if kind == "pcap":
        return Source(kind, target, True, lambda s: _pcap(s, max_flows))
    if kind == "iface":
        return Source(kind, target, False,
                      lambda s: _iface(s, max_flows, bpf, wait_interface))
    if kind == "parquet":
        return Source(kind, target, True, lambda s: _parquet(s, timezone))
    if kind == "zeek" and follow:
        return Source(kind, target, False, lambda s: _follow(s, poll))
    if kind == "zeek":
        return Source(kind, target, True, lambda s: _zeek(s, timezone))
    stream = stdin if stdin is not None else _text_stdin()
    return Source(kind, target, False, lambda s: _json_lines(s, stream))


def _text_stdin():
    """Standard input as UTF-8 text whose bytes that are not UTF-8 are kept as
    ``surrogateescape`` gives them, so that their line is rejected as a bad line
    (:data:`~flows.readers._source.NOT_UTF8`, as ``flows`` refuses it), never read
    with U+FFFD in a field, and never a UnicodeDecodeError that ends the source.

    The descriptor is read through an unbuffered file object of its own, not
    ``sys.stdin.buffer``: the agent reads stdin in a daemon thread, and one waiting
    inside the buffered object's read holds its lock, which Python's shutdown then
    needs to close ``sys.stdin`` ("Fatal Python error: _enter_buffered_busy", exit
    134 instead of the run's own code after a signal ended it with the pipe open).
    """
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:
        return sys.stdin  # replaced by a text stream (tests, embedding)
    try:
        raw = io.FileIO(sys.stdin.fileno(), "r", closefd=False)
    except (OSError, ValueError, io.UnsupportedOperation):
        raw = buffer  # no descriptor (an embedding's stream): read it as it is
    return io.TextIOWrapper(
        raw, encoding="utf-8", errors="surrogateescape", newline=None
    )


_EXPECTED = {
    "pcap": "a pcap or pcapng capture file",
    "zeek": "a Zeek conn.log file (TSV or JSON, plain or gzip)",
    "parquet": "a Parquet file of canonical flow records",
}


def _check_file(kind: str, path: Path, follow: bool) -> None:
    """Refuse a folder, a missing file (unless followed) or a non-file, by name."""
    expected = _EXPECTED[kind]
    try:
        if path.is_dir():
            hint = ""
            if kind == "zeek" and (path / "conn.log").is_file():
                hint = f" (did you mean zeek:{path / 'conn.log'}?)"
            raise BadInputError(
                f"is a directory; {kind}: expects {expected}{hint}", path=str(path)
            )
        if path.is_file() or (follow and not path.exists()):
            return
        what = "is not a regular file" if path.exists() else "no such file"
    except OSError as exc:
        what = f"cannot be read ({exc.strerror or exc})"
    raise BadInputError(f"{what}; {kind}: expects {expected}", path=str(path))


def _pcap(src: Source, max_flows: int = 1_000_000) -> Iterator[dict]:
    """Flows of a capture file through the packet flow meter, as connections end.

    The damage the meter found (and logged) is kept by kind in ``src.damage``
    (damaged packets the read went on past, a cut where it stopped); bytes that are no
    record at all end the read with a PartialInputError after the flows before
    them, and a file that is no capture from its first bytes on is a
    BadInputError, as :func:`flows.meter.iter_flows` raises them.
    """
    from flows.meter import iter_flows

    found: list[Damage] = []
    try:
        for rec in iter_flows(src.target, damage=found, max_flows=max_flows,
                              counts=src.meter_counts):
            yield canonical(rec)
    finally:
        src.damage = found


def damage_sentence(damage: list[Damage]) -> str:
    """What a file read found damaged, in order, as one clause for an error line:
    ``1 damaged packet skipped at byte offset 416: ...`` for packets the read went
    on past, ``damaged part way at byte offset 1814: ...`` where it stopped."""
    parts = []
    for found in damage:
        at = f" at {found.place}" if found.place else ""
        if found.stopped:
            parts.append(f"damaged part way{at}: {found.what}")
            continue
        first = at if found.records == 1 else f", the first{at}"
        parts.append(f"{damaged_packets(found)}{first}: {found.what}")
    return "; then ".join(parts)


def no_flow_hint(kind: str, damage: list[Damage]) -> str:
    """The end of the line saying that a file source gave no usable flow because
    of the ``damage`` it found (after :func:`damage_sentence`): what to fix.

    A capture whose read went on past every damaged packet (no stop) is a capture
    all right, so it is not told what a capture file is: it is told that its
    packets made no flow, and why (a link type the flow meter does not read, or
    every packet damaged). Otherwise what the source expects (``a pcap or pcapng
    capture file``...).
    """
    expected = f"expected {_EXPECTED.get(kind, 'flow records')}"
    if kind != "pcap" or not damage or any(found.stopped for found in damage):
        return expected
    links = [
        found.what.removeprefix("unknown link type ")
        for found in damage
        if found.what.startswith("unknown link type ")
    ]
    if links and len(links) == len(damage):
        from flows.meter.decode import LINK_NAMES

        known = ", ".join(sorted({f"{n} ({name})" for n, name in LINK_NAMES.items()},
                                 key=lambda text: int(text.split()[0])))
        shown = ", ".join(dict.fromkeys(links))
        return (
            f"the file is a capture, but its link type {shown} is not one the flow "
            f"meter reads (it reads {known})"
        )
    return (
        "the file is a capture, but every packet of it that could make a flow was "
        "damaged (cut short or malformed), so no flow could be metered"
    )


def _iface(src: Source, max_flows: int = 1_000_000,
           bpf: str | None = None, wait: float = 0.0) -> Iterator[dict]:
    """Flows of a live interface as connections end (libpcap, needs privilege).

    A missing binding or privilege is a UsageError whose message says how to get it.
    With ``wait`` an interface not there or not up yet is waited for that long
    (logged once); a stop meanwhile ends the source with no flow, and one still
    missing then is refused as without a wait (bad input), naming the wait.
    """
    from flows.meter import iter_flows
    from flows.meter.live import open_live, wait_for_interface

    if wait > 0 and not wait_for_interface(src.target, wait, end=src.end):
        if src.end.is_set():
            return  # stopped while it waited: nothing was read

        try:
            open_live(src.target, bpf=bpf).close()  # there at the last moment?
        except BadInputError as exc:
            raise BadInputError(
                f"{exc}; waited {wait:g} s for it (--wait-interface)"
            ) from exc

    # Setting ``end`` (a stop) ends the capture; its open connections come last.
    for rec in iter_flows(f"iface:{src.target}", end=src.end, max_flows=max_flows,
                          bpf=bpf, counts=src.meter_counts):
        yield canonical(rec)


def iter_conn(
    path: str | Path,
    on_error: str = "fail",
    damage: list | None = None,
    timezone: str = "UTC",
    on_skip: Any = None,
    on_unknown_label: Any = None,
    place: Any = None,
    on_non_ip: Any = None,
) -> Iterator[dict]:
    """Canonical records of a Zeek conn.log, streamed by ``flows.readers``; the
    damage it read past or stopped at goes to ``damage`` (see ``iter_records``).
    ``timezone``: the zone of times written without one (:func:`open_source`);
    ``on_skip``: called with each bad Zeek line skipped (``on_error`` "skip");
    ``on_unknown_label``: called for each Zeek line kept unlabeled because no
    table names its label (by default such a line is bad); ``place`` and
    ``on_non_ip`` as :func:`flows.readers.stream.iter_records` takes them."""
    from flows.readers import iter_records

    for rec in iter_records(path, on_error=on_error, damage=damage,
                            timezone=timezone, on_skip=on_skip,
                            on_unknown_label=on_unknown_label, place=place,
                            on_non_ip=on_non_ip):
        yield canonical(rec)


def _zeek(src: Source, timezone: str = "UTC") -> Iterator[dict]:
    """A conn.log read once; a record the stdin check refuses (no address: ``-``
    in a Zeek TSV log) is rejected, counted by its file line (by its row number
    in a file without lines) and skipped. A record of no IP flow (an Argus
    ``man`` management record, a layer-2 flow: ``non_ip`` of ``flows inspect``)
    is no damage: it is skipped and counted in ``Source.non_ip``. A Zeek line the
    reader refuses (a port over 65535, a cut value, bytes that are not UTF-8) is
    rejected by its line and skipped, as with --follow, so that the flows after
    it are still scored; other conn-family files stop at their first bad row (a
    binetflow file is read a few thousand lines at a time, so the flows before
    that row are yielded and scored first; a capture or Parquet file named here is
    read whole)."""
    from flows.readers.stream import Place, stream_format

    found: list[Damage] = []
    place = Place()
    zeek = stream_format(src.target) in ("zeek-tsv", "zeek-json")

    def skipped(exc: BadInputError) -> None:
        src.reject("bad_line", _line_problem(exc), exc.line)

    # A Zeek line whose label no table names is kept unlabeled, as on stdin.
    records = iter_conn(src.target, on_error="skip" if zeek else "fail",
                        damage=found, timezone=timezone,
                        on_skip=skipped if zeek else None,
                        on_unknown_label=src.unknown_label if zeek else None,
                        place=place, on_non_ip=src.skip_non_ip)
    try:
        for number, rec in enumerate(records, start=1):
            problem = _record_problem(rec)
            if problem is None:
                yield rec
            elif place.number is not None and place.unit == "line":
                src.reject("bad_value", problem, place.number)
            else:  # a file without lines (Parquet): its row number
                src.reject("bad_value", problem, record=place.number or number)
    finally:
        src.damage = found


def _parquet(src: Source, timezone: str = "UTC") -> Iterator[dict]:
    """Canonical records of a Parquet file, row group by row group; a ``ts`` held
    as a timestamp becomes epoch seconds as ``flows`` reads it (``timezone``: the
    zone of one without a zone). A number field whose column is not of a number
    type (text, even of digits) refuses the file by its column before any row, as
    ``flows`` refuses it (:func:`flows.readers.parquet.number_column_problem`)."""
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
    from flows.readers.parquet import number_column_problem

    wrong = number_column_problem(pf.schema_arrow)
    if wrong is not None:  # refused by its type before any row, as flows refuses it
        raise BadInputError(wrong[1], path=src.target, column=wrong[0])
    # Row group by row group, so that damage is named by its group (as flows
    # names it) and every record of the groups before it is scored first.
    row = 0
    for group in range(pf.num_row_groups):
        for records in _parquet_group(pf, group, src.target, timezone):
            for rec in records:
                row += 1
                rec = canonical(rec)
                rec["proto"] = proto_text(rec["proto"])  # an integer column: 6
                problem = _record_problem(rec)
                if problem is not None:
                    # As flows inspect and a zeek: file read once do for a row
                    # their reader refuses (a ts out of range): the first bad
                    # row ends the read (exit 4 once flows were read, else 3).
                    raise BadInputError(problem, path=src.target, row=row)
                yield rec


def _parquet_group(
    pf, group: int, path: str, timezone: str = "UTC"
) -> Iterator[list[dict]]:
    """The records of one row group of a Parquet file, a batch at a time; damage
    is a BadInputError naming the file and the group, counted from 1 as rows are
    (the batches before it were given)."""
    batches = None
    while True:
        try:
            if batches is None:
                batches = pf.iter_batches(batch_size=4096, row_groups=[group])
            records = _with_epoch_ts(next(batches), timezone).to_pylist()
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types
            raise BadInputError(
                f"row group {group + 1} of {pf.num_row_groups} cannot be read "
                f"({one_line(exc)})",
                path=path,
            ) from exc
        yield records


def _with_epoch_ts(batch, timezone: str):
    """``batch`` as ``flows`` reads it: a timestamp ``ts`` column turned into
    epoch seconds (:func:`flows.readers.parquet.epoch_seconds`), and a decimal
    column of a number field cast to the field's type, as ``flows`` casts every
    column (a decimal value would otherwise reach the record check as a
    ``Decimal`` and be refused, where ``flows`` reads the file)."""
    import pyarrow as pa

    from flows.record import conn_schema

    names = batch.schema.names
    if "ts" in names and pa.types.is_timestamp(batch.schema.field("ts").type):
        from flows.readers.parquet import epoch_seconds

        where = names.index("ts")
        batch = batch.set_column(
            where, "ts", epoch_seconds(batch.column(where), timezone)
        )
    for wanted in conn_schema():
        name = wanted.name
        if name in names and pa.types.is_decimal(batch.schema.field(name).type):
            where = names.index(name)
            batch = batch.set_column(where, name, batch.column(where).cast(wanted.type))
    return batch


def _bounded_lines(stream) -> Iterator[str | int]:
    """The lines of a text stream; a line over ``MAX_LINE_BYTES`` is not held.

    An over-long line is read in bounded pieces and yields its length (an int)
    in its place, so a stdin without newlines cannot fill the memory.
    """
    while True:
        line = stream.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        if len(line) <= MAX_LINE_BYTES or line.endswith("\n"):
            yield line
            continue
        length = len(line)
        while line and not line.endswith("\n"):
            line = stream.readline(MAX_LINE_BYTES)
            length += len(line)
        yield length


def _json_lines(src: Source, stream) -> Iterator[dict]:
    from flows.readers.stream import check_one_naming

    for line_no, line in enumerate(_bounded_lines(stream), start=1):
        src.lines = line_no
        if isinstance(line, int):
            src.reject("line_too_long", too_long(line), line_no)
            continue
        if line_no == 1:
            line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark, as flows
        line = line.strip()
        if not line:
            continue

        if not_utf8_text(line):
            src.reject("bad_line", NOT_UTF8, line_no)  # as flows and zeek: refuse it
            continue

        try:
            rec = json.loads(line)
        except (RecursionError, ValueError) as exc:
            # RecursionError: a nesting bomb ("[" * 100000) must cost only its line;
            # worded as the zeek: JSON reader words it.
            what = f"expected one JSON object ({json_problem(exc)})"
            src.reject("malformed_json", what[:200], line_no)
            continue
        if isinstance(rec, dict):
            try:
                check_one_naming(rec, "-", line_no)  # not src_ip with id.resp_h
            except BadInputError as exc:
                src.reject("not_a_record", _line_problem(exc), line_no)
                continue
        if isinstance(rec, dict) and "src_ip" not in rec and _zeek_shaped(rec):
            try:
                rec = zeek_json_record(rec, "-", line_no, src.unknown_label)
            except BadInputError as exc:
                src.reject("bad_value", _line_problem(exc), line_no)
                continue
        if not isinstance(rec, dict) or "src_ip" not in rec:
            src.reject("not_a_record", STDIN_EXPECTED, line_no)
            continue
        rec = canonical(rec)
        rec["proto"] = proto_text(rec["proto"])  # "proto": 6, as Zeek's JSON gives
        unknown = _text_label(rec)
        problem = _record_problem(rec)
        if problem is not None:
            src.reject("bad_value", problem, line_no)
            continue
        if unknown is not None:
            src.unknown_label(unknown, line_no)
        yield rec


def _line_problem(exc: BadInputError) -> str:
    """What a reader's error says is wrong with one line, for a rejection counted
    by its line: the field it names (``field 'id.orig_p': ...``, as the record
    check says it) and what was expected there, without the file and line the
    rejection names already."""
    what = str(exc)[len(exc._where()) :]
    return what if exc.column is None else f"field {exc.column!r}: {what}"


STDIN_EXPECTED = (
    "expected one JSON object per line with the canonical fields (src_ip, dst_ip, "
    "src_port, dst_port, proto, ts, ...) or Zeek's JSON names (id.orig_h, "
    "id.resp_h, id.orig_p, id.resp_p, ...)"
)


def _zeek_shaped(rec: dict[str, Any]) -> bool:
    """Whether a JSON object names its endpoints as Zeek's conn.log JSON does."""
    return "id.orig_h" in rec or isinstance(rec.get("id"), dict)


def zeek_json_record(
    obj: dict, path: str, line_no: int, on_unknown_label: Any = None
) -> dict:
    """One Zeek JSON object -> canonical record, by the Zeek JSON reader's mapping
    (``on_unknown_label``: keep a label no table names as no label, see
    :func:`flows.readers.stream.zeek_json_record`)."""
    from flows.readers.stream import zeek_json_record as convert

    return convert(obj, path, line_no, on_unknown_label)


def _text_label(rec: dict[str, Any]) -> str | None:
    """Map a text ``label`` of a canonical stdin record as the Zeek readers do.

    ``Malicious``/``Benign`` (any case, spaces trimmed) become 1/0, ``Background``
    and ``Unknown`` null, a null spelling (``-``, ``(empty)``, empty) null, each
    by the Zeek JSON reader's tables; the text is kept in ``label_detail`` unless
    the record has one. A text none of these names is taken as no label, as
    labels are not used for scoring: it is returned (for the caller to count),
    else None.
    """
    text = rec.get("label")
    if not isinstance(text, str):
        return None  # a number (or null) is checked as one by _record_problem
    from flows.readers.labels import ZEEK_LABELS
    from flows.readers.zeek import _JSON_NULLS

    rec["label"] = None
    if text in _JSON_NULLS:
        return None
    mapped = ZEEK_LABELS.get(text.strip().lower(), "?")
    rec["label"] = None if mapped == "?" else mapped
    if rec.get("label_detail") is None:
        rec["label_detail"] = text
    return text if mapped == "?" else None


def artifact_problem(encoder: Any, kind: str | None) -> str | None:
    """Why an artifact's encoder cannot score records of a ``kind`` source (None:
    of any source, as a model update or a bundle must), or None when it can.

    Every source yields conn records (:func:`canonical` keeps the conn fields only),
    so an encoder that reads any other field (an NSL-KDD or UNSW artifact) would
    refuse every record.
    """
    missing = [name for name in encoder.input_fields if name not in CONN_FIELD_NAMES]
    if not missing:
        return None
    shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
    where = {"stdin": "stdin", None: "every source of the agent"}.get(
        kind, f"a {kind}: source")
    return (
        f"reads {encoder.family!r} flow records (fields {shown}), but {where} "
        "gives conn records (Zeek conn.log fields) only; use an artifact "
        "compressed from a conn-log teacher (e.g. the ctu-conn family); score "
        f"{encoder.family} files with compress eval --data FILE"
    )


def _record_problem(rec: dict[str, Any]) -> str | None:
    """Why a canonical record (stdin, Parquet, zeek:) cannot be scored and sent,
    or None.

    Each field must fit its kind (numbers finite and in range, strings for text
    fields, null anywhere): the same check the re-scorer applies to escalations;
    addresses must be IP addresses, ports 0..65535 and ``proto`` a protocol name
    or number 0..255 (``flows.record``). A ``ts`` must be a time ``flows`` reads
    (``flows.record.time_problem``: epoch seconds from 1970 to before the year
    10000), as the readers of a ``zeek:`` source check it: a Parquet ``ts`` of
    -1 s, or a timestamp of -2**63 us, is no flow's start time.
    """
    for name, value in rec.items():
        problem = field_problem(name, value)
        if problem is not None:
            return f"field {name!r}: {problem}"
    ts = rec.get("ts")
    if ts is not None and (problem := time_problem(ts)) is not None:
        return f"field 'ts': {problem}"
    for name in ENDPOINTS:  # what the re-scorer requires of an escalated flow
        if rec.get(name) is None:
            return f"field {name!r}: is null; a flow needs both endpoint addresses"
    return None


# ---------------------------------------------------------------------------------
# following a growing conn.log

# Polls a followed path may be missing before the warning that its file was
# removed: a rename rotation in two steps leaves it missing for a moment.
_GONE_GRACE_POLLS = 2

# How many of a followed file's first bytes are kept, to notice that the file was
# rewritten in place (same inode) when its size alone does not say so.
_HEAD_BYTES = 4096


def _follow(src: Source, poll: float) -> Iterator[dict]:
    """Tail ``src.target``: new complete lines as they come, across rotations.

    Rotation is noticed when the path names a new file (another inode); the old
    file is read to its end first, then the new one from its start with its own
    header. The same file truncated or rewritten in place (logrotate's
    ``copytruncate``, a tool writing it again) is read again from its start, as
    :func:`_changed_in_place` tells: until a ``#`` line comes, its rows keep the
    ``#fields`` layout read before (Zeek goes on writing rows, with no new header,
    to the file it holds open), and a new header replaces that layout.
    A path that is missing (not yet written, or removed and not yet recreated) is
    waited for, with one warning; a path that goes missing while its file is read
    is warned about only once it stays missing for :data:`_GONE_GRACE_POLLS`
    polls, as a rename rotation done in two steps (``mv conn.log conn.log.1``,
    then a new ``conn.log``) leaves it missing for a moment. Lines are parsed
    one by one by ``flows.readers.stream`` (the same rules as a whole-file read);
    a line it cannot parse, one over ``MAX_LINE_BYTES``, or a record
    :func:`_record_problem` refuses (no address) is rejected, counted and skipped.
    """
    from flows.readers.stream import TsvLineParser

    path = Path(src.target)
    handle, inode, parser = None, None, None
    partial, line_no, skipping = b"", 0, 0
    offset, head = 0, b""  # bytes read so far; the file's first bytes, as read
    # Read again in place ("truncated" or "rewritten"): the earlier #fields hold
    # until a # line comes.
    carried: str | None = None
    nuls = 0  # NUL bytes skipped at the start of a file read again in place
    waiting = vanished = False
    gone_since: float | None = None  # when the path was first seen missing
    while True:
        if handle is None:
            try:
                handle = open(path, "rb")
                inode = os.fstat(handle.fileno()).st_ino
                if os.pread(handle.fileno(), 2, 0) == b"\x1f\x8b":
                    handle.close()
                    raise BadInputError(
                        "is gzip-compressed: a compressed log cannot be followed "
                        "as it grows; follow the uncompressed log Zeek is writing "
                        "(current/conn.log), or read this one whole without --follow",
                        path=str(path),
                    )
                parser = TsvLineParser(str(path), src.unknown_label)
                partial, line_no, skipping, offset, head = b"", 0, 0, 0, b""
                carried, waiting, vanished, gone_since = None, False, False, None
            except FileNotFoundError:
                if src.end.is_set():
                    return
                if not waiting:
                    logger.warning("source %s: no such file yet; waiting for it", path)
                    waiting = True
                time.sleep(poll)
                continue
            except IsADirectoryError:
                raise BadInputError(
                    f"is a directory; zeek: expects {_EXPECTED['zeek']}", path=str(path)
                ) from None
        before, at_line_start = offset, not partial and not skipping
        chunk = handle.read(1 << 16)
        offset += len(chunk)
        change = _changed_in_place(handle.fileno(), head, before, offset, at_line_start)
        if change is not None:
            _say_read_again(path, change)
            handle.seek(0)
            partial, line_no, skipping, offset, head = b"", 0, 0, 0, b""
            carried = change
            continue
        if len(head) < _HEAD_BYTES and len(head) == before:
            head += chunk[: _HEAD_BYTES - len(head)]
        if carried and not partial and not skipping and chunk[:1] == b"\x00":
            # A writer that does not append goes on at its own offset after a
            # copytruncate: the file starts with a hole of NUL bytes. Skipped.
            rest = chunk.lstrip(b"\x00")
            nuls += len(chunk) - len(rest)
            chunk = rest
            if not chunk:
                continue
        if nuls and chunk:
            logger.warning(
                "source %s: skipped %d NUL bytes at the start of the file read "
                "again (its writer does not append, so a copytruncate left a "
                "hole where the old rows were)", path, nuls)
            nuls = 0
        if chunk:
            if skipping:
                end = chunk.find(b"\n")
                if end < 0:
                    skipping += len(chunk)
                    continue
                line_no += 1
                src.reject("line_too_long", too_long(skipping + end), line_no)
                skipping, chunk = 0, chunk[end + 1 :]
            lines = (partial + chunk).split(b"\n")
            partial = lines.pop()
            for raw in lines:
                line_no += 1
                if len(raw) > MAX_LINE_BYTES:
                    src.reject("line_too_long", too_long(len(raw)), line_no)
                    continue
                line = raw.decode("utf-8", "surrogateescape").rstrip("\r")
                if carried and line.strip():
                    parser = _parser_after_restart(src, parser, line, line_no,
                                                   carried)
                    carried = None
                rec = _parse_line(src, parser, line, line_no)
                if rec is not None:
                    yield rec
            if len(partial) > MAX_LINE_BYTES:
                skipping, partial = len(partial), b""
            continue
        if src.end.is_set():
            return  # asked to end: all the file held has been yielded
        if path.exists():
            gone_since = None
        elif not vanished:
            now = time.monotonic()
            gone_since = now if gone_since is None else gone_since
            if now - gone_since >= _GONE_GRACE_POLLS * poll:
                logger.warning(
                    "source %s: the file was removed; waiting for a new one", path
                )
                vanished = True
        if _rotated(path, inode):
            handle.close()
            handle = None
            continue
        time.sleep(poll)


def _changed_in_place(
    fd: int, head: bytes, before: int, offset: int, at_line_start: bool
) -> str | None:
    """Whether the followed file was truncated or rewritten under the same inode,
    checked after each read: ``"truncated"``, ``"rewritten"`` or None.

    ``before`` and ``offset`` are the bytes read before and after the read,
    ``head`` the file's first bytes as read, and ``at_line_start`` says the read
    before ended a line. The file is truncated when it is now shorter than what
    was read; rewritten when its first bytes changed, or when the byte before
    ``before`` is no longer the end of a line (the read went on mid-line in new
    text). A rewrite that keeps the first bytes and puts a line end at that same
    byte cannot be told from growth.
    """
    if os.fstat(fd).st_size < offset:
        return "truncated"
    if head and os.pread(fd, len(head), 0) != head:
        return "rewritten"
    if at_line_start and before and os.pread(fd, 1, before - 1) != b"\n":
        return "rewritten"
    return None


def _say_read_again(path: Path, change: str) -> None:
    """Log that the followed file is read again from its start, and why."""
    if change == "truncated":
        logger.info(
            "source %s: the file was truncated in place (a copytruncate rotation); "
            "reading it from its start",
            path,
        )
        return
    logger.warning(
        "source %s: the file was rewritten in place (its first bytes, or the end of "
        "the last line read, changed); reading it again from its start, so flows "
        "read before may be scored again",
        path,
    )


def _parser_after_restart(src: Source, parser, line: str, line_no: int,
                          change: str):
    """The parser for a file read again in place (``change``: "truncated" or
    "rewritten"), given its first non-blank line: a new one when the line is a
    ``#`` line (the new header replaces the old), else the earlier one, whose
    ``#fields`` the rows keep (said once)."""
    from flows.readers.stream import TsvLineParser

    if line_no == 1:
        line = line.removeprefix("\ufeff")
    if line.startswith("#"):
        return TsvLineParser(src.target, src.unknown_label)
    if parser.header.fields is not None and not line.lstrip().startswith("{"):
        logger.warning(
            "source %s: the file was %s in place; reading on with its earlier "
            "#fields",
            src.target,
            change,
        )
    return parser


def _rotated(path: Path, inode: int | None) -> bool:
    """Whether the path now names another file than the one being read."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    return st.st_ino != inode


def _parse_line(src: Source, parser, line: str, line_no: int) -> dict | None:
    """One followed line: a header line, a TSV or JSON record, or a rejection (a
    label no table names costs the label only, as on stdin)."""
    from flows.readers.stream import parse_json_line

    if line_no == 1:
        line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark (Windows)
    if not line.strip():
        return None
    undecodable = not_utf8_text(line)
    if undecodable and line.startswith("#"):  # as the whole-file reader decodes it
        line = line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    elif undecodable:
        src.reject("bad_line", NOT_UTF8, line_no)  # as flows refuses the line
        return None
    try:
        if line.startswith("#"):
            parser.header_line(line, line_no)
            return None
        if line.lstrip().startswith("{"):
            rec = parse_json_line(line, src.target, line_no, src.unknown_label)
        else:
            rec = parser.parse(line, line_no)
        rec = canonical(rec)
    except BadInputError as exc:
        src.reject("bad_line", _line_problem(exc), line_no)
        return None
    problem = _record_problem(rec)  # as for stdin: what the re-scorer would refuse
    if problem is not None:
        src.reject("bad_value", problem, line_no)
        return None
    return rec
