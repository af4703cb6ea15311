"""compress.prune: structured removal shrinks a network, magnitude pruning zeroes."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")

from compress.prune import magnitude_sparsity, structured_prune  # noqa: E402
from flows.errors import ModelError  # noqa: E402
from student.zoo import build_student  # noqa: E402

W, F = 6, 5


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_structured_pruning_removes_half_the_hidden_channels(kind: str) -> None:
    model = build_student(kind, F, W, width=16, seed=0).eval()
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(3, W, F)).astype("f4"))

    pruned = structured_prune(model, 0.5, x[:2])

    hidden = {n: p.shape[0] for n, p in pruned.named_parameters()
              if n.endswith("weight") and not n.startswith("fc.")}
    assert all(size == 8 for size in hidden.values()), hidden
    assert pruned.fc.weight.shape == (1, 8)
    assert sum(p.numel() for p in pruned.parameters()) < model.n_params() / 2
    assert pruned(x).shape == (3,)
    assert model.fc.weight.shape == (1, 16)  # the original is untouched


def test_a_ratio_that_would_empty_a_layer_is_refused_not_silently_skipped() -> None:
    # cnn-4 at 0.99: Torch-Pruning keeps every layer whole rather than empty one.
    model = build_student("cnn", F, W, width=4, seed=0).eval()
    with pytest.raises(ModelError, match="not pruned: ratio 0.99"):
        structured_prune(model, 0.99, torch.zeros(2, W, F))


def test_recurrent_students_are_not_pruned() -> None:
    model = build_student("lstm", F, W, width=8)
    with pytest.raises(ModelError, match="recurrent"):
        structured_prune(model, 0.5, torch.zeros(2, W, F))


def test_magnitude_pruning_reports_sparsity_only() -> None:
    model = build_student("mlp", F, W, width=16, seed=0)
    sparse, share = magnitude_sparsity(model, 0.5)

    weights = [p for n, p in sparse.named_parameters() if n.endswith("weight")]
    zeros = sum(int((p == 0).sum()) for p in weights)
    total = sum(p.numel() for p in weights)
    assert share == pytest.approx(zeros / total)
    assert 0.45 <= share <= 0.55
    assert sparse.n_params() == model.n_params()  # same shapes: same file size
