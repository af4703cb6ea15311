"""Unlabeled data given to a command that trains is bad input (exit 3) in both
``teacher train`` and ``compress run``, and their --help say so in the same words.

Found: given the same unlabeled conn.log, ``compress run --data`` exited 2 (usage)
while ``teacher train --data`` exited 3 (bad input).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import data_file
from tests.test_agent_fixtures import make_teacher, tiny

UNLABELED = "zeek-conn/android-mischief-rat01-androidtester.conn.log"
SAME_WORDS = ("data with too few labeled rows (label 0 or 1) to train or evaluate "
              "on (an unlabeled conn.log, say)")


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.fixture
def conn_teacher(data_dir, tmp_path_factory) -> Path:
    """A small untrained conn-family checkpoint."""
    tm = tiny(data_dir, tmp_path_factory)
    folder, _ = make_teacher(tm, tmp_path_factory.mktemp("t") / "teacher")
    return folder


def test_compress_run_on_unlabeled_data_exits_3(conn_teacher, data_dir, tmp_path,
                                                capsys):
    from compress.cli import main

    log = data_file(data_dir, UNLABELED)
    out = tmp_path / "art"

    code = main(["run", "--target", "onnx-int8", "--teacher", str(conn_teacher),
                 "--data", str(log), "--out", str(out), "-q"])

    errors = _errors(capsys.readouterr().err)
    assert code == 3 and len(errors) == 1
    assert errors[0].startswith(f"error: {log}: needs labeled train, val and test "
                                "rows (got 0, 0, 0); distillation and the gate need "
                                "rows labeled 0 or 1")
    assert not out.exists()


def test_teacher_train_on_the_same_data_exits_3(data_dir, tmp_path, capsys):
    from teacher.cli import main

    log = data_file(data_dir, UNLABELED)

    code = main(["train", "--data", str(log), "--out", str(tmp_path / "t"), "-q"])

    errors = _errors(capsys.readouterr().err)
    assert code == 3 and len(errors) == 1
    assert "none of its" in errors[0] and "has a label" in errors[0]


@pytest.mark.parametrize("argv", [
    ("teacher", ["train", "--help"]),
    ("compress", ["run", "--help"]),
    ("compress", ["--help"]),
])
def test_both_helps_name_unlabeled_data_as_bad_input(argv, capsys):
    import importlib

    tool, args = argv
    main = importlib.import_module(f"{tool}.cli").main
    assert main(args) == 0
    text = " ".join(capsys.readouterr().out.split())
    bad_input = text[text.index("3 bad input"):text.index("4 partial input")]
    assert SAME_WORDS in bad_input
