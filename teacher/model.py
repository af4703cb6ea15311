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
from teacher.limits import MAX_BINS, MAX_PARAMS, MAX_SIZE

__all__ = ["TeacherConfig", "TeacherNet"]

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

    ``bins`` > 0 expands each input column listed in ``binned`` (quantile levels in
    0..1, see ``Encoder.quantile_columns``) into that many piecewise-linear bins
    before the first convolution: bin ``t`` of level ``x`` is
    ``clamp(bins * x - t, 0, 1)``, so the network sees "past the t-th quantile
    step" as its own input, the cut points a tree would split on.

    ``subspace`` < 1 lets each single network see only that share of the input
    columns (a random subspace, as a random forest's trees do): the others are
    multiplied by 0 through the ``feature_mask`` buffer, which training draws from
    the member's seed (:meth:`TeacherNet.draw_feature_mask`) and the checkpoint
    keeps with the weights.
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
    bins: int = 0
    binned: tuple[int, ...] = ()
    subspace: float = 1.0

    def __post_init__(self) -> None:
        self._check_types()

        # JSON gives lists; keep the dataclass hashable and comparable.
        filters = tuple(int(c) for c in self.conv_filters)
        object.__setattr__(self, "conv_filters", filters)
        object.__setattr__(self, "dense", tuple(int(d) for d in self.dense))
        object.__setattr__(self, "binned", tuple(int(c) for c in self.binned))
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
        if not 0.0 < self.subspace <= 1.0:
            problems.append(f"subspace must be in (0, 1], got {self.subspace}")
        if self.members < 1:
            problems.append(f"members must be >= 1, got {self.members}")
        if not 0 <= self.bins <= MAX_BINS:
            problems.append(f"bins must be in [0, {MAX_BINS}], got {self.bins}")
        if self.bins and not self.binned:
            problems.append("bins needs the columns to expand (binned is empty)")
        if len(set(self.binned)) != len(self.binned) or any(
            not 0 <= c < self.n_features for c in self.binned
        ):
            problems.append(
                f"binned must be distinct columns in [0, {self.n_features}), "
                f"got {list(self.binned)}"
            )
        if not problems and self.estimated_params() > MAX_PARAMS:
            problems.append(
                f"{self.estimated_params():,} weights, more than the "
                f"{MAX_PARAMS:,} a teacher may have")
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
        if not _is_int(self.bins):
            raise ModelError(
                f"bad teacher config: bins must be an integer, got {self.bins!r}"
            )
        if not isinstance(self.binned, (list, tuple)) or not all(
            _is_int(v) for v in self.binned
        ):
            raise ModelError(
                f"bad teacher config: binned must be a list of integers, "
                f"got {self.binned!r}"
            )
        for name in ("dropout", "subspace"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise ModelError(
                    f"bad teacher config: {name} must be a number, got {value!r}"
                )

    def estimated_params(self) -> int:
        """The network's weight count, worked out from the sizes without building it.

        Equal to ``TeacherNet(config).n_params()``; checked before anything is
        allocated, so a hostile config.json cannot ask for gigabytes.
        """
        channels = self.n_features
        if self.bins:
            channels += len(self.binned) * (self.bins - 1)
        total = 0
        for filters in self.conv_filters:  # conv weights + bias, BatchNorm scale/shift
            total += channels * filters * self.kernel_size + 3 * filters
            channels = filters
        hidden, width = self.lstm_hidden, channels
        for _ in range(self.lstm_layers):  # two directions: 4 gates, 2 biases each
            total += 2 * (4 * hidden * (width + hidden) + 8 * hidden)
            width = 2 * hidden
        for size in (*self.dense, 1):
            total += width * size + size
            width = size
        return total * self.members

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field."""
        out = dataclasses.asdict(self)
        out["conv_filters"] = list(self.conv_filters)
        out["dense"] = list(self.dense)
        out["binned"] = list(self.binned)
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

        # The columns this network sees (all unless a subspace is asked for).
        if config.subspace < 1.0:
            self.register_buffer("feature_mask", torch.ones(config.n_features))

        # Piecewise-linear bins of the binned columns (fixed, not learned; derived
        # from the config, so not part of the saved weights).
        channels = config.n_features
        if config.bins:
            binned = set(config.binned)
            kept = [c for c in range(config.n_features) if c not in binned]
            self.register_buffer(
                "binned_cols", torch.tensor(config.binned, dtype=torch.long),
                persistent=False)
            self.register_buffer(
                "kept_cols", torch.tensor(kept, dtype=torch.long), persistent=False)
            self.register_buffer(
                "bin_steps", torch.arange(config.bins, dtype=torch.float32),
                persistent=False)
            channels = len(kept) + len(config.binned) * config.bins

        # Convolution blocks along the window axis (channels = features).
        blocks: list[nn.Module] = []
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
        if self.config.subspace < 1.0:
            x = x * self.feature_mask
        if self.config.bins:
            x = self.expand_bins(x)
        h = self.conv(x.transpose(1, 2))  # [B, C, L]
        out, _ = self.lstm(h.transpose(1, 2))  # [B, L, 2H]
        hidden = self.config.lstm_hidden
        # Forward direction after the last step, backward direction after the first.
        summary = torch.cat([out[:, -1, :hidden], out[:, 0, hidden:]], dim=1)
        return self.head(summary).squeeze(1)

    def draw_feature_mask(self, seed: int) -> None:
        """Pick the ``subspace`` share of input columns this network sees, by seed."""
        n = self.config.n_features
        keep = max(1, round(self.config.subspace * n))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        mask = torch.zeros(n)
        mask[order[:keep]] = 1.0
        self.feature_mask.copy_(mask)

    def expand_bins(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, W, F]`` -> the unbinned columns, then each binned column's bins."""
        levels = x.index_select(2, self.binned_cols).unsqueeze(-1)  # [B, W, K, 1]
        bins = (levels * self.config.bins - self.bin_steps).clamp(0.0, 1.0)
        return torch.cat([x.index_select(2, self.kept_cols), bins.flatten(2)], dim=2)

    def n_params(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
