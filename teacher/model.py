"""The teacher network: 1D convolutions along a window of flows, then a BiLSTM.

Input is ``[batch, W, F]`` (W flows of F encoded features, the flow being scored
last); output is one logit per window, shape ``[batch]``. A sigmoid of the logit is
the probability that the last flow is malicious: higher means more anomalous.

Every size is a field of :class:`TeacherConfig`, a frozen dataclass that is saved
next to the weights (``config.json``), so a checkpoint rebuilds its own network.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from flows.errors import ModelError

__all__ = ["TeacherConfig", "TeacherNet"]

# The largest size (features, window, filters, hidden units, members) a config may
# ask for: a bigger one is a damaged or hostile config.json, not a real network.
MAX_SIZE = 65_536
_INT_FIELDS = (
    "n_features", "window", "kernel_size", "lstm_hidden", "lstm_layers", "members",
)


def _is_int(value: Any) -> bool:
    """True for an integer that is not a bool (numpy integers count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class TeacherConfig:
    """Sizes of the teacher network; the defaults come from the tuning run.

    The NSL-KDD grids (validation with held-out attack types, teacher/README.md)
    preferred W=1 over W=4, three conv blocks of 128 filters over one or two of
    32 or 64, and dropout 0.3 over 0.1 or 0.5.

    ``conv_filters`` holds one entry per convolution block (Conv1d kernel
    ``kernel_size`` + BatchNorm + ReLU + MaxPool 2 while the window is still at
    least 2 long); ``lstm_hidden`` is per direction, the two directions are
    concatenated; ``dense`` lists the hidden dense layers before the logit.
    ``members`` > 1 makes the network an ensemble of that many such networks
    (trained apart, with different seeds) whose logits are averaged.
    """

    n_features: int
    window: int = 1
    conv_filters: tuple[int, ...] = (128, 128, 128)
    kernel_size: int = 3
    lstm_hidden: int = 64
    lstm_layers: int = 1
    dense: tuple[int, ...] = (64,)
    dropout: float = 0.3
    members: int = 1

    def __post_init__(self) -> None:
        self._check_types()

        # JSON gives lists; keep the dataclass hashable and comparable.
        filters = tuple(int(c) for c in self.conv_filters)
        object.__setattr__(self, "conv_filters", filters)
        object.__setattr__(self, "dense", tuple(int(d) for d in self.dense))
        problems = []
        if self.n_features < 1:
            problems.append(f"n_features must be >= 1, got {self.n_features}")
        if self.window < 1:
            problems.append(f"window must be >= 1, got {self.window}")
        if any(c < 1 for c in self.conv_filters):
            problems.append(f"conv_filters must be positive, got {self.conv_filters}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            problems.append(f"kernel_size must be odd and >= 1, got {self.kernel_size}")
        if self.lstm_hidden < 1 or self.lstm_layers < 1:
            problems.append("lstm_hidden and lstm_layers must be >= 1")
        if any(d < 1 for d in self.dense):
            problems.append(f"dense sizes must be positive, got {self.dense}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.members < 1:
            problems.append(f"members must be >= 1, got {self.members}")
        if problems:
            raise ModelError("bad teacher config: " + "; ".join(problems))

    def _check_types(self) -> None:
        """Refuse, by key, a value of the wrong type or past :data:`MAX_SIZE`."""
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if not _is_int(value) or not 1 <= value <= MAX_SIZE:
                raise ModelError(
                    f"bad teacher config: {name} must be an integer in "
                    f"[1, {MAX_SIZE}], got {value!r}"
                )
            object.__setattr__(self, name, int(value))
        for name in ("conv_filters", "dense"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(
                _is_int(v) and 1 <= v <= MAX_SIZE for v in value
            ):
                raise ModelError(
                    f"bad teacher config: {name} must be a list of integers in "
                    f"[1, {MAX_SIZE}], got {value!r}"
                )
        if not isinstance(self.dropout, numbers.Real) or isinstance(
            self.dropout, bool
        ):
            raise ModelError(
                f"bad teacher config: dropout must be a number in [0, 1), "
                f"got {self.dropout!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field."""
        out = dataclasses.asdict(self)
        out["conv_filters"] = list(self.conv_filters)
        out["dense"] = list(self.dense)
        return out

    def to_json(self) -> str:
        """The config as JSON text (what ``config.json`` holds)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TeacherConfig:
        """Rebuild from :meth:`to_dict` output; unknown keys are a ModelError."""
        if not isinstance(data, dict):
            raise ModelError("teacher config must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ModelError(f"unknown teacher config keys: {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ModelError(f"bad teacher config: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> TeacherConfig:
        """Rebuild from :meth:`to_json` output."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelError(f"config.json is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ModelError("config.json must hold a JSON object")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> TeacherConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class _Shape:
    """Sequence length after each conv block, worked out once from the config."""

    lengths: tuple[int, ...] = field(default_factory=tuple)
    pooled: tuple[bool, ...] = field(default_factory=tuple)


def _plan(config: TeacherConfig) -> _Shape:
    # Pool by 2 only while the sequence is at least 2 long, so W=1 still works.
    lengths, pooled = [], []
    length = config.window
    for _ in config.conv_filters:
        pool = length >= 2
        length = length // 2 if pool else length
        lengths.append(length)
        pooled.append(pool)
    return _Shape(tuple(lengths), tuple(pooled))


class TeacherNet(nn.Module):
    """CNN-BiLSTM over a window of encoded flows; ``forward(x [B,W,F]) -> logit [B]``.

    >>> import torch
    >>> net = TeacherNet(TeacherConfig(n_features=5, window=4)).eval()
    >>> net(torch.zeros(2, 4, 5)).shape
    torch.Size([2])

    With ``members`` > 1 it holds that many single networks in ``members`` and
    returns the mean of their logits.
    """

    def __init__(self, config: TeacherConfig) -> None:
        super().__init__()
        self.config = config

        # An ensemble is a list of single networks; nothing else is built.
        if config.members > 1:
            single = config.replace(members=1)
            self.members = nn.ModuleList(
                [TeacherNet(single) for _ in range(config.members)])
            return
        plan = _plan(config)

        # Convolution blocks along the window axis (channels = features).
        blocks: list[nn.Module] = []
        channels = config.n_features
        for filters, pool in zip(config.conv_filters, plan.pooled, strict=True):
            layers: list[nn.Module] = [
                nn.Conv1d(channels, filters, config.kernel_size,
                          padding=config.kernel_size // 2),
                nn.BatchNorm1d(filters),
                nn.ReLU(),
            ]
            if pool:
                layers.append(nn.MaxPool1d(2))
            blocks.append(nn.Sequential(*layers))
            channels = filters
        self.conv = nn.Sequential(*blocks)

        # Bidirectional LSTM over what the convolutions left of the window.
        self.lstm = nn.LSTM(
            input_size=channels,
            hidden_size=config.lstm_hidden,
            num_layers=config.lstm_layers,
            batch_first=True,
            bidirectional=True,
            dropout=config.dropout if config.lstm_layers > 1 else 0.0,
        )

        # Dense head: both directions' summaries concatenated, then one logit.
        head: list[nn.Module] = [nn.Dropout(config.dropout)]
        width = 2 * config.lstm_hidden
        for size in config.dense:
            head += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(config.dropout)]
            width = size
        head.append(nn.Linear(width, 1))
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B]`` for windows ``x`` of shape ``[B, W, F]``."""
        if self.config.members > 1:
            return torch.stack([m(x) for m in self.members]).mean(dim=0)
        h = self.conv(x.transpose(1, 2))  # [B, C, L]
        out, _ = self.lstm(h.transpose(1, 2))  # [B, L, 2H]
        hidden = self.config.lstm_hidden
        # Forward direction after the last step, backward direction after the first.
        summary = torch.cat([out[:, -1, :hidden], out[:, 0, hidden:]], dim=1)
        return self.head(summary).squeeze(1)

    def n_params(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
