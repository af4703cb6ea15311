"""A damaged Parquet file is reported on one error line that names the file once.

Found: ``flows inspect`` and ``edge-agent run --source parquet:`` printed pyarrow's
message with its embedded newlines (``...Invalid data\\nDeserializing page header
failed.\\n)``), and ``flows`` named the file twice (``f.parquet: f.parquet: row
group 0 ...``). Row groups are counted from 1 and out of their number, as rows are
counted from 1: a tester read "row group 3" as the third, where it was the fourth.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import main as flows_main
from flows.errors import BadInputError
from flows.record import conn_schema

ROWS = 400


def _table() -> pa.Table:
    """ROWS canonical conn records with varied values."""
    n = range(ROWS)
    columns = {
        "ts": [1.6e9 + i for i in n], "uid": [f"C{i:08d}" for i in n],
        "src_ip": [f"10.0.{i // 250}.{i % 250 + 1}" for i in n],
        "src_port": [1024 + i for i in n], "dst_ip": ["192.0.2.7"] * ROWS,
        "dst_port": [443 if i % 3 else 53 for i in n],
        "proto": ["tcp" if i % 3 else "udp" for i in n],
        "service": ["ssl" if i % 3 else "dns" for i in n],
        "duration": [0.01 * i for i in n], "orig_bytes": [i * 7 for i in n],
        "resp_bytes": [i * 11 for i in n], "orig_pkts": [i % 9 for i in n],
        "resp_pkts": [i % 5 for i in n], "orig_ip_bytes": [i * 13 for i in n],
        "resp_ip_bytes": [i * 17 for i in n], "conn_state": ["SF"] * ROWS,
        "history": ["ShADadFf"] * ROWS, "missed_bytes": [0] * ROWS,
        "label": [i % 2 for i in n], "label_detail": ["x"] * ROWS,
    }
    return pa.table(columns).cast(conn_schema())


def _damaged(folder: Path, group: int) -> Path:
    """A two-row-group Parquet file whose ``group``'s first page header is
    overwritten, so that pyarrow fails on it with a message of several lines."""
    path = folder / f"flip{group}.parquet"
    pq.write_table(_table(), path, row_group_size=ROWS // 2)
    meta = pq.ParquetFile(path).metadata.row_group(group).column(0)
    start = meta.dictionary_page_offset or meta.data_page_offset
    data = bytearray(path.read_bytes())
    for i in range(start, start + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(Exception) as caught:
        pq.ParquetFile(path).read_row_group(group)
    assert "\n" in str(caught.value)  # the damage this test is about
    return path


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize(("group", "code"), [(0, 3), (1, 4)])
def test_flows_inspect_says_it_on_one_line_naming_the_file_once(tmp_path, capsys,
                                                               group, code):
    path = _damaged(tmp_path, group)

    assert flows_main(["inspect", str(path)]) == code

    err = capsys.readouterr().err
    errors = _errors(err)
    assert len(errors) == 1
    assert errors[0].startswith(
        f"error: {path}: row group {group + 1} of 2 cannot be read (")
    assert errors[0].count(path.name) == 1
    assert errors[0].endswith(")")
    # Every line on stderr is an error: or warning: line; none is a stray piece.
    assert all(ln.startswith(("error:", "warning:")) for ln in err.splitlines())


def test_flows_inspect_json_error_is_one_line(tmp_path, capsys):
    path = _damaged(tmp_path, 1)

    assert flows_main(["inspect", "--json", str(path)]) == 4

    out = json.loads(capsys.readouterr().out)
    assert out["error"].startswith(f"{path}: row group 2 of 2 cannot be read (")
    assert "\n" not in out["error"] and out["error"].count(path.name) == 1
    assert all("\n" not in w for w in out.get("warnings", []))


def test_flows_convert_says_it_on_one_line(tmp_path, capsys):
    path = _damaged(tmp_path, 0)

    assert flows_main(["convert", str(path), "-o", str(tmp_path / "o.parquet")]) == 3

    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and errors[0].count(path.name) == 1
    assert not (tmp_path / "o.parquet").exists()


def test_edge_agent_parquet_source_says_it_on_one_line(data_dir, tmp_path_factory,
                                                       tmp_path, capsys):
    from edge_agent.cli import main
    from tests.test_agent_fixtures import tiny

    tm = tiny(data_dir, tmp_path_factory)
    path = _damaged(tmp_path, 0)

    code = main(["run", "--artifact", str(tm.artifact), "--source",
                 f"parquet:{path}", "--site", "s1", "--gateway", "g1",
                 "--outbox", str(tmp_path / "o.db"), "--alerts", ""])

    err = capsys.readouterr().err
    errors = _errors(err)
    assert code == 3 and len(errors) == 1
    assert errors[0].startswith(f"error: {path}") and errors[0].endswith(")")
    assert errors[0].count(path.name) == 1
    assert all(ln.startswith(("error:", "summary:", "warning:", "WARNING"))
               for ln in err.splitlines())


@pytest.mark.parametrize(("group", "code"), [(0, 3), (1, 4)])
def test_edge_agent_names_the_damaged_row_group_and_scores_the_ones_before(
        data_dir, tmp_path_factory, tmp_path, capsys, group, code):
    """Found: the agent said "row 1: damaged after 0 rows" for a file whose second
    row group was damaged, and had scored none of the first group's rows (it read
    in batches that ran across the groups). Now each group is read in turn: the
    error names the file and the group, as ``flows`` does, and the flows of the
    groups before it are scored and sent (exit 4; exit 3 when none were)."""
    from edge_agent.cli import main
    from tests.test_agent_fixtures import tiny

    tm = tiny(data_dir, tmp_path_factory)
    path = _damaged(tmp_path, group)
    summary = tmp_path / "summary.json"

    code_got = main(["run", "--artifact", str(tm.artifact), "--source",
                     f"parquet:{path}", "--site", "s1", "--gateway", "g1",
                     "--outbox", str(tmp_path / "o.db"), "--alerts", "",
                     "--summary-json", str(summary)])

    errors = _errors(capsys.readouterr().err)
    assert code_got == code and len(errors) == 1
    assert errors[0].startswith(
        f"error: {path}: row group {group + 1} of 2 cannot be read (")
    assert "damaged after" not in errors[0] and "row 1" not in errors[0]
    flows = json.loads(summary.read_text())["flows"]
    assert flows == group * ROWS // 2
    if group:
        assert errors[0].endswith(
            f"); the {flows} flows read before it were scored and kept")


def test_one_line_collapses_breaks_and_writes_control_codes_out():
    from flows.errors import one_line

    assert one_line("a (x: limit\nDeserializing page header failed.\n)") == (
        "a (x: limit; Deserializing page header failed.)")
    assert one_line("first.\r\n  second\n") == "first. second"
    assert one_line("type: \x0e; bell \x07") == "type: \\x0e; bell \\x07"
    assert one_line(ValueError("plain")) == "plain"


def test_bad_input_errors_are_one_line_whatever_they_quote():
    exc = BadInputError("cannot be read (one\ntwo\n)", path="f.parquet", row=3)

    assert str(exc) == "f.parquet, row 3: cannot be read (one; two)"
