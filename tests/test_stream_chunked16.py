"""An Argus binetflow file streams in blocks through ``iter_records``.

The edge agent's file source used to read a binetflow file whole before it scored
its first flow. It is now read a block of a few thousand lines at a time
(:class:`flows.readers.binetflow.BinetflowStream`); every expectation here is what
the whole-file reader (:func:`flows.readers.read`) gives on the same file: the
records, their lines, the records of no IP flow, the error and its line, the
damage and the warnings. ``STREAM_BYTES`` is lowered where the edges of the blocks
must fall on given lines.
"""

from __future__ import annotations

import gzip
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import pytest

import flows.readers._chunked as chunked
from flows.errors import BadInputError
from flows.readers import iter_records, read
from flows.readers._source import MAX_LINE_BYTES, Blocks
from flows.readers.binetflow import BinetflowStream
from flows.readers.stream import Place
from tests.conftest import data_file

HEAD = (
    "StartTime,Dur,Proto,SrcAddr,Sport,Dir,DstAddr,Dport,State,sTos,dTos,"
    "TotPkts,TotBytes,SrcBytes,SrcPkts,Label"
)


def row(i: int, label: str = "flow=From-Botnet-V42-TCP") -> str:
    """A good TCP row; ``i`` sets its time, source and port (hex for odd ``i``)."""
    port = f"0x{40000 + i % 20000:04x}" if i % 2 else str(40000 + i % 20000)
    return (
        f"2011/08/10 09:{i // 60 % 60:02d}:{i % 60:02d}.{i % 999999:06d},0.5,tcp,"
        f"10.0.{i // 250 % 250}.{i % 250 + 1},{port},   ->,10.1.0.1,80,S_RA,0,0,"
        f"4,244,124,2,{label}"
    )


MAN = "2011/08/10 09:00:03.000000,0,man,0,,   ->,0,,STA,,,1,60,60,1,"
LLC = (
    "2011/08/10 09:00:04.000000,0,llc,00:11:22:33:44:55,0,   ->,"
    "00:11:22:33:44:66,0,INT,,,1,60,60,1,flow=Background"
)
BAD_PORT = row(5).replace("0x9c45", "70000")
BAD_TIME = row(6).replace("2011/08/10", "2011/02/30")
TOO_FEW = "2011/08/10 09:00:07.000000,0.5,tcp,10.0.0.8"
UNKNOWN = row(8, "flow=TCP-Established-To-Microsoft-7")


@dataclass
class Outcome:
    """What one way of reading a file gave, to compare the two ways."""

    records: list[dict]
    lines: list[int | None]
    non_ip: list[int | None]  # the lines of the records of no IP flow
    error: tuple | None
    damage: list


def whole(path: Path, **options) -> Outcome:
    """The expectation: :func:`read` on the whole file (on an error, the rows it
    kept before it, ``exc.result``), split as ``iter_records`` yields it."""
    error = None
    try:
        result = read(path, **options)
    except BadInputError as exc:
        result, error = getattr(exc, "result", None), _key(exc)
    if result is None:
        return Outcome([], [], [], error, [])
    records = result.table.to_pylist()
    lines = [int(n) for n in result.row_lines]
    marks = [bool(m) for m in result.non_ip]
    return Outcome(
        [r for r, m in zip(records, marks, strict=True) if not m],
        [n for n, m in zip(lines, marks, strict=True) if not m],
        [n for n, m in zip(lines, marks, strict=True) if m],
        error,
        [] if error else list(result.damage),
    )


def streamed(path: Path, **options) -> Outcome:
    """``iter_records`` on the file, as the agent takes it (place, non-IP, damage)."""
    got, lines, non_ip, damage = [], [], [], []
    place = Place()
    error = None
    try:
        for record in iter_records(
            path, place=place, on_non_ip=non_ip.append, damage=damage, **options
        ):
            got.append(record)
            lines.append(place.number)
    except BadInputError as exc:
        error = _key(exc)
    return Outcome(got, lines, non_ip, error, damage)


def _key(exc: BadInputError) -> tuple:
    return (type(exc).__name__, exc.path, exc.line, exc.column, str(exc))


def check(path: Path, **options) -> Outcome:
    """Assert the streamed outcome is the whole read's, and (with no error) that
    the stream's warnings are the whole read's; return it."""
    expected = whole(path, **options)
    got = streamed(path, **options)
    assert got == expected
    if expected.error is None:
        on_error = options.get("on_error", "fail")
        stream = BinetflowStream(
            str(path),
            on_error,
            options.get("timezone", "UTC"),
            options.get("drop_unlabeled", False),
        )
        assert sum(len(block.table) for block in stream) == len(
            read(path, **options).table
        )
        assert stream.warnings == read(path, **options).warnings
    return expected


def write(path: Path, lines: list[str], end: str = "\n") -> Path:
    path.write_text(HEAD + "\n" + "\n".join(lines) + end)
    return path


# ------------------------------------------------------------- crafted files


def test_a_clean_file_streams_to_the_whole_reads_records(tmp_path: Path) -> None:
    path = write(tmp_path / "clean.binetflow", [row(i) for i in range(30)])
    got = check(path)
    assert len(got.records) == 30 and got.lines == list(range(2, 32))
    assert got.records[1]["src_port"] == 40001  # 0x9c41, read as hex


@pytest.mark.parametrize("on_error", ["skip", "fail"])
def test_bad_lines_are_skipped_or_stop_the_stream_at_their_line(
    tmp_path: Path, on_error: str
) -> None:
    lines = [row(i) for i in range(5)] + [BAD_PORT, BAD_TIME, TOO_FEW, UNKNOWN]
    lines += [row(i) for i in range(9, 14)]
    path = write(tmp_path / "bad.binetflow", lines)
    got = check(path, on_error=on_error)
    if on_error == "skip":
        assert len(got.records) == 11 and 7 not in got.lines
    else:
        # The rows before the bad line are yielded first (before: none at all).
        assert got.lines == [2, 3, 4, 5, 6]
        assert got.error[0] == "PartialInputError" and got.error[2:4] == (7, "Sport")


def test_a_first_bad_line_is_bad_input_not_partial(tmp_path: Path) -> None:
    path = write(tmp_path / "first.binetflow", [BAD_TIME, row(1)])
    got = check(path)
    assert got.error[:4] == ("BadInputError", str(path), 2, "StartTime")


def test_lines_no_whole_read_splits_are_bad_lines_too(tmp_path: Path) -> None:
    """Bytes that are not UTF-8, a CR inside a line, a line over the length limit."""
    body = HEAD.encode() + b"\n" + row(1).encode() + b"\n"
    body += row(2).encode().replace(b"S_RA", b"S_\xff") + b"\n"
    body += row(3).encode().replace(b"S_RA", b"S\rRA") + b"\n"
    body += b"x" * (MAX_LINE_BYTES + 5) + b"\n" + row(4).encode() + b"\n"
    path = tmp_path / "odd.binetflow"
    path.write_bytes(body)
    for on_error in ("skip", "fail"):
        got = check(path, on_error=on_error)
    assert got.error[2] == 3  # fail: the line that is not UTF-8


@pytest.mark.parametrize("on_error", ["skip", "fail"])
def test_gzip_input_streams_the_same_and_a_cut_stream_is_damage(
    tmp_path: Path, on_error: str
) -> None:
    lines = [row(i) for i in range(40)] + [BAD_PORT] + [row(i) for i in range(41, 60)]
    packed = gzip.compress((HEAD + "\n" + "\n".join(lines) + "\n").encode())
    path = tmp_path / "flows.binetflow.gz"
    path.write_bytes(packed)
    check(path, on_error=on_error)

    path.write_bytes(packed[: len(packed) * 2 // 3])  # cut: no end marker
    got = check(path, on_error="skip")
    assert got.damage and got.damage[0].stopped and "gzip" in got.damage[0].what


def test_a_file_cut_short_mid_line_keeps_the_rows_before(tmp_path: Path) -> None:
    text = HEAD + "\n" + "\n".join(row(i) for i in range(12)) + "\n"
    path = tmp_path / "cut.binetflow"
    path.write_text(text[:-40])  # the last row keeps 10 of its fields
    got = check(path)
    assert len(got.records) == 11
    assert [d.what for d in got.damage] == [
        "the last line (13) is cut short (10 of 16 fields)"
    ]


def test_argus_management_and_layer2_records_go_to_on_non_ip(tmp_path: Path) -> None:
    path = write(tmp_path / "man.binetflow", [MAN, row(1), LLC, row(2), UNKNOWN])
    got = check(path, on_error="skip")
    assert got.non_ip == [2, 4] and got.lines == [3, 5, 6]
    # Without on_non_ip they are yielded with null addresses, as read keeps them.
    assert list(iter_records(path)) == read(path).table.to_pylist()


def test_start_times_in_a_zone_and_labels_only(tmp_path: Path) -> None:
    """Summer time ends in Prague on 2011-10-30 at 03:00: 02:30 comes twice."""
    lines = [row(i).replace("2011/08/10 09", "2011/10/30 02") for i in range(4)]
    lines += [row(9, ""), row(10, "flow=Background"), row(11, "flow=Normal-V1")]
    path = write(tmp_path / "zone.binetflow", lines)
    got = check(path, timezone="Europe/Prague")
    assert got.records[0]["ts"] == pytest.approx(1319934000.0)  # 02:00 CEST
    labeled = check(path, drop_unlabeled=True, on_error="skip")
    assert [r["label"] for r in labeled.records] == [1, 1, 1, 1, 0]

    none = write(tmp_path / "unlabeled.binetflow", [row(1, ""), row(2, "")])
    assert check(none, drop_unlabeled=True).error[0] == "BadInputError"


def test_a_csv_of_another_family_is_refused_from_its_head(
    data_dir: Path, tmp_path: Path
) -> None:
    """It used to be read whole first, so a bad row in it was named instead."""
    source = data_file(data_dir, "nsl-kdd/KDDTest+.txt")
    head = source.read_bytes()[:4096]
    path = tmp_path / "kdd.txt"
    path.write_bytes(head[: head.rfind(b"\n") + 1] + b"0,tcp\n" + head)
    with pytest.raises(BadInputError) as caught:
        next(iter_records(path))
    assert str(caught.value) == f"{path}: is nsl-kdd, not a conn-family input"


# ------------------------------------------------------------ block edges


def _piece_starts(path: Path, size: int) -> list[int]:
    """The file line each piece of ``size`` bytes starts at."""
    starts, line = [], 1
    for piece in Blocks(path, size=size):
        starts.append(line)
        line += piece.count(b"\n")
    return starts


@pytest.mark.parametrize("on_error", ["skip", "fail"])
@pytest.mark.parametrize("where", ["first", "last"])
def test_a_bad_line_on_a_block_edge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_error: str, where: str
) -> None:
    """The bad line (22) is the first line of a block, or the last of one."""
    lines = [row(i) for i in range(20)] + [BAD_PORT] + [row(i) for i in range(21, 40)]
    path = write(tmp_path / "edge.binetflow", lines)
    bad = 22
    edge = bad if where == "first" else bad + 1
    size = next(
        s
        for s in range(100, 2000, 3)
        if edge in _piece_starts(path, s) and len(_piece_starts(path, s)) > 3
    )
    monkeypatch.setattr(chunked, "STREAM_BYTES", size)
    got = check(path, on_error=on_error)
    if on_error == "fail":
        assert got.error[2] == bad and got.lines == list(range(2, bad))
    else:
        assert bad not in got.lines and len(got.records) == 39


@pytest.mark.parametrize("empty_later", [True, False])
def test_lines_of_spaces_are_read_as_the_whole_body_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_later: bool
) -> None:
    """A whole read drops lines of spaces when its body has an empty line anywhere
    (else they are bad lines); the empty line here is blocks after them."""
    lines = [row(i) for i in range(3)] + ["   "] + [row(i) for i in range(4, 30)]
    if empty_later:
        lines[25] = ""
    path = write(tmp_path / "spaces.binetflow", lines)
    monkeypatch.setattr(chunked, "STREAM_BYTES", 300)
    assert len(_piece_starts(path, 300)) > 5
    for on_error in ("skip", "fail"):
        got = check(path, on_error=on_error)
        assert (got.error is None) == (empty_later or on_error == "skip")


def test_a_block_of_bad_lines_only_after_an_empty_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a differential fuzz: such a block (a CR inside its one line) once
    made the stream fail with an IndexError."""
    lines = [row(1), "", row(2), row(3).replace("S_RA", "S\rRA"), "   ", row(4)]
    path = write(tmp_path / "cr.binetflow", lines)
    monkeypatch.setattr(chunked, "STREAM_BYTES", 1)  # a block for each line
    got = check(path, on_error="skip")
    assert got.lines == [2, 4, 7]


@pytest.mark.parametrize("on_error", ["skip", "fail"])
@pytest.mark.parametrize("later", ["abc", "1.5"])
def test_an_infinite_duration_is_worded_as_the_whole_column_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_error: str, later: str
) -> None:
    """A whole read words a Dur of ``inf`` otherwise when a Dur anywhere in the
    file is not a number at all (here blocks after it)."""
    lines = [row(i) for i in range(40)]
    lines[3] = lines[3].replace(",0.5,", ",inf,")
    lines[35] = lines[35].replace(",0.5,", f",{later},")
    path = write(tmp_path / "dur.binetflow", lines)
    monkeypatch.setattr(chunked, "STREAM_BYTES", 500)
    assert len(_piece_starts(path, 500)) > 5
    got = check(path, on_error=on_error)
    if on_error == "fail":
        found = "expected a number" if later == "abc" else "expected a finite number"
        assert got.error[2:4] == (5, "Dur") and found in got.error[4]


def test_more_lines_than_one_block_with_the_default_size(tmp_path: Path) -> None:
    lines = [row(i) for i in range(12_000)]
    lines[4_000] = BAD_TIME
    lines[9_999] = TOO_FEW
    lines[5_000] = MAN
    path = write(tmp_path / "many.binetflow", lines)
    assert len(_piece_starts(path, chunked.STREAM_BYTES)) > 2
    got = check(path, on_error="skip")
    assert len(got.records) == 11_997 and got.non_ip == [5_002]
    assert check(path).error[2] == 4_002


# ------------------------------------------------------------------ memory


def test_memory_stays_bounded_while_the_first_records_are_read(
    tmp_path: Path,
) -> None:
    """The first 1,000 records of a 200,000-line file come for a small part of
    what reading it whole takes (traced Python memory: bytes, numpy, records)."""
    path = write(tmp_path / "big.binetflow", [row(i) for i in range(200_000)])
    small = write(tmp_path / "small.binetflow", [row(i) for i in range(3)])
    assert list(iter_records(small)) == read(small).table.to_pylist()  # imports

    tracemalloc.start()
    try:
        records = iter_records(path)
        first = [next(records) for _ in range(1_000)]
        _, streaming = tracemalloc.get_traced_memory()
        records.close()
        tracemalloc.reset_peak()
        whole_table = read(path).table
        _, reading = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert first == whole_table.slice(0, 1_000).to_pylist()
    print(f"traced peak: first 1,000 streamed {streaming}, whole read {reading}")
    assert streaming * 5 < reading, (streaming, reading)


# ---------------------------------------------------------------- real data


@pytest.mark.parametrize(
    "name", ["test11-portscan", "test4-malicious", "test5-mixed"]
)
def test_real_argus_files_stream_to_the_whole_reads_records(
    data_dir: Path, name: str
) -> None:
    path = data_file(data_dir, f"binetflow/{name}.binetflow")
    got = check(path)
    assert len(got.records) + len(got.non_ip) == len(read(path).table)
    assert list(iter_records(path, timezone="Europe/Prague")) == read(
        path, timezone="Europe/Prague"
    ).table.to_pylist()
