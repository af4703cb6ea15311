"""compress.inc: Neural Compressor PT2E int8 of a small teacher, against its fp32."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("neural_compressor")

W, F = 4, 6


def fit_tiny_teacher(x: np.ndarray, y: np.ndarray):
    """A small CNN-BiLSTM trained 30 full-batch steps on the first 400 windows of
    ``x`` (``[n, W, F]``), so that its scores mean something; in eval mode."""
    from teacher.model import TeacherConfig, TeacherNet

    torch.manual_seed(0)
    net = TeacherNet(TeacherConfig(n_features=x.shape[2], window=x.shape[1],
                                   conv_filters=(8,), lstm_hidden=8, dense=(8,),
                                   dropout=0.0))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x[:400]), torch.from_numpy(y[:400]).float()
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(net(xt), yt).backward()
        opt.step()
    return net.eval()


def test_inc_int8_teacher_agrees_with_fp32(tmp_path, capfd) -> None:
    from compress.inc import _probs, quantize_teacher, save_program

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, W, F)).astype(np.float32)
    y = (x[:, -1, 0] + x[:, :, 1].mean(axis=1) > 0).astype(np.int64)
    net = fit_tiny_teacher(x, y)

    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q, info = quantize_teacher(net, x[:128], x[400:500], y[400:500], 0.05)
    # Found: torch's pytree warned (FutureWarning, on stderr) at every trial.
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]
    # Found: INC's own INFO lines (over a hundred per run) filled the terminal.
    noise = [line for line in capfd.readouterr().err.splitlines()
             if "[INFO]" in line or "[WARNING]" in line]
    assert noise == []

    fp = _probs(net, x[500:])
    qp = _probs(q, x[500:])
    assert info["mode"] in ("autotune", "static-default")
    assert np.abs(qp - fp).max() < 0.1
    assert np.mean((qp >= 0.5) == (fp >= 0.5)) >= 0.95
    assert np.mean((fp >= 0.5) == y[500:]) > 0.8  # the float model learned the task

    # The saved program loads in a fresh process, takes any batch size and scores
    # like the quantized model.
    path = save_program(q, x[:4], tmp_path / "model.pt2")
    np.save(tmp_path / "x.npy", x[500:600])
    script = (
        "import sys, numpy as np, torch\n"
        "from compress.inc import load_program\n"
        "m = load_program(sys.argv[1])\n"
        "x = np.load(sys.argv[2])\n"
        "with torch.no_grad():\n"
        "    out = [torch.sigmoid(m(torch.from_numpy(x[:b]))).numpy()\n"
        "           for b in (1, 7, 100)]\n"
        "np.save(sys.argv[3], np.concatenate(out))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path), str(tmp_path / "x.npy"),
         str(tmp_path / "out.npy")], capture_output=True, text=True, timeout=300,
        cwd=str(Path(__file__).resolve().parent.parent))
    assert done.returncode == 0, done.stderr[-2000:]
    got = np.load(tmp_path / "out.npy")
    want = np.concatenate([qp[:1], qp[:7], qp[:100]])
    np.testing.assert_allclose(got, want, atol=1e-6)
