"""Shared helpers of the agent and re-scorer tests (no tests of its own).

``make_artifact`` writes a real artifact folder: an encoder fitted on a real conn.log,
a tiny ONNX model (``sigmoid(mean_t(x) @ w + b)``, float or int8 input) and a manifest
with sha256, loadable by :func:`edge_agent.runtime.load_artifact`. ``numpy_scores``
computes the same scores independently (own windowing, own arithmetic) so tests can
predict the agent's decisions. ``TinyTeacher`` is a torch stand-in for the re-scorer.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict, deque
from pathlib import Path

import numpy as np

CTU_NORMAL = "zeek-conn/ctu50-normal-40-day1.conn.log.labeled"
W = 8


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fit_encoder(conn_log: Path, window: int = W):
    """An encoder fitted on a real conn.log (family conn, per source host)."""
    from flows.encoder import Encoder
    from flows.readers import read
    from flows.record import table_to_columns

    cols = table_to_columns(read(conn_log).table)
    return Encoder.fit(cols, "conn", window=window, group_by="src_ip")


def _weights(n_features: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(scale=2.0, size=(n_features, 1)).astype(np.float32), np.array(
        [-1.0], dtype=np.float32
    )


def onnx_model(
    n_features: int,
    window: int = W,
    int8: bool = False,
    in_q: tuple[float, int] = (1.0 / 127.0, 0),
) -> bytes:
    """The tiny model as ONNX bytes (int8 input via DequantizeLinear when asked)."""
    import onnx
    from onnx import TensorProto, helper

    w, b = _weights(n_features)
    nodes = []
    inits = [
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
        helper.make_tensor("w", TensorProto.FLOAT, [n_features, 1], w.ravel()),
        helper.make_tensor("b", TensorProto.FLOAT, [1], b),
    ]
    x_name, x_type = "x", TensorProto.FLOAT
    if int8:
        nodes.append(
            helper.make_node("DequantizeLinear", ["xq", "s_in", "z_in"], ["x"])
        )
        inits += [
            helper.make_tensor("s_in", TensorProto.FLOAT, [], [in_q[0]]),
            helper.make_tensor("z_in", TensorProto.INT8, [], [in_q[1]]),
        ]
        x_name, x_type = "xq", TensorProto.INT8
    nodes += [
        helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),
        helper.make_node("MatMul", ["m", "w"], ["z0"]),
        helper.make_node("Add", ["z0", "b"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["prob"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info(x_name, x_type, ["batch", window, n_features])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["batch", 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def numpy_model(windows: np.ndarray) -> np.ndarray:
    """The tiny float model, in numpy."""
    w, b = _weights(windows.shape[2])
    z = windows.astype(np.float64).mean(axis=1) @ w.astype(np.float64) + b
    return (1.0 / (1.0 + np.exp(-z)))[:, 0]


def numpy_windows(records: list[dict], enc, window: int = W) -> np.ndarray:
    """Windows per source host in arrival order, built here without StreamWindower."""
    X = enc.transform_records(records)
    hist: dict = defaultdict(lambda: deque(maxlen=window))
    out = np.zeros((len(records), window, X.shape[1]), dtype=np.float32)
    for i, rec in enumerate(records):
        h = hist[rec["src_ip"]]
        h.append(X[i])
        rows = list(h)
        out[i, window - len(rows) :] = rows
    return out


def numpy_scores(records: list[dict], enc) -> tuple[np.ndarray, np.ndarray]:
    """(windows, float scores) the agent should compute for these records."""
    windows = numpy_windows(records, enc)
    return windows, numpy_model(windows)


def read_records(conn_log: Path) -> list[dict]:
    """Canonical records of a conn.log, through the project's streaming reader."""
    from edge_agent.sources import iter_conn

    return list(iter_conn(conn_log))


def make_artifact(
    folder: Path,
    enc,
    thresholds: dict,
    *,
    int8: bool = False,
    version: str = "tiny-0001",
) -> Path:
    """Write an artifact folder the runtime loads (sha256 checked)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(onnx_model(enc.n_features, enc.window, int8))
    probe = np.random.default_rng(5).uniform(
        0, 1, (4, enc.window, enc.n_features)
    ).astype(np.float32)
    enc.save(folder / "encoder.json")
    (folder / "thresholds.json").write_text(json.dumps(thresholds))
    files = ["model.onnx", "encoder.json", "thresholds.json"]
    manifest = {
        "schema_version": 1,
        "target": "onnx-int8" if int8 else "onnx-fp32",
        "model_file": "model.onnx",
        "model_version": version,
        "input": {
            "shape": [None, enc.window, enc.n_features],
            "dtype": "int8" if int8 else "float32",
            "scale": 1.0 / 127.0 if int8 else None,
            "zero_point": 0 if int8 else None,
        },
        "output": {
            "dtype": "float32",
            "scale": None,
            "zero_point": None,
            "kind": "probability",
        },
        "sha256": {name: _sha(folder / name) for name in files},
        # What compress writes: windows the runtime scores at every load.
        "probe": {
            "windows": probe.tolist(),
            "expected": numpy_model(probe).tolist(),
            "atol": 0.02 if int8 else 1e-4,
        },
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def quantile_thresholds(
    scores: np.ndarray, esc_q: float = 0.97, alert_q: float = 0.995
) -> dict:
    """Thresholds placed between observed scores, so no score sits on a boundary."""
    s = np.sort(np.unique(scores))

    def between(q: float) -> float:
        i = int(np.searchsorted(s, np.quantile(scores, q)))
        i = min(max(i, 1), len(s) - 1)
        return float((s[i - 1] + s[i]) / 2)

    lo, hi = between(esc_q), between(alert_q)
    return {"decision": lo, "escalate_low": lo, "alert": hi}


class TinyTeacher:
    """A torch stand-in for teacher.checkpoint's Teacher: same score as the student."""

    def __init__(self, enc, threshold: float, version: str = "teacher-tiny") -> None:
        import torch

        w, b = _weights(enc.n_features)
        self.encoder = enc
        self.threshold = threshold
        self.version = version
        self.config = {"window": enc.window, "n_features": enc.n_features}
        self.model = torch.nn.Linear(enc.n_features, 1)
        with torch.no_grad():
            self.model.weight.copy_(torch.from_numpy(w.T))
            self.model.bias.copy_(torch.from_numpy(b))
        self.batches: list[int] = []

    def predict_proba(self, windows: np.ndarray) -> np.ndarray:
        """sigmoid(mean_t(x) @ w + b) with torch."""
        import torch

        self.batches.append(len(windows))
        with torch.no_grad():
            x = torch.from_numpy(np.asarray(windows, dtype=np.float32)).mean(dim=1)
            return torch.sigmoid(self.model(x))[:, 0].numpy()


class Tiny:
    """Everything a test needs about the tiny model on one real conn.log."""

    def __init__(self, conn_log: Path, folder: Path) -> None:
        self.conn_log = conn_log
        self.encoder = fit_encoder(conn_log)
        self.records = read_records(conn_log)
        self.windows, self.scores = numpy_scores(self.records, self.encoder)
        self.thresholds = quantile_thresholds(self.scores)
        self.artifact = make_artifact(
            folder / "artifact", self.encoder, self.thresholds
        )

    def expected(
        self, records: list[dict] | None = None, site: str = "s1", gateway: str = "g1"
    ) -> dict[str, str]:
        """{escalation id: decision} the agent must produce for these records."""
        from edge_agent.agent import flow_id

        records = self.records if records is None else records
        _, scores = numpy_scores(records, self.encoder)
        lo, hi = self.thresholds["escalate_low"], self.thresholds["alert"]
        out = {}
        for rec, s in zip(records, scores, strict=True):
            if s >= lo:
                out[flow_id(site, gateway, rec)] = "alert" if s >= hi else "escalate"
        return out


_TINY: dict[Path, Tiny] = {}


def tiny(data_dir: Path, tmp_path_factory) -> Tiny:
    """One Tiny per session (fitting and reading take a second)."""
    from tests.conftest import data_file

    path = data_file(data_dir, CTU_NORMAL)
    if path not in _TINY:
        _TINY[path] = Tiny(path, tmp_path_factory.mktemp("tiny"))
    return _TINY[path]


def make_teacher(tm: Tiny, folder: Path):
    """A real (small, untrained) CNN-BiLSTM checkpoint and the loaded Teacher.

    The threshold is the median teacher score of the escalated windows, so both
    verdicts occur.
    """
    import torch

    from teacher.checkpoint import load_teacher, save_checkpoint
    from teacher.model import TeacherConfig, TeacherNet

    if (folder / "model.safetensors").is_file():
        return folder, load_teacher(folder, device="cpu")
    torch.manual_seed(0)
    enc = tm.encoder
    net = TeacherNet(
        TeacherConfig(
            n_features=enc.n_features,
            window=enc.window,
            conv_filters=(8,),
            lstm_hidden=8,
            dense=(8,),
        )
    )
    net.eval()
    esc = tm.windows[tm.scores >= tm.thresholds["escalate_low"]]
    with torch.no_grad():
        z = net(torch.from_numpy(esc)).numpy().astype(np.float64)
    threshold = float(np.median(1 / (1 + np.exp(-z))))
    save_checkpoint(
        folder,
        net,
        encoder=enc,
        threshold={"threshold": threshold, "rule": "fpr", "chosen_on": "val"},
    )
    return folder, load_teacher(folder, device="cpu")
