"""The meter's ``service`` column for the protocols of IoT gateways and LANs.

MQTT, Modbus/TCP, DNP3 (TCP and UDP), SMB, MySQL and RDP, each built here field
by field from its specification, put into small captures and metered on both
packet paths: the connection must get the name Zeek writes in conn.log, and near
misses (the right port with other bytes, the protocol's bytes cut short, the
bytes on a port where Zeek does not look) must stay null. The last tests hold
the meter to Zeek's own conn.logs for the Modbus and MySQL reference traces.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from pathlib import Path

import dpkt
import pytest

from flows.meter import read_capture
from flows.meter.service import HEAD_BYTES
from tests.conftest import data_file
from tests.test_meter_service import (
    CASES,
    ENGINES,
    JUNK,
    services,
    tcp_conn,
    tls_client_hello,
    udp_conn,
)
from tests.test_meter_zeek import parse_conn_log

# The names Zeek writes for these protocols: its analyzers' names, lower-cased.
IOT_SERVICES = {"mqtt", "modbus", "dnp3_tcp", "dnp3_udp", "smb", "mysql", "rdp"}
IOT_SERVICES |= {"mysql,ssl"}


# -- MQTT (OASIS MQTT 3.1.1 section 3.1-3.2, MQTT 5.0 section 3.1-3.2) ------------


def varint(n: int) -> bytes:
    """An MQTT variable byte integer: 7 bits a byte, low first, top bit = more."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8(s: bytes) -> bytes:
    """An MQTT string or binary field: a 16-bit length, then the bytes."""
    return struct.pack("!H", len(s)) + s


def mqtt_connect(
    level: int = 4,
    client_id: bytes = b"sensor-17",
    will: tuple[bytes, bytes] | None = None,
    user: bytes | None = None,
    password: bytes | None = None,
    flags_extra: int = 0,
) -> bytes:
    """A CONNECT packet: fixed header, variable header, payload."""
    flags = 0x02 | flags_extra  # clean session
    flags |= 0x04 if will else 0
    flags |= 0x80 if user is not None else 0
    flags |= 0x40 if password is not None else 0
    name = b"MQIsdp" if level == 3 else b"MQTT"
    variable = utf8(name) + bytes([level, flags]) + struct.pack("!H", 60)
    if level == 5:
        props = b"\x11" + struct.pack("!I", 3600)  # session expiry interval
        variable += varint(len(props)) + props
    payload = utf8(client_id)
    if will:
        if level == 5:
            payload += varint(0)  # no will properties
        payload += utf8(will[0]) + utf8(will[1])
    if user is not None:
        payload += utf8(user)
    if password is not None:
        payload += utf8(password)
    body = variable + payload
    return b"\x10" + varint(len(body)) + body


CONNECT = mqtt_connect(4)
CONNACK = b"\x20\x02\x00\x00"  # 3.1.1: no session present, accepted
CONNACK5 = b"\x20\x03\x00\x00\x00"  # 5: success, no properties
PUBLISH = b"\x30\x0c" + utf8(b"t/temp") + b"21.5"


# -- Modbus/TCP (Modbus Messaging on TCP/IP v1.0b, Application Protocol v1.1b3) --


def mbap(tid: int, pdu: bytes, unit: int = 1, pid: int = 0) -> bytes:
    """MBAP header (transaction, protocol, length of unit id + PDU, unit) + PDU."""
    return struct.pack("!HHHB", tid, pid, len(pdu) + 1, unit) + pdu


READ_HOLDING = mbap(1, struct.pack("!BHH", 3, 0x006B, 3))  # 3 registers at 107
READ_HOLDING_REPLY = mbap(1, struct.pack("!BB3H", 3, 6, 0x022B, 0x0000, 0x0064))
WRITE_REGISTERS = mbap(2, struct.pack("!BHHB2H", 16, 1, 2, 4, 10, 258))
WRITE_REGISTER = mbap(3, struct.pack("!BHH", 6, 1, 3))  # register 1 := 3
EXCEPTION_REPLY = mbap(1, b"\x83\x02")  # illegal data address


# -- DNP3 (IEEE 1815 data link layer) ---------------------------------------------


def crc_dnp(data: bytes) -> int:
    """CRC-16/DNP from the CRC catalogue parameters: width 16, polynomial 0x3D65,
    initial 0, input and output reflected, output complemented."""
    reflected = int(f"{0x3D65:016b}"[::-1], 2)
    crc = 0
    for byte in data:
        for bit in range(8):
            mix = (crc ^ (byte >> bit)) & 1
            crc = (crc >> 1) ^ (reflected if mix else 0)
    return crc ^ 0xFFFF


def test_crc_dnp_check_value() -> None:
    """The test's CRC gives the catalogue's check value for '123456789'."""
    assert crc_dnp(b"123456789") == 0xEA82


def dnp3_frame(
    control: int, dest: int, src: int, user_data: bytes, length: int | None = None
) -> bytes:
    """A link frame: 0x05 0x64, length (control, addresses, user data), control,
    addresses (low byte first), header CRC, then user data in 16-byte blocks,
    each followed by its CRC (low byte first)."""
    n = 5 + len(user_data) if length is None else length
    head = struct.pack("<BBBBHH", 0x05, 0x64, n, control, dest, src)
    out = head + struct.pack("<H", crc_dnp(head))
    for i in range(0, len(user_data), 16):
        block = user_data[i : i + 16]
        out += block + struct.pack("<H", crc_dnp(block))
    return out


# Master (DIR=1, PRM=1, unconfirmed user data) reads class 1 data from outstation
# 10: transport FIR|FIN seq 0, application control FIR|FIN, function READ, object
# group 60 variation 2 with qualifier 6 (all).
DNP3_READ = dnp3_frame(0xC4, 10, 1, b"\xc0\xc0\x01\x3c\x02\x06")
# The outstation's reply: RESPONSE with no objects, internal indications 0.
DNP3_REPLY = dnp3_frame(0x44, 1, 10, b"\xc0\xc0\x81\x00\x00")


# -- SMB (RFC 1002 session service, MS-CIFS, MS-SMB2) ------------------------------


def nbss(kind: int, payload: bytes) -> bytes:
    """A NetBIOS session service packet: type, flags (length bit 16), length."""
    return (
        struct.pack("!BBH", kind, len(payload) >> 16, len(payload) & 0xFFFF) + payload
    )


def smb2_negotiate() -> bytes:
    """An SMB2 NEGOTIATE request: 64-byte header then the request body."""
    header = b"\xfeSMB" + struct.pack(
        "<HHIHHIIQIIQ", 64, 0, 0, 0, 1, 0, 0, 0, 0xFEFF, 0, 0
    )
    header += bytes(16)  # signature
    assert len(header) == 64
    body = struct.pack("<HHHHI", 36, 2, 1, 0, 0) + bytes(16) + bytes(8)
    return header + body + struct.pack("<HH", 0x0202, 0x0210)


def smb1_negotiate() -> bytes:
    """An SMB1 NEGOTIATE request: 32-byte header, word count 0, dialects."""
    header = b"\xffSMB" + struct.pack("<BIBH", 0x72, 0, 0x18, 0xC853)
    header += struct.pack("<H8sHHHHH", 0, bytes(8), 0, 0xFFFF, 0xFEFF, 0, 0)
    assert len(header) == 32
    dialects = b"\x02NT LM 0.12\x00"
    return header + b"\x00" + struct.pack("<H", len(dialects)) + dialects


def netbios_name(name: bytes) -> bytes:
    """A first-level encoded NetBIOS name (RFC 1001 section 14.1): 32 letters."""
    padded = name.ljust(16, b" ")
    letters = bytes(b for c in padded for b in (0x41 + (c >> 4), 0x41 + (c & 0xF)))
    return b"\x20" + letters + b"\x00"


SESSION_REQUEST = nbss(0x81, netbios_name(b"SERVER") + netbios_name(b"CLIENT"))
SESSION_OK = nbss(0x82, b"")


# -- MySQL (client/server protocol: packets, Handshake V10, SSL request) ----------


def mysql_packet(seq: int, payload: bytes) -> bytes:
    """A packet: payload length (3 bytes, low first), sequence id, payload."""
    return struct.pack("<I", len(payload))[:3] + bytes([seq]) + payload


def mysql_greeting(version: int = 10, server: bytes = b"8.0.36") -> bytes:
    """The server's Handshake V10 packet (sequence 0)."""
    payload = bytes([version]) + server + b"\x00" + struct.pack("<I", 8)
    payload += b"abcdefgh" + b"\x00"  # auth data part 1, filler
    payload += struct.pack("<HBHHB", 0xFFFF, 255, 2, 0xDFFF, 21) + bytes(10)
    payload += b"ijklmnopqrst\x00" + b"caching_sha2_password\x00"
    return mysql_packet(0, payload)


def mysql_login() -> bytes:
    """The client's handshake response (sequence 1): capabilities, max packet,
    charset, 23 zero bytes, user name."""
    payload = struct.pack("<IIB", 0x000FA685, 1 << 24, 255) + bytes(23) + b"root\x00"
    return mysql_packet(1, payload + b"\x00")


def mysql_ssl_request() -> bytes:
    """The client's SSL request: a handshake response cut after the 23 zero
    bytes, with CLIENT_SSL (0x0800) among the capabilities."""
    return mysql_packet(1, struct.pack("<IIB", 0x000FAE85, 1 << 24, 255) + bytes(23))


# -- RDP (RFC 1006 TPKT, X.224 class 0, MS-RDPBCGR 2.2.1.1-2.2.1.2) ---------------


def tpkt(tpdu: bytes) -> bytes:
    """A TPKT: version 3, reserved 0, length of the whole packet."""
    return struct.pack("!BBH", 3, 0, len(tpdu) + 4) + tpdu


def x224(code: int, dst: int, src: int, data: bytes) -> bytes:
    """An X.224 connection TPDU: length indicator, code, references, class 0."""
    fixed = struct.pack("!BHHB", code, dst, src, 0)
    return bytes([len(fixed) + len(data)]) + fixed + data


NEG_REQ = struct.pack("<BBHI", 1, 0, 8, 3)  # TLS | CredSSP
NEG_RSP = struct.pack("<BBHI", 2, 0, 8, 2)  # CredSSP chosen
RDP_CR = tpkt(x224(0xE0, 0, 0x1234, b"Cookie: mstshash=admin\r\n" + NEG_REQ))
RDP_CR_NO_COOKIE = tpkt(x224(0xE0, 0, 0x1234, NEG_REQ))
RDP_CC = tpkt(x224(0xD0, 0x1234, 0x5678, NEG_RSP))


# -- the cases ----------------------------------------------------------------------

LONG_PASSWORD = b"p" * (HEAD_BYTES + 100)

# case -> (service, connection that must be named so, [near misses that stay null])
IOT_CASES = {
    "mqtt-3.1.1": (
        "mqtt",
        tcp_conn(1883, [mqtt_connect(4), PUBLISH], [CONNACK]),
        [
            tcp_conn(1883, [JUNK], [JUNK]),  # the port alone
            tcp_conn(1883, [mqtt_connect(4)[:20]], []),  # CONNECT cut short
            tcp_conn(1883, [JUNK], [CONNACK]),  # a CONNACK alone: Zeek waits
            # the 3.1.1 protocol name with level 3
            tcp_conn(1883, [mqtt_connect(4).replace(b"MQTT\x04", b"MQTT\x03")], []),
        ],
    ),
    "mqtt-3.1": ("mqtt", tcp_conn(1883, [mqtt_connect(3)], [CONNACK]), []),
    "mqtt-5": (
        "mqtt",
        tcp_conn(
            1883,
            [
                mqtt_connect(
                    5, will=(b"dev/17/status", b"gone"), user=b"u", password=b"pw"
                )
            ],
            [CONNACK5],
        ),
        [
            # level 5 under the 3.1 protocol name
            tcp_conn(1883, [mqtt_connect(5).replace(b"\x04MQTT", b"\x06MQIsdp")], []),
        ],
    ),
    "mqtt-will-and-login": (
        "mqtt",
        # on a port that is not MQTT's: Zeek finds MQTT by payload too
        tcp_conn(
            28883,
            [mqtt_connect(4, will=(b"w", b"bye"), user=b"admin", password=b"secret")],
            [],
        ),
        [
            tcp_conn(1883, [mqtt_connect(4, flags_extra=0x01)], []),  # reserved bit
            tcp_conn(1883, [mqtt_connect(4, flags_extra=0x18)], []),  # will QoS 3
            tcp_conn(1883, [mqtt_connect(4, password=b"pw")], []),  # no user name
            # the remaining length one byte short of the fields
            tcp_conn(1883, [b"\x10" + bytes([CONNECT[1] - 1]) + CONNECT[2:]], []),
        ],
    ),
    "mqtt-past-the-head": (
        # a CONNECT longer than the bytes kept: the server's CONNACK confirms it
        "mqtt",
        tcp_conn(1883, [mqtt_connect(4, user=b"u", password=LONG_PASSWORD)], [CONNACK]),
        [tcp_conn(1883, [mqtt_connect(4, user=b"u", password=LONG_PASSWORD)], [])],
    ),
    "modbus": (
        "modbus",
        tcp_conn(502, [READ_HOLDING, WRITE_REGISTERS], [READ_HOLDING_REPLY]),
        [
            tcp_conn(502, [JUNK], [JUNK]),
            tcp_conn(502, [mbap(1, b"\x03\x00\x6b\x00\x03", pid=1)], []),  # protocol 1
            tcp_conn(502, [READ_HOLDING[:9]], []),  # cut short
            tcp_conn(502, [mbap(1, b"\x00\x00\x6b\x00\x03")], []),  # function code 0
            tcp_conn(502, [mbap(1, b"\x03\x00\x6b\x00\x00")], []),  # 0 registers
            tcp_conn(502, [mbap(1, b"\x03\x00\x6b\x00\x7e")], []),  # 126 registers
            # Zeek looks for Modbus on 502 only (a write is echoed: either side
            # parses as request or reply)
            tcp_conn(5020, [READ_HOLDING], [READ_HOLDING_REPLY]),
            tcp_conn(5020, [WRITE_REGISTER], [WRITE_REGISTER]),
        ],
    ),
    "modbus-reply-only": (
        "modbus",
        tcp_conn(502, [JUNK], [EXCEPTION_REPLY]),
        [tcp_conn(502, [JUNK], [mbap(1, b"\x83\x00")])],  # exception code 0
    ),
    "dnp3-tcp": (
        "dnp3_tcp",
        tcp_conn(20000, [DNP3_READ], [DNP3_REPLY]),
        [
            tcp_conn(20000, [JUNK], [JUNK]),
            tcp_conn(20000, [DNP3_READ[:8] + b"\x00\x00" + DNP3_READ[10:]], []),  # CRC
            tcp_conn(20000, [dnp3_frame(0xC4, 10, 1, b"", length=4) + b"\xc0"], []),
            tcp_conn(20000, [DNP3_READ[:9]], []),  # cut inside the header
            # a header alone: Zeek waits for one byte more before it confirms
            tcp_conn(20000, [dnp3_frame(0xC9, 10, 1, b"")], []),
            tcp_conn(20001, [DNP3_READ], [DNP3_REPLY]),  # not DNP3's port
        ],
    ),
    "dnp3-udp": (
        "dnp3_udp",
        udp_conn(20000, [DNP3_READ], [DNP3_REPLY], sport=20000),
        [
            udp_conn(20000, [JUNK], [JUNK]),
            udp_conn(20000, [DNP3_READ[:8] + b"\xff\xff" + DNP3_READ[10:]], []),
        ],
    ),
    "smb2": (
        "smb",
        tcp_conn(445, [nbss(0, smb2_negotiate())], []),
        [
            tcp_conn(445, [JUNK], [JUNK]),
            tcp_conn(445, [nbss(0, b"\xfeSMX" + smb2_negotiate()[4:])], []),
            tcp_conn(445, [nbss(0, smb2_negotiate())[:24]], []),  # header cut short
            # a session request first counts only on the SMB ports
            tcp_conn(4455, [SESSION_REQUEST + nbss(0, smb2_negotiate())], [SESSION_OK]),
        ],
    ),
    "smb2-other-port": ("smb", tcp_conn(4455, [nbss(0, smb2_negotiate())], []), []),
    "smb1-netbios": (
        "smb",
        tcp_conn(139, [SESSION_REQUEST, nbss(0, smb1_negotiate())], [SESSION_OK]),
        [tcp_conn(139, [SESSION_REQUEST], [SESSION_OK])],  # no SMB yet
    ),
    "mysql": (
        "mysql",
        tcp_conn(3306, [mysql_login()], [mysql_greeting()]),
        [
            tcp_conn(3306, [JUNK], [JUNK]),
            tcp_conn(3306, [], [mysql_greeting(version=9)]),
            tcp_conn(3306, [], [mysql_greeting()[:20]]),  # cut short
            tcp_conn(13306, [mysql_login()], [mysql_greeting()]),  # Zeek: by port
        ],
    ),
    "mysql-ssl": (
        "mysql,ssl",
        tcp_conn(3306, [mysql_ssl_request() + tls_client_hello()], [mysql_greeting()]),
        [],
    ),
    "rdp": (
        "rdp",
        tcp_conn(3389, [RDP_CR], [RDP_CC]),
        [
            tcp_conn(3389, [JUNK], [JUNK]),
            tcp_conn(3389, [RDP_CR], [JUNK]),  # no confirm
            tcp_conn(3389, [RDP_CR[:8]], [RDP_CC]),  # request cut short
            tcp_conn(33890, [RDP_CR_NO_COOKIE], [RDP_CC]),  # no cookie, no RDP port
        ],
    ),
    "rdp-cookie": ("rdp", tcp_conn(33890, [RDP_CR], [RDP_CC]), []),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", sorted(IOT_CASES))
def test_iot_service_named_and_near_misses_null(tmp_path, engine, case) -> None:
    """Each protocol is named from its bytes; the near misses stay null."""
    name, good, misses = IOT_CASES[case]
    assert services(tmp_path, good, engine) == [name]
    for i, frames in enumerate(misses):
        assert services(tmp_path, frames, engine) == [None], f"near miss {i}"


def test_crafted_messages_follow_their_layouts() -> None:
    """Spot checks of the crafted bytes against the specifications' examples."""
    assert varint(0) == b"\x00" and varint(127) == b"\x7f"
    assert varint(128) == b"\x80\x01" and varint(16_383) == b"\xff\x7f"
    assert mqtt_connect(4, client_id=b"")[:14] == (
        b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"
    )
    # Modbus Messaging on TCP/IP: read 3 holding registers from 107 (0x6B).
    assert READ_HOLDING == bytes.fromhex("0001 0000 0006 01 03 006b 0003")
    assert len(DNP3_READ) == 10 + 6 + 2 and DNP3_READ[2] == 11
    assert len(RDP_CC) == 19 and RDP_CC[4] == 14


@pytest.mark.parametrize("engine", ENGINES)
def test_iot_and_earlier_services_in_one_capture(tmp_path, engine) -> None:
    """The new protocols and the earlier ones, their near misses between them,
    in one capture written with dpkt: every connection keeps its own name."""
    conns = []
    for case in sorted(IOT_CASES):
        name, good, misses = IOT_CASES[case]
        conns += [(good, name)] + [(m, None) for m in misses]
    for case in sorted(CASES):
        good, misses = CASES[case]
        conns += [(good, case.split("-")[0])] + [(m, None) for m in misses]

    path = tmp_path / "mixed.pcap"
    with path.open("wb") as f:
        writer = dpkt.pcap.Writer(f, linktype=dpkt.pcap.DLT_EN10MB)
        for k, (frames, _) in enumerate(conns):
            for ts, frame in frames:
                # each connection 100 s after the last: 5-tuples may repeat
                writer.writepkt(frame, ts=ts + 100.0 * k)

    got = [r["service"] for r in read_capture(path, engine=engine).table.to_pylist()]
    assert got == [name for _, name in conns]


# -- against Zeek ---------------------------------------------------------------

REFERENCE_PAIRS = (
    "scripts.base.protocols.modbus.modbus_and_non_modbus_on_port_502",
    "scripts.base.protocols.mysql.encrypted",
)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("stem", REFERENCE_PAIRS)
def test_iot_services_match_zeek_reference(data_dir: Path, engine, stem) -> None:
    """On Zeek's Modbus trace (Modbus and other probes on port 502) and its
    MySQL-with-TLS trace, every flow Zeek names with one of the new services, or
    leaves null, gets the same from the meter."""
    zeek = parse_conn_log(data_file(data_dir, f"zeek-reference/{stem}.conn.log"))
    capture = data_file(data_dir, f"zeek-reference/{stem}.pcap")
    ours = defaultdict(list)
    for r in read_capture(capture, engine=engine, on_error="skip").table.to_pylist():
        ours[(r["src_ip"], r["src_port"], r["dst_ip"], r["dst_port"])].append(r)

    checked = []
    for z in zeek:
        theirs = z.get("service")
        key = (z["src_ip"], z["src_port"], z["dst_ip"], z["dst_port"])
        mine = ours[key].pop(0)["service"] if ours.get(key) else "(no flow)"
        if theirs is None or theirs in IOT_SERVICES:
            checked.append((key, mine, theirs))
    assert [mine for _, mine, _ in checked] == [theirs for _, _, theirs in checked]
    assert any(theirs in IOT_SERVICES for _, _, theirs in checked)
