"""Zeek's connection semantics on crafted conversations: states, flips, timers, caps.

The expected values follow Zeek's documented conn.log meanings (conn_state and
history letters, the 5 s close/reset/attempt delays, inactivity timeouts), worked
out by hand for each little conversation.
"""

from __future__ import annotations

import pytest

from flows.meter import FlowMeter, Timeouts, iter_flows, read_capture
from tests.test_meter_craft import A4, B4, C4, eth, handshake, ip4, tcp, udp, write_pcap


def seg(t, src, dst, sport, dport, seq, ack, flags, payload=b""):
    """One Ethernet frame holding one TCP segment, with its time."""
    return (
        t,
        eth(ip4(src, dst, 6, tcp(src, dst, sport, dport, seq, ack, flags, payload))),
    )


def dgram(t, src, dst, sport, dport, payload=b"x"):
    """One Ethernet frame holding one UDP datagram, with its time."""
    return (t, eth(ip4(src, dst, 17, udp(src, dst, sport, dport, payload))))


def convert(tmp_path, frames, **kw):
    """The flows of a capture made of ``frames``, in time order."""
    res = read_capture(write_pcap(tmp_path / "t.pcap", frames), **kw)
    return sorted(res.table.to_pylist(), key=lambda r: r["ts"]), res


def test_rejected_attempt(tmp_path):
    recs, _ = convert(
        tmp_path,
        [
            seg(1.0, A4, B4, 1234, 80, 100, 0, "S"),
            seg(1.1, B4, A4, 80, 1234, 0, 101, "RA"),
        ],
    )
    (r,) = recs
    assert (r["conn_state"], r["history"]) == ("REJ", "Sr")
    assert (r["orig_bytes"], r["resp_bytes"]) == (0, 0)
    assert r["orig_ip_bytes"] == 40 and r["resp_ip_bytes"] == 40


def test_lone_syn_is_s0_without_duration(tmp_path):
    (r,), _ = convert(tmp_path, [seg(1.0, A4, B4, 1234, 22, 100, 0, "S")])
    assert (r["conn_state"], r["history"]) == ("S0", "S")
    assert r["duration"] is None and r["orig_bytes"] is None


def test_syn_ack_first_flips_the_roles(tmp_path):
    (r,), _ = convert(tmp_path, [seg(1.0, B4, A4, 6000, 50000, 7, 101, "SA")])
    assert (r["src_ip"], r["src_port"], r["dst_ip"], r["dst_port"]) == (
        A4,
        50000,
        B4,
        6000,
    )
    assert (r["history"], r["conn_state"]) == ("^h", "OTH")
    assert (r["orig_pkts"], r["resp_pkts"]) == (0, 1)


@pytest.mark.parametrize(
    "from_server, history, orig",
    [
        (True, "^d", (A4, 40000)),
        (False, "D", (A4, 40000)),
    ],
)
def test_missing_syn_guesses_the_server_by_its_port(
    tmp_path, from_server, history, orig
):
    if from_server:
        frames = [seg(1.0, B4, A4, 80, 40000, 5, 9, "PA", b"data")]
    else:
        frames = [seg(1.0, A4, B4, 40000, 80, 9, 5, "PA", b"data")]
    (r,), _ = convert(tmp_path, frames)
    assert (r["src_ip"], r["src_port"]) == orig and r["dst_port"] == 80
    assert r["history"] == history and r["conn_state"] == "OTH"


def test_originator_reset_after_handshake(tmp_path):
    frames = [
        seg(1.0, A4, B4, 1234, 80, 100, 0, "S"),
        seg(1.1, B4, A4, 80, 1234, 500, 101, "SA"),
        seg(1.2, A4, B4, 1234, 80, 101, 501, "A"),
        seg(1.3, A4, B4, 1234, 80, 101, 501, "RA"),
    ]
    (r,), _ = convert(tmp_path, frames)
    assert (r["conn_state"], r["history"]) == ("RSTO", "ShAR")


def test_half_open_close_is_sh(tmp_path):
    frames = [
        seg(1.0, A4, B4, 1234, 80, 100, 0, "S"),
        seg(1.5, A4, B4, 1234, 80, 101, 0, "F"),
    ]
    (r,), _ = convert(tmp_path, frames)
    assert (r["conn_state"], r["history"]) == ("SH", "SF")


def test_retransmission_and_missed_bytes(tmp_path):
    data = b"d" * 100
    frames = [
        seg(1.0, A4, B4, 1234, 80, 100, 0, "S"),
        seg(1.1, B4, A4, 80, 1234, 500, 101, "SA"),
        seg(1.2, A4, B4, 1234, 80, 101, 501, "PA", data),
        seg(1.3, A4, B4, 1234, 80, 101, 501, "PA", data),  # again: T
        # The responder acknowledges 200 more bytes than the capture holds.
        seg(1.4, B4, A4, 80, 1234, 501, 401, "A"),
    ]
    (r,), _ = convert(tmp_path, frames)
    # S h, data D, the same data again T, the responder's pure ACK a, and the gap
    # it reveals in the originator's data G.
    assert r["history"] == "ShDTaG"
    assert r["orig_bytes"] == 300 and r["missed_bytes"] == 200
    assert r["conn_state"] == "S1"


def test_udp_inactivity_timeout_is_configurable(tmp_path):
    frames = [dgram(0.0, A4, B4, 5000, 9999), dgram(61.0, A4, B4, 5000, 9999)]
    recs, res = convert(tmp_path, frames)
    assert len(recs) == 2 and res.stats["ended"]["inactive"] == 1
    recs, _ = convert(tmp_path, frames, timeouts=Timeouts(udp=120))
    assert len(recs) == 1 and recs[0]["orig_pkts"] == 2
    assert recs[0]["duration"] == pytest.approx(61.0)


def test_closed_connection_is_deleted_five_seconds_later(tmp_path):
    hs = [(t, eth(p)) for t, p in handshake(t0=10.0)]
    late = seg(10.06 + 1.0, A4, B4, 40000, 80, 1020, 5025, "A")
    recs, _ = convert(tmp_path, hs + [late])
    assert len(recs) == 1 and recs[0]["orig_pkts"] == 6
    later = seg(10.06 + 6.0, A4, B4, 40000, 80, 1020, 5025, "A")
    recs, _ = convert(tmp_path, hs + [later])
    assert len(recs) == 2 and recs[1]["history"] == "A"


def test_unanswered_syn_ends_after_the_attempt_delay(tmp_path):
    frames = [
        seg(1.0, A4, B4, 1234, 22, 100, 0, "S"),
        seg(2.0, A4, B4, 1234, 22, 101, 0, "PA", b"x"),
        seg(7.0, A4, B4, 1234, 22, 102, 0, "PA", b"y"),
    ]
    recs, _ = convert(tmp_path, frames)
    assert [r["history"] for r in recs] == ["SD", "D"]
    assert [r["conn_state"] for r in recs] == ["S0", "OTH"]


def test_new_syn_after_reject_is_a_new_connection(tmp_path):
    frames = [
        seg(1.0, A4, B4, 1234, 110, 100, 0, "S"),
        seg(1.05, B4, A4, 110, 1234, 0, 101, "RA"),
        seg(1.5, A4, B4, 1234, 110, 100, 0, "S"),
        seg(1.55, B4, A4, 110, 1234, 0, 101, "RA"),
    ]
    recs, _ = convert(tmp_path, frames)
    assert [r["conn_state"] for r in recs] == ["REJ", "REJ"]


def test_flow_table_cap_evicts_and_counts(tmp_path):
    frames = [dgram(1.0 + i, A4, B4, 6000 + i, 7000) for i in range(5)]
    recs, res = convert(tmp_path, frames, max_flows=2)
    assert len(recs) == 5  # every flow still comes out, evicted ones early
    assert res.stats["evictions"] == 3 and res.stats["ended"]["evicted"] == 3


def test_bad_checksums_are_counted_as_zeek_does(tmp_path):
    frame = bytearray(eth(ip4(A4, B4, 17, udp(A4, B4, 5000, 53, b"abc"))))
    frame[14 + 20 + 6] ^= 0xFF  # break the UDP checksum
    (r,), _ = convert(tmp_path, [(1.0, bytes(frame))], check_checksums=True)
    assert (r["history"], r["orig_pkts"], r["conn_state"]) == ("C", 0, "OTH")
    (r,), _ = convert(tmp_path, [(1.0, bytes(frame))])
    assert (r["history"], r["orig_pkts"]) == ("D", 1)


def test_flows_come_out_when_they_end(tmp_path):
    meter = FlowMeter(uid_seed="t")
    f1 = dgram(0.0, A4, B4, 5000, 53)
    f2 = dgram(70.0, A4, C4, 5001, 53)
    meter.feed(f1[0], 1, f1[1], len(f1[1]))
    assert meter.pop_done() == []
    meter.feed(f2[0], 1, f2[1], len(f2[1]))
    (done,) = meter.pop_done()
    assert done["dst_ip"] == B4 and done["uid"].startswith("C")
    (last,) = meter.flush()
    assert last["dst_ip"] == C4


def test_iter_flows_streams_a_capture(tmp_path):
    frames = [(t, eth(p)) for t, p in handshake()] + [dgram(2000.0, A4, C4, 5001, 53)]
    path = write_pcap(tmp_path / "s.pcap", frames)
    out = list(iter_flows(f"pcap:{path}"))
    assert [r["proto"] for r in out] == ["tcp", "udp"]
    assert set(out[0]) >= {"ts", "uid", "src_ip", "conn_state", "history"}


def test_zero_window_letter(tmp_path):
    def z(t, src, dst, sp, dp, seq, ack, flags):
        seg_ = tcp(src, dst, sp, dp, seq, ack, flags, win=0)
        return (t, eth(ip4(src, dst, 6, seg_)))

    frames = [
        seg(1.0, A4, B4, 1234, 80, 100, 0, "S"),
        seg(1.1, B4, A4, 80, 1234, 500, 101, "SA"),
        seg(1.2, A4, B4, 1234, 80, 101, 501, "A"),
        z(1.3, B4, A4, 80, 1234, 501, 101, "A"),  # the responder's window is full
        z(1.4, A4, B4, 1234, 80, 101, 501, "RA"),  # zero window with a RST: no W
    ]
    (r,), _ = convert(tmp_path, frames)
    assert r["history"] == "ShAawR"  # the pure ACK (a), then its zero window (w)
    assert r["conn_state"] == "RSTO"


HS = [
    lambda t: seg(t, A4, B4, 1234, 80, 100, 0, "S"),
    lambda t: seg(t + 0.1, B4, A4, 80, 1234, 500, 101, "SA"),
    lambda t: seg(t + 0.2, A4, B4, 1234, 80, 101, 501, "A"),
]


@pytest.mark.parametrize(
    "tail, state, history",
    [
        # The originator closes, the responder stays open.
        ([seg(1.3, A4, B4, 1234, 80, 101, 501, "FA")], "S2", "ShAF"),
        # The responder closes, the originator stays open.
        ([seg(1.3, B4, A4, 80, 1234, 501, 101, "FA")], "S3", "ShAf"),
        # The responder resets an established connection.
        ([seg(1.3, B4, A4, 80, 1234, 501, 101, "R")], "RSTR", "ShAr"),
    ],
    ids=["S2", "S3", "RSTR"],
)
def test_more_conn_states_after_a_handshake(tmp_path, tail, state, history):
    frames = [mk(1.0) for mk in HS] + tail
    (r,), _ = convert(tmp_path, frames)
    assert (r["conn_state"], r["history"]) == (state, history)


@pytest.mark.parametrize(
    "frames, state, history",
    [
        # SYN, then the originator's own RST, nothing from the responder.
        (
            [
                seg(1.0, A4, B4, 1234, 80, 100, 0, "S"),
                seg(1.1, A4, B4, 1234, 80, 101, 0, "R"),
            ],
            "RSTOS0",
            "SR",
        ),
        # A SYN-ACK (its SYN unseen), then a RST, from the responder.
        (
            [
                seg(1.0, B4, A4, 80, 1234, 500, 101, "SA"),
                seg(1.1, B4, A4, 80, 1234, 501, 0, "R"),
            ],
            "RSTRH",
            "^hr",
        ),
        # A SYN-ACK, then a FIN, from the responder.
        (
            [
                seg(1.0, B4, A4, 80, 1234, 500, 101, "SA"),
                seg(1.1, B4, A4, 80, 1234, 501, 101, "FA"),
            ],
            "SHR",
            "^hf",
        ),
    ],
    ids=["RSTOS0", "RSTRH", "SHR"],
)
def test_conn_states_without_a_handshake(tmp_path, frames, state, history):
    (r,), _ = convert(tmp_path, frames)
    assert (r["conn_state"], r["history"]) == (state, history)
    assert (r["src_ip"], r["dst_port"]) == (A4, 80)
