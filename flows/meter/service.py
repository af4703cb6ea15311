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
ntp, dhcp and sip (UDP). Each needs bytes that parse as the protocol; a port
alone never names a service. Everything else stays ``None``. ``ftp-data`` comes
from :class:`FtpData`: the data connections that FTP control connections
announce (PORT/EPRT, 227/229), matched when they start.

The checks are our own reading of the protocols' specifications (RFC 1035, 9110,
8446, 6347, 4253, 959, 5321, 1939, 5905, 2131, 3261), not a translation of
Zeek's analyzers.
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
    if not text:
        return None
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
