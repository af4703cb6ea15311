"""Streaming readers of pcap and pcapng files: packets out, damage noted, not raised.

:class:`CaptureReader` reads a file in chunks, so memory stays flat whatever the file
size, and yields one tuple per packet: ``(ts, link_type, data, wire_len, offset)``.
``data`` holds the captured bytes, ``wire_len`` the length the packet had on the
wire and ``offset`` the byte offset of its record (or block) in the file.

Damage never raises here. The reader stops at the first place it cannot go past
and records it in :attr:`CaptureReader.damage` (a :class:`Damage`), so the caller
keeps every packet before it. ``kind`` is ``"cut"`` when the file ends inside a
header, a record or a block (a capture still being written, a copy cut short, an
empty file) and ``"garbage"`` when the bytes cannot be a record or block at all.
A pcapng packet block that is whole and framed right but names an interface the
section does not describe is one damaged packet, not the end: it is skipped,
counted in :attr:`CaptureReader.skipped_blocks` and reported through
:attr:`CaptureReader.on_damaged`, and the read goes on with the next block. So is
a classic pcap record whose fraction of a second is a whole second or more (1e6
microseconds, or 1e9 in a nanosecond pcap): its lengths still frame it, but its
time is no time, so it is skipped as ``bad_time`` (the meter's reason for a time
before 1970 or past 9999) rather than read as a time seconds or hours later.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
PCAP_MAGIC_KUZNETZOV = 0xA1B2CD34  # "modified" pcap: 24-byte record headers
_PCAP_MAGICS = (PCAP_MAGIC_US, PCAP_MAGIC_NS, PCAP_MAGIC_KUZNETZOV)
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BOM = 0x1A2B3C4D

# A record longer than this is taken as garbage, whatever the header's snap length
# says (the largest real snap length is 256 KiB; USB and D-Bus captures go to 128 MiB
# in theory, which no gateway capture uses).
MAX_RECORD = 1 << 20

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Damage:
    """Where and how a capture stops making sense."""

    kind: str  # "cut" or "garbage"
    offset: int
    message: str


@dataclass(frozen=True)
class _Skip:
    """A packet block that is damaged alone: skipped, and the read goes on."""

    reason: str  # the key it is counted under in ``skipped`` (``bad_interface``)
    message: str


class CaptureReader:
    """Iterate over the packets of one pcap or pcapng file (see the module doc).

    After iteration, :attr:`damage` says whether and where the file was damaged,
    :attr:`format` is ``"pcap"`` or ``"pcapng"``, :attr:`link_types` counts packets
    per link type and :attr:`packets` counts the packets yielded.
    :attr:`skipped_blocks` counts by reason the packet blocks and pcap records
    skipped as damaged (not yielded, not in :attr:`packets`); :attr:`on_damaged`,
    when set, is called with the offset, reason and message of each (the meter's
    ``_damaged``).
    """

    def __init__(self, path: str, fh=None) -> None:
        self.path = str(path)
        self._fh = fh
        self.format: str | None = None
        self.damage: Damage | None = None
        self.link_types: Counter = Counter()
        self.packets = 0
        self.interfaces: list[tuple[int, int]] = []  # (link type, snap length)
        self.snaplens: dict[int, int] = {}  # link type -> largest snap length
        self.skipped_blocks: Counter = Counter()
        self.on_damaged: Callable[[int, str, str], None] | None = None

    # The buffer: ``_buf[_pos:]`` holds unread bytes starting at file offset _base.
    def _fill(self, need: int) -> bool:
        """Make at least ``need`` unread bytes available; False at end of file."""
        while len(self._buf) - self._pos < need:
            more = self._fh.read(max(_CHUNK, need))
            if not more:
                return False
            self._base += self._pos
            self._buf = self._buf[self._pos :] + more
            self._pos = 0
        return True

    def _offset(self) -> int:
        return self._base + self._pos

    def _stop(self, kind: str, message: str, offset: int | None = None) -> None:
        self.damage = Damage(
            kind, self._offset() if offset is None else offset, message
        )

    def __iter__(self) -> Iterator[tuple[float, int, bytes, int, int]]:
        return self.packets_or_runs(None)

    def packets_or_runs(self, bulk=None) -> Iterator:
        """The packets, as :meth:`__iter__` yields them, with classic-pcap runs bulk.

        ``bulk`` (the compiled meter) is handed the read buffer through its
        ``pcap_bulk`` and ``pcapng_bulk`` and consumes the whole, sane packet
        records (pcapng: enhanced packet blocks) in it; a ``None`` is yielded after
        each run it consumed, so the caller can collect the flows that ended.
        Records and blocks the reader must judge (cut, garbage, across the buffer's
        end, other block types) still come one by one, with the same damage notes.
        """
        own = self._fh is None
        if own:
            self._fh = open(self.path, "rb")
        self._buf = b""
        self._pos = 0
        self._base = 0
        try:
            if not self._fill(4):
                left = len(self._buf) - self._pos
                self._stop(
                    "cut",
                    "the file is empty"
                    if left == 0
                    else f"the file ends after {left} bytes, inside the file header",
                )
                return
            magic_le = struct.unpack_from("<I", self._buf, self._pos)[0]
            if magic_le == PCAPNG_SHB:
                self.format = "pcapng"
                yield from self._pcapng(bulk)
            elif (
                magic_le in _PCAP_MAGICS
                or struct.unpack_from(">I", self._buf, self._pos)[0] in _PCAP_MAGICS
            ):
                self.format = "pcap"
                yield from self._pcap(bulk)
            else:
                self._stop(
                    "garbage", f"not a pcap or pcapng file (magic {magic_le:#010x})"
                )
        finally:
            if own:
                self._fh.close()

    # -- pcap -------------------------------------------------------------------------

    def _pcap(self, bulk=None) -> Iterator:
        if not self._fill(24):
            self._stop("cut", "the file ends inside the 24-byte pcap file header")
            return
        buf, pos = self._buf, self._pos
        magic = struct.unpack_from("<I", buf, pos)[0]
        if magic in _PCAP_MAGICS:
            order = "<"
        else:
            order = ">"
            magic = struct.unpack_from(">I", buf, pos)[0]
        scale = 1e-9 if magic == PCAP_MAGIC_NS else 1e-6
        # The record header's fraction of a second counts micro- or nanoseconds:
        # a count of a whole second or more is damage, not a later time.
        frac_limit, frac_unit = (
            (1_000_000_000, "nanoseconds")
            if magic == PCAP_MAGIC_NS
            else (1_000_000, "microseconds")
        )
        hdr = 24 if magic == PCAP_MAGIC_KUZNETZOV else 16
        _, _, _, _, snaplen, link_raw = struct.unpack_from(
            order + "HHiIII", buf, pos + 4
        )
        link = link_raw & 0x0FFFFFFF
        self.interfaces.append((link, snaplen))
        self.snaplens[link] = snaplen
        self._pos += 24
        rec = struct.Struct(order + "IIII")
        unpack = rec.unpack_from
        counts = 0
        big = order == ">"
        try:
            while True:
                if bulk is not None:
                    pos, got = bulk.pcap_bulk(
                        self._buf, self._pos, self._base, hdr, big, scale, link, snaplen
                    )
                    if got:
                        self._pos = pos
                        counts += got
                        yield None
                        continue
                if len(self._buf) - self._pos < hdr and not self._fill(hdr):
                    left = len(self._buf) - self._pos
                    if left:
                        self._stop(
                            "cut",
                            f"the file ends inside a record header "
                            f"({left} of {hdr} bytes)",
                        )
                    return
                buf, pos = self._buf, self._pos
                sec, frac, incl, orig = unpack(buf, pos)
                if incl > MAX_RECORD or (orig and incl > orig + hdr and incl > snaplen):
                    self._stop(
                        "garbage",
                        f"record header claims {incl} captured bytes "
                        f"(wire length {orig}, snap length {snaplen})",
                    )
                    return
                if len(buf) - pos < hdr + incl:
                    if not self._fill(hdr + incl):
                        left = len(self._buf) - self._pos - hdr
                        self._stop(
                            "cut",
                            f"the file ends inside a packet record "
                            f"({left} of {incl} captured bytes)",
                        )
                        return
                    buf, pos = self._buf, self._pos
                offset = self._base + pos
                self._pos = pos + hdr + incl
                if frac >= frac_limit:
                    self._bad_record_time(offset, frac, frac_limit, frac_unit)
                    continue
                counts += 1
                yield (
                    sec + frac * scale,
                    link,
                    buf[pos + hdr : pos + hdr + incl],
                    orig or incl,
                    offset,
                )
        finally:
            self.packets += counts
            if counts:
                self.link_types[link] += counts

    def _bad_record_time(self, offset: int, frac: int, limit: int, unit: str) -> None:
        """Skip one whole pcap record whose fraction of a second is out of range.

        The record's lengths still frame it, so the read goes on after it, as
        after a pcapng block naming no interface. Skip reason ``bad_time``, the
        meter's own for a packet time it cannot use (before 1970, past 9999).
        """
        message = (
            f"packet time stamp is unusable: expected a fraction of a second "
            f"below {limit} {unit}, found {frac}"
        )
        self.skipped_blocks["bad_time"] += 1
        if self.on_damaged is not None:
            self.on_damaged(offset, "bad_time", message)

    # -- pcapng -----------------------------------------------------------------------

    def _pcapng(self, bulk=None) -> Iterator:
        order = "<"
        ifaces: list[tuple[int, int, float, float]] = []  # link, snap, scale, offset
        first = True
        while True:
            if bulk is not None and ifaces:
                links = [i[0] for i in ifaces]
                pos, got, per_iface = bulk.pcapng_bulk(
                    self._buf,
                    self._pos,
                    self._base,
                    order == ">",
                    links,
                    [i[2] for i in ifaces],
                    [i[3] for i in ifaces],
                    [self.snaplens.get(link, 0) for link in links],
                )
                if got:
                    self._pos = pos
                    self.packets += got
                    for link, n in zip(links, per_iface, strict=True):
                        if n:
                            self.link_types[link] += n
                    yield None
                    continue
            if not self._fill(12):
                left = len(self._buf) - self._pos
                if left:
                    self._stop(
                        "cut",
                        f"the file ends inside a block header ({left} of 12 bytes)",
                    )
                return
            buf, pos = self._buf, self._pos
            btype = struct.unpack_from("<I", buf, pos)[0]
            if btype == PCAPNG_SHB:
                bom = buf[pos + 8 : pos + 12]
                if bom == b"\x4d\x3c\x2b\x1a":
                    order = "<"
                elif bom == b"\x1a\x2b\x3c\x4d":
                    order = ">"
                else:
                    self._stop(
                        "garbage",
                        "section header block with an unknown byte-order magic",
                    )
                    return
                ifaces = []
            elif first:
                self._stop(
                    "garbage", "pcapng file does not start with a section header"
                )
                return
            first = False
            btype, blen = struct.unpack_from(order + "II", buf, pos)
            if blen < 12 or blen % 4 or blen > MAX_RECORD + 64:
                self._stop(
                    "garbage",
                    f"block of type {btype:#x} claims a length of {blen} bytes",
                )
                return
            if not self._fill(blen):
                left = len(self._buf) - self._pos
                self._stop(
                    "cut",
                    f"the file ends inside a block of type {btype:#x} "
                    f"({left} of {blen} bytes)",
                )
                return
            buf, pos = self._buf, self._pos
            offset = self._base + pos
            trail = struct.unpack_from(order + "I", buf, pos + blen - 4)[0]
            if trail != blen:
                self._stop(
                    "garbage",
                    f"block of type {btype:#x} has a trailing length "
                    f"of {trail}, expected {blen}",
                )
                return
            body = buf[pos + 8 : pos + blen - 4]
            self._pos = pos + blen
            if btype == 1:
                iface = _parse_idb(body, order)
                if isinstance(iface, str):
                    self._stop(
                        "garbage",
                        f"interface description block for interface {len(ifaces)} "
                        f"{iface}",
                        offset,
                    )
                    return
                ifaces.append(iface)
                link, snap = iface[:2]
                self.interfaces.append((link, snap))
                if snap == 0 or link not in self.snaplens:
                    self.snaplens[link] = snap
                elif self.snaplens[link]:
                    self.snaplens[link] = max(self.snaplens[link], snap)
                continue
            if btype in (6, 2, 3):
                packet = _parse_packet_block(btype, body, order, ifaces)
                if isinstance(packet, str):
                    self._stop("garbage", packet, offset)
                    return
                if isinstance(packet, _Skip):
                    self.skipped_blocks[packet.reason] += 1
                    if self.on_damaged is not None:
                        self.on_damaged(offset, packet.reason, packet.message)
                    continue
                ts, link, data, wire = packet
                self.packets += 1
                self.link_types[link] += 1
                yield ts, link, data, wire, offset
            # Other block types (name resolution, statistics, custom) carry no packets.


# The finest time units the meter takes (``if_tsresol``): 10^-18 s (attoseconds) and
# 2^-63 s, far finer than any capture clock. The option can say up to 10^-127 or
# 2^-127 s, but a 64-bit time stamp in units finer than these spans under 2 seconds
# from the interface's offset: such a value is a damaged block, not a clock.
MAX_TSRESOL_DEC = 18
MAX_TSRESOL_BIN = 63


def _parse_idb(body: bytes, order: str) -> tuple[int, int, float, float] | str:
    """Link type, snap length, time scale and time offset of one interface block.

    A block that cannot describe an interface gives a message instead (the end of
    a sentence that starts with the block's name): a body shorter than its fixed
    fields, an option whose length runs past the block's end, an ``if_tsresol``
    that is not one byte, is given twice or is finer than the meter can represent,
    or an ``if_tsoffset`` that is not eight bytes or is given twice. (The pcapng
    format allows each of the two once per interface: with two, either could be
    meant, and the wrong one puts every packet's time far off.) Places are byte
    offsets from the block's start.
    """
    if len(body) < 8:
        return (
            f"is {len(body) + 12} bytes long: expected at least 20 (its link type, "
            "reserved field and snap length)"
        )
    link, _, snap = struct.unpack_from(order + "HHI", body, 0)
    scale, tsoff = 1e-6, 0.0
    seen: dict[int, tuple[int, str]] = {}  # option code -> (place, value as shown)
    pos = 8
    while pos + 4 <= len(body):
        code, length = struct.unpack_from(order + "HH", body, pos)
        if code == 0:
            break
        at = pos + 8  # the option's place in the block (type and length come first)
        if pos + 4 + length > len(body):
            return (
                f"has an option (code {code}) at byte {at} that claims {length} "
                f"bytes, past the block's options, which end at byte "
                f"{len(body) + 8}: expected every option inside its block"
            )
        value = body[pos + 4 : pos + 4 + length]
        if code == 9:
            if length != 1:
                return (
                    f"has an if_tsresol option of {length} bytes at byte {at}: "
                    "expected 1 byte (the time unit)"
                )
            res = value[0]
            if code in seen:
                return _twice("if_tsresol", seen[code], (at, f"{res:#04x}"))
            seen[code] = (at, f"{res:#04x}")
            exponent = res & 0x7F
            if exponent > (MAX_TSRESOL_BIN if res & 0x80 else MAX_TSRESOL_DEC):
                unit = f"2^-{exponent}" if res & 0x80 else f"10^-{exponent}"
                return (
                    f"has if_tsresol {res:#04x} ({unit} seconds): expected a time "
                    f"unit the meter can represent, 10^-0 to 10^-{MAX_TSRESOL_DEC} "
                    f"seconds (0x00 to {MAX_TSRESOL_DEC:#04x}) or 2^-0 to "
                    f"2^-{MAX_TSRESOL_BIN} seconds (0x80 to "
                    f"{0x80 | MAX_TSRESOL_BIN:#04x})"
                )
            scale = 2.0**-exponent if res & 0x80 else 10.0**-exponent
        elif code == 14:
            if length != 8:
                return (
                    f"has an if_tsoffset option of {length} bytes at byte {at}: "
                    "expected 8 bytes (a signed 64-bit count of seconds)"
                )
            seconds = struct.unpack_from(order + "q", value, 0)[0]
            if code in seen:
                return _twice("if_tsoffset", seen[code], (at, f"{seconds} s"))
            seen[code] = (at, f"{seconds} s")
            # A negative offset can put packets before 1970, one near 2**63 past
            # year 9999: the meter skips each such packet as damaged
            # (``bad_time``), as the readers make a ts below 0 a bad row.
            tsoff = float(seconds)
        pos += 4 + ((length + 3) & ~3)
    return link, snap, scale, tsoff


def _twice(name: str, first: tuple[int, str], second: tuple[int, str]) -> str:
    """The message for an interface option given twice (see :func:`_parse_idb`)."""
    return (
        f"has {name} twice ({first[1]} at byte {first[0]}, then {second[1]} at "
        f"byte {second[0]}): expected it at most once, as the pcapng format "
        "allows one per interface"
    )


def _parse_packet_block(btype: int, body: bytes, order: str, ifaces: list):
    """``(ts, link, data, wire_len)`` of an EPB, OPB or SPB; a message if it is bad,
    or a :class:`_Skip` if only this packet is (it names an interface the section
    does not describe: the blocks after it can still be read)."""
    if btype == 3:
        if not ifaces:
            return "simple packet block before any interface description block"
        if len(body) < 4:
            return "simple packet block shorter than its fixed fields"
        link, snap, _, _ = ifaces[0]
        wire = struct.unpack_from(order + "I", body, 0)[0]
        cap = min(wire, len(body) - 4, snap or wire)
        return 0.0, link, body[4 : 4 + cap], wire
    if btype == 6:
        if len(body) < 20:
            return "enhanced packet block shorter than its fixed fields"
        iface, hi, lo, cap, wire = struct.unpack_from(order + "IIIII", body, 0)
        data_at = 20
    else:
        if len(body) < 20:
            return "packet block shorter than its fixed fields"
        iface, _, hi, lo, cap, wire = struct.unpack_from(order + "HHIIII", body, 0)
        data_at = 20
    if iface >= len(ifaces):
        n = len(ifaces)
        described = (
            "no interface is described before it"
            if n == 0
            else f"only interface{'s 0 to' if n > 1 else ''} {n - 1} "
            f"{'are' if n > 1 else 'is'} described"
        )
        return _Skip(
            "bad_interface", f"packet block names interface {iface}, but {described}"
        )
    if data_at + cap > len(body):
        return (
            f"packet block claims {cap} captured bytes but holds {len(body) - data_at}"
        )
    link, _, scale, tsoff = ifaces[iface]
    ts = ((hi << 32) | lo) * scale + tsoff
    return ts, link, body[data_at : data_at + cap], wire or cap
