"""The flow meter: packets in, Zeek-style connection records out as flows end.

:class:`FlowMeter` keeps the table of open connections. Feed it frames with
:meth:`FlowMeter.feed` (or whole captures with :meth:`FlowMeter.feed_capture`); the
records of connections that ended come back from :meth:`FlowMeter.pop_done`, and
:meth:`FlowMeter.flush` ends the rest at the end of the input.

A connection ends as in Zeek: when its inactivity timeout passes (TCP 5 min, UDP and
ICMP 1 min by default, see :class:`Timeouts`), 5 s after both sides closed or a side
reset it, 5 s after an unanswered SYN, when a new SYN reuses the 5-tuple of a closed
connection, or at the end of the input. The table holds at most ``max_flows``
connections; past that the least recently active are ended early and counted as
evictions in :attr:`FlowMeter.stats`.
"""

from __future__ import annotations

import heapq
import os
import struct
from collections import Counter
from dataclasses import dataclass, field

from flows.meter.conn import ACK, INACTIVE, SYN, SYN_ACK_SENT, SYN_SENT, Conn
from flows.meter.decode import (
    ICMP,
    ICMP6,
    LINK_NAMES,
    SKIP_BOGUS,
    SKIP_CUT,
    SKIP_LINK,
    SKIP_NAMES,
    SKIP_TIME,
    SKIP_WIRE,
    TCP,
    UDP,
    Decoder,
)
from flows.meter.service import (
    FTP_CONTROL_PORTS,
    FTP_HINT_ORIG,
    FTP_HINT_RESP,
    FTP_SCAN_MAX,
    HEAD_BYTES,
    HEAD_SEGS,
    FtpData,
)
from flows.record import TS_LIMIT, packet_time_problem

# Ports Zeek's default scripts list in ``likely_server_ports``; a connection whose
# first packet is not a SYN is turned around when only its source port is here.
TCP_SERVER_PORTS = frozenset(
    (
        21,
        22,
        23,
        25,
        53,
        80,
        81,
        88,
        110,
        111,
        135,
        139,
        143,
        389,
        443,
        445,
        502,
        563,
        585,
        587,
        614,
        631,
        636,
        989,
        990,
        992,
        993,
        995,
        1080,
        1433,
        1883,
        2811,
        3128,
        3268,
        3306,
        3389,
        5060,
        5222,
        5223,
        5269,
        5432,
        6379,
        6666,
        6667,
        6668,
        6669,
        8000,
        8080,
        8443,
        8888,
        20000,
    )
)
UDP_SERVER_PORTS = frozenset(
    (
        53,
        67,
        69,
        88,
        123,
        137,
        161,
        162,
        514,
        1812,
        1813,
        2123,
        2152,
        3544,
        4789,
        5060,
        5072,
        5353,
        5355,
        6081,
    )
)

# ICMP request/reply pairs (Zeek puts the type in the source port and the
# counterpart's type in the destination port; one-way messages put the code there).
ICMP4_PAIRS = {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 10: 9, 9: 10, 17: 18, 18: 17}
ICMP6_PAIRS = {
    128: 129,
    129: 128,
    133: 134,
    134: 133,
    135: 136,
    136: 135,
    130: 131,
    131: 130,
    139: 140,
    140: 139,
    144: 145,
    145: 144,
}

# UDP ports of tunnels whose inner connections Zeek meters too (VXLAN, Geneve,
# GTP-U); the outer UDP flow is metered as well.
_UDP_TUNNELS = frozenset((4789, 6081, 2152))
_tcp_hdr = struct.Struct("!HHIIBBH").unpack_from
_ip4_fast = struct.Struct("!H2xHxB").unpack_from
_u16x2 = struct.Struct("!HH").unpack_from
_INF = float("inf")


@dataclass(frozen=True)
class Timeouts:
    """Inactivity timeouts and TCP delete delays in seconds (Zeek's defaults)."""

    tcp: float = 300.0
    udp: float = 60.0
    icmp: float = 60.0
    tcp_close_delay: float = 5.0
    tcp_reset_delay: float = 5.0
    tcp_attempt_delay: float = 5.0
    other: float = 60.0  # IP protocols other than TCP, UDP and ICMP

    def __post_init__(self) -> None:
        for name in (
            "tcp",
            "udp",
            "icmp",
            "other",
            "tcp_close_delay",
            "tcp_reset_delay",
            "tcp_attempt_delay",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                from flows.errors import UsageError

                raise UsageError(
                    f"timeout {name} must be a number of seconds >= 0, got {value!r}"
                )


@dataclass
class PacketDamage:
    """The first damaged packet of an input, and how many there were."""

    offset: int
    message: str
    count: int = 1
    reasons: Counter = field(default_factory=Counter)


# The pure-Python packet path: the reference for the compiled one in _fast.pyx
# (same records, tested in tests/test_meter_fast.py) and the fallback where that is
# not built; about 1.6e5-2e5 packets per CPU second (benchmarks/bench_meter.py).
# ``service`` comes from flows.meter.service (the first payload bytes of each side).
# TODO(gap): services past dns/http/ssl/dtls/ssh/ftp/ftp-data/smtp/pop3/ntp/dhcp/sip
# and mqtt/modbus/dnp3_tcp/dnp3_udp/smb/mysql/rdp (dce_rpc, irc, krb, ldap, snmp,
# coap, ...) stay null, as do the names Zeek adds later in a connection (gssapi,
# ntlm on SMB; only mysql,ssl is made); role flips that Zeek's analyzers make
# mid-connection (e.g. NTP mode 4 seen first) are not made.
class FlowMeter:
    """Turn packets into canonical conn records (see the module doc).

    ``check_checksums`` drops TCP/UDP/ICMP packets whose checksum is wrong and marks
    ``C`` in the history, as Zeek does without ``-C``; it is off by default because
    captures taken on the sending host carry offloaded (unfilled) checksums.
    ``uid_seed`` makes the uids reproducible. ``unknown_transport`` meters other IP
    protocols as Zeek does (proto ``unknown_transport``, ports 0); off, they are
    counted as skipped.
    """

    def __init__(
        self,
        timeouts: Timeouts | None = None,
        *,
        max_flows: int = 1_000_000,
        check_checksums: bool = False,
        tcp_server_ports: frozenset[int] = TCP_SERVER_PORTS,
        udp_server_ports: frozenset[int] = UDP_SERVER_PORTS,
        uid_seed: str | None = None,
        unknown_transport: bool = True,
    ) -> None:
        if max_flows < 1:
            from flows.errors import UsageError

            raise UsageError(f"max_flows must be at least 1, got {max_flows}")
        self.timeouts = timeouts or Timeouts()
        self._tcp_to = self.timeouts.tcp
        self._attempt = self.timeouts.tcp_attempt_delay
        self.max_flows = max_flows
        self.check_checksums = check_checksums
        self.unknown_transport = unknown_transport
        self.tcp_server_ports = tcp_server_ports
        self.udp_server_ports = udp_server_ports
        salt = uid_seed.encode() if uid_seed is not None else os.urandom(8)
        self._uid_base = int.from_bytes(salt.ljust(8, b"\0")[:8], "big")
        self._uids = 0
        # Deadlines: (earliest time a connection can end, tie, conn), checked lazily.
        self._heap: list[tuple[float, int, Conn]] = []
        self._tie = 0
        self.decoder = Decoder()
        self.ftp = FtpData()  # announced FTP data connections (ftp-data)
        self.table: dict[tuple, Conn] = {}
        self.done: list[dict] = []
        self.packets = 0
        self.bytes = 0
        self.link_types: dict[int, int] = {}
        self.skipped: Counter = Counter()
        self.ended: Counter = Counter()  # why connections ended
        self.evicted = 0
        self.flows = 0
        self.snap_cut = 0
        self.damage: PacketDamage | None = None
        self._last_damaged: int | None = None
        self.first_ts: float | None = None
        self.last_ts = -_INF
        self._next_sweep = -_INF

    # -- input --------------------------------------------------------------------

    def feed(
        self,
        ts: float,
        link: int,
        data: bytes,
        wire: int,
        offset: int | None = None,
        snaplen: int = 0,
    ) -> None:
        """One captured frame: its time, link type, bytes and length on the wire.

        ``offset`` (the frame's place in its file) and ``snaplen`` (the snap length
        the capture announced) only serve the damage report.
        """
        self.packets += 1
        self.bytes += wire
        lt = self.link_types
        lt[link] = lt.get(link, 0) + 1
        # Before 1970 (a pcapng if_tsoffset below 0), NaN, or past year 9999 (an
        # if_tsoffset near 2**63): no date, so no record may hold it.
        if not 0.0 <= ts < TS_LIMIT:
            self._bad_time(ts, offset)
            return
        if ts > self.last_ts:
            if self.first_ts is None:
                self.first_ts = ts
            self.last_ts = ts
            if ts >= self._next_sweep:
                self._sweep(ts)
        n = len(data)
        if n < wire:
            self.snap_cut += 1
            if snaplen and n < snaplen:
                self._damaged(
                    offset,
                    "cut_below_snaplen",
                    f"packet record holds {n} of {wire} bytes, "
                    f"less than the snap length {snaplen}",
                )

        # The common case inline: Ethernet, IPv4 without options or fragments.
        if (
            link == 1
            and n >= 34
            and data[12] == 8
            and data[13] == 0
            and data[14] == 0x45
        ):
            total, frag, proto = _ip4_fast(data, 16)
            if (
                20 < total <= wire - 14
                and not frag & 0x3FFF
                and (proto == 6 or proto == 17)
            ):
                self._ip(
                    ts,
                    4,
                    data[26:30],
                    data[30:34],
                    proto,
                    total,
                    data[34 : 14 + total],
                    total - 20,
                    offset,
                )
                return

        pkt = self.decoder.decode(link, data, wire, ts)
        if type(pkt) is int:
            self.skipped[SKIP_NAMES[pkt]] += 1
            if pkt == SKIP_CUT:
                self._damaged(
                    offset,
                    "cut_header",
                    f"packet ({n} of {wire} bytes captured) is cut inside its headers",
                )
            elif pkt == SKIP_BOGUS:
                self._damaged(
                    offset, "bad_header", "packet has an impossible IP header"
                )
            elif pkt == SKIP_WIRE:
                self._damaged(
                    offset,
                    "truncated_ip",
                    "IP total length exceeds the packet's length on the wire",
                )
            elif pkt == SKIP_LINK:
                self._damaged(offset, "unknown_link_type", f"unknown link type {link}")
            return
        self._ip(ts, *pkt, offset)

    def _bad_time(self, ts: float, offset: int | None) -> None:
        """Skip a packet whose time is before 1970, past year 9999 or not a number,
        as damaged.

        No record may hold such a ``ts`` (the readers make one before 1970 a bad
        row; one past 9999 is no date), so the packet opens, updates and ends no
        connection, and moves no clock.
        """
        self.skipped[SKIP_NAMES[SKIP_TIME]] += 1
        self._damaged(
            offset,
            "bad_time",
            f"packet time stamp is unusable: {packet_time_problem(ts)}",
        )

    def _damaged(self, offset: int | None, reason: str, message: str) -> None:
        """Note one damaged packet (a packet with two faults is counted once)."""
        if self.damage is None:
            self.damage = PacketDamage(offset if offset is not None else -1, message, 0)
        if offset is None or offset != self._last_damaged:
            self.damage.count += 1
        self._last_damaged = offset
        self.damage.reasons[reason] += 1

    def _ip(
        self,
        ts: float,
        ver: int,
        src: bytes,
        dst: bytes,
        proto: int,
        ip_len: int,
        l4: bytes,
        l4_len: int,
        offset: int | None,
    ) -> None:
        """One IP packet: find or start its connection and update it."""
        n = len(l4)
        if proto == TCP:
            if n < 20:
                self.skipped["cut_header"] += 1
                self._damaged(offset, "cut_header", "TCP header is cut")
                return
            sport, dport, seq, ack, doff, flags, win = _tcp_hdr(l4, 0)
            hlen = (doff >> 4) << 2
            if hlen < 20 or hlen > l4_len:
                self.skipped["bad_header"] += 1
                self._damaged(offset, "bad_header", "TCP header length is impossible")
                return
            length = l4_len - hlen
            captured = n - hlen if n > hlen else 0
            if captured > length:
                captured = length
            bad = (
                self.check_checksums
                and n >= l4_len
                and not _sum_ok(ver, src, dst, TCP, l4, l4_len)
            )
            if src < dst or (src == dst and sport <= dport):
                key = (6, src, sport, dst, dport)
            else:
                key = (6, dst, dport, src, sport)
            c = self.table.get(key)
            if (
                c is not None
                and (
                    ts >= c.remove_at
                    or ts - c.last_ts >= self._tcp_to
                    or (ts >= c.attempt_at + self._attempt)
                )
                and self._ended_before(c, ts)
            ):
                c = None
            if c is not None and flags & SYN and _is_reuse(c, flags, seq):
                self._end(c, "reused")
                c = None
            if c is None:
                flip = False
                if flags & (SYN | ACK) == SYN | ACK:
                    flip = True
                elif not (flags & SYN) or flags & ACK:
                    flip = self._likely_flip(sport, dport, dst, self.tcp_server_ports)
                c = self._new("tcp", ver, src, sport, dst, dport, ts, key, flip)
            is_orig = src == c.orig_h and sport == c.orig_p
            ep = c.orig if is_orig else c.resp
            if bad:
                c.scaled(ep, "C")
                return
            if captured > 0 and ep.head_segs < HEAD_SEGS:
                self._head(ep, l4, hlen, captured, length, seq, flags)
            if (
                0 < captured <= FTP_SCAN_MAX
                and (sport in FTP_CONTROL_PORTS or dport in FTP_CONTROL_PORTS)
                and (FTP_HINT_ORIG if is_orig else FTP_HINT_RESP).search(
                    l4, hlen, hlen + captured
                )
            ):
                self.ftp.scan(
                    ts, bytes(l4[hlen : hlen + captured]), is_orig, c.orig_h, c.resp_h
                )
            c.tcp(
                ts,
                is_orig,
                ip_len,
                flags,
                seq,
                ack,
                win,
                length,
                captured,
                self.timeouts,
            )
            return

        if proto == UDP:
            if n < 8:
                self.skipped["cut_header"] += 1
                self._damaged(offset, "cut_header", "UDP header is cut")
                return
            sport, dport = _u16x2(l4, 0)
            ulen = _u16x2(l4, 4)[0]
            payload = (ulen if 8 <= ulen <= l4_len else l4_len) - 8
            if payload < 0:
                payload = 0
            bad = (
                self.check_checksums
                and n >= l4_len
                and (ver == 6 or l4[6:8] != b"\0\0")
                and not _sum_ok(ver, src, dst, UDP, l4, l4_len)
            )
            if src < dst or (src == dst and sport <= dport):
                key = (17, src, sport, dst, dport)
            else:
                key = (17, dst, dport, src, sport)
            c = self.table.get(key)
            if c is not None and self._ended_before(c, ts):
                c = None
            if c is None:
                flip = self._likely_flip(sport, dport, dst, self.udp_server_ports)
                c = self._new("udp", ver, src, sport, dst, dport, ts, key, flip)
            is_orig = src == c.orig_h and sport == c.orig_p
            c.udp(ts, is_orig, ip_len, payload, bad)
            if payload > 0 and n > 8 and not bad:
                ep = c.orig if is_orig else c.resp
                if ep.head is None:
                    ep.head = bytes(l4[8 : 8 + min(payload, n - 8, HEAD_BYTES)])
            if (dport in _UDP_TUNNELS or sport in _UDP_TUNNELS) and not bad:
                inner = self.decoder.udp_tunnel(
                    dport if dport in _UDP_TUNNELS else sport, l4[8:], ts
                )
                if inner is not None and type(inner) is not int:
                    self._ip(ts, *inner, offset)
            return

        if proto != ICMP and proto != ICMP6:
            self._other(ts, ver, src, dst, proto, ip_len)
            return

        # ICMP and ICMPv6
        if n < 4:
            self.skipped["cut_header"] += 1
            self._damaged(offset, "cut_header", "ICMP header is cut")
            return
        itype, code = l4[0], l4[1]
        pairs = ICMP4_PAIRS if proto == ICMP else ICMP6_PAIRS
        counter = pairs.get(itype)
        one_way = counter is None
        if one_way:
            counter = code
        payload = l4_len - 8 if l4_len > 8 else 0
        bad = (
            self.check_checksums
            and n >= l4_len
            and not _sum_ok(ver, src, dst, proto, l4, l4_len)
        )
        if one_way:
            key = (1, src, itype, dst, counter, 1)
        elif src < dst or (src == dst and itype <= counter):
            key = (1, src, itype, dst, counter)
        else:
            key = (1, dst, counter, src, itype)
        c = self.table.get(key)
        if c is not None and self._ended_before(c, ts):
            c = None
        if c is None:
            c = self._new("icmp", ver, src, itype, dst, counter, ts, key, False)
        c.icmp(ts, src == c.orig_h and itype == c.orig_p, ip_len, payload, bad)

    @staticmethod
    def _head(
        ep, l4: bytes, hlen: int, captured: int, length: int, seq: int, flags: int
    ) -> None:
        """Keep the first payload bytes of a TCP side (for flows.meter.service):
        its first data segment, grown by the segments that follow it in order, up
        to HEAD_BYTES bytes and HEAD_SEGS segments."""
        start = (seq + 1 if flags & SYN else seq) & 0xFFFFFFFF
        h = ep.head
        if h is None:
            ep.head = bytes(l4[hlen : hlen + min(captured, HEAD_BYTES)])
            ep.head_segs = 1
        elif start == ep.head_next:
            take = min(captured, HEAD_BYTES - len(h))
            ep.head = h + bytes(l4[hlen : hlen + take])
            ep.head_segs += 1
        else:
            return
        ep.head_next = (start + captured) & 0xFFFFFFFF
        if captured < length or len(ep.head) >= HEAD_BYTES:
            ep.head_segs = HEAD_SEGS  # cut by the snap length, or full: done

    def _other(
        self, ts: float, ver: int, src: bytes, dst: bytes, proto: int, ip_len: int
    ) -> None:
        """Another IP protocol (IGMP, ESP, SCTP, ...): Zeek's unknown_transport.

        Such a connection has ports 0, counts packets and IP bytes only, and is
        keyed by the two addresses and the protocol number.
        """
        if not self.unknown_transport:
            self.skipped["other_ip_protocol"] += 1
            return
        key = (proto, src, dst) if src <= dst else (proto, dst, src)
        key = ("ip",) + key
        c = self.table.get(key)
        if c is not None and self._ended_before(c, ts):
            c = None
        if c is None:
            c = self._new("unknown_transport", ver, src, 0, dst, 0, ts, key, False)
        c.icmp(ts, src == c.orig_h, ip_len, 0, False)

    def _likely_flip(self, sport: int, dport: int, dst: bytes, ports) -> bool:
        """Zeek's guess for a first packet that is no SYN: servers own known ports."""
        if sport not in ports or dport in ports:
            return False
        # Never make a broadcast or multicast address the originator.
        if len(dst) == 4:
            return not (dst == b"\xff\xff\xff\xff" or 224 <= dst[0] <= 239)
        return dst[0] != 0xFF

    def _new(
        self,
        proto: str,
        ver: int,
        src: bytes,
        sport: int,
        dst: bytes,
        dport: int,
        ts: float,
        key: tuple,
        flip: bool,
    ) -> Conn:
        if len(self.table) >= self.max_flows:
            self._evict(ts)
        c = Conn(proto, ver, src, sport, dst, dport, ts, key)
        if flip:
            c.flip()
        if proto == "tcp" and c.resp_p in self.ftp.ports:
            c.ftp_data = self.ftp.match(ts, c.orig_h, c.resp_h, c.resp_p)
        self.table[key] = c
        self._tie += 1
        heapq.heappush(self._heap, (ts + min(self._timeout(c), 5.0), self._tie, c))
        return c

    # -- ending connections -------------------------------------------------------

    def _timeout(self, c: Conn) -> float:
        t = self.timeouts
        if c.proto == "tcp":
            return t.tcp
        if c.proto == "udp":
            return t.udp
        return t.icmp if c.proto == "icmp" else t.other

    def _ended_before(self, c: Conn, ts: float) -> bool:
        """End ``c`` if one of Zeek's timers would have removed it by ``ts``."""
        why = self._why_over(c, ts)
        if why is None:
            return False
        self._end(c, why)
        return True

    def _why_over(self, c: Conn, ts: float) -> str | None:
        if ts >= c.remove_at:
            return "closed"
        if ts - c.last_ts >= self._timeout(c):
            return "inactive"
        if (
            c.attempt_at != _INF
            and ts >= c.attempt_at + self.timeouts.tcp_attempt_delay
            and c.orig.state in (SYN_SENT, SYN_ACK_SENT)
            and c.resp.state == INACTIVE
        ):
            return "attempt"
        return None

    def _end(self, c: Conn, why: str) -> None:
        if self.table.get(c.key) is c:
            del self.table[c.key]
        self.ended[why] += 1
        rec = c.record()
        rec["uid"] = self._uid()
        self.flows += 1
        self.done.append(rec)

    def _uid(self) -> str:
        """A Zeek-looking uid, unique within this meter (a salted counter, mixed)."""
        self._uids += 1
        return "C%016x" % ((self._uid_base ^ (self._uids * 0x9E3779B97F4A7C15)) & _M64)

    def _sweep(self, ts: float) -> None:
        """End every connection whose timer has run out by ``ts``.

        Each connection sits in a heap under the earliest time it could end; an
        entry that comes due is checked, and put back under its new earliest time
        while the connection is still alive.
        """
        heap = self._heap
        while heap and heap[0][0] <= ts:
            _, _, c = heapq.heappop(heap)
            if self.table.get(c.key) is not c:
                continue  # ended already
            if self._ended_before(c, ts):
                continue
            due = c.last_ts + self._timeout(c)
            if c.remove_at < due:
                due = c.remove_at
            if c.attempt_at != _INF:
                due = min(due, max(ts, c.attempt_at + self.timeouts.tcp_attempt_delay))
            self._tie += 1
            heapq.heappush(heap, (max(due, ts + 0.001), self._tie, c))
        self._next_sweep = ts + 1.0

    def _evict(self, ts: float) -> None:
        """Make room: end expired connections, else the least recently active 1%."""
        self._sweep(ts)
        if len(self.table) < self.max_flows:
            return
        n = max(1, len(self.table) // 100)
        victims = sorted(self.table.values(), key=lambda c: c.last_ts)[:n]
        for c in victims:
            self.evicted += 1
            self._end(c, "evicted")

    def pop_done(self) -> list[dict]:
        """The records of connections that ended since the last call."""
        out, self.done = self.done, []
        return out

    def flush(self) -> list[dict]:
        """End every open connection (end of input) and return all pending records."""
        for c in list(self.table.values()):
            self._end(c, "end_of_input")
        return self.pop_done()

    @property
    def stats(self) -> dict:
        """Counters for ``flows inspect``: packets, link types, flows, skips, ends."""
        return {
            "packets": self.packets,
            "bytes": self.bytes,
            "link_types": {
                LINK_NAMES.get(k, str(k)): v for k, v in self.link_types.items()
            },
            "flows": self.flows,
            "open_flows": len(self.table),
            "skipped": dict(self.skipped),
            "snap_cut_packets": self.snap_cut,
            "fragments_reassembled": self.decoder.reassembled,
            "fragments_dropped": self.decoder.frags_dropped,
            "ended": dict(self.ended),
            "evictions": self.evicted,
            "max_flows": self.max_flows,
            "first_ts": self.first_ts,
            "last_ts": self.last_ts if self.first_ts is not None else None,
            "damaged_packets": self.damage.count if self.damage else 0,
        }


_M64 = (1 << 64) - 1


def _is_reuse(c: Conn, flags: int, seq: int) -> bool:
    """Zeek's reuse rule: a new initial SYN on a 5-tuple that is closed or moved on."""
    conn_orig = c.orig
    if flags & ACK:
        if c.orig.state != INACTIVE:
            return False
        conn_orig = c.resp
    closed = c.orig.did_close or c.resp.did_close or c.remove_at != _INF
    if not closed:
        if conn_orig.state == INACTIVE or (seq & 0xFFFFFFFF) == (
            conn_orig.start & 0xFFFFFFFF
        ):
            return False
        if (
            not flags & ACK
            and conn_orig.state == SYN_ACK_SENT
            and c.resp.state == INACTIVE
            and (seq & 0xFFFFFFFF) == (c.resp.start & 0xFFFFFFFF)
        ):
            return False
    return True


def _sum_ok(
    ver: int, src: bytes, dst: bytes, proto: int, l4: bytes, length: int
) -> bool:
    """Whether the transport checksum of a whole captured segment is right."""
    data = bytes(l4[:length])
    if proto == 1:  # ICMPv4 has no pseudo-header
        pseudo = b""
    elif ver == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, proto, length)
    else:
        pseudo = src + dst + struct.pack("!IxxxB", length, proto)
    blob = pseudo + data
    if len(blob) % 2:
        blob += b"\0"
    total = sum(struct.unpack(f"!{len(blob) // 2}H", blob))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF
