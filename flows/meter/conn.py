"""One connection's state, with the semantics of Zeek's conn.log.

A :class:`Conn` follows one TCP, UDP or ICMP connection from its first packet. It
keeps Zeek's terms: the *orig* side is the one Zeek would take as originator, each
side is a :class:`Endpoint` with Zeek's TCP endpoint states, ``history`` gets Zeek's
letters (upper case for the originator, lower case for the responder; ``S`` SYN,
``H`` SYN-ACK, ``A`` pure ACK, ``D`` data, ``F`` FIN, ``R`` RST, ``C`` bad checksum,
``G`` content gap, ``T`` retransmission, ``W`` zero window, ``I`` FIN and RST
together, ``Q`` other multi-flag packet, ``^`` roles flipped). ``C``, ``G``, ``T``
and ``W`` are added on their 1st, 10th, 100th, ... occurrence, the others once.

TCP byte counts come from sequence numbers (the highest byte sent or acknowledged,
less the SYN and FIN octets), as Zeek's do; ``missed_bytes`` counts bytes that the
peer acknowledged but that never appeared in the capture (report gaps only when
neither side is a partial connection, as Zeek's default). This is a reimplementation
from Zeek's documented behaviour and its logs, not a translation of its source.
"""

from __future__ import annotations

import math
import socket

from flows.meter.service import identify

# Zeek's TCP endpoint states.
INACTIVE, SYN_SENT, SYN_ACK_SENT, PARTIAL, ESTABLISHED, CLOSED, RESET = range(7)

# TCP flag bits.
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10

# History bits for the once-only letters (orig side; the responder's are << 16).
_H_SYN, _H_FIN, _H_RST, _H_DATA, _H_ACK, _H_MULTI, _H_FINRST = 1, 2, 4, 8, 16, 32, 64

_M32 = 0xFFFFFFFF


def _unwrap(seq: int, ref: int) -> int:
    """The 64-bit sequence number closest to ``ref`` whose low 32 bits are ``seq``."""
    return ref + (((seq - ref) + 0x80000000) & _M32) - 0x80000000


class Endpoint:
    """One side of a connection: counters, TCP state and the sequence space."""

    __slots__ = (
        "is_orig",
        "state",
        "prev_state",
        "start",
        "last",
        "ack",
        "fin_cnt",
        "fin_seq",
        "did_close",
        "pkts",
        "ip_bytes",
        "size",
        "deliv",
        "segs",
        "missed",
        "counters",
        "last_syn",
        "last_fin",
        "last_rst",
        "active",
        "head",
        "head_next",
        "head_segs",
    )

    def __init__(self, is_orig: bool) -> None:
        self.is_orig = is_orig
        self.state = INACTIVE
        self.prev_state = INACTIVE
        self.start = self.last = self.ack = 0
        self.fin_cnt = 0
        self.fin_seq = 0
        self.did_close = False
        self.pkts = 0
        self.ip_bytes = 0
        self.size = 0  # UDP/ICMP payload bytes
        self.deliv = 0  # next byte the reassembly expects (absolute, 64-bit)
        self.segs: list[list[int]] | None = None  # data seen above ``deliv``
        self.missed = 0
        # letter -> [count, threshold] for the scaled letters C, G, T, W (lazily).
        self.counters: dict[str, list[int]] | None = None
        self.last_syn = self.last_fin = self.last_rst = None
        self.active = False  # UDP/ICMP: this side sent a packet
        # The first captured payload bytes this side sent (flows.meter.service).
        self.head: bytes | None = None
        self.head_next = 0  # TCP: the 32-bit sequence number the head ends at
        self.head_segs = 0  # segments in the head; HEAD_SEGS once it is complete

    def set_state(self, state: int) -> None:
        """Move to ``state``, remembering the one before (as Zeek does)."""
        self.prev_state = self.state
        self.state = state

    def tcp_size(self, peer: Endpoint) -> int:
        """Bytes sent, from sequence numbers, as Zeek reports ``orig/resp_bytes``."""
        if (
            self.prev_state == SYN_SENT
            and self.state == RESET
            and peer.state == INACTIVE
            and self.ack not in (self.start, self.start + 1)
        ):
            return 0
        top = self.last if self.last > self.ack else self.ack
        size = top - self.start
        if size > 0:
            size -= 1
        if self.fin_cnt and size > 0:
            size -= 1
        return max(size, 0)


class Conn:
    """One connection from its first packet to its end (see the module doc)."""

    __slots__ = (
        "proto",
        "ver",
        "orig_h",
        "orig_p",
        "resp_h",
        "resp_p",
        "start_ts",
        "last_ts",
        "hist",
        "seen",
        "orig",
        "resp",
        "remove_at",
        "attempt_at",
        "key",
        "ftp_data",
    )

    def __init__(
        self,
        proto: str,
        ver: int,
        orig_h: bytes,
        orig_p: int,
        resp_h: bytes,
        resp_p: int,
        ts: float,
        key: tuple,
    ) -> None:
        self.proto = proto
        self.ver = ver
        self.orig_h, self.orig_p = orig_h, orig_p
        self.resp_h, self.resp_p = resp_h, resp_p
        self.start_ts = self.last_ts = ts
        self.hist: list[str] = []
        self.seen = 0
        self.orig = Endpoint(True)
        self.resp = Endpoint(False)
        self.remove_at = float("inf")  # Zeek's close/reset/attempt delete timers
        self.attempt_at = float("inf")
        self.key = key
        self.ftp_data = False  # announced on an FTP control connection

    # -- history ------------------------------------------------------------------

    def check(self, ep: Endpoint, mask: int, code: str) -> bool:
        """Add ``code`` once per side; True when it had been seen already."""
        if not ep.is_orig:
            mask <<= 16
            code = code.lower()
        if self.seen & mask:
            return True
        self.seen |= mask
        self.hist.append(code)
        return False

    def add(self, ep: Endpoint, code: str) -> None:
        """Add ``code`` unconditionally (a repeated SYN, FIN or RST)."""
        self.hist.append(code if ep.is_orig else code.lower())

    def scaled(self, ep: Endpoint, code: str) -> None:
        """Add ``code`` on the 1st, 10th, 100th ... time it happens on this side."""
        if ep.counters is None:
            ep.counters = {}
        c = ep.counters.get(code)
        if c is None:
            c = ep.counters[code] = [0, 1]
        c[0] += 1
        if c[0] == c[1]:
            self.hist.append(code if ep.is_orig else code.lower())
            c[1] *= 10

    def flip(self) -> None:
        """Swap the roles of the two sides and note it with ``^``."""
        self.orig_h, self.resp_h = self.resp_h, self.orig_h
        self.orig_p, self.resp_p = self.resp_p, self.orig_p
        self.orig, self.resp = self.resp, self.orig
        self.orig.is_orig, self.resp.is_orig = True, False
        self.hist.append("^")

    # -- UDP and ICMP -------------------------------------------------------------

    def udp(
        self, ts: float, is_orig: bool, ip_len: int, payload: int, bad_sum: bool
    ) -> None:
        """One UDP datagram (``payload`` = UDP length less the 8-byte header)."""
        ep = self.orig if is_orig else self.resp
        self.last_ts = ts
        if bad_sum:
            self.scaled(ep, "C")
            return
        ep.pkts += 1
        ep.ip_bytes += ip_len
        ep.size += payload
        ep.active = True
        self.check(ep, _H_DATA, "D")

    def icmp(
        self, ts: float, is_orig: bool, ip_len: int, payload: int, bad_sum: bool
    ) -> None:
        """One ICMP or ICMPv6 message (``payload`` = length after the 8-byte header)."""
        ep = self.orig if is_orig else self.resp
        self.last_ts = ts
        if bad_sum:
            self.scaled(ep, "C")
            return
        ep.pkts += 1
        ep.ip_bytes += ip_len
        ep.size += payload
        ep.active = True

    # -- TCP ----------------------------------------------------------------------

    def tcp(
        self,
        ts: float,
        is_orig: bool,
        ip_len: int,
        flags: int,
        seq: int,
        ack: int,
        win: int,
        length: int,
        captured: int,
        delays,
    ) -> None:
        """One TCP segment: ``length`` payload bytes claimed, ``captured`` present."""
        ep, peer = (self.orig, self.resp) if is_orig else (self.resp, self.orig)
        ep.pkts += 1
        ep.ip_bytes += ip_len
        f_syn, f_fin, f_rst, f_ack = flags & SYN, flags & FIN, flags & RST, flags & ACK
        seg_len = length + (1 if f_syn else 0) + (1 if f_fin else 0)

        # A side seen for the first time: anchor its sequence space. Without a SYN
        # the space is laid out as if one had been there, one octet earlier.
        if ep.state == INACTIVE:
            if f_syn:
                ep.start = ep.ack = seq
                ep.last = seq + seg_len
            else:
                ep.start = ep.ack = seq - 1
                ep.last = seq
            ep.deliv = ep.start + 1
            ep.segs = None
        ref = ep.last
        s64 = ref + (((seq - ref) + 0x80000000) & _M32) - 0x80000000  # _unwrap
        rel = s64 - ep.start

        self._tcp_history(ep, flags, rel, length)
        # A zero window is worth a W unless it comes with a RST, after this side
        # reset, or after the peer's FIN (no window matters then).
        if win == 0 and not f_rst and peer.state != CLOSED and ep.state != RESET:
            self.scaled(ep, "W")
        if not (self.orig.did_close and self.resp.did_close):
            self.last_ts = ts

        if f_fin:
            ep.fin_cnt += 1
            ep.fin_seq = s64 + seg_len

        # The ACK moves the peer's acknowledged edge (or anchors a peer not seen).
        acked = None
        if f_ack:
            if peer.state == INACTIVE:
                peer.start = peer.last = peer.ack = ack
                peer.deliv = ack + 1
                peer.segs = None
            else:
                a64 = _unwrap(ack, peer.ack)
                if a64 >= peer.start:
                    if a64 > peer.ack:
                        peer.ack = a64
                    acked = a64

        # Advance the highest sequence number sent; data at or below it again is a
        # retransmission. A SYN or RST far away from it starts afresh.
        end = s64 + seg_len
        delta = end - ep.last
        if (f_syn or f_rst) and (delta > 16384 or delta < -16384):
            ep.last = end
        elif delta > 0:
            ep.last = end
        elif length > 0:
            self.scaled(ep, "T")

        do_close = self._tcp_state(ts, ep, peer, is_orig, flags, s64, length)

        if length > 0 and captured > 0:
            _deliver(ep, s64 + (1 if f_syn else 0), captured)
        if acked is not None and acked > peer.deliv:
            self._acked(peer, acked)
        if do_close:
            self._closed(ep, peer, delays)

    def _tcp_history(self, ep: Endpoint, flags: int, rel: int, length: int) -> None:
        bits = (flags & SYN and 1) + (flags & FIN and 1) + (flags & RST and 1)
        if bits > 1:
            if flags & FIN and flags & RST:
                self.check(ep, _H_FINRST, "I")
            else:
                self.check(ep, _H_MULTI, "Q")
        elif bits == 1:
            if flags & SYN:
                code = "H" if flags & ACK else "S"
                if self.check(ep, _H_SYN, code) and rel != ep.last_syn:
                    self.add(ep, code)
                ep.last_syn = rel
            elif flags & FIN:
                if self.check(ep, _H_FIN, "F") and rel + length != ep.last_fin:
                    self.add(ep, "F")
                ep.last_fin = rel + length
            else:
                if self.check(ep, _H_RST, "R") and rel != ep.last_rst:
                    self.add(ep, "R")
                ep.last_rst = rel
        elif length:
            self.check(ep, _H_DATA, "D")
        elif flags & ACK:
            self.check(ep, _H_ACK, "A")

    def _tcp_state(
        self,
        ts: float,
        ep: Endpoint,
        peer: Endpoint,
        is_orig: bool,
        flags: int,
        s64: int,
        length: int,
    ) -> bool:
        """Zeek's endpoint state machine; True when this packet closes ``ep``."""
        state = ep.state
        f_syn, f_fin, f_rst, f_ack = flags & SYN, flags & FIN, flags & RST, flags & ACK
        do_close = False
        if state == INACTIVE:
            if f_syn:
                if is_orig:
                    ep.set_state(SYN_ACK_SENT if f_ack else SYN_SENT)
                    if self.attempt_at == float("inf"):
                        self.attempt_at = ts
                else:
                    if not f_ack and peer.state == SYN_ACK_SENT and s64 == ep.start:
                        # SYN and SYN-ACK seen in swapped order: flip and establish.
                        self.flip()
                        peer.set_state(ESTABLISHED)
                    if peer.state == SYN_SENT:
                        peer.set_state(ESTABLISHED)
                    ep.set_state(ESTABLISHED)
            if f_fin:
                ep.set_state(CLOSED)
                do_close = True
            if f_rst:
                ep.set_state(RESET)
                do_close = True
            if ep.state == INACTIVE:
                if not is_orig and length == 0 and self.orig.state == SYN_SENT:
                    pass  # an ACK of the SYN before the SYN-ACK: not partial
                elif f_ack and peer.state == ESTABLISHED:
                    ep.set_state(ESTABLISHED)  # SYN missed, SYN-ACK and ACK seen
                else:
                    ep.set_state(PARTIAL)
        elif state == SYN_SENT or state == SYN_ACK_SENT:
            if f_syn and s64 != ep.start:
                ep.start = ep.ack = s64
                ep.last = s64
                ep.deliv = s64 + 1
                ep.segs = None
            if f_fin:
                ep.set_state(CLOSED)
                do_close = True
            if f_rst:
                ep.set_state(RESET)
                do_close = True
        elif state == PARTIAL or state == ESTABLISHED:
            if f_syn and state == PARTIAL and peer.state == INACTIVE and not f_ack:
                ep.set_state(SYN_SENT)
            if f_fin and not f_rst:
                ep.set_state(CLOSED)
                if peer.state == RESET and peer.prev_state == CLOSED:
                    peer.set_state(CLOSED)
                do_close = True
            if f_rst:
                ep.set_state(RESET)
                do_close = True
        elif state == CLOSED:
            if f_rst:
                ep.set_state(RESET)
                do_close = not ep.did_close
        return do_close

    # TODO(gap): only gaps revealed by acknowledgements are counted; data buffered
    # above a hole that is never acknowledged is not flushed as missed at the end,
    # and window scaling is ignored for the zero-window letter W.
    def _acked(self, ep: Endpoint, upto: int) -> None:
        """The peer acknowledged ``ep``'s data up to ``upto``: count what was missed."""
        if ep.fin_cnt and upto >= ep.fin_seq:
            upto = ep.fin_seq - 1
        if upto <= ep.deliv:
            return
        covered = 0
        segs = ep.segs
        if segs:
            keep = []
            for lo, hi in segs:
                if lo < upto:
                    covered += min(hi, upto) - max(lo, ep.deliv)
                    if hi > upto:
                        keep.append([upto, hi])
                else:
                    keep.append([lo, hi])
            ep.segs = keep or None
        missing = upto - ep.deliv - covered
        ep.deliv = upto
        if ep.segs:
            _absorb(ep)
        peer = self.resp if ep.is_orig else self.orig
        if (
            missing > 0
            and ep.state != INACTIVE
            and ep.state != PARTIAL
            and peer.state != PARTIAL
        ):
            ep.missed += missing
            self.scaled(ep, "G")

    def _closed(self, ep: Endpoint, peer: Endpoint, delays) -> None:
        """Zeek's close bookkeeping: once both sides are done, delete after a delay."""
        ep.did_close = True
        if ep.state == RESET or peer.did_close or peer.state == INACTIVE:
            delay = (
                delays.tcp_reset_delay if ep.state == RESET else delays.tcp_close_delay
            )
            self.remove_at = self.last_ts + delay

    # -- the record ---------------------------------------------------------------

    def record(self) -> dict:
        """The canonical flow record of this connection (the meter sets the uid)."""
        o, r = self.orig, self.resp
        family = socket.AF_INET if self.ver == 4 else socket.AF_INET6
        duration = self.last_ts - self.start_ts
        if self.proto == "tcp":
            state = self._tcp_conn_state()
            ob, rb = o.tcp_size(r), r.tcp_size(o)
        else:
            if self.proto == "udp":
                if o.active:
                    state = "SF" if r.active else "S0"
                else:
                    state = "SHR" if r.active else "OTH"
            else:
                state = "OTH"
            ob, rb = o.size, r.size
        has_dur = duration > 0
        history = "".join(self.hist) or None
        if self.ftp_data:
            service = "ftp-data"
        elif o.head is None and r.head is None:
            service = None
        else:
            service = identify(
                self.proto, self.orig_p, self.resp_p, o.head, r.head, history
            )
        return {
            "ts": self.start_ts,
            "uid": None,
            "src_ip": _text(family, self.orig_h),
            "src_port": self.orig_p,
            "dst_ip": _text(family, self.resp_h),
            "dst_port": self.resp_p,
            "proto": self.proto,
            "service": service,
            "duration": duration if has_dur else None,
            "orig_bytes": ob if has_dur else None,
            "resp_bytes": rb if has_dur else None,
            "orig_pkts": o.pkts,
            "resp_pkts": r.pkts,
            "orig_ip_bytes": o.ip_bytes,
            "resp_ip_bytes": r.ip_bytes,
            "conn_state": state,
            "history": history,
            "missed_bytes": o.missed + r.missed,
            "label": None,
            "label_detail": None,
        }

    def _tcp_conn_state(self) -> str:
        os_, rs = self.orig.state, self.resp.state
        o_inactive = os_ == INACTIVE or os_ == PARTIAL
        r_inactive = rs == INACTIVE or rs == PARTIAL
        if rs == RESET:
            if (
                os_ == SYN_SENT
                or os_ == SYN_ACK_SENT
                or (
                    os_ == RESET
                    and self.orig.tcp_size(self.resp) == 0
                    and self.resp.tcp_size(self.orig) == 0
                )
            ):
                return "REJ"
            return "RSTRH" if o_inactive else "RSTR"
        if os_ == RESET:
            if r_inactive:
                hist = "".join(self.hist).lstrip("^")
                if (
                    hist.startswith("S")
                    and "R" in hist
                    and not any(ch in hist[: hist.index("R")] for ch in "HAFGIQ")
                ):
                    return "RSTOS0"
                return "OTH"
            return "RSTO"
        if rs == CLOSED and os_ == CLOSED:
            return "SF"
        if os_ == CLOSED:
            return "SH" if r_inactive else "S2"
        if rs == CLOSED:
            return "SHR" if o_inactive else "S3"
        if os_ == SYN_SENT and rs == INACTIVE:
            return "S0"
        if os_ == ESTABLISHED and rs == ESTABLISHED:
            return "S1"
        return "OTH"


_TEXT: dict[bytes, str] = {}


def _text(family: int, addr: bytes) -> str:
    """An address as text, from a small cache (the same hosts recur in many flows)."""
    text = _TEXT.get(addr)
    if text is None:
        if len(_TEXT) >= 65536:
            _TEXT.clear()
        text = _TEXT[addr] = socket.inet_ntop(family, addr)
    return text


def _deliver(ep: Endpoint, start: int, n: int) -> None:
    """Note ``n`` captured data bytes of ``ep`` from ``start`` on."""
    end = start + n
    if start <= ep.deliv:
        if end > ep.deliv:
            ep.deliv = end
            if ep.segs:
                _absorb(ep)
        return
    segs = ep.segs
    if segs is None:
        ep.segs = [[start, end]]
        return
    if len(segs) >= 256:
        # Far too many holes to track: forget the oldest piece (bounded memory).
        segs.pop(0)
    segs.append([start, end])
    segs.sort()
    merged = [segs[0]]
    for lo, hi in segs[1:]:
        if lo <= merged[-1][1]:
            if hi > merged[-1][1]:
                merged[-1][1] = hi
        else:
            merged.append([lo, hi])
    ep.segs = merged


def _absorb(ep: Endpoint) -> None:
    """Move ``deliv`` over buffered pieces that now touch it."""
    keep = []
    for lo, hi in sorted(ep.segs):
        if lo <= ep.deliv:
            if hi > ep.deliv:
                ep.deliv = hi
        else:
            keep.append([lo, hi])
    ep.segs = keep or None


def whole_microseconds(record: dict) -> dict:
    """``record`` with its ``duration`` snapped to whole microseconds where the
    difference is float noise, as Zeek writes it; returns the same dict.

    Packet times are held as float epoch seconds, good to about 0.24 us near 2020,
    so ``last_ts - start_ts`` of two microsecond stamps comes out as
    38.05562496185303 rather than the 38.055625 the capture says. When the
    nearest whole microsecond lies within the rounding error the two stamps can
    carry, that is the duration; a finer difference that is really there (a
    nanosecond capture with times small enough to hold it) is kept.
    """
    duration = record.get("duration")
    if not duration:
        return record

    start = record["ts"]
    snapped = round(duration, 6)
    noise = math.ulp(start) + math.ulp(start + duration) + math.ulp(duration)
    if abs(snapped - duration) <= noise:
        record["duration"] = snapped
    return record
