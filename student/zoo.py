"""The student zoo: a temporal CNN, an MLP over the flattened window, a tiny LSTM.

Every student takes windows ``[B, W, F]`` (the teacher's encoder and window) and
returns one logit per window, shape ``[B]``; a sigmoid of it is the probability of
anomaly (higher means more anomalous). ``width`` sets the hidden size. Each class
declares in ``TARGETS`` the export targets whose converters handle its layers (see
``../shared/TOOLCHAIN.md``: the LSTM needs ``unroll`` for TFLite int8 and dynamic
quantization in onnxruntime).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flows.errors import ModelError, UsageError
from student import MAX_WIDTH

__all__ = [
    "ALL_TARGETS",
    "KINDS",
    "CNNStudent",
    "LSTMStudent",
    "MLPStudent",
    "StudentConfig",
    "build_student",
    "student_targets",
]

ALL_TARGETS = ("onnx-fp32", "onnx-int8", "tflite-fp32", "tflite-int8", "tflite-micro")


@dataclass(frozen=True)
class StudentConfig:
    """What a student is: its kind, input size and hidden width."""

    kind: str
    n_features: int
    window: int
    width: int = 16

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UsageError(
                f"unknown student kind {self.kind!r}; choose one of {sorted(KINDS)}"
            )
        if self.n_features < 1 or self.window < 1 or self.width < 1:
            raise ModelError(f"student sizes must be >= 1: {self}")
        if self.width > MAX_WIDTH:
            raise ModelError(
                f"student width {self.width} is past {MAX_WIDTH}: a student that "
                "wide is no smaller than its teacher")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudentConfig:
        """Rebuild from :meth:`to_dict` output."""
        try:
            keys = ("kind", "n_features", "window", "width")
            return cls(**{k: data[k] for k in keys})
        except (KeyError, TypeError) as exc:
            raise ModelError(f"bad student config {json.dumps(data)}: {exc}") from exc


class _Student(nn.Module):
    """Shared behaviour: config, parameter count, probabilities."""

    TARGETS: tuple[str, ...] = ALL_TARGETS

    def __init__(self, config: StudentConfig) -> None:
        super().__init__()
        self.config = config

    def n_params(self) -> int:
        """Number of parameters (after pruning, the physically remaining ones)."""
        return sum(p.numel() for p in self.parameters())

    @torch.inference_mode()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Probability of anomaly ``[B]``."""
        return torch.sigmoid(self(x))


class CNNStudent(_Student):
    """Two 1D convolutions along the window, mean over time, one dense logit.

    >>> net = CNNStudent(StudentConfig("cnn", n_features=5, window=4, width=8))
    >>> net(torch.zeros(2, 4, 5)).shape
    torch.Size([2])
    """

    def __init__(self, config: StudentConfig) -> None:
        super().__init__(config)
        w = config.width
        self.conv1 = nn.Conv1d(config.n_features, w, 3, padding=1)
        self.conv2 = nn.Conv1d(w, w, 3, padding=1)
        self.fc = nn.Linear(w, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B]`` for windows ``[B, W, F]``."""
        h = torch.relu(self.conv1(x.transpose(1, 2)))
        h = torch.relu(self.conv2(h))
        return self.fc(h.mean(dim=2)).squeeze(1)


class MLPStudent(_Student):
    """Two dense hidden layers over the flattened window.

    >>> net = MLPStudent(StudentConfig("mlp", n_features=5, window=4, width=8))
    >>> net(torch.zeros(2, 4, 5)).shape
    torch.Size([2])
    """

    def __init__(self, config: StudentConfig) -> None:
        super().__init__(config)
        w = config.width
        self.fc1 = nn.Linear(config.window * config.n_features, w)
        self.fc2 = nn.Linear(w, w)
        self.fc = nn.Linear(w, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B]`` for windows ``[B, W, F]``."""
        h = torch.relu(self.fc1(x.flatten(1)))
        h = torch.relu(self.fc2(h))
        return self.fc(h).squeeze(1)


class LSTMStudent(_Student):
    """One small LSTM over the window; the last hidden state gives the logit.

    Exports unrolled to TFLite (the Keras 3 while-loop form crashes the int8
    converter) and dynamically quantized in onnxruntime.

    >>> net = LSTMStudent(StudentConfig("lstm", n_features=5, window=4, width=8))
    >>> net(torch.zeros(2, 4, 5)).shape
    torch.Size([2])
    """

    def __init__(self, config: StudentConfig) -> None:
        super().__init__(config)
        self.lstm = nn.LSTM(config.n_features, config.width, batch_first=True)
        self.fc = nn.Linear(config.width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B]`` for windows ``[B, W, F]``."""
        out, _ = self.lstm(x)
        return self.fc(out[:, -1, :]).squeeze(1)


KINDS: dict[str, type[_Student]] = {
    "cnn": CNNStudent,
    "mlp": MLPStudent,
    "lstm": LSTMStudent,
}


def build_student(
    kind: str, n_features: int, window: int, width: int = 16, seed: int | None = None
) -> _Student:
    """A freshly initialised student of ``kind`` (``cnn``, ``mlp`` or ``lstm``)."""
    config = StudentConfig(kind, n_features, window, width)
    if seed is not None:
        torch.manual_seed(seed)
    return KINDS[kind](config)


def student_targets(kind: str) -> tuple[str, ...]:
    """The export targets a student kind supports."""
    if kind not in KINDS:
        raise UsageError(
            f"unknown student kind {kind!r}; choose one of {sorted(KINDS)}"
        )
    return KINDS[kind].TARGETS
