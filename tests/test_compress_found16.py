"""compress run: a full disk, an --out nothing can be made in, Ctrl-C at the swap.

Found by a tester: a full disk read as candidates missing the quality gate (exit
5, "best validation F1 1.0000" against a 0.99 floor); ``--out /proc/c3`` passed
the up-front check (root passes access()) and ended in a traceback after the
work; a Ctrl-C while the new artifact was put in place killed the run by signal
with the artifact replaced. The small teacher is the one tests/test_compress.py
trains.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from tests.conftest import REPO  # noqa: E402
from tests.test_compress import teacher_dir  # noqa: E402, F401 (a fixture)


def _quick(teacher: Path, out: Path, target: str = "onnx-int8") -> list[str]:
    """A ``compress run`` that exports its one student whatever it learned (a
    drop of 1 allowed: every candidate passes the gate), in seconds."""
    return ["run", "--target", target, "--teacher", str(teacher), "--out",
            str(out), "--student", "mlp", "--widths", "4", "--epochs", "1",
            "--no-prune", "--no-timing", "--max-f1-drop", "1",
            "--calibration-windows", "64", "-q"]


def _old_artifact(folder: Path, target: str = "onnx-fp32") -> dict[str, bytes]:
    """An artifact of ``target`` (as its manifest says) in ``folder``; returns its
    files' bytes, to compare after the run."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(b"old model")
    (folder / "manifest.json").write_text(json.dumps(
        {"target": target, "sha256": {"model.onnx": "0" * 64}}))
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# ------------------------------------------------------------ 1: a full disk


def test_a_full_disk_is_one_line_exit_1_not_a_gate_miss(
        teacher_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:  # noqa: F811
    import compress.pipeline as pipeline
    from compress.cli import main

    calls = []

    def full(model, path, *args, **kwargs):
        calls.append(path)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(pipeline, "export_onnx", full)
    out = tmp_path / "made" / "art"
    code = main(_quick(teacher_dir, out))

    err = capsys.readouterr().err
    assert code == 1, err
    assert err == (f"error: --out {out}: cannot write the artifact (no space left "
                   "on device); nothing was written\n")
    assert len(calls) == 1  # the first OSError stops the run
    assert not (tmp_path / "made").exists()  # the folders the run made are gone


def test_a_full_disk_keeps_the_artifact_out_held(
        teacher_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:  # noqa: F811
    import compress.pipeline as pipeline
    from compress.cli import main

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "quantize_onnx", full)
    out = tmp_path / "art"
    before = _old_artifact(out, "onnx-int8")
    code = main(_quick(teacher_dir, out))

    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith(f"error: --out {out}: cannot write the artifact (no "
                          "space left on device); the artifact it held is kept")
    assert _files(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no .search


def test_a_failed_write_elsewhere_names_that_file(tmp_path: Path) -> None:
    from compress.pipeline import write_failed

    exc = OSError(errno.ENOSPC, "No space left on device", "/tmp/x/pre.onnx")
    assert str(write_failed(tmp_path / "art", exc, "nothing was written")) == (
        f"--out {tmp_path / 'art'}: cannot write the artifact (/tmp/x/pre.onnx: no "
        "space left on device); nothing was written")


def test_the_tflite_worker_reports_a_failed_write_as_an_oserror(
        tmp_path: Path, capsys, monkeypatch) -> None:
    import compress.tflite_worker as worker
    from compress.export import _raise_write_failure

    def full(spec):
        raise OSError(errno.ENOSPC, "No space left on device", spec["out"])

    monkeypatch.setattr(worker, "convert", full)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"out": str(tmp_path / "model.tflite")}))
    assert worker.main([str(spec)]) == worker.WRITE_FAILED
    said = capsys.readouterr().out

    done = subprocess.CompletedProcess([], worker.WRITE_FAILED, said, "")
    with pytest.raises(OSError) as caught:
        _raise_write_failure(done)
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == str(tmp_path / "model.tflite")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="mounting a small tmpfs needs root and unshare")
def test_a_real_full_disk_is_exit_1(teacher_dir: Path,  # noqa: F811
                                    tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    argv = " ".join(_quick(teacher_dir, mnt / "c2"))
    # The disk is filled up first, so the first file with data in it (the ONNX
    # export) meets ENOSPC; folders and empty files take no room on a tmpfs.
    script = (f"mount -t tmpfs -o size=12k tmpfs {mnt} || exit 77; "
              f"cat /dev/zero > {mnt}/fill 2>/dev/null; "
              f"{sys.executable} -m compress.cli {argv}")
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    if done.returncode == 77:
        pytest.skip("no tmpfs could be mounted here")
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert lines == [f"error: --out {mnt / 'c2'}: cannot write the artifact (no "
                     "space left on device); nothing was written"], done.stderr
    assert "Traceback" not in done.stderr and "gate" not in done.stderr


def test_a_later_write_that_fails_is_one_line_not_a_traceback(
        teacher_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:  # noqa: F811
    import compress.pipeline as pipeline
    from compress.cli import main

    def refused(folder, fields, files):
        raise PermissionError(errno.EACCES, "Permission denied",
                              str(folder / "manifest.json"))

    monkeypatch.setattr(pipeline, "write_manifest", refused)
    out = tmp_path / "art"
    code = main(_quick(teacher_dir, out, "onnx-fp32"))

    err = capsys.readouterr().err
    assert code == 1, err
    assert err == (f"error: --out {out}: cannot write the artifact (permission "
                   "denied); nothing was written\n")


# ------------------------------------------ 1b: failures that are not the F1 rule


def test_exports_that_all_fail_say_why_not_the_f1_rule(
        teacher_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:  # noqa: F811
    import compress.pipeline as pipeline
    from compress.cli import main
    from flows.errors import ExportError

    def broken(*args, **kwargs):
        raise ExportError("onnx-fp32: torch.onnx.export failed for Linear: boom")

    monkeypatch.setattr(pipeline, "export_onnx", broken)
    code = main([*_quick(teacher_dir, tmp_path / "art", "onnx-fp32"), "--json"])

    captured = capsys.readouterr()
    # A failure (exit 1, as the help says of a failed export), not the gate (5).
    assert code == 1
    assert captured.err.splitlines()[-1] + "\n" == (
        "error: no artifact was made for onnx-fp32: every export failed (1 "
        "candidate tried; the first, mlp-4 float: onnx-fp32: torch.onnx.export "
        "failed for Linear: boom)\n")
    failed = json.loads(captured.out)["failed"]["onnx-fp32"]
    # The JSON says so too (it said "no candidate passed the gate (...)").
    assert failed == ("every export failed (1 candidate tried; the first, mlp-4 "
                      "float: onnx-fp32: torch.onnx.export failed for Linear: boom)")


def test_a_torch_int8_save_that_fails_is_a_failure_named_once(
        teacher_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:  # noqa: F811
    # Found: torch reports a full disk while saving the program as a plain
    # RuntimeError ("saving failed"); the run then said "no artifact passed the
    # gate" with exit 5, and named the target twice.
    import compress.inc as inc
    from compress.cli import main
    from flows.errors import ExportError

    def full(ctx, src, dest):
        raise ExportError("torch-int8: saving the quantized teacher failed: "
                          "PytorchStreamWriter failed writing file data/0")

    monkeypatch.setattr(inc, "torch_int8_artifact", full)
    out = tmp_path / "art"
    code = main(["run", "--target", "torch-int8", "--teacher", str(teacher_dir),
                 "--out", str(out), "--no-timing", "-q"])

    err = capsys.readouterr().err
    assert code == 1, err
    assert err.splitlines()[0] == (
        "error: no artifact was made for torch-int8: torch-int8: saving the "
        "quantized teacher failed: PytorchStreamWriter failed writing file data/0")
    assert not out.exists()


def test_the_best_f1_counts_only_candidates_measured_at_the_gate() -> None:
    from compress.pipeline import FLOAT_MISSES, Candidate, _tried

    ctx = SimpleNamespace(cfg=SimpleNamespace(gate="same"))
    rows = [Candidate("onnx-int8", "mlp", 4, float_val_f1=1.0, note="export: boom"),
            Candidate("onnx-int8", "mlp", 8, float_val_f1=0.97, val_f1=0.95),
            Candidate("onnx-int8", "cnn", 4, float_val_f1=0.9, note=FLOAT_MISSES)]
    assert _tried(ctx, rows) == ("3 candidates tried; best validation F1 0.9500; "
                                 "1 failed before the gate (first: export: boom)")


# ------------------------------------------- 2: an --out nothing can be made in


@pytest.mark.parametrize("out", ["/proc/c3", "/sys/kernel/cx"])
def test_an_out_where_nothing_can_be_made_is_exit_2_before_any_work(
        out: str, tmp_path: Path, capsys, monkeypatch) -> None:
    import compress.pipeline as pipeline
    from compress.cli import main

    parent = Path(out).parent
    if not parent.is_dir() or os.access(parent, os.W_OK) is False:
        pytest.skip(f"{parent} is not here, or access() already refuses it")
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: pytest.fail("work began"))
    code = main(["run", "--target", "onnx-fp32", "--teacher", str(tmp_path),
                 "--out", out])

    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"error: --out {out}: cannot make a folder in {parent} (")
    assert len(err.splitlines()) == 1


def test_the_probe_leaves_no_trace(tmp_path: Path) -> None:
    from compress.cli import _check_out

    _check_out(tmp_path / "new" / "art")
    _check_out(tmp_path)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------- 3: Ctrl-C while put in place

# The child: Ctrl-C as a terminal gives it; the hook named by argv[1] (a
# pipeline function) first writes READY, then waits (a Ctrl-C raised in the
# wait is raised on, as in the real call); then compress runs on argv[4:].
CHILD = """\
import signal
import sys
import time
from pathlib import Path

signal.signal(signal.SIGINT, signal.default_int_handler)
import compress.pipeline as pipeline
from compress.cli import main

name, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
real = getattr(pipeline, name)


def waiting(*args, **kwargs):
    if not ready.exists():
        ready.write_text("x")
        end = time.monotonic() + 60
        while not go.exists() and time.monotonic() < end:
            time.sleep(0.05)
    return real(*args, **kwargs)


setattr(pipeline, name, waiting)
sys.exit(main(sys.argv[4:]))
"""


def _interrupted_at(hook: str, argv: list[str], tmp_path: Path,
                    then_go: bool) -> subprocess.CompletedProcess:
    """``compress ARGV`` in a child that gets a SIGINT inside pipeline.``hook``
    (then, with ``then_go``, is let go on)."""
    ready, go = tmp_path / "ready", tmp_path / "go"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, hook, str(ready), str(go), *argv],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 240
        while not ready.exists() and child.poll() is None:
            assert time.monotonic() < end, "the child never reached the hook"
            time.sleep(0.05)
        assert child.poll() is None, child.communicate()[1]
        child.send_signal(signal.SIGINT)
        if then_go:
            time.sleep(0.3)
            go.write_text("x")
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def test_ctrl_c_while_the_artifact_is_put_in_place_finishes_the_run(
        teacher_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "art"
    before = _old_artifact(out)
    done = _interrupted_at("_move", _quick(teacher_dir, out, "onnx-fp32"),
                           tmp_path, then_go=True)

    assert done.returncode == 0, done.stderr
    assert "error:" not in done.stderr
    assert (f"note: interrupted after the artifact in {out} was written; it is "
            "complete and the run has finished") in done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sha256"]["model.onnx"] != "0" * 64
    assert _files(out) != before
    assert {p.name for p in out.iterdir()} == {"manifest.json", *manifest["sha256"]}


def test_ctrl_c_before_the_artifact_is_put_in_place_keeps_the_old_one(
        teacher_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "art"
    before = _old_artifact(out)
    done = _interrupted_at("_place", _quick(teacher_dir, out, "onnx-fp32"),
                           tmp_path, then_go=False)

    assert done.returncode == 130, done.stderr
    assert done.stderr.splitlines()[-1] == "error: interrupted"
    assert _files(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no .search


def test_a_failed_rename_part_way_puts_the_old_files_back(
        tmp_path: Path, monkeypatch) -> None:
    import compress.pipeline as pipeline

    out = tmp_path / "art"
    before = _old_artifact(out)
    src = tmp_path / "art" / ".search" / "new"
    src.mkdir(parents=True)
    (src / "model.onnx").write_bytes(b"new model")
    (src / "encoder.json").write_text("{}")
    (src / "manifest.json").write_text(json.dumps(
        {"target": "onnx-fp32", "sha256": {"model.onnx": "1" * 64,
                                           "encoder.json": "2" * 64}}))
    moves = []
    real = pipeline._move

    def fails_third(a: Path, b: Path) -> None:
        moves.append(a)
        if len(moves) == 3:
            raise OSError(errno.EIO, "Input/output error", str(b))
        real(a, b)

    monkeypatch.setattr(pipeline, "_move", fails_third)
    with pytest.raises(OSError):
        pipeline._place([(src, out)], out / ".search", None)
    assert {n: b for n, b in _files(out).items()} == before
    assert (src / "model.onnx").read_bytes() == b"new model"


def test_a_target_is_named_once_in_an_error_line() -> None:
    # Found: --target all with torch-int8's save failing said "...; torch-int8:
    # torch-int8: saving the quantized teacher failed" on the gate-missed line.
    from compress.pipeline import _named

    assert _named("torch-int8", "torch-int8: saving failed: x") == \
        "torch-int8: saving failed: x"
    assert _named("onnx-int8", "no candidate passed the gate (2 tried)") == \
        "onnx-int8: no candidate passed the gate (2 tried)"
