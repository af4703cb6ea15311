"""Hostile inputs a tester fed the readers: each test first reproduces the finding.

Very long lines (pyarrow's splitter failed with "straddling object" and every row
was lost), gzip bombs (inflated whole, without bound), addresses that are not IP
addresses and ports outside 0..65535 (passed silently into the record), UTF-16
text, and standard input as ``-``. Every input is made here.
"""

from __future__ import annotations

import gzip
import io
import json
import sys

import pyarrow.parquet as pq
import pytest

from flows.errors import BadInputError, PartialInputError
from flows.readers import iter_records, read
from flows.readers._source import _OUT, MAX_LINE_BYTES, Gunzip
from flows.record import CONN_FIELD_NAMES, columns_to_table
from tests.test_readers import (
    BINET_HEAD,
    FIELDS,
    ROW_A,
    ROW_B,
    TYPES,
    write,
    zeek_text,
)


def _lines_of(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def _insert_after_first_row(text: str, line: str) -> tuple[str, int]:
    """``text`` with ``line`` after its first data row, and that line's number."""
    lines = _lines_of(text)
    first = next(i for i, ln in enumerate(lines) if not ln.startswith("#"))
    lines.insert(first + 1, line)
    return "".join(lines), first + 2


# ------------------------------------------------------------------ long lines


def test_a_line_longer_than_pyarrows_block_keeps_the_rows_around_it(tmp_path):
    # 40 MiB on one line: pyarrow's block splitter used to fail on the whole file.
    huge = "\t".join(ROW_B[:1] + ["x" * (40 << 20)] + ROW_B[2:]) + "\n"
    text, bad_line = _insert_after_first_row(zeek_text([ROW_A, ROW_B]), huge)
    path = write(tmp_path, "long.log", text)

    with pytest.raises(PartialInputError) as info:
        read(path)
    exc = info.value
    assert exc.path == str(path) and exc.line == bad_line
    assert "longer than the 1048576-byte limit" in str(exc)
    assert exc.result.table.column("uid").to_pylist() == ["CabC1"]

    skipped = read(path, on_error="skip")
    assert skipped.table.column("uid").to_pylist() == ["CabC1", "CabC2"]
    assert skipped.skipped == 1
    assert len(skipped.warnings) == 1 and f"line {bad_line}" in skipped.warnings[0]


def test_a_long_line_is_a_bad_line_in_binetflow_csv_and_json(tmp_path):
    rows = [
        "2011/08/10 09:46:53.047277,3.5,tcp,147.32.84.165,1027,   ->,1.2.3.4,80,"
        "S_RA,0,0,4,244,124,2,flow=From-Botnet",
        "2011/08/10 09:46:54.000000,0.1,udp,147.32.84.2,53,  <->,147.32.84.3,53,"
        "CON,0,,2,180,90,1,flow=To-Normal",
    ]
    long_row = "2011/08/10 09:46:55," + "9" * (MAX_LINE_BYTES + 5) + "\n"
    binet = BINET_HEAD + "\n" + rows[0] + "\n" + long_row + rows[1] + "\n"
    result = read(write(tmp_path, "b.binetflow", binet), on_error="skip")
    assert result.table.column("src_ip").to_pylist() == ["147.32.84.165", "147.32.84.2"]
    assert result.skipped == 1 and "line 3" in result.warnings[-1]

    head = " Source IP, Source Port, Flow Duration, Total Fwd Packets, Label"
    cic = f"{head}\n10.0.0.1,80,5,1,BENIGN\n{'1' * (MAX_LINE_BYTES + 1)}\n"
    with pytest.raises(PartialInputError) as info:
        read(write(tmp_path, "c.csv", cic))
    assert info.value.line == 3 and info.value.result.table.num_rows == 1

    obj = {"ts": 1.5, "id.orig_h": "10.0.0.1", "id.orig_p": 1,
           "id.resp_h": "10.0.0.2", "id.resp_p": 2, "proto": "tcp"}
    big = dict(obj, uid="u" * (MAX_LINE_BYTES + 1))
    jtext = "\n".join(json.dumps(o) for o in (obj, big, obj)) + "\n"
    result = read(write(tmp_path, "j.log", jtext), on_error="skip")
    assert result.table.num_rows == 2 and result.skipped == 1
    assert "line 2" in result.warnings[0] and "byte limit" in result.warnings[0]


def test_streaming_reader_never_holds_a_long_line(tmp_path):
    # 64 MiB without a newline, gzip-compressed, between two good rows.
    text, bad_line = _insert_after_first_row(
        zeek_text([ROW_A, ROW_B]), "y" * (64 << 20) + "\n"
    )
    path = write(tmp_path, "long.log.gz", gzip.compress(text.encode(), 1))

    from flows.readers import stream

    pieces = list(stream._lines(str(path)))
    lengths = [p for p in pieces if isinstance(p, int)]
    assert lengths == [64 << 20]
    assert max(len(p) for p in pieces if isinstance(p, str)) < 1000

    records = []
    with pytest.raises(PartialInputError) as info:
        for rec in iter_records(path):
            records.append(rec)
    assert [r["uid"] for r in records] == ["CabC1"]
    assert info.value.line == bad_line
    assert [r["uid"] for r in iter_records(path, on_error="skip")] == [
        "CabC1",
        "CabC2",
    ]


# ------------------------------------------------------------------ gzip bombs


def test_inflating_a_bomb_goes_in_bounded_steps():
    bomb = gzip.compress(b"\0" * (64 << 20), 9)  # about 64 KiB
    assert len(bomb) < 1 << 17
    reader = Gunzip(io.BytesIO(bomb))
    sizes = [len(chunk) for chunk in reader]
    assert sum(sizes) == 64 << 20 and max(sizes) <= _OUT
    assert reader.stopped is None


def test_a_gzip_bomb_is_cut_at_the_limit_and_keeps_the_rows_before(
    tmp_path, monkeypatch
):
    row = "\t".join(ROW_A) + "\n"
    header = zeek_text([], close=False)
    n_rows = (48 << 20) // len(row)
    path = write(
        tmp_path, "bomb.log.gz", gzip.compress((header + row * n_rows).encode(), 9)
    )
    limit = 8 << 20
    monkeypatch.setenv("GATEWATCH_MAX_INFLATED", str(limit))

    result = read(path)

    assert result.partial
    kept = result.table.num_rows
    # All complete rows within the first `limit` inflated bytes, and no more.
    # Found: the cut came up to one inflating step (4 MiB) past the limit.
    assert kept == (limit - len(header)) // len(row) < n_rows
    assert set(result.table.column("uid").to_pylist()) == {"CabC1"}
    note = [w for w in result.warnings if "inflated text passed" in w]
    assert len(note) == 1 and str(path) in note[0] and "compressed bytes" in note[0]
    assert f"kept the {kept + header.count(chr(10))} complete lines" in note[0]


def test_a_bad_limit_setting_is_a_usage_error(tmp_path, monkeypatch):
    from flows.errors import UsageError

    path = write(tmp_path, "c.log.gz", gzip.compress(zeek_text([ROW_A]).encode()))
    monkeypatch.setenv("GATEWATCH_MAX_INFLATED", "lots")
    with pytest.raises(UsageError, match="GATEWATCH_MAX_INFLATED"):
        read(path)


# ------------------------------------------------------- addresses and ports


def _zeek_with(field: int, value: str) -> str:
    bad = list(ROW_B)
    bad[field] = value
    return zeek_text([ROW_A, bad, ROW_A])


@pytest.mark.parametrize(
    ("field", "value", "column", "expected"),
    [
        (2, "999.1.1.1", "id.orig_h", "an IPv4 or IPv6 address"),
        (4, "example.com", "id.resp_h", "an IPv4 or IPv6 address"),
        (2, "(empty)", "id.orig_h", "an IPv4 or IPv6 address"),
        (3, "70000", "id.orig_p", "a port from 0 to 65535"),
        (5, "-1", "id.resp_p", "a port from 0 to 65535"),
        (8, "-1.5", "duration", "a number >= 0"),
        (9, "-3", "orig_bytes", "a number >= 0"),
        (16, "-1", "orig_pkts", "a number >= 0"),
        (14, "-7", "missed_bytes", "a number >= 0"),
    ],
)
def test_zeek_tsv_bad_address_or_port_is_a_bad_row(
    tmp_path, field, value, column, expected
):
    path = write(tmp_path, "c.log", _zeek_with(field, value))

    with pytest.raises(PartialInputError) as info:
        read(path)
    assert info.value.line == 10 and info.value.column == column
    assert expected in str(info.value) and str(path) in str(info.value)
    assert info.value.result.table.num_rows == 1

    skipped = read(path, on_error="skip")
    assert skipped.skipped == 1 and skipped.table.num_rows == 2
    assert f"line 10, column {column!r}" in skipped.warnings[0]

    # The line-by-line parser (the agent's follow mode) decides the same.
    with pytest.raises(PartialInputError) as info:
        list(iter_records(path))
    assert info.value.line == 10 and info.value.column == column


def test_good_addresses_of_every_kind_pass(tmp_path):
    rows = []
    for src, dst in [("::1", "fe80::1%eth0"), ("0.0.0.0", "255.255.255.255")]:
        row = list(ROW_A)
        row[2], row[4], row[3], row[5] = src, dst, "0", "65535"
        rows.append(row)
    result = read(write(tmp_path, "c.log", zeek_text(rows)))
    dst = result.table.column("dst_ip").to_pylist()
    assert dst == ["fe80::1%eth0", "255.255.255.255"]
    assert result.table.column("dst_port").to_pylist() == [65535, 65535]


def _json_row(**changes) -> str:
    obj = {"ts": 1.5, "uid": "C1", "id.orig_h": "10.0.0.1", "id.orig_p": 1,
           "id.resp_h": "10.0.0.2", "id.resp_p": 2, "proto": "tcp"}
    obj.update(changes)
    return json.dumps(obj)


@pytest.mark.parametrize(
    ("change", "column"),
    [
        ({"id.orig_h": "10.0.0.256"}, "id.orig_h"),
        ({"id.resp_h": 167772161}, "id.resp_h"),
        ({"id.orig_p": 65536}, "id.orig_p"),
        ({"id.resp_p": -5}, "id.resp_p"),
        ({"orig_bytes": -5}, "orig_bytes"),
        ({"duration": -0.5}, "duration"),
    ],
)
def test_zeek_json_bad_address_or_port_is_a_bad_row(tmp_path, change, column):
    text = "\n".join([_json_row(), _json_row(**change), _json_row()]) + "\n"
    path = write(tmp_path, "c.json", text)

    with pytest.raises(PartialInputError) as info:
        read(path)
    assert info.value.line == 2 and info.value.column == column
    skipped = read(path, on_error="skip")
    assert skipped.skipped == 1 and skipped.table.num_rows == 2


def test_binetflow_bad_address_and_port_are_bad_rows_mac_flows_are_not(tmp_path):
    rows = [
        "2011/08/10 09:46:53.0,1,tcp,147.32.84.165,1027,   ->,1.2.3.4,80,S_RA,0,0,"
        "4,244,124,2,flow=From-Botnet",
        "2011/08/10 09:46:54.0,1,tcp,147.32.84.999,1027,   ->,1.2.3.4,80,S_RA,0,0,"
        "4,244,124,2,flow=From-Botnet",
        "2011/08/10 09:46:55.0,1,udp,147.32.84.2,0x10000,  <->,1.2.3.4,53,CON,0,0,"
        "2,180,90,1,flow=To-Normal",
        "2018/05/10 10:52:47.0,0.04,man,0,0,,0,0,STA,,,0,0,0,0,",
        "1970/01/01 01:00:00.0,0,llc,00:00:00:00:00:00,0,   ->,0:1:2:a:b:c,0,INT,,,"
        "1,60,60,1,flow=Background",
    ]
    path = write(tmp_path, "b.binetflow", BINET_HEAD + "\n" + "\n".join(rows) + "\n")

    with pytest.raises(PartialInputError) as info:
        read(path)
    assert info.value.line == 3 and info.value.column == "SrcAddr"

    result = read(path, on_error="skip")
    assert result.skipped == 2 and result.stats["skipped_lines"] == [3, 4]
    assert result.table.column("proto").to_pylist() == ["tcp", "man", "llc"]
    assert result.table.column("src_ip").to_pylist() == ["147.32.84.165", None, None]
    assert result.stats["non_ip"] == 2
    assert any("2 Argus record(s) without IP addresses" in w for w in result.warnings)


def test_cic_bad_address_and_port_are_bad_rows_empty_rows_are_not(tmp_path):
    head = " Source IP, Source Port, Destination IP, Destination Port, Flow Duration," \
        " Total Fwd Packets, Label"
    rows = [
        "10.0.0.1,80,10.0.0.2,443,5,1,BENIGN",
        "10.0.0.1,80,not-an-ip,443,5,1,BENIGN",
        "10.0.0.1,99999,10.0.0.2,443,5,1,DoS",
        ",,,,,,",
    ]
    path = write(tmp_path, "c.csv", head + "\n" + "\n".join(rows) + "\n")
    result = read(path, on_error="skip")
    assert result.skipped == 2 and result.stats["skipped_lines"] == [3, 4]
    assert result.table.column("Destination IP").to_pylist() == ["10.0.0.2", ""]
    with pytest.raises(PartialInputError) as info:
        read(path)
    assert info.value.line == 3 and info.value.column == "Destination IP"


def test_cic_port_past_float_range_is_a_bad_row_not_a_crash(tmp_path):
    """Found by the long fuzz run: '80e1266342' made the port column float with
    inf in it, and the port check died converting inf to an integer."""
    head = " Destination Port, Flow Duration, Total Fwd Packets, Label"
    rows = ["80e1266342,41,4,BENIGN", "22,3,2,SSH-Patator", "nan,5,1,BENIGN"]
    path = write(tmp_path, "c.csv", head + "\n" + "\n".join(rows) + "\n")

    result = read(path, on_error="skip")

    # The 'nan' text is the CIC rule's null (non-finite), not a bad value.
    assert result.skipped == 1 and result.stats["skipped_lines"] == [2]
    assert result.table.column("Destination Port").to_pylist() == [22, None]
    with pytest.raises(BadInputError) as info:  # the first row: nothing before it
        read(path)
    assert info.value.line == 2 and info.value.column == "Destination Port"
    assert "a port from 0 to 65535, found inf" in str(info.value)


def test_parquet_bad_address_and_port_are_bad_rows_named_by_row(tmp_path):
    base = {"ts": 1.0, "src_ip": "10.0.0.1", "src_port": 1, "dst_ip": "10.0.0.2",
            "dst_port": 2, "proto": "tcp"}
    rows = [base, dict(base, dst_ip="10.0.0"), dict(base, src_port=123456), base]
    cols = {n: [r.get(n) for r in rows] for n in CONN_FIELD_NAMES}
    path = tmp_path / "c.parquet"
    pq.write_table(columns_to_table(cols), path)

    with pytest.raises(PartialInputError) as info:
        read(path)
    assert info.value.row == 2 and info.value.column == "dst_ip"
    assert f"{path}, row 2, column 'dst_ip': expected an IPv4" in str(info.value)
    assert info.value.result.table.num_rows == 1
    result = read(path, on_error="skip")
    assert result.skipped == 2 and result.table.num_rows == 2
    assert "row 2" in result.warnings[0]


def test_parquet_nan_time_and_negative_counts_are_bad_rows(tmp_path):
    base = {"ts": 1.0, "src_ip": "10.0.0.1", "src_port": 1, "dst_ip": "10.0.0.2",
            "dst_port": 2, "proto": "tcp", "resp_pkts": 3, "duration": 0.5}
    rows = [base, dict(base, ts=float("nan")), dict(base, resp_pkts=-3),
            dict(base, duration=float("inf")), base]
    cols = {n: [r.get(n) for r in rows] for n in CONN_FIELD_NAMES}
    path = tmp_path / "c.parquet"
    pq.write_table(columns_to_table(cols), path)

    result = read(path, on_error="skip")

    assert result.skipped == 3 and result.table.num_rows == 2
    with pytest.raises(PartialInputError) as info:
        read(path)
    assert (info.value.row, info.value.column) == (2, "ts")
    assert "expected a finite number" in str(info.value)


# -------------------------------------------------------- encodings, stdin


@pytest.mark.parametrize(
    ("name", "codec", "width"),
    [
        ("bom.log", "utf-16", 16),
        ("le.log", "utf-16-le", 16),
        ("be.log.gz", "utf-16-be", 16),
        ("bom32.log", "utf-32", 32),
        ("le32.log", "utf-32-le", 32),
        ("be32.log.gz", "utf-32-be", 32),
    ],
)
def test_wide_text_is_named_as_such(tmp_path, name, codec, width):
    data = zeek_text([ROW_A]).encode(codec)
    if name.endswith(".gz"):
        data = gzip.compress(data)

    with pytest.raises(BadInputError) as info:
        read(write(tmp_path, name, data))

    message = str(info.value)
    assert f"is UTF-{width} text" in message and "expected UTF-8" in message
    assert f"iconv -f UTF-{width}" in message
    assert info.value.path == str(tmp_path / name)


def test_binary_data_given_as_a_log_is_unknown_format(tmp_path):
    data = bytes(range(256)) * 40
    with pytest.raises(BadInputError) as info:
        read(write(tmp_path, "conn.log", data))
    assert "unknown format (binary data)" in str(info.value)
    assert not isinstance(info.value, PartialInputError)


class _Stdin:
    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)


def test_dash_reads_standard_input(tmp_path, monkeypatch):
    text = zeek_text([ROW_A, ROW_B])
    from_file = read(write(tmp_path, "c.log", text)).table

    monkeypatch.setattr(sys, "stdin", _Stdin(gzip.compress(text.encode())))
    assert read("-").table.equals(from_file)

    parquet = io.BytesIO()
    pq.write_table(from_file, parquet)
    monkeypatch.setattr(sys, "stdin", _Stdin(parquet.getvalue()))
    assert read("-").table.equals(from_file)

    bad = _zeek_with(3, "70000")
    monkeypatch.setattr(sys, "stdin", _Stdin(bad.encode()))
    with pytest.raises(PartialInputError) as info:
        read("-")
    assert info.value.path == "<stdin>" and info.value.line == 10


def test_dash_refuses_a_capture_on_stdin(monkeypatch):
    from flows.errors import UsageError

    monkeypatch.setattr(sys, "stdin", _Stdin(b"\xd4\xc3\xb2\xa1" + b"\0" * 20))
    with pytest.raises(UsageError, match="give its file name"):
        read("-")


def test_table_with_canonical_schema_is_unchanged_by_the_checks(tmp_path):
    # The checks add no columns and keep the order: a clean conn table round-trips.
    table = read(write(tmp_path, "c.log", zeek_text([ROW_A, ROW_B]))).table
    path = tmp_path / "c.parquet"
    pq.write_table(table, path)
    assert read(path).table.equals(table)


# ----------------------------------------------- more of the same kind


def test_a_json_nesting_bomb_is_one_bad_line(tmp_path):
    bomb = '{"a":' * 100_000
    path = write(tmp_path, "c.json", "\n".join([_json_row(), bomb, _json_row()]) + "\n")
    with pytest.raises(PartialInputError) as info:
        read(path)
    assert info.value.line == 2 and "nested too deeply" in str(info.value)
    assert read(path, on_error="skip").table.num_rows == 2
    assert len(list(iter_records(path, on_error="skip"))) == 2


def test_a_device_is_refused_not_read_forever():
    import os

    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero here")
    with pytest.raises(BadInputError) as info:
        read("/dev/zero")
    assert "is a device, expected a file" in str(info.value)


def test_a_pipe_is_read_once_from_its_first_byte(tmp_path):
    import os
    import threading

    if not hasattr(os, "mkfifo"):
        pytest.skip("needs os.mkfifo")
    text = zeek_text([ROW_A, ROW_B])
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def feed():
        with open(fifo, "wb") as fh:
            fh.write(gzip.compress(text.encode()))

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    got = read(fifo)
    thread.join(10)
    assert got.table.equals(read(write(tmp_path, "c.log", text)).table)


def test_a_stream_past_the_limit_keeps_its_complete_lines(monkeypatch):
    from flows.readers._source import read_stream

    monkeypatch.setenv("GATEWATCH_MAX_INFLATED", "1000")
    src = read_stream("<stdin>", io.BytesIO(b"y\n" * 5000))
    assert src.data == b"y\n" * 500
    assert "more than 1000 bytes" in src.cut and "kept the 500 complete" in src.cut


def test_utf16_is_named_by_the_streaming_reader_too(tmp_path):
    path = write(tmp_path, "c.log", zeek_text([ROW_A]).encode("utf-16"))
    with pytest.raises(BadInputError, match="is UTF-16 text"):
        list(iter_records(path))


def test_the_fast_ipv4_match_agrees_with_ipaddress():
    import ipaddress

    import pyarrow as pa

    from flows.readers._convert import BadRows, check_addresses

    cases = [
        "0.0.0.0", "255.255.255.255", "10.0.0.1", "199.249.250.200", "01.2.3.4",
        "1.2.3.04", "256.1.1.1", "1.2.3", "1.2.3.4.5", " 1.2.3.4", "1.2.3.4 ",
        "1..2.3", "1.2.3.-1", "00.1.1.1", "::1", "::ffff:1.2.3.4", "fe80::1%eth0",
        "1:2:3:4:5:6:7:8:9", "", "localhost", "١.٢.٣.٤",
    ]

    def valid(text):
        try:
            ipaddress.ip_address(text)
        except ValueError:
            return False
        return True

    bad = BadRows()
    check_addresses(pa.array(cases), "src_ip", bad)
    assert sorted(bad.rows) == [i for i, c in enumerate(cases) if not valid(c)]


def test_a_line_not_utf8_with_a_wrong_field_count_costs_only_that_line(
    tmp_path, capsys
):
    # Its first tab turned into \xff: too few fields *and* not UTF-8. pyarrow's
    # invalid-row handler could not decode it, so the whole file was refused.
    bad = "\t".join(ROW_B).replace("\t", "\xff", 1)
    text, bad_line = _insert_after_first_row(zeek_text([ROW_A, ROW_B]), "@@\n")
    data = text.encode().replace(b"@@", bad.encode("latin-1"))
    path = write(tmp_path, "mixed.log", data)

    skipped = read(path, on_error="skip")

    assert skipped.table.column("uid").to_pylist() == ["CabC1", "CabC2"]
    assert skipped.skipped == 1
    assert f"line {bad_line}" in skipped.warnings[0]
    assert "not UTF-8" in skipped.warnings[0]
    assert "Traceback" not in capsys.readouterr().err
    with pytest.raises(PartialInputError) as info:
        read(path)
    assert info.value.line == bad_line


def test_zeek_json_with_bytes_not_utf8_in_an_address_is_one_bad_line(tmp_path):
    # pyarrow.json keeps such bytes in a string column; the address check then
    # failed with a UnicodeDecodeError (found by the long fuzz run).
    bad = _json_row(**{"id.orig_h": "10.@@.0.1"}).encode().replace(b"@@", b"\xff")
    data = b"\n".join([_json_row().encode(), bad, _json_row().encode()]) + b"\n"
    path = write(tmp_path, "c.json", data)

    with pytest.raises(PartialInputError) as info:
        read(path)
    assert info.value.line == 2
    skipped = read(path, on_error="skip")
    assert skipped.skipped == 1 and skipped.table.num_rows == 2


def test_fields_line_without_the_set_separator_is_named(tmp_path):
    text = zeek_text([ROW_A]).replace("#separator \\x09", "#separator \\x2c")
    path = write(tmp_path, "conn.log", text)

    fields_line = 1 + next(
        i for i, ln in enumerate(text.split("\n")) if ln.startswith("#fields"))

    with pytest.raises(BadInputError) as info:
        read(path)

    assert info.value.line == fields_line
    assert "#fields is not followed by the separator ','" in str(info.value)


def test_a_field_named_twice_is_named(tmp_path):
    row = [*ROW_A, "1600000009.0"]
    path = write(tmp_path, "conn.log",
                 zeek_text([row], fields=[*FIELDS, "ts"], types=[*TYPES, "time"]))

    with pytest.raises(BadInputError) as info:
        read(path)

    assert "#fields names 'ts' twice" in str(info.value)
    assert info.value.column == "ts"



@pytest.mark.parametrize("escaped", ["\\x09\\x09", "\\xe9", "\\x00"])
def test_a_separator_the_splitter_cannot_use_is_named(tmp_path, escaped):
    text = zeek_text([ROW_A]).replace("#separator \\x09", f"#separator {escaped}")
    path = write(tmp_path, "conn.log", text)

    with pytest.raises(BadInputError) as info:
        read(path)

    assert info.value.line == 1 and "is not supported" in str(info.value)


def test_a_bad_gzip_check_sum_keeps_every_row(tmp_path):
    """A damaged trailer (CRC32) after intact data loses no row; the file is partial."""
    rows = [[f"16000000{i:02d}.5", f"C{i}", *ROW_A[2:]] for i in range(40)]
    packed = bytearray(gzip.compress(zeek_text(rows).encode()))
    packed[-8] ^= 0xFF  # the first byte of the CRC32
    path = write(tmp_path, "conn.log.gz", bytes(packed))

    result = read(path)

    assert result.partial and result.table.num_rows == 40
    assert any("incorrect data check" in w for w in result.warnings)


def test_damage_inside_a_large_gzip_keeps_what_came_before(tmp_path):
    """Text inflated in the step that met the damage is kept, not dropped with it."""
    import zlib

    rows = [[f"1600{i:06d}.5", f"C{i}", *ROW_A[2:]] for i in range(60_000)]
    text = zeek_text(rows, close=False).encode()  # 6.8 MB: more than one 4 MiB step
    packed = bytearray(gzip.compress(text, compresslevel=1))
    at = len(packed) * 3 // 4
    packed[at: at + 64] = bytes(64)  # zero a run of compressed bytes
    path = write(tmp_path, "conn.log.gz", bytes(packed))

    # Independently: what zlib gives when fed 4 KiB at a time, up to its error.
    inflater, inflated = zlib.decompressobj(wbits=31), b""
    try:
        for start in range(0, len(packed), 4096):
            inflated += inflater.decompress(bytes(packed[start:start + 4096]))
    except zlib.error:
        pass
    lines_before = inflated.count(b"\n") - text[: text.index(b"1600")].count(b"\n")

    result = read(path, on_error="skip")

    # Every complete line zlib gave before the damage was read: a good row or a bad
    # (garbled) line; the old reader dropped the whole 4 MiB step (37,219 rows kept).
    assert result.partial
    assert result.table.num_rows + result.skipped >= lines_before
    kept = result.table.column("uid").to_pylist()
    assert kept[:45_000] == [f"C{i}" for i in range(45_000)]  # all before the damage


@pytest.mark.parametrize(
    "change",
    [
        ("#separator \\x09", "#separator \\x09\\x09"),
        ("#separator \\x09", "#separator \\xe9"),
        ("#separator \\x09", "#separator \\x2c"),
    ],
    ids=["two-tabs", "non-ascii", "fields-not-split"],
)
def test_a_followed_log_refuses_the_headers_a_whole_read_refuses(tmp_path, change):
    """The agent's ``zeek:`` source and ``flows read`` share one set of header rules."""
    from flows.readers.stream import TsvLineParser

    text = zeek_text([ROW_A]).replace(*change)
    with pytest.raises(BadInputError) as whole:
        read(write(tmp_path, "conn.log", text))

    parser = TsvLineParser("live")
    with pytest.raises(BadInputError) as followed:
        for number, line in enumerate(text.splitlines(), start=1):
            if line.startswith("#"):
                parser.header_line(line, number)

    assert followed.value.line == whole.value.line
    assert str(followed.value).split(": ", 1)[1] == str(whole.value).split(": ", 1)[1]


def test_a_followed_log_refuses_a_field_named_twice():
    from flows.readers.stream import TsvLineParser

    parser = TsvLineParser("live")
    with pytest.raises(BadInputError, match="#fields names 'ts' twice"):
        parser.header_line("#fields\t" + "\t".join([*FIELDS, "ts"]), 7)


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_line(tmp_path):
    """Found: a conn.log saved by a Windows editor (UTF-8 with a BOM) was refused:
    "row before any #fields line". Both readers now drop the mark."""
    text = zeek_text([ROW_A, ROW_B])
    plain = read(write(tmp_path, "plain.log", text)).table.to_pylist()
    marked = write(tmp_path, "bom.log", b"\xef\xbb\xbf" + text.encode())
    packed = write(tmp_path, "bom.log.gz",
                   gzip.compress(b"\xef\xbb\xbf" + text.encode()))

    assert read(marked).table.to_pylist() == plain
    assert read(packed).table.to_pylist() == plain
    assert list(iter_records(marked)) == plain
    assert list(iter_records(packed)) == plain


@pytest.mark.parametrize(
    ("address", "ok"),
    [("fe80::1%eth0", True), ("fe80::1%en0.100", True), ("fe80::1", True),
     ("fe80::1%eth0 (allowlisted, benign) ", False), ("fe80::1%" + "x" * 40, False),
     ("fe80::1%", False)],
)
def test_an_ipv6_zone_is_an_interface_name_not_free_text(address, ok):
    """Found: any text after "%" passed as an address, and the re-scorer stored and
    showed it ("[fe80::1%eth0 (allowlisted, benign) ]:53")."""
    from flows.record import field_problem

    assert (field_problem("src_ip", address) is None) is ok
