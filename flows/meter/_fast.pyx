# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""The compiled packet path of the flow meter: :class:`FastMeter`.

It gives the same records, counters and damage notes as the pure-Python
:class:`flows.meter.meter.FlowMeter` (the reference), with the per-packet work in C:
the pcap record headers, the common link and IP decoding, the flow table (an open
addressing hash table of C structs), Zeek's TCP endpoint machine, the history
letters, the reassembly bookkeeping for missed bytes, the timer heap and the
first payload bytes of each side (named by :mod:`flows.meter.service`, the
same Python function as the Python path's, when a record is made). A packet
that is not a plain IPv4/IPv6 datagram on a common link type (fragments, tunnels,
extension headers, MPLS, PPPoE, 802.11, damaged headers) is decoded by the Python
:class:`flows.meter.decode.Decoder`, and its result metered here. Python objects
are made per connection (its record), not per packet.
"""

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, qsort, realloc
from libc.string cimport memcmp, memcpy, memset
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)

import os
from collections import Counter

from flows.meter.decode import LINK_NAMES, Decoder
from flows.record import TS_LIMIT, packet_time_problem
from flows.meter import service as _service
from flows.meter.meter import (
    PacketDamage,
    TCP_SERVER_PORTS,
    UDP_SERVER_PORTS,
    Timeouts,
)


cdef extern from "arpa/inet.h" nogil:
    const char* inet_ntop(int af, const void* src, char* dst, unsigned int size)

cdef extern from "sys/socket.h" nogil:
    int AF_INET
    int AF_INET6


# Zeek's TCP endpoint states and the TCP flag bits (as in conn.py).
DEF INACTIVE = 0
DEF SYN_SENT = 1
DEF SYN_ACK_SENT = 2
DEF PARTIAL = 3
DEF ESTABLISHED = 4
DEF CLOSED = 5
DEF RESET = 6
DEF F_FIN = 0x01
DEF F_SYN = 0x02
DEF F_RST = 0x04
DEF F_ACK = 0x10
# Once-only history bits (orig side; the responder's are << 16).
DEF H_SYN = 1
DEF H_FIN = 2
DEF H_RST = 4
DEF H_DATA = 8
DEF H_ACK = 16
DEF H_MULTI = 32
DEF H_FINRST = 64
# Scaled letters C, G, T, W.
DEF L_C = 0
DEF L_G = 1
DEF L_T = 2
DEF L_W = 3
# Connection kinds.
DEF P_TCP = 0
DEF P_UDP = 1
DEF P_ICMP = 2
DEF P_OTHER = 3
# Skip reasons, indexed like decode.SKIP_* (1..8; 8 is the meter's own time check).
DEF S_NON_IP = 1
DEF S_CUT = 2
DEF S_BOGUS = 3
DEF S_LINK = 4
DEF S_FRAGMENT = 5
DEF S_OTHER = 6
DEF S_WIRE = 7
DEF S_TIME = 8
# Why connections ended.
DEF E_CLOSED = 0
DEF E_INACTIVE = 1
DEF E_ATTEMPT = 2
DEF E_REUSED = 3
DEF E_EVICTED = 4
DEF E_END = 5
DEF MAX_SEGS = 256
DEF HBUF = 24
DEF MAX_RECORD = 1048576
DEF MAX_LINKS = 64
# The first payload bytes kept per side for the service (flows.meter.service).
DEF HEAD_BYTES = 256
DEF HEAD_SEGS = 8
# FTP control connections (ports 21, 2811) are scanned for announced data
# connections in segments of at most FTP_SCAN_MAX bytes (flows.meter.service).
DEF FTP_SCAN_MAX = 1024
DEF ORD_CARET = 94
DEF ORD_I = 73
DEF ORD_S = 83
DEF ORD_H = 72
DEF ORD_F = 70
DEF ORD_R = 82
DEF ORD_Q = 81
DEF ORD_D = 68
DEF ORD_A = 65

cdef double INF = float("inf")
# flows.record.TS_LIMIT as a C double: a packet time at or past it is no date.
cdef double C_TS_LIMIT = TS_LIMIT
cdef const char* SCALED = "CGTW"

SKIP_REASONS = (
    None,
    "non_ip",
    "cut_header",
    "bad_header",
    "unknown_link_type",
    "fragments_held",
    "other_ip_protocol",
    "truncated_ip",
    "bad_time",
)
END_REASONS = ("closed", "inactive", "attempt", "reused", "evicted", "end_of_input")
_PROTO_NAMES = ("tcp", "udp", "icmp", "unknown_transport")

cdef int[256] ICMP4_PAIR
cdef int[256] ICMP6_PAIR


cdef void _init_pairs():
    cdef int i
    for i in range(256):
        ICMP4_PAIR[i] = -1
        ICMP6_PAIR[i] = -1
    for a, b in ((8, 0), (13, 14), (15, 16), (10, 9), (17, 18)):
        ICMP4_PAIR[a] = b
        ICMP4_PAIR[b] = a
    for a, b in (
        (128, 129), (133, 134), (135, 136), (130, 131), (139, 140), (144, 145)
    ):
        ICMP6_PAIR[a] = b
        ICMP6_PAIR[b] = a


_init_pairs()

if (HEAD_BYTES, HEAD_SEGS, FTP_SCAN_MAX, (21, 2811)) != (
    _service.HEAD_BYTES,
    _service.HEAD_SEGS,
    _service.FTP_SCAN_MAX,
    _service.FTP_CONTROL_PORTS,
):
    raise ImportError(
        "flows.meter._fast was built for other service head sizes: rebuild it"
    )
_identify = _service.identify


cdef struct Seg:
    int64_t lo
    int64_t hi


cdef struct Endpoint:
    int state
    int prev_state
    int64_t start
    int64_t last
    int64_t ack
    int64_t fin_cnt
    int64_t fin_seq
    bint did_close
    int64_t pkts
    int64_t ip_bytes
    int64_t size
    int64_t deliv
    Seg* segs
    int nsegs
    int64_t missed
    int64_t cnt[4]
    int64_t thr[4]
    int64_t last_syn
    int64_t last_fin
    int64_t last_rst
    bint has_syn
    bint has_fin
    bint has_rst
    bint active
    # The first payload bytes of this side (see keep_head), for the service:
    # HEAD_BYTES allocated at the first payload, so scans and bare handshakes
    # cost nothing.
    uint8_t* head
    int head_len
    int head_segs
    uint32_t head_next


cdef struct Key:
    uint8_t kind
    uint8_t ver
    uint8_t oneway
    uint8_t proto
    uint16_t p1
    uint16_t p2
    uint8_t a1[16]
    uint8_t a2[16]


cdef struct Conn:
    Key key
    uint64_t hash
    uint64_t order
    int proto
    int ver
    uint8_t orig_h[16]
    uint8_t resp_h[16]
    int orig_p
    int resp_p
    double start_ts
    double last_ts
    char* hist
    int hlen
    int hcap
    char hbuf[HBUF]
    uint32_t seen
    Endpoint e[2]
    int oi
    double remove_at
    double attempt_at
    bint alive
    bint ftp_data
    Conn* prev
    Conn* next


cdef struct HeapEnt:
    double due
    uint64_t tie
    Conn* c


# -- small helpers --------------------------------------------------------------


cdef inline uint16_t be16(const uint8_t* p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | p[1]


cdef inline uint32_t be32(const uint8_t* p) noexcept nogil:
    return (
        (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]
    )


cdef inline uint32_t le32(const uint8_t* p) noexcept nogil:
    return (
        (<uint32_t>p[3] << 24) | (<uint32_t>p[2] << 16) | (<uint32_t>p[1] << 8) | p[0]
    )


cdef inline object where(int64_t offset):
    """A packet's file offset for damage notes (None: a live frame has none)."""
    return None if offset < 0 else offset


cdef inline Endpoint* ORIG(Conn* c) noexcept nogil:
    return &c.e[c.oi]


cdef inline Endpoint* RESP(Conn* c) noexcept nogil:
    return &c.e[1 - c.oi]


cdef inline bint is_orig_ep(Conn* c, Endpoint* ep) noexcept nogil:
    return ep == &c.e[c.oi]


cdef inline Endpoint* other_ep(Conn* c, Endpoint* ep) noexcept nogil:
    return &c.e[1] if ep == &c.e[0] else &c.e[0]


cdef inline int64_t unwrap(int64_t seq, int64_t ref) noexcept nogil:
    """The 64-bit sequence number closest to ``ref`` whose low 32 bits are ``seq``."""
    cdef int64_t half = 0x80000000LL, mask = 0xFFFFFFFFLL
    return ref + (((seq - ref) + half) & mask) - half


cdef inline uint64_t key_hash(const Key* k) noexcept nogil:
    cdef uint64_t w[5]
    cdef uint64_t h = 0x9E3779B97F4A7C15ULL
    cdef int i
    memcpy(w, k, 40)
    for i in range(5):
        h ^= w[i]
        h *= 0xBF58476D1CE4E5B9ULL
        h ^= h >> 31
    return h


cdef int hist_push(Conn* c, char ch) except -1:
    cdef char* grown
    if c.hlen == c.hcap:
        if c.hist == c.hbuf:
            grown = <char*>malloc(c.hcap * 2)
            if grown == NULL:
                raise MemoryError()
            memcpy(grown, c.hbuf, c.hlen)
        else:
            grown = <char*>realloc(c.hist, c.hcap * 2)
            if grown == NULL:
                raise MemoryError()
        c.hist = grown
        c.hcap *= 2
    c.hist[c.hlen] = ch
    c.hlen += 1
    return 0


cdef inline char lower(char ch) noexcept nogil:
    if 65 <= ch <= 90:
        return ch + 32
    return ch


cdef int check(Conn* c, Endpoint* ep, uint32_t mask, char code) except -1:
    """Add ``code`` once per side; 1 when it had been seen already."""
    if not is_orig_ep(c, ep):
        mask <<= 16
        code = lower(code)
    if c.seen & mask:
        return 1
    c.seen |= mask
    hist_push(c, code)
    return 0


cdef int add(Conn* c, Endpoint* ep, char code) except -1:
    hist_push(c, code if is_orig_ep(c, ep) else lower(code))
    return 0


cdef int scaled(Conn* c, Endpoint* ep, int letter) except -1:
    """Add a letter on the 1st, 10th, 100th ... time it happens on this side."""
    cdef char code = SCALED[letter]
    ep.cnt[letter] += 1
    if ep.cnt[letter] == ep.thr[letter]:
        hist_push(c, code if is_orig_ep(c, ep) else lower(code))
        ep.thr[letter] *= 10
    return 0


cdef int flip(Conn* c) except -1:
    cdef uint8_t tmp[16]
    cdef int p
    memcpy(tmp, c.orig_h, 16)
    memcpy(c.orig_h, c.resp_h, 16)
    memcpy(c.resp_h, tmp, 16)
    p = c.orig_p
    c.orig_p = c.resp_p
    c.resp_p = p
    c.oi = 1 - c.oi
    hist_push(c, ORD_CARET)
    return 0


cdef void ep_init(Endpoint* ep) noexcept nogil:
    cdef int i
    memset(ep, 0, sizeof(Endpoint))
    ep.state = INACTIVE
    ep.prev_state = INACTIVE
    for i in range(4):
        ep.thr[i] = 1


cdef inline void set_state(Endpoint* ep, int state) noexcept nogil:
    ep.prev_state = ep.state
    ep.state = state


cdef int64_t tcp_size(Endpoint* ep, Endpoint* peer) noexcept nogil:
    cdef int64_t top, size
    if (
        ep.prev_state == SYN_SENT
        and ep.state == RESET
        and peer.state == INACTIVE
        and ep.ack != ep.start
        and ep.ack != ep.start + 1
    ):
        return 0
    top = ep.last if ep.last > ep.ack else ep.ack
    size = top - ep.start
    if size > 0:
        size -= 1
    if ep.fin_cnt and size > 0:
        size -= 1
    return size if size > 0 else 0


cdef void free_conn(Conn* c) noexcept nogil:
    if c.hist != c.hbuf:
        free(c.hist)
    free(c.e[0].segs)
    free(c.e[1].segs)
    free(c.e[0].head)
    free(c.e[1].head)
    free(c)


# -- reassembly bookkeeping (as conn._deliver, _absorb) -------------------------


cdef int absorb(Endpoint* ep) noexcept nogil:
    """Move ``deliv`` over buffered pieces that now touch it (pieces are sorted)."""
    cdef int i, k = 0
    for i in range(ep.nsegs):
        if ep.segs[i].lo <= ep.deliv:
            if ep.segs[i].hi > ep.deliv:
                ep.deliv = ep.segs[i].hi
        else:
            ep.segs[k] = ep.segs[i]
            k += 1
    ep.nsegs = k
    return 0


cdef int deliver(Endpoint* ep, int64_t start, int64_t n) except -1:
    """Note ``n`` captured data bytes of ``ep`` from ``start`` on."""
    cdef int64_t end = start + n
    cdef int i, k
    cdef Seg s
    if start <= ep.deliv:
        if end > ep.deliv:
            ep.deliv = end
            if ep.nsegs:
                absorb(ep)
        return 0
    if ep.segs == NULL:
        ep.segs = <Seg*>malloc(sizeof(Seg) * (MAX_SEGS + 1))
        if ep.segs == NULL:
            raise MemoryError()
    if ep.nsegs >= MAX_SEGS:
        # Far too many holes to track: forget the oldest piece (bounded memory).
        for i in range(1, ep.nsegs):
            ep.segs[i - 1] = ep.segs[i]
        ep.nsegs -= 1
    # Insert in (lo, hi) order, then merge overlapping or touching pieces.
    s.lo = start
    s.hi = end
    i = ep.nsegs
    while i > 0 and (
        ep.segs[i - 1].lo > s.lo
        or (ep.segs[i - 1].lo == s.lo and ep.segs[i - 1].hi > s.hi)
    ):
        ep.segs[i] = ep.segs[i - 1]
        i -= 1
    ep.segs[i] = s
    ep.nsegs += 1
    k = 0
    for i in range(1, ep.nsegs):
        if ep.segs[i].lo <= ep.segs[k].hi:
            if ep.segs[i].hi > ep.segs[k].hi:
                ep.segs[k].hi = ep.segs[i].hi
        else:
            k += 1
            ep.segs[k] = ep.segs[i]
    ep.nsegs = k + 1
    return 0


cdef int acked(Conn* c, Endpoint* ep, int64_t upto) except -1:
    """The peer acknowledged ``ep``'s data up to ``upto``: count what was missed."""
    cdef int64_t covered = 0, missing, lo, hi, a, b
    cdef int i, k
    cdef Endpoint* peer
    if ep.fin_cnt and upto >= ep.fin_seq:
        upto = ep.fin_seq - 1
    if upto <= ep.deliv:
        return 0
    if ep.nsegs:
        k = 0
        for i in range(ep.nsegs):
            lo = ep.segs[i].lo
            hi = ep.segs[i].hi
            if lo < upto:
                a = hi if hi < upto else upto
                b = lo if lo > ep.deliv else ep.deliv
                covered += a - b
                if hi > upto:
                    ep.segs[k].lo = upto
                    ep.segs[k].hi = hi
                    k += 1
            else:
                ep.segs[k].lo = lo
                ep.segs[k].hi = hi
                k += 1
        ep.nsegs = k
    missing = upto - ep.deliv - covered
    ep.deliv = upto
    if ep.nsegs:
        absorb(ep)
    peer = other_ep(c, ep)
    if (
        missing > 0
        and ep.state != INACTIVE
        and ep.state != PARTIAL
        and peer.state != PARTIAL
    ):
        ep.missed += missing
        scaled(c, ep, L_G)
    return 0


cdef int tcp_history(
    Conn* c, Endpoint* ep, int flags, int64_t rel, int64_t length
) except -1:
    cdef int bits = (1 if flags & F_SYN else 0) + (1 if flags & F_FIN else 0) + (
        1 if flags & F_RST else 0
    )
    cdef char code
    if bits > 1:
        if flags & F_FIN and flags & F_RST:
            check(c, ep, H_FINRST, ORD_I)
        else:
            check(c, ep, H_MULTI, ORD_Q)
    elif bits == 1:
        if flags & F_SYN:
            code = ORD_H if flags & F_ACK else ORD_S
            if check(c, ep, H_SYN, code) and (not ep.has_syn or rel != ep.last_syn):
                add(c, ep, code)
            ep.last_syn = rel
            ep.has_syn = True
        elif flags & F_FIN:
            if check(c, ep, H_FIN, ORD_F) and (
                not ep.has_fin or rel + length != ep.last_fin
            ):
                add(c, ep, ORD_F)
            ep.last_fin = rel + length
            ep.has_fin = True
        else:
            if check(c, ep, H_RST, ORD_R) and (not ep.has_rst or rel != ep.last_rst):
                add(c, ep, ORD_R)
            ep.last_rst = rel
            ep.has_rst = True
    elif length:
        check(c, ep, H_DATA, ORD_D)
    elif flags & F_ACK:
        check(c, ep, H_ACK, ORD_A)
    return 0


cdef int tcp_state(
    Conn* c, double ts, Endpoint* ep, Endpoint* peer, bint is_orig, int flags,
    int64_t s64, int64_t length
) except -1:
    """Zeek's endpoint state machine; 1 when this packet closes ``ep``."""
    cdef int state = ep.state
    cdef bint f_syn = flags & F_SYN, f_fin = flags & F_FIN
    cdef bint f_rst = flags & F_RST, f_ack = flags & F_ACK
    cdef int do_close = 0
    if state == INACTIVE:
        if f_syn:
            if is_orig:
                set_state(ep, SYN_ACK_SENT if f_ack else SYN_SENT)
                if c.attempt_at == INF:
                    c.attempt_at = ts
            else:
                if not f_ack and peer.state == SYN_ACK_SENT and s64 == ep.start:
                    # SYN and SYN-ACK seen in swapped order: flip and establish.
                    flip(c)
                    set_state(peer, ESTABLISHED)
                if peer.state == SYN_SENT:
                    set_state(peer, ESTABLISHED)
                set_state(ep, ESTABLISHED)
        if f_fin:
            set_state(ep, CLOSED)
            do_close = 1
        if f_rst:
            set_state(ep, RESET)
            do_close = 1
        if ep.state == INACTIVE:
            if not is_orig and length == 0 and ORIG(c).state == SYN_SENT:
                pass  # an ACK of the SYN before the SYN-ACK: not partial
            elif f_ack and peer.state == ESTABLISHED:
                set_state(ep, ESTABLISHED)
            else:
                set_state(ep, PARTIAL)
    elif state == SYN_SENT or state == SYN_ACK_SENT:
        if f_syn and s64 != ep.start:
            ep.start = s64
            ep.ack = s64
            ep.last = s64
            ep.deliv = s64 + 1
            ep.nsegs = 0
        if f_fin:
            set_state(ep, CLOSED)
            do_close = 1
        if f_rst:
            set_state(ep, RESET)
            do_close = 1
    elif state == PARTIAL or state == ESTABLISHED:
        if f_syn and state == PARTIAL and peer.state == INACTIVE and not f_ack:
            set_state(ep, SYN_SENT)
        if f_fin and not f_rst:
            set_state(ep, CLOSED)
            if peer.state == RESET and peer.prev_state == CLOSED:
                set_state(peer, CLOSED)
            do_close = 1
        if f_rst:
            set_state(ep, RESET)
            do_close = 1
    elif state == CLOSED:
        if f_rst:
            set_state(ep, RESET)
            do_close = 0 if ep.did_close else 1
    return do_close


cdef int conn_tcp(
    Conn* c, double ts, bint is_orig, int64_t ip_len, int flags, int64_t seq,
    int64_t ack, int win, int64_t length, int64_t captured,
    double close_delay, double reset_delay
) except -1:
    """One TCP segment: ``length`` payload bytes claimed, ``captured`` present."""
    cdef Endpoint* ep
    cdef Endpoint* peer
    cdef bint f_syn = flags & F_SYN, f_fin = flags & F_FIN
    cdef bint f_rst = flags & F_RST, f_ack = flags & F_ACK
    cdef int64_t seg_len, ref, s64, rel, a64, end, delta
    cdef int64_t acked_to = 0
    cdef bint has_acked = False
    cdef int do_close
    if is_orig:
        ep = ORIG(c)
        peer = RESP(c)
    else:
        ep = RESP(c)
        peer = ORIG(c)
    ep.pkts += 1
    ep.ip_bytes += ip_len
    seg_len = length + (1 if f_syn else 0) + (1 if f_fin else 0)
    if ep.state == INACTIVE:
        if f_syn:
            ep.start = seq
            ep.ack = seq
            ep.last = seq + seg_len
        else:
            ep.start = seq - 1
            ep.ack = seq - 1
            ep.last = seq
        ep.deliv = ep.start + 1
        ep.nsegs = 0
    ref = ep.last
    s64 = unwrap(seq, ref)
    rel = s64 - ep.start

    tcp_history(c, ep, flags, rel, length)
    if win == 0 and not f_rst and peer.state != CLOSED and ep.state != RESET:
        scaled(c, ep, L_W)
    if not (ORIG(c).did_close and RESP(c).did_close):
        c.last_ts = ts

    if f_fin:
        ep.fin_cnt += 1
        ep.fin_seq = s64 + seg_len

    if f_ack:
        if peer.state == INACTIVE:
            peer.start = ack
            peer.last = ack
            peer.ack = ack
            peer.deliv = ack + 1
            peer.nsegs = 0
        else:
            a64 = unwrap(ack, peer.ack)
            if a64 >= peer.start:
                if a64 > peer.ack:
                    peer.ack = a64
                acked_to = a64
                has_acked = True

    end = s64 + seg_len
    delta = end - ep.last
    if (f_syn or f_rst) and (delta > 16384 or delta < -16384):
        ep.last = end
    elif delta > 0:
        ep.last = end
    elif length > 0:
        scaled(c, ep, L_T)

    do_close = tcp_state(c, ts, ep, peer, is_orig, flags, s64, length)

    if length > 0 and captured > 0:
        deliver(ep, s64 + (1 if f_syn else 0), captured)
    if has_acked and acked_to > peer.deliv:
        acked(c, peer, acked_to)
    if do_close:
        ep.did_close = True
        if ep.state == RESET or peer.did_close or peer.state == INACTIVE:
            c.remove_at = c.last_ts + (
                reset_delay if ep.state == RESET else close_delay
            )
    return 0


cdef int head_alloc(Endpoint* ep) except -1:
    if ep.head == NULL:
        ep.head = <uint8_t*>malloc(HEAD_BYTES)
        if ep.head == NULL:
            raise MemoryError()
    return 0


cdef int keep_head(
    Endpoint* ep, const uint8_t* data, int64_t captured, int64_t length,
    int64_t seq, int flags
) except -1:
    """Keep the first payload bytes of a TCP side, as FlowMeter._head does: its
    first data segment, grown by the segments that follow it in order, up to
    HEAD_BYTES bytes and HEAD_SEGS segments."""
    cdef uint32_t start = <uint32_t>(seq + 1) if flags & F_SYN else <uint32_t>seq
    cdef int64_t take = HEAD_BYTES - ep.head_len
    if ep.head_segs != 0 and start != ep.head_next:
        return 0
    head_alloc(ep)
    if take > captured:
        take = captured
    memcpy(ep.head + ep.head_len, data, take)
    ep.head_len += take
    ep.head_segs += 1
    ep.head_next = start + <uint32_t>captured  # wraps as the sequence space does
    if captured < length or ep.head_len >= HEAD_BYTES:
        ep.head_segs = HEAD_SEGS
    return 0


cdef bint may_announce(const uint8_t* p, int64_t n, bint from_orig) noexcept nogil:
    """Whether FTP control data can hold what FtpData.scan looks for: PORT or
    EPRT (any case) from the client, 227 or 229 from the server (a cheap
    superset of its patterns, so most control segments skip the Python call)."""
    cdef int64_t i
    cdef uint8_t a, b, c, d
    for i in range(n - 3):
        a = p[i] | 0x20
        b = p[i + 1] | 0x20
        c = p[i + 2] | 0x20
        d = p[i + 3] | 0x20
        if from_orig:
            if (a == 112 and b == 111 and c == 114 and d == 116) or (  # port
                a == 101 and b == 112 and c == 114 and d == 116  # eprt
            ):
                return True
        elif p[i] == 50 and p[i + 1] == 50 and (p[i + 2] == 55 or p[i + 2] == 57):
            return True  # 227, 229
    return False


cdef int sum_ok(int ver, const uint8_t* src, const uint8_t* dst, int proto,
                const uint8_t* l4, int64_t length) noexcept nogil:
    """Whether the transport checksum of a whole captured segment is right."""
    cdef uint64_t total = 0
    cdef int64_t i
    cdef int alen = 4 if ver == 4 else 16
    if proto != 1:
        for i in range(0, alen, 2):
            total += (<uint64_t>src[i] << 8) | src[i + 1]
            total += (<uint64_t>dst[i] << 8) | dst[i + 1]
        if ver == 4:
            total += proto
            total += length & 0xFFFF
        else:
            total += (length >> 16) & 0xFFFF
            total += length & 0xFFFF
            total += proto
    i = 0
    while i + 1 < length:
        total += (<uint64_t>l4[i] << 8) | l4[i + 1]
        i += 2
    if i < length:
        total += <uint64_t>l4[i] << 8
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


cdef int cmp_victims(const void* a, const void* b) noexcept nogil:
    cdef Conn* x = (<Conn**>a)[0]
    cdef Conn* y = (<Conn**>b)[0]
    if x.last_ts < y.last_ts:
        return -1
    if x.last_ts > y.last_ts:
        return 1
    if x.order < y.order:
        return -1
    return 1 if x.order > y.order else 0


cdef struct Decoded:
    int ver
    const uint8_t* src
    const uint8_t* dst
    int proto
    int64_t ip_len
    const uint8_t* l4
    int64_t l4n
    int64_t l4_len


# Results of the C decoder: a packet, a skip reason, or "let Python decode it".
DEF D_PACKET = 0
DEF D_FALLBACK = -1


cdef int dec_ip4(
    const uint8_t* p, int64_t n, int64_t off, int64_t w, Decoded* out
) noexcept nogil:
    cdef int vhl, ihl, proto
    cdef int64_t total, end
    cdef uint16_t frag
    if n < off + 20:
        return D_FALLBACK
    vhl = p[off]
    ihl = (vhl & 0x0F) << 2
    if vhl >> 4 != 4 or ihl < 20:
        return D_FALLBACK
    total = be16(p + off + 2)
    frag = be16(p + off + 6)
    if total == 0:
        total = w
    if total < ihl or total > w or n < off + ihl:
        return D_FALLBACK
    proto = p[off + 9]
    if proto == 4 or proto == 41 or proto == 47 or frag & 0x3FFF:
        return D_FALLBACK
    out.ver = 4
    out.src = p + off + 12
    out.dst = p + off + 16
    out.proto = proto
    out.ip_len = total
    out.l4 = p + off + ihl
    end = off + total
    if end > n:
        end = n
    out.l4n = end - off - ihl
    out.l4_len = total - ihl
    return D_PACKET


cdef int dec_ip6(
    const uint8_t* p, int64_t n, int64_t off, int64_t w, Decoded* out
) noexcept nogil:
    cdef int nh
    cdef int64_t total, pos, end, cap
    if n < off + 40 or p[off] >> 4 != 6:
        return D_FALLBACK
    nh = p[off + 6]
    total = 40 + be16(p + off + 4)
    if total > w:
        return D_FALLBACK
    # Extension headers, fragments and tunnels: the Python decoder walks them.
    if (
        nh == 0 or nh == 43 or nh == 60 or nh == 135 or nh == 139 or nh == 140
        or nh == 253 or nh == 254 or nh == 44 or nh == 51
        or nh == 4 or nh == 41 or nh == 47
    ):
        return D_FALLBACK
    pos = off + 40
    end = off + total
    out.ver = 6
    out.src = p + off + 8
    out.dst = p + off + 24
    out.proto = nh
    out.ip_len = total
    out.l4 = p + pos
    cap = end if end < n else n
    out.l4n = cap - pos if cap > pos else 0
    out.l4_len = end - pos
    return D_PACKET


cdef int dec_frame(
    int link, const uint8_t* p, int64_t n, int64_t wire, Decoded* out
) noexcept nogil:
    """Decode the common frames; D_FALLBACK for anything the Python decoder must see."""
    cdef int64_t off
    cdef uint32_t et, fam
    if link == 1:
        if n < 14:
            return D_FALLBACK
        et = be16(p + 12)
        off = 14
    elif link == 101 or link == 12 or link == 14 or link == 228 or link == 229:
        if n <= 0:
            return D_FALLBACK
        if p[0] >> 4 == 4:
            return dec_ip4(p, n, 0, wire, out)
        if p[0] >> 4 == 6:
            return dec_ip6(p, n, 0, wire, out)
        return D_FALLBACK
    elif link == 113:
        if n < 16:
            return D_FALLBACK
        et = be16(p + 14)
        off = 16
    elif link == 276:
        if n < 20:
            return D_FALLBACK
        et = be16(p)
        off = 20
    elif link == 0 or link == 108:
        if n < 4:
            return D_FALLBACK
        fam = be32(p) if link == 108 else le32(p)
        if fam > 0xFFFF:
            fam = be32(p)
        if fam == 2:
            return dec_ip4(p, n, 4, wire - 4, out)
        if fam == 10 or fam == 24 or fam == 28 or fam == 30:
            return dec_ip6(p, n, 4, wire - 4, out)
        return S_NON_IP
    else:
        return D_FALLBACK
    while True:
        if et == 0x0800:
            return dec_ip4(p, n, off, wire - off, out)
        if et == 0x86DD:
            return dec_ip6(p, n, off, wire - off, out)
        if et == 0x8100 or et == 0x88A8 or et == 0x9100 or et == 0x9200:
            if n < off + 4:
                return D_FALLBACK
            et = be16(p + off + 2)
            off += 4
            continue
        if et == 0x8847 or et == 0x8848 or et == 0x8864:
            return D_FALLBACK
        return S_NON_IP


# TODO(gap): speed outside the capture files' common case. Live frames reach
# FastMeter.feed one Python call (and bytes object) per packet (pcapy's callback),
# and frames the C decoder leaves to the Python Decoder (fragments, tunnels, IPv6
# extension headers, MPLS, PPPoE, 802.11) run at the Python path's speed.
cdef class FastMeter:
    """The compiled flow meter, with the interface of :class:`FlowMeter`.

    ``feed``, ``pop_done``, ``flush``, ``stats``, ``done`` and ``damage`` behave as
    the Python meter's; :meth:`pcap_bulk` and :meth:`pcapng_bulk` meter runs of
    whole pcap records or pcapng packet blocks straight from the reader's buffer.
    """

    cdef public object timeouts
    cdef public object decoder
    cdef public list done
    cdef public object damage
    cdef object _last_damaged
    cdef public object first_ts
    cdef public int max_flows
    cdef public bint check_checksums
    cdef public bint unknown_transport
    cdef public object tcp_server_ports
    cdef public object udp_server_ports
    cdef double t_tcp, t_udp, t_icmp, t_other, t_close, t_reset, t_attempt
    cdef uint8_t tcp_ports[8192]
    cdef uint8_t udp_ports[8192]
    cdef uint64_t uid_base, uids
    cdef uint64_t tie, order
    cdef Conn** slots
    cdef uint64_t cap, count
    cdef Conn* head
    cdef Conn* tail
    cdef HeapEnt* heap
    cdef uint64_t hlen, hcap
    cdef public int64_t packets, flows, evicted, snap_cut
    cdef int64_t nbytes
    cdef int64_t skips[9]
    cdef int skip_order[9]
    cdef int nskip_order
    cdef int64_t ends[6]
    cdef int end_order[6]
    cdef int nend_order
    cdef int64_t link_ids[MAX_LINKS]
    cdef int64_t link_counts[MAX_LINKS]
    cdef int nlinks
    cdef object _more_links
    cdef public double last_ts
    cdef double next_sweep
    cdef public object ftp
    cdef bint ftp_seen
    # Ports an FTP data connection was ever announced to: only a new connection
    # to one of them asks self.ftp.match (bits are never cleared).
    cdef uint8_t ftp_ports[8192]

    def __cinit__(self):
        self.slots = NULL
        self.heap = NULL

    def __init__(
        self,
        timeouts=None,
        *,
        max_flows=1_000_000,
        check_checksums=False,
        tcp_server_ports=TCP_SERVER_PORTS,
        udp_server_ports=UDP_SERVER_PORTS,
        uid_seed=None,
        unknown_transport=True,
    ):
        if max_flows < 1:
            from flows.errors import UsageError

            raise UsageError(f"max_flows must be at least 1, got {max_flows}")
        self.timeouts = timeouts or Timeouts()
        t = self.timeouts
        self.t_tcp, self.t_udp = t.tcp, t.udp
        self.t_icmp, self.t_other = t.icmp, t.other
        self.t_close, self.t_reset = t.tcp_close_delay, t.tcp_reset_delay
        self.t_attempt = t.tcp_attempt_delay
        self.max_flows = max_flows
        self.check_checksums = check_checksums
        self.unknown_transport = unknown_transport
        self.tcp_server_ports = tcp_server_ports
        self.udp_server_ports = udp_server_ports
        memset(self.tcp_ports, 0, 8192)
        memset(self.udp_ports, 0, 8192)
        for port in tcp_server_ports:
            if 0 <= port <= 0xFFFF:
                self.tcp_ports[port >> 3] |= 1 << (port & 7)
        for port in udp_server_ports:
            if 0 <= port <= 0xFFFF:
                self.udp_ports[port >> 3] |= 1 << (port & 7)
        salt = uid_seed.encode() if uid_seed is not None else os.urandom(8)
        self.uid_base = int.from_bytes(salt.ljust(8, b"\0")[:8], "big")
        self.uids = 0
        self.tie = 0
        self.order = 0
        self.decoder = Decoder()
        self.ftp = _service.FtpData()  # announced FTP data connections
        self.ftp_seen = False
        memset(self.ftp_ports, 0, sizeof(self.ftp_ports))
        self.done = []
        self.damage = None
        self._last_damaged = None
        self.first_ts = None
        self.last_ts = -INF
        self.next_sweep = -INF
        self.packets = self.nbytes = self.flows = self.evicted = self.snap_cut = 0
        memset(self.skips, 0, sizeof(self.skips))
        memset(self.ends, 0, sizeof(self.ends))
        self.nskip_order = self.nend_order = self.nlinks = 0
        self._more_links = {}
        self.cap = 1024
        self.count = 0
        free(self.slots)
        self.slots = <Conn**>malloc(sizeof(Conn*) * self.cap)
        if self.slots == NULL:
            raise MemoryError()
        memset(self.slots, 0, sizeof(Conn*) * self.cap)
        self.head = self.tail = NULL
        self.hcap = 1024
        self.hlen = 0
        free(self.heap)
        self.heap = <HeapEnt*>malloc(sizeof(HeapEnt) * self.hcap)
        if self.heap == NULL:
            raise MemoryError()

    def __dealloc__(self):
        cdef uint64_t i
        if self.heap != NULL:
            # Every connection, open or ended, has exactly one heap entry.
            for i in range(self.hlen):
                free_conn(self.heap[i].c)
            free(self.heap)
        free(self.slots)

    # -- counters -----------------------------------------------------------------

    cdef inline void skip(self, int reason) noexcept:
        if self.skips[reason] == 0:
            self.skip_order[self.nskip_order] = reason
            self.nskip_order += 1
        self.skips[reason] += 1

    cdef inline void ended_as(self, int why) noexcept:
        if self.ends[why] == 0:
            self.end_order[self.nend_order] = why
            self.nend_order += 1
        self.ends[why] += 1

    cdef inline void count_link(self, int64_t link) noexcept:
        cdef int i
        if self.nlinks and self.link_ids[self.nlinks - 1] == link:
            self.link_counts[self.nlinks - 1] += 1
            return
        for i in range(self.nlinks):
            if self.link_ids[i] == link:
                self.link_counts[i] += 1
                return
        if self.nlinks < MAX_LINKS:
            self.link_ids[self.nlinks] = link
            self.link_counts[self.nlinks] = 1
            self.nlinks += 1
        else:
            self._more_links[link] = self._more_links.get(link, 0) + 1

    @property
    def skipped(self):
        """Skipped packets by reason (a Counter, in the order reasons first came)."""
        out = Counter()
        for i in range(self.nskip_order):
            out[SKIP_REASONS[self.skip_order[i]]] = self.skips[self.skip_order[i]]
        return out

    @property
    def ended(self):
        """Ended connections by reason (a Counter)."""
        out = Counter()
        for i in range(self.nend_order):
            out[END_REASONS[self.end_order[i]]] = self.ends[self.end_order[i]]
        return out

    @property
    def link_types(self):
        """Packets by link type number, in the order link types first came."""
        out = {self.link_ids[i]: self.link_counts[i] for i in range(self.nlinks)}
        out.update(self._more_links)
        return out

    @property
    def bytes(self):
        """Bytes on the wire of every packet fed."""
        return self.nbytes

    @property
    def open_flows(self):
        return self.count

    @property
    def stats(self):
        """Counters for ``flows inspect``, as :attr:`FlowMeter.stats`."""
        return {
            "packets": self.packets,
            "bytes": self.nbytes,
            "link_types": {
                LINK_NAMES.get(k, str(k)): v for k, v in self.link_types.items()
            },
            "flows": self.flows,
            "open_flows": self.count,
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

    def _damaged(self, offset, reason, message):
        """Note one damaged packet (a packet with two faults is counted once)."""
        if self.damage is None:
            self.damage = PacketDamage(offset if offset is not None else -1, message, 0)
        if offset is None or offset != self._last_damaged:
            self.damage.count += 1
        self._last_damaged = offset
        self.damage.reasons[reason] += 1

    # -- the flow table -----------------------------------------------------------

    cdef Conn* find(self, const Key* k, uint64_t h) noexcept:
        cdef uint64_t mask = self.cap - 1
        cdef uint64_t i = h & mask
        cdef Conn* c
        while True:
            c = self.slots[i]
            if c == NULL:
                return NULL
            if c.hash == h and memcmp(&c.key, k, 40) == 0:
                return c
            i = (i + 1) & mask

    cdef int grow(self) except -1:
        cdef uint64_t old_cap = self.cap, i, j, mask
        cdef Conn** old = self.slots
        cdef Conn** fresh = <Conn**>malloc(sizeof(Conn*) * old_cap * 2)
        if fresh == NULL:
            raise MemoryError()
        memset(fresh, 0, sizeof(Conn*) * old_cap * 2)
        self.cap = old_cap * 2
        mask = self.cap - 1
        for i in range(old_cap):
            if old[i] != NULL:
                j = old[i].hash & mask
                while fresh[j] != NULL:
                    j = (j + 1) & mask
                fresh[j] = old[i]
        self.slots = fresh
        free(old)
        return 0

    cdef int insert(self, Conn* c) except -1:
        cdef uint64_t mask, i
        if (self.count + 1) * 2 > self.cap:
            self.grow()
        mask = self.cap - 1
        i = c.hash & mask
        while self.slots[i] != NULL:
            i = (i + 1) & mask
        self.slots[i] = c
        self.count += 1
        self.order += 1
        c.order = self.order
        c.prev = self.tail
        c.next = NULL
        if self.tail != NULL:
            self.tail.next = c
        else:
            self.head = c
        self.tail = c
        return 0

    cdef void remove(self, Conn* c) noexcept:
        cdef uint64_t mask = self.cap - 1
        cdef uint64_t i = c.hash & mask, j, k
        while self.slots[i] != c:
            if self.slots[i] == NULL:
                return
            i = (i + 1) & mask
        # Backward-shift deletion keeps every probe chain whole.
        j = i
        while True:
            j = (j + 1) & mask
            if self.slots[j] == NULL:
                break
            k = self.slots[j].hash & mask
            if (j > i and (k <= i or k > j)) or (j < i and (k <= i and k > j)):
                self.slots[i] = self.slots[j]
                i = j
        self.slots[i] = NULL
        self.count -= 1
        if c.prev != NULL:
            c.prev.next = c.next
        else:
            self.head = c.next
        if c.next != NULL:
            c.next.prev = c.prev
        else:
            self.tail = c.prev
        c.prev = c.next = NULL

    # -- the timer heap -----------------------------------------------------------

    cdef int heap_push(self, double due, Conn* c) except -1:
        cdef HeapEnt* grown
        cdef uint64_t i, parent
        cdef HeapEnt ent
        if self.hlen == self.hcap:
            grown = <HeapEnt*>realloc(self.heap, sizeof(HeapEnt) * self.hcap * 2)
            if grown == NULL:
                raise MemoryError()
            self.heap = grown
            self.hcap *= 2
        self.tie += 1
        ent.due = due
        ent.tie = self.tie
        ent.c = c
        i = self.hlen
        self.hlen += 1
        while i > 0:
            parent = (i - 1) >> 1
            if self.heap[parent].due < due or (
                self.heap[parent].due == due and self.heap[parent].tie < ent.tie
            ):
                break
            self.heap[i] = self.heap[parent]
            i = parent
        self.heap[i] = ent
        return 0

    cdef Conn* heap_pop(self) noexcept:
        cdef Conn* top = self.heap[0].c
        cdef HeapEnt last
        cdef uint64_t i = 0, child, n
        self.hlen -= 1
        n = self.hlen
        if n == 0:
            return top
        last = self.heap[n]
        while True:
            child = 2 * i + 1
            if child >= n:
                break
            if child + 1 < n and (
                self.heap[child + 1].due < self.heap[child].due
                or (
                    self.heap[child + 1].due == self.heap[child].due
                    and self.heap[child + 1].tie < self.heap[child].tie
                )
            ):
                child += 1
            if self.heap[child].due < last.due or (
                self.heap[child].due == last.due and self.heap[child].tie < last.tie
            ):
                self.heap[i] = self.heap[child]
                i = child
            else:
                break
        self.heap[i] = last
        return top

    # -- ending connections -------------------------------------------------------

    cdef inline double timeout(self, Conn* c) noexcept:
        if c.proto == P_TCP:
            return self.t_tcp
        if c.proto == P_UDP:
            return self.t_udp
        return self.t_icmp if c.proto == P_ICMP else self.t_other

    cdef int why_over(self, Conn* c, double ts) noexcept:
        if ts >= c.remove_at:
            return E_CLOSED
        if ts - c.last_ts >= self.timeout(c):
            return E_INACTIVE
        if (
            c.attempt_at != INF
            and ts >= c.attempt_at + self.t_attempt
            and (ORIG(c).state == SYN_SENT or ORIG(c).state == SYN_ACK_SENT)
            and RESP(c).state == INACTIVE
        ):
            return E_ATTEMPT
        return -1

    cdef int ended_before(self, Conn* c, double ts) except -1:
        """End ``c`` if one of Zeek's timers would have removed it by ``ts``."""
        cdef int why = self.why_over(c, ts)
        if why < 0:
            return 0
        self.end(c, why)
        return 1

    cdef int end(self, Conn* c, int why) except -1:
        if c.alive:
            self.remove(c)
            c.alive = False
        self.ended_as(why)
        rec = self.record(c)
        # The heads served the record; the struct waits in the heap a while yet.
        free(c.e[0].head)
        free(c.e[1].head)
        c.e[0].head = c.e[1].head = NULL
        c.e[0].head_segs = c.e[1].head_segs = 0
        self.uids += 1
        rec["uid"] = "C%016x" % (self.uid_base ^ (self.uids * 0x9E3779B97F4A7C15ULL))
        self.flows += 1
        self.done.append(rec)
        return 0

    cdef int sweep(self, double ts) except -1:
        """End every connection whose timer has run out by ``ts`` (see FlowMeter)."""
        cdef Conn* c
        cdef double due, t
        while self.hlen and self.heap[0].due <= ts:
            c = self.heap_pop()
            if not c.alive:
                free_conn(c)
                continue
            if self.ended_before(c, ts):
                free_conn(c)
                continue
            due = c.last_ts + self.timeout(c)
            if c.remove_at < due:
                due = c.remove_at
            if c.attempt_at != INF:
                t = c.attempt_at + self.t_attempt
                if t < ts:
                    t = ts
                if t < due:
                    due = t
            if due < ts + 0.001:
                due = ts + 0.001
            self.heap_push(due, c)
        self.next_sweep = ts + 1.0
        return 0

    def _sweep(self, ts):
        """End every connection whose timer has run out by ``ts`` (the wall clock)."""
        self.sweep(ts)

    cdef int evict(self, double ts) except -1:
        """Make room: end expired connections, else the least recently active 1%."""
        cdef uint64_t n, i
        cdef Conn** all_
        cdef Conn* c
        self.sweep(ts)
        if self.count < <uint64_t>self.max_flows:
            return 0
        n = self.count // 100
        if n < 1:
            n = 1
        all_ = <Conn**>malloc(sizeof(Conn*) * self.count)
        if all_ == NULL:
            raise MemoryError()
        i = 0
        c = self.head
        while c != NULL:
            all_[i] = c
            i += 1
            c = c.next
        qsort(all_, i, sizeof(Conn*), cmp_victims)
        try:
            for i in range(n):
                self.evicted += 1
                self.end(all_[i], E_EVICTED)
        finally:
            free(all_)
        return 0

    def pop_done(self):
        """The records of connections that ended since the last call."""
        out = self.done
        self.done = []
        return out

    def flush(self):
        """End every open connection (end of input) and return all pending records."""
        cdef Conn* c
        while self.head != NULL:
            c = self.head
            self.end(c, E_END)
        return self.pop_done()

    # -- the record ---------------------------------------------------------------

    cdef dict record(self, Conn* c):
        cdef Endpoint* o = ORIG(c)
        cdef Endpoint* r = RESP(c)
        cdef char buf[64]
        cdef int family = AF_INET if c.ver == 4 else AF_INET6
        cdef double duration = c.last_ts - c.start_ts
        cdef int64_t ob, rb
        cdef bint has_dur = duration > 0
        if c.proto == P_TCP:
            state = self.tcp_conn_state(c)
            ob = tcp_size(o, r)
            rb = tcp_size(r, o)
        else:
            if c.proto == P_UDP:
                if o.active:
                    state = "SF" if r.active else "S0"
                else:
                    state = "SHR" if r.active else "OTH"
            else:
                state = "OTH"
            ob = o.size
            rb = r.size
        inet_ntop(family, c.orig_h, buf, 64)
        src = (<char*>buf).decode("ascii")
        inet_ntop(family, c.resp_h, buf, 64)
        dst = (<char*>buf).decode("ascii")
        history = c.hist[: c.hlen].decode("ascii") if c.hlen else None
        proto = _PROTO_NAMES[c.proto]
        service = None
        if c.ftp_data:
            service = "ftp-data"
        elif o.head_segs or r.head_segs:
            service = _identify(
                proto,
                c.orig_p,
                c.resp_p,
                o.head[: o.head_len] if o.head_segs else None,
                r.head[: r.head_len] if r.head_segs else None,
                history,
            )
        return {
            "ts": c.start_ts,
            "uid": None,
            "src_ip": src,
            "src_port": c.orig_p,
            "dst_ip": dst,
            "dst_port": c.resp_p,
            "proto": proto,
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

    cdef str tcp_conn_state(self, Conn* c):
        cdef Endpoint* o = ORIG(c)
        cdef Endpoint* r = RESP(c)
        cdef int os_ = o.state, rs = r.state
        cdef bint o_inactive = os_ == INACTIVE or os_ == PARTIAL
        cdef bint r_inactive = rs == INACTIVE or rs == PARTIAL
        if rs == RESET:
            if (
                os_ == SYN_SENT
                or os_ == SYN_ACK_SENT
                or (os_ == RESET and tcp_size(o, r) == 0 and tcp_size(r, o) == 0)
            ):
                return "REJ"
            return "RSTRH" if o_inactive else "RSTR"
        if os_ == RESET:
            if r_inactive:
                hist = c.hist[: c.hlen].decode("ascii").lstrip("^")
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

    # -- input --------------------------------------------------------------------

    cdef bint likely_flip(self, int sport, int dport, const uint8_t* dst, int ver,
                          const uint8_t* ports) noexcept:
        """Zeek's guess for a first packet that is no SYN: servers own known ports."""
        if not (ports[sport >> 3] >> (sport & 7)) & 1:
            return False
        if (ports[dport >> 3] >> (dport & 7)) & 1:
            return False
        if ver == 4:
            return not (
                (dst[0] == 255 and dst[1] == 255 and dst[2] == 255 and dst[3] == 255)
                or 224 <= dst[0] <= 239
            )
        return dst[0] != 0xFF

    cdef Conn* new_conn(self, int proto, int ver, const uint8_t* src, int sport,
                        const uint8_t* dst, int dport, double ts, const Key* k,
                        uint64_t h, bint do_flip) except NULL:
        cdef Conn* c
        cdef int alen = 4 if ver == 4 else 16
        cdef double first
        if self.count >= <uint64_t>self.max_flows:
            self.evict(ts)
        c = <Conn*>malloc(sizeof(Conn))
        if c == NULL:
            raise MemoryError()
        memset(c, 0, sizeof(Conn))
        memcpy(&c.key, k, 40)
        c.hash = h
        c.proto = proto
        c.ver = ver
        memcpy(c.orig_h, src, alen)
        memcpy(c.resp_h, dst, alen)
        c.orig_p = sport
        c.resp_p = dport
        c.start_ts = c.last_ts = ts
        c.hist = c.hbuf
        c.hcap = HBUF
        ep_init(&c.e[0])
        ep_init(&c.e[1])
        c.oi = 0
        c.remove_at = INF
        c.attempt_at = INF
        c.alive = True
        if do_flip:
            flip(c)
        if (
            proto == P_TCP
            and self.ftp_seen
            and (self.ftp_ports[c.resp_p >> 3] >> (c.resp_p & 7)) & 1
        ):
            c.ftp_data = self.ftp.match(
                ts,
                PyBytes_FromStringAndSize(<const char*>c.orig_h, alen),
                PyBytes_FromStringAndSize(<const char*>c.resp_h, alen),
                c.resp_p,
            )
        self.insert(c)
        first = self.timeout(c)
        if first > 5.0:
            first = 5.0
        self.heap_push(ts + first, c)
        return c

    cdef inline void make_key(self, Key* k, int kind, int ver, const uint8_t* a,
                              int pa, const uint8_t* b, int pb, int alen) noexcept:
        memset(k, 0, 40)
        k.kind = kind
        k.ver = ver
        memcpy(k.a1, a, alen)
        memcpy(k.a2, b, alen)
        k.p1 = pa
        k.p2 = pb

    cdef int ip(self, double ts, int ver, const uint8_t* src, const uint8_t* dst,
                int proto, int64_t ip_len, const uint8_t* l4, int64_t n,
                int64_t l4_len, int64_t offset) except -1:
        """One IP packet: find or start its connection and update it."""
        cdef int alen = 4 if ver == 4 else 16
        cdef int sport, dport, doff, flags, win, hlen, itype, code, counter, ulen
        cdef int64_t seq, ack, length, captured, payload
        cdef bint bad, one_way, flip_it, is_orig
        cdef int cmp
        cdef Key k
        cdef uint64_t h
        cdef Conn* c
        cdef Endpoint* ep
        cdef int64_t take
        cdef int port
        cmp = memcmp(src, dst, alen)
        if proto == 6:
            if n < 20:
                self.skip(S_CUT)
                self._damaged(where(offset), "cut_header", "TCP header is cut")
                return 0
            sport = be16(l4)
            dport = be16(l4 + 2)
            seq = be32(l4 + 4)
            ack = be32(l4 + 8)
            doff = l4[12]
            flags = l4[13]
            win = be16(l4 + 14)
            hlen = (doff >> 4) << 2
            if hlen < 20 or hlen > l4_len:
                self.skip(S_BOGUS)
                self._damaged(
                    where(offset),
                    "bad_header",
                    "TCP header length is impossible",
                )
                return 0
            length = l4_len - hlen
            captured = n - hlen if n > hlen else 0
            if captured > length:
                captured = length
            bad = (
                self.check_checksums
                and n >= l4_len
                and not sum_ok(ver, src, dst, 6, l4, l4_len)
            )
            if cmp < 0 or (cmp == 0 and sport <= dport):
                self.make_key(&k, 6, ver, src, sport, dst, dport, alen)
            else:
                self.make_key(&k, 6, ver, dst, dport, src, sport, alen)
            h = key_hash(&k)
            c = self.find(&k, h)
            if (
                c != NULL
                and (
                    ts >= c.remove_at
                    or ts - c.last_ts >= self.t_tcp
                    or ts >= c.attempt_at + self.t_attempt
                )
                and self.ended_before(c, ts)
            ):
                c = NULL
            if c != NULL and flags & F_SYN and is_reuse(c, flags, seq):
                self.end(c, E_REUSED)
                c = NULL
            if c == NULL:
                flip_it = False
                if flags & (F_SYN | F_ACK) == F_SYN | F_ACK:
                    flip_it = True
                elif not (flags & F_SYN) or flags & F_ACK:
                    flip_it = self.likely_flip(sport, dport, dst, ver, self.tcp_ports)
                c = self.new_conn(
                    P_TCP, ver, src, sport, dst, dport, ts, &k, h, flip_it
                )
            is_orig = memcmp(src, c.orig_h, alen) == 0 and sport == c.orig_p
            ep = ORIG(c) if is_orig else RESP(c)
            if bad:
                scaled(c, ep, L_C)
                return 0
            if captured > 0 and ep.head_segs < HEAD_SEGS:
                keep_head(ep, l4 + hlen, captured, length, seq, flags)
            if (
                0 < captured <= FTP_SCAN_MAX
                and (sport == 21 or dport == 21 or sport == 2811 or dport == 2811)
                and may_announce(l4 + hlen, captured, is_orig)
            ):
                for port in self.ftp.scan(
                    ts,
                    PyBytes_FromStringAndSize(<const char*>l4 + hlen, captured),
                    is_orig,
                    PyBytes_FromStringAndSize(<const char*>c.orig_h, alen),
                    PyBytes_FromStringAndSize(<const char*>c.resp_h, alen),
                ):
                    self.ftp_seen = True
                    self.ftp_ports[port >> 3] |= 1 << (port & 7)
            conn_tcp(
                c, ts, is_orig, ip_len, flags, seq, ack, win, length, captured,
                self.t_close, self.t_reset,
            )
            return 0

        if proto == 17:
            if n < 8:
                self.skip(S_CUT)
                self._damaged(where(offset), "cut_header", "UDP header is cut")
                return 0
            sport = be16(l4)
            dport = be16(l4 + 2)
            ulen = be16(l4 + 4)
            payload = (ulen if 8 <= ulen <= l4_len else l4_len) - 8
            if payload < 0:
                payload = 0
            bad = (
                self.check_checksums
                and n >= l4_len
                and (ver == 6 or l4[6] != 0 or l4[7] != 0)
                and not sum_ok(ver, src, dst, 17, l4, l4_len)
            )
            if cmp < 0 or (cmp == 0 and sport <= dport):
                self.make_key(&k, 17, ver, src, sport, dst, dport, alen)
            else:
                self.make_key(&k, 17, ver, dst, dport, src, sport, alen)
            h = key_hash(&k)
            c = self.find(&k, h)
            if c != NULL and self.ended_before(c, ts):
                c = NULL
            if c == NULL:
                flip_it = self.likely_flip(sport, dport, dst, ver, self.udp_ports)
                c = self.new_conn(
                    P_UDP, ver, src, sport, dst, dport, ts, &k, h, flip_it
                )
            is_orig = memcmp(src, c.orig_h, alen) == 0 and sport == c.orig_p
            c.last_ts = ts
            if bad:
                scaled(c, ORIG(c) if is_orig else RESP(c), L_C)
            else:
                udp_icmp(c, is_orig, ip_len, payload)
                ep = ORIG(c) if is_orig else RESP(c)
                check(c, ep, H_DATA, ORD_D)
                if payload > 0 and n > 8 and ep.head_segs == 0:
                    # The first datagram's payload, for the service.
                    take = n - 8
                    if take > payload:
                        take = payload
                    if take > HEAD_BYTES:
                        take = HEAD_BYTES
                    head_alloc(ep)
                    memcpy(ep.head, l4 + 8, take)
                    ep.head_len = take
                    ep.head_segs = HEAD_SEGS
            if not bad and (
                dport == 4789 or dport == 6081 or dport == 2152
                or sport == 4789 or sport == 6081 or sport == 2152
            ):
                port = sport
                if dport == 4789 or dport == 6081 or dport == 2152:
                    port = dport
                self.udp_tunnel(ts, port, l4, n, offset)
            return 0

        if proto != 1 and proto != 58:
            if not self.unknown_transport:
                self.skip(S_OTHER)
                return 0
            memset(&k, 0, 40)
            k.kind = 0
            k.ver = ver
            k.proto = proto
            if cmp <= 0:
                memcpy(k.a1, src, alen)
                memcpy(k.a2, dst, alen)
            else:
                memcpy(k.a1, dst, alen)
                memcpy(k.a2, src, alen)
            h = key_hash(&k)
            c = self.find(&k, h)
            if c != NULL and self.ended_before(c, ts):
                c = NULL
            if c == NULL:
                c = self.new_conn(P_OTHER, ver, src, 0, dst, 0, ts, &k, h, False)
            is_orig = memcmp(src, c.orig_h, alen) == 0
            c.last_ts = ts
            udp_icmp(c, is_orig, ip_len, 0)
            return 0

        # ICMP and ICMPv6
        if n < 4:
            self.skip(S_CUT)
            self._damaged(where(offset), "cut_header", "ICMP header is cut")
            return 0
        itype = l4[0]
        code = l4[1]
        counter = ICMP4_PAIR[itype] if proto == 1 else ICMP6_PAIR[itype]
        one_way = counter < 0
        if one_way:
            counter = code
        payload = l4_len - 8 if l4_len > 8 else 0
        bad = (
            self.check_checksums
            and n >= l4_len
            and not sum_ok(ver, src, dst, proto, l4, l4_len)
        )
        if one_way:
            self.make_key(&k, 1, ver, src, itype, dst, counter, alen)
            k.oneway = 1
        elif cmp < 0 or (cmp == 0 and itype <= counter):
            self.make_key(&k, 1, ver, src, itype, dst, counter, alen)
        else:
            self.make_key(&k, 1, ver, dst, counter, src, itype, alen)
        h = key_hash(&k)
        c = self.find(&k, h)
        if c != NULL and self.ended_before(c, ts):
            c = NULL
        if c == NULL:
            c = self.new_conn(P_ICMP, ver, src, itype, dst, counter, ts, &k, h, False)
        is_orig = memcmp(src, c.orig_h, alen) == 0 and itype == c.orig_p
        c.last_ts = ts
        if bad:
            scaled(c, ORIG(c) if is_orig else RESP(c), L_C)
        else:
            udp_icmp(c, is_orig, ip_len, payload)
        return 0

    cdef int udp_tunnel(self, double ts, int port, const uint8_t* l4, int64_t n,
                        int64_t offset) except -1:
        """VXLAN, Geneve, GTP-U: the Python decoder opens them, the inner is metered."""
        body = PyBytes_FromStringAndSize(<const char*>l4 + 8, n - 8 if n > 8 else 0)
        inner = self.decoder.udp_tunnel(port, body, ts)
        if inner is not None and type(inner) is not int:
            self.ip_tuple(ts, inner, offset)
        return 0

    cdef int ip_tuple(self, double ts, tuple pkt, int64_t offset) except -1:
        """Meter an :data:`IpPacket` tuple from the Python decoder."""
        cdef bytes src = pkt[1]
        cdef bytes dst = pkt[2]
        cdef bytes l4 = bytes(pkt[5])
        cdef Py_ssize_t alen = 4 if pkt[0] == 4 else 16
        if PyBytes_GET_SIZE(src) != alen or PyBytes_GET_SIZE(dst) != alen:
            raise ValueError(f"decoder gave IPv{pkt[0]} addresses of the wrong length")
        self.ip(
            ts,
            pkt[0],
            <const uint8_t*>PyBytes_AS_STRING(src),
            <const uint8_t*>PyBytes_AS_STRING(dst),
            pkt[3],
            pkt[4],
            <const uint8_t*>PyBytes_AS_STRING(l4),
            PyBytes_GET_SIZE(l4),
            pkt[6],
            offset,
        )
        return 0

    cdef int frame(self, double ts, int64_t link, const uint8_t* p, int64_t n,
                   int64_t wire, int64_t offset, int64_t snaplen,
                   object data) except -1:
        """One captured frame (``data``: its bytes object, or None to make one)."""
        cdef Decoded d
        cdef int res
        self.packets += 1
        self.nbytes += wire
        self.count_link(link)
        # Before 1970 (a pcapng if_tsoffset below 0), NaN, or past year 9999 (an
        # if_tsoffset near 2**63). As FlowMeter._bad_time: skipped as damaged, no
        # connection touched.
        if not (ts >= 0.0 and ts < C_TS_LIMIT):
            self.skip(S_TIME)
            self._damaged(
                where(offset),
                "bad_time",
                f"packet time stamp is unusable: {packet_time_problem(ts)}",
            )
            return 0
        if ts > self.last_ts:
            if self.first_ts is None:
                self.first_ts = ts
            self.last_ts = ts
            if ts >= self.next_sweep:
                self.sweep(ts)
        if n < wire:
            self.snap_cut += 1
            if snaplen and n < snaplen:
                self._damaged(
                    where(offset),
                    "cut_below_snaplen",
                    f"packet record holds {n} of {wire} bytes, "
                    f"less than the snap length {snaplen}",
                )
        res = dec_frame(<int>link if 0 <= link <= 0x7FFFFFFF else -1, p, n, wire, &d)
        if res == D_PACKET:
            self.ip(ts, d.ver, d.src, d.dst, d.proto, d.ip_len, d.l4, d.l4n,
                    d.l4_len, offset)
            return 0
        if res == S_NON_IP:
            self.skip(S_NON_IP)
            return 0
        if data is None:
            data = PyBytes_FromStringAndSize(<const char*>p, n)
        pkt = self.decoder.decode(link, data, wire, ts)
        if type(pkt) is int:
            self.skip(pkt)
            at = where(offset)
            if pkt == S_CUT:
                self._damaged(
                    at,
                    "cut_header",
                    f"packet ({n} of {wire} bytes captured) is cut inside its headers",
                )
            elif pkt == S_BOGUS:
                self._damaged(at, "bad_header", "packet has an impossible IP header")
            elif pkt == S_WIRE:
                self._damaged(
                    at,
                    "truncated_ip",
                    "IP total length exceeds the packet's length on the wire",
                )
            elif pkt == S_LINK:
                self._damaged(at, "unknown_link_type", f"unknown link type {link}")
            return 0
        self.ip_tuple(ts, pkt, offset)
        return 0

    def feed(self, ts, link, data, wire, offset=None, snaplen=0):
        """One captured frame: its time, link type, bytes and length on the wire."""
        if type(data) is not bytes:
            data = bytes(data)
        self.frame(
            ts,
            link,
            <const uint8_t*>PyBytes_AS_STRING(data),
            PyBytes_GET_SIZE(data),
            wire,
            -1 if offset is None else offset,
            snaplen,
            data,
        )

    def pcap_bulk(self, bytes buf, Py_ssize_t pos, long long base, int hdr, bint big,
                  double scale, long long link, long long snaplen):
        """Meter the whole, sane classic-pcap records in ``buf`` from ``pos`` on.

        Stops before a record that is not wholly in ``buf`` or whose header the
        reader must judge (a length past the limits); returns the position it
        stopped at and the number of packets metered. ``base`` is the file offset
        of ``buf[0]``.
        """
        cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(buf)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(buf)
        cdef uint32_t sec, frac, incl, orig
        cdef int64_t count = 0
        cdef const uint8_t* r
        # The fraction of a second counts micro- or nanoseconds (the scale says
        # which): a record with a whole second or more there is left to the reader,
        # which skips it as damaged (bad_time).
        cdef uint32_t frac_limit = 1000000000 if scale < 1e-7 else 1000000
        if hdr < 16 or pos < 0:
            raise ValueError(f"pcap record header of {hdr} bytes at {pos}: not a pcap")
        while size - pos >= hdr:
            r = p + pos
            if big:
                sec, frac, incl, orig = be32(r), be32(r + 4), be32(r + 8), be32(r + 12)
            else:
                sec, frac, incl, orig = le32(r), le32(r + 4), le32(r + 8), le32(r + 12)
            if incl > MAX_RECORD or (
                orig and <int64_t>incl > <int64_t>orig + hdr and incl > snaplen
            ) or frac >= frac_limit:
                break
            if size - pos < hdr + <int64_t>incl:
                break
            count += 1
            self.frame(
                <double>sec + <double>frac * scale,
                link,
                r + hdr,
                incl,
                orig if orig else incl,
                base + pos,
                snaplen,
                None,
            )
            pos += hdr + incl
        return pos, count

    def pcapng_bulk(self, bytes buf, Py_ssize_t pos, long long base, bint big,
                    list links, list scales, list offsets, list snaplens):
        """Meter the whole, sane enhanced packet blocks in ``buf`` from ``pos`` on.

        ``links``, ``scales``, ``offsets`` and ``snaplens`` describe the section's
        interfaces (link type, time unit, time offset, the snap length the reader
        reports for that link type). Stops before any other block, a block not
        wholly in ``buf`` or one the reader must judge; returns the position, the
        number of packets and the packets per interface.
        """
        cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(buf)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(buf)
        cdef Py_ssize_t nif = len(links), i
        cdef uint32_t btype, blen, iface, hi, lo, cap, wire
        cdef int64_t count = 0
        cdef const uint8_t* b
        cdef int64_t* c_links
        cdef double* c_scales
        cdef double* c_offsets
        cdef int64_t* c_snaps
        cdef int64_t* per
        if pos < 0 or len(scales) != nif or len(offsets) != nif or len(snaplens) != nif:
            raise ValueError("pcapng_bulk: one entry per interface in each list")
        c_links = <int64_t*>malloc(sizeof(int64_t) * (nif + 1) * 3)
        c_scales = <double*>malloc(sizeof(double) * (nif + 1) * 2)
        if c_links == NULL or c_scales == NULL:
            free(c_links)
            free(c_scales)
            raise MemoryError()
        c_snaps = c_links + (nif + 1)
        per = c_links + 2 * (nif + 1)
        c_offsets = c_scales + (nif + 1)
        try:
            for i in range(nif):
                c_links[i] = links[i]
                c_scales[i] = scales[i]
                c_offsets[i] = offsets[i]
                c_snaps[i] = snaplens[i]
                per[i] = 0
            while size - pos >= 12:
                b = p + pos
                btype = rd32(b, big)
                blen = rd32(b + 4, big)
                if btype != 6 or blen < 32 or blen % 4 or blen > MAX_RECORD + 64:
                    break
                if size - pos < blen or rd32(b + blen - 4, big) != blen:
                    break
                iface = rd32(b + 8, big)
                hi = rd32(b + 12, big)
                lo = rd32(b + 16, big)
                cap = rd32(b + 20, big)
                wire = rd32(b + 24, big)
                if iface >= nif or <int64_t>cap + 20 > <int64_t>blen - 12:
                    break
                count += 1
                per[iface] += 1
                self.frame(
                    <double>((<uint64_t>hi << 32) | lo) * c_scales[iface]
                    + c_offsets[iface],
                    c_links[iface],
                    b + 28,
                    cap,
                    wire if wire else cap,
                    base + pos,
                    c_snaps[iface],
                    None,
                )
                pos += blen
            return pos, count, [per[i] for i in range(nif)]
        finally:
            free(c_links)
            free(c_scales)


cdef inline uint32_t rd32(const uint8_t* p, bint big) noexcept nogil:
    return be32(p) if big else le32(p)


cdef inline void udp_icmp(
    Conn* c, bint is_orig, int64_t ip_len, int64_t payload
) noexcept:
    cdef Endpoint* ep = ORIG(c) if is_orig else RESP(c)
    ep.pkts += 1
    ep.ip_bytes += ip_len
    ep.size += payload
    ep.active = True


cdef bint is_reuse(Conn* c, int flags, int64_t seq) noexcept:
    """Zeek's reuse rule: a new initial SYN on a 5-tuple that is closed or moved on."""
    cdef Endpoint* conn_orig = ORIG(c)
    cdef bint closed
    if flags & F_ACK:
        if ORIG(c).state != INACTIVE:
            return False
        conn_orig = RESP(c)
    closed = ORIG(c).did_close or RESP(c).did_close or c.remove_at != INF
    if not closed:
        if conn_orig.state == INACTIVE or (seq & <int64_t>0xFFFFFFFFLL) == (
            conn_orig.start & <int64_t>0xFFFFFFFFLL
        ):
            return False
        if (
            not flags & F_ACK
            and conn_orig.state == SYN_ACK_SENT
            and RESP(c).state == INACTIVE
            and (seq & <int64_t>0xFFFFFFFFLL) == (RESP(c).start & <int64_t>0xFFFFFFFFLL)
        ):
            return False
    return True
