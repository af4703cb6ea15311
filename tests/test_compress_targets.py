"""Every export target: the file loads in its runtime and agrees with the float student.

A student is trained here for a couple of seconds on windows whose label is a known
function of the inputs; each target's file is then loaded with
``edge_agent.runtime.load_artifact`` and scored. Tolerances (max |Δprobability| over
256 windows; decision agreement at 0.5):

* fp32 targets (onnx-fp32, tflite-fp32): |Δp| <= 1e-5;
* int8 targets (onnx-int8, tflite-int8, tflite-micro): mean |Δp| <= 0.01, max
  |Δp| <= 0.25 (measured: mean 0.003-0.004, max 0.02-0.18, the max at windows near
  0.5 where the sigmoid is steepest) and agreement >= 0.97 (measured >= 0.996).
* one window alone scores as inside a batch to 1e-4, except the dynamically
  quantized LSTM (onnxruntime picks activation scales per batch): 0.05.

TFLite conversions run in a child process (compress.tflite_worker) and take 5-40 s
each on a loaded 2-core machine: the CNN covers every target in the default run, the
other students' TFLite conversions are marked slow.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("ai_edge_litert")

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

W, F = 6, 5
FP32_TOL = 1e-5
INT8_MEAN_TOL = 0.01
INT8_MAX_TOL = 0.25
INT8_AGREE = 0.97


def _toy(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, W, F)).astype(np.float32)
    logit = 2.0 * x[:, :, 0].mean(axis=1) + x[:, -1, 1] - 0.5 * x[:, -2, 2]
    return x, logit.astype(np.float32)


_TRAINED: dict[str, torch.nn.Module] = {}


def _student(kind: str) -> torch.nn.Module:
    """A student of ``kind`` trained on the toy task (memoized per module)."""
    from student.distill import ArrayWindows, DistillConfig, distill
    from student.zoo import build_student

    if kind not in _TRAINED:
        torch.set_num_threads(1)
        x, logit = _toy(1200, seed=1)
        y = (logit > 0).astype(np.int64)
        train, val = np.arange(1000), np.arange(1000, 1200)
        model = build_student(kind, F, W, width=8, seed=0)
        distill(model, ArrayWindows(x), train, y, 3 * logit[train], val,
                DistillConfig(epochs=6, batch_size=64, lr=1e-2, patience=6))
        _TRAINED[kind] = model.eval()
    return _TRAINED[kind]


_EXPORTS: dict[tuple[str, str], tuple] = {}


def _export(target: str, kind: str, base: Path):
    """Export once per (kind, target) in this module; later calls reuse it."""
    if (kind, target) not in _EXPORTS:
        folder = base / f"{kind}-{target}"
        _EXPORTS[(kind, target)] = (folder, *_make(target, kind, folder))
    return _EXPORTS[(kind, target)]


def _make(target: str, kind: str, folder: Path):
    from compress.artifact import write_manifest, write_thresholds
    from compress.pipeline import MODEL_FILES, io_specs, write_model
    from edge_agent.runtime import load_artifact
    from flows.encoder import Encoder, NumericField

    folder.mkdir(parents=True)
    calib, _ = _toy(128, seed=2)
    details = write_model(target, kind, _student(kind), folder, calib, W, F)
    # The loader checks the encoder's windows against the model's input.
    fields = [NumericField(f"f{i}", False, 0.0, 1.0, False) for i in range(F)]
    Encoder("cic", fields, [], None, W, "stream").save(folder / "encoder.json")
    write_thresholds(folder, 0.5, 0.4, 0.6)
    inp, out = io_specs(folder, target, W, F)
    fields = {"target": target, "model_file": MODEL_FILES[target][0],
              "input": inp, "output": out}
    if target == "tflite-micro":
        fields["size_bytes"] = details["flatbuffer_bytes"]
    write_manifest(folder, fields, [*MODEL_FILES[target], "encoder.json",
                                    "thresholds.json"])
    # No probe in this manifest: the pipeline makes it from this very load.
    return load_artifact(
        folder, prefer_micro=target == "tflite-micro", probe=False
    ), details


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for every export of this module."""
    return tmp_path_factory.mktemp("exports")


SLOW = pytest.mark.slow
CASES = [
    ("cnn", "onnx-fp32"), ("cnn", "onnx-int8"), ("cnn", "tflite-fp32"),
    ("cnn", "tflite-int8"), ("cnn", "tflite-micro"),
    ("mlp", "onnx-fp32"), ("mlp", "onnx-int8"),
    ("lstm", "onnx-fp32"), ("lstm", "onnx-int8"),
    pytest.param("mlp", "tflite-int8", marks=SLOW),
    pytest.param("lstm", "tflite-int8", marks=SLOW),
    pytest.param("mlp", "tflite-fp32", marks=SLOW),
    pytest.param("mlp", "tflite-micro", marks=SLOW),
    pytest.param("lstm", "tflite-fp32", marks=SLOW),
    pytest.param("lstm", "tflite-micro", marks=SLOW),
]


@pytest.mark.parametrize(("kind", "target"), CASES)
def test_target_agrees_with_float_student(kind: str, target: str,
                                          exports: Path) -> None:
    _, scorer, details = _export(target, kind, exports)
    x, _ = _toy(256, seed=3)
    with torch.inference_mode():
        want = torch.sigmoid(_student(kind)(torch.from_numpy(x))).numpy()

    got = scorer.score(x)

    diff = np.abs(got - want)
    agree = np.mean((got >= 0.5) == (want >= 0.5))
    if target.endswith("fp32"):
        assert diff.max() <= FP32_TOL, diff.max()
        assert scorer.input_spec.dtype == "float32"
    else:
        assert diff.mean() <= INT8_MEAN_TOL, diff.mean()
        assert diff.max() <= INT8_MAX_TOL, diff.max()
        assert agree >= INT8_AGREE, agree
    if target == "tflite-micro":
        try:
            import tflite_micro  # noqa: F401
        except ImportError:
            assert scorer._backend.name == "ai-edge-litert"
        else:  # scored in the TFLite Micro interpreter itself
            assert scorer._backend.name == "tflite-micro"
    if target in ("tflite-int8", "tflite-micro"):
        assert scorer.input_spec.dtype == "int8"
        assert scorer.output_spec.dtype == "int8"
        assert details["quantization"]["all_tensors"] == "int8/int32"
    # A single window scores like the same window inside a batch.
    dynamic = details.get("quantization", {}).get("mode") == "dynamic"
    one = np.array([scorer.score(x[i : i + 1])[0] for i in range(8)])
    np.testing.assert_allclose(one, got[:8], atol=0.05 if dynamic else 1e-4)


def test_full_int8_check_finds_float_tensors(exports: Path) -> None:
    from compress.export import check_full_int8

    folder, scorer, _ = _export("tflite-fp32", "cnn", exports)
    content = (folder / "model.tflite").read_bytes()

    bad = check_full_int8(content)

    assert scorer.input_spec.dtype == "float32"
    assert bad and all(name.endswith(":float32") for name in bad)


def test_micro_build_lists_resolver_ops(exports: Path) -> None:
    from edge_agent.runtime import c_array_bytes

    folder, scorer, details = _export("tflite-micro", "cnn", exports)
    header = (folder / "model.h").read_text()
    content = c_array_bytes((folder / "model.cc").read_text())

    assert len(content) == details["flatbuffer_bytes"]
    assert content[4:8] == b"TFL3"  # the flatbuffer file identifier
    assert "resolver.AddConv2D();" in header
    assert "resolver.AddFullyConnected();" in header
    assert f"MicroMutableOpResolver<{len(details['ops'])}>" in header


def test_converter_crash_is_export_error(tmp_path: Path, monkeypatch) -> None:
    """A child that dies by a signal becomes an ExportError naming target and layers."""
    from compress import export
    from flows.errors import ExportError

    def crash(*args, **kwargs):
        import subprocess

        return subprocess.CompletedProcess(args, -11, "", "Fatal Python error")

    monkeypatch.setattr(export.subprocess, "run", crash)
    calib, _ = _toy(16, seed=4)
    with pytest.raises(ExportError) as info:
        export.export_tflite(_student("lstm"), "lstm", tmp_path / "m.tflite", calib,
                             int8=True, window=W, n_features=F)
    message = str(info.value)
    assert message.startswith(
        "tflite-int8: the TFLite converter crashed with signal 11")
    assert "LSTM" in message


def test_tflite_export_to_a_relative_path(tmp_path: Path, monkeypatch) -> None:
    """The converter child runs elsewhere; a relative output path still lands here."""
    from compress import export

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel").mkdir()
    calib, _ = _toy(32, seed=5)

    export.export_tflite(_student("mlp"), "mlp", Path("rel") / "m.tflite", calib,
                         int8=False, window=W, n_features=F)

    assert (tmp_path / "rel" / "m.tflite").stat().st_size > 0


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_calibration_prints_nothing_on_stdout(
    tmp_path: Path, capfd, method: str
) -> None:
    """Found: onnxruntime's histogram calibrators print their settings on stdout,
    which broke ``compress run --json`` when the search reached them."""
    from compress.export import export_onnx, quantize_onnx

    fp32 = export_onnx(_student("mlp"), tmp_path / "fp32.onnx", W, F, "logit")
    calib, _ = _toy(64, seed=3)
    capfd.readouterr()

    quantize_onnx(fp32, tmp_path / "int8.onnx", calib, quant_format="qdq",
                  method=method)

    assert capfd.readouterr().out == ""
    assert (tmp_path / "int8.onnx").stat().st_size > 0
