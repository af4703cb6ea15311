"""Artifacts for the bundle, flash and OTA tests, and tests of the health check.

``make_artifact`` writes a real artifact folder: an encoder fitted with
``flows.encoder`` on a few synthetic CIC-style flows, a tiny ONNX model
(``sigmoid(mean_t(x) @ w + b)`` with weights drawn from a seed), thresholds and a
manifest with sha256 and probe windows. The probe's expected scores, and
``numpy_scores`` for any windows, are computed here with numpy, independently of
onnxruntime and of the code under test.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from edge_agent.flash import ModelSlots  # noqa: E402
from edge_agent.ota import health_check, load_checked  # noqa: E402
from edge_agent.runtime import load_artifact  # noqa: E402
from flows.errors import ModelError  # noqa: E402

W = 4

# Synthetic training flows in the CIC family: two numeric columns and a protocol.
TRAIN = {
    "Flow Duration": [1.0, 2.0, 30.0, 4.0, 5.0, 7.0, 0.5, 12.0],
    "Tot Fwd Pkts": [1.0, 2.0, 3.0, 4.0, 100.0, 9.0, 1.0, 6.0],
    "Protocol": [6, 17, 6, 6, 1, 17, 6, 6],
}


def fit_encoder(window: int = W):
    """An encoder fitted on :data:`TRAIN`."""
    from flows.encoder import Encoder

    return Encoder.fit(TRAIN, "cic", window=window)


def conn_records(n: int, seed: int = 0, hosts: int = 3) -> list[dict]:
    """Canonical conn records (Zeek meanings) with a few source hosts."""
    from flows.record import CONN_FIELD_NAMES as names

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        rec = dict.fromkeys(names)
        orig_pkts = int(rng.integers(1, 40))
        rec.update(
            ts=1.7e9 + i,
            uid=f"C{seed}x{i}",
            src_ip=f"10.0.0.{1 + i % hosts}",
            src_port=int(rng.integers(1024, 65535)),
            dst_ip="192.0.2.10",
            dst_port=int(rng.choice([22, 53, 80, 443])),
            proto=str(rng.choice(["tcp", "udp"])),
            service=str(rng.choice(["http", "dns", "ssl"])),
            duration=float(rng.exponential(2.0)),
            orig_bytes=int(rng.integers(0, 5000)),
            resp_bytes=int(rng.integers(0, 50000)),
            orig_pkts=orig_pkts,
            resp_pkts=int(rng.integers(0, 40)),
            orig_ip_bytes=orig_pkts * 60,
            resp_ip_bytes=int(rng.integers(0, 60000)),
            conn_state=str(rng.choice(["SF", "S0", "REJ"])),
            history=str(rng.choice(["ShADadFf", "S", "Sr"])),
            missed_bytes=0,
        )
        out.append(rec)
    return out


def fit_conn_encoder(window: int = W):
    """A conn-family encoder (per source host) fitted on synthetic records."""
    from flows.encoder import Encoder

    records = conn_records(200, seed=99)
    columns = {k: [r[k] for r in records] for k in records[0]}
    return Encoder.fit(columns, "conn", window=window, group_by="src_ip")


def weights(n_features: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The tiny model's weights for ``seed``."""
    rng = np.random.default_rng(seed)
    w = rng.normal(scale=2.0, size=(n_features, 1)).astype(np.float32)
    b = np.array([rng.normal()], dtype=np.float32)
    return w, b


def numpy_scores(windows: np.ndarray, seed: int) -> np.ndarray:
    """The tiny model in float64 numpy."""
    w, b = weights(windows.shape[2], seed)
    z = np.asarray(windows, np.float64).mean(axis=1) @ w.astype(np.float64) + b
    return (1.0 / (1.0 + np.exp(-z)))[:, 0]


def onnx_model(n_features: int, window: int, seed: int) -> bytes:
    """The tiny model as ONNX bytes, input ``[batch, window, n_features]``."""
    w, b = weights(n_features, seed)
    nodes = [
        helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),
        helper.make_node("MatMul", ["m", "w"], ["z0"]),
        helper.make_node("Add", ["z0", "b"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["prob"]),
    ]
    inits = [
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
        helper.make_tensor("w", TensorProto.FLOAT, [n_features, 1], w.ravel()),
        helper.make_tensor("b", TensorProto.FLOAT, [1], b),
    ]
    x = helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["batch", window, n_features]
    )
    y = helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["batch", 1])
    graph = helper.make_graph(nodes, "tiny", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def probe_windows(enc, n: int = 5) -> np.ndarray:
    """Windows of encoded training flows, zero-padded on the left like the agent."""
    X = enc.transform(TRAIN)
    out = np.zeros((n, enc.window, enc.n_features), np.float32)
    for i in range(n):
        rows = X[max(0, i + 1 - enc.window) : i + 1]
        out[i, enc.window - len(rows) :] = rows
    return out


def conn_probe(enc, n: int = 5) -> np.ndarray:
    """Probe windows of encoded synthetic conn records (one host's history)."""
    X = enc.transform_records(conn_records(n, seed=5, hosts=1))
    out = np.zeros((n, enc.window, enc.n_features), np.float32)
    for i in range(n):
        rows = X[max(0, i + 1 - enc.window) : i + 1]
        out[i, enc.window - len(rows) :] = rows
    return out


def make_artifact(
    folder: Path,
    *,
    version: str = "tiny-0001",
    seed: int = 1,
    model_window: int | None = None,
    thresholds: dict | None = None,
    expected_shift: float = 0.0,
    encoder=None,
) -> Path:
    """Write an artifact folder that ``load_artifact`` accepts.

    ``model_window`` builds the model (and its manifest input) for another window
    than the encoder's, an artifact whose model does not match its encoder.
    ``expected_shift`` moves the probe's expected scores off the truth.
    ``encoder`` replaces the CIC-style encoder (e.g. :func:`fit_conn_encoder`).
    """
    enc = encoder if encoder is not None else fit_conn_encoder()
    mw = model_window or enc.window
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(onnx_model(enc.n_features, mw, seed))
    enc.save(folder / "encoder.json")
    thresholds = thresholds or {"decision": 0.5, "escalate_low": 0.4, "alert": 0.9}
    (folder / "thresholds.json").write_text(json.dumps(thresholds))
    if mw == enc.window:
        probe = conn_probe(enc) if enc.family == "conn" else probe_windows(enc)
    else:
        probe = np.zeros((3, mw, enc.n_features), np.float32)
    expected = numpy_scores(probe, seed) + expected_shift
    files = ["model.onnx", "encoder.json", "thresholds.json"]
    manifest = {
        "schema_version": 1,
        "target": "onnx-fp32",
        "model_file": "model.onnx",
        "size_bytes": (folder / "model.onnx").stat().st_size,
        "params": enc.n_features + 1,
        "student": "tiny-linear",
        "input": {
            "shape": [None, mw, enc.n_features],
            "dtype": "float32",
            "scale": None,
            "zero_point": None,
        },
        "output": {"dtype": "float32", "scale": None, "zero_point": None},
        "metrics": {},
        "agreement": {},
        "teacher_metrics": {},
        "sha256": {
            name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
            for name in files
        },
        "provenance": {"made_by": "tests/test_ota_artifacts.py", "seed": seed},
        "model_version": version,
        "probe": {
            "windows": probe.tolist(),
            "expected": expected.tolist(),
            "atol": 1e-5,
        },
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


# ------------------------------------------------------------------------------ tests


def test_healthy_artifact_passes(tmp_path: Path) -> None:
    folder = make_artifact(tmp_path / "a", seed=4)

    scorer = load_checked(folder)

    windows = np.random.default_rng(0).uniform(0, 1, (7, W, scorer.n_features))
    np.testing.assert_allclose(
        scorer.score(windows.astype(np.float32)), numpy_scores(windows, 4), atol=1e-6
    )
    assert health_check(scorer) < 1e-5


def test_probe_off_by_more_than_tolerance_fails(tmp_path: Path) -> None:
    folder = make_artifact(tmp_path / "a", expected_shift=0.01)
    with pytest.raises(ModelError, match="probe scores differ"):
        load_artifact(folder)  # the default load checks the probe too
    scorer = load_artifact(folder, probe=False)

    with pytest.raises(ModelError, match="probe scores differ"):
        health_check(scorer)
    assert health_check(scorer, tolerance=0.02) == pytest.approx(0.01, abs=1e-5)


def test_model_not_matching_its_encoder_fails(tmp_path: Path) -> None:
    folder = make_artifact(tmp_path / "a", model_window=W + 2)

    # The loader refuses it (edge_agent.runtime.check_encoder_fits), so every
    # install path does.
    f = fit_conn_encoder().n_features
    shapes = rf"encoder makes windows \[4, {f}\].*\[6, {f}\]"
    with pytest.raises(ModelError, match=shapes):
        load_artifact(folder)
    with pytest.raises(ModelError, match=shapes):
        load_checked(folder)


def test_an_artifact_for_other_records_than_conn_fails(tmp_path: Path) -> None:
    # Found: a signed update (and a bundle) carrying an NSL-KDD model was taken by
    # a conn-log agent, which then refused every flow. Every source gives conn
    # records, so the health check every install path runs refuses it.
    scorer = load_artifact(make_artifact(tmp_path / "a", encoder=fit_encoder()))
    with pytest.raises(ModelError, match=r"reads 'cic' flow records .* conn records"):
        health_check(scorer)
    health_check(load_artifact(make_artifact(tmp_path / "b")))  # conn: fine


def test_missing_probe_fails(tmp_path: Path) -> None:
    folder = make_artifact(tmp_path / "a")
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["probe"]
    (folder / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(ModelError, match="no probe windows"):
        health_check(load_artifact(folder))


def flashed_slots(
    models: Path, artifact: Path, issued_at: float = 1000.0
) -> ModelSlots:
    """Model slots under ``models`` whose active slot A holds ``artifact`` as model
    v1 the way flash records a bundle: the bundle's digest (not an update
    archive's sha256) and its build time."""
    slots = ModelSlots(models)
    staged = slots.staging()
    shutil.rmtree(staged)
    shutil.copytree(artifact, staged)
    slots.install("A", staged, {"model_version": "v1", "sha256": "b" * 64,
                                "issued_at": issued_at,
                                "source": "bundle gw.tar.gz"})
    slots.switch("A")
    return slots
