"""SIGTERM stops `teacher` and `compress` as a Ctrl-C does, saying so (exit 143).

Found (session 16's leftovers): both commands ended by the signal itself, with no
line saying why and, during `teacher train`'s write, a half-made checkpoint folder
left beside --out. A service manager or job scheduler stops jobs with SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_compress import teacher_dir  # noqa: F401 (a fixture)
from tests.test_teacher_cli import TINY_TRAIN

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def caught_sigterm():
    """A SIGTERM handler that only records the signal (so that a command that
    does not handle SIGTERM fails the test instead of killing the test run);
    yields the record, and puts the handler before back after the test."""
    got: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    yield got
    signal.signal(signal.SIGTERM, previous)


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_teacher_train_stopped_by_sigterm_says_so_and_leaves_nothing(
        slices, tmp_path):
    # The signal comes while the checkpoint is being written (after the weights,
    # before the rest): the command's own clean-up must run.
    script = (
        "import os, signal, sys\n"
        "import teacher.checkpoint as ck\n"
        "real = ck.save_checkpoint\n"
        "def save(folder, *a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    real(folder, *a, **k)\n"
        "ck.save_checkpoint = save\n"
        "import teacher.cli as cli\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    out = tmp_path / "teacher"
    done = _run(script, "train", "--data", str(slices[0]), "--out", str(out),
                *TINY_TRAIN, cwd=tmp_path)

    assert done.returncode == 143, done.stderr[-2000:]
    assert done.stderr.splitlines()[-1] == "error: stopped by SIGTERM"
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no temporary folder


def test_sigterm_once_the_checkpoint_is_in_place_is_noted(
        slices, tmp_path, capsys, monkeypatch, caught_sigterm):
    from teacher.cli import main

    monkeypatch.setattr("teacher.cli._warn_small_splits",
                        lambda prep: os.kill(os.getpid(), signal.SIGTERM))
    out = tmp_path / "teacher"
    capsys.readouterr()

    code = main(["train", "--data", str(slices[0]), "--out", str(out), *TINY_TRAIN])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["checkpoint"] == str(out)
    assert captured.err == (f"note: stopped by SIGTERM after the checkpoint {out} "
                            "was written; it is complete and the run has finished\n")
    # The command handled it, and SIGTERM is as it was once it has returned.
    assert caught_sigterm == []
    os.kill(os.getpid(), signal.SIGTERM)
    assert caught_sigterm == [signal.SIGTERM]


def test_compress_run_stopped_by_sigterm_keeps_the_old_artifact(
        teacher_dir, tmp_path):  # noqa: F811
    out = tmp_path / "art"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"old model")
    (out / "manifest.json").write_text(json.dumps(
        {"target": "onnx-fp32", "sha256": {"model.onnx": "0" * 64}}))
    script = (
        "import os, signal, sys\n"
        "import compress.pipeline as p\n"
        "def stop(*a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    raise AssertionError('the stop did not land')\n"
        "p.export_onnx = stop\n"
        "from compress.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    done = _run(script, "run", "--target", "onnx-fp32", "--teacher",
                str(teacher_dir), "--out", str(out), "--student", "mlp",
                "--widths", "4", "--epochs", "1", "--no-prune", "--no-timing",
                "--max-f1-drop", "1", "--calibration-windows", "64", "-q",
                cwd=tmp_path)

    assert done.returncode == 143, done.stderr[-2000:]
    assert done.stderr.splitlines()[-1] == "error: stopped by SIGTERM"
    assert (out / "model.onnx").read_bytes() == b"old model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_a_sigterm_while_torch_loads_is_held_then_stops_with_a_line(
        slices, tmp_path):
    # Found: SIGTERM in teacher's first second (torch loading in _setup, before
    # the SIGTERM handler was set) ended it by the signal, no line (rc -15).
    script = (
        "import contextlib, os, signal, sys\n"
        "import teacher.cli as cli\n"
        "real = cli.held\n"
        "@contextlib.contextmanager\n"
        "def held():\n"
        "    with real():\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        yield\n"
        "cli.held = held\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    out = tmp_path / "teacher"
    done = _run(script, "train", "--data", str(slices[0]), "--out", str(out),
                *TINY_TRAIN, cwd=tmp_path)

    assert (done.returncode, done.stderr) == (143, "error: stopped by SIGTERM\n")
    assert list(tmp_path.iterdir()) == []


def test_deferred_holds_a_stop_until_the_clean_up_is_done(caught_sigterm):
    from flows.stops import Terminated, deferred, sigterm_stops

    removed = []
    with pytest.raises(Terminated), sigterm_stops(), deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a second one: the same stop
        removed.append("the folder")  # the clean-up step went on to its end
    assert removed == ["the folder"]
    with pytest.raises(KeyboardInterrupt), deferred():
        signal.raise_signal(signal.SIGINT)
        removed.append("another")
    assert removed == ["the folder", "another"]
    assert caught_sigterm == []  # our handler was never left in place wrongly


def test_once_a_command_line_stops_further_stops_are_only_noted(caught_sigterm):
    # Found: two SIGTERMs (or a Ctrl-C, then a SIGTERM) ended the process by the
    # signal while it reported the first stop (rc -15 after the error line).
    from flows.stops import sigterm_stops

    before = {n: signal.getsignal(n) for n in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(KeyboardInterrupt), sigterm_stops(exiting=True):
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)  # neither ends the process now
        os.kill(os.getpid(), signal.SIGINT)
        assert caught_sigterm == []
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)

    # A library caller's run (exiting false) gets its handlers back as they were.
    with pytest.raises(KeyboardInterrupt), sigterm_stops():
        raise KeyboardInterrupt
    os.kill(os.getpid(), signal.SIGTERM)
    assert caught_sigterm == [signal.SIGTERM]


def test_a_stop_while_the_old_checkpoint_is_removed_leaves_no_folder(
        slices, tmp_path, capsys, monkeypatch, caught_sigterm):
    # Found: a second stop interrupted the removal of the replaced checkpoint and
    # left a hidden ".teacher.XXXX.old" folder beside --out for good.
    import shutil

    from teacher.cli import main

    out = tmp_path / "teacher"
    assert main(["train", "--data", str(slices[0]), "--out", str(out),
                 *TINY_TRAIN]) == 0
    real = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if str(path).endswith(".old"):
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(path, *args, **kwargs)

    monkeypatch.setattr("teacher.cli.shutil.rmtree", rmtree)
    capsys.readouterr()
    code = main(["train", "--data", str(slices[0]), "--out", str(out), "--force",
                 *TINY_TRAIN])

    err = capsys.readouterr().err
    assert code == 0, err
    assert err == (f"note: stopped by SIGTERM after the checkpoint {out} was "
                   "written; it is complete and the run has finished\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher"]
