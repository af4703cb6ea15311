"""compress: eval without torch, --qat always with an LSTM student.

``compress eval`` of an onnx-* or tflite-* artifact runs in onnxruntime or a TFLite
runtime and encodes with numpy, so it is run here in a child process where torch
cannot be imported (as on a gateway) and must print the metrics the normal path
prints; a torch-int8 artifact, which needs torch, says so in one line there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from tests.conftest import REPO  # noqa: E402

# The child: torch, scikit-learn and scipy are absent, as on a gateway install
# (every import of them fails as for a module that is not installed), then
# compress's CLI runs on the arguments given; it exits 99 if one of them got into
# sys.modules all the same.
WITHOUT_TORCH = """\
import importlib.abc
import sys


class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "sklearn", "scipy"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Absent())
from compress.cli import main

code = main(sys.argv[1:])
absent = ("torch", "sklearn", "scipy")
sys.exit(99 if any(name in sys.modules for name in absent) else code)
"""


def _without_torch(argv: list[str]) -> subprocess.CompletedProcess:
    """``compress ARGV`` in a child process where torch, scikit-learn and scipy
    cannot be imported."""
    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _artifact(tmp_path: Path, int8: bool) -> tuple[Path, Path]:
    """(a small onnx artifact with a conn encoder, the flow file it was fitted
    on), built in well under a second (no training)."""
    from flows.encoder import Encoder
    from flows.readers import read
    from flows.record import table_to_columns
    from tests.test_agent_fixtures import make_artifact
    from tests.test_compress import W, synthetic_flows

    flows = synthetic_flows(tmp_path / "flows.parquet", n=300)
    enc = Encoder.fit(table_to_columns(read(flows).table), "conn", window=W,
                      group_by="src_ip")
    folder = make_artifact(tmp_path / "artifact", enc, {
        "decision": 0.5, "escalate_low": 0.3, "alert": 0.9}, int8=int8)
    return folder, flows


def _normal(argv: list[str], capsys) -> dict:
    """The JSON metrics of ``compress ARGV`` in this process (torch importable)."""
    from compress.cli import main

    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _same_metrics(child: subprocess.CompletedProcess, normal: dict) -> None:
    """The child exited 0 and printed the normal path's metrics (all but the
    time spent scoring)."""
    assert child.returncode == 0, child.stderr
    got = json.loads(child.stdout)
    assert got.pop("scoring_s") > 0 and normal.pop("scoring_s") > 0
    assert got == normal
    assert got["n"] > 0 and got["confusion"]["tp"] + got["confusion"]["fn"] > 0


@pytest.mark.parametrize("int8", [False, True], ids=["onnx-fp32", "onnx-int8"])
def test_eval_of_an_onnx_artifact_on_a_dataset_needs_no_torch(
        int8: bool, data_dir: Path, tmp_path: Path, capsys) -> None:
    """Found: compress eval imported torch for every artifact, so an ONNX or
    TFLite artifact could not be scored on a box without torch."""
    folder, _ = _artifact(tmp_path, int8)
    argv = ["eval", "--artifact", str(folder), "--dataset", "ctu-conn",
            "--data-dir", str(data_dir), "--no-timing", "--json"]

    child = _without_torch(argv)

    normal = _normal(argv, capsys)
    assert normal["target"] == ("onnx-int8" if int8 else "onnx-fp32")
    assert normal["data"] == "ctu-conn" and normal["split"] == "test"
    _same_metrics(child, normal)


def test_eval_of_an_onnx_artifact_on_a_file_needs_no_torch(tmp_path: Path,
                                                           capsys) -> None:
    folder, flows = _artifact(tmp_path, int8=False)
    argv = ["eval", "--artifact", str(folder), "--data", str(flows),
            "--no-timing", "--json"]

    child = _without_torch(argv)

    _same_metrics(child, _normal(argv, capsys))


def test_eval_of_a_torch_int8_artifact_without_torch_says_so(tmp_path: Path):
    """A torch-int8 artifact runs in torch: without it, one error line naming
    that artifact kind (not the general "needs the full install"), exit 1."""
    folder = tmp_path / "teacher-int8"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(
        {"target": "torch-int8", "model_file": "model.pt2"}))
    flows = tmp_path / "flows.csv"
    flows.write_text("ts\n")

    child = _without_torch(["eval", "--artifact", str(folder), "--data",
                            str(flows)])

    assert child.returncode == 1, child.stderr
    assert child.stderr.splitlines() == [
        f"error: --artifact {folder} is a torch-int8 artifact, which runs in torch, "
        "and torch is not installed here; score it where torch is (pip install "
        "'gatewatch[compress]'), or score an onnx-* or tflite-* artifact, which "
        "needs no torch"]


@pytest.mark.parametrize("target", ["onnx-int8", "tflite-micro", "all"])
def test_qat_always_with_an_lstm_student_is_refused(target: str, tmp_path: Path,
                                                    capsys) -> None:
    """Found: --qat always --student lstm was taken and fine-tuned nothing (the
    LSTM has no QAT), without a word; refused as with a float target."""
    from compress.cli import main

    code = main(["run", "--target", target, "--teacher", str(tmp_path / "teacher"),
                 "--out", str(tmp_path / "out"), "--student", "lstm",
                 "--qat", "always"])

    [line] = capsys.readouterr().err.splitlines()
    assert code == 2
    assert line == ("error: --qat always does not apply to --student lstm: "
                    "quantization-aware fine-tuning exists for mlp and cnn students "
                    "only (nothing mirrors the int8 graph of an lstm); drop it, or "
                    "give --student mlp or cnn")
    assert not (tmp_path / "out").exists()


def test_the_qat_kinds_the_cli_checks_are_those_qat_fine_tunes() -> None:
    """The CLI's check reads compress.QAT_KINDS without torch; compress.qat,
    which fine-tunes, uses that very tuple."""
    pytest.importorskip("torch")
    import compress
    from compress import qat

    assert qat.QAT_KINDS is compress.QAT_KINDS == ("mlp", "cnn")


# A TFLite Micro build in a child process: it loads the model from a .tflite file
# with the arena size given and runs one window of zeros (exit 0), written here
# apart from compress.tflite_worker. Too small an arena may crash it (SIGSEGV).
MICRO_RUN = """\
import sys

import numpy as np
from tflite_micro import runtime as tflm

with open(sys.argv[1], "rb") as fh:
    interp = tflm.Interpreter.from_bytes(fh.read(), arena_size=int(sys.argv[2]))
detail = interp.get_input_details(0)
interp.set_input(np.zeros(detail["shape"], dtype=detail["dtype"]), 0)
interp.invoke()
"""


def _runs_in_micro(model: Path, arena: int) -> bool:
    """Whether TFLite Micro allocates and runs ``model`` in ``arena`` bytes."""
    done = subprocess.run([sys.executable, "-c", MICRO_RUN, str(model), str(arena)],
                          capture_output=True, timeout=60)
    return done.returncode == 0


def test_a_micro_build_states_the_tensor_arena_it_needs(tmp_path: Path) -> None:
    """Found: a tflite-micro artifact did not say how large a tensor arena it
    needs (an lstm-8 fails at 16 KB); the export measures the smallest one that
    runs and the manifest (export.arena) and model.h state it."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("tflite_micro")
    pytest.importorskip("tensorflow")
    import numpy as np

    from compress.pipeline import write_model
    from edge_agent.runtime import c_array_bytes
    from student.zoo import build_student

    torch.set_num_threads(1)
    W, F = 4, 6
    calib = np.random.default_rng(0).normal(size=(32, W, F)).astype(np.float32)
    student = build_student("cnn", F, W, width=4, seed=0).eval()

    details = write_model("tflite-micro", "cnn", student, tmp_path, calib, W, F)

    arena = details["arena"]["bytes"]
    model = tmp_path / "model.tflite"
    model.write_bytes(c_array_bytes((tmp_path / "model.cc").read_text()))
    assert isinstance(arena, int) and arena % 16 == 0
    assert _runs_in_micro(model, arena)
    assert not _runs_in_micro(model, arena - 16)
    assert "tflite-micro" in details["arena"]["measured"]
    assert f"constexpr int kGatewatchTensorArenaBytes = {arena};" in (
        tmp_path / "model.h").read_text()


@pytest.mark.parametrize(("status", "why"), [
    (3, "tflite-micro is not installed"),
    (-11, "the model does not run in TFLite Micro with 1048576 bytes"),
])
def test_an_arena_that_cannot_be_measured_is_none_with_why(status: int, why: str,
                                                           monkeypatch) -> None:
    """Without tflite-micro, or for a model that fails even in 1 MiB, no arena
    is stated, and the manifest says why; the header then has no constant."""
    pytest.importorskip("torch")
    from compress import export

    monkeypatch.setattr(export, "_arena_probe", lambda model, size, t: status)

    assert export.micro_arena(b"TFL3") == {"bytes": None, "why": why}


def test_the_arena_search_finds_the_smallest_fitting_size(monkeypatch) -> None:
    """Bisection in 16-byte steps: the first size that fits, whatever crashes
    below it (exit status -11 counts as not fitting)."""
    pytest.importorskip("torch")
    from compress import export

    def probe(model, size, timeout):
        return 0 if size >= 32_152 else (-11 if size % 64 == 0 else 1)

    monkeypatch.setattr(export, "_arena_probe", probe)

    assert export.micro_arena(b"TFL3")["bytes"] == 32_160


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_numpy_roc_auc_is_scikit_learns(seed: int) -> None:
    """teacher.metrics computes ROC AUC without scikit-learn (a gateway install
    has none): the same value as sklearn's on scores with many ties."""
    from sklearn.metrics import roc_auc_score

    from teacher.metrics import roc_auc

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=2_000)
    prob = np.round(rng.random(2_000) * 0.6 + 0.4 * y, 2)  # rounded: many ties

    assert roc_auc(y, prob) == pytest.approx(roc_auc_score(y, prob), abs=1e-12)
    assert roc_auc(y, np.where(y == 1, 0.9, 0.1)) == 1.0
    assert roc_auc(y, np.full(2_000, 0.5)) == 0.5
