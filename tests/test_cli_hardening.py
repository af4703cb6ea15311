"""Command-line hardening: special outputs, symlink loops, bad configs, --help.

Each test is a regression test for a traceback or a replaced file a tester found;
none touches ``/dev``: FIFOs and symlinks are made in ``tmp_path``.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from flows.cli import main as flows_main
from flows.errors import GatewatchError, ModelError, UsageError
from tests.test_readers import ROW_A, ROW_B, zeek_text


def _conn_log(tmp_path: Path) -> Path:
    """A two-row Zeek conn.log to convert."""
    path = tmp_path / "c.log"
    path.write_text(zeek_text([ROW_A, ROW_B]))
    return path


# -- flows convert -o ------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_convert_refuses_a_fifo_output(tmp_path, capsys):
    fifo = tmp_path / "out.parquet"
    os.mkfifo(fifo)

    code = flows_main(["convert", str(_conn_log(tmp_path)), "-o", str(fifo)])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "not a regular file" in err
    assert "Traceback" not in err
    assert fifo.is_fifo()  # left as it was


def test_convert_writes_through_a_symlink(tmp_path, capsys):
    target = tmp_path / "real.parquet"
    target.write_bytes(b"old")
    link = tmp_path / "link.parquet"
    link.symlink_to(target)

    code = flows_main(
        ["convert", str(_conn_log(tmp_path)), "-o", str(link), "--force"]
    )

    assert code == 0, capsys.readouterr().err
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert target.read_bytes()[:4] == b"PAR1"


def test_convert_symlink_loops_exit_3_for_input_and_2_for_output(tmp_path, capsys):
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    a.symlink_to(b)
    b.symlink_to(a)

    code = flows_main(["convert", str(a), "-o", str(tmp_path / "x.parquet")])
    err = capsys.readouterr().err
    assert code == 3 and err.startswith("error: ") and "Traceback" not in err

    code = flows_main(["convert", str(_conn_log(tmp_path)), "-o", str(a)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err


def test_convert_write_error_exits_1(tmp_path, capsys, monkeypatch):
    import flows.readers.writers as writers

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writers.pq, "write_table", full)

    out = tmp_path / "x.parquet"
    code = flows_main(["convert", str(_conn_log(tmp_path)), "-o", str(out)])

    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and "Traceback" not in err
    assert not out.exists()


# -- compress run --out ----------------------------------------------------------------


def test_compress_out_existing_file_exits_2_up_front(tmp_path, capsys):
    from compress.cli import main as compress_main

    out = tmp_path / "file"
    out.write_text("x")

    code = compress_main(
        ["run", "--target", "onnx-fp32", "--teacher", str(tmp_path), "--out", str(out)]
    )

    err = capsys.readouterr().err
    assert code == 2 and "not a folder" in err


@pytest.mark.parametrize("argv, flag", [
    (["run", "--target", "onnx-fp32", "--teacher", "T", "--out", ""], "--out"),
    (["run", "--target", "onnx-fp32", "--teacher", " ", "--out", "A"], "--teacher"),
    (["run", "--target", "onnx-fp32", "--teacher", "T", "--out", "A",
      "--dataset", ""], "--dataset"),
    (["run", "--target", "onnx-fp32", "--teacher", "T", "--out", "A",
      "--data", ""], "--data"),
    (["eval", "--artifact", "", "--dataset", "nsl-kdd"], "--artifact"),
])
def test_compress_refuses_an_empty_path_instead_of_the_current_folder(
    argv, flag, tmp_path, monkeypatch, capsys
):
    """Found by an ML tester: ``compress run --out ""`` (an unset shell variable)
    wrote the artifact into the current folder, exit 0; ``--teacher ""`` was
    read as the current folder too."""
    from compress.cli import main as compress_main

    monkeypatch.chdir(tmp_path)

    code = compress_main(argv)

    err = capsys.readouterr().err
    assert code == 2
    assert f"argument {flag}: is empty; name " in err
    assert list(tmp_path.iterdir()) == []


# -- teacher config.json ---------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value",
    [
        ("conv_filters", [1_000_000_000]),
        ("lstm_hidden", "64"),
        ("window", True),
        ("dense", "64"),
        ("dropout", "0.3"),
        ("dropout", 1.0),
    ],
)
def test_teacher_config_refuses_bad_values_by_key(key, value):
    from teacher.model import TeacherConfig

    with pytest.raises(ModelError, match=key):
        TeacherConfig.from_dict({"n_features": 8, key: value})


def test_load_teacher_names_the_config_file(tmp_path):
    from teacher.checkpoint import load_teacher

    (tmp_path / "config.json").write_text(
        json.dumps({"n_features": 8, "conv_filters": [1_000_000_000]})
    )

    with pytest.raises(ModelError) as info:
        load_teacher(tmp_path, device="cpu")

    text = str(info.value)
    assert "config.json" in text and "conv_filters" in text


def test_teacher_config_still_accepts_a_normal_config():
    from teacher.model import TeacherConfig

    cfg = TeacherConfig.from_dict({"n_features": 8, "conv_filters": [16, 32]})
    assert cfg.conv_filters == (16, 32)
    assert TeacherConfig.from_json(cfg.to_json()) == cfg


# -- edge-agent config and alerts ------------------------------------------------------


def test_agent_binary_config_is_a_usage_error_naming_it(tmp_path):
    """A config file is settings: not UTF-8 is exit 2, as invalid TOML is."""
    from edge_agent.config import AgentConfig

    conf = tmp_path / "agent.toml"
    conf.write_bytes(b"\xff\xfe\x00\x81binary")

    with pytest.raises(UsageError) as info:
        AgentConfig.load(conf, {})

    assert f"config {conf}: byte offset 0: is not UTF-8 text" in str(info.value)
    assert info.value.exit_code == 2


def test_agent_config_wrong_type_names_the_key(tmp_path):
    from edge_agent.config import AgentConfig

    conf = tmp_path / "agent.toml"
    conf.write_text('max_batch = "x"\n')

    with pytest.raises(UsageError, match="max_batch must be an integer"):
        AgentConfig.load(conf, {})


class _FullFile:
    """A file whose every write fails as on a full disk."""

    def write(self, _text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def close(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_alert_log_turns_a_write_failure_into_one_error(tmp_path):
    from edge_agent.cli import _AlertLog

    log = _AlertLog(str(tmp_path / "alerts.jsonl"))
    log._file.close()
    log._file = _FullFile()

    with pytest.raises(GatewatchError, match="cannot write alerts to .*alerts.jsonl"):
        log.write("{}\n")
    log.close()  # never raises

    assert log.error is not None and log.error.exit_code == 1


# -- --help lists the exit codes -------------------------------------------------------


@pytest.mark.parametrize(
    "module", ["flows.cli", "teacher.cli", "compress.cli", "edge_agent.cli"]
)
def test_help_lists_exit_codes_in_plain_text(module):
    import importlib

    text = importlib.import_module(module).build_parser().format_help()

    assert "exit codes:" in text and "130  interrupted" in text
    assert "``" not in text


def test_agent_run_with_a_full_alerts_file_exits_1(data_dir, tmp_path_factory,
                                                   tmp_path, capsys, monkeypatch):
    import edge_agent.cli as cli
    from tests.test_agent_fixtures import tiny

    tm = tiny(data_dir, tmp_path_factory)
    opened = cli._AlertLog.__init__

    def full_disk(self, target):
        opened(self, target)
        self._file.close()
        self._file = _FullFile()

    monkeypatch.setattr(cli._AlertLog, "__init__", full_disk)

    alerts = tmp_path / "alerts.jsonl"
    code = cli.main(
        [
            "run", "--artifact", str(tm.artifact), "--source", f"zeek:{tm.conn_log}",
            "--site", "s1", "--gateway", "g1", "--outbox", str(tmp_path / "o.db"),
            "--alerts", str(alerts),
        ]
    )

    err = capsys.readouterr().err
    assert code == 1, err
    assert f"error: cannot write alerts to {alerts}" in err
    assert "Traceback" not in err


# -- every option says what it does and its default ---------------------------------


def _options(parser, skip=()):
    """(command path, option strings, help) of every option, subcommands included."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if name not in skip:
                    yield from ((f"{name} {p}", o, h) for p, o, h in _options(sub))
        elif not isinstance(action, argparse._HelpAction):
            yield "", action.option_strings or [action.dest], action.help


@pytest.mark.parametrize("module", ["flows.cli", "edge_agent.cli"])
def test_every_option_has_help_saying_its_default(module):
    import importlib

    parser = importlib.import_module(module).build_parser()
    options = list(_options(parser))
    assert len(options) > 5
    missing = [
        (path, opts)
        for path, opts, text in options
        if opts[0].startswith("-")
        and not (text and ("default" in text or "required" in text))
    ]
    assert missing == []
    assert all(text for _, _, text in options)  # positionals too


# -- flows: standard input, long lines, gzip bombs -------------------------------------


def _flows(args, stdin=b"", env=None):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        input=stdin,
        capture_output=True,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def test_flows_inspect_and_convert_read_stdin(tmp_path, capsys):
    log = _conn_log(tmp_path)
    code = flows_main(["inspect", "--json", str(log)])
    from_file = json.loads(capsys.readouterr().out)

    done = _flows(["inspect", "--json", "-"], stdin=log.read_bytes())
    assert done.returncode == 0, done.stderr
    assert code == 0 and json.loads(done.stdout) == from_file

    out = tmp_path / "o.parquet"
    done = _flows(["convert", "-", "-o", str(out)], stdin=log.read_bytes())
    assert done.returncode == 0, done.stderr
    from flows.readers import read

    assert read(out).table.equals(read(log).table)

    done = _flows(["inspect", "-", "-"], stdin=log.read_bytes())
    assert done.returncode == 2 and b"can be given only once" in done.stderr

    done = _flows(["inspect", "-"], stdin=b"")
    assert done.returncode == 3 and done.stderr == b"error: <stdin>: is empty\n"


@pytest.mark.parametrize(
    ("kind", "magic"),
    [("pcap", b"\xd4\xc3\xb2\xa1"), ("pcapng", b"\x0a\x0d\x0d\x0a")],
)
def test_a_capture_on_stdin_is_a_usage_error_as_documented(kind, magic):
    """``--help`` says captures need a file name; stdin gets exit 2 saying so."""
    done = _flows(["inspect", "-"], stdin=magic + bytes(60))

    assert done.returncode == 2
    assert f"a {kind} capture is not read from a pipe".encode() in done.stderr
    assert b"Traceback" not in done.stderr
    helped = b" ".join(_flows(["inspect", "--help"]).stdout.split())
    assert b"a capture needs its file name" in helped


def test_flows_inspect_long_line_exits_4_with_one_warning(tmp_path):
    from tests.test_readers import ROW_A, ROW_B, zeek_text

    text = zeek_text([ROW_A, ROW_B]).replace(
        "\t".join(ROW_B), "z" * (40 << 20) + "\n" + "\t".join(ROW_B)
    )
    path = tmp_path / "long.log"
    path.write_text(text)

    done = _flows(["inspect", "--json", str(path)])
    err = done.stderr.decode()
    assert done.returncode == 4, err
    assert json.loads(done.stdout)["rows"] == 1
    assert err.count("error:") == 1 and "Traceback" not in err
    assert f"{path}, line 10: a line of {40 << 20} bytes" in err


def test_flows_inspect_gzip_bomb_exits_4_within_the_limit(tmp_path):
    import gzip

    from tests.test_readers import ROW_A, zeek_text

    row = "\t".join(ROW_A) + "\n"
    path = tmp_path / "bomb.log.gz"
    text = zeek_text([], close=False) + row * 400_000
    path.write_bytes(gzip.compress(text.encode()))
    done = _flows(
        ["inspect", "--json", str(path)], env={"GATEWATCH_MAX_INFLATED": "4000000"}
    )
    err = done.stderr.decode()
    assert done.returncode == 4, err
    summary = json.loads(done.stdout)
    assert 0 < summary["rows"] < 400_000 and summary["partial"] is True
    notes = [w for w in summary["warnings"] if "inflated text passed 4000000" in w]
    assert len(notes) == 1 and str(path) in notes[0]


def test_convert_to_dash_is_a_usage_error_not_a_file_named_dash(tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = flows_main(["convert", str(_conn_log(tmp_path)), "-o", "-"])
    err = capsys.readouterr().err
    assert code == 2 and "-o - (standard output) is not supported" in err
    assert not (tmp_path / "-").exists()


def test_convert_refuses_the_same_input_twice(tmp_path, capsys, monkeypatch):
    log = _conn_log(tmp_path)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "x.parquet"

    code = flows_main(["convert", str(log), "./c.log", "-o", str(out)])

    err = capsys.readouterr().err
    assert code == 2
    assert "given twice" in err and "Traceback" not in err
    assert not out.exists()


def test_teacher_train_on_unlabeled_rows_says_none_is_labeled(tmp_path, capsys):
    from teacher.cli import main as teacher_main

    log = _conn_log(tmp_path)  # Zeek conn.log rows carry no label column

    code = teacher_main(["train", "--data", str(log), "--out",
                         str(tmp_path / "t"), "--quiet"])

    err = capsys.readouterr().err
    assert code == 3
    assert "none of its 2 rows has a label" in err and "Traceback" not in err


def test_converts_to_one_output_at_once_do_not_trip_over_each_other(tmp_path):
    """Found: three concurrent ``flows convert X -o same.parquet`` shared one .part
    file and one failed with "No such file or directory". (With --force: without
    it the first to finish keeps the name, see test_flows_convert_force.)"""
    import subprocess
    import sys

    from flows.readers import read

    log = _conn_log(tmp_path)
    out = tmp_path / "same.parquet"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "convert", str(log), "-o", str(out),
             "--force"],
            stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent,
        )
        for _ in range(3)
    ]
    errors = [p.communicate(timeout=300)[1].decode() for p in procs]

    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert read(out).table.equals(read(log).table)
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(
        [log.name, out.name])


def test_a_capture_skips_packet_records_not_lines():
    from flows.cli import _unit

    assert _unit("pcap") == _unit("pcapng") == "packet record(s)"
    assert _unit("zeek-tsv") == "line(s)"
