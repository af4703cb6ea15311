"""A gzip stream cut inside a header is named as cut, by every reader.

Found: a Zeek TSV conn.log whose gzip stream stops after its first line, inside
its header (``#separator \\x09`` then half of ``#set_separator``, no gzip end),
made ``flows inspect FILE``, ``flows inspect -`` and ``teacher eval --data FILE``
say ``no #fields line (expected a Zeek header)``, as for a file that never had
one, while the edge agent said ``gzip stream cut at byte offset 39``. The whole
read's error now says the header stopped at the cut, and where that was; a
Zeek JSON log and the CSV formats (one header line, or none) are checked to
agree across the readers too.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from flows.errors import BadInputError
from flows.readers import read
from flows.readers.stream import iter_records

ZEEK_TSV = "zeek-conn/android-mischief-rat01-androidtester.conn.log"
CUT_39 = "gzip stream cut at byte offset 39 (no end marker)"


def _cut_gzip(text: bytes) -> bytes:
    """``text`` gzip-compressed and flushed, without the stream's end marker."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    return deflate.compress(text) + deflate.flush(zlib.Z_SYNC_FLUSH)


def _head(data_dir: Path, rel: str, n: int) -> bytes:
    """The first ``n`` bytes of a data file's text (gunzipped where it is gzip)."""
    raw = (data_dir / rel).read_bytes()
    return (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)[:n]


@pytest.fixture
def cut_tsv(data_dir, tmp_path) -> Path:
    """The real conn.log's first 30 bytes (``#separator \\x09\\n#set_separator``)
    as a gzip stream cut there."""
    head = _head(data_dir, ZEEK_TSV, 30)
    assert head == b"#separator \\x09\n#set_separator"
    path = tmp_path / "cut.conn.log.gz"
    path.write_bytes(_cut_gzip(head))
    return path


def _cli(module: str, args: list[str], stdin: Path | None = None):
    """Run ``python -m module args``; the finished process."""
    with open(stdin, "rb") if stdin else open("/dev/null", "rb") as fh:
        return subprocess.run([sys.executable, "-m", module, *args], stdin=fh,
                              capture_output=True, text=True, timeout=300)


def test_read_names_the_cut_not_a_missing_header(cut_tsv):
    with pytest.raises(BadInputError) as err:
        read(str(cut_tsv))
    text = str(err.value)
    assert text.startswith(f"{cut_tsv}: no #fields line (expected a Zeek header) ")
    assert f"before the input was cut short: {CUT_39}" in text
    assert "kept the one complete line before it" in text


@pytest.mark.parametrize("how", ["file", "stdin"])
def test_flows_inspect_names_the_cut_and_exits_3(cut_tsv, how):
    args, stdin, name = ([str(cut_tsv)], None, str(cut_tsv)) if how == "file" \
        else (["-"], cut_tsv, "<stdin>")
    done = _cli("flows.cli", ["inspect", *args], stdin)
    assert done.returncode == 3, done.stderr
    errors = [line for line in done.stderr.splitlines()
              if line.startswith("error:")]
    assert errors == [
        f"error: {name}: no #fields line (expected a Zeek header) before the input "
        f"was cut short: {CUT_39}; kept the one complete line before it and "
        "dropped a cut line of 14 bytes"
    ]


def test_teacher_eval_names_the_cut_and_exits_3(cut_tsv, data_dir, tmp_path):
    from teacher.cli import main
    from tests.test_eval_found16 import CTU50, SMALL, TINY, _run

    out = tmp_path / "T1"
    code, _ = _run(main, ["train", "--data", str(data_dir / CTU50), "--out",
                          str(out), *SMALL, "--replay-size", "0", *TINY])
    assert code == 0
    done = _cli("teacher.cli", ["eval", "--checkpoint", str(out),
                                "--data", str(cut_tsv)])
    assert done.returncode == 3, done.stderr
    assert f"{cut_tsv}: no #fields line" in done.stderr
    assert CUT_39 in done.stderr


def test_the_streaming_reader_names_the_same_cut(cut_tsv):
    """The edge agent's reader: no rows, and the cut at the same offset."""
    damage: list = []
    assert list(iter_records(cut_tsv, damage=damage)) == []
    assert [(d.path, d.stopped) for d in damage] == [(str(cut_tsv), True)]
    assert CUT_39 in f"{damage[0].place} {damage[0].what}"


@pytest.mark.parametrize("cut_in", ["#set_separator", "#path", "#fields"])
def test_a_cut_anywhere_before_the_fields_line_is_named(
        data_dir, tmp_path, cut_in):
    text = (data_dir / ZEEK_TSV).read_bytes()
    at = text.index(b"\n" + cut_in.encode()) + 4  # inside that line
    path = tmp_path / "cut.conn.log.gz"
    path.write_bytes(_cut_gzip(text[:at]))
    with pytest.raises(BadInputError) as err:
        read(str(path))
    assert "no #fields line (expected a Zeek header) before the input was cut " \
        "short: gzip stream cut at byte offset" in str(err.value)


def test_a_header_without_fields_and_no_cut_is_still_a_missing_header(
        data_dir, tmp_path):
    text = _head(data_dir, ZEEK_TSV, 4000)
    head = text[: text.index(b"\n", 16) + 1]  # two whole lines
    assert head.count(b"\n") == 2
    for name, data in [("plain.conn.log", head),
                       ("whole.conn.log.gz", gzip.compress(head))]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(BadInputError) as err:
            read(str(path))
        assert str(err.value) == f"{path}: no #fields line (expected a Zeek header)"


@pytest.mark.parametrize(
    "rel",
    [
        "zeek-conn/nmap-portscans.conn.json.log",
        "binetflow/test4-malicious.binetflow",
        "unsw-nb15/UNSW_NB15_training-set.csv.gz",
        "nsl-kdd/KDDTest+.txt",
    ],
)
def test_other_formats_cut_inside_their_first_line_name_the_cut(
        data_dir, tmp_path, rel):
    """A cut inside the first line (a CSV header, or a first row) leaves no
    line; the whole and the streaming read both say so and where."""
    path = tmp_path / "cut.gz"
    path.write_bytes(_cut_gzip(_head(data_dir, rel, 20)))
    want = f"{path}: holds no text after gunzip ({path}: gzip stream cut at byte"
    with pytest.raises(BadInputError) as err:
        read(str(path))
    assert str(err.value).startswith(want)
    with pytest.raises(BadInputError) as err:
        list(iter_records(path))
    assert str(err.value).startswith(want)


@pytest.mark.parametrize(
    "rel",
    ["binetflow/test4-malicious.binetflow", "unsw-nb15/UNSW_NB15_training-set.csv.gz"],
)
def test_a_csv_cut_after_its_header_line_is_damaged_with_nothing_read(
        data_dir, tmp_path, rel):
    text = _head(data_dir, rel, 4000)
    path = tmp_path / "cut.gz"
    path.write_bytes(_cut_gzip(text[: text.index(b"\n") + 5]))
    done = _cli("flows.cli", ["inspect", str(path)])
    assert done.returncode == 3, done.stderr
    assert "damaged part way: gzip stream cut at byte offset" in done.stderr
    assert "nothing usable came before it" in done.stderr
