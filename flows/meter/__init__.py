"""The packet flow meter: pcap, pcapng and live interfaces to Zeek-style conn records.

Three entry points, all giving canonical flow records (:mod:`flows.record`) with the
meanings of Zeek's conn.log:

- :func:`read_capture` reads one capture file into a :class:`~flows.readers.result.
  ReadResult` (family ``conn``, format ``pcap`` or ``pcapng``) with counters in
  ``stats``;
- :func:`iter_flows` yields records one by one as connections end, from a capture
  file or a live interface (``iface:NAME``), for the edge agent;
- :class:`FlowMeter` takes frames one at a time from any source.

Damage: a capture cut short (mid-record, mid-block, or empty) keeps every packet
before the cut, sets ``partial`` and adds one warning naming the file and byte
offset. Damaged packets inside a readable file (headers cut, impossible header
fields, an unknown link type, a record cut below the snap length, a time before
1970 or past year 9999 that a pcapng ``if_tsoffset`` gives) are counted and
skipped or kept as far as they go, with the same single warning; no record has a
``ts`` below 0 or past 9999. So is a pcapng packet block naming an interface the
file does not describe (``bad_interface``): the read goes on after it. Bytes
that cannot be a record or block at all stop the read there: with
``on_error="skip"`` the result is returned as partial; with ``on_error="fail"`` a
:class:`~flows.errors.PartialInputError` is raised that carries it as ``exc.result``
(exit code 4). A file that is no capture from its first bytes on (no packet could
be read before the garbage) raises :class:`~flows.errors.BadInputError` (exit code
3) with either ``on_error``: there is nothing to keep. So does, in
:func:`read_capture`, a file whose packets were all read but gave no flow (all
non-IP, all fragments never made whole...): nothing usable came of it. A live
interface with no IP traffic is no error.

Two packet paths give the same records: a compiled one (``flows.meter._fast``,
built at install time) and the pure-Python reference; see :func:`make_meter` and
``GATEWATCH_METER``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

from flows import logger
from flows.errors import BadInputError, PartialInputError, UsageError
from flows.meter.capture import CaptureReader, Damage
from flows.meter.conn import whole_microseconds
from flows.meter.decode import LINK_NAMES
from flows.meter.meter import FlowMeter, Timeouts

__all__ = [
    "FlowMeter",
    "Timeouts",
    "fast_available",
    "iter_flows",
    "iter_live",
    "make_meter",
    "read_capture",
]

ON_ERROR = ("fail", "skip")
ENGINES = ("auto", "fast", "python")

try:
    from flows.meter._fast import FastMeter
except ImportError as _exc:  # not built (no compiler or Cython at install time)
    FastMeter = None
    _FAST_MISSING = str(_exc)
else:
    _FAST_MISSING = None

_announced: set[str] = set()


def fast_available() -> bool:
    """Whether the compiled packet path (``flows.meter._fast``) is built here."""
    return FastMeter is not None


def make_meter(engine: str | None = None, **kwargs):
    """A new meter: the compiled :class:`FastMeter` or the Python :class:`FlowMeter`.

    ``engine`` is ``"auto"`` (compiled when built, else Python), ``"fast"`` (the
    compiled one or a :class:`~flows.errors.UsageError`) or ``"python"``; None reads
    ``GATEWATCH_METER`` (default ``auto``). Which one runs is logged once per
    process. ``kwargs`` go to the meter (both take the same ones).
    """
    choice = engine if engine is not None else os.environ.get("GATEWATCH_METER")
    choice = (choice or "auto").strip().lower()
    if choice not in ENGINES:
        raise UsageError(
            f"meter engine must be one of {', '.join(ENGINES)} "
            f"(argument or GATEWATCH_METER), got {choice!r}"
        )
    if choice == "fast" and FastMeter is None:
        raise UsageError(
            "the compiled meter (flows.meter._fast) is not built in this install "
            f"({_FAST_MISSING}); reinstall with a C compiler, or use "
            "GATEWATCH_METER=python"
        )
    use_fast = FastMeter is not None and choice != "python"
    name = "compiled (flows.meter._fast)" if use_fast else "pure Python"
    if name not in _announced:
        _announced.add(name)
        why = ""
        if not use_fast and choice == "auto":
            why = f" (compiled path not built: {_FAST_MISSING})"
        logger.info("flow meter: %s packet path%s", name, why)
    return (FastMeter if use_fast else FlowMeter)(**kwargs)


def _feed_all(reader: CaptureReader, meter) -> Iterator[None]:
    """Feed every packet of ``reader`` to ``meter``; yields when flows may have ended.

    The compiled meter takes pcap records and pcapng packet blocks in bulk from
    the read buffer; everything else goes packet by packet through ``feed``.
    """
    snaps = reader.snaplens
    reader.on_damaged = meter._damaged  # packet blocks skipped as damaged
    feed = meter.feed
    bulk = meter if hasattr(meter, "pcapng_bulk") else None
    for item in reader.packets_or_runs(bulk):
        if item is not None:
            ts, link, data, wire, offset = item
            feed(ts, link, data, wire, offset, snaps.get(link, 0))
        if meter.done:
            yield None


def _nothing_read(path: str, reader: CaptureReader) -> None:
    """Raise a bad-input error when the file's very first bytes are no capture.

    A file that is not a capture at all (a wrong magic, a bogus first record, a
    conn.log named ``pcap:``) is bad input (exit 3), not a damaged capture (exit 4).
    """
    damage = reader.damage
    if damage is not None and damage.kind == "garbage" and reader.packets == 0:
        raise BadInputError(
            damage.message + "; no packet could be read",
            path=path,
            offset=damage.offset,
        )


def read_capture(
    path: str | Path,
    *,
    on_error: str = "fail",
    timeouts: Timeouts | None = None,
    max_flows: int = 1_000_000,
    check_checksums: bool = False,
    uid_seed: str | None = None,
    engine: str | None = None,
):
    """Read one pcap or pcapng file into a canonical conn table (see the module doc).

    ``engine`` picks the packet path (see :func:`make_meter`).

    ``stats`` holds ``packets``, ``bytes``, ``link_types`` (name -> packets),
    ``flows``, ``skipped`` (reason -> packets), ``evictions``, ``ended`` (reason ->
    flows), ``snap_cut_packets``, ``fragments_reassembled``, ``format``,
    ``interfaces`` and ``damage`` (None, or kind, offset and message).
    """
    from flows.readers.result import ReadResult
    from flows.record import CONN_FIELD_NAMES, columns_to_table

    if on_error not in ON_ERROR:
        raise UsageError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    path = str(path)
    meter = make_meter(
        engine,
        timeouts=timeouts,
        max_flows=max_flows,
        check_checksums=check_checksums,
        uid_seed=uid_seed,
    )
    reader = _open(path)
    records: list[dict] = []
    for _ in _feed_all(reader, meter):
        records.extend(map(whole_microseconds, meter.pop_done()))
    records.extend(map(whole_microseconds, meter.flush()))
    _nothing_read(path, reader)
    if not records:
        _no_flow(path, reader, meter)
    # In the order the meter gives them, as the agent gets them from iter_flows
    # (each connection as it ends, then the ones still open at the end), not by
    # ts: windows follow the rows' order.

    columns = {name: [r[name] for r in records] for name in CONN_FIELD_NAMES}
    table = columns_to_table(columns)
    stats = meter.stats
    if reader.skipped_blocks:
        stats["packets"] += sum(reader.skipped_blocks.values())
        stats["skipped"].update(reader.skipped_blocks)
    stats["format"] = reader.format
    stats["interfaces"] = [
        {"link_type": link, "snaplen": snap} for link, snap in reader.interfaces
    ]
    warning, damage = _damage_note(path, reader.damage, meter)
    stats["damage"] = damage
    skipped = _damaged_skipped(meter, reader)
    result = ReadResult(
        table,
        reader.format or "pcap",
        "conn",
        skipped=skipped,
        warnings=[warning] if warning else [],
        partial=warning is not None,
        stats=stats,
        damage=_damage_list(path, reader.damage, meter, skipped),
    )
    # The warning travels in the result (readers print it); log it at INFO only.
    if warning:
        logger.info(warning)
    logger.info(
        "%s: %d packets, %d flows (%s)", path, meter.packets, meter.flows, reader.format
    )
    if (
        reader.damage is not None
        and reader.damage.kind == "garbage"
        and on_error == "fail"
    ):
        exc = PartialInputError(
            reader.damage.message + "; the packets before it were kept",
            path=path,
            offset=reader.damage.offset,
        )
        exc.result = result
        raise exc
    return result


def iter_flows(
    source: str | Path,
    *,
    on_error: str = "fail",
    timeouts: Timeouts | None = None,
    max_flows: int = 1_000_000,
    check_checksums: bool = False,
    engine: str | None = None,
    damage: list | None = None,
    end: threading.Event | None = None,
    bpf: str | None = None,
    counts: dict[str, int] | None = None,
) -> Iterator[dict]:
    """Yield canonical records as connections end, from a capture or ``iface:NAME``.

    ``source`` is a capture file path (``pcap:`` prefix allowed) or ``iface:NAME``
    for live capture (see :func:`iter_live`). At the end of a file every open
    connection is ended and yielded. Damage is logged as one warning; bytes that
    cannot be a record raise :class:`~flows.errors.PartialInputError` after every
    flow before them was yielded, unless ``on_error="skip"``. A list given as
    ``damage`` receives, once the file is read, what was found damaged by kind
    (``ReadResult.damage`` entries: packets the read went on past, then where it
    stopped), before that error is raised. ``end`` (a ``threading.Event``) stops
    a live capture, whose open connections are then yielded; files ignore it, as
    they do ``bpf``, a libpcap filter of the packets a live capture takes.
    A dict given as ``counts`` is kept up to date as the read goes: ``evicted``,
    the connections ended early because the table held ``max_flows``, and, for a
    live capture, ``dropped``, the packets libpcap or the interface dropped
    before the meter saw them (both warned once in the log as well).
    """
    text = str(source)
    if text.startswith("iface:"):
        yield from iter_live(
            text[len("iface:") :],
            timeouts=timeouts,
            max_flows=max_flows,
            check_checksums=check_checksums,
            engine=engine,
            end=end,
            bpf=bpf,
            counts=counts,
        )
        return
    if text.startswith("pcap:"):
        text = text[len("pcap:") :]
    meter = make_meter(
        engine,
        timeouts=timeouts,
        max_flows=max_flows,
        check_checksums=check_checksums,
    )
    reader = _open(text)
    counts = {} if counts is None else counts
    for _ in _feed_all(reader, meter):
        counts["evicted"] = meter.evicted
        yield from map(whole_microseconds, meter.pop_done())
    counts["evicted"] = meter.evicted
    yield from map(whole_microseconds, meter.flush())
    if meter.evicted:
        from flows.meter.live import table_full

        logger.warning("%s (%d ended early)", table_full(text, max_flows),
                       meter.evicted)
    _nothing_read(text, reader)
    warning, _ = _damage_note(text, reader.damage, meter)
    if warning:
        logger.warning(warning)
    if damage is not None:
        damage.extend(
            _damage_list(text, reader.damage, meter, _damaged_skipped(meter, reader))
        )
    if (
        reader.damage is not None
        and reader.damage.kind == "garbage"
        and on_error == "fail"
    ):
        # What the caller kept of the flows before it is for the caller to say
        # (the agent: "the 11 flows read before it were scored and kept").
        raise PartialInputError(
            reader.damage.message, path=text, offset=reader.damage.offset
        )


def iter_live(name: str, **kwargs) -> Iterator[dict]:
    """Yield records from a live interface (needs a libpcap binding and privilege)."""
    from flows.meter.live import iter_live as _iter_live

    yield from map(whole_microseconds, _iter_live(name, **kwargs))


def _open(path: str) -> CaptureReader:
    p = Path(path)
    if not p.exists():
        raise BadInputError("no such file", path=path)
    if p.is_dir():
        raise BadInputError("is a folder, expected a capture file", path=path)
    return CaptureReader(path)


def _damaged_skipped(meter: FlowMeter, reader: CaptureReader) -> int:
    """Packets skipped as damaged, by the meter or (packet blocks) the reader; not
    those the meter does not meter: non-IP, fragments still held, other IP
    protocols."""
    return (
        sum(meter.skipped.values())
        + sum(reader.skipped_blocks.values())
        - meter.skipped.get("non_ip", 0)
        - meter.skipped.get("fragments_held", 0)
        - meter.skipped.get("other_ip_protocol", 0)
    )


# Why a packet that is not damaged gave no flow, for the message of a capture
# whose packets all went that way.
_NOT_METERED = {
    "non_ip": "not IPv4 or IPv6",
    "fragments_held": "IP fragments of datagrams never made whole",
    "other_ip_protocol": "IP protocols the meter does not count",
}


def _no_flow(path: str, reader: CaptureReader, meter) -> None:
    """Raise a bad-input error when packets were read but none made a flow.

    Only for a file read whole without damage (a damaged one is reported as
    such): every packet was non-IP (a link type patched to one whose frames are
    not IP), a fragment never made whole, or the like. Nothing usable was read, as
    for an empty file (exit 3); the message counts why the packets were skipped.
    """
    packets = meter.packets + sum(reader.skipped_blocks.values())
    if not packets or reader.damage is not None or meter.damage is not None:
        return
    reasons = {**meter.skipped, **reader.skipped_blocks}
    why = ", ".join(
        f"{count} {reason}"
        + (f" ({_NOT_METERED[reason]})" if reason in _NOT_METERED else "")
        for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1])
        if count
    )
    links = [
        f"{link} ({LINK_NAMES[link]})" if link in LINK_NAMES else str(link)
        for link in sorted(reader.link_types)
    ]
    on = f" on link type {', '.join(links)}" if links else ""
    raise BadInputError(
        f"{packets} packets{on}, all skipped: "
        f"{why or 'none gave a flow'}; no flow came of them, so nothing usable "
        "was read",
        path=path,
    )


def _damage_list(path: str, damage: Damage | None, meter: FlowMeter, skipped: int):
    """The damage of one capture as ``ReadResult.damage``: the damaged packets the
    read went on past (the first one's place; how many, how many skipped), then
    the place where the read stopped, if it stopped early."""
    from flows.readers.result import Damage as Found

    found = []
    if meter.damage is not None:
        found.append(
            Found(
                path,
                meter.damage.message,
                place=f"byte offset {meter.damage.offset}",
                stopped=False,
                records=meter.damage.count,
                skipped=min(skipped, meter.damage.count),
            )
        )
    if damage is not None:
        found.append(
            Found(path, damage.message, place=f"byte offset {damage.offset}")
        )
    return found


def _damage_note(path: str, damage: Damage | None, meter: FlowMeter):
    """One warning sentence for the first damage found, and its stats entry."""
    found = []
    if damage is not None:
        found.append((damage.offset, damage.message, damage.kind))
    if meter.damage is not None:
        extra = meter.damage.count - 1
        msg = meter.damage.message
        if extra:
            msg += (
                f" (and {extra} more damaged packets: "
                + ", ".join(f"{k} {v}" for k, v in sorted(meter.damage.reasons.items()))
                + ")"
            )
        found.append((meter.damage.offset, msg, "packet"))
    if not found:
        return None, None
    found.sort()
    offset, message, kind = found[0]
    others = [f"{m} at byte offset {o}" for o, m, _ in found[1:]]
    text = f"{path}: byte offset {offset}: {message}"
    if kind == "cut":
        text += "; every packet before it was kept"
    if others:
        text += "; also " + "; ".join(others)
    info = {"kind": kind, "offset": offset, "message": message}
    if meter.damage is not None:
        info["damaged_packets"] = meter.damage.count
        info["reasons"] = dict(meter.damage.reasons)
    return text, info
