"""Smaller findings of one round: a checkpoint config.json with the wrong keys,
``flows convert -o`` names that do not say what is written, and integers past
what a field holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.cli import main as flows_main
from flows.errors import BadInputError

# --------------------------------------------------- checkpoint config.json keys


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny untrained checkpoint, written directly."""
    import torch

    from teacher.checkpoint import save_checkpoint
    from teacher.model import TeacherConfig, TeacherNet

    torch.manual_seed(0)
    net = TeacherNet(TeacherConfig(n_features=4, conv_filters=(4,), lstm_hidden=4,
                                   dense=(4,)))
    out = tmp_path_factory.mktemp("ck") / "teacher"
    return save_checkpoint(out, net, encoder="{}", threshold={
        "threshold": 0.5, "rule": "fixed", "chosen_on": "val"})


@pytest.mark.parametrize(("config", "says"), [
    ({}, "missing key n_features (expected n_features and optionally window, "),
    ({"foo": 1}, "missing key n_features; unknown key 'foo' (expected n_features"),
    ({"n_features": 4, "windw": 2, "lstm": 3},
     "unknown keys 'lstm', 'windw' (expected n_features and optionally window"),
])
def test_a_config_with_wrong_keys_names_the_file_and_the_keys(checkpoint, tmp_path,
                                                              config, says):
    """Found: ``TeacherConfig.__init__() missing 1 required positional argument:
    'n_features'``."""
    import shutil

    from flows.errors import ModelError
    from teacher.checkpoint import load_teacher

    folder = Path(shutil.copytree(checkpoint, tmp_path / "ck"))
    (folder / "config.json").write_text(json.dumps(config))

    with pytest.raises(ModelError) as caught:
        load_teacher(folder, device="cpu")

    message = str(caught.value)
    assert message.startswith(f"{folder / 'config.json'}: not a teacher config: ")
    assert says in message
    assert "__init__" not in message and "positional" not in message


def test_teacher_eval_says_it_on_one_error_line(checkpoint, tmp_path, capsys):
    import shutil

    from teacher.cli import main

    folder = Path(shutil.copytree(checkpoint, tmp_path / "ck"))
    (folder / "config.json").write_text('{"garbage": true}')

    code = main(["eval", "--checkpoint", str(folder), "--data", "x", "-q"])

    errors = [ln for ln in capsys.readouterr().err.splitlines()
              if ln.startswith("error:")]
    assert code == 1 and errors == [
        f"error: {folder / 'config.json'}: not a teacher config: missing key "
        "n_features; unknown key 'garbage' (expected n_features and optionally "
        "window, conv_filters, kernel_size, lstm_hidden, lstm_layers, dense, "
        "dropout, members, bins, binned, subspace)"]


# ------------------------------------------------------ flows convert -o names

HEADER = (
    "#separator \\x09\n#set_separator\t,\n#empty_field\t(empty)\n#unset_field\t-\n"
    "#path\tconn\n"
    "#fields\tts\tuid\tid.orig_h\tid.orig_p\tid.resp_h\tid.resp_p\tproto\tservice\t"
    "duration\torig_bytes\tresp_bytes\tconn_state\tmissed_bytes\thistory\t"
    "orig_pkts\torig_ip_bytes\tresp_pkts\tresp_ip_bytes\n"
    "#types\ttime\tstring\taddr\tport\taddr\tport\tenum\tstring\tinterval\tcount\t"
    "count\tstring\tcount\tstring\tcount\tcount\tcount\tcount\n"
)


def _row(uid: str, orig_bytes: str = "48") -> str:
    return (f"1596790164.5\t{uid}\t10.8.0.61\t35740\t8.8.8.8\t53\tudp\tdns\t0.01\t"
            f"{orig_bytes}\t64\tSF\t0\tDd\t1\t76\t1\t92\n")


@pytest.fixture
def conn_log(tmp_path) -> Path:
    path = tmp_path / "in.conn.log"
    path.write_text(HEADER + _row("C1") + _row("C2"))
    return path


def _convert(capsys, *argv: str) -> tuple[int, str]:
    code = flows_main(["convert", *argv])
    return code, capsys.readouterr().err


def test_an_output_ending_in_a_slash_that_is_no_folder_is_refused(conn_log,
                                                                  tmp_path, capsys,
                                                                  monkeypatch):
    """Found: ``-o newdir/`` wrote a file named ``newdir``."""
    monkeypatch.chdir(tmp_path)

    code, err = _convert(capsys, str(conn_log), "-o", "newdir/")

    assert code == 2
    assert err == ("error: -o newdir/ ends in a slash, which names a folder, and "
                   "there is no such folder; -o needs a file name (such as "
                   "newdir/flows.parquet)\n")
    assert not (tmp_path / "newdir").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["in.conn.log"]


@pytest.mark.parametrize("name", ["x.csv", "x.json", "x.tsv", "x.txt", "x.log.gz"])
def test_a_suffix_of_a_format_convert_does_not_write_is_refused(conn_log, tmp_path,
                                                                capsys, name):
    """Found: ``-o x.csv`` silently wrote Parquet."""
    code, err = _convert(capsys, str(conn_log), "-o", str(tmp_path / name))

    suffix = Path(name).suffix
    assert code == 2
    assert err.startswith(f"error: -o {name}: {suffix} names ")
    assert "it writes canonical Parquet (.parquet) or a Zeek-style conn.log" in err
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize(("name", "fmt"), [("x.log", "parquet"),
                                           ("x.parquet", "zeek")])
def test_a_format_the_name_contradicts_is_refused(conn_log, tmp_path, capsys, name,
                                                  fmt):
    code, err = _convert(capsys, str(conn_log), "-o", str(tmp_path / name),
                         "--format", fmt)

    assert code == 2 and f"but --format is {fmt}" in err
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize(("name", "extra", "fmt"), [
    ("x.parquet", [], "parquet"), ("x.pq", [], "parquet"), ("plain", [], "parquet"),
    ("x.log", [], "zeek"), ("x.conn.log.labeled", [], "zeek"),
    ("x.txt", ["--format", "zeek"], "zeek"),
])
def test_the_written_format_is_the_one_the_name_or_flag_says(conn_log, tmp_path,
                                                             capsys, name, extra,
                                                             fmt):
    out = tmp_path / name

    code, err = _convert(capsys, str(conn_log), "-o", str(out), *extra)

    assert code == 0 and f"-> {fmt})" in err
    if fmt == "parquet":
        assert pq.read_table(out).num_rows == 2
    else:
        assert out.read_text().startswith("#separator")


# ------------------------------------------------- integers past a field's range


def test_an_integer_past_int64_is_called_out_of_range(tmp_path, capsys):
    """Found: ``99999999999999999999999`` was "expected an integer"."""
    from flows.readers import iter_records, read

    path = tmp_path / "big.log"
    path.write_text(HEADER + _row("C1") + _row("C2", "99999999999999999999999"))
    want = ("integer out of range, found '99999999999999999999999': the field "
            "holds at most 9223372036854775807")

    with pytest.raises(BadInputError) as whole:  # the batch reader
        read(path)
    with pytest.raises(BadInputError) as streamed:  # line by line (the agent's)
        list(iter_records(path))

    for caught in (whole, streamed):
        assert str(caught.value) == f"{path}, line 9, column 'orig_bytes': {want}"

    assert flows_main(["inspect", str(path)]) == 4
    assert capsys.readouterr().err.endswith(
        f"error: {path}, line 9, column 'orig_bytes': {want}\n")


@pytest.mark.parametrize(("text", "kind", "hex_ok", "says"), [
    ("-99999999999999999999999", "i64", False,
     "integer out of range, found '-99999999999999999999999': the field holds at "
     "least -9223372036854775808"),
    ("300", "i8", False,
     "integer out of range, found '300': the field holds at most 127"),
    ("0x1ffffffffffffffff", "i64", True, "integer out of range, found "
     "'0x1ffffffffffffffff': the field holds at most 9223372036854775807"),
    ("1e999", "f64", False, "number out of range, found '1e999': a 64-bit float "
     "holds at most about 1.8e308"),
    ("abc", "i64", False, "expected an integer, found 'abc'"),
    ("inf", "f64", False, "expected a number, found 'inf'"),
    ("3.5", "i64", False, "expected an integer, found '3.5'"),
])
def test_parse_problem_says_why(text, kind, hex_ok, says):
    from flows.readers._convert import _parse_one, parse_problem

    assert _parse_one(text, kind, hex_ok) is None
    assert parse_problem(text, kind, hex_ok) == says
