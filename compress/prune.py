"""Pruning: structured channel removal (Torch-Pruning) and magnitude sparsity.

Structured pruning removes whole output channels/units from the hidden layers, so the
exported file really shrinks; the 1-unit output layer is kept. Recurrent students are
not pruned (Torch-Pruning has no safe handling of their gates): their size is set by
``width``. Unstructured magnitude pruning only zeroes weights; the file keeps its size,
so it is reported as sparsity, never used for an artifact.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from compress import logger
from flows.errors import ModelError

__all__ = ["magnitude_sparsity", "structured_prune"]


def structured_prune(
    model: nn.Module, ratio: float, example: torch.Tensor
) -> nn.Module:
    """A copy of ``model`` with ``ratio`` of each hidden layer's channels removed."""
    import torch_pruning as tp

    if not 0.0 < ratio < 1.0:
        raise ModelError(f"pruning ratio must be in (0, 1), got {ratio}")
    if any(isinstance(m, nn.RNNBase) for m in model.modules()):
        raise ModelError("structured pruning of recurrent students is not supported")
    pruned = copy.deepcopy(model).eval()
    before = sum(p.numel() for p in pruned.parameters())
    try:
        pruner = tp.pruner.MagnitudePruner(
            pruned,
            example,
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=[pruned.fc],
        )
        pruner.step()
    except Exception as exc:
        raise ModelError(f"Torch-Pruning failed at ratio {ratio}: {exc}") from exc
    after = sum(p.numel() for p in pruned.parameters())
    if after >= before:
        # Torch-Pruning leaves a layer whole rather than remove every channel.
        raise ModelError(f"not pruned: ratio {ratio} would remove every channel "
                         f"of a layer, so none was removed ({before} params)")
    logger.info("pruned %.0f%% of channels: %d -> %d params", ratio * 100, before,
                after)
    return pruned


@torch.no_grad()
def magnitude_sparsity(model: nn.Module, amount: float) -> tuple[nn.Module, float]:
    """A copy with the smallest ``amount`` of each weight matrix zeroed; its sparsity.

    The sparsity is the share of zero weights over all weight tensors (biases kept).
    """
    sparse = copy.deepcopy(model).eval()
    zeros = total = 0
    for name, param in sparse.named_parameters():
        if "weight" not in name or param.dim() < 2:
            continue
        k = int(amount * param.numel())
        if k > 0:
            cut = param.abs().flatten().kthvalue(k).values
            param.mul_((param.abs() > cut).to(param.dtype))
        zeros += int((param == 0).sum())
        total += param.numel()
    return sparse, zeros / total if total else 0.0
