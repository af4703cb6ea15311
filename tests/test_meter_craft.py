"""Packet and capture builders for the flow meter's tests (no tests in here).

Everything is built with :mod:`struct` from the protocol layouts, with real
checksums, so the tests can state what each packet holds and what the meter must
count, independently of the meter's own decoder.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

A4, B4, C4 = "10.0.0.1", "10.0.0.2", "192.168.1.9"
A6, B6 = "2001:db8::1", "2001:db8::2"


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _addr(ip: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)


def _pseudo(src: str, dst: str, proto: int, length: int) -> bytes:
    if ":" in src:
        return _addr(src) + _addr(dst) + struct.pack("!IxxxB", length, proto)
    return _addr(src) + _addr(dst) + struct.pack("!BBH", 0, proto, length)


def tcp(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: str,
    payload: bytes = b"",
    win: int = 65535,
    options: bytes = b"",
) -> bytes:
    """A TCP segment with a right checksum; ``flags`` as letters from ``FSRPA``."""
    bits = sum({"F": 1, "S": 2, "R": 4, "P": 8, "A": 16}[f] for f in flags)
    hlen = 20 + len(options)
    head = (
        struct.pack(
            "!HHIIBBHHH",
            sport,
            dport,
            seq & 0xFFFFFFFF,
            ack & 0xFFFFFFFF,
            (hlen // 4) << 4,
            bits,
            win,
            0,
            0,
        )
        + options
    )
    seg = head + payload
    ck = _csum(_pseudo(src, dst, 6, len(seg)) + seg)
    return seg[:16] + struct.pack("!H", ck) + seg[18:]


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """A UDP datagram with a right checksum."""
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ck = _csum(_pseudo(src, dst, 17, len(seg)) + seg) or 0xFFFF
    return seg[:6] + struct.pack("!H", ck) + seg[8:]


def icmp(
    itype: int,
    code: int,
    payload: bytes,
    src: str | None = None,
    dst: str | None = None,
) -> bytes:
    """An ICMP (or, given IPv6 addresses, ICMPv6) message with a right checksum."""
    msg = struct.pack("!BBHI", itype, code, 0, 0x12340001) + payload
    if src and ":" in src:
        ck = _csum(_pseudo(src, dst, 58, len(msg)) + msg)
    else:
        ck = _csum(msg)
    return msg[:2] + struct.pack("!H", ck) + msg[4:]


def ip4(
    src: str,
    dst: str,
    proto: int,
    payload: bytes,
    ident: int = 1,
    frag: int = 0,
    ttl: int = 64,
) -> bytes:
    """An IPv4 packet (``frag`` = flags and offset field) with a right checksum."""
    head = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(payload),
        ident,
        frag,
        ttl,
        proto,
        0,
        _addr(src),
        _addr(dst),
    )
    head = head[:10] + struct.pack("!H", _csum(head)) + head[12:]
    return head + payload


def ip6(
    src: str, dst: str, nh: int, payload: bytes, ext: list[tuple[int, bytes]] = ()
) -> bytes:
    """An IPv6 packet; ``ext`` = [(header type, 6+8k bytes of body)] before payload."""
    chain = b""
    types = [t for t, _ in ext] + [nh]
    for i, (_, body) in enumerate(ext):
        chain += bytes([types[i + 1], (len(body) + 2) // 8 - 1]) + body
    first = types[0]
    return (
        struct.pack(
            "!IHBB16s16s",
            6 << 28,
            len(chain) + len(payload),
            first,
            64,
            _addr(src),
            _addr(dst),
        )
        + chain
        + payload
    )


def eth(
    l3: bytes,
    ethertype: int | None = None,
    vlans: tuple[int, ...] = (),
    outer_tpid: int = 0x88A8,
) -> bytes:
    """An Ethernet II frame, with 802.1Q/802.1ad tags when ``vlans`` are given."""
    if ethertype is None:
        ethertype = 0x86DD if l3[0] >> 4 == 6 else 0x0800
    head = b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01"
    if not vlans:
        return head + struct.pack("!H", ethertype) + l3
    # Each tag is its TPID then the VLAN id; the innermost is followed by the
    # payload's ethertype. The outer TPID of a stack is 802.1ad's (QinQ).
    tpids = [outer_tpid if len(vlans) > 1 else 0x8100] + [0x8100] * (len(vlans) - 1)
    tags = b"".join(struct.pack("!HH", t, v) for t, v in zip(tpids, vlans, strict=True))
    return head + tags + struct.pack("!H", ethertype) + l3


def write_pcap(
    path: Path,
    frames: list[tuple[float, bytes] | tuple[float, bytes, int]],
    link: int = 1,
    nano: bool = False,
    big: bool = False,
    snaplen: int = 65535,
) -> Path:
    """A classic pcap file; each frame is (ts, bytes[, wire length])."""
    o = ">" if big else "<"
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = [struct.pack(o + "IHHiIII", magic, 2, 4, 0, 0, snaplen, link)]
    for item in frames:
        ts, data = item[0], item[1]
        wire = item[2] if len(item) > 2 else len(data)
        sec = int(ts)
        frac = round((ts - sec) * (1e9 if nano else 1e6))
        out.append(struct.pack(o + "IIII", sec, frac, len(data), wire) + data)
    path.write_bytes(b"".join(out))
    return path


def _block(btype: int, body: bytes, o: str = "<") -> bytes:
    body += b"\0" * (-len(body) % 4)
    n = len(body) + 12
    return struct.pack(o + "II", btype, n) + body + struct.pack(o + "I", n)


def pcapng_shb(o: str = "<") -> bytes:
    """A section header block."""
    return _block(0x0A0D0D0A, struct.pack(o + "IHHq", 0x1A2B3C4D, 1, 0, -1), o)


def pcapng_idb(
    link: int, snaplen: int = 0, tsresol: int | None = None, o: str = "<"
) -> bytes:
    """An interface description block, with an if_tsresol option when given."""
    body = struct.pack(o + "HHI", link, 0, snaplen)
    if tsresol is not None:
        body += struct.pack(o + "HH", 9, 1) + bytes([tsresol]) + b"\0\0\0"
        body += struct.pack(o + "HH", 0, 0)
    return _block(1, body, o)


def pcapng_epb(
    iface: int, ts_units: int, data: bytes, wire: int | None = None, o: str = "<"
) -> bytes:
    """An enhanced packet block; ``ts_units`` in the interface's time resolution."""
    body = (
        struct.pack(
            o + "IIIII",
            iface,
            ts_units >> 32,
            ts_units & 0xFFFFFFFF,
            len(data),
            wire or len(data),
        )
        + data
    )
    return _block(6, body, o)


def pcapng_spb(data: bytes, wire: int | None = None, o: str = "<") -> bytes:
    """A simple packet block (interface 0, no time stamp)."""
    return _block(3, struct.pack(o + "I", wire or len(data)) + data, o)


def handshake(
    src: str = A4,
    dst: str = B4,
    sport: int = 40000,
    dport: int = 80,
    t0: float = 1000.0,
    request: bytes = b"GET / HTTP/1.0\r\n\r\n",
    reply: bytes = b"HTTP/1.0 200 OK\r\n\r\nhello",
) -> list[tuple[float, bytes]]:
    """A whole TCP connection (SYN, SYN-ACK, ACK, data both ways, FINs), as IP."""
    mk = ip6 if ":" in src else ip4

    def proto_ip(s, d, seg):
        return mk(s, d, 6, seg)

    x, y = 1000, 5000
    segs = [
        (0.0, src, dst, sport, dport, x, 0, "S", b""),
        (0.01, dst, src, dport, sport, y, x + 1, "SA", b""),
        (0.02, src, dst, sport, dport, x + 1, y + 1, "A", b""),
        (0.03, src, dst, sport, dport, x + 1, y + 1, "PA", request),
        (0.04, dst, src, dport, sport, y + 1, x + 1 + len(request), "PA", reply),
        (
            0.05,
            src,
            dst,
            sport,
            dport,
            x + 1 + len(request),
            y + 1 + len(reply),
            "FA",
            b"",
        ),
        (
            0.06,
            dst,
            src,
            dport,
            sport,
            y + 1 + len(reply),
            x + 2 + len(request),
            "FA",
            b"",
        ),
        (
            0.07,
            src,
            dst,
            sport,
            dport,
            x + 2 + len(request),
            y + 2 + len(reply),
            "A",
            b"",
        ),
    ]
    return [
        (t0 + dt, proto_ip(s, d, tcp(s, d, sp, dp, sq, ak, fl, pl)))
        for dt, s, d, sp, dp, sq, ak, fl, pl in segs
    ]
