"""Findings of round 14 on ``flows``: a closed standard output, the reason every
packet was skipped, and durations written with float noise."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

from flows.cli import main
from flows.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_PARTIAL_INPUT
from flows.meter.conn import whole_microseconds
from tests.conftest import data_file

BIN = Path(sys.executable).parent


def _flows_into_closed_pipe(*argv: str) -> subprocess.CompletedProcess:
    """Run ``flows ARGV`` with a standard output whose reader is already gone."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [str(BIN / "flows"), *argv], stdout=write_end, stderr=subprocess.PIPE,
            text=True, timeout=120,
        )
    finally:
        os.close(write_end)


def _cut_gzip(data_dir: Path, tmp_path: Path) -> Path:
    """A Zeek conn.log gzipped and cut at 2/3 of its bytes."""
    log = data_file(data_dir, "zeek-conn/android-mischief-rat01-androidtester.conn.log")
    packed = gzip.compress(log.read_bytes())
    cut = tmp_path / "z_cut.log.gz"
    cut.write_bytes(packed[: len(packed) * 2 // 3])
    return cut


def test_a_closed_stdout_keeps_the_damage_error_and_exit_4(data_dir, tmp_path):
    """Found: ``flows inspect z_cut.log.gz | true`` exited 0 with nothing on
    stderr; with stdout to /dev/null it said "damaged part way", exit 4."""
    cut = _cut_gzip(data_dir, tmp_path)

    for flags in ([], ["--json"]):
        out = _flows_into_closed_pipe("inspect", *flags, str(cut))
        assert out.returncode == EXIT_PARTIAL_INPUT, out.stderr
        assert "damaged part way" in out.stderr
        assert "Traceback" not in out.stderr and "Exception ignored" not in out.stderr


def test_a_closed_stdout_alone_is_no_error(data_dir):
    """A clean read into a closed pipe (``| head``) exits 0 quietly; so does --help."""
    log = data_file(data_dir, "zeek-conn/android-mischief-rat01-androidtester.conn.log")

    for argv in (["inspect", str(log)], ["--help"]):
        out = _flows_into_closed_pipe(*argv)
        assert out.returncode == EXIT_OK, out.stderr
        assert out.stderr == ""


def test_every_packet_skipped_names_why_in_text_mode(data_dir, tmp_path, capsys):
    """Found: a pcap of link type 0xFFFF said only "every one of the 136 packet
    record(s) read was bad"; the reason was in --json alone."""
    data = bytearray(data_file(data_dir, "pcap/wikipedia.pcap").read_bytes())
    assert data[:4] == bytes.fromhex("d4c3b2a1")  # little-endian header
    data[20:24] = struct.pack("<I", 0xFFFF)
    capture = tmp_path / "lt.pcap"
    capture.write_bytes(bytes(data))

    code = main(["inspect", str(capture)])

    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    error = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error) == 1
    assert "every one of the 136 packet record(s) read was bad" in error[0]
    assert error[0].endswith(
        "; the first at byte offset 24: unknown link type 65535"
    ), error[0]


def _udp_frame(sport: int, dport: int) -> bytes:
    """An Ethernet frame with an IPv4 UDP datagram of 4 payload bytes."""
    payload = b"ping"
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
        bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]),
    )
    return b"\x00" * 12 + b"\x08\x00" + ip + udp


def test_capture_durations_are_written_as_zeek_writes_them(tmp_path, capsys):
    """Found: ``flows convert CAPTURE -o X.conn.log`` wrote 38.05562496185303 where
    Zeek writes 38.055625: the difference of two float epoch times."""
    stamps = [(1329843161, 968492), (1329843200, 24117)]  # 38.055625 s apart
    frame = _udp_frame(40000, 5353)
    blob = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    for sec, usec in stamps:
        blob += struct.pack("<IIII", sec, usec, len(frame), len(frame)) + frame
    capture = tmp_path / "two.pcap"
    capture.write_bytes(blob)
    out = tmp_path / "x.conn.log"

    assert main(["convert", str(capture), "-o", str(out)]) == EXIT_OK

    # Independently: whole microseconds between the two stamps, in integers.
    micros = (stamps[1][0] - stamps[0][0]) * 1_000_000 + stamps[1][1] - stamps[0][1]
    expected = f"{micros // 1_000_000}.{micros % 1_000_000:06d}"
    assert expected == "38.055625"
    lines = out.read_text().splitlines()
    fields = next(ln for ln in lines if ln.startswith("#fields")).split("\t")[1:]
    row = next(ln for ln in lines if not ln.startswith("#")).split("\t")
    assert row[fields.index("duration")] == expected
    assert row[fields.index("ts")] == "1329843161.968492"


def test_a_finer_duration_that_is_really_there_is_kept():
    """Times small enough to hold nanoseconds keep them: only float noise goes."""
    kept = whole_microseconds({"ts": 1.0, "duration": 0.1234567})
    assert kept["duration"] == 0.1234567

    start, last = 1329843175.736107, 1329843175.848539
    noisy = whole_microseconds({"ts": start, "duration": last - start})
    assert last - start != 0.112432 and noisy["duration"] == 0.112432


def test_a_cut_input_is_said_kept_once_in_words_that_count_right(data_dir, tmp_path):
    """Found: "kept the 370 complete lines before it; the rows before it were kept"
    (said twice), and "kept the 1 complete lines", "a cut line of 1 bytes"."""
    from flows.readers._source import kept_lines

    cut = _cut_gzip(data_dir, tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "inspect", str(cut)],
        capture_output=True, text=True, timeout=120,
    )

    assert out.returncode == EXIT_PARTIAL_INPUT, out.stderr
    [line] = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    assert line.count("kept the") == 1 and "were kept" not in line, line
    assert [kept_lines(n) for n in (0, 1, 2)] == [
        "no complete line came before it",
        "kept the one complete line before it",
        "kept the 2 complete lines before it",
    ]


def test_a_stdout_closed_before_the_start_keeps_the_error_and_exit_4(tmp_path):
    """Found: ``flows inspect CUT >&-`` (no standard output at all, not a pipe
    whose reader left) tracebacked, exit 1; a clean file exited 1 too."""
    rows = [f"{1.5 + i}\tC{i}\t10.0.0.1\t{40000 + i}\t10.0.0.2\t80\ttcp"
            for i in range(3)]
    head = ["#separator \\x09", "#fields\tts\tuid\tid.orig_h\tid.orig_p\tid.resp_h"
            "\tid.resp_p\tproto", "#types\ttime\tstring\taddr\tport\taddr\tport\tenum"]
    clean = tmp_path / "clean.log"
    clean.write_text("\n".join(head + rows) + "\n")
    cut = tmp_path / "cut.log"
    cut.write_text("\n".join(head + rows) + "\n" + rows[0][:9])

    def closed(path: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-m", "flows.cli",
             "inspect", str(path)],
            capture_output=False, stderr=subprocess.PIPE, text=True, timeout=120,
        )

    done = closed(cut)
    assert done.returncode == EXIT_PARTIAL_INPUT, done.stderr
    assert "damaged part way" in done.stderr and "Traceback" not in done.stderr
    done = closed(clean)
    assert done.returncode == EXIT_OK, done.stderr
    assert "Traceback" not in done.stderr
