"""``flows convert -o`` accepts only the suffixes it writes.

Found: only a fixed list of foreign suffixes was refused, so ``x.feather``,
``x.zip``, ``x.h5`` or ``"x.log "`` (a trailing space) silently got Parquet; and
``-o ''`` said " is a folder". Now a suffix other than .log/.labeled/.conn.log
(Zeek) or .parquet/.pq/none (Parquet) is refused without --format (exit 2),
and an empty name is called that.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.cli import main as flows_main
from flows.errors import EXIT_USAGE
from tests.test_readers import ROW_A, ROW_B, zeek_text

FOREIGN = [".feather", ".arrow", ".orc", ".avro", ".xz", ".bz2", ".zst", ".zip",
           ".xlsx", ".sqlite", ".h5", ".zeek", ".log ", ".csv"]


def _conn_log(tmp_path: Path) -> Path:
    path = tmp_path / "c.log"
    path.write_text(zeek_text([ROW_A, ROW_B]))
    return path


@pytest.mark.parametrize("suffix", FOREIGN)
def test_an_unknown_suffix_is_refused_without_format(tmp_path, capsys, suffix):
    out = tmp_path / f"x{suffix}"
    code = flows_main(["convert", str(_conn_log(tmp_path)), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert repr(suffix) in err or f"{suffix} names" in err
    assert ".parquet, .pq or no suffix" in err
    assert ".log, .labeled or .conn.log" in err
    assert not out.exists()


@pytest.mark.parametrize("suffix", [".feather", ".log "])
def test_an_unknown_suffix_is_written_with_format(tmp_path, suffix):
    out = tmp_path / f"x{suffix}"
    code = flows_main(["convert", str(_conn_log(tmp_path)), "-o", str(out),
                       "--format", "parquet"])
    assert code == 0 and out.is_file()


@pytest.mark.parametrize(
    ("name", "magic"),
    [("x.parquet", b"PAR1"), ("x.pq", b"PAR1"), ("x", b"PAR1"),
     ("x.conn.log", b"#"), ("x.labeled", b"#"), ("x.LOG", b"#")],
)
def test_the_known_suffixes_still_choose_the_format(tmp_path, name, magic):
    out = tmp_path / name
    assert flows_main(["convert", str(_conn_log(tmp_path)), "-o", str(out)]) == 0
    assert out.read_bytes().startswith(magic)


@pytest.mark.parametrize("name", ["", " "])
def test_an_empty_output_path_is_called_so(tmp_path, capsys, name):
    code = flows_main(["convert", str(_conn_log(tmp_path)), "-o", name])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "an empty output path" in err and "is a folder" not in err
