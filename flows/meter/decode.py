"""From link-layer frames to IP packets: link types, tags, tunnels of L2, fragments.

:meth:`Decoder.decode` takes one captured frame and returns either an :data:`IpPacket`
tuple or an integer code saying why there is none (see the ``SKIP_*`` names). It
handles Ethernet, Linux cooked v1 (113) and v2 (276), raw IP (101, 12, 14, 228,
229), BSD loopback/NULL (0, 108), PPP (9, 50), 802.11 (105) and 802.11 with radiotap
(127); 802.1Q and 802.1ad/QinQ tags, MPLS label stacks and PPPoE sessions; IPv4 and
IPv6 with extension headers; opens IP-in-IP and GRE tunnels; and reassembles IPv4
and IPv6 fragments, so ports are only ever read from a whole datagram.

Lengths follow Zeek: ``ip_len`` is the IP total length from the header (a packet cut
by the snap length still counts its full length), ``l4_len`` the transport length
the header claims, while ``l4`` holds only the bytes that were captured.
"""

from __future__ import annotations

import struct

# Why a frame gave no IP packet.
SKIP_NON_IP = 1  # ARP, LLDP, 802.11 management, ... (not an error)
SKIP_CUT = 2  # the capture ends inside a link, IP or transport header
SKIP_BOGUS = 3  # header fields that cannot be right (IHL < 5, total length < IHL)
SKIP_LINK = 4  # a link type this decoder does not know
SKIP_FRAGMENT = 5  # a fragment kept until its datagram is whole
SKIP_OTHER = 6  # an IP protocol other than TCP, UDP, ICMP, ICMPv6 (when not metered)
SKIP_WIRE = 7  # the IP total length exceeds what was on the wire
SKIP_TIME = 8  # a time before 1970, past 9999 or NaN (the meter's check, not decoded)

SKIP_NAMES = {
    SKIP_NON_IP: "non_ip",
    SKIP_CUT: "cut_header",
    SKIP_BOGUS: "bad_header",
    SKIP_LINK: "unknown_link_type",
    SKIP_FRAGMENT: "fragments_held",
    SKIP_OTHER: "other_ip_protocol",
    SKIP_WIRE: "truncated_ip",
    SKIP_TIME: "bad_time",
}

LINK_NAMES = {
    0: "null",
    1: "ethernet",
    9: "ppp",
    12: "raw",
    14: "raw",
    50: "ppp_hdlc",
    101: "raw",
    105: "ieee802_11",
    108: "loop",
    113: "linux_sll",
    127: "radiotap",
    228: "ipv4",
    229: "ipv6",
    276: "linux_sll2",
}

# TODO(gap): IP-in-IP, IPv6-in-IP, GRE, VXLAN, Geneve and GTP-U are opened; Teredo
# and AYIYA are not (Zeek meters their inner connections too; here only the outer
# UDP flow is), and the canonical record has no tunnel_parents column.
TCP, UDP, ICMP, ICMP6 = 6, 17, 1, 58
_TUNNELS = frozenset((4, 41, 47))  # IPv4-in-IP, IPv6-in-IP, GRE
# IPv6 extension headers that are walked over (fragment and ESP are handled apart).
_EXT = frozenset((0, 43, 60, 135, 139, 140, 253, 254))

_u16 = struct.Struct("!H").unpack_from
_u32 = struct.Struct("!I").unpack_from
_le16 = struct.Struct("<H").unpack_from
_le32 = struct.Struct("<I").unpack_from

# (version, src, dst, proto, ip_len, l4 captured bytes, l4_len claimed, hdr_ok)
IpPacket = tuple


class Decoder:
    """Decode frames to IP packets and reassemble fragments (see the module doc).

    ``frag_timeout`` drops fragments whose datagram is not whole after that many
    seconds; ``max_frag_sets`` bounds the datagrams held at once.
    """

    def __init__(self, frag_timeout: float = 60.0, max_frag_sets: int = 10000) -> None:
        self.frag_timeout = frag_timeout
        self.max_frag_sets = max_frag_sets
        self._frags: dict[tuple, _FragSet] = {}
        self.reassembled = 0
        self.frags_dropped = 0
        self._depth = 0  # tunnels opened around the packet being decoded

    def decode(self, link: int, data: bytes, wire: int, ts: float):
        """One frame to an :data:`IpPacket` tuple, or a ``SKIP_*`` code."""
        n = len(data)
        if link == 1:
            if n < 14:
                return SKIP_CUT
            et = _u16(data, 12)[0]
            off = 14
        elif link in (101, 12, 14, 228, 229):
            return self._ip_by_version(data, 0, wire, ts)
        elif link == 113:
            if n < 16:
                return SKIP_CUT
            et = _u16(data, 14)[0]
            off = 16
        elif link == 276:
            if n < 20:
                return SKIP_CUT
            et = _u16(data, 0)[0]
            off = 20
        elif link == 0 or link == 108:
            if n < 4:
                return SKIP_CUT
            fam = _u32(data, 0)[0] if link == 108 else _le32(data, 0)[0]
            if fam > 0xFFFF:
                fam = _u32(data, 0)[0]
            if fam == 2:
                return self._ip4(data, 4, wire - 4, ts)
            if fam in (10, 24, 28, 30):
                return self._ip6(data, 4, wire - 4, ts)
            return SKIP_NON_IP
        elif link == 127:
            if n < 4:
                return SKIP_CUT
            rlen = _le16(data, 2)[0]
            return self._wifi(data, rlen, wire, ts)
        elif link == 105:
            return self._wifi(data, 0, wire, ts)
        elif link == 9 or link == 50:
            off = 2 if data[:2] == b"\xff\x03" else 0
            return self._ppp(data, off, wire, ts)
        else:
            return SKIP_LINK
        return self._ether(data, et, off, wire, ts)

    def _ether(self, data: bytes, et: int, off: int, wire: int, ts: float):
        n = len(data)
        while True:
            if et == 0x0800:
                return self._ip4(data, off, wire - off, ts)
            if et == 0x86DD:
                return self._ip6(data, off, wire - off, ts)
            if et in (0x8100, 0x88A8, 0x9100, 0x9200):
                if n < off + 4:
                    return SKIP_CUT
                et = _u16(data, off + 2)[0]
                off += 4
                continue
            if et in (0x8847, 0x8848):
                while True:
                    if n < off + 4:
                        return SKIP_CUT
                    bottom = data[off + 2] & 1
                    off += 4
                    if bottom:
                        break
                return self._ip_by_version(data, off, wire, ts)
            if et == 0x8864:
                if n < off + 8:
                    return SKIP_CUT
                return self._ppp(data, off + 6, wire, ts)
            return SKIP_NON_IP

    def _ppp(self, data: bytes, off: int, wire: int, ts: float):
        if len(data) < off + 2:
            return SKIP_CUT
        proto = _u16(data, off)[0]
        if proto == 0x0021:
            return self._ip4(data, off + 2, wire - off - 2, ts)
        if proto == 0x0057:
            return self._ip6(data, off + 2, wire - off - 2, ts)
        return SKIP_NON_IP

    def _wifi(self, data: bytes, off: int, wire: int, ts: float):
        n = len(data)
        if n < off + 24:
            return SKIP_CUT
        fc0, fc1 = data[off], data[off + 1]
        if (fc0 >> 2) & 3 != 2:  # not a data frame
            return SKIP_NON_IP
        if fc1 & 0x40:  # protected: the payload is encrypted
            return SKIP_NON_IP
        subtype = fc0 >> 4
        if subtype & 0x4:  # null function: no payload
            return SKIP_NON_IP
        hlen = 24
        if fc1 & 3 == 3:
            hlen += 6
        if subtype & 0x8:  # QoS data
            hlen += 2
            if fc1 & 0x80:  # +HTC
                hlen += 4
        off += hlen
        if n < off + 8:
            return SKIP_CUT
        if data[off : off + 3] != b"\xaa\xaa\x03":
            return SKIP_NON_IP
        return self._ether(data, _u16(data, off + 6)[0], off + 8, wire, ts)

    def _ip_by_version(self, data: bytes, off: int, wire: int, ts: float):
        if len(data) <= off:
            return SKIP_CUT
        version = data[off] >> 4
        if version == 4:
            return self._ip4(data, off, wire - off, ts)
        if version == 6:
            return self._ip6(data, off, wire - off, ts)
        return SKIP_NON_IP

    def _ip4(self, data: bytes, off: int, wire: int, ts: float):
        if len(data) < off + 20:
            return SKIP_CUT
        vhl = data[off]
        ihl = (vhl & 0x0F) << 2
        if vhl >> 4 != 4 or ihl < 20:
            return SKIP_BOGUS
        total, ident, frag = struct.unpack_from("!HHH", data, off + 2)
        if total == 0:  # segmentation offload: the header leaves it to the frame
            total = wire
        if total < ihl:
            return SKIP_BOGUS
        if total > wire:
            return SKIP_WIRE
        if len(data) < off + ihl:
            return SKIP_CUT
        proto = data[off + 9]
        src = data[off + 12 : off + 16]
        dst = data[off + 16 : off + 20]
        start = off + ihl
        end = off + total
        if proto in _TUNNELS and not frag & 0x3FFF and self._depth < 4:
            return self._tunnel(proto, data[start:end], ts)
        if frag & 0x3FFF:
            whole = self._fragment(
                (4, src, dst, ident, proto),
                (frag & 0x1FFF) << 3,
                bool(frag & 0x2000),
                data[start:end],
                total - ihl,
                ts,
            )
            if whole is None:
                return SKIP_FRAGMENT
            payload = whole
            total = ihl + len(payload)
            if proto in _TUNNELS and self._depth < 4:
                return self._tunnel(proto, payload, ts)
            return (4, src, dst, proto, total, payload, len(payload))
        return (4, src, dst, proto, total, data[start:end], total - ihl)

    def _ip6(self, data: bytes, off: int, wire: int, ts: float):
        n = len(data)
        if n < off + 40:
            return SKIP_CUT
        if data[off] >> 4 != 6:
            return SKIP_BOGUS
        plen = _u16(data, off + 4)[0]
        nh = data[off + 6]
        src = data[off + 8 : off + 24]
        dst = data[off + 24 : off + 40]
        total = 40 + plen
        if total > wire:
            return SKIP_WIRE
        pos = off + 40
        end = off + total
        while nh in _EXT or nh == 44 or nh == 51:
            if n < pos + 8:
                return SKIP_CUT
            if nh == 44:
                fo = _u16(data, pos + 2)[0]
                ident = _u32(data, pos + 4)[0]
                inner = data[pos]
                body = data[pos + 8 : end]
                claimed = end - pos - 8
                whole = self._fragment(
                    (6, src, dst, ident, inner),
                    fo & 0xFFF8,
                    bool(fo & 1),
                    body,
                    claimed,
                    ts,
                )
                if whole is None:
                    return SKIP_FRAGMENT
                # The reassembled datagram has no fragment header; its later
                # extension headers (if any) are walked below.
                data = data[:pos] + whole
                n = len(data)
                total = pos - off + len(whole)
                end = off + total
                nh = inner
                continue
            hlen = (data[pos + 1] + 2) << 2 if nh == 51 else (data[pos + 1] + 1) << 3
            nh = data[pos]
            pos += hlen
            if pos > end:
                return SKIP_BOGUS
        if nh in _TUNNELS and self._depth < 4:
            return self._tunnel(nh, data[pos:end], ts)
        return (6, src, dst, nh, total, data[pos:end], end - pos)

    def udp_tunnel(self, port: int, body: bytes, ts: float):
        """The inner packet of a VXLAN (4789), Geneve (6081) or GTP-U (2152)
        datagram, a ``SKIP_*`` code, or None when the body is not that tunnel."""
        if self._depth >= 4:
            return None
        n = len(body)
        self._depth += 1
        try:
            if port == 4789:
                if n < 8 + 14 or not body[0] & 0x08:
                    return None
                return self._ether(body, _u16(body, 20)[0], 22, n, ts)
            if port == 6081:
                if n < 8 or body[0] >> 6 != 0:
                    return None
                off = 8 + ((body[0] & 0x3F) << 2)
                ptype = _u16(body, 2)[0]
                if ptype == 0x6558 and n >= off + 14:
                    return self._ether(body, _u16(body, off + 12)[0], off + 14, n, ts)
                if ptype in (0x0800, 0x86DD):
                    return self._ether(body, ptype, off, n, ts)
                return None
            # GTPv1-U: a G-PDU carries an IP packet after its 8-byte header, plus 4
            # bytes when any of E, S, PN is set, plus extension headers.
            if n < 8 or body[0] >> 5 != 1 or body[1] != 0xFF:
                return None
            off = 8
            if body[0] & 0x07:
                off += 4
                nxt = body[off - 1] if body[0] & 0x04 else 0
                while nxt and n > off:
                    ext_len = body[off] * 4
                    if ext_len == 0 or n < off + ext_len:
                        return SKIP_CUT
                    nxt = body[off + ext_len - 1]
                    off += ext_len
            return self._ip_by_version(body, off, n, ts)
        finally:
            self._depth -= 1

    def _tunnel(self, proto: int, inner: bytes, ts: float):
        """Open IP-in-IP, IPv6-in-IP and GRE: the inner packet is what is metered.

        Zeek logs the inner connections of these tunnels (the tunnel itself goes to
        its tunnel log, not to conn.log), so the outer packet is not counted.
        """
        self._depth += 1
        try:
            n = len(inner)
            if proto == 4:
                return self._ip4(inner, 0, n, ts)
            if proto == 41:
                return self._ip6(inner, 0, n, ts)
            # GRE: flags and version, protocol, then the optional fields.
            if n < 4:
                return SKIP_CUT
            flags, ptype = struct.unpack_from("!HH", inner, 0)
            version = flags & 7
            off = 4 + (4 if flags & 0x8000 else 0) + (4 if flags & 0x2000 else 0)
            off += 4 if flags & 0x1000 else 0
            if version == 1:
                off += 4 if flags & 0x0080 else 0  # enhanced GRE (PPTP) ack number
                if ptype != 0x880B:
                    return SKIP_OTHER
                if inner[off : off + 2] == b"\xff\x03":
                    off += 2
                return self._ppp(inner, off, n, ts)
            if version != 0:
                return SKIP_OTHER
            if n < off:
                return SKIP_CUT
            if ptype == 0x0800:
                return self._ip4(inner, off, n - off, ts)
            if ptype == 0x86DD:
                return self._ip6(inner, off, n - off, ts)
            if ptype == 0x6558:  # transparent Ethernet bridging
                if n < off + 14:
                    return SKIP_CUT
                return self._ether(inner, _u16(inner, off + 12)[0], off + 14, n, ts)
            if ptype == 0x88BE:  # ERSPAN type II: an 8-byte header, then Ethernet
                if n < off + 22:
                    return SKIP_CUT
                return self._ether(inner, _u16(inner, off + 20)[0], off + 22, n, ts)
            return SKIP_OTHER
        finally:
            self._depth -= 1

    def _fragment(
        self, key: tuple, foff: int, more: bool, body: bytes, claimed: int, ts: float
    ):
        """Add one fragment; the whole payload once every piece is there, else None."""
        if len(body) < claimed:
            # A fragment cut by the snap length can never complete its datagram.
            self.frags_dropped += 1
            return None
        fs = self._frags.get(key)
        if fs is not None and ts - fs.first > self.frag_timeout:
            del self._frags[key]
            self.frags_dropped += len(fs.pieces)
            fs = None
        if fs is None:
            if len(self._frags) >= self.max_frag_sets:
                self._expire(ts)
            fs = self._frags[key] = _FragSet(ts)
        fs.pieces[foff] = body
        if not more:
            fs.end = foff + len(body)
        if fs.end is None:
            return None
        # Whole when the pieces cover 0..end without a hole.
        at = 0
        for start in sorted(fs.pieces):
            if start > at:
                return None
            at = max(at, start + len(fs.pieces[start]))
        if at < fs.end:
            return None
        out = bytearray(fs.end)
        for start in sorted(fs.pieces):
            piece = fs.pieces[start][: max(0, fs.end - start)]
            out[start : start + len(piece)] = piece
        del self._frags[key]
        self.reassembled += 1
        return bytes(out)

    def _expire(self, ts: float) -> None:
        """Drop timed-out fragment sets, or the oldest half when none has timed out."""
        old = [k for k, v in self._frags.items() if ts - v.first > self.frag_timeout]
        if not old:
            ordered = sorted(self._frags, key=lambda k: self._frags[k].first)
            old = ordered[: len(ordered) // 2 + 1]
        for key in old:
            self.frags_dropped += len(self._frags.pop(key).pieces)


class _FragSet:
    """The fragments of one datagram seen so far."""

    __slots__ = ("first", "pieces", "end")

    def __init__(self, first: float) -> None:
        self.first = first
        self.pieces: dict[int, bytes] = {}
        self.end: int | None = None
