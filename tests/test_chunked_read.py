"""A Zeek conn.log read in pieces gives what a whole read gives, to the byte.

``flows.readers._source.CHUNK_BYTES`` is lowered here so that the pieces of these
small files cut them at every kind of place: before a bad line, inside a row
block, between ``#`` lines. Each outcome (the result, or the error with its line,
column and the rows kept on it) is compared with the whole read's, which takes
the whole text as one piece (``_read_source(load(path))``).
"""

from __future__ import annotations

import gzip
import math

import pytest

from flows.errors import BadInputError
from flows.readers import _read_source, read
from flows.readers import _source as source
from flows.readers._chunked import read_in_pieces
from flows.readers._source import MAX_LINE_BYTES, Blocks, load

FIELDS = (
    "ts uid id.orig_h id.orig_p id.resp_h id.resp_p proto service duration "
    "orig_bytes resp_bytes conn_state missed_bytes history orig_pkts "
    "orig_ip_bytes resp_pkts resp_ip_bytes tunnel_parents"
).split()
LABELED = FIELDS + ["label", "detailed-label"]
SIZES = (1, 2, 3, 7, 64, 333, 4096)


def _row(i: int, **values: str) -> dict:
    row = {
        "ts": f"{1_600_000_000 + i}.{i:06d}",
        "uid": f"C{i:012d}",
        "id.orig_h": f"10.0.{i % 250}.{i % 200 + 1}",
        "id.orig_p": str(1024 + i),
        "id.resp_h": "192.168.1.1",
        "id.resp_p": "443",
        "proto": "tcp",
        "service": "ssl" if i % 3 else "-",
        "duration": f"{i / 7:.6f}",
        "orig_bytes": str(i * 10),
        "resp_bytes": str(i * 20),
        "conn_state": "SF",
        "missed_bytes": "0",
        "history": "ShADadFf",
        "orig_pkts": str(i + 1),
        "orig_ip_bytes": str(i * 10 + 40),
        "resp_pkts": str(i + 2),
        "resp_ip_bytes": str(i * 20 + 80),
        "tunnel_parents": "-",
        "label": "Malicious" if i % 2 else "Benign",
        "detailed-label": "C&C" if i % 2 else "-",
    }
    row.update(values)
    return row


def _header(fields=FIELDS, sep: str = "\t") -> str:
    shown = "\\x09" if sep == "\t" else sep
    return (
        f"#separator {shown}\n#set_separator{sep},\n#empty_field{sep}(empty)\n"
        f"#unset_field{sep}-\n#path{sep}conn\n#fields{sep}{sep.join(fields)}\n"
        f"#types{sep}{sep.join('string' for _ in fields)}\n"
    )


def _rows(n: int, fields=FIELDS, start: int = 0, sep: str = "\t", **at) -> str:
    """``n`` rows; ``at`` maps ``r<i>`` to the values row ``i`` takes instead."""
    out = []
    for i in range(start, start + n):
        row = _row(i, **at.get(f"r{i}", {}))
        out.append(sep.join(row[f] for f in fields) + "\n")
    return "".join(out)


def _log(n: int = 30, close: bool = True, fields=FIELDS, **at) -> str:
    text = _header(fields) + _rows(n, fields, **at)
    return text + ("#close\t2024-01-01-00-00-00\n" if close else "")


def _inputs() -> dict[str, bytes]:
    """Crafted conn.logs, each showing one thing a piece boundary may break."""
    base = _log()
    lines = base.splitlines(keepends=True)
    bad_inf_then_text = _log(r3={"duration": "inf"}, r25={"duration": "x1"})
    more = _header(["uid", "ts"] + FIELDS[2:]).replace("#separator \\x09\n", "")
    return {
        "clean": base.encode(),
        "bad rows": _log(
            r4={"id.resp_p": "70000"},
            r9={"ts": "abc"},
            r14={"duration": "inf"},
            r20={"proto": "300"},
        ).encode(),
        # inf alone in its piece casts fast; "x1" makes the whole block slow
        "inf then text": bad_inf_then_text.encode(),
        "wrong field count": base.replace(lines[12], "1\t2\t3\n").encode(),
        "crlf": base.replace("\n", "\r\n").encode(),
        "cr inside": base.replace(lines[15], lines[15].replace("\t", "\r", 1)).encode(),
        "no final newline": base.rstrip("\n").encode(),
        "last row cut short": _log(close=False).rstrip("\n")[:-40].encode(),
        "last row whole, no newline": _log(close=False).rstrip("\n").encode(),
        "bom": b"\xef\xbb\xbf" + base.encode(),
        "blank and spaces": (
            _header() + "\n\n" + _rows(5) + "   \n\n" + _rows(5, start=5) + "\n"
            + "#close\n\n  \n\n" + "#x\n" + "\n\n"
        ).encode(),
        "blank before rows": (_header() + "\n\n\n" + _rows(10)).encode(),
        "two blocks": (
            _log(12) + more + _rows(12, ["uid", "ts"] + FIELDS[2:])
        ).encode(),
        "comment inside": (
            _header() + _rows(6) + "#note\tsomething\n" + _rows(6, start=6)
        ).encode(),
        "labels": _log(fields=LABELED, r8={"label": "Sneaky"}).encode(),
        "masked ts": _log(
            r2={"ts": "XXXXXXXXXX.XXXXXX"}, r17={"ts": "XXX.XX"}
        ).encode(),
        "not utf-8": base.replace(lines[11], lines[11][:-1] + "\udcff\n").encode(
            "utf-8", "surrogateescape"
        ),
        "iot-23 hidden": _log(
            **{f"r{i}": {"tunnel_parents": "-   Malicious   C&C"} for i in range(30)}
        ).encode(),
        "iot-23 hidden later": _log(
            **{f"r{i}": {"tunnel_parents": "-   Benign   -"} for i in range(20, 30)}
        ).encode(),
        "escapes and empties": _log(
            r5={"service": "(empty)", "history": "a\\x09b"}, r6={"uid": "-"}
        ).encode(),
        "rows before fields": ("#separator \\x09\n\n" + _rows(3) + _log(3)).encode(),
        "no fields line": b"#separator \\x09\n#path\tconn\n#close\n",
        "bad separator later": (
            _header(FIELDS + ["uid"]) + _rows(3) + "#separator ab\n" + _log(3)
        ).encode(),
        "duplicate fields later": (
            _log(5) + _header(FIELDS + ["uid"]) + _rows(3)
        ).encode(),
    }


def _gzip_inputs() -> dict[str, bytes]:
    inputs = _inputs()
    clean = gzip.compress(inputs["bad rows"], 1)
    return {
        "gzip": clean,
        "gzip crlf": gzip.compress(inputs["crlf"], 1),
        "gzip bom": gzip.compress(inputs["bom"], 1),
        "gzip cut": clean[: len(clean) * 2 // 3],
        "gzip members": gzip.compress(inputs["clean"][:700])
        + gzip.compress(inputs["clean"][700:]),
        "gzip trailing bytes": clean + b"not gzip",
    }


def _describe(result) -> tuple | None:
    if result is None:
        return None
    labels = result.label_text
    return (
        result.table.schema,
        result.table.to_pydict(),
        result.format,
        result.family,
        result.skipped,
        result.warnings,
        result.partial,
        result.stats,
        result.damage,
        None if labels is None else labels.to_pylist(),
    )


def _outcome(call) -> tuple:
    """What ``call()`` returned, or the error it raised, for comparing."""
    try:
        return ("result", _describe(call()))
    except BadInputError as exc:
        kept = _describe(getattr(exc, "result", None))
        return (type(exc).__name__, str(exc), exc.line, exc.column, kept)


def _whole(path, on_error: str) -> tuple:
    return _outcome(
        lambda: _read_source(load(path, on_error == "fail"), on_error, "UTC")
    )


def _in_pieces(path, on_error: str, size: int, monkeypatch) -> tuple:
    monkeypatch.setattr(source, "CHUNK_BYTES", size)
    return _outcome(lambda: read(path, on_error=on_error))


def _boundaries(data: bytes) -> list[int]:
    """Piece sizes that end a piece right before, and right after, each bad line
    the crafted inputs hold, so that a piece starts (or ends) at it."""
    sizes = []
    at = 0
    for line in data.splitlines(keepends=True):
        if any(mark in line for mark in (b"inf", b"abc", b"70000", b"\r", b"1\t2")):
            sizes += [at, at + len(line)]
        at += len(line)
    return sorted({s for s in sizes if s > 0})[:12]


@pytest.mark.parametrize("name", sorted(_inputs()))
def test_a_plain_log_read_in_pieces_is_read_as_a_whole(name, tmp_path, monkeypatch):
    data = _inputs()[name]
    path = tmp_path / "conn.log"
    path.write_bytes(data)
    for on_error in ("fail", "skip"):
        expected = _whole(path, on_error)
        for size in SIZES + tuple(_boundaries(data)):
            got = _in_pieces(path, on_error, size, monkeypatch)
            assert got == expected, (name, on_error, size)


@pytest.mark.parametrize("name", sorted(_gzip_inputs()))
def test_a_gzip_log_read_in_pieces_is_read_as_a_whole(name, tmp_path, monkeypatch):
    path = tmp_path / "conn.log.gz"
    path.write_bytes(_gzip_inputs()[name])
    for on_error in ("fail", "skip"):
        expected = _whole(path, on_error)
        for size in (1, 5, 64, 1000):
            got = _in_pieces(path, on_error, size, monkeypatch)
            assert got == expected, (name, on_error, size)


def test_the_pieces_are_taken_not_the_whole_file(tmp_path, monkeypatch):
    """read() goes through the piecewise path for a Zeek TSV file, which hands
    the reader many pieces, each ending at a newline."""
    path = tmp_path / "conn.log"
    path.write_bytes(_inputs()["bad rows"])
    monkeypatch.setattr(source, "CHUNK_BYTES", 100)
    assert read_in_pieces(path, "skip") is not None
    pieces = list(Blocks(path))
    assert len(pieces) > 20
    assert all(p.endswith(b"\n") and len(p) >= 100 for p in pieces[:-1])

    def refuse(*args, **kwargs):
        raise AssertionError("read the whole file")

    monkeypatch.setattr("flows.readers.load", refuse)
    assert read(path, on_error="skip").skipped == 4


def test_a_late_iot23_layout_falls_back_to_the_whole_read(tmp_path, monkeypatch):
    path = tmp_path / "conn.log"
    path.write_bytes(_inputs()["iot-23 hidden later"])
    monkeypatch.setattr(source, "CHUNK_BYTES", 64)
    assert read_in_pieces(path, "skip") is None
    assert read(path, on_error="skip").skipped == 20


def test_the_gzip_limit_cuts_a_piecewise_read_where_a_whole_read_is_cut(
    tmp_path, monkeypatch
):
    path = tmp_path / "conn.log.gz"
    path.write_bytes(gzip.compress(_inputs()["clean"]))
    for limit in (1500, 2222, 3000):
        monkeypatch.setenv(source.MAX_INFLATED_ENV, str(limit))
        expected = _whole(path, "skip")
        assert expected[1][6] is True  # partial
        for size in (1, 64, 700):
            assert _in_pieces(path, "skip", size, monkeypatch) == expected


@pytest.mark.parametrize("packed", [False, True])
def test_lines_over_the_limit_read_in_pieces(packed, tmp_path, monkeypatch):
    """A row and a ``#`` line over MAX_LINE_BYTES, each spanning many pieces."""
    long_row = "\t".join(["1.0"] + ["y" * (MAX_LINE_BYTES // 4)] * 5) + "\n"
    text = (
        _header() + _rows(4) + long_row + _rows(4, start=4)
        + "#note\t" + "n" * (MAX_LINE_BYTES + 10) + "\n" + _rows(3, start=8)
    ).encode()
    path = tmp_path / ("long.log.gz" if packed else "long.log")
    path.write_bytes(gzip.compress(text, 1) if packed else text)
    for on_error in ("fail", "skip"):
        expected = _whole(path, on_error)
        for size in (4096, 300_000):
            assert _in_pieces(path, on_error, size, monkeypatch) == expected


@pytest.mark.parametrize("size", [1, 3, 50, 4096])
@pytest.mark.parametrize("name", ["gzip cut", "gzip bom", "gzip trailing bytes"])
def test_blocks_join_to_what_load_holds(name, size, tmp_path, monkeypatch):
    path = tmp_path / "in.gz"
    path.write_bytes(_gzip_inputs()[name])
    monkeypatch.setattr(source, "CHUNK_BYTES", size)
    whole = load(path)
    blocks = Blocks(path)
    assert b"".join(blocks) == whole.data
    assert blocks.cut == whole.cut and blocks.compressed


def test_memory_of_a_piecewise_read_stays_near_its_result(tmp_path, monkeypatch):
    """Not a timing: the text of a 6 MB log is never held whole (a whole read
    holds it at least once, plus its rows as strings)."""
    import tracemalloc

    path = tmp_path / "big.log"
    with open(path, "w") as fh:
        fh.write(_header())
        for start in range(0, 30_000, 1000):
            fh.write(_rows(1000, start=start))
    size = path.stat().st_size
    monkeypatch.setattr(source, "CHUNK_BYTES", 1 << 18)
    read(path)  # imports and caches first
    tracemalloc.start()
    try:
        result = read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(result.table) == 30_000
    assert peak < size, (peak, size, math.ceil(peak / size * 100))


@pytest.mark.parametrize("size", [1, 64, 1 << 20])
def test_the_scan_errors_come_first_as_in_a_whole_read(size, tmp_path, monkeypatch):
    """A whole read scans every ``#`` line before it converts a row block: a bad
    ``#separator`` after a block whose ``#fields`` repeat a name is the error
    named, though the block comes first."""
    path = tmp_path / "conn.log"
    path.write_bytes(_inputs()["bad separator later"])
    monkeypatch.setattr(source, "CHUNK_BYTES", size)
    with pytest.raises(BadInputError, match="#separator 'ab' is not supported"):
        read(path)
    path.write_bytes(_inputs()["duplicate fields later"])
    with pytest.raises(BadInputError, match="names 'uid' twice") as info:
        read(path, on_error="skip")
    assert info.value.line == 6 + 5 + 2 + 6


def _open_row_notes(result) -> list[str]:
    return [w for w in result.warnings if "Zeek may still be writing" in w]


@pytest.mark.parametrize("size", [1, 64, 1 << 20])
def test_a_whole_last_row_without_newline_in_an_unclosed_log_is_noted(
    size, tmp_path, monkeypatch
):
    """Its fields are all there, but the last value may be cut: the row is kept,
    with a note naming the file and the line, read whole or in pieces."""
    path = tmp_path / "conn.log"
    path.write_bytes(_log(close=False).rstrip("\n").encode())
    monkeypatch.setattr(source, "CHUNK_BYTES", size)
    result = read(path)
    assert len(result.table) == 30 and not result.partial
    last = 7 + 30  # seven header lines, then the rows
    assert _open_row_notes(result) == [
        f"{path}: line {last} has no newline at its end and the log no #close "
        "line: Zeek may still be writing it, and the last value may be cut short "
        "(the row is kept)"
    ]
    whole = _read_source(load(path), "fail", "UTC")
    assert _open_row_notes(whole) == _open_row_notes(result)


@pytest.mark.parametrize(
    "text",
    [
        _log(close=False),  # the last row has its newline
        _log(close=True) + _header() + _rows(3).rstrip("\n"),  # a #close was seen
        _log(close=False).rstrip("\n")[:-40],  # cut short: a cut note instead
        _log(close=False, r29={"id.resp_p": "70000"}).rstrip("\n"),  # a bad row
    ],
)
def test_no_open_row_note_otherwise(text, tmp_path, monkeypatch):
    path = tmp_path / "conn.log"
    path.write_bytes(text.encode())
    monkeypatch.setattr(source, "CHUNK_BYTES", 64)
    assert _open_row_notes(read(path, on_error="skip")) == []
