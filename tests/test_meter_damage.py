"""Bad input: damaged captures keep what came before, with one warning and a flag.

Covers every file in ``pcap/malformed/`` and captures damaged on purpose here: cut
in a record or a block, garbage after good records, an unknown link type, an
empty file, pcapng interface blocks the meter cannot use (a time unit it cannot
represent, a block shorter than its fixed fields) and packets a pcapng time offset
puts before 1970 (skipped as damaged, on both packet paths). Each gives the flows
of the packets before the damage, ``partial``, and exactly one warning naming the
file and the byte offset; nothing raises except where ``on_error="fail"`` meets
bytes that cannot be a record.
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


# ------------------------------------------------ pcapng interfaces and times

ENGINES = ["python", "fast"]


def _engine(engine: str) -> str:
    """The engine, or a skip when it is the compiled one and that is not built."""
    from flows.meter import fast_available

    if engine == "fast" and not fast_available():
        pytest.skip("the compiled meter flows.meter._fast is not built here")
    return engine


def _idb_with_offset(seconds: int) -> bytes:
    """An Ethernet interface description block with an if_tsoffset option."""
    body = struct.pack("<HHI", 1, 0, 0)
    body += struct.pack("<HHq", 14, 8, seconds) + struct.pack("<HH", 0, 0)
    n = len(body) + 12
    return struct.pack("<II", 1, n) + body + struct.pack("<I", n)


def _dns(sport: int) -> bytes:
    return eth(ip4(A4, B4, 17, udp(A4, B4, sport, 53, b"query")))


TSRESOL_EXPECTED = (
    "expected a time unit the meter can represent, 10^-0 to 10^-18 seconds "
    "(0x00 to 0x12) or 2^-0 to 2^-63 seconds (0x80 to 0xbf)"
)


def _assert_first_idb_refused(path, engine: str, message: str) -> None:
    """The capture's first interface block (byte offset 28) is refused with
    ``message``: bad input (exit 3) with either ``on_error``, no packet read."""
    for on_error in ("fail", "skip"):
        with pytest.raises(BadInputError) as info:
            read_capture(path, engine=_engine(engine), on_error=on_error)
        err = info.value
        assert not isinstance(err, PartialInputError)
        assert (err.path, err.offset, err.exit_code) == (str(path), 28, 3)
        assert str(err) == f"{path}, byte offset 28: {message}; no packet could be read"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("tsresol", "unit"),
    [(0xFF, "2^-127"), (0xC0, "2^-64"), (0x13, "10^-19"), (0x7F, "10^-127")],
)
def test_pcapng_time_unit_the_meter_cannot_represent_is_bad_input(
    tmp_path, engine, tsresol, unit
):
    """Found: an if_tsresol of 0xff (2^-127 s) was taken, and every packet of the
    interface came out at 1970-01-01 00:00:00."""
    path = tmp_path / "unit.pcapng"
    path.write_bytes(
        pcapng_shb() + pcapng_idb(1, tsresol=tsresol) + pcapng_epb(0, 10**6, _dns(1))
    )
    message = (
        f"interface description block for interface 0 has if_tsresol "
        f"{tsresol:#04x} ({unit} seconds): {TSRESOL_EXPECTED}"
    )
    _assert_first_idb_refused(path, engine, message)


@pytest.mark.parametrize("engine", ENGINES)
def test_pcapng_bad_time_unit_later_keeps_the_packets_before(tmp_path, engine):
    blob = pcapng_shb() + pcapng_idb(1) + pcapng_epb(0, 1000 * 10**6, _dns(1000))
    bad_at = len(blob)
    blob += pcapng_idb(1, tsresol=0xFF) + pcapng_epb(1, 10**6, _dns(2000))
    path = tmp_path / "later.pcapng"
    path.write_bytes(blob)
    message = (
        f"interface description block for interface 1 has if_tsresol 0xff "
        f"(2^-127 seconds): {TSRESOL_EXPECTED}"
    )
    res = read_capture(path, engine=_engine(engine), on_error="skip")
    assert one_warning(res, path, bad_at) == f"{path}: byte offset {bad_at}: {message}"
    assert res.stats["damage"]["kind"] == "garbage"
    assert [(r["ts"], r["src_port"]) for r in res.table.to_pylist()] == [(1000.0, 1000)]
    with pytest.raises(PartialInputError) as info:
        read_capture(path, engine=engine, on_error="fail")
    err = info.value
    assert str(err) == (
        f"{path}, byte offset {bad_at}: {message}; the packets before it were kept"
    )
    assert err.exit_code == 4 and err.result.table.num_rows == 1


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("tsresol", "ticks", "ts"), [(0x12, 3 * 10**18, 3.0), (0xBF, 5 << 60, 0.625)]
)
def test_pcapng_finest_time_units_are_read(tmp_path, engine, tsresol, ticks, ts):
    """10^-18 s and 2^-63 s, the finest units taken, still give exact times."""
    path = tmp_path / "fine.pcapng"
    path.write_bytes(
        pcapng_shb() + pcapng_idb(1, tsresol=tsresol) + pcapng_epb(0, ticks, _dns(1))
    )
    res = read_capture(path, engine=_engine(engine))
    assert res.table.column("ts").to_pylist() == [ts]
    assert not res.partial and res.warnings == []


BEFORE_1970 = (
    "packet time stamp is unusable: expected a time in epoch seconds >= 0 "
    "(1970 or later), found "
)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_pcapng_time_offset_before_1970_skips_the_packet_as_damaged(
    tmp_path, engine, on_error
):
    """Found: an if_tsoffset of -3600 s put a packet at 1000 s before 1970 and the
    meter made a flow with ts -2600.0, a record every conn-log reader refuses."""
    blob = pcapng_shb() + _idb_with_offset(-3600)
    bad_at = len(blob)
    blob += pcapng_epb(0, 1000 * 10**6, _dns(1000))  # -2600.0: before 1970
    blob += pcapng_epb(0, 5000 * 10**6, _dns(1001))  # 1400.0
    blob += pcapng_epb(0, 5001 * 10**6, _dns(1000))  # 1401.0: a flow of its own
    path = tmp_path / "offset.pcapng"
    path.write_bytes(blob)
    res = read_capture(path, engine=_engine(engine), on_error=on_error)
    assert one_warning(res, path, bad_at) == (
        f"{path}: byte offset {bad_at}: {BEFORE_1970}-2600"
    )
    rows = [(r["ts"], r["src_port"], r["orig_pkts"]) for r in res.table.to_pylist()]
    assert rows == [(1400.0, 1001, 1), (1401.0, 1000, 1)]
    assert res.skipped == 1 and res.stats["skipped"] == {"bad_time": 1}
    assert res.stats["damage"]["reasons"] == {"bad_time": 1}
    assert (res.stats["packets"], res.stats["first_ts"]) == (3, 1400.0)
    streamed = [r["ts"] for r in iter_flows(path, engine=engine, on_error=on_error)]
    assert streamed == [1400.0, 1401.0]


@pytest.mark.parametrize("engine", ENGINES)
def test_meter_fed_only_times_before_1970_makes_no_flow(engine):
    from flows.meter import make_meter

    meter = make_meter(_engine(engine), uid_seed="t")
    meter.feed(-0.5, 1, _dns(1), len(_dns(1)), 24)
    meter.feed(float("nan"), 1, _dns(2), len(_dns(2)), 90)
    assert meter.flush() == []
    stats = meter.stats
    assert (stats["packets"], stats["flows"], stats["damaged_packets"]) == (2, 0, 2)
    assert stats["skipped"] == {"bad_time": 2}
    assert (stats["first_ts"], stats["last_ts"]) == (None, None)
    assert meter.damage.offset == 24
    assert meter.damage.message == f"{BEFORE_1970}-0.5"


PAST_9999 = (
    "packet time stamp is unusable: expected a time in epoch seconds below "
    "253402300800 (before the year 10000), found "
)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("on_error", ["fail", "skip"])
@pytest.mark.parametrize(
    ("idb", "ticks", "found"),
    [
        # An if_tsoffset of 2**63 - 1 s puts every packet of the interface there.
        (_idb_with_offset(2**63 - 1), 10**6, "9.223372036854776e+18"),
        # A time unit of 1 s (if_tsresol 0x80) and a damaged stamp: year 11476.
        (pcapng_idb(1, tsresol=0x80), 3 * 10**11, "300000000000"),
    ],
    ids=["tsoffset", "stamp"],
)
def test_pcapng_time_past_year_9999_skips_the_packet_as_damaged(
    tmp_path, engine, on_error, idb, ticks, found
):
    """Found: a packet stamped past year 9999 (which datetime cannot hold) made a
    flow, while one stamped before 1970 is skipped as damaged."""
    blob = pcapng_shb() + pcapng_idb(1) + idb
    bad_at = len(blob)
    blob += pcapng_epb(1, ticks, _dns(999))  # interface 1: past 9999
    blob += pcapng_epb(0, 1400 * 10**6, _dns(1001))
    blob += pcapng_epb(0, 1401 * 10**6, _dns(1000))
    path = tmp_path / "future.pcapng"
    path.write_bytes(blob)
    res = read_capture(path, engine=_engine(engine), on_error=on_error)
    assert one_warning(res, path, bad_at) == (
        f"{path}: byte offset {bad_at}: {PAST_9999}{found}"
    )
    rows = [(r["ts"], r["src_port"]) for r in res.table.to_pylist()]
    assert rows == [(1400.0, 1001), (1401.0, 1000)]
    assert res.skipped == 1 and res.stats["skipped"] == {"bad_time": 1}
    assert (res.stats["first_ts"], res.stats["last_ts"]) == (1400.0, 1401.0)


@pytest.mark.parametrize("engine", ENGINES)
def test_meter_skips_times_it_cannot_date_and_keeps_the_last_second_of_9999(engine):
    from flows.meter import make_meter
    from flows.record import TS_LIMIT

    meter = make_meter(_engine(engine), uid_seed="t")
    meter.feed(TS_LIMIT, 1, _dns(1), len(_dns(1)), 24)
    meter.feed(float("inf"), 1, _dns(2), len(_dns(2)), 90)
    meter.feed(1e300, 1, _dns(3), len(_dns(3)), 156)
    meter.feed(TS_LIMIT - 1, 1, _dns(4), len(_dns(4)), 222)  # 9999-12-31 23:59:59
    assert [(r["ts"], r["src_port"]) for r in meter.flush()] == [(TS_LIMIT - 1, 4)]
    stats = meter.stats
    assert (stats["packets"], stats["damaged_packets"]) == (4, 3)
    assert stats["skipped"] == {"bad_time": 3}
    assert meter.damage.offset == 24
    assert meter.damage.message == f"{PAST_9999}253402300800"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("block", "message"),
    [
        (
            struct.pack("<III", 1, 12, 12),
            "interface description block for interface 0 is 12 bytes long: "
            "expected at least 20 (its link type, reserved field and snap length)",
        ),
        (
            struct.pack("<III", 3, 12, 12),
            "simple packet block shorter than its fixed fields",
        ),
    ],
    ids=["idb", "spb"],
)
def test_pcapng_block_shorter_than_its_fixed_fields(tmp_path, engine, block, message):
    """Found: such blocks raised struct.error (a traceback) instead of a message."""
    first = pcapng_shb() + (pcapng_idb(1) if block[0] == 3 else b"")
    path = tmp_path / "short.pcapng"
    path.write_bytes(first + block)
    with pytest.raises(BadInputError) as info:
        read_capture(path, engine=_engine(engine))
    assert str(info.value) == (
        f"{path}, byte offset {len(first)}: {message}; no packet could be read"
    )


def _idb_with_options(*options: tuple[int, bytes], claim: int | None = None) -> bytes:
    """An Ethernet interface description block with these options (code, value),
    each padded to 4 bytes; ``claim`` makes the last one claim that many bytes."""
    body = struct.pack("<HHI", 1, 0, 0)
    for i, (code, value) in enumerate(options):
        length = claim if claim is not None and i == len(options) - 1 else len(value)
        body += struct.pack("<HH", code, length) + value + b"\0" * (-len(value) % 4)
    if claim is None:
        body += struct.pack("<HH", 0, 0)
    n = len(body) + 12
    return struct.pack("<II", 1, n) + body + struct.pack("<I", n)


IDB_OPTIONS = {
    "tsresol-twice": (
        [(9, b"\x06"), (9, b"\x09")],
        None,
        "has if_tsresol twice (0x06 at byte 16, then 0x09 at byte 24): expected it "
        "at most once, as the pcapng format allows one per interface",
    ),
    "tsresol-empty": (
        [(9, b"")],
        None,
        "has an if_tsresol option of 0 bytes at byte 16: expected 1 byte (the time "
        "unit)",
    ),
    "option-past-the-end": (
        [(2, b"eth0")],
        40,
        "has an option (code 2) at byte 16 that claims 40 bytes, past the block's "
        "options, which end at byte 24: expected every option inside its block",
    ),
    "tsresol-past-the-end": (
        [(2, b"eth0"), (9, b"\x09")],
        5,
        "has an option (code 9) at byte 24 that claims 5 bytes, past the block's "
        "options, which end at byte 32: expected every option inside its block",
    ),
    "tsoffset-twice": (
        [(14, struct.pack("<q", 0)), (14, struct.pack("<q", 3600))],
        None,
        "has if_tsoffset twice (0 s at byte 16, then 3600 s at byte 28): expected "
        "it at most once, as the pcapng format allows one per interface",
    ),
    "tsoffset-short": (
        [(14, struct.pack("<i", 3600))],
        None,
        "has an if_tsoffset option of 4 bytes at byte 16: expected 8 bytes (a "
        "signed 64-bit count of seconds)",
    ),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", sorted(IDB_OPTIONS))
def test_pcapng_interface_with_malformed_options_is_bad_input(tmp_path, engine, case):
    """Found: an IDB with if_tsresol 6 then 9 took the last (times 1000x off),
    and an option running past the block's end or an empty if_tsresol was taken
    silently. The pcapng format allows if_tsresol and if_tsoffset once each."""
    options, claim, what = IDB_OPTIONS[case]
    path = tmp_path / "idb.pcapng"
    path.write_bytes(
        pcapng_shb()
        + _idb_with_options(*options, claim=claim)
        + pcapng_epb(0, 10**15, _dns(1))
    )
    message = f"interface description block for interface 0 {what}"
    _assert_first_idb_refused(path, engine, message)


@pytest.mark.parametrize("engine", ENGINES)
def test_pcapng_time_unit_given_twice_later_keeps_the_packets_before(
    tmp_path, engine
):
    blob = pcapng_shb() + pcapng_idb(1) + pcapng_epb(0, 1000 * 10**6, _dns(1000))
    bad_at = len(blob)
    blob += _idb_with_options((9, b"\x06"), (9, b"\x09"))
    blob += pcapng_epb(1, 2000 * 10**9, _dns(2000))
    path = tmp_path / "later.pcapng"
    path.write_bytes(blob)
    message = (
        "interface description block for interface 1 has if_tsresol twice (0x06 "
        "at byte 16, then 0x09 at byte 24): expected it at most once, as the "
        "pcapng format allows one per interface"
    )
    res = read_capture(path, engine=_engine(engine), on_error="skip")
    assert one_warning(res, path, bad_at) == f"{path}: byte offset {bad_at}: {message}"
    assert [(r["ts"], r["src_port"]) for r in res.table.to_pylist()] == [(1000.0, 1000)]
    with pytest.raises(PartialInputError) as info:
        read_capture(path, engine=engine, on_error="fail")
    assert str(info.value) == (
        f"{path}, byte offset {bad_at}: {message}; the packets before it were kept"
    )
    assert info.value.exit_code == 4


@pytest.mark.parametrize("engine", ENGINES)
def test_pcapng_one_time_unit_and_offset_each_still_read(tmp_path, engine):
    """One if_tsresol (10^-9 s) and one if_tsoffset (100 s), with another option
    between them: the packet's time is 100 + 5 s."""
    idb = _idb_with_options(
        (9, b"\x09"), (2, b"eth0"), (14, struct.pack("<q", 100))
    )
    path = tmp_path / "ok.pcapng"
    path.write_bytes(pcapng_shb() + idb + pcapng_epb(0, 5 * 10**9, _dns(1)))
    res = read_capture(path, engine=_engine(engine))
    assert res.table.column("ts").to_pylist() == [105.0]
    assert not res.partial and res.warnings == [] and res.damage == []
