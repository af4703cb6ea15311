"""edge_agent.runtime: artifact checks and scoring, on tiny ONNX models built here."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from edge_agent.runtime import c_array_bytes, load_artifact  # noqa: E402
from flows.errors import BadInputError, ModelError  # noqa: E402

W, F = 4, 3
RNG = np.random.default_rng(7)
WEIGHT = RNG.normal(size=(F, 1)).astype(np.float32)
BIAS = np.array([0.25], dtype=np.float32)


def _expected(windows: np.ndarray) -> np.ndarray:
    """The tiny model's probability, computed with numpy: sigmoid(mean_t(x) @ w + b)."""
    z = windows.mean(axis=1) @ WEIGHT + BIAS
    return (1.0 / (1.0 + np.exp(-z)))[:, 0].astype(np.float32)


def _float_model() -> bytes:
    nodes = [
        helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),
        helper.make_node("MatMul", ["m", "w"], ["z0"]),
        helper.make_node("Add", ["z0", "b"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["prob"]),
    ]
    inits = [
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
        helper.make_tensor("w", TensorProto.FLOAT, [F, 1], WEIGHT.ravel()),
        helper.make_tensor("b", TensorProto.FLOAT, [1], BIAS),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", W, F])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["batch", 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


IN_SCALE, IN_ZP = 0.02, 3
OUT_SCALE, OUT_ZP = 1.0 / 256.0, -128


def _int8_model() -> bytes:
    """The same model with int8 input and output (Dequantize/Quantize at the ends)."""
    nodes = [
        helper.make_node("DequantizeLinear", ["xq", "s_in", "z_in"], ["x"]),
        helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),
        helper.make_node("MatMul", ["m", "w"], ["z0"]),
        helper.make_node("Add", ["z0", "b"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["p"]),
        helper.make_node("QuantizeLinear", ["p", "s_out", "z_out"], ["prob"]),
    ]
    inits = [
        helper.make_tensor("s_in", TensorProto.FLOAT, [], [IN_SCALE]),
        helper.make_tensor("z_in", TensorProto.INT8, [], [IN_ZP]),
        helper.make_tensor("s_out", TensorProto.FLOAT, [], [OUT_SCALE]),
        helper.make_tensor("z_out", TensorProto.INT8, [], [OUT_ZP]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
        helper.make_tensor("w", TensorProto.FLOAT, [F, 1], WEIGHT.ravel()),
        helper.make_tensor("b", TensorProto.FLOAT, [1], BIAS),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_int8",
        [helper.make_tensor_value_info("xq", TensorProto.INT8, ["batch", W, F])],
        [helper.make_tensor_value_info("prob", TensorProto.INT8, ["batch", 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def tiny_encoder(window: int = W, n_features: int = F):
    """A real encoder of ``n_features`` plain numeric fields, windows of ``window``:
    what the loader checks against the model's input."""
    from flows.encoder import Encoder, NumericField

    fields = [NumericField(f"f{i}", False, 0.0, 1.0, False) for i in range(n_features)]
    return Encoder("cic", fields, [], None, window, "stream")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_artifact(
    folder: Path,
    model: bytes,
    *,
    dtype: str = "float32",
    shape: list | None = None,
    in_q: tuple[float, int] | None = None,
    out_q: tuple[float, int] | None = None,
) -> Path:
    """An artifact folder by hand: model, encoder, thresholds, manifest with sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(model)
    tiny_encoder().save(folder / "encoder.json")
    thresholds = {"decision": 0.5, "escalate_low": 0.3, "alert": 0.8}
    (folder / "thresholds.json").write_text(json.dumps(thresholds))
    probe = RNG.normal(size=(3, W, F)).astype(np.float32)
    files = ["model.onnx", "encoder.json", "thresholds.json"]
    manifest = {
        "schema_version": 1,
        "target": "onnx-int8" if dtype == "int8" else "onnx-fp32",
        "model_file": "model.onnx",
        "model_version": "test-0001",
        "input": {
            "shape": shape or [None, W, F],
            "dtype": dtype,
            "scale": in_q[0] if in_q else None,
            "zero_point": in_q[1] if in_q else None,
        },
        "output": {
            "dtype": dtype,
            "scale": out_q[0] if out_q else None,
            "zero_point": out_q[1] if out_q else None,
            "kind": "probability",
        },
        "sha256": {name: _sha(folder / name) for name in files},
        # The float model's scores; an int8 model's differ by its rounding.
        "probe": {"windows": probe.tolist(), "expected": _expected(probe).tolist(),
                  "atol": out_q[0] + 0.01 if out_q else 1e-4},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_float_artifact_scores_match_numpy(tmp_path: Path) -> None:
    scorer = load_artifact(write_artifact(tmp_path / "a", _float_model()))
    windows = RNG.normal(size=(9, W, F)).astype(np.float32)

    got = scorer.score(windows)

    assert got.dtype == np.float32 and got.shape == (9,)
    np.testing.assert_allclose(got, _expected(windows), atol=1e-6)
    np.testing.assert_allclose(scorer.score(windows[:1]), got[:1], atol=1e-7)
    assert scorer.model_version == "test-0001"
    assert scorer.thresholds == {"decision": 0.5, "escalate_low": 0.3, "alert": 0.8}
    assert scorer.check_probe() < 1e-5
    assert scorer.score(np.zeros((0, W, F), np.float32)).shape == (0,)


def test_int8_io_is_quantized_and_dequantized(tmp_path: Path) -> None:
    folder = write_artifact(
        tmp_path / "q",
        _int8_model(),
        dtype="int8",
        in_q=(IN_SCALE, IN_ZP),
        out_q=(OUT_SCALE, OUT_ZP),
    )
    scorer = load_artifact(folder)
    windows = RNG.uniform(-2, 2, size=(16, W, F)).astype(np.float32)

    got = scorer.score(windows)

    # Input rounding moves the mean by <= IN_SCALE/2, the output step is 1/256.
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, _expected(windows), atol=OUT_SCALE + 0.01)
    assert np.all(np.abs(got * 256 - np.round(got * 256)) < 1e-4)


def test_int8_io_matches_the_arithmetic_compress_verified_with(tmp_path: Path) -> None:
    """The scorer's faster int8 path (in-place rounding and bounds, a table of the
    256 output levels' scores) gives bit for bit what the plain numpy steps give:
    x / scale rounded half to even, plus the zero point, clipped; the output level
    minus its zero point, times its scale, in float32."""
    from edge_agent.runtime import _quantize

    folder = write_artifact(
        tmp_path / "q", _int8_model(), dtype="int8",
        in_q=(IN_SCALE, IN_ZP), out_q=(OUT_SCALE, OUT_ZP),
    )
    scorer = load_artifact(folder)
    windows = np.r_[
        RNG.uniform(-4, 4, size=(200, W, F)),
        # Exact halves (rounded to even) and values far past the int8 range.
        np.full((1, W, F), 0.5 * IN_SCALE), np.full((1, W, F), 1.5 * IN_SCALE),
        np.full((1, W, F), -1e6), np.full((1, W, F), 1e6),
    ].astype(np.float32)

    want_in = np.clip(
        np.round(windows / np.float32(IN_SCALE)) + np.float32(IN_ZP), -128, 127
    ).astype(np.int8)
    np.testing.assert_array_equal(_quantize(windows, scorer.input_spec), want_in)

    raw = scorer._backend.run(want_in).reshape(-1)
    want_out = ((raw.astype(np.float32) - np.float32(OUT_ZP)) * np.float32(OUT_SCALE))
    np.testing.assert_array_equal(scorer.score(windows), want_out.astype(np.float32))
    # Every one of the 256 levels, not only those the windows reached.
    levels = np.arange(-128, 128, dtype=np.int8)
    np.testing.assert_array_equal(
        scorer._levels,
        ((levels.astype(np.float32) + np.float32(128)) * np.float32(OUT_SCALE)),
    )


def test_modified_file_is_refused(tmp_path: Path) -> None:
    folder = write_artifact(tmp_path / "a", _float_model())
    (folder / "thresholds.json").write_text('{"decision": 0.01}')

    with pytest.raises(ModelError, match="sha256 mismatch for thresholds.json"):
        load_artifact(folder)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    folder = write_artifact(tmp_path / "a", _float_model())
    (folder / "encoder.json").unlink()

    with pytest.raises(ModelError, match="encoder.json is listed in the manifest"):
        load_artifact(folder)


def test_unlisted_model_is_refused(tmp_path: Path) -> None:
    folder = write_artifact(tmp_path / "a", _float_model())
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["sha256"]["model.onnx"]
    (folder / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(ModelError, match="no sha256 for model.onnx"):
        load_artifact(folder)


def test_manifest_shape_mismatch_names_both(tmp_path: Path) -> None:
    folder = write_artifact(tmp_path / "a", _float_model(), shape=[None, W, F + 1])

    with pytest.raises(ModelError) as info:
        load_artifact(folder)

    message = str(info.value)
    assert f"expected [None, {W}, {F + 1}]" in message
    assert f"received [None, {W}, {F}]" in message


def test_manifest_dtype_mismatch_names_both(tmp_path: Path) -> None:
    folder = write_artifact(
        tmp_path / "a", _float_model(), dtype="int8", in_q=(0.1, 0), out_q=(0.1, 0)
    )

    with pytest.raises(ModelError, match="expected int8, received float32"):
        load_artifact(folder)


def test_bad_window_shape_is_bad_input(tmp_path: Path) -> None:
    scorer = load_artifact(write_artifact(tmp_path / "a", _float_model()))

    with pytest.raises(BadInputError, match=r"expected shape \[B, 4, 3\]"):
        scorer.score(np.zeros((2, W + 1, F), np.float32))


def test_probe_mismatch_is_reported(tmp_path: Path) -> None:
    folder = write_artifact(tmp_path / "a", _float_model())
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["probe"]["expected"] = [0.0, 0.0, 0.0]
    (folder / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(ModelError, match="probe scores differ"):
        load_artifact(folder).check_probe()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("zero_point", 100, "output quantization .* does not match the model's"),
        ("scale", 1 / 64, "output quantization .* does not match the model's"),
        ("kind", "logit", "probe scores differ from the manifest"),
    ],
)
def test_an_edited_manifest_output_is_caught_at_load(
    tmp_path: Path, key, value, message
):
    """Found: manifest.json is not in its own sha256 list, and an edited output
    zero point changed every score silently (an agent with no alerts at all).
    The model's own output quantization, compared at every load, refuses an
    edited scale or zero point; the probe windows refuse an edited kind."""
    folder = write_artifact(tmp_path / "q", _int8_model(), dtype="int8",
                            in_q=(IN_SCALE, IN_ZP), out_q=(OUT_SCALE, OUT_ZP))
    load_artifact(folder)  # as written: the probe passes
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["output"][key] = value
    (folder / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(ModelError, match=message):
        load_artifact(folder)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"atol": float("nan")}, "the probe's atol is nan"),
        ({"atol": 10.0}, "the probe's atol is 10.0"),
        ({"expected": [float("nan")] * 3}, "expected scores are not all finite"),
        (None, "the manifest has no probe windows"),
    ],
    ids=["atol-nan", "atol-10", "expected-nan", "no-probe"],
)
def test_a_probe_edited_to_let_anything_through_is_refused(tmp_path, edit, message):
    """Found: an output scale doubled and the probe's atol set to NaN (or 10), its
    expected scores to NaN, or the probe deleted, and the edit passed the load."""
    folder = write_artifact(tmp_path / "a", _float_model())
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["output"]["scale"] = 2.0
    if edit is None:
        del manifest["probe"]
    else:
        manifest["probe"].update(edit)
    (folder / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(ModelError, match=message):
        load_artifact(folder)


def test_a_malformed_probe_is_named_at_load(tmp_path: Path) -> None:
    folder = write_artifact(tmp_path / "a", _float_model())
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["probe"]["windows"] = [[1, 2], [3]]
    (folder / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(ModelError, match="the manifest's probe is malformed"):
        load_artifact(folder)


def test_c_array_round_trip() -> None:
    data = bytes(range(256)) * 3
    body = ", ".join(f"0x{b:02x}" for b in data)
    text = f"alignas(16) const unsigned char g_model[] = {{\n  {body}\n}};\n"

    assert c_array_bytes(text) == data


def test_runtime_imports_neither_torch_nor_tensorflow() -> None:
    code = (
        "import sys, edge_agent.runtime\n"
        "bad = [m for m in ('torch', 'tensorflow', 'teacher', 'compress') "
        "if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""
