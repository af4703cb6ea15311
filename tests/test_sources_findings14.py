"""Round 14 findings: the edge agent's sources and `flows` read by one rule.

A tester found the agent (edge_agent/sources.py) and `flows inspect` disagreeing
on the same file: bytes that are not UTF-8 in a Zeek field, a Parquet number
column held as text, Argus records of no IP flow, the hint for a capture whose
packets were all damaged, and the wording of a nesting bomb on stdin.
"""

from __future__ import annotations

import io
import os
import struct
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from edge_agent.sources import (
    damage_sentence,
    no_flow_hint,
    open_source,
)
from flows.errors import BadInputError
from flows.readers import read
from tests.conftest import data_file

_HEADER = (
    "#separator \\x09\n#set_separator\t,\n#empty_field\t(empty)\n#unset_field\t-\n"
    "#path\tconn\n#fields\tts\tuid\tid.orig_h\tid.orig_p\tid.resp_h\tid.resp_p\t"
    "proto\tservice\tduration\torig_bytes\tresp_bytes\tconn_state\thistory\t"
    "orig_pkts\torig_ip_bytes\tresp_pkts\tresp_ip_bytes\n"
    "#types\ttime\tstring\taddr\tport\taddr\tport\tenum\tstring\tinterval\tcount\t"
    "count\tstring\tstring\tcount\tcount\tcount\tcount\n"
)
_HEADER_LINES = _HEADER.count("\n")  # 7: the data lines start at line 8


def _line(i: int, service: bytes = b"http") -> bytes:
    return b"\t".join([
        f"1596790164.{i:06d}".encode(), f"C{i}".encode(), b"10.0.0.1",
        str(40000 + i).encode(), b"10.0.0.2", b"80", b"tcp", service, b"0.5",
        b"10", b"20", b"SF", b"ShADadFf", b"3", b"130", b"3", b"140",
    ])


def _bad_utf8_log(tmp_path: Path) -> tuple[Path, int]:
    """A Zeek TSV conn.log of 3 flows whose second has the service b'ht\\xff\\xfetp'
    (bytes that are not UTF-8); returns it and that line's number."""
    body = [_line(1), _line(2, b"ht\xff\xfetp"), _line(3)]
    log = tmp_path / "conn.log"
    log.write_bytes(_HEADER.encode() + b"\n".join(body) + b"\n")
    return log, _HEADER_LINES + 2


# 1. bytes that are not UTF-8 in a Zeek field: a bad line in both tools


def test_flows_refuses_the_non_utf8_line_by_its_number(tmp_path: Path) -> None:
    log, bad = _bad_utf8_log(tmp_path)
    with pytest.raises(BadInputError) as caught:
        read(log)
    assert caught.value.line == bad
    assert "bytes that are not UTF-8" in str(caught.value)


def test_a_zeek_source_rejects_the_non_utf8_line_as_flows_does(tmp_path: Path) -> None:
    """Found: the agent read the line with U+FFFD in ``service`` and said nothing."""
    log, bad = _bad_utf8_log(tmp_path)
    src = open_source(f"zeek:{log}")
    got = list(src)
    assert [r["uid"] for r in got] == ["C1", "C3"]
    assert all("\ufffd" not in (r["service"] or "") for r in got)
    assert src.rejected == {"bad_line": 1}
    assert src.first_rejected == f"line {bad}: bad_line: bytes that are not UTF-8"


def test_a_followed_zeek_source_rejects_the_non_utf8_line(tmp_path: Path) -> None:
    log, bad = _bad_utf8_log(tmp_path)
    src = open_source(f"zeek:{log}", follow=True, poll=0.05)
    got: list[dict] = []
    thread = threading.Thread(target=lambda: got.extend(src), daemon=True)
    src.end.set()  # ends once it yielded what the file holds
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    assert [r["uid"] for r in got] == ["C1", "C3"]
    assert src.first_rejected == f"line {bad}: bad_line: bytes that are not UTF-8"


def _stdin_bytes(monkeypatch, data: bytes) -> None:
    """Make the process's standard input a pipe holding ``data``, as the agent
    reads it (its own descriptor, not a text stream a test hands in)."""
    read_fd, write_fd = os.pipe()
    os.write(write_fd, data)
    os.close(write_fd)
    handle = open(read_fd, encoding="utf-8", closefd=True)  # noqa: SIM115
    monkeypatch.setattr(sys, "stdin", handle)
    return handle


def test_stdin_rejects_a_json_line_with_bytes_that_are_not_utf8(monkeypatch) -> None:
    """Found: ``"service":"h\\xff\\xfe"`` on stdin was read as 'h\\ufffd\\ufffd'."""
    good = (
        b'{"src_ip":"10.0.0.1","dst_ip":"10.0.0.2","src_port":1,"dst_port":80,'
        b'"proto":"tcp","ts":1596790164.5,"service":"http"}'
    )
    bad = good.replace(b'"http"', b'"h\xff\xfe"')
    handle = _stdin_bytes(monkeypatch, b"\n".join([good, bad, good]) + b"\n")
    try:
        src = open_source("-")
        got = list(src)
    finally:
        handle.close()
    assert [r["service"] for r in got] == ["http", "http"]
    assert src.rejected == {"bad_line": 1}
    assert src.first_rejected == "line 2: bad_line: bytes that are not UTF-8"


# 5. a nesting bomb on stdin, worded as the zeek: JSON reader words it


def test_stdin_nesting_bomb_is_worded_as_the_zeek_json_reader_words_it() -> None:
    src = open_source("-", stdin=io.StringIO("[" * 100_000 + "]" * 100_000 + "\n"))
    assert list(src) == []
    assert src.rejected == {"malformed_json": 1}
    assert src.first_rejected == (
        "line 1: malformed_json: expected one JSON object (arrays or objects nested "
        "too deeply)"
    )
    assert "RecursionError" not in src.first_rejected


# 2. a Parquet number column held as text: refused by its type in both tools


def _parquet_with_text_column(tmp_path: Path, name: str, values: list[str]) -> Path:
    rows = len(values)
    table = pa.table({
        "ts": pa.array([1596790164.5 + i for i in range(rows)]),
        "src_ip": ["10.0.0.1"] * rows,
        "src_port": pa.array(range(40000, 40000 + rows), type=pa.int64()),
        "dst_ip": ["10.0.0.2"] * rows,
        "dst_port": pa.array([80] * rows, type=pa.int64()),
        "proto": ["tcp"] * rows,
    })
    table = table.set_column(table.schema.get_field_index(name), name,
                             pa.array(values, type=pa.string()))
    from flows.record import CONN_FIELD_NAMES, conn_schema

    for field in conn_schema():
        if field.name not in table.column_names:
            table = table.append_column(field.name, pa.nulls(rows, field.type))
    assert set(CONN_FIELD_NAMES) <= set(table.column_names)
    path = tmp_path / f"{name}.parquet"
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize(
    ("name", "values"),
    [
        ("ts", ["1596790164.509987", "1596790165.5"]),  # found: flows took it
        ("src_port", ["35740", "http"]),  # found: "expected a number, found '35740'"
    ],
)
def test_a_number_column_held_as_text_is_refused_by_its_type_in_both(
    tmp_path: Path, name: str, values: list[str]
) -> None:
    path = _parquet_with_text_column(tmp_path, name, values)
    expected = (
        f"{path}, column {name!r}: is string, expected a number type (integer or "
        "floating point)"
    )
    with pytest.raises(BadInputError) as by_flows:
        read(path)
    with pytest.raises(BadInputError) as by_agent:
        list(open_source(f"parquet:{path}"))
    assert str(by_flows.value).startswith(expected), by_flows.value
    assert str(by_agent.value) == str(by_flows.value)
    assert by_agent.value.exit_code == by_flows.value.exit_code == 3
    assert "found '" not in str(by_agent.value)


# 3. Argus records of no IP flow: no damage, counted as non_ip in both tools

_ARGUS = (
    "StartTime,Dur,Proto,SrcAddr,Sport,Dir,DstAddr,Dport,State,sTos,dTos,TotPkts,"
    "TotBytes,SrcBytes,SrcPkts,Label\n"
    "2018/05/10 10:52:47.283479,0.045010,man,0,0,,0,0,STA,,,0,0,0,0,\n"
    "2018/05/10 10:52:48.000000,1.0,tcp,10.0.0.1,40001,   ->,10.0.0.2,80,FSPA_FSPA,"
    "0,0,6,600,300,3,flow=Normal\n"
    "2018/05/10 10:52:49.000000,0.0,llc,00:11:22:33:44:55,0,   ->,"
    "00:11:22:33:44:66,0,INT,,,1,60,60,1,flow=Background\n"
    "2018/05/10 10:52:50.000000,1.0,udp,10.0.0.1,40002,  <->,10.0.0.3,53,CON,"
    "0,0,2,200,100,1,flow=Normal\n"
)


def test_argus_records_of_no_ip_flow_are_counted_not_rejected(tmp_path: Path) -> None:
    """Found: every Argus file (its ``man`` records) made the agent exit 4."""
    path = tmp_path / "flows.binetflow"
    path.write_text(_ARGUS)
    src = open_source(f"zeek:{path}")
    got = list(src)
    assert [r["dst_port"] for r in got] == [80, 53]
    assert src.rejected == {} and src.first_rejected is None
    assert src.non_ip == 2
    assert read(path).stats["non_ip"] == src.non_ip  # what flows inspect shows


def test_the_real_mixed_argus_file_gives_no_rejection(tmp_path: Path) -> None:
    path = data_file(_data_dir(), "binetflow/test5-mixed.binetflow")
    result = read(path)
    src = open_source(f"zeek:{path}")
    got = list(src)
    assert src.rejected == {}
    assert src.non_ip == result.stats["non_ip"] == 2
    assert len(got) == len(result.table) - 2 == 298


def _data_dir() -> Path:
    from tests.conftest import _data_dir as find

    found = find()
    if found is None:
        pytest.skip("no data folder: set GATEWATCH_DATA to the shared data directory")
    return found


def test_a_rejected_record_of_a_file_read_whole_is_named_by_its_line(
    tmp_path: Path,
) -> None:
    """Found: "record 1" named the file's line 2. A Zeek line with no address is
    rejected by its file line too."""
    body = [_line(1), _line(2).replace(b"10.0.0.1", b"-", 1), _line(3)]
    log = tmp_path / "conn.log"
    log.write_bytes(_HEADER.encode() + b"\n".join(body) + b"\n")
    src = open_source(f"zeek:{log}")
    assert len(list(src)) == 2
    assert src.first_rejected.startswith(
        f"line {_HEADER_LINES + 2}: bad_value: field 'src_ip': is null"
    )


# 4. a capture whose packets were all damaged is a capture: say what was wrong


def _pcap(link: int, packet: bytes, caplen: int | None = None,
          snaplen: int = 65535) -> bytes:
    header = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snaplen, link)
    caplen = len(packet) if caplen is None else caplen
    record = struct.pack("<IIII", 1596790164, 0, caplen, len(packet))
    return header + record + packet[:caplen]


def test_the_hint_names_a_link_type_the_meter_does_not_read(tmp_path: Path) -> None:
    path = tmp_path / "link65535.pcap"
    path.write_bytes(_pcap(0xFFFF, bytes(60)))
    src = open_source(f"pcap:{path}")
    assert list(src) == []
    hint = no_flow_hint("pcap", src.damage)
    assert "link type 65535 is not one the flow meter reads" in hint
    assert "1 (ethernet)" in hint
    assert "expected a pcap" not in hint
    assert "unknown link type 65535" in damage_sentence(src.damage)


def test_the_hint_says_every_packet_was_damaged(tmp_path: Path) -> None:
    path = data_file(_data_dir(), "pcap/malformed/trunc_ip4-trunc.pcap")
    src = open_source(f"pcap:{path}")
    assert list(src) == []
    hint = no_flow_hint("pcap", src.damage)
    assert hint.startswith("the file is a capture, but every packet")
    assert "expected a pcap" not in hint


def test_the_hint_for_bytes_that_are_no_capture_still_says_what_is_expected() -> None:
    from flows.readers.result import Damage

    stopped = [Damage("x.pcap", "bytes that are no packet record", "byte offset 24")]
    assert no_flow_hint("pcap", stopped) == "expected a pcap or pcapng capture file"
    assert no_flow_hint("zeek", []).startswith("expected a Zeek conn.log")


def test_a_decimal_number_column_is_read_by_the_agent_as_flows_reads_it(tmp_path):
    """Found: a Parquet ``orig_bytes`` held as decimal128(20,0), and a ``ts`` as
    decimal128(20,6), were read by ``flows`` (it casts every column to the
    canonical type) and refused by the agent (``expected a number, found 1596
    (a Decimal)``, exit 3)."""
    import decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    from edge_agent.sources import open_source
    from flows.readers import read
    from flows.record import conn_schema

    rows = 5
    columns = {f.name: pa.nulls(rows, f.type) for f in conn_schema()}
    columns.update({
        "ts": pa.array([decimal.Decimal(f"1596790164.{i:06d}") for i in range(rows)],
                       pa.decimal128(20, 6)),
        "src_ip": ["10.0.0.1"] * rows, "src_port": list(range(40000, 40000 + rows)),
        "dst_ip": ["10.0.0.2"] * rows, "dst_port": [80] * rows, "proto": ["tcp"] * rows,
        "orig_bytes": pa.array([decimal.Decimal(1596 + i) for i in range(rows)],
                               pa.decimal128(20, 0)),
    })
    table = pa.table(columns)
    path = tmp_path / "decimal.parquet"
    pq.write_table(table, path)

    expected = read(str(path)).table.to_pylist()
    got = list(open_source(f"parquet:{path}"))

    assert [r["orig_bytes"] for r in got] == [r["orig_bytes"] for r in expected]
    assert [r["orig_bytes"] for r in got] == [1596 + i for i in range(rows)]
    assert [r["ts"] for r in got] == [r["ts"] for r in expected]


def test_following_a_gzip_log_is_refused_saying_why(tmp_path):
    """Found: ``--follow`` on a ``.gz`` log rejected every line as "bytes that are
    not UTF-8" and ended "no usable flow record"; it says what is wrong now."""
    import gzip
    import threading

    from edge_agent.sources import open_source
    from flows.errors import BadInputError

    log = tmp_path / "conn.log.gz"
    log.write_bytes(gzip.compress(b"#separator \\x09\n#fields\tts\n"))
    src = open_source(f"zeek:{log}", follow=True, poll=0.05)
    got: list[Exception] = []

    def read() -> None:
        try:
            list(src)
        except BadInputError as exc:
            got.append(exc)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    if not got:  # a source may keep the error instead of raising it
        got.append(src.error)
    assert got[0] is not None and "gzip-compressed" in str(got[0])
    assert "cannot be followed" in str(got[0])
