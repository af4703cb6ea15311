"""A gzip input with a line far over ``MAX_LINE_BYTES`` is refused without holding it.

Found: the whole-file readers inflated a gzip file whole before refusing its long
lines, so a few MB of gzip holding one line of a GB peaked at several GB. Each
input here is made in ``tmp_path``, the long line written to gzip a MiB at a time.
"""

from __future__ import annotations

import gzip
import random
import re
import tracemalloc

import pytest

from flows.cli import main as flows_main
from flows.errors import BadInputError, PartialInputError
from flows.readers import read
from flows.readers._source import MAX_LINE_BYTES, load
from tests.test_readers import BINET_HEAD, ROW_A, ROW_B, zeek_text

LONG_MIB = 128  # the long line, inflated; far over the limit of 1 MiB


def _gzip_with_long_line(path, before: str, after: str, mib: int = LONG_MIB):
    """Write ``before``, a line of ``mib`` MiB, then ``after``, gzipped, to ``path``."""
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(before.encode())
        piece = b"y" * (1 << 20)
        for _ in range(mib):
            fh.write(piece)
        fh.write(b"\n")
        fh.write(after.encode())
    return path


def _zeek_gzip(tmp_path, rows_after: int = 1):
    """A Zeek TSV gzip: ROW_A, the long line (line 10), then ROW_B ``rows_after``
    times; returns the path."""
    lines = zeek_text([ROW_A, ROW_B]).splitlines(keepends=True)
    first = next(i for i, ln in enumerate(lines) if not ln.startswith("#"))
    assert first + 2 == 10
    row_b = lines[first + 1]
    before = "".join(lines[: first + 1])
    after = row_b * rows_after + "".join(lines[first + 2 :])
    return _gzip_with_long_line(tmp_path / "long.log.gz", before, after)


def _peak_of(call, tmp_path):
    """``call()``'s result (or raised error) and the peak of Python allocations.

    A small gzip is read first, so the modules the readers import are not counted.
    """
    small = tmp_path / "small.log.gz"
    small.write_bytes(gzip.compress(zeek_text([ROW_A, ROW_B]).encode()))
    read(small)
    tracemalloc.start()
    try:
        try:
            got = call()
        except BadInputError as exc:
            got = exc
        return got, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_failing_read_names_the_line_and_never_holds_it(tmp_path):
    path = _zeek_gzip(tmp_path)

    exc, peak = _peak_of(lambda: read(path), tmp_path)

    assert isinstance(exc, PartialInputError)
    assert exc.path == str(path) and exc.line == 10
    assert str(exc).startswith(f"{path}, line 10: ")
    assert "longer than the 1048576-byte limit for one row" in str(exc)
    assert exc.result.table.column("uid").to_pylist() == ["CabC1"]
    # Inflated whole, the line alone took 128 MiB (and the join as much again).
    assert peak < 32 << 20, peak


def test_failing_read_stops_inflating_at_the_long_line(tmp_path):
    path = _zeek_gzip(tmp_path, rows_after=50_000)
    size = path.stat().st_size

    src = load(path, stop_at_long_line=True)

    assert b"CabC2" not in src.data  # nothing after the long line was inflated
    assert src.data.endswith(b"y" * (MAX_LINE_BYTES + 1) + b"\n")
    assert f"line 10 is longer than the {MAX_LINE_BYTES}-byte limit" in src.cut
    used = int(re.search(r"after (\d+) compressed bytes", src.cut).group(1))
    assert used < size // 2, (used, size)


def test_skipping_read_keeps_the_rows_after_the_long_line(tmp_path):
    path = _zeek_gzip(tmp_path)

    result, peak = _peak_of(lambda: read(path, on_error="skip"), tmp_path)

    assert result.table.column("uid").to_pylist() == ["CabC1", "CabC2"]
    assert result.skipped == 1 and not result.partial
    assert len(result.warnings) == 1
    assert "line 10: a line longer than the 1048576-byte limit" in result.warnings[0]
    assert peak < 32 << 20, peak


def test_flows_inspect_refuses_the_long_line_with_the_file_and_line(tmp_path, capsys):
    path = _zeek_gzip(tmp_path)

    code = flows_main(["inspect", str(path)])

    err = capsys.readouterr().err
    assert code == 4, err
    assert f"{path}, line 10: a line longer than the 1048576-byte limit" in err
    assert "Traceback" not in err


def test_a_bomb_cut_inside_a_long_line_names_its_length_so_far(tmp_path, monkeypatch):
    path = _zeek_gzip(tmp_path)
    head = len(zeek_text([ROW_A], close=False))  # the bytes before the long line
    limit = 8 << 20
    monkeypatch.setenv("GATEWATCH_MAX_INFLATED", str(limit))

    result = read(path, on_error="skip")

    assert result.partial
    assert result.table.column("uid").to_pylist() == ["CabC1"]
    note = next(w for w in result.warnings if "inflated text passed" in w)
    assert f"dropped a cut line of {limit - head} bytes" in note


def test_a_csv_header_over_the_limit_is_refused_at_line_1(tmp_path):
    head = BINET_HEAD.replace(",Label", ",Label" + ",x" * MAX_LINE_BYTES) + "\n"
    row = "2011/08/10 09:46:53.0,1,tcp,1.2.3.4,1,   ->,1.2.3.5,80,S_RA,0,0,4,244,124,2,"
    plain = tmp_path / "h.binetflow"
    plain.write_text(head + row + "flow=To-Normal\n")
    packed = tmp_path / "h.binetflow.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes(), 1))

    for path in (plain, packed):
        for on_error in ("fail", "skip"):
            with pytest.raises(BadInputError) as info:
                read(path, on_error=on_error)
            assert info.value.line == 1 and "-byte limit for one row" in str(info.value)


def _zeek_with_long_header(tmp_path, name: str, line: str):
    """A Zeek TSV with ``line`` before ``#fields``, plain and gzipped; the paths and
    the number of that line."""
    text = zeek_text([ROW_A], extra_header=[line])
    number = 1 + text.splitlines().index(line)
    plain = tmp_path / name
    plain.write_text(text)
    packed = tmp_path / f"{name}.gz"
    packed.write_bytes(gzip.compress(text.encode(), 1))
    return (plain, packed), number


def test_a_zeek_comment_over_the_limit_is_a_bad_line(tmp_path):
    """As the line-by-line reader does: skipped, or the read stops there."""
    paths, number = _zeek_with_long_header(
        tmp_path, "c.log", "#note\t" + "n" * (2 << 20)
    )
    for path in paths:
        with pytest.raises(BadInputError) as info:
            read(path)
        assert info.value.line == number and "-byte limit for one row" in str(
            info.value
        )
        result = read(path, on_error="skip")
        assert result.table.column("uid").to_pylist() == ["CabC1"]
        assert result.skipped == 1 and f"line {number}: " in result.warnings[0]


def test_a_zeek_fields_line_over_the_limit_is_named_as_the_cause(tmp_path):
    lines = zeek_text([ROW_A]).splitlines(keepends=True)
    number = 1 + next(i for i, ln in enumerate(lines) if ln.startswith("#fields"))
    names = [f"f{i}" for i in range(MAX_LINE_BYTES // 6)]
    lines[number - 1] = "#fields\t" + "\t".join(names) + "\n"
    plain = tmp_path / "f.log"
    plain.write_text("".join(lines))
    packed = tmp_path / "f.log.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes(), 1))
    assert len(lines[number - 1]) > MAX_LINE_BYTES

    for path in (plain, packed):
        for on_error in ("fail", "skip"):
            with pytest.raises(BadInputError) as info:
                read(path, on_error=on_error)
            assert info.value.line == number and "-byte limit for one row" in str(
                info.value
            )


def _expected(text: bytes) -> bytes:
    """``text`` with every line over the limit cut to one byte past it."""
    return b"\n".join(ln[: MAX_LINE_BYTES + 1] for ln in text.split(b"\n"))


@pytest.mark.parametrize("seed", range(4))
def test_the_guard_cuts_long_lines_wherever_the_pieces_break(seed):
    from flows.readers._source import _LineGuard

    rng = random.Random(seed)
    sizes = [0, 5, 80, MAX_LINE_BYTES, MAX_LINE_BYTES + 1, MAX_LINE_BYTES + 2]
    sizes += [3 << 20, 5 << 19]
    lines = [bytes([97 + i % 26]) * rng.choice(sizes) for i in range(14)]
    text = b"\n".join(lines)  # the last line has no newline: it is unfinished
    guard = _LineGuard(stop=False)
    at = 0
    while at < len(text):
        step = rng.choice([1, 7, 4096, MAX_LINE_BYTES - 1, 4 << 20])
        guard.add(text[at : at + step])
        at += step

    assert guard.text() == _expected(text)
    assert guard.run == len(lines[-1])
