"""The meter's ``service`` column (flows.meter.service), on both packet paths.

Each protocol gets a crafted connection that must be named, and near misses on
the same ports that must stay null (a port alone never names a service, as in
Zeek, which sets it only once an analyzer confirmed the protocol). The last test
holds the meter to the services Zeek wrote in the zeek-reference conn.logs.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from pathlib import Path

import pytest

from flows.meter import fast_available, read_capture
from flows.meter.service import HEAD_BYTES, identify
from tests.conftest import data_file
from tests.test_meter_craft import A4, B4, C4, eth, ip4, tcp, udp, write_pcap
from tests.test_meter_zeek import parse_conn_log

ENGINES = [
    "python",
    pytest.param(
        "fast",
        marks=pytest.mark.skipif(
            not fast_available(),
            reason="the compiled meter flows.meter._fast is not built in this install",
        ),
    ),
]

# What the meter names; Zeek's other services (dce_rpc, irc, ...) stay null.
IDENTIFIED = {"dns", "http", "ssl", "dtls", "ssh", "ftp", "smtp", "pop3", "ntp"}
IDENTIFIED |= {"dhcp", "sip", "ftp-data"}
IDENTIFIED |= {"mqtt", "modbus", "dnp3_tcp", "dnp3_udp", "smb", "mysql", "mysql,ssl"}
IDENTIFIED |= {"rdp"}


# -- crafted connections ---------------------------------------------------------


def tcp_conn(
    dport: int,
    orig: list[bytes],
    resp: list[bytes],
    sport: int = 40000,
    syn: bool = True,
    t0: float = 1000.0,
    src: str = A4,
    dst: str = B4,
) -> list[tuple[float, bytes]]:
    """A TCP connection: handshake (unless ``syn`` is False), the originator's
    segments, the responder's, then FINs; as Ethernet frames."""
    x, y = 1000, 5000
    segs = []
    if syn:
        segs += [
            (src, dst, sport, dport, x, 0, "S", b""),
            (dst, src, dport, sport, y, x + 1, "SA", b""),
            (src, dst, sport, dport, x + 1, y + 1, "A", b""),
        ]
    ox, oy = x + 1, y + 1
    for p in orig:
        segs.append((src, dst, sport, dport, ox, oy, "PA", p))
        ox += len(p)
    for p in resp:
        segs.append((dst, src, dport, sport, oy, ox, "PA", p))
        oy += len(p)
    segs += [
        (src, dst, sport, dport, ox, oy, "FA", b""),
        (dst, src, dport, sport, oy, ox + 1, "FA", b""),
        (src, dst, sport, dport, ox + 1, oy + 1, "A", b""),
    ]
    return [
        (t0 + i * 0.01, eth(ip4(s, d, 6, tcp(s, d, sp, dp, sq, ak, fl, pl))))
        for i, (s, d, sp, dp, sq, ak, fl, pl) in enumerate(segs)
    ]


def udp_conn(
    dport: int,
    orig: list[bytes],
    resp: list[bytes],
    sport: int = 40000,
    t0: float = 1000.0,
) -> list[tuple[float, bytes]]:
    """UDP datagrams: the originator's, then the responder's."""
    out = [(A4, B4, sport, dport, p) for p in orig]
    out += [(B4, A4, dport, sport, p) for p in resp]
    return [
        (t0 + i * 0.01, eth(ip4(s, d, 17, udp(s, d, sp, dp, p))))
        for i, (s, d, sp, dp, p) in enumerate(out)
    ]


def dns_query(name: bytes = b"\x07example\x03com\x00") -> bytes:
    return struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + name + b"\0\1\0\1"


def dns_reply(name: bytes = b"\x07example\x03com\x00") -> bytes:
    head = struct.pack("!HHHHHH", 0x1234, 0x8180, 1, 1, 0, 0)
    answer = b"\xc0\x0c\0\1\0\1" + struct.pack("!IH", 300, 4) + bytes([192, 0, 2, 1])
    return head + name + b"\0\1\0\1" + answer


def tls_client_hello() -> bytes:
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\xc0\x2f" + b"\x01\x00"
    body += b"\x00\x00"  # no extensions
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs


def tls_server_hello() -> bytes:
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\xc0\x2f" + b"\x00"
    hs = b"\x02" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x03" + struct.pack("!H", len(hs)) + hs


def dtls_client_hello() -> bytes:
    body = b"\xfe\xfd" + bytes(32) + b"\x00" + b"\x00" + b"\x00\x02\xc0\x2b\x01\x00"
    n = len(body).to_bytes(3, "big")
    hs = b"\x01" + n + b"\x00\x00" + b"\x00\x00\x00" + n + body
    return b"\x16\xfe\xfd" + bytes(8) + struct.pack("!H", len(hs)) + hs


def ntp_packet(mode: int, version: int = 4) -> bytes:
    return bytes([(version << 3) | mode]) + bytes(47)


def dhcp_discover() -> bytes:
    fixed = struct.pack("!BBBBIHH", 1, 1, 6, 0, 0xCAFE, 0, 0x8000) + bytes(16)
    fixed += b"\x02\x00\x00\x00\x00\x01" + bytes(10) + bytes(64 + 128)
    assert len(fixed) == 236
    return fixed + b"\x63\x82\x53\x63" + b"\x35\x01\x01\xff"


GET = b"GET /index.html HTTP/1.1\r\nHost: example.com\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
SIP_INVITE = (
    b"INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5060\r\n"
    b"From: <sip:alice@example.com>\r\nCall-ID: 1@10.0.0.1\r\nCSeq: 1 INVITE\r\n\r\n"
)
JUNK = b"\x00\x07\x01\xfe this is no protocol at all \x8f\r\n"

# protocol -> (connection that must be named so, [near misses that must stay null])
CASES = {
    "http": (
        tcp_conn(80, [GET], [OK]),
        [
            tcp_conn(80, [JUNK], [JUNK]),  # the port alone
            tcp_conn(80, [b"GET"], []),  # no request line
            tcp_conn(80, [GET], [OK], syn=False),  # seen from mid-way: no analyzer
            tcp_conn(8123, [b"FETCH /x HTTP/1.1\r\n\r\n"], []),  # unknown method
        ],
    ),
    "http-split": (
        # the request line comes in pieces, on a port that is not HTTP's
        tcp_conn(27272, [b"G", b"ET / HTTP/1.0\r\n", b"\r\n"], [OK]),
        [tcp_conn(27272, [b"G", b"XET / HTTP/1.0\r\n"], [b"HTTX/1.0 200 OK"])],
    ),
    "ssl": (
        tcp_conn(443, [tls_client_hello()], [tls_server_hello()]),
        [
            tcp_conn(443, [JUNK], [JUNK]),
            # application data, not a handshake
            tcp_conn(443, [b"\x17\x03\x03\x00\x40" + bytes(64)], []),
            # a ServerHello alone away from TLS ports
            tcp_conn(50000, [JUNK], [tls_server_hello()]),
        ],
    ),
    "ssl-other-port": (tcp_conn(50000, [tls_client_hello()], []), []),
    "ssh": (
        tcp_conn(22, [b"SSH-2.0-OpenSSH_9.6\r\n"], [b"SSH-2.0-OpenSSH_9.3\r\n"]),
        [
            tcp_conn(22, [JUNK], [JUNK]),
            tcp_conn(22, [b"SSH-2.0-OpenSSH_9.6\r\n"], []),  # one side only
        ],
    ),
    "ftp": (
        tcp_conn(21, [b"USER anonymous\r\n"], [b"220 FTP server ready\r\n"]),
        [tcp_conn(21, [b"hello\r\n"], [b"hello there\r\n"])],
    ),
    "smtp": (
        tcp_conn(25, [b"EHLO client.example\r\n"], [b"220 mx.example ESMTP\r\n"]),
        [
            tcp_conn(25, [b"hello\r\n"], [b"530 go away\r\n"]),
            tcp_conn(2525, [b"hello\r\n"], [b"220 mx.example ESMTP\r\n"]),
        ],
    ),
    "pop3": (
        tcp_conn(110, [b"CAPA\r\n"], [b"+OK POP3 server ready\r\n"]),
        [tcp_conn(110, [b"hello\r\n"], [b"-ERR no\r\n"])],
    ),
    "dns": (
        udp_conn(53, [dns_query()], [dns_reply()]),
        [
            udp_conn(53, [JUNK], [JUNK]),
            udp_conn(53, [b"hello, this is not dns"], []),
            udp_conn(40053, [dns_query()], [dns_reply()]),  # not a DNS port
        ],
    ),
    "dns-tcp": (
        tcp_conn(53, [struct.pack("!H", len(dns_query())) + dns_query()], []),
        [tcp_conn(53, [JUNK], [])],
    ),
    "ntp": (
        udp_conn(123, [ntp_packet(3)], [ntp_packet(4)], sport=123),
        [
            udp_conn(123, [bytes(48)], [], sport=40123),  # version 0
            udp_conn(123, [b"\x23short"], [], sport=40123),  # too short
        ],
    ),
    "dhcp": (
        udp_conn(67, [dhcp_discover()], [], sport=68),
        [udp_conn(67, [bytes(300)], [], sport=68)],  # no magic cookie
    ),
    "sip": (
        udp_conn(5060, [SIP_INVITE], [b"SIP/2.0 180 Ringing\r\n\r\n"], sport=5060),
        [udp_conn(5060, [JUNK], [JUNK], sport=5060)],
    ),
    "dtls": (
        udp_conn(4433, [dtls_client_hello()], []),
        [udp_conn(4433, [b"\x16\xfe\xfd" + bytes(8)], [])],
    ),
}


def services(tmp_path: Path, frames, engine: str) -> list:
    path = write_pcap(tmp_path / "c.pcap", frames)
    return [r["service"] for r in read_capture(path, engine=engine).table.to_pylist()]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_service_named_and_near_misses_null(tmp_path, engine, case) -> None:
    """Each protocol is named from its bytes; the near misses stay null."""
    good, misses = CASES[case]
    assert services(tmp_path, good, engine) == [case.split("-")[0]]
    for i, frames in enumerate(misses):
        assert services(tmp_path, frames, engine) == [None], f"near miss {i}"


@pytest.mark.parametrize("engine", ENGINES)
def test_services_in_one_capture(tmp_path, engine) -> None:
    """Many connections in one capture keep their own heads (both paths alike)."""
    frames = []
    want = []
    for case in sorted(CASES):
        good, misses = CASES[case]
        for k, conn in enumerate([good] + misses):
            # each connection 100 s after the last: 5-tuples may repeat
            shift = 100.0 * len(want)
            frames += [(ts + shift, frame) for ts, frame in conn]
            want.append(case.split("-")[0] if k == 0 else None)
    path = write_pcap(tmp_path / "all.pcap", frames)
    got = [r["service"] for r in read_capture(path, engine=engine).table.to_pylist()]
    assert got == want


@pytest.mark.parametrize("engine", ENGINES)
def test_ftp_data_connections(tmp_path, engine) -> None:
    """Data connections announced by PASV/EPSV replies and PORT commands are
    ftp-data; others to the same hosts, from another host, or too late are not."""
    control = tcp_conn(
        21,
        [b"USER ftp\r\n", b"PASV\r\n", b"PORT 10,0,0,1,156,64\r\n", b"EPSV\r\n"],
        [
            b"220 ready\r\n",
            b"227 Entering Passive Mode (10,0,0,2,195,80).\r\n",
            b"200 PORT command successful.\r\n229 Entering Extended Passive Mode "
            b"(|||50002|)\r\n",
        ],
        sport=30000,
        t0=1000.0,
    )
    data = [
        (tcp_conn(50000, [], [b"listing\r\n"], sport=40001, t0=1010.0), "ftp-data"),
        (tcp_conn(50001, [], [b"x"], sport=40002, t0=1011.0), None),  # not announced
        (tcp_conn(50000, [], [b"x"], sport=40003, t0=1012.0), None),  # used up
        (tcp_conn(40000, [], [b"x"], 20, t0=1013.0, src=B4, dst=A4), "ftp-data"),
        (tcp_conn(50002, [], [b"x"], sport=40004, t0=1014.0, src=C4), None),
        (tcp_conn(50002, [], [b"x"], sport=40005, t0=1015.0), "ftp-data"),
    ]
    frames = control + [f for conn, _ in data for f in conn]
    frames.sort(key=lambda f: f[0])
    path = write_pcap(tmp_path / "ftp.pcap", frames)
    got = {
        (r["dst_port"], r["src_port"]): r["service"]
        for r in read_capture(path, engine=engine).table.to_pylist()
    }
    assert got[(21, 30000)] == "ftp"
    assert [got[(50000, 40001)], got[(50001, 40002)], got[(50000, 40003)]] == [
        "ftp-data",
        None,
        None,
    ]
    assert got[(40000, 20)] == "ftp-data"
    assert [got[(50002, 40004)], got[(50002, 40005)]] == [None, "ftp-data"]

    # An announcement lives 5 minutes.
    late = tcp_conn(50000, [], [b"x"], sport=40001, t0=1400.0)
    path = write_pcap(tmp_path / "late.pcap", sorted(control + late))
    got = [r["service"] for r in read_capture(path, engine=engine).table.to_pylist()]
    assert got == ["ftp", None]


def test_head_is_bounded() -> None:
    """A long request is judged from its first HEAD_BYTES bytes."""
    long_get = b"GET /" + b"a" * (2 * HEAD_BYTES) + b" HTTP/1.1\r\n\r\n"
    assert identify("tcp", 40000, 80, long_get[:HEAD_BYTES], None, "ShAD") == "http"
    assert identify("tcp", 40000, 80, long_get[:100], None, "ShAD") is None
    assert identify("icmp", 8, 0, b"GET / HTTP/1.1\r\n", None, None) is None


# -- against Zeek ---------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_services_match_zeek_reference(data_dir: Path, engine: str, capsys) -> None:
    """On every zeek-reference pair, each flow the meter and Zeek share has Zeek's
    service where it is one the meter names, and null where it is another one
    (dce_rpc, irc, ...). With ``-s`` it prints, per pair, on how many of
    Zeek's rows the service is the same (a row the meter does not have counts
    as different)."""
    ref = data_file(data_dir, "zeek-reference")
    compared = named = 0
    wrong = []
    lines = []
    same_all = rows_all = 0
    for log in sorted(ref.glob("*.conn.log")):
        zeek = parse_conn_log(log)
        if not zeek or "service" not in zeek[0] or "src_ip" not in zeek[0]:
            continue  # a baseline that kept only some columns
        stem = log.name[: -len(".conn.log")]
        capture = next(
            p for p in ref.glob(stem + ".pcap*") if p.suffix in (".pcap", ".pcapng")
        )
        ours = defaultdict(list)
        res = read_capture(capture, engine=engine, on_error="skip")
        for r in res.table.to_pylist():
            key = (r["src_ip"], r["src_port"], r["dst_ip"], r["dst_port"], r["proto"])
            ours[key].append(r)
        same = 0
        for z in zeek:
            key = (z["src_ip"], z["src_port"], z["dst_ip"], z["dst_port"], z["proto"])
            if not ours.get(key):
                continue  # the flow itself differs (ntp.misordered-ntp)
            mine = ours[key].pop(0)["service"]
            theirs = z.get("service")
            same += mine == theirs
            want = theirs if theirs is None or theirs in IDENTIFIED else None
            compared += 1
            named += want is not None
            if mine != want:
                wrong.append((stem, key, mine, theirs))
        lines.append(f"{stem:66} {same:>4}/{len(zeek):<4}")
        same_all += same
        rows_all += len(zeek)
    lines.append(f"{'all pairs (' + engine + ' path)':66} {same_all:>4}/{rows_all:<4}")
    with capsys.disabled():
        print("\nservice equal to Zeek's\n" + "\n".join(lines))
    assert not wrong
    assert compared >= 121 and named >= 67


@pytest.mark.skipif(not fast_available(), reason="the compiled meter is not built")
def test_both_paths_keep_the_same_heads(tmp_path, monkeypatch) -> None:
    """Random splits, reordering, repeats, snap cuts and sequence wrap-around of
    protocol openings: the compiled path keeps the same heads as Python (seen
    through a stand-in for ``identify``) and names the same services."""
    import random

    import flows.meter._fast as fast_module

    import flows.meter.conn as conn_module

    rnd = random.Random(20261205)
    openings = [
        GET,
        OK,
        tls_client_hello(),
        tls_server_hello(),
        b"SSH-2.0-x\r\n",
        b"220 hi\r\n",
        b"USER a\r\n",
        b"+OK\r\n",
        b"CAPA\r\n",
        JUNK,
        b"G",
        b"ET / HTTP/1.1\r\n\r\n",
        bytes(range(256)) * 2,
    ]
    frames = []
    for n in range(300):
        t0 = 1000.0 + n
        sport, dport = 10000 + n, rnd.choice([21, 22, 25, 80, 110, 443, 8080, 9999])
        isn = rnd.choice([1000, 0xFFFFFFF0, rnd.randrange(1 << 32)])
        rsn = rnd.randrange(1 << 32)
        segs = []
        if rnd.random() < 0.7:
            segs.append((A4, B4, sport, dport, isn, 0, "S", b""))
            segs.append((B4, A4, dport, sport, rsn, isn + 1, "SA", b""))
        for side in (0, 1):
            blob = b"".join(rnd.choice(openings) for _ in range(rnd.randint(1, 3)))
            seq = (isn if side == 0 else rsn) + 1
            pos = 0
            while pos < len(blob):
                k = rnd.choice([1, 2, 3, 5, 8, 40, 300])
                s, d, sp, dp = (
                    (A4, B4, sport, dport) if side == 0 else (B4, A4, dport, sport)
                )
                segs.append((s, d, sp, dp, seq + pos, 1, "PA", blob[pos : pos + k]))
                pos += k
        if rnd.random() < 0.3:
            segs.insert(rnd.randrange(len(segs) + 1), rnd.choice(segs))
        if rnd.random() < 0.3:
            i = rnd.randrange(len(segs))
            j = rnd.randrange(len(segs))
            segs[i], segs[j] = segs[j], segs[i]
        for i, (s, d, sp, dp, sq, ak, fl, pl) in enumerate(segs):
            frame = eth(ip4(s, d, 6, tcp(s, d, sp, dp, sq, ak, fl, pl)))
            if pl and rnd.random() < 0.05:
                frames.append((t0 + i * 1e-3, frame[: 54 + len(pl) // 2], len(frame)))
            else:
                frames.append((t0 + i * 1e-3, frame))
    path = write_pcap(tmp_path / "random.pcap", frames)
    py = read_capture(path, engine="python", uid_seed="s").table.to_pylist()
    fast = read_capture(path, engine="fast", uid_seed="s").table.to_pylist()
    assert fast == py

    def heads(proto, orig_p, resp_p, orig, resp, history=None):
        if orig is None and resp is None:
            return None  # as identify (the compiled path does not ask then)
        return repr((proto, orig_p, resp_p, orig, resp, history))

    monkeypatch.setattr(conn_module, "identify", heads)
    monkeypatch.setattr(fast_module, "_identify", heads)
    py_heads = read_capture(path, engine="python", uid_seed="s").table.to_pylist()
    fast_heads = read_capture(path, engine="fast", uid_seed="s").table.to_pylist()
    assert [r["service"] for r in fast_heads] == [r["service"] for r in py_heads]
    assert len({r["service"] for r in py}) >= 5, {r["service"] for r in py}
