"""No input makes the meter raise anything but a gatewatch error: random frames of
every link type, and random or mangled capture files."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.errors import GatewatchError
from flows.meter import FlowMeter, read_capture
from flows.meter.decode import LINK_NAMES
from tests.test_meter_craft import eth, handshake, write_pcap

LINKS = sorted(LINK_NAMES) + [147]


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(LINKS), st.binary(min_size=0, max_size=120), st.integers(0, 2000)
)
def test_random_frames_never_raise(link, data, extra):
    meter = FlowMeter(uid_seed="f", check_checksums=bool(extra % 2))
    meter.feed(1.0, link, data, len(data) + extra, 0, 65535)
    meter.feed(2.0, link, data[::-1], len(data), 16, 0)
    for rec in meter.flush():
        assert rec["proto"] in ("tcp", "udp", "icmp")


def _frames_with_ip_prefix():
    """Frames whose IP header is plausible, so the fuzzer reaches the transports."""
    ver_ihl = st.sampled_from([0x45, 0x46, 0x4F, 0x60, 0x44])
    return st.tuples(
        ver_ihl,
        st.binary(min_size=0, max_size=80),
        st.sampled_from([1, 6, 17, 58, 44, 0, 43, 60, 51]),
    )


@settings(max_examples=300, deadline=None)
@given(_frames_with_ip_prefix(), st.integers(0, 0xFFFF))
def test_random_ip_packets_never_raise(parts, total):
    vhl, body, proto = parts
    if vhl >> 4 == 4:
        pkt = (
            struct.pack("!BBHHHBBH", vhl, 0, total, 1, total & 0x3FFF, 64, proto, 0)
            + b"\x0a\0\0\x01\x0a\0\0\x02"
            + body
        )
    else:
        pkt = (
            struct.pack("!IHBB", 6 << 28, total & 0x7FF, proto, 64) + b"\1" * 32 + body
        )
    meter = FlowMeter(uid_seed="f")
    for link in (101, 1):
        frame = pkt if link == 101 else eth(pkt)
        meter.feed(1.0, link, frame, len(frame), 0, 0)
    meter.flush()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.integers(0, 900), st.binary(min_size=0, max_size=64), st.booleans())
def test_mangled_captures_give_results_or_gatewatch_errors(tmp_path, at, junk, ng):
    frames = [(t, eth(p)) for t, p in handshake()]
    base = write_pcap(tmp_path / "base.pcap", frames).read_bytes()
    if ng:
        from tests.test_meter_craft import pcapng_epb, pcapng_idb, pcapng_shb

        base = (
            pcapng_shb()
            + pcapng_idb(1)
            + b"".join(pcapng_epb(0, round(t * 1e6), f) for t, f in frames)
        )
    at = min(at, len(base))
    blob = base[:at] + junk + base[at + len(junk) :]
    path = tmp_path / "m.cap"
    path.write_bytes(blob)
    for on_error in ("skip", "fail"):
        try:
            res = read_capture(path, on_error=on_error)
        except GatewatchError as exc:
            assert str(path) in str(exc)
            continue
        if res.partial:
            assert len(res.warnings) == 1 and str(path) in res.warnings[0]
