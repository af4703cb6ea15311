"""Quantization-aware fine-tuning (QAT) of a student for the int8 converters.

When post-training quantization (PTQ) of a student misses the gate, the student is
fine-tuned with the int8 rounding simulated in its forward pass, so its weights
settle where the converter's grid puts them. :class:`FakeQuantStudent` runs the
student the way the full-int8 TFLite graph (and onnxruntime's static QOperator
graph) does:

* weights: per output channel, symmetric int8 in ``[-127, 127]``
  (scale ``max|w| / 127`` of the current weights), as both converters do;
* activations: per tensor, affine int8 ``[-128, 127]`` with a zero point, at the
  model input, after each fused layer + ReLU, after the CNN's mean over time and at
  the output logit; ranges follow a moving average of min/max while training and
  are set from min/max over calibration windows afterwards (the converter's rule);
* biases stay float (the converters store them as int32 at ``s_in * s_w``).

The fake quantizers are torchao's PT2E ``FakeQuantize`` modules with its observers
(straight-through estimator in the backward pass); only their placement is ours,
because it has to mirror the converter's fused graph, not a generic one.
:func:`qat_finetune` trains with the distillation loss for a few epochs and returns
a plain student whose weights lie on the int8 grid, which then goes through the
same PTQ export as before.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as nnf

from compress import QAT_KINDS, logger
from flows.errors import ModelError
from student.distill import DistillConfig, WindowSource, distill

__all__ = ["QAT_KINDS", "WEIGHT_RANGE", "FakeQuantStudent", "qat_finetune"]

WEIGHT_RANGE = (-127, 127)
ACT_RANGE = (-128, 127)
# Activation points per kind, in forward order.
_ACT_POINTS = {
    "mlp": ("input", "fc1", "fc2", "fc"),
    "cnn": ("input", "conv1", "conv2", "pool", "fc"),
}
_LAYERS = {"mlp": ("fc1", "fc2", "fc"), "cnn": ("conv1", "conv2", "fc")}


def _weight_fq() -> nn.Module:
    from torchao.quantization.pt2e.fake_quantize import FakeQuantize
    from torchao.quantization.pt2e.observer import PerChannelMinMaxObserver

    return FakeQuantize(
        observer=PerChannelMinMaxObserver, quant_min=WEIGHT_RANGE[0],
        quant_max=WEIGHT_RANGE[1], dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric, ch_axis=0,
    )


def _act_fq(moving: bool = True) -> nn.Module:
    from torchao.quantization.pt2e.fake_quantize import FakeQuantize
    from torchao.quantization.pt2e.observer import (
        MinMaxObserver,
        MovingAverageMinMaxObserver,
    )

    return FakeQuantize(
        observer=MovingAverageMinMaxObserver if moving else MinMaxObserver,
        quant_min=ACT_RANGE[0], quant_max=ACT_RANGE[1], dtype=torch.qint8,
        qscheme=torch.per_tensor_affine,
    )


class FakeQuantStudent(nn.Module):
    """A student (MLP or CNN) with int8 weights and activations simulated.

    It holds a copy of the student; training it trains that copy through the
    straight-through estimator. Weight scales always follow the current weights;
    activation observers update only in training mode (and in :meth:`calibrate`).
    """

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        kind = getattr(getattr(student, "config", None), "kind", None)
        if kind not in QAT_KINDS:
            raise ModelError(
                f"quantization-aware training supports {', '.join(QAT_KINDS)} "
                f"students, not {kind!r}"
            )
        self.kind = kind
        self.student = copy.deepcopy(student)
        self.weight_fq = nn.ModuleDict({n: _weight_fq() for n in _LAYERS[kind]})
        self.act_fq = nn.ModuleDict({n: _act_fq() for n in _ACT_POINTS[kind]})

    # -- weights

    def quantized_weight(self, name: str) -> torch.Tensor:
        """The fake-quantized weight of layer ``name`` (scale from its current max).

        Under ``torch.inference_mode`` (validation scoring) the scale of the last
        forward pass outside it is reused: observer buffers updated there could not
        be trained or reloaded afterwards.
        """
        fq = self.weight_fq[name]
        if torch.is_inference_mode_enabled():
            fq.disable_observer()
        else:
            fq.activation_post_process.reset_min_max_vals()
            fq.enable_observer()
        return fq(getattr(self.student, name).weight)

    def _linear(self, name: str, h: torch.Tensor) -> torch.Tensor:
        layer = getattr(self.student, name)
        return nnf.linear(h, self.quantized_weight(name), layer.bias)

    def _conv(self, name: str, h: torch.Tensor) -> torch.Tensor:
        c = getattr(self.student, name)
        return nnf.conv1d(h, self.quantized_weight(name), c.bias, c.stride,
                          c.padding, c.dilation, c.groups)

    # -- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B]`` of windows ``[B, W, F]``, as the int8 graph computes them."""
        a = self.act_fq
        h = a["input"](x)
        if self.kind == "mlp":
            h = h.flatten(1)
            h = a["fc1"](torch.relu(self._linear("fc1", h)))
            h = a["fc2"](torch.relu(self._linear("fc2", h)))
        else:
            h = h.transpose(1, 2)
            h = a["conv1"](torch.relu(self._conv("conv1", h)))
            h = a["conv2"](torch.relu(self._conv("conv2", h)))
            h = a["pool"](h.mean(dim=2))
        return a["fc"](self._linear("fc", h)).squeeze(1)

    def train(self, mode: bool = True) -> FakeQuantStudent:
        """Training mode also switches the activation observers on (eval: off)."""
        super().train(mode)
        for fq in self.act_fq.values():
            fq.enable_observer() if mode else fq.disable_observer()
        return self

    def fake_quant(self, enabled: bool) -> None:
        """Switch the activation and weight rounding on or off (float when off)."""
        for fq in [*self.act_fq.values(), *self.weight_fq.values()]:
            fq.enable_fake_quant() if enabled else fq.disable_fake_quant()

    @torch.no_grad()
    def calibrate(self, windows: np.ndarray, batch: int = 256) -> None:
        """Activation ranges = min/max of the float activations over ``windows``.

        Weights stay rounded: the converter calibrates the model it was given, whose
        weights are already on the grid (:meth:`to_student`). This is the rule the
        TFLite converter and onnxruntime's MinMax calibration apply to the
        representative windows, so the ranges here match theirs.
        """
        self.act_fq = nn.ModuleDict(
            {n: _act_fq(moving=False) for n in _ACT_POINTS[self.kind]})
        super().train(False)
        for fq in self.act_fq.values():  # observe float activations of int8 weights
            fq.disable_fake_quant()
            fq.enable_observer()
        for i in range(0, len(windows), batch):
            self(torch.from_numpy(np.ascontiguousarray(windows[i : i + batch])))
        self.fake_quant(True)
        self.eval()

    @torch.no_grad()
    def to_student(self) -> nn.Module:
        """A plain copy of the student with each weight replaced by its int8 value."""
        out = copy.deepcopy(self.student).eval()
        for name in _LAYERS[self.kind]:
            getattr(out, name).weight.copy_(self.quantized_weight(name))
        return out

    def scales(self) -> dict[str, Any]:
        """Activation scales and zero points (for reports and tests)."""
        return {n: (float(fq.scale.reshape(-1)[0]), int(fq.zero_point.reshape(-1)[0]))
                for n, fq in self.act_fq.items()}


def qat_finetune(
    student: nn.Module,
    source: WindowSource,
    train_rows: np.ndarray,
    y: np.ndarray,
    teacher_logits: np.ndarray,
    val_rows: np.ndarray,
    calibration: np.ndarray,
    config: DistillConfig,
    progress: Callable[[dict[str, Any]], None] | None = None,
    teacher_fn: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[nn.Module, FakeQuantStudent, list[dict[str, Any]]]:
    """Fine-tune ``student`` with int8 simulated; ``(on-grid student, fq model, log)``.

    The activation observers start from the calibration windows (training windows),
    the weights from the PTQ student; training uses the distillation loss and keeps
    the epoch of best validation loss (as :func:`student.distill.distill`). The
    returned fake-quant model is calibrated on ``calibration`` like the converter,
    so its logits are what the int8 file should output.
    """
    fq = FakeQuantStudent(student)
    fq.calibrate(calibration)
    # Moving-average observers for training, seeded with the calibrated ranges.
    seeded = {n: m.activation_post_process for n, m in fq.act_fq.items()}
    fq.act_fq = nn.ModuleDict({n: _act_fq() for n in _ACT_POINTS[fq.kind]})
    for name, module in fq.act_fq.items():
        obs = module.activation_post_process
        obs.min_val.copy_(seeded[name].min_val)
        obs.max_val.copy_(seeded[name].max_val)
    history = distill(fq, source, train_rows, y, teacher_logits, val_rows, config,
                      progress, teacher_fn=teacher_fn)
    logger.info("QAT: %d epochs, last val loss %.4f", len(history),
                history[-1]["val_loss"] if history else float("nan"))
    fq.calibrate(calibration)
    return fq.to_student(), fq, history
