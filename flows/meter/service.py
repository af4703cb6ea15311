"""Which application protocol a connection speaks: Zeek's ``service`` column.

Zeek attaches protocol analyzers to a connection by its well-known server port
and by payload signatures, and writes a service only once an analyzer has
confirmed that the bytes really are its protocol. This module approximates that
from little: the first payload bytes each side sent (its *head*: the first UDP
datagram that carried captured data, or the first TCP data segment grown by the
segments that follow it in sequence, at most :data:`HEAD_BYTES` bytes from
:data:`HEAD_SEGS` segments) and the two ports. Both packet paths of the meter
keep exactly those bytes per endpoint and call :func:`identify` once per
connection, when its record is made, so the compiled path gives the same service
as the Python one.

What is identified: dns (UDP/TCP 53, mDNS 5353, LLMNR 5355, NetBIOS name service
137), http, ssl (TLS and SSLv2-compatible hellos), dtls, ssh, ftp, smtp, pop3,
ntp, dhcp and sip (UDP), and the services an IoT gateway sees:

- ``mqtt``: a whole MQTT 3.1 / 3.1.1 / 5 CONNECT from the originator, on any port
  (Zeek finds MQTT by payload too); one that runs past the bytes kept counts
  when the responder answers with a CONNACK.
- ``modbus``: a whole Modbus/TCP message (MBAP header with protocol id 0, a
  length that fits, a public function code whose fixed-size fields agree) from
  either side, on port 502, the only place Zeek looks for Modbus.
- ``dnp3_tcp`` / ``dnp3_udp``: a DNP3 link header (0x05 0x64, length >= 5,
  header CRC right) and at least one byte after it, from either side, on port
  20000. Zeek writes the name of the analyzer that confirmed, and the TCP and
  UDP analyzers are two (its base scripts attach only the TCP one).
- ``smb``: a NetBIOS session message holding an SMB1 (0xFF 'SMB') or SMB2/3
  (0xFE 'SMB') header, from either side, on any port; on 139 and 445 NetBIOS
  session requests, responses and keep-alives before it are passed over.
- ``mysql``: the server's greeting (protocol version 10, a version string, the
  fields after it) on 3306 or 1434; ``mysql,ssl`` when the client's first packet
  is an SSL request followed by a TLS ClientHello, as Zeek writes it.
- ``rdp``: an X.224 connection request in TPKT from the client answered by an
  X.224 connection confirm, on 3389 or with an ``mstshash`` cookie.

Each needs bytes that parse as the protocol; a port alone never names a
service. Everything else stays ``None``. ``ftp-data`` comes from
:class:`FtpData`: the data connections that FTP control connections announce
(PORT/EPRT, 227/229), matched when they start. Where Zeek confirms a protocol
only once a whole message has parsed (MQTT, Modbus, MySQL), a message cut short
by the end of the connection names nothing.

The checks are our own reading of the protocols' specifications (RFC 1035, 9110,
8446, 6347, 4253, 959, 5321, 1939, 5905, 2131, 3261; OASIS MQTT 3.1.1 and 5.0;
the Modbus Application Protocol v1.1b3 and Modbus Messaging on TCP/IP v1.0b;
IEEE 1815 (DNP3) for the link header and its CRC; RFC 1002 for NetBIOS
sessions, MS-CIFS and MS-SMB2 for the headers; the MySQL client/server
protocol's Handshake V10; RFC 1006 and ITU-T X.224 with MS-RDPBCGR for RDP), not
a translation of Zeek's analyzers. The service names are the ones Zeek writes:
its analyzers' names, lower-cased.
"""

from __future__ import annotations

import re
import socket

# Bytes kept per direction: enough for a DHCP header and its magic cookie (240),
# a DNS header and question, a request line, a TLS record and handshake header.
HEAD_BYTES = 256
# TCP: the head of a direction grows over at most this many in-order segments
# (a request split after its first byte still shows its request line).
HEAD_SEGS = 8

DNS_UDP_PORTS = frozenset((53, 137, 5353, 5355))
HTTP_PORTS = frozenset((80, 81, 631, 1080, 3128, 8000, 8080, 8888))
SSL_PORTS = frozenset((443, 563, 585, 614, 636, 989, 990, 992, 993, 995, 5223, 8443))
FTP_PORTS = frozenset((21, 2811))
SMTP_PORTS = frozenset((25, 587))
POP3_PORTS = frozenset((110,))
_DHCP_PORTS = frozenset((67, 68))
MODBUS_PORTS = frozenset((502,))
DNP3_PORTS = frozenset((20000,))
SMB_PORTS = frozenset((139, 445))
MYSQL_PORTS = frozenset((1434, 3306))
RDP_PORTS = frozenset((3389,))
# First bytes a text protocol's message can start with (printable ASCII and
# white space), and the letters a SIP message starts with; indexed by byte.
_TEXT = tuple(0x20 <= i < 0x7F or i in (9, 10, 13) for i in range(256))
_LETTER = tuple(0x41 <= i <= 0x5A or 0x61 <= i <= 0x7A for i in range(256))

# Methods a request line may start with on any port (the common ones and WebDAV);
# on an HTTP port any upper-case token will do.
_HTTP_METHODS = frozenset(
    b"GET HEAD POST PUT DELETE OPTIONS TRACE CONNECT PATCH PROPFIND PROPPATCH "
    b"MKCOL COPY MOVE LOCK UNLOCK SEARCH REPORT".split()
)
_HTTP_REQ = re.compile(
    rb"[ \t\r\n]*([A-Z][A-Z_-]{0,19}) +[!-~]+( +HTTP/[0-9]\.[0-9]|\r?\n|$)"
)
_HTTP_REPLY = re.compile(rb"HTTP/[0-9]\.[0-9] +[0-9]{3}[ \r\n]")
_SSH_BANNER = re.compile(rb"SSH-[12]\.[0-9]+-")
_SIP_REQ = re.compile(
    rb"([A-Z]{3,12}) +(sips?|tel):[!-~]+ +SIP/2\.0\r?\n", re.IGNORECASE
)
_SIP_REPLY = re.compile(rb"SIP/2\.0 +[1-6][0-9]{2} ")
_REPLY_220 = re.compile(rb"[ \t\r\n]*220[ -]")
_FTP_CMD = re.compile(
    rb"[ \t\r\n]*(USER|AUTH|FEAT|SYST|OPTS|HOST|CLNT)( |\r?\n)", re.IGNORECASE
)
_FTP_USER = re.compile(rb"[ \t\r\n]*USER[ \t]", re.IGNORECASE)
_SMTP_HELLO = re.compile(rb"[ \t\r\n]*(EHLO|HELO)[ \t\r\n]", re.IGNORECASE)
_POP3_OK = re.compile(rb"\+OK")
_POP3_CMD = re.compile(rb"(USER|PASS|APOP|CAPA|AUTH|STLS|UIDL|STAT|QUIT)\b", re.I)


def identify(
    proto: str,
    orig_p: int,
    resp_p: int,
    orig: bytes | None,
    resp: bytes | None,
    history: str | None = None,
) -> str | None:
    """The service of a connection, from its ports and first payload bytes.

    ``orig`` and ``resp`` are the first captured payload bytes the originator and
    the responder sent (``None`` when a side sent none); ``history`` is the
    record's history, which tells whether a TCP connection was seen from its
    start. ``None`` when no protocol is recognised.
    """
    if orig is None and resp is None:
        return None
    if proto == "udp":
        return _udp(orig_p, resp_p, orig, resp)
    if proto == "tcp":
        return _tcp(orig_p, resp_p, orig, resp, _partial(history))
    return None


def _partial(history: str | None) -> bool:
    """A TCP connection whose first packet (bad checksums aside) had no SYN."""
    h = (history or "").lstrip("^Cc")
    return not h or h[0] not in "SHsh"


# -- UDP ------------------------------------------------------------------------


def _udp(orig_p: int, resp_p: int, orig: bytes | None, resp: bytes | None):
    if resp_p in DNS_UDP_PORTS or orig_p in DNS_UDP_PORTS:
        if _any(_dns_ok, orig, resp, 0):
            return "dns"
    if (resp_p == 123 or orig_p == 123) and _any(_ntp_ok, orig, resp, 0):
        return "ntp"
    if resp_p in _DHCP_PORTS or orig_p in _DHCP_PORTS:
        if _any(_dhcp_ok, orig, resp, 0):
            return "dhcp"
    # The first bytes say which of the port-free checks can match at all.
    o0 = orig[0] if orig else 0
    r0 = resp[0] if resp else 0
    if (_LETTER[o0] or _LETTER[r0]) and _any(_sip_ok, orig, resp, 0):
        return "sip"
    if (o0 == 0x16 or r0 == 0x16) and (
        _dtls_hello(orig, (1,)) or _dtls_hello(resp, (2, 3))
    ):
        return "dtls"
    if (o0 == 0x05 or r0 == 0x05) and (resp_p in DNP3_PORTS or orig_p in DNP3_PORTS):
        if _any(_dnp3_ok, orig, resp, 0):
            return "dnp3_udp"
    return None


def _any(check, orig, resp, arg) -> bool:
    return (orig is not None and check(orig, arg)) or (
        resp is not None and check(resp, arg)
    )


def _dns_ok(b: bytes, skip: int) -> bool:
    """A DNS message: a sane header and, when it has any, a parseable question."""
    if len(b) < skip + 12:
        return False
    b = b[skip:]
    flags = (b[2] << 8) | b[3]
    opcode = (flags >> 11) & 0xF
    if opcode not in (0, 1, 2, 4, 5):
        return False
    if flags & 0x0040:  # the Z bit must be zero
        return False
    qd = (b[4] << 8) | b[5]
    an = (b[6] << 8) | b[7]
    ns = (b[8] << 8) | b[9]
    ar = (b[10] << 8) | b[11]
    if qd > 32 or an > 512 or ns > 512 or ar > 512:
        return False
    if qd + an + ns + ar == 0:
        return False
    pos = 12
    n = len(b)
    if qd == 0:
        return True
    # The first question's name: labels of 1-63 bytes, or a compression pointer.
    total = 0
    while True:
        if pos >= n:
            return True  # the name runs past what was kept: nothing wrong so far
        ln = b[pos]
        if ln == 0:
            pos += 1
            break
        if ln & 0xC0 == 0xC0:
            pos += 2
            break
        if ln & 0xC0:
            return False
        total += ln + 1
        if total > 255:
            return False
        pos += ln + 1
    if pos + 4 > n:
        return True
    qclass = ((b[pos + 2] << 8) | b[pos + 3]) & 0x7FFF  # mDNS: top bit = unicast
    return qclass in (1, 3, 4, 254, 255)


def _ntp_ok(b: bytes, _: int) -> bool:
    if len(b) < 8:
        return False
    version = (b[0] >> 3) & 7
    mode = b[0] & 7
    if not 1 <= version <= 4 or mode == 0:
        return False
    if mode <= 5:
        return len(b) >= 48
    return True  # mode 6 (control) and 7 (private) messages are short


def _dhcp_ok(b: bytes, _: int) -> bool:
    return (
        len(b) >= 240
        and b[0] in (1, 2)
        and b[2] <= 16
        and b[236:240] == b"\x63\x82\x53\x63"
    )


def _sip_ok(b: bytes, _: int) -> bool:
    return bool(_SIP_REQ.match(b) or _SIP_REPLY.match(b))


def _dtls_hello(b: bytes | None, types: tuple[int, ...]) -> bool:
    """A DTLS handshake record (content type 22, version 0xfeXX) of ``types``."""
    return (
        b is not None
        and len(b) >= 25
        and b[0] == 0x16
        and b[1] == 0xFE
        and b[2] in (0xFF, 0xFD, 0xFC)
        and b[13] in types
    )


# -- TCP ------------------------------------------------------------------------


def _tcp(
    orig_p: int, resp_p: int, orig: bytes | None, resp: bytes | None, partial: bool
):
    # The first bytes say which checks can match at all (each check below needs
    # its first byte: 0x16 for TLS, the top bit for SSLv2, text for the rest).
    o0 = orig[0] if orig else 0
    r0 = resp[0] if resp else 0
    if o0 == 0x16 or r0 == 0x16:
        if _tls_hello(orig, 1) or (_tls_hello(resp, 2) and resp_p in SSL_PORTS):
            return "ssl"
    if o0 & 0x80 and _sslv2_hello(orig):
        return "ssl"
    text = _TEXT[o0] or _TEXT[r0]
    # HTTP is only parsed on connections seen from their start, as in Zeek
    # (core.tcp.missing-syn still counts: the SYN-ACK was seen).
    if text and not partial and _http(resp_p, orig, resp):
        return "http"
    if text and _ssh(orig, resp):
        return "ssh"
    if resp_p == 53 or orig_p == 53:
        # DNS over TCP: each message behind a two-byte length.
        if _any(_dns_ok, orig, resp, 2):
            return "dns"
    iot = _tcp_iot(orig_p, resp_p, orig, resp, o0, r0)
    if iot is not None or not text:
        return iot
    if _ftp(resp_p, orig, resp):
        return "ftp"
    if _smtp(resp_p, orig, resp):
        return "smtp"
    if _pop3(resp_p, orig, resp):
        return "pop3"
    return None


def _tls_hello(b: bytes | None, hs_type: int) -> bool:
    """A TLS handshake record whose first message is a ClientHello (1) or
    ServerHello (2) of a TLS/SSLv3 version."""
    if b is None or len(b) < 11:
        return False
    if b[0] != 0x16 or b[1] != 3 or b[2] > 4:
        return False
    rec_len = (b[3] << 8) | b[4]
    if rec_len < 4 or rec_len > 16384 + 2048:
        return False
    if b[5] != hs_type:
        return False
    hs_len = (b[6] << 16) | (b[7] << 8) | b[8]
    if hs_len < 34:  # version and random at least
        return False
    return b[9] == 3 and b[10] <= 4


def _sslv2_hello(b: bytes | None) -> bool:
    """An SSLv2-format ClientHello (2-byte header with the top bit set)."""
    if b is None or len(b) < 11 or not b[0] & 0x80:
        return False
    length = ((b[0] & 0x7F) << 8) | b[1]
    if length < 9 or b[2] != 1:
        return False
    if not (b[3] == 3 and b[4] <= 4) and not (b[3] == 0 and b[4] == 2):
        return False
    cipher_len = (b[5] << 8) | b[6]
    return cipher_len > 0 and cipher_len % 3 == 0


def _http(resp_p: int, orig: bytes | None, resp: bytes | None) -> bool:
    m = _HTTP_REQ.match(orig) if orig is not None else None
    if m is not None:
        end = m.group(2)
        if not end.startswith(b" "):
            if end:  # HTTP/0.9: no version, only where the analyzer sits on the port
                ok = resp_p in HTTP_PORTS
            else:  # the target ran past the bytes kept
                ok = len(orig) >= HEAD_BYTES
            if not ok:
                m = None
    if m is not None and (resp_p in HTTP_PORTS or m.group(1) in _HTTP_METHODS):
        return True
    # A reply alone counts where the analyzer sits on the port, or after a request.
    if resp is not None and _HTTP_REPLY.match(resp):
        return resp_p in HTTP_PORTS or m is not None
    return False


def _ssh(orig: bytes | None, resp: bytes | None) -> bool:
    """SSH: both sides' version banners (the protocol is only confirmed once the
    two sides have exchanged them)."""
    return (
        orig is not None
        and resp is not None
        and _SSH_BANNER.match(orig) is not None
        and _SSH_BANNER.match(resp) is not None
    )


def _ftp(resp_p: int, orig: bytes | None, resp: bytes | None) -> bool:
    banner = resp is not None and _REPLY_220.match(resp) is not None
    if resp_p in FTP_PORTS:
        return banner or (orig is not None and _FTP_CMD.match(orig) is not None)
    # Elsewhere: a 220 greeting answered by USER.
    return banner and orig is not None and _FTP_USER.match(orig) is not None


def _smtp(resp_p: int, orig: bytes | None, resp: bytes | None) -> bool:
    banner = resp is not None and _REPLY_220.match(resp) is not None
    hello = orig is not None and _SMTP_HELLO.match(orig) is not None
    if resp_p in SMTP_PORTS:
        return banner or hello
    return banner and hello


def _pop3(resp_p: int, orig: bytes | None, resp: bytes | None) -> bool:
    ok = resp is not None and _POP3_OK.match(resp) is not None
    cmd = orig is not None and _POP3_CMD.match(orig) is not None
    if resp_p in POP3_PORTS:
        return ok or cmd
    return ok and cmd


# -- IoT, industrial and LAN protocols over TCP ----------------------------------


class _Cut(Exception):
    """A message runs past the bytes kept (raised by :class:`_Reader`)."""


class _Reader:
    """Reads big-endian fields off the front of a message, raising :class:`_Cut`
    at its end."""

    __slots__ = ("b", "pos")

    def __init__(self, b: bytes, pos: int = 0) -> None:
        self.b = b
        self.pos = pos

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes."""
        end = self.pos + n
        if end > len(self.b):
            raise _Cut
        out = self.b[self.pos : end]
        self.pos = end
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def varint(self) -> int:
        """An MQTT variable byte integer (1-4 bytes, low 7 bits first); -1 when
        a fifth byte would be needed."""
        value = 0
        for shift in (0, 7, 14, 21):
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
        return -1


def _tcp_iot(
    orig_p: int, resp_p: int, orig: bytes | None, resp: bytes | None, o0: int, r0: int
) -> str | None:
    """The IoT and LAN services, each gated by its first bytes or its port."""
    if o0 == 0x10:
        level = _mqtt_connect(orig)
        if level and (level > 0 or _mqtt_connack(resp, -level)):
            return "mqtt"

    if resp_p in MODBUS_PORTS or orig_p in MODBUS_PORTS:
        # The requests come from the side away from the port.
        req, rep = (orig, resp) if resp_p in MODBUS_PORTS else (resp, orig)
        if _modbus_adu(req, True) or _modbus_adu(rep, False):
            return "modbus"

    if (o0 == 0x05 or r0 == 0x05) and (resp_p in DNP3_PORTS or orig_p in DNP3_PORTS):
        if _any(_dnp3_ok, orig, resp, 0):
            return "dnp3_tcp"

    if o0 in _NBSS_TYPES or r0 in _NBSS_TYPES:
        smb_port = resp_p in SMB_PORTS or orig_p in SMB_PORTS
        if _any(_smb_ok, orig, resp, smb_port):
            return "smb"

    if resp_p in MYSQL_PORTS and _mysql_greeting(resp):
        return "mysql,ssl" if _mysql_ssl_request(orig) else "mysql"

    if o0 == 0x03 and r0 == 0x03:
        if _rdp(orig, resp, resp_p in RDP_PORTS):
            return "rdp"
    return None


# MQTT (OASIS MQTT 3.1.1 section 3.1, MQTT 5.0 section 3.1; 3.1 is 3.1.1's
# predecessor with the protocol name "MQIsdp"): protocol name -> levels.
_MQTT_LEVELS = {b"MQTT": (4, 5), b"MQIsdp": (3,)}


def _mqtt_connect(b: bytes | None) -> int:
    """The protocol level of an MQTT CONNECT at the front of ``b``: positive when
    the whole packet parsed, negative when it runs past the bytes kept with all
    fields before that sane, 0 when it is no CONNECT (or was cut short by the
    end of the connection)."""
    if b is None or len(b) < 2 or b[0] != 0x10:
        return 0
    level = 0
    head = _Reader(b, 1)
    try:
        remaining = head.varint()
    except _Cut:
        return 0
    end = head.pos + remaining
    if remaining < 12:  # the shortest CONNECT: "MQTT", level 4, no client id
        return 0

    # Fields are read inside the packet only: one running past its end is cut.
    r = _Reader(b[:end], head.pos)
    try:
        name = r.take(r.u16())
        level = r.u8()
        if level not in _MQTT_LEVELS.get(name, ()):
            return 0
        flags = r.u8()
        if not _mqtt_flags_ok(flags, level):
            return 0
        r.u16()  # keep alive
        if level == 5:
            r.take(_varint_ok(r.varint()))  # CONNECT properties
        r.take(r.u16())  # client identifier
        if flags & 0x04:
            if level == 5:
                r.take(_varint_ok(r.varint()))  # will properties
            r.take(r.u16())  # will topic
            r.take(r.u16())  # will payload
        if flags & 0x80:
            r.take(r.u16())  # user name
        if flags & 0x40:
            r.take(r.u16())  # password
    except _Cut:
        past_kept = end > len(b) >= HEAD_BYTES
        return -level if level and past_kept else 0
    except ValueError:
        return 0
    return level if r.pos == end else 0


def _varint_ok(n: int) -> int:
    """``n`` from :meth:`_Reader.varint`, refused when it was malformed."""
    if n < 0:
        raise ValueError("an MQTT variable byte integer longer than 4 bytes")
    return n


def _mqtt_flags_ok(flags: int, level: int) -> bool:
    """CONNECT flags: reserved bit clear, will QoS below 3, will QoS and retain
    only with a will, and (before MQTT 5) a password only with a user name."""
    if flags & 0x01 or (flags >> 3) & 3 == 3:
        return False
    if not flags & 0x04 and flags & 0x38:
        return False
    return level == 5 or not (flags & 0x40 and not flags & 0x80)


def _mqtt_connack(b: bytes | None, level: int) -> bool:
    """An MQTT CONNACK: acknowledge flags 0/1 and a return code (3.1, 3.1.1: 0-5,
    remaining length 2) or a reason code (5: success or 0x80 and up, then
    properties)."""
    if b is None or len(b) < 4 or b[0] != 0x20 or b[2] > 1:
        return False
    if level == 5:
        return b[1] >= 3 and (b[3] == 0 or b[3] >= 0x80)
    return b[1] == 2 and b[3] <= 5


# Modbus public function codes (Modbus Application Protocol v1.1b3, section 5.1).
_MODBUS_FUNCS = frozenset((1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 15, 16, 17, 20, 21, 22))
_MODBUS_FUNCS |= {23, 24, 43}
# Requests whose data is two 16-bit fields (address, quantity or value).
_MODBUS_FIXED = frozenset((1, 2, 3, 4, 5, 6))
# Most coils / registers a read may ask for, by function code (section 6).
_MODBUS_MAX_READ = {1: 2000, 2: 2000, 3: 125, 4: 125}
_MODBUS_EXCEPTIONS = frozenset((1, 2, 3, 4, 5, 6, 8, 10, 11))


def _modbus_adu(b: bytes | None, request: bool) -> bool:
    """A whole Modbus/TCP message at the front of ``b``: MBAP header (transaction
    id, protocol id 0, length of unit id and PDU, unit id) then a function code,
    with the data that function code pins down agreeing with the length."""
    if b is None or len(b) < 8 or b[2] or b[3]:
        return False
    length = (b[4] << 8) | b[5]
    if not 2 <= length <= 254 or len(b) < 6 + length:
        return False

    fc = b[7]
    data = b[8 : 6 + length]
    if fc & 0x80 and not request:
        code_ok = len(data) == 1 and data[0] in _MODBUS_EXCEPTIONS
        return fc & 0x7F in _MODBUS_FUNCS and code_ok
    if fc not in _MODBUS_FUNCS:
        return False
    if request:
        return _modbus_request_data(fc, data)
    return _modbus_response_data(fc, data)


def _modbus_request_data(fc: int, data: bytes) -> bool:
    """A request's data after function code ``fc``, where the code fixes it."""
    if fc in _MODBUS_FIXED:
        if len(data) != 4:
            return False
        value = (data[2] << 8) | data[3]
        if fc in _MODBUS_MAX_READ:
            return 1 <= value <= _MODBUS_MAX_READ[fc]
        return fc == 6 or value in (0, 0xFF00)
    if fc in (15, 16):  # write multiple coils / registers: count, bytes, values
        if len(data) < 6:
            return False
        quantity = (data[2] << 8) | data[3]
        want = (quantity + 7) // 8 if fc == 15 else 2 * quantity
        return quantity > 0 and data[4] == want == len(data) - 5
    return True


def _modbus_response_data(fc: int, data: bytes) -> bool:
    """A reply's data after function code ``fc``, where the code fixes it."""
    if fc in _MODBUS_MAX_READ:  # a byte count, then that many bytes
        ok = len(data) >= 2 and data[0] == len(data) - 1
        return ok and (fc <= 2 or data[0] % 2 == 0)
    if fc in (5, 6, 15, 16):  # the request's address and value / quantity echoed
        return len(data) == 4
    return True


def _dnp3_crc_step(crc: int) -> int:
    """Eight bit steps of DNP3's CRC-16: polynomial 0x3D65 taken bit-reversed
    (0xA6BC), as the data link layer shifts bits in low first."""
    for _ in range(8):
        crc = (crc >> 1) ^ 0xA6BC if crc & 1 else crc >> 1
    return crc


_DNP3_CRC_TABLE = tuple(_dnp3_crc_step(i) for i in range(256))


def _dnp3_crc(data: bytes) -> int:
    """DNP3's CRC-16 (IEEE 1815 data link layer), a byte at a time; the result
    is complemented."""
    crc = 0
    for byte in data:
        crc = (crc >> 8) ^ _DNP3_CRC_TABLE[(crc ^ byte) & 0xFF]
    return ~crc & 0xFFFF


def _dnp3_ok(b: bytes, _: int) -> bool:
    """A DNP3 link header: start bytes 0x05 0x64, a length of at least 5 (control
    and addresses), the header CRC (low byte first), and one byte past it, which
    Zeek waits for before it confirms."""
    if len(b) < 11 or b[0] != 0x05 or b[1] != 0x64 or b[2] < 5:
        return False
    return _dnp3_crc(b[:8]) == b[8] | (b[9] << 8)


# NetBIOS session service packet types (RFC 1002 section 4.3.1): message,
# request, positive and negative response, retarget, keep-alive.
_NBSS_TYPES = frozenset((0x00, 0x81, 0x82, 0x83, 0x84, 0x85))


def _smb_ok(b: bytes, smb_port: bool) -> bool:
    """An SMB header inside a NetBIOS session message; on the SMB ports other
    session packets may come first."""
    pos = 0
    while pos + 4 <= len(b):
        kind = b[pos]
        if kind not in _NBSS_TYPES or b[pos + 1] & 0xFE:
            return False
        length = ((b[pos + 1] & 1) << 16) | (b[pos + 2] << 8) | b[pos + 3]
        if kind == 0x00:
            return _smb_header(b[pos + 4 : pos + 4 + length], length)
        if not smb_port:
            return False
        pos += 4 + length
    return False


def _smb_header(h: bytes, length: int) -> bool:
    """An SMB1 header (MS-CIFS 2.2.3.1: 32 bytes, then the word count) or an
    SMB2/3 header (MS-SMB2 2.2.1: 64 bytes, structure size 64)."""
    if h[:4] == b"\xffSMB":
        return length >= 33 and len(h) >= 33
    if h[:4] == b"\xfeSMB":
        return length >= 64 and len(h) >= 64 and h[4:6] == b"\x40\x00"
    return False


_MYSQL_VERSION = re.compile(rb"[0-9][!-~]{0,79}\x00")


def _mysql_greeting(b: bytes | None) -> bool:
    """A MySQL server greeting (Handshake V10): packet length (3 bytes, low
    first) and sequence 0, protocol version 10, a version string ending in NUL,
    connection id (4), auth data part 1 (8), a zero filler byte, and the whole
    packet (or all the bytes kept) inside the stated length."""
    if b is None or len(b) < 5 or b[3] != 0 or b[4] != 10:
        return False
    length = b[0] | (b[1] << 8) | (b[2] << 16)
    m = _MYSQL_VERSION.match(b, 5)
    if m is None:
        return False

    filler = m.end() + 12
    if length < filler - 3 or (len(b) < 4 + length and len(b) < HEAD_BYTES):
        return False
    return filler >= len(b) or b[filler] == 0


def _mysql_ssl_request(b: bytes | None) -> bool:
    """A MySQL SSL request (32 bytes, sequence 1, CLIENT_SSL among the
    capabilities) followed at once by a TLS ClientHello."""
    if b is None or len(b) < 36 + 11 or b[:4] != b"\x20\x00\x00\x01":
        return False
    caps = int.from_bytes(b[4:8], "little")
    return bool(caps & 0x0800) and _tls_hello(b[36:], 1)


def _x224(b: bytes | None, code: int) -> bool:
    """A TPKT (RFC 1006: version 3, reserved 0, length) holding an X.224
    connection TPDU of ``code`` (0xE0 request, 0xD0 confirm): its length
    indicator matching the packet, destination reference 0 on a request, class
    0 options."""
    if b is None or len(b) < 11 or b[0] != 3 or b[1] != 0:
        return False
    length = (b[2] << 8) | b[3]
    if length < 11 or b[4] != length - 5 or b[5] & 0xF0 != code:
        return False
    if code == 0xE0 and b[6:8] != b"\x00\x00":
        return False
    return b[10] & 0xF0 == 0


def _rdp(orig: bytes | None, resp: bytes | None, rdp_port: bool) -> bool:
    """RDP's connection setup: the client's X.224 connection request answered by
    the server's confirm, on the RDP port or with the client's mstshash cookie."""
    if not (_x224(orig, 0xE0) and _x224(resp, 0xD0)):
        return False
    return rdp_port or orig[11:28] == b"Cookie: mstshash="


# -- FTP data connections -------------------------------------------------------

# Control connections scanned for announced data connections, and the longest
# segment looked at (control lines are short; bulk data on port 21 is skipped).
FTP_CONTROL_PORTS = (21, 2811)
FTP_SCAN_MAX = 1024

_FTP_PORT = re.compile(
    rb"^[ \t]*PORT[ \t]+(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3})",
    re.IGNORECASE | re.MULTILINE,
)
_FTP_EPRT = re.compile(
    rb"^[ \t]*EPRT[ \t]+(.)([12])\1([0-9A-Fa-f:.]{2,45})\1(\d{1,5})\1",
    re.IGNORECASE | re.MULTILINE,
)
_FTP_227 = re.compile(
    rb"^227[ -][^\r\n]*?(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3})",
    re.MULTILINE,
)
_FTP_229 = re.compile(rb"^229[ -][^\r\n]*?\((.)\1\1(\d{1,5})\1\)", re.MULTILINE)
# Cheap supersets of the patterns above, to skip most control segments.
FTP_HINT_ORIG = re.compile(rb"PORT|EPRT", re.IGNORECASE)
FTP_HINT_RESP = re.compile(rb"22[79]")


class FtpData:
    """Data connections announced on FTP control connections, as Zeek expects them.

    A client's ``PORT``/``EPRT`` announces a connection from the server to the
    given address and port; a server's ``227``/``229`` reply one from the client.
    Each expectation lives :attr:`LIFETIME` seconds and serves one connection,
    which is then ``ftp-data``; at most :attr:`MAX` are held (the oldest go
    first). Both packet paths call :meth:`scan` for every data segment of at
    most :data:`FTP_SCAN_MAX` bytes on a control port, and :meth:`match` for each
    new TCP connection while any expectation is held.
    """

    LIFETIME = 300.0
    MAX = 4096

    def __init__(self) -> None:
        # (orig address, resp address, resp port) -> deadline
        self.expect: dict[tuple[bytes, bytes, int], float] = {}
        # Every port a data connection was announced to (never shrinks): only a
        # new connection to one of these needs match().
        self.ports: set[int] = set()

    def scan(
        self, ts: float, data: bytes, from_orig: bool, orig_h: bytes, resp_h: bytes
    ) -> list[int]:
        """Note the data connections ``data`` announces; their ports."""
        found = []
        if from_orig:
            for m in _FTP_PORT.finditer(data):
                addr, port = _addr_port(m, len(resp_h))
                if addr is not None:
                    found.append((resp_h, addr, port))
            for m in _FTP_EPRT.finditer(data):
                addr = _text_addr(m.group(3), m.group(2) == b"2", len(resp_h))
                port = int(m.group(4))
                if addr is not None and 0 < port < 65536:
                    found.append((resp_h, addr, port))
        else:
            for m in _FTP_227.finditer(data):
                addr, port = _addr_port(m, len(orig_h))
                if addr is not None:
                    found.append((orig_h, addr, port))
            for m in _FTP_229.finditer(data):
                port = int(m.group(2))
                if 0 < port < 65536:
                    found.append((orig_h, resp_h, port))
        expect = self.expect
        for key in found:
            expect.pop(key, None)
            if len(expect) >= self.MAX:
                del expect[next(iter(expect))]
            expect[key] = ts + self.LIFETIME
            self.ports.add(key[2])
        return [key[2] for key in found]

    def match(self, ts: float, orig_h: bytes, resp_h: bytes, resp_p: int) -> bool:
        """Whether a new connection is an announced data connection (used up)."""
        deadline = self.expect.pop((orig_h, resp_h, resp_p), None)
        return deadline is not None and ts <= deadline


def _addr_port(m: re.Match, alen: int) -> tuple[bytes | None, int]:
    nums = [int(x) for x in m.groups()]
    if alen != 4 or max(nums) > 255:
        return None, 0
    port = nums[4] * 256 + nums[5]
    return (bytes(nums[:4]), port) if port else (None, 0)


def _text_addr(text: bytes, v6: bool, alen: int) -> bytes | None:
    if (alen == 16) != v6:
        return None
    try:
        return socket.inet_pton(
            socket.AF_INET6 if v6 else socket.AF_INET, text.decode("ascii")
        )
    except (OSError, UnicodeDecodeError, ValueError):
        return None
