"""Tester findings on the flow readers, each with a crafted input made here.

- Standard input too large for memory is an ``error:`` line (exit 3), not a
  MemoryError traceback; standard input is read in pieces, never asking for the
  whole limit at once.
- A capture whose packets all gave no flow (all non-IP, all fragments never made
  whole) is bad input (exit 3), with the reasons counted.
- A file name with control characters cannot break or colour an ``error:`` line.
- A pcapng packet block naming an undescribed interface is one damaged packet:
  skipped and counted, and the read goes on (exit 4).
- Wording: counts and ports out of range, a Zeek JSON ``ts`` past 9999; a UNSW-NB15
  CSV without ``spkts`` is read with a warning naming it.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from flows.cli import main
from flows.errors import BadInputError, GatewatchError, OutboxError, one_line
from flows.meter import fast_available, read_capture
from flows.readers import _source, read
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

ENGINES = ["python"] + (["fast"] if fast_available() else [])


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _frames():
    """A whole TCP connection and a UDP packet, as Ethernet frames."""
    frames = [(t, eth(p)) for t, p in handshake()]
    frames.append((1500.0, eth(ip4(A4, B4, 17, udp(A4, B4, 5000, 53, b"late")))))
    return frames


# -- 1. standard input that does not fit in memory ----------------------------------


class _Stdin:
    """A stand-in for ``sys.stdin`` whose bytes come from ``buffer``."""

    def __init__(self, buffer) -> None:
        self.buffer = buffer


class _NoRoom:
    def read(self, size: int = -1) -> bytes:
        raise MemoryError


class _Counted(io.BytesIO):
    """Bytes that note the size of every read asked of them."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.asked: list[int] = []

    def read(self, size: int | None = -1) -> bytes:
        self.asked.append(size)
        return super().read(size)


def test_stdin_too_large_for_memory_is_one_error_line(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", _Stdin(_NoRoom()))
    code, out, err = run(capsys, "inspect", "-")
    assert code == 3
    (line,) = err.splitlines()
    assert line.startswith("error: <stdin>: did not fit in memory")
    assert "$GATEWATCH_MAX_INFLATED (now 2147483648 bytes) lower" in line


def test_read_stream_memory_error_names_the_input():
    with pytest.raises(BadInputError) as info:
        _source.read_stream("<stdin>", _NoRoom())
    assert info.value.exit_code == 3
    assert str(info.value).startswith("<stdin>: did not fit in memory")


def test_plain_file_too_large_for_memory_is_bad_input(tmp_path, monkeypatch):
    path = tmp_path / "big.csv"
    path.write_bytes(b"a,b\n")

    def no_room(self):
        raise MemoryError

    monkeypatch.setattr(Path, "read_bytes", no_room)
    with pytest.raises(BadInputError) as info:
        _source.load(path)
    assert str(info.value) == (
        f"{path}: did not fit in memory when read whole, so nothing of it was "
        "read; split the input into smaller files"
    )


def test_stdin_is_read_in_pieces_not_the_whole_limit_at_once():
    data = b"line\n" * 1000
    fh = _Counted(data)
    src = _source.read_stream("<stdin>", fh)
    assert src.data == data and src.cut is None
    # One read of limit + 1 (2 GiB) would claim that much memory for 5 kB.
    assert max(fh.asked) <= 1 << 26


def test_stdin_past_the_limit_reads_one_byte_more_and_keeps_whole_lines(
    monkeypatch,
):
    monkeypatch.setenv("GATEWATCH_MAX_INFLATED", "10")
    fh = _Counted(b"abc\ndefg\nhijk\nlmn\n")
    src = _source.read_stream("<stdin>", fh)
    assert fh.tell() == 11
    assert src.data == b"abc\ndefg\n"
    assert src.cut == (
        "<stdin>: more than 10 bytes ($GATEWATCH_MAX_INFLATED sets the limit); kept "
        "the 2 complete lines before it and dropped a cut line of 1 byte"
    )


# -- 2. a capture whose packets gave no flow ----------------------------------------


def _non_ip_capture(tmp_path) -> Path:
    """Broadcast Ethernet frames in a pcap whose link type says null (BSD
    loopback): the four bytes the null header would hold (ff ff ff ff) name no
    address family."""
    frames = [(t, b"\xff" * 6 + data[6:]) for t, data in _frames()]
    return write_pcap(tmp_path / "linktype0.pcap", frames, link=0)


@pytest.mark.parametrize("engine", ENGINES)
def test_capture_of_only_non_ip_packets_is_bad_input(tmp_path, engine):
    path = _non_ip_capture(tmp_path)
    n = len(_frames())
    with pytest.raises(BadInputError) as info:
        read_capture(path, engine=engine, on_error="skip")
    assert type(info.value) is BadInputError
    assert str(info.value) == (
        f"{path}: {n} packets on link type 0 (null), all skipped: {n} non_ip (not "
        "IPv4 or IPv6); no flow came of them, so nothing usable was read"
    )


def test_inspect_capture_of_only_non_ip_packets_exits_3(tmp_path, capsys):
    path = _non_ip_capture(tmp_path)
    out = tmp_path / "x.parquet"
    for argv in (["inspect", str(path)], ["convert", str(path), "-o", str(out)]):
        code, _, err = run(capsys, *argv)
        assert code == 3
        (line,) = err.splitlines()
        assert line.startswith(f"error: {path}: {len(_frames())} packets on link ")
        assert f"all skipped: {len(_frames())} non_ip" in line
    assert not out.exists()


@pytest.mark.parametrize("engine", ENGINES)
def test_capture_of_fragments_never_made_whole_is_bad_input(tmp_path, engine):
    payload = udp(A4, B4, 4444, 5555, b"x" * 64)
    frames = [
        (10.0 + i * 0.001, eth(ip4(A4, B4, 17, payload[:32], ident=i, frag=0x2000)))
        for i in range(50)
    ]
    path = write_pcap(tmp_path / "frags.pcap", frames)
    with pytest.raises(BadInputError) as info:
        read_capture(path, engine=engine)
    assert "50 packets on link type 1 (ethernet), all skipped: 50 fragments_held" in (
        str(info.value)
    )


def test_capture_with_some_flows_among_non_ip_packets_is_read(tmp_path):
    arp = (0.5, eth(b"\x00" * 28, ethertype=0x0806))
    path = write_pcap(tmp_path / "mixed.pcap", [arp, *_frames()])
    res = read_capture(path)
    assert res.table.num_rows == 2 and res.stats["skipped"] == {"non_ip": 1}


# -- 3. control characters in file names --------------------------------------------

EVIL = "evil\x1b[31mRED\nerror: fake.pcap"


def test_file_name_with_control_characters_stays_one_quoted_line(tmp_path, capsys):
    path = tmp_path / EVIL
    path.write_bytes(b"")
    shown = str(tmp_path / "evil\\x1b[31mRED\\x0aerror: fake.pcap")
    code, _, err = run(capsys, "inspect", str(path))
    assert code == 3
    (line,) = err.splitlines()
    assert "\x1b" not in err
    assert line.startswith(f"error: {shown}: ")


def test_error_texts_escape_every_control_character():
    name = "a\x1b\x9b\x7f\t\u2028\u2029b"
    exc = BadInputError("is empty", path=name, line=3)
    assert str(exc) == "a\\x1b\\x9b\\x7f\\x09\\u2028\\u2029b, line 3: is empty"
    assert str(exc)[len(exc._where()) :] == "is empty"
    assert str(OutboxError("refused", path=name)) == (
        "a\\x1b\\x9b\\x7f\\x09\\u2028\\u2029b: refused"
    )
    # A name put in a message's own text (as teacher and edge-agent print it).
    assert str(GatewatchError(f"{EVIL}: cannot be written")) == (
        "evil\\x1b[31mRED; error: fake.pcap: cannot be written"
    )
    assert one_line("x\u2028y") == "x\\u2028y"


# -- 4. a pcapng packet block naming an undescribed interface -----------------------


def _pcapng_with_bad_interface(tmp_path) -> tuple[Path, int]:
    frames = _frames()
    blocks = [pcapng_shb(), pcapng_idb(1, tsresol=6)]
    blocks.append(pcapng_epb(5, int(frames[0][0] * 1e6), frames[0][1]))
    bad_at = sum(map(len, blocks[:2]))
    blocks += [pcapng_epb(0, int(t * 1e6), data) for t, data in frames]
    path = tmp_path / "iface5.pcapng"
    path.write_bytes(b"".join(blocks))
    return path, bad_at


@pytest.mark.parametrize("engine", ENGINES)
def test_packet_block_naming_an_undescribed_interface_is_skipped(tmp_path, engine):
    path, bad_at = _pcapng_with_bad_interface(tmp_path)
    res = read_capture(path, engine=engine)
    assert res.table.num_rows == 2  # the packets after it were all read
    assert res.partial and res.skipped == 1
    assert res.stats["skipped"] == {"bad_interface": 1}
    assert res.stats["packets"] == len(_frames()) + 1
    (warning,) = res.warnings
    assert warning == (
        f"{path}: byte offset {bad_at}: packet block names interface 5, but only "
        "interface 0 is described"
    )


def test_inspect_packet_block_naming_an_undescribed_interface_exits_4(
    tmp_path, capsys
):
    path, bad_at = _pcapng_with_bad_interface(tmp_path)
    code, out, err = run(capsys, "inspect", str(path))
    assert code == 4
    assert "rows:     2" in out
    assert err.splitlines()[-1] == (
        f"error: {path}: 1 damaged packet skipped at byte offset {bad_at}: packet "
        "block names interface 5, but only interface 0 is described; the read went "
        "on past it and kept the rows of the other packets"
    )


# -- 5. wording ---------------------------------------------------------------------

FLOW = {
    "ts": 1.5, "uid": "C1", "id.orig_h": A4, "id.orig_p": 40000, "id.resp_h": B4,
    "id.resp_p": 80, "proto": "tcp",
}


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("orig_bytes", 1e30, "expected a non-negative count (0 to "
         "9223372036854775807), found 1e+30"),
        ("resp_pkts", 2**64, "expected a non-negative count (0 to "
         f"9223372036854775807), found {2**64}"),
        ("id.orig_p", 1e30, "expected a port from 0 to 65535, found 1e+30"),
        ("id.resp_p", 2**64, f"expected a port from 0 to 65535, found {2**64}"),
        ("ts", 1e300, "expected a time in epoch seconds before the year 10000 (from "
         "100000000000 on, Zeek's JSON::TS_MILLIS milliseconds, below "
         "253402300800000), found 1e+300"),
    ],
)
def test_zeek_json_out_of_range_values_say_what_the_field_holds(
    tmp_path, key, value, problem
):
    path = tmp_path / "conn.json.log"
    lines = [FLOW, dict(FLOW, **{key: value})]
    path.write_text("".join(json.dumps(o) + "\n" for o in lines))
    with pytest.raises(BadInputError) as info:
        read(path)
    assert str(info.value) == f"{path}, line 2, column '{key}': {problem}"


def test_unsw_csv_without_spkts_warns_naming_it(tmp_path, capsys):
    path = tmp_path / "unsw.csv"
    path.write_text(
        "id,dur,proto,service,state,dpkts,sbytes,dbytes,attack_cat,label\n"
        "1,0.5,tcp,-,FIN,2,100,200,Normal,0\n"
    )
    res = read(path)
    assert res.table.num_rows == 1
    (warning,) = res.warnings
    assert warning == (
        f"{path}: header has no 'spkts' column, which every UNSW-NB15 file has; an "
        "encoder or model made on the data set cannot score these rows"
    )
    code, out, _ = run(capsys, "inspect", str(path))
    assert code == 0 and f"warning:  {warning}" in out



def test_inspect_text_names_skipped_lines_as_lines_not_a_count(tmp_path, capsys):
    """Found: ``skipped_lines: 18`` beside ``skipped: 1 bad line(s)`` read as a
    count of 18; it is the line number of the one skipped."""
    from flows.cli import main as flows_main

    log = tmp_path / "bad.log"
    log.write_text(
        "#separator \\x09\n#path\tconn\n"
        "#fields\tts\tuid\tid.orig_h\tid.orig_p\tid.resp_h\tid.resp_p\tproto\n"
        "#types\ttime\tstring\taddr\tport\taddr\tport\tenum\n"
        "1.0\tC1\t10.0.0.1\t1\t10.0.0.2\t80\ttcp\n"
        "2.0\tC2\t10.0.0.1\t99999\t10.0.0.2\t80\ttcp\n")
    assert flows_main(["inspect", "--on-error", "skip", str(log)]) == 0
    out = capsys.readouterr().out
    assert "skipped at lines (first 20): 6" in out
    assert "skipped_lines" not in out
