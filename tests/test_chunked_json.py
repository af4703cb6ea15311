"""A Zeek JSON conn.log read in pieces gives what a whole read gives, to the byte.

As in ``tests/test_chunked_read.py`` (whose helpers these tests use),
``CHUNK_BYTES`` is lowered so that the pieces of small crafted logs start and end
at every kind of line: a bad value, a blank line, a line that is not UTF-8, a
CRLF ending. Each outcome of ``read`` (the result, or the error with its line,
column and the rows kept on it) is compared with the whole read's.
"""

from __future__ import annotations

import gzip
import json

import pytest

from flows.readers import _source as source
from flows.readers import read
from flows.readers._chunked import read_in_pieces
from flows.readers._source import MAX_LINE_BYTES, Blocks
from tests.conftest import data_file
from tests.test_chunked_read import SIZES, _in_pieces, _whole

ON_ERROR = ("fail", "skip")


def _object(i: int, **values) -> dict:
    """Connection ``i`` as Zeek's JSON writer prints it; ``values`` replace keys
    (a value of None leaves its key out)."""
    obj = {
        "ts": 1_600_000_000 + i + i / 1e6,
        "uid": f"C{i:012d}",
        "id.orig_h": f"10.0.{i % 250}.{i % 200 + 1}",
        "id.orig_p": 1024 + i,
        "id.resp_h": "192.168.1.1",
        "id.resp_p": 443,
        "proto": "tcp",
        "service": "ssl",
        "duration": i / 7,
        "orig_bytes": i * 10,
        "resp_bytes": i * 20,
        "conn_state": "SF",
        "local_orig": True,
        "missed_bytes": 0,
        "history": "ShADadFf",
        "orig_pkts": i + 1,
        "orig_ip_bytes": i * 10 + 40,
        "resp_pkts": i + 2,
        "resp_ip_bytes": i * 20 + 80,
        "label": "Malicious" if i % 2 else "Benign",
        "detailed-label": "C&C" if i % 2 else "-",
    }
    obj.update(values)
    return {k: v for k, v in obj.items() if v is not None}


def _lines(n: int = 30, start: int = 0, **at) -> list[str]:
    """``n`` JSON lines (newline included); ``at`` maps ``r<i>`` to the values row
    ``i`` takes instead, or to a text that replaces its line."""
    out = []
    for i in range(start, start + n):
        change = at.get(f"r{i}", {})
        line = change if isinstance(change, str) else json.dumps(_object(i, **change))
        out.append(line + "\n")
    return out


def _log(n: int = 30, **at) -> bytes:
    return "".join(_lines(n, **at)).encode()


def _inputs() -> dict[str, bytes]:
    """Crafted JSON logs, each showing one thing a piece boundary may break."""
    base = _log()
    lines = _lines()
    unlabeled = {f"r{i}": {"label": None, "detailed-label": None} for i in range(30)}
    return {
        "clean": base,
        "bad values": _log(
            r4={"id.resp_p": 70000},
            r9={"ts": "abc"},
            r14={"duration": "inf"},
            r20={"proto": "300"},
        ),
        "not json": _log(r7='{"ts": 1,', r21="[1, 2]"),
        "missing key": _log(r11={"id.orig_h": None}),
        "last line cut": base[:-45],
        "last line whole, no newline": base[:-1],
        "blank lines": (
            "\n\n" + "".join(lines[:5]) + "   \n\n" + "".join(lines[5:]) + "\n\t\n"
        ).encode(),
        "comments": (
            "".join(lines[:9]) + "#x\n" + "".join(lines[9:20]) + "  # y\n"
            + "".join(lines[20:])
        ).encode(),
        "crlf": base.replace(b"\n", b"\r\n"),
        "bom": b"\xef\xbb\xbf" + base,
        "not utf-8": base.replace(
            lines[13].encode(), lines[13].encode().replace(b"ssl", b"s\xffl")
        ),
        "two objects on a line": base.replace(
            lines[17].encode(), lines[17].encode().rstrip() + b" " + lines[18].encode()
        ),
        "iso ts and nested id": _log(
            r6={"ts": "2020-09-13T12:26:46.000006Z"},
            r16={
                "id.orig_h": None,
                "id.orig_p": None,
                "id": {"orig_h": "10.1.1.1", "orig_p": 7},
            },
        ),
        "milliseconds": _log(r3={"ts": 1_600_000_000_123}, r12={"ts": 10**15}),
        "label key cases": _log(
            r10={"label": None, "Label": "Malicious"},
            r19={"detailed-label": None, "Detailed-Label": "PortScan"},
            r25={"label": None, "\\u006cabel": "Benign"},
        ).replace(b"\\\\u006c", b"\\u006c"),
        "unknown label": _log(r8={"label": "Sneaky"}),
        # two spellings of the detailed label in one object: the first one counts
        "two detail keys": _log(
            r15='{"detailed_label": "x", ' + json.dumps(_object(15))[1:]
        ),
        "no labels": _log(**unlabeled),
        # stats["labeled"] looks at every line, also past the first bad one
        "a label after a bad line": _log(
            **{**unlabeled, "r3": {"ts": "abc"}, "r26": {"label": "Benign"}}
        ),
    }


def _gzip_inputs() -> dict[str, bytes]:
    inputs = _inputs()
    packed = gzip.compress(inputs["bad values"], 1)
    return {
        "gzip": packed,
        "gzip crlf": gzip.compress(inputs["crlf"], 1),
        "gzip cut": packed[: len(packed) * 2 // 3],
        "gzip members": gzip.compress(inputs["clean"][:900])
        + gzip.compress(inputs["clean"][900:]),
        "gzip trailing bytes": packed + b"not gzip",
    }


def _boundaries(data: bytes) -> list[int]:
    """Piece sizes that end a piece right before, and right after, each odd line
    of the crafted inputs, so that a piece starts (or ends) at it."""
    marks = (b"70000", b"abc", b"inf", b"\xff", b"Label", b"006c", b"Z", b'"id"')
    sizes = []
    at = 0
    for line in data.splitlines(keepends=True):
        if not line.strip() or any(mark in line for mark in marks):
            sizes += [at, at + len(line)]
        at += len(line)
    return sorted({s for s in sizes if s > 0})[:16]


@pytest.mark.parametrize("name", sorted(_inputs()))
def test_a_json_log_read_in_pieces_is_read_as_a_whole(name, tmp_path, monkeypatch):
    data = _inputs()[name]
    path = tmp_path / "conn.json.log"
    path.write_bytes(data)
    for on_error in ON_ERROR:
        expected = _whole(path, on_error)
        for size in SIZES + tuple(_boundaries(data)):
            got = _in_pieces(path, on_error, size, monkeypatch)
            assert got == expected, (name, on_error, size)


@pytest.mark.parametrize("name", sorted(_gzip_inputs()))
def test_a_gzip_json_log_read_in_pieces_is_read_as_a_whole(
    name, tmp_path, monkeypatch
):
    path = tmp_path / "conn.json.log.gz"
    path.write_bytes(_gzip_inputs()[name])
    for on_error in ON_ERROR:
        expected = _whole(path, on_error)
        for size in (1, 5, 64, 1000):
            got = _in_pieces(path, on_error, size, monkeypatch)
            assert got == expected, (name, on_error, size)


def test_the_gzip_limit_cuts_a_json_read_in_pieces_where_a_whole_read_is_cut(
    tmp_path, monkeypatch
):
    path = tmp_path / "conn.json.log.gz"
    path.write_bytes(gzip.compress(_inputs()["clean"]))
    for limit in (2000, 3333, 5000):
        monkeypatch.setenv(source.MAX_INFLATED_ENV, str(limit))
        expected = _whole(path, "skip")
        assert expected[1][6] is True  # partial
        for size in (1, 64, 700):
            assert _in_pieces(path, "skip", size, monkeypatch) == expected


def test_the_pieces_hold_the_values_written(tmp_path, monkeypatch):
    """Not only the same as a whole read: the values the crafted lines hold."""
    path = tmp_path / "conn.json.log"
    path.write_bytes(_inputs()["clean"])
    monkeypatch.setattr(source, "CHUNK_BYTES", 100)
    result = read(path)
    table = result.table.to_pydict()
    assert table["src_port"] == [1024 + i for i in range(30)]
    assert table["ts"] == [1_600_000_000 + i + i / 1e6 for i in range(30)]
    assert table["label"] == [i % 2 for i in range(30)]
    assert table["label_detail"] == ["C&C" if i % 2 else "Benign" for i in range(30)]
    assert result.stats["labels"] == {"Benign": 15, "Malicious": 15}
    assert not result.partial and result.skipped == 0


def test_bad_lines_are_named_at_their_line_in_every_mode(tmp_path, monkeypatch):
    path = tmp_path / "conn.json.log"
    path.write_bytes(_inputs()["bad values"])
    monkeypatch.setattr(source, "CHUNK_BYTES", 333)
    result = read(path, on_error="skip")
    assert result.skipped == 4
    assert result.stats["skipped_lines"] == [5, 10, 15, 21]
    assert len(result.table) == 26
    with pytest.raises(Exception) as info:
        read(path, on_error="fail")
    assert info.value.line == 5 and info.value.column == "id.resp_p"
    assert len(info.value.result.table) == 4


def test_a_cut_last_line_is_a_cut_note_with_its_line(tmp_path, monkeypatch):
    path = tmp_path / "conn.json.log"
    path.write_bytes(_inputs()["last line cut"])
    monkeypatch.setattr(source, "CHUNK_BYTES", 7)
    result = read(path, on_error="fail")
    assert result.partial and len(result.table) == 29
    assert f"{path}: the last line (30) is cut short" in result.warnings


def test_label_keys_in_other_cases_are_read_by_every_path(tmp_path, monkeypatch):
    """``Label`` on a later line is a label, read whole or in pieces (pyarrow.json
    alone would drop it), and of two detailed-label keys the first written counts
    (pyarrow.json alone would take the one it lists first)."""
    path = tmp_path / "conn.json.log"
    for size in (1 << 20, 64):
        monkeypatch.setattr(source, "CHUNK_BYTES", size)
        path.write_bytes(_inputs()["label key cases"])
        table = read(path).table.to_pydict()
        assert table["label"][10] == 1 and table["label"][25] == 0
        assert table["label_detail"][19] == "PortScan"
        path.write_bytes(_inputs()["two detail keys"])
        assert read(path).table.column("label_detail")[15].as_py() == "x"


@pytest.mark.parametrize("size", [1 << 20, 64])
def test_two_objects_on_one_line_are_one_bad_line(size, tmp_path, monkeypatch):
    """pyarrow.json alone would read them as two rows; the line is bad."""
    path = tmp_path / "conn.json.log"
    path.write_bytes(_inputs()["two objects on a line"])
    monkeypatch.setattr(source, "CHUNK_BYTES", size)
    result = read(path, on_error="skip")
    assert result.stats["skipped_lines"] == [18] and len(result.table) == 29


def test_a_json_log_goes_through_the_pieces(tmp_path, monkeypatch):
    """read() takes a regular Zeek JSON file in pieces, never loading it whole."""
    path = tmp_path / "conn.json.log"
    path.write_bytes(_inputs()["bad values"])
    monkeypatch.setattr(source, "CHUNK_BYTES", 100)
    assert read_in_pieces(path, "skip") is not None
    pieces = list(Blocks(path))
    assert len(pieces) > 20

    def refuse(*args, **kwargs):
        raise AssertionError("read the whole file")

    monkeypatch.setattr("flows.readers.load", refuse)
    assert read(path, on_error="skip").skipped == 4


@pytest.mark.parametrize("packed", [False, True])
def test_a_line_over_the_limit_read_in_pieces(packed, tmp_path, monkeypatch):
    """A line over MAX_LINE_BYTES spans many pieces and is one bad line."""
    lines = _lines()
    long_line = json.dumps(_object(7, history="h" * (MAX_LINE_BYTES + 10))) + "\n"
    text = ("".join(lines[:7]) + long_line + "".join(lines[8:])).encode()
    path = tmp_path / ("long.json.log.gz" if packed else "long.json.log")
    path.write_bytes(gzip.compress(text, 1) if packed else text)
    for on_error in ON_ERROR:
        expected = _whole(path, on_error)
        for size in (4096, 300_000):
            assert _in_pieces(path, on_error, size, monkeypatch) == expected
    assert read(path, on_error="skip").stats["skipped_lines"] == [8]


def test_memory_of_a_piecewise_json_read_stays_below_the_file(tmp_path, monkeypatch):
    """Not a timing: the text of a 5 MB JSON log is never held whole."""
    import tracemalloc

    path = tmp_path / "big.json.log"
    with open(path, "w") as fh:
        for start in range(0, 20_000, 1000):
            fh.write("".join(_lines(1000, start=start)))
    size = path.stat().st_size
    monkeypatch.setattr(source, "CHUNK_BYTES", 1 << 18)
    read(path)  # imports and caches first
    tracemalloc.start()
    try:
        result = read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(result.table) == 20_000
    assert peak < size / 2, (peak, size)


@pytest.mark.parametrize("packed", [False, True])
def test_the_real_json_log_read_in_pieces(packed, data_dir, tmp_path, monkeypatch):
    real = data_file(data_dir, "zeek-conn/nmap-portscans.conn.json.log")
    text = real.read_bytes()
    path = real
    if packed:
        path = tmp_path / "nmap.conn.json.log.gz"
        path.write_bytes(gzip.compress(text, 1))
    expected = _whole(path, "fail")
    assert expected[0] == "result"
    assert len(expected[1][1]["ts"]) == sum(1 for ln in text.splitlines() if ln.strip())
    for size in (4096, 100_000, 1 << 20):
        assert _in_pieces(path, "fail", size, monkeypatch) == expected
