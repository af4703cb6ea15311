"""Quantization-aware fine-tuning: the fake-quant model, its export, the pipeline step.

* The fake-quant forward equals a numpy int8 quantize-dequantize of the same weights
  and activations (ranges from numpy min/max over the calibration windows).
* A QAT student exported to tflite-int8 is full-int8 and its logits agree with the
  fake-quant torch model: measured max |Δlogit| = 1 output step (rounding of the
  requantizations), mean 0.004 steps; the tolerance is 1 step max and 0.05 mean.
* QAT wins back part of what an activation outlier costs PTQ (accuracy measured
  with the fake-quant model, see the test's docstring for the numbers).
* In the pipeline, PTQ is made to hurt by calibrating on 8 benign windows only
  (activation ranges far too narrow: attack windows clip; measured onnx-int8
  validation F1 0.9688 against 0.9841 for the float student): ``qat="auto"`` then
  fine-tunes and records it; ``qat="off"`` never does. (QAT cannot undo clipping
  at the input, so it measured 0.9688 there too and is not kept.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchao")
pytest.importorskip("onnxruntime")

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

W, F = 6, 5


def _toy(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, W, F)).astype(np.float32)
    logit = 2.0 * x[:, :, 0].mean(axis=1) + x[:, -1, 1] - 0.5 * x[:, -2, 2]
    return x, logit.astype(np.float32)


def _trained(kind: str, epochs: int = 4):
    from student.distill import ArrayWindows, DistillConfig, distill
    from student.zoo import build_student

    torch.set_num_threads(1)
    x, logit = _toy(1200, seed=1)
    y = (logit > 0).astype(np.int64)
    model = build_student(kind, F, W, width=8, seed=0)
    distill(model, ArrayWindows(x), np.arange(1000), y, 3 * logit[:1000],
            np.arange(1000, 1200),
            DistillConfig(epochs=epochs, batch_size=64, lr=1e-2, patience=epochs))
    return model.eval(), x, logit, y


# ------------------------------------------------------------------ numpy reference


def _np_weight(w: np.ndarray) -> np.ndarray:
    """Per-output-channel symmetric int8 [-127, 127] quantize-dequantize."""
    flat = w.reshape(w.shape[0], -1).astype(np.float64)
    scale = np.abs(flat).max(axis=1) / 127.0
    q = np.clip(np.round(flat / scale[:, None]), -127, 127)
    return (q * scale[:, None]).reshape(w.shape).astype(np.float32)


def _np_qparams(a: np.ndarray) -> tuple[np.float32, int]:
    """Per-tensor affine int8 [-128, 127] scale/zero point from min/max (0 kept)."""
    lo, hi = min(float(a.min()), 0.0), max(float(a.max()), 0.0)
    scale = np.float32((hi - lo) / 255.0)
    zp = int(np.clip(-128 - np.round(lo / scale), -128, 127))
    return scale, zp


def _np_fq(a: np.ndarray, scale: np.float32, zp: int) -> np.ndarray:
    inv = np.float32(1.0) / scale
    q = np.clip(np.round(a.astype(np.float32) * inv) + zp, -128, 127)
    return ((q - zp) * scale).astype(np.float32)


def _np_mlp(weights: dict, x: np.ndarray, qp: dict | None) -> tuple:
    """The int8-simulated MLP in numpy; ``qp=None`` returns the float activations."""
    acts = {}

    def point(name: str, a: np.ndarray) -> np.ndarray:
        acts[name] = a
        return a if qp is None else _np_fq(a, *qp[name])

    h = point("input", x).reshape(len(x), -1)
    for name in ("fc1", "fc2"):
        w, b = weights[name]
        h = point(name, np.maximum(h @ _np_weight(w).T + b, 0.0))
    w, b = weights["fc"]
    return point("fc", h @ _np_weight(w).T + b)[:, 0], acts


def test_fake_quant_forward_equals_numpy_int8() -> None:
    from compress.qat import FakeQuantStudent

    model, x, _, _ = _trained("mlp", epochs=2)
    calib, test = x[:256], _toy(300, seed=7)[0]
    fq = FakeQuantStudent(model)
    fq.calibrate(calib)
    weights = {n: (getattr(model, n).weight.detach().numpy(),
                   getattr(model, n).bias.detach().numpy())
               for n in ("fc1", "fc2", "fc")}

    # Weights: per-channel symmetric int8, exactly.
    for name, (w, _) in weights.items():
        np.testing.assert_allclose(fq.quantized_weight(name).detach().numpy(),
                                   _np_weight(w), rtol=0, atol=1e-7)

    # Activation ranges: min/max of the float activations (int8 weights).
    _, acts = _np_mlp(weights, calib, None)
    qp = {n: _np_qparams(a) for n, a in acts.items()}
    for name, (scale, zp) in fq.scales().items():
        assert scale == pytest.approx(float(qp[name][0]), rel=1e-6), name
        assert zp == qp[name][1], name

    # The whole forward pass.
    want, _ = _np_mlp(weights, test, qp)
    with torch.no_grad():
        got = fq(torch.from_numpy(test)).numpy()
    # Measured max |diff| 4.8e-7 (float32 sums in another order); a rounding
    # flip anywhere would move a logit by a whole output step (0.025 here).
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)

    # With rounding off it is the plain student.
    fq.fake_quant(False)
    with torch.no_grad():
        np.testing.assert_allclose(fq(torch.from_numpy(test)).numpy(),
                                   model(torch.from_numpy(test)).numpy(), atol=1e-5)


def test_fake_quant_gradient_is_straight_through() -> None:
    from compress.qat import FakeQuantStudent

    model, x, _, _ = _trained("cnn", epochs=1)
    fq = FakeQuantStudent(model).train()
    out = fq(torch.from_numpy(x[:64]))
    out.sum().backward()
    grads = [p.grad for p in fq.student.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(float(g.abs().sum()) > 0 for g in grads)


def test_qat_recovers_part_of_what_an_activation_outlier_costs_ptq() -> None:
    """One hidden unit scaled up 300x (fc2 reads it 300x smaller: the same float
    model) takes the whole int8 range of its layer; PTQ then rounds the other units
    away. Measured on 1000 held-out windows: float 0.961, PTQ 0.669, QAT (2
    epochs, lr 3e-3) 0.717 accuracy; the fake-quant model is what the int8 file
    computes (test below), so no converter is needed here.
    """
    import copy

    from compress.qat import FakeQuantStudent, qat_finetune
    from student.distill import ArrayWindows, DistillConfig

    model, x, logit, y = _trained("mlp")
    calib = _toy(128, seed=2)[0]
    held, held_logit = _toy(1000, seed=5)
    outlier = copy.deepcopy(model)
    with torch.no_grad():
        unit = int(torch.relu(outlier.fc1(torch.from_numpy(calib).flatten(1)))
                   .mean(0).argmax())
        outlier.fc1.weight[unit] *= 300.0
        outlier.fc1.bias[unit] *= 300.0
        outlier.fc2.weight[:, unit] /= 300.0

    def accuracy(net) -> float:
        with torch.no_grad():
            z = net(torch.from_numpy(held)).numpy()
        return float(np.mean((z > 0) == (held_logit > 0)))

    ptq = FakeQuantStudent(outlier)
    ptq.calibrate(calib)
    _, qat, _ = qat_finetune(
        outlier, ArrayWindows(x), np.arange(1000), y, 3 * logit[:1000],
        np.arange(1000, 1200), calib,
        DistillConfig(epochs=2, batch_size=64, lr=3e-3, patience=2))

    assert accuracy(outlier) == pytest.approx(accuracy(model), abs=0.002)
    assert accuracy(ptq) < accuracy(model) - 0.2
    assert accuracy(qat) >= accuracy(ptq) + 0.02


# ------------------------------------------------------------------ export


def _tflite_logits(content: bytes, x: np.ndarray) -> tuple[np.ndarray, float]:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=content)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    s_in, z_in = inp["quantization"]
    s_out, z_out = out["quantization"]
    got = []
    for window in x:
        q = np.clip(np.round(window[None] / s_in) + z_in, -128, 127).astype(np.int8)
        interp.set_tensor(inp["index"], q)
        interp.invoke()
        got.append((interp.get_tensor(out["index"]).astype(np.float32) - z_out)
                   * s_out)
    return np.concatenate(got).reshape(-1), float(s_out)


@pytest.mark.parametrize("kind", ["mlp", pytest.param("cnn", marks=pytest.mark.slow)])
def test_qat_tflite_is_full_int8_and_matches_fake_quant(kind: str,
                                                        tmp_path: Path) -> None:
    from ai_edge_litert.interpreter import Interpreter

    from compress.export import check_full_int8
    from compress.pipeline import write_model
    from compress.qat import qat_finetune
    from student.distill import ArrayWindows, DistillConfig

    model, x, logit, y = _trained(kind)
    calib = _toy(128, seed=2)[0]
    student, fq, history = qat_finetune(
        model, ArrayWindows(x), np.arange(1000), y, 3 * logit[:1000],
        np.arange(1000, 1200), calib,
        DistillConfig(epochs=2, batch_size=64, lr=1e-3, patience=2))
    assert len(history) == 2

    details = write_model("tflite-int8", kind, student, tmp_path, calib, W, F)
    content = (tmp_path / "model.tflite").read_bytes()

    assert check_full_int8(content) == []
    interp = Interpreter(model_content=content)
    assert np.dtype(interp.get_input_details()[0]["dtype"]) == np.int8
    assert np.dtype(interp.get_output_details()[0]["dtype"]) == np.int8
    assert details["quantization"]["all_tensors"] == "int8/int32"
    test = _toy(256, seed=3)[0]
    got, step = _tflite_logits(content, test)
    with torch.no_grad():
        want = fq(torch.from_numpy(test)).numpy()
    diff = np.abs(got - want)
    assert diff.max() <= 1.001 * step, (diff.max(), step)
    assert diff.mean() <= 0.05 * step, (diff.mean(), step)
    # The converter chose the fake-quant model's output grid.
    assert step == pytest.approx(fq.scales()["fc"][0], rel=1e-5)


# ------------------------------------------------------------------ pipeline


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CNN-BiLSTM teacher on the synthetic flows of test_compress."""
    from teacher.checkpoint import make_provenance, save_checkpoint
    from teacher.data import prepare
    from teacher.model import TeacherConfig
    from teacher.train import TrainConfig, fit
    from tests.test_compress import synthetic_flows

    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("qat-teacher")
    data = synthetic_flows(base / "flows.parquet")
    prep = prepare(str(data), window=4, group_by="src_ip", need_split=True)
    config = TeacherConfig(n_features=prep.n_features, window=4, conv_filters=(8,),
                           lstm_hidden=8, dense=(8,), dropout=0.0)
    result = fit(prep, config, TrainConfig(epochs=6, patience=6, batch_size=64,
                                           lr=3e-3, device="cpu", amp=False))
    return save_checkpoint(
        base / "ckpt", result.model, encoder=prep.encoder, threshold=result.threshold,
        metrics={"val": result.val_metrics},
        provenance=make_provenance(str(data), prep.files, 0),
    )


def test_pipeline_runs_qat_only_when_asked_and_ptq_misses(
    teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from compress import pipeline
    from student.distill import DistillConfig

    cfg = pipeline.RunConfig(
        target="onnx-int8", teacher=teacher_dir, out=tmp_path / "out",
        student="mlp", widths=(8,), prune_ratios=(), time_latency=False,
        distill=DistillConfig(epochs=8, batch_size=64, lr=1e-2, patience=8),
        max_f1_drop=1.0, qat="off", qat_epochs=2)
    ctx = pipeline._context(cfg, lambda msg: None)
    # PTQ made to hurt: int8 ranges from 8 benign training windows only.
    benign = ctx.train[ctx.y[ctx.train] == 0][:8]
    ctx.calibration = ctx.prep.windows(benign)
    calls = []
    real = pipeline.qat_finetune
    monkeypatch.setattr(pipeline, "qat_finetune",
                        lambda *a, **k: calls.append(1) or real(*a, **k))

    rows: list = []
    ptq = pipeline._try(ctx, "onnx-int8", "mlp", 8, 0.0, tmp_path / "s1", rows)
    assert ptq is not None and ptq.passed and not ptq.qat  # the gate is wide open
    float_f1 = ptq.float_val_f1
    best_ptq = max(r.val_f1 for r in rows)
    assert best_ptq < float_f1 - 0.01, (best_ptq, float_f1)

    # A floor between the PTQ and the float F1: PTQ misses, the float student not.
    cfg.max_f1_drop = ctx.teacher_val["f1"] - (best_ptq + float_f1) / 2
    rows = []
    assert pipeline._try(ctx, "onnx-int8", "mlp", 8, 0.0, tmp_path / "s2",
                         rows) is None
    assert rows and not any(r.qat for r in rows) and not calls

    cfg.qat = "auto"
    rows = []
    found = pipeline._try(ctx, "onnx-int8", "mlp", 8, 0.0, tmp_path / "s3", rows)
    assert len(calls) == 1
    ptq_rows, qat_rows = [r for r in rows if not r.qat], [r for r in rows if r.qat]
    assert len(ptq_rows) == 2 and len(qat_rows) == 1  # two PTQ options, then QAT
    qat = qat_rows[0]
    assert qat.quant.endswith("+qat") and found in (None, qat)
    manifest = json.loads((qat.folder / "manifest.json").read_text())
    q = manifest["quantization"]
    assert q["qat"] is True and 1 <= q["epochs"] <= 2
    assert q["ptq_val_f1"] == pytest.approx(max(r.val_f1 for r in ptq_rows))
    assert q["qat_val_f1"] == pytest.approx(qat.val_f1)
    assert manifest["metrics"]["val"]["f1"] == pytest.approx(qat.val_f1)
    assert "-qat-" in manifest["model_version"]
    table = pipeline.frontier_table(rows)
    assert sum("+qat" in line for line in table.splitlines()) == 1
    # Kept only when it passes.
    assert (found is qat) == qat.passed


def test_qat_settings_are_checked(tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    from compress.cli import main
    from compress.pipeline import RunConfig
    from flows.errors import UsageError

    with pytest.raises(UsageError, match="unknown --qat 'sometimes'"):
        RunConfig(target="tflite-int8", teacher=tmp_path, out=tmp_path / "o",
                  qat="sometimes")
    with pytest.raises(UsageError, match="--qat-epochs must be >= 1"):
        RunConfig(target="tflite-int8", teacher=tmp_path, out=tmp_path / "o",
                  qat_epochs=0)
    code = main(["run", "--target", "tflite-int8", "--teacher", str(tmp_path),
                 "--out", str(tmp_path / "o"), "--qat", "sometimes"])
    assert code == 2
    assert "invalid choice: 'sometimes'" in capsys.readouterr().err


def test_lstm_students_are_refused_by_name() -> None:
    from compress.qat import FakeQuantStudent
    from flows.errors import ModelError
    from student.zoo import build_student

    with pytest.raises(ModelError, match="supports mlp, cnn students, not 'lstm'"):
        FakeQuantStudent(build_student("lstm", F, W, width=4, seed=0))
