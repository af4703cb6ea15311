"""Bad input: damaged captures keep what came before, with one warning and a flag.

Covers every file in ``pcap/malformed/`` and captures damaged on purpose here: cut
in a record or a block, garbage after good records, an unknown link type, an
empty file. Each gives the flows of the packets before the damage, ``partial``,
and exactly one warning naming the file and the byte offset; nothing raises
except where ``on_error="fail"`` meets bytes that cannot be a record.
"""

from __future__ import annotations

import struct

import pytest

from flows.errors import BadInputError, PartialInputError
from flows.meter import iter_flows, read_capture
from tests.conftest import data_file
from tests.test_meter_craft import (
    A4,
    B4,
    eth,
    handshake,
    ip4,
    pcapng_epb,
    pcapng_idb,
    pcapng_shb,
    udp,
    write_pcap,
)

# file -> (byte offset of the damaged record, flows kept)
MALFORMED = {
    "trunc_trunc-hdr.pcap": (24, 0),
    "trunc_ip4-trunc.pcap": (24, 0),
    "trunc_ipv4-truncated-broken-header.pcap": (24, 0),
    # Four ICMP echo packets cut at 80 of 98 bytes, below the 65535 snap length
    # the file announces: they still make their two flows, by original lengths.
    "trunc_icmp-payload-trunc.pcap": (24, 2),
}


def one_warning(res, path, offset) -> str:
    assert res.partial
    assert len(res.warnings) == 1, res.warnings
    (w,) = res.warnings
    assert str(path) in w and f"byte offset {offset}" in w
    return w


@pytest.mark.parametrize("name", sorted(MALFORMED))
@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_shared_malformed_captures(data_dir, name, on_error):
    path = data_file(data_dir, f"pcap/malformed/{name}")
    offset, n_flows = MALFORMED[name]
    res = read_capture(path, on_error=on_error)
    one_warning(res, path, offset)
    assert res.table.num_rows == n_flows
    assert res.stats["packets"] >= 1


def test_icmp_payload_cut_counts_original_lengths(data_dir):
    path = data_file(data_dir, "pcap/malformed/trunc_icmp-payload-trunc.pcap")
    recs = read_capture(path, on_error="skip").table.to_pylist()
    for r in recs:
        # 84-byte IPv4 datagrams (98 on the wire less 14 of Ethernet), ICMP echo.
        assert (r["orig_ip_bytes"], r["resp_ip_bytes"]) == (84, 84)
        assert (r["orig_bytes"], r["resp_bytes"]) == (56, 56)
        assert (r["src_port"], r["dst_port"]) == (8, 0)


def _good_frames():
    hs = [(t, eth(p)) for t, p in handshake()]
    hs.append((1500.0, eth(ip4(A4, B4, 17, udp(A4, B4, 5000, 53, b"late")))))
    return hs


def _record_offsets(frames):
    offsets, at = [], 24
    for _, data in frames:
        offsets.append(at)
        at += 16 + len(data)
    return offsets, at


@pytest.mark.parametrize("cut_into", ["record-header", "record-body"])
def test_pcap_cut_in_a_record_keeps_the_packets_before(tmp_path, cut_into):
    frames = _good_frames()
    whole = write_pcap(tmp_path / "whole.pcap", frames).read_bytes()
    offsets, _ = _record_offsets(frames)
    last = offsets[-1]
    cut_at = last + (7 if cut_into == "record-header" else 16 + 5)
    path = tmp_path / "cut.pcap"
    path.write_bytes(whole[:cut_at])
    for on_error in ("fail", "skip"):
        res = read_capture(path, on_error=on_error)
        one_warning(res, path, last)
        (rec,) = res.table.to_pylist()  # the TCP connection, whole
        assert rec["history"] == "ShADdFf" and rec["orig_pkts"] == 5
        assert res.stats["damage"]["kind"] == "cut"


def test_pcap_cut_inside_the_file_header(tmp_path):
    path = tmp_path / "hdr.pcap"
    path.write_bytes(struct.pack("<IHH", 0xA1B2C3D4, 2, 4))
    res = read_capture(path)
    one_warning(res, path, 0)
    assert res.table.num_rows == 0


def test_pcapng_cut_in_a_block(tmp_path):
    blob = pcapng_shb() + pcapng_idb(1)
    offsets = []
    for t, data in _good_frames():
        offsets.append(len(blob))
        blob += pcapng_epb(0, round(t * 1e6), data)
    path = tmp_path / "cut.pcapng"
    path.write_bytes(blob[: offsets[-1] + 30])
    res = read_capture(path)
    one_warning(res, path, offsets[-1])
    (rec,) = res.table.to_pylist()
    assert rec["proto"] == "tcp" and rec["resp_pkts"] == 3


def test_garbage_after_good_records(tmp_path):
    frames = _good_frames()
    whole = write_pcap(tmp_path / "whole.pcap", frames).read_bytes()
    _, end = _record_offsets(frames)
    path = tmp_path / "garbage.pcap"
    path.write_bytes(whole + b"\xde\xad\xbe\xef" * 16)
    res = read_capture(path, on_error="skip")
    one_warning(res, path, end)
    assert res.table.num_rows == 2 and res.stats["damage"]["kind"] == "garbage"
    with pytest.raises(PartialInputError) as info:
        read_capture(path, on_error="fail")
    err = info.value
    assert err.offset == end and str(path) in str(err)
    assert err.exit_code == 4 and err.result.table.num_rows == 2


def test_garbage_block_in_pcapng(tmp_path):
    blob = pcapng_shb() + pcapng_idb(1)
    for t, data in _good_frames()[:3]:
        blob += pcapng_epb(0, round(t * 1e6), data)
    bad_at = len(blob)
    blob += struct.pack("<II", 6, 13) + b"\0" * 40  # length not a multiple of 4
    path = tmp_path / "g.pcapng"
    path.write_bytes(blob)
    res = read_capture(path, on_error="skip")
    one_warning(res, path, bad_at)
    assert res.stats["packets"] == 3


def test_unknown_link_type(tmp_path):
    frames = _good_frames()
    path = write_pcap(tmp_path / "user0.pcap", frames, link=147)
    res = read_capture(path)
    w = one_warning(res, path, 24)
    assert "link type 147" in w
    assert res.table.num_rows == 0
    assert res.stats["skipped"]["unknown_link_type"] == len(frames)


def test_zero_length_file(tmp_path):
    path = tmp_path / "empty.pcap"
    path.write_bytes(b"")
    res = read_capture(path)
    w = one_warning(res, path, 0)
    assert "empty" in w and res.table.num_rows == 0


def test_not_a_capture_or_missing(tmp_path):
    text = tmp_path / "notes.pcap"
    text.write_text("hello, this is not a capture\n")
    # Nothing could be read at all: bad input (exit 3), not a partial one (exit 4),
    # with either on_error (there is nothing to keep).
    for on_error in ("fail", "skip"):
        with pytest.raises(BadInputError, match="not a pcap or pcapng") as info:
            read_capture(text, on_error=on_error)
        assert not isinstance(info.value, PartialInputError)
        assert info.value.exit_code == 3
        assert str(text) in str(info.value) and "byte offset 0" in str(info.value)
    with pytest.raises(BadInputError, match="no such file"):
        read_capture(tmp_path / "absent.pcap")


def test_iter_flows_yields_everything_before_garbage(tmp_path):
    frames = _good_frames()
    whole = write_pcap(tmp_path / "whole.pcap", frames).read_bytes()
    path = tmp_path / "garbage.pcap"
    path.write_bytes(whole + b"\xff" * 40)
    got = []
    with pytest.raises(PartialInputError):
        for rec in iter_flows(path):
            got.append(rec)
    assert [r["proto"] for r in got] == ["tcp", "udp"]
    assert len(list(iter_flows(path, on_error="skip"))) == 2


def test_readers_read_hands_captures_to_the_meter(tmp_path):
    """The shared reader entry point gives the same table for a capture."""
    from flows.readers import read

    path = write_pcap(tmp_path / "ok.pcap", _good_frames())
    res = read(path)
    assert res.format == "pcap" and res.family == "conn" and res.table.num_rows == 2
