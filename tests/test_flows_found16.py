"""Two findings in the text readers, each reproduced first.

A Zeek JSON line nested 50,000 deep (some 300 KB, under the 1 MiB row limit)
crashed the process inside pyarrow.json (exit 139, no error line); such a line is
a bad line, the rows before it kept, as one nested 1,000 deep already was.

Numbers the writers never write were read as numbers: Arrow's cast reads ``0x1bb``
as 443, and Python's int()/float() take ``1_596_790_164`` and other scripts'
digits (``４４３``, ``٤٤٣``). They are bad values now, named with their line and
column, in every reader that converts text through ``flows.readers._convert``.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pyarrow as pa
import pytest

from flows.errors import PartialInputError
from flows.readers import _source as source
from flows.readers import read
from flows.readers._convert import BadRows, _parse_one, parse_problem, to_number
from flows.readers.zeek import _many_opens
from tests.test_chunked_json import _lines
from tests.test_readers import KDD_ROW, ROW_A, ROW_B, write, zeek_text

DEEP_PROBLEM = "expected one JSON object (arrays or objects nested too deeply)"

# -------------------------------------------------------------- deep JSON lines


def _deep_log(depth: int = 50_000, before: int = 150, after: int = 150) -> bytes:
    """A Zeek JSON log with one line nested ``depth`` deep after ``before`` rows."""
    deep = '{"a":' * depth + "1" + "}" * depth + "\n"
    lines = _lines(before) + [deep] + _lines(after, start=before)
    return "".join(lines).encode()


# Reads in a child process: the crash this guards against would end pytest itself.
_READ = """
import sys
from flows.readers import _source, read
from flows.errors import PartialInputError
_source.CHUNK_BYTES = int(sys.argv[2])
try:
    read(sys.argv[1])
except PartialInputError as exc:
    print(exc.line, exc.result.table.num_rows, str(exc).split(": ", 1)[1])
skipped = read(sys.argv[1], on_error="skip")
print(skipped.table.num_rows, skipped.skipped)
"""


@pytest.mark.parametrize("how", ["file", "gzip", "stdin"])
def test_flows_inspect_names_a_line_nested_50000_deep(how, tmp_path):
    data = _deep_log()
    path = tmp_path / "deep.json.log"
    path.write_bytes(data)
    args, stdin, name = [str(path)], None, str(path)
    if how == "gzip":
        path = tmp_path / "deep.json.log.gz"
        path.write_bytes(gzip.compress(data))
        args, name = [str(path)], str(path)
    elif how == "stdin":
        args, stdin, name = ["-"], data, "<stdin>"

    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "inspect", *args],
        input=stdin,
        capture_output=True,
        timeout=120,
    )
    err = proc.stderr.decode()
    assert proc.returncode == 4, (proc.returncode, err[-2000:])
    assert f"error: {name}, line 151: {DEEP_PROBLEM}" in err.splitlines()
    assert "Traceback" not in err
    assert "rows:     150" in proc.stdout.decode()


@pytest.mark.parametrize("piece", [1 << 24, 4096, 333])
def test_a_deep_line_read_in_pieces_keeps_the_rows_around_it(piece, tmp_path):
    path = tmp_path / "deep.json.log"
    path.write_bytes(_deep_log(before=40, after=30))

    proc = subprocess.run(
        [sys.executable, "-c", _READ, str(path), str(piece)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.splitlines() == [f"41 40 {DEEP_PROBLEM}", "70 1"]


def test_many_opens_counts_the_brackets_of_each_line():
    row = json.dumps({"ts": 1.5, "tunnel_parents": ["a"]}).encode() + b"\n"
    assert not _many_opens(row * 1000)  # two brackets a line, many lines
    assert not _many_opens(b'{"a":' * 64 + b"1" + b"}" * 64 + b"\n")
    assert _many_opens(b'{"a":' * 65 + b"1" + b"}" * 65 + b"\n")
    assert _many_opens(row * 50 + b"[" * 65 + b"]" * 65 + b"\n" + row * 50)
    # Brackets in a line that does not start with one, and no newline at the end.
    assert _many_opens(row * 50 + b' {"x": "' + b"[" * 70 + b'"}')
    assert not _many_opens(row * 50 + b' {"x": "' + b"[" * 60 + b'"}')
    assert not _many_opens(b"")


# -------------------------------------------------------- lenient number texts


def _zeek_with(column: int, value: str) -> str:
    """A Zeek TSV log of three rows, the second holding ``value`` in ``column``."""
    bad = list(ROW_B)
    bad[column] = value
    return zeek_text([ROW_A, bad, ROW_A])


@pytest.mark.parametrize(
    ("column", "name", "value", "expected"),
    [
        (5, "id.resp_p", "0x1bb", "an integer"),
        (5, "id.resp_p", "0X1BB", "an integer"),
        (5, "id.resp_p", "４４３", "an integer"),
        (5, "id.resp_p", "٤٤٣", "an integer"),
        (5, "id.resp_p", "4_43", "an integer"),
        (3, "id.orig_p", "0x10", "an integer"),
        (16, "orig_pkts", "0x1", "an integer"),
        (9, "orig_bytes", "1_000", "an integer"),
        (0, "ts", "1_596_790_164", "a number"),
        (0, "ts", "１６００000000.5", "a number"),
        (8, "duration", "0_5", "a number"),
        (8, "duration", "٠.٥", "a number"),
        (8, "duration", "1.5\u00a0", "a number"),
    ],
)
def test_zeek_tsv_numbers_are_ascii_decimal(column, name, value, expected, tmp_path):
    path = write(tmp_path, "conn.log", _zeek_with(column, value))
    line = 10  # eight header lines, then the rows

    with pytest.raises(PartialInputError) as info:
        read(path)
    err = info.value
    assert (err.line, err.column, err.exit_code) == (line, name, 4)
    assert str(err) == (
        f"{path}, line {line}, column {name!r}: expected {expected}, "
        f"found {value!r}"
    )
    assert err.result.table.column("uid").to_pylist() == ["CabC1"]

    skipped = read(path, on_error="skip")
    assert skipped.skipped == 1 and skipped.stats["skipped_lines"] == [line]
    assert skipped.table.column("uid").to_pylist() == ["CabC1", "CabC1"]


@pytest.mark.parametrize(
    ("column", "value", "field", "read_as"),
    [
        (5, "443", "dst_port", 443),
        (5, "-", "dst_port", None),
        (0, "1.6e9", "ts", 1.6e9),
        (0, "16000000005E-1", "ts", 1600000000.5),
        (8, "1.25e-3", "duration", 0.00125),
        (8, ".5", "duration", 0.5),
        (9, "007", "orig_bytes", 7),
    ],
)
def test_zeek_tsv_plain_numbers_read_as_before(column, value, field, read_as,
                                               tmp_path):
    path = write(tmp_path, "conn.log", _zeek_with(column, value))
    result = read(path)
    assert result.skipped == 0 and result.table.num_rows == 3
    assert result.table.column(field).to_pylist()[1] == read_as


def test_a_hex_port_among_bad_values_is_named_as_written(tmp_path):
    # One piece with 0x1bb and one with 'abc': each is named as the file has it.
    bad = list(ROW_B)
    bad[5] = "abc"
    hexed = list(ROW_B)
    hexed[5] = "0x1bb"
    path = write(tmp_path, "conn.log", zeek_text([ROW_A, hexed, bad]))
    result = read(path, on_error="skip")
    assert result.stats["skipped_lines"] == [10, 11]
    assert result.table.column("uid").to_pylist() == ["CabC1"]


@pytest.mark.parametrize(
    ("index", "column", "value", "expected"),
    [
        (4, "src_bytes", "0x1bb", "an integer"),
        (5, "dst_bytes", "４４３", "an integer"),
        (22, "count", "2_29", "an integer"),
        (24, "serror_rate", "0_5", "a number"),
    ],
)
def test_nsl_kdd_numbers_are_ascii_decimal(index, column, value, expected,
                                           tmp_path):
    values = KDD_ROW.split(",")
    values[index] = value
    text = f"{KDD_ROW},normal,21\n{','.join(values)},neptune,20\n"
    path = write(tmp_path, "k.txt", text)

    with pytest.raises(PartialInputError) as info:
        read(path)
    err = info.value
    assert (err.line, err.column) == (2, column)
    assert str(err).endswith(f"expected {expected}, found {value!r}")
    assert err.result.table.num_rows == 1


def test_nsl_kdd_difficulty_in_hex_is_a_bad_row(tmp_path):
    path = write(tmp_path, "k.txt", f"{KDD_ROW},normal,21\n{KDD_ROW},normal,0x15\n")
    result = read(path, on_error="skip")
    assert result.skipped == 1 and result.table.column("difficulty").to_pylist() == [21]


def test_zeek_json_number_texts_stay_bad(tmp_path):
    lines = _lines(3, r1={"id.resp_p": "0x1bb"}, r2={"ts": "1_600_000_000"})
    path = write(tmp_path, "conn.json.log", "".join(lines))
    result = read(path, on_error="skip")
    assert result.stats["skipped_lines"] == [2, 3]


def test_to_number_takes_hex_only_when_asked():
    text = pa.array(["80", "0x1bb", None])
    bad = BadRows()
    values, _ = to_number(text, "i64", "sport", bad)
    assert values.to_pylist() == [80, None, None]
    assert bad.rows == {1: ("sport", "expected an integer, found '0x1bb'")}

    bad = BadRows()
    values, _ = to_number(text, "i64", "sport", bad, hex_ok=True)  # Argus
    assert values.to_pylist() == [80, 443, None] and not bad.rows

    bad = BadRows()
    values, _ = to_number(pa.array(["0", "0x1"]), "i8", "label", bad)
    assert values.to_pylist() == [0, None] and list(bad.rows) == [1]


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("443", "i64", 443),
        (" +443 ", "i64", 443),
        ("-7", "i64", -7),
        ("1.5e3", "f64", 1500.0),
        ("  2.", "f64", 2.0),
        ("４４３", "i64", None),
        ("٤٤٣", "i64", None),
        ("1_000", "i64", None),
        ("0x1bb", "i64", None),
        ("1_000.5", "f64", None),
        ("４.5", "f64", None),
        ("\u00a0443", "i64", None),
        ("443\x1c", "f64", None),
        ("inf", "f64", None),
    ],
)
def test_the_slow_parse_takes_ascii_decimal_only(text, kind, value):
    # The live stream readers parse value by value through it too.
    assert _parse_one(text, kind, False) == value


def test_parse_problem_words_stay():
    assert parse_problem("1e999", "f64").startswith("number out of range")
    assert parse_problem("inf", "f64") == "expected a number, found 'inf'"
    assert parse_problem("1_0", "f64") == "expected a number, found '1_0'"
    assert parse_problem("٤", "i64") == "expected an integer, found '٤'"
    assert parse_problem("99999999999999999999", "i64").startswith(
        "integer out of range"
    )


def test_the_real_logs_read_as_before(data_dir, monkeypatch):
    # Every conn.log in the data folder with a Zeek header reads whole, nothing
    # skipped, in pieces too (some reference logs are bare tables: not Zeek's).
    logs = sorted((data_dir / "zeek-conn").glob("*.log*"))
    logs += [
        path
        for path in sorted((data_dir / "zeek-reference").glob("*.conn.log"))
        if path.read_bytes().startswith(b"#")
    ]
    assert len(logs) > 4
    for path in logs:
        result = read(path, on_error="skip")
        assert result.skipped == 0, path
        monkeypatch.setattr(source, "CHUNK_BYTES", 1 << 16)
        assert read(path, on_error="skip").table.equals(result.table), path
        monkeypatch.undo()
