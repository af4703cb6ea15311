"""Capture formats and link layers: every container and encapsulation the meter reads.

Each test writes a capture from packets built in ``test_meter_craft`` and checks the
flows against values worked out from those packets by hand (lengths, counts, Zeek's
history letters), not against the meter's own decoder.
"""

from __future__ import annotations

import struct

import pytest

from flows.meter import read_capture
from tests.test_meter_craft import (
    A4,
    A6,
    B4,
    B6,
    C4,
    eth,
    handshake,
    icmp,
    ip4,
    ip6,
    pcapng_epb,
    pcapng_idb,
    pcapng_shb,
    pcapng_spb,
    udp,
    write_pcap,
)

REQ = b"GET / HTTP/1.0\r\n\r\n"
REP = b"HTTP/1.0 200 OK\r\n\r\nhello"


def rows(result) -> list[dict]:
    """The flows of a result as dicts, in time order."""
    return sorted(result.table.to_pylist(), key=lambda r: (r["ts"], r["src_port"]))


def expect_handshake(rec: dict, ip_hdr: int = 20, src: str = A4, dst: str = B4) -> None:
    """The fields Zeek gives the connection that :func:`handshake` builds."""
    assert (rec["src_ip"], rec["src_port"], rec["dst_ip"], rec["dst_port"]) == (
        src,
        40000,
        dst,
        80,
    )
    assert rec["proto"] == "tcp"
    assert rec["history"] == "ShADdFf"
    assert rec["conn_state"] == "SF"
    assert rec["orig_bytes"] == len(REQ) and rec["resp_bytes"] == len(REP)
    assert rec["orig_pkts"] == 5 and rec["resp_pkts"] == 3
    assert rec["orig_ip_bytes"] == 5 * (ip_hdr + 20) + len(REQ)
    assert rec["resp_ip_bytes"] == 3 * (ip_hdr + 20) + len(REP)
    # Zeek stops the clock once both sides have sent their FIN: the last ACK (at
    # +0.07 s) is counted but does not lengthen the connection.
    assert rec["duration"] == pytest.approx(0.06, abs=2e-6)
    assert rec["missed_bytes"] == 0


@pytest.mark.parametrize("nano", [False, True], ids=["usec", "nsec"])
@pytest.mark.parametrize("big", [False, True], ids=["little", "big"])
def test_pcap_magic_and_byte_order(tmp_path, nano, big):
    frames = [(t, eth(p)) for t, p in handshake()]
    path = write_pcap(tmp_path / "c.pcap", frames, nano=nano, big=big)
    res = read_capture(path)
    assert res.format == "pcap" and res.family == "conn" and not res.partial
    (rec,) = rows(res)
    expect_handshake(rec)
    assert rec["ts"] == pytest.approx(1000.0, abs=1e-6)
    assert res.stats["packets"] == 8 and res.stats["link_types"] == {"ethernet": 8}


def test_nanosecond_times_keep_their_precision(tmp_path):
    a = udp(A4, B4, 5000, 53, b"q")
    b = udp(B4, A4, 53, 5000, b"answer")
    frames = [(1.000000001, ip4(A4, B4, 17, a)), (1.000000251, ip4(B4, A4, 17, b))]
    res = read_capture(write_pcap(tmp_path / "n.pcap", frames, link=101, nano=True))
    (rec,) = rows(res)
    assert rec["duration"] == pytest.approx(250e-9, abs=2e-9)


def test_pcapng_interfaces_with_different_link_types(tmp_path):
    # Interface 0: Ethernet (microseconds); 1: raw IP (nanoseconds); 2: Linux SLL2.
    hs = handshake()
    u = ip4(C4, B4, 17, udp(C4, B4, 6000, 53, b"x" * 10))
    u6 = ip6(A6, B6, 17, udp(A6, B6, 7000, 123, b"y" * 48))
    sll2 = struct.pack("!HHIHBB8s", 0x86DD, 0, 2, 1, 0, 6, b"\x02" * 6 + b"\0\0")
    blob = pcapng_shb() + pcapng_idb(1) + pcapng_idb(101, tsresol=9) + pcapng_idb(276)
    for t, pkt in hs:
        blob += pcapng_epb(0, round(t * 1e6), eth(pkt))
    blob += pcapng_epb(1, round(2000.5 * 1e9), u)
    blob += pcapng_epb(2, round(3000.25 * 1e6), sll2 + u6)
    blob += pcapng_spb(eth(ip4(C4, B4, 17, udp(C4, B4, 6001, 53, b"z" * 3))))
    path = tmp_path / "multi.pcapng"
    path.write_bytes(blob)
    res = read_capture(path)
    assert res.format == "pcapng" and not res.partial
    assert res.stats["link_types"] == {"ethernet": 9, "raw": 1, "linux_sll2": 1}
    recs = rows(res)
    spb = [r for r in recs if r["src_port"] == 6001]
    assert len(spb) == 1 and spb[0]["orig_ip_bytes"] == 20 + 8 + 3
    assert spb[0]["ts"] == 0.0  # a simple packet block carries no time
    expect_handshake(next(r for r in recs if r["proto"] == "tcp"))
    raw = next(r for r in recs if r["src_port"] == 6000)
    assert raw["ts"] == pytest.approx(2000.5) and raw["orig_ip_bytes"] == 38
    v6 = next(r for r in recs if r["src_port"] == 7000)
    assert v6["src_ip"] == A6 and v6["ts"] == pytest.approx(3000.25)
    assert v6["orig_ip_bytes"] == 40 + 8 + 48 and v6["conn_state"] == "S0"


def test_pcapng_big_endian_section(tmp_path):
    o = ">"
    blob = pcapng_shb(o) + pcapng_idb(1, o=o)
    for t, pkt in handshake():
        blob += pcapng_epb(0, round(t * 1e6), eth(pkt), o=o)
    path = tmp_path / "be.pcapng"
    path.write_bytes(blob)
    (rec,) = rows(read_capture(path))
    expect_handshake(rec)


def _u(payload: bytes = b"hello") -> bytes:
    return ip4(A4, B4, 17, udp(A4, B4, 33000, 53, payload))


def _wifi_data(l3: bytes, qos: bool) -> bytes:
    fc = bytes([0x88 if qos else 0x08, 0x01])  # data (QoS data), to-DS
    hdr = fc + b"\0\0" + b"\x01" * 6 + b"\x02" * 6 + b"\x03" * 6 + b"\0\0"
    if qos:
        hdr += b"\0\0"
    return hdr + b"\xaa\xaa\x03\0\0\0\x08\x00" + l3


LINKS = {
    "null-le": (0, struct.pack("<I", 2) + _u()),
    "null-be": (0, struct.pack(">I", 2) + _u()),
    "loop": (108, struct.pack(">I", 2) + _u()),
    "sll": (113, struct.pack("!HHH8sH", 0, 1, 6, b"\x02" * 6 + b"\0\0", 0x0800) + _u()),
    "sll2": (276, struct.pack("!HHIHBB8s", 0x0800, 0, 2, 1, 0, 6, b"\x02" * 8) + _u()),
    "raw101": (101, _u()),
    "raw12": (12, _u()),
    "raw14": (14, _u()),
    "ipv4-228": (228, _u()),
    "vlan": (1, eth(_u(), vlans=(10,))),
    "qinq": (1, eth(_u(), vlans=(100, 10))),
    "mpls": (
        1,
        eth(
            struct.pack("!II", (16 << 12) | 64, (17 << 12) | 0x100 | 64) + _u(),
            ethertype=0x8847,
        ),
    ),
    "mpls-in-vlan": (
        1,
        eth(
            struct.pack("!I", (16 << 12) | 0x100 | 64) + _u(),
            ethertype=0x8847,
            vlans=(7,),
        ),
    ),
    "pppoe": (
        1,
        eth(
            struct.pack("!BBHHH", 0x11, 0, 0x1234, len(_u()) + 2, 0x0021) + _u(),
            ethertype=0x8864,
        ),
    ),
    "ieee802_11": (105, _wifi_data(_u(), qos=False)),
    "radiotap": (127, struct.pack("<BBHI", 0, 0, 8, 0) + _wifi_data(_u(), qos=True)),
}


@pytest.mark.parametrize("name", sorted(LINKS))
def test_link_types_and_encapsulations(tmp_path, name):
    link, frame = LINKS[name]
    res = read_capture(write_pcap(tmp_path / f"{name}.pcap", [(5.0, frame)], link=link))
    assert not res.partial, res.warnings
    (rec,) = rows(res)
    assert (rec["src_ip"], rec["src_port"], rec["dst_ip"], rec["dst_port"]) == (
        A4,
        33000,
        B4,
        53,
    )
    assert rec["orig_pkts"] == 1 and rec["orig_ip_bytes"] == 20 + 8 + 5
    assert rec["history"] == "D" and rec["conn_state"] == "S0"
    assert rec["duration"] is None and rec["orig_bytes"] is None  # Zeek: 0 s, unset


def test_ipv6_extension_headers(tmp_path):
    hbh = b"\x01\x04\0\0\0\0"  # PadN filling the 8-byte hop-by-hop header
    dest = b"\x01\x0c" + b"\0" * 12  # a 16-byte destination options header
    pkts = []
    for t, p in handshake(A6, B6):
        inner = p[40:]
        src, dst = p[8:24], p[24:40]
        s = A6 if src == ip6(A6, B6, 6, b"")[8:24] else B6
        d = B6 if s == A6 else A6
        pkts.append((t, eth(ip6(s, d, 6, inner, ext=[(0, hbh), (60, dest)]))))
        assert dst
    (rec,) = rows(read_capture(write_pcap(tmp_path / "ext.pcap", pkts)))
    expect_handshake(rec, ip_hdr=40 + 8 + 16, src=A6, dst=B6)


def test_ipv4_fragments_are_reassembled_out_of_order(tmp_path):
    payload = bytes(range(256)) * 10  # 2560 bytes of UDP payload
    dgram = udp(A4, B4, 4444, 5555, payload)
    pieces = [dgram[0:1024], dgram[1024:2048], dgram[2048:]]
    frames = []
    order = [2, 0, 1]
    for k, i in enumerate(order):
        more = 0x2000 if i < 2 else 0
        frames.append(
            (
                10.0 + k * 0.001,
                eth(ip4(A4, B4, 17, pieces[i], ident=77, frag=more | (i * 128))),
            )
        )
    # A lone non-first fragment of another datagram must never become a flow.
    frames.append(
        (10.5, eth(ip4(A4, C4, 17, dgram[1024:1100], ident=78, frag=0x2000 | 128)))
    )
    res = read_capture(write_pcap(tmp_path / "frag.pcap", frames))
    (rec,) = rows(res)
    assert (rec["src_port"], rec["dst_port"]) == (4444, 5555)
    assert rec["orig_pkts"] == 1 and rec["orig_ip_bytes"] == 20 + 8 + len(payload)
    assert res.stats["fragments_reassembled"] == 1
    assert res.stats["skipped"]["fragments_held"] == 3


def test_ipv6_fragments_are_reassembled(tmp_path):
    payload = b"q" * 1500
    dgram = udp(A6, B6, 5353, 53, payload)
    first, second = dgram[:1000], dgram[1000:]
    frames = [
        (1.0, eth(ip6(A6, B6, 17, first, ext=[(44, struct.pack("!HI", 1, 9))]))),
        (1.001, eth(ip6(A6, B6, 17, second, ext=[(44, struct.pack("!HI", 1000, 9))]))),
    ]
    (rec,) = rows(read_capture(write_pcap(tmp_path / "f6.pcap", frames)))
    assert (rec["src_port"], rec["dst_port"], rec["orig_pkts"]) == (5353, 53, 1)
    assert rec["orig_ip_bytes"] == 40 + len(dgram)


def test_icmp_type_and_code_in_the_port_fields(tmp_path):
    ping = icmp(8, 0, b"p" * 56)
    pong = icmp(0, 0, b"p" * 56)
    unreach = icmp(3, 1, ip4(A4, C4, 17, udp(A4, C4, 1, 2, b""))[:28])
    ping6 = icmp(128, 0, b"r" * 32, A6, B6)
    pong6 = icmp(129, 0, b"r" * 32, B6, A6)
    frames = [
        (1.0, eth(ip4(A4, B4, 1, ping))),
        (1.5, eth(ip4(B4, A4, 1, pong))),
        (2.0, eth(ip4(B4, A4, 1, unreach))),
        (3.0, eth(ip6(A6, B6, 58, ping6))),
        (3.25, eth(ip6(B6, A6, 58, pong6))),
    ]
    recs = rows(read_capture(write_pcap(tmp_path / "icmp.pcap", frames)))
    assert len(recs) == 3
    echo, unr, echo6 = recs
    assert (echo["src_ip"], echo["src_port"], echo["dst_port"]) == (A4, 8, 0)
    assert echo["orig_bytes"] == 56 and echo["resp_bytes"] == 56
    assert echo["orig_pkts"] == echo["resp_pkts"] == 1
    assert echo["conn_state"] == "OTH" and echo["history"] is None
    assert echo["duration"] == pytest.approx(0.5)
    assert (unr["src_ip"], unr["src_port"], unr["dst_port"]) == (B4, 3, 1)
    assert (echo6["src_ip"], echo6["src_port"], echo6["dst_port"]) == (A6, 128, 129)
    assert echo6["orig_ip_bytes"] == 40 + 8 + 32 and echo6["resp_bytes"] == 32


def test_snap_length_cut_packets_count_their_original_lengths(tmp_path):
    body = b"b" * 1400
    hs = handshake(request=body)
    snap = 96
    frames = []
    for t, p in hs:
        frame = eth(p)
        frames.append((t, frame[:snap], len(frame)))
    res = read_capture(write_pcap(tmp_path / "snap.pcap", frames, snaplen=snap))
    assert not res.partial  # cut at the snap length the header announces: no damage
    (rec,) = rows(res)
    assert rec["orig_ip_bytes"] == 5 * 40 + len(body)
    assert rec["orig_bytes"] == len(body)  # from sequence numbers
    assert rec["missed_bytes"] == len(body) - (snap - 14 - 40)  # never captured
    assert res.stats["snap_cut_packets"] == 1  # only the request is longer


@pytest.mark.parametrize("kind", ["ipip", "ip6in4", "gre-ip", "gre-eth", "gre-key"])
def test_ip_tunnels_meter_the_inner_connection(tmp_path, kind):
    inner4 = _u()
    outer_a, outer_b = "198.51.100.1", "198.51.100.2"
    if kind == "ipip":
        pkt = ip4(outer_a, outer_b, 4, inner4)
    elif kind == "ip6in4":
        inner = ip6(A6, B6, 17, udp(A6, B6, 33000, 53, b"hello"))
        pkt = ip4(outer_a, outer_b, 41, inner)
    elif kind == "gre-ip":
        pkt = ip4(outer_a, outer_b, 47, struct.pack("!HH", 0, 0x0800) + inner4)
    elif kind == "gre-eth":
        pkt = ip4(outer_a, outer_b, 47, struct.pack("!HH", 0, 0x6558) + eth(inner4))
    else:  # GRE with checksum and key fields present
        gre = struct.pack("!HHHHI", 0xA000, 0x0800, 0, 0, 42)
        pkt = ip4(outer_a, outer_b, 47, gre + inner4)
    res = read_capture(write_pcap(tmp_path / f"{kind}.pcap", [(1.0, eth(pkt))]))
    (rec,) = rows(res)
    if kind == "ip6in4":
        assert (rec["src_ip"], rec["dst_ip"]) == (A6, B6)
        assert rec["orig_ip_bytes"] == 40 + 8 + 5
    else:
        assert (rec["src_ip"], rec["dst_ip"]) == (A4, B4)
        assert rec["orig_ip_bytes"] == 20 + 8 + 5
    assert (rec["src_port"], rec["dst_port"], rec["proto"]) == (33000, 53, "udp")


def test_other_ip_protocols_are_unknown_transport_connections(tmp_path):
    # IGMP (2) membership reports, four of them, as a Zeek conn.log shows them:
    # ports 0, proto unknown_transport, bytes 0 (not tracked), OTH, no history.
    report = bytes([0x16, 0, 0xFA, 0x04]) + bytes([224, 0, 0, 22])
    frames = [(1.0 + 0.25 * i, eth(ip4(A4, "224.0.0.22", 2, report))) for i in range(4)]
    res = read_capture(write_pcap(tmp_path / "igmp.pcap", frames))
    (rec,) = rows(res)
    assert (rec["src_ip"], rec["src_port"], rec["dst_ip"], rec["dst_port"]) == (
        A4,
        0,
        "224.0.0.22",
        0,
    )
    assert rec["proto"] == "unknown_transport" and rec["conn_state"] == "OTH"
    assert (rec["orig_pkts"], rec["orig_ip_bytes"]) == (4, 4 * 28)
    assert (rec["orig_bytes"], rec["resp_bytes"], rec["history"]) == (0, 0, None)
    assert rec["duration"] == pytest.approx(0.75)


@pytest.mark.parametrize("port", [4789, 6081, 2152])
def test_udp_tunnels_meter_outer_and_inner(tmp_path, port):
    inner = _u()
    if port == 4789:
        body = struct.pack("!BxxxI", 0x08, 42 << 8) + eth(inner)
    elif port == 6081:
        body = struct.pack("!BBHI", 0, 0, 0x6558, 42 << 8) + eth(inner)
    else:
        body = struct.pack("!BBHI", 0x30, 0xFF, len(inner), 7) + inner
    outer = ip4(
        "198.51.100.1",
        "198.51.100.2",
        17,
        udp("198.51.100.1", "198.51.100.2", 40000, port, body),
    )
    recs = rows(read_capture(write_pcap(tmp_path / "t.pcap", [(1.0, eth(outer))])))
    assert len(recs) == 2
    ports = sorted((r["src_port"], r["dst_port"]) for r in recs)
    assert ports == sorted([(40000, port), (33000, 53)])
    inner_rec = next(r for r in recs if r["dst_port"] == 53)
    assert inner_rec["src_ip"] == A4 and inner_rec["orig_ip_bytes"] == 33


def test_modified_pcap_with_longer_record_headers(tmp_path):
    """The "modified" pcap format (magic 0xa1b2cd34) has 24-byte record headers."""
    out = [struct.pack("<IHHiIII", 0xA1B2CD34, 2, 4, 0, 0, 65535, 1)]
    for t, pkt in handshake():
        frame = eth(pkt)
        sec = int(t)
        out.append(
            struct.pack("<IIII", sec, round((t - sec) * 1e6), len(frame), len(frame))
            + struct.pack("<IHBx", 2, 0x0800, 0)
        )
        out.append(frame)
    path = tmp_path / "kuz.pcap"
    path.write_bytes(b"".join(out))
    res = read_capture(path)
    assert res.format == "pcap" and not res.partial
    (rec,) = rows(res)
    expect_handshake(rec)
