"""Knowledge distillation: train a student on the teacher's softened outputs.

The loss mixes a soft term, binary cross-entropy between the student's and the
teacher's probabilities at temperature ``T`` (scaled by ``T**2`` so its gradients keep
their size), with the ordinary cross-entropy on the hard labels:
``alpha * soft + (1 - alpha) * hard``. The teacher is run once over the training and
validation windows (:class:`TeacherCache`); every student of a search reuses it.

With ``input_noise`` the student learns on training windows with Gaussian noise
added, as the teacher did; given ``teacher_fn`` the soft targets are the teacher's
logits *on the noisy windows* (the student matches the teacher's function around
the training data, not only on it), otherwise the cached clean-window logits.
``swap`` > 0 goes further from the data: in each training window that share of the
feature columns is taken from another window of the batch (the same columns at
every flow of the window), making combinations the training set never had (a
benign flow with one field of an attack, say); only useful with ``teacher_fn``,
since a swapped window's label is unknown. ``mixup`` > 0 blends each training
window with another of the batch, ``lam * x + (1 - lam) * other`` with ``lam`` drawn
from Beta(mixup, mixup) per window, the teacher again scoring the blend: points
between known flows rather than across their columns. ``target_shift`` is
subtracted from every teacher logit before the soft targets are formed: the logit
of the teacher's threshold puts its decision where the student's sigmoid is
steepest (0.5) instead of where the teacher's happens to be.

Two settings change what "close to the teacher" means. ``loss="mse"`` replaces the
soft term with the squared difference of the logits themselves (no temperature):
the student copies the teacher's whole logit scale, far from the cut as well as
near it. ``select="teacher"`` keeps the epoch whose soft loss against the teacher
on the validation windows is lowest, instead of the hard-label loss; early stopping
follows the same measure; ``select="f1"`` keeps the epoch of the best F1 on the
validation windows (at the best cut), the measure the gate reads. ``swap_rows``
below 1 alters only that share of each batch's windows, the rest stay as the data
has them.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn import functional as nnf

from flows.errors import ModelError
from student import logger

__all__ = [
    "ArrayWindows",
    "DistillConfig",
    "TeacherCache",
    "WindowSource",
    "distill",
    "kd_loss",
    "student_logits",
]


class WindowSource(Protocol):
    """Anything that forms windows for row numbers (``teacher.data.Prepared`` does)."""

    def windows(self, rows: np.ndarray) -> np.ndarray:  # pragma: no cover
        """float32 ``[len(rows), W, F]``."""
        ...


class ArrayWindows:
    """A :class:`WindowSource` over windows already in memory ``[N, W, F]``."""

    def __init__(self, windows: np.ndarray) -> None:
        self.array = np.ascontiguousarray(windows, dtype=np.float32)

    def windows(self, rows: np.ndarray) -> np.ndarray:
        """The windows of ``rows``."""
        return self.array[np.asarray(rows, dtype=np.int64)]


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 4.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """Distillation loss on logits ``[B]`` (student, teacher) and 0/1 labels ``[B]``.

    >>> s = torch.tensor([0.0, 2.0]); t = torch.tensor([0.0, 2.0])
    >>> round(float(kd_loss(s, t, torch.tensor([0.0, 1.0]), alpha=1.0)), 4)
    10.848
    """
    soft_target = torch.sigmoid(teacher / temperature)
    soft = nnf.binary_cross_entropy_with_logits(student / temperature, soft_target)
    hard = nnf.binary_cross_entropy_with_logits(student, labels.float())
    return alpha * soft * temperature**2 + (1.0 - alpha) * hard


def logit_mse_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 1.0,
) -> torch.Tensor:
    """Squared logit difference mixed with hard-label cross-entropy (``loss="mse"``).

    >>> s = torch.tensor([1.0, 2.0]); t = torch.tensor([0.0, 4.0])
    >>> float(logit_mse_loss(s, t, torch.tensor([0.0, 1.0])))
    2.5
    """
    soft = nnf.mse_loss(student, teacher)
    hard = nnf.binary_cross_entropy_with_logits(student, labels.float())
    return alpha * soft + (1.0 - alpha) * hard


def best_f1(labels: np.ndarray, scores: np.ndarray) -> float:
    """The highest F1 over every cut of ``scores`` against 0/1 ``labels``.

    >>> best_f1(np.array([0, 1, 1, 0]), np.array([0.1, 0.8, 0.4, 0.5]))
    0.8
    """
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    y = np.asarray(labels, dtype=np.float64)[order]
    positives = y.sum()
    if positives == 0:
        return 0.0
    tp = np.cumsum(y)
    flagged = np.arange(1, len(y) + 1)
    # Only cuts between distinct scores: ties are flagged together.
    s = np.asarray(scores, dtype=np.float64)[order]
    last = np.r_[s[1:] != s[:-1], True]
    f1 = 2 * tp[last] / (flagged[last] + positives)
    return float(f1.max())


def _soft_loss(cfg: DistillConfig, student, teacher, labels) -> torch.Tensor:
    if cfg.loss == "mse":
        return logit_mse_loss(student, teacher, labels, alpha=cfg.alpha)
    return kd_loss(student, teacher, labels, temperature=cfg.temperature,
                   alpha=cfg.alpha)


@dataclass(frozen=True)
class DistillConfig:
    """Training settings for distillation and for fine-tuning after pruning."""

    epochs: int = 12
    batch_size: int = 512
    lr: float = 3e-3
    weight_decay: float = 1e-5
    temperature: float = 4.0
    alpha: float = 0.5
    patience: int = 3
    seed: int = 0
    max_train_rows: int | None = None
    input_noise: float = 0.0
    swap: float = 0.0
    mixup: float = 0.0
    target_shift: float = 0.0
    loss: str = "kd"
    select: str = "label"
    swap_rows: float = 1.0

    def __post_init__(self) -> None:
        if self.loss not in ("kd", "mse"):
            raise ValueError(f"loss must be 'kd' or 'mse', got {self.loss!r}")
        if self.select not in ("label", "teacher", "f1"):
            raise ValueError(
                f"select must be 'label', 'teacher' or 'f1', got {self.select!r}")
        if not 0.0 < self.swap_rows <= 1.0:
            raise ValueError(f"swap_rows must be in (0, 1], got {self.swap_rows}")


def _batched(source: WindowSource, rows: np.ndarray, size: int):
    for start in range(0, len(rows), size):
        part = rows[start : start + size]
        yield part, torch.from_numpy(source.windows(part))


@torch.inference_mode()
def student_logits(
    model: nn.Module, source: WindowSource, rows: np.ndarray, batch_size: int = 4096
) -> np.ndarray:
    """A model's logits ``float32 [len(rows)]`` over the windows of ``rows``."""
    model.eval()
    out = [model(x).float().numpy() for _, x in _batched(source, rows, batch_size)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


@dataclass
class TeacherCache:
    """Teacher logits per split, computed once (and kept on disk when a path is set).

    ``logits_fn`` maps windows ``[B, W, F]`` to logits ``[B]`` (``Teacher.logits``).
    The disk file name holds a hash of the rows and of ``key`` (the teacher's
    identity, e.g. the sha256 of its weights), so a changed teacher is never reused.
    """

    logits_fn: Callable[[np.ndarray], np.ndarray]
    source: WindowSource
    key: str = ""
    folder: Path | None = None
    batch_size: int = 4096
    _memo: dict[str, np.ndarray] = field(default_factory=dict)

    def logits(self, rows: np.ndarray) -> np.ndarray:
        """Teacher logits for ``rows`` (int64 row numbers)."""
        rows = np.asarray(rows, dtype=np.int64)
        digest = hashlib.sha256(self.key.encode() + rows.tobytes()).hexdigest()[:20]
        if digest in self._memo:
            return self._memo[digest]
        path = self.folder / f"teacher-logits-{digest}.npy" if self.folder else None
        if path is not None and path.is_file():
            out = np.load(path)
        else:
            parts = [
                np.asarray(self.logits_fn(x.numpy()), dtype=np.float32)
                for _, x in _batched(self.source, rows, self.batch_size)
            ]
            out = np.concatenate(parts) if parts else np.zeros(0, np.float32)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, out)
            logger.info("teacher scored %d windows (cached)", len(rows))
        if out.shape != rows.shape:
            raise ModelError(f"teacher cache holds {out.shape} logits for {rows.shape}")
        self._memo[digest] = out
        return out


def distill(
    model: nn.Module,
    source: WindowSource,
    train_rows: np.ndarray,
    y: np.ndarray,
    teacher_logits: np.ndarray,
    val_rows: np.ndarray,
    config: DistillConfig | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    teacher_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    val_teacher_logits: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` in place by distillation; keeps the epoch of best val loss.

    ``y`` holds the 0/1 labels of every row (indexed by row number);
    ``teacher_logits`` the teacher's logits for ``train_rows`` in that order. The
    validation loss is the hard-label cross-entropy on ``val_rows`` (the gate's data).
    ``teacher_fn`` (windows -> logits) scores the altered windows when one of
    ``config.input_noise``, ``swap`` or ``mixup`` is set. With ``config.select ==
    "teacher"`` the epoch kept is the one closest to the teacher on ``val_rows``
    (``val_teacher_logits``, or ``teacher_fn`` run on them). Returns the per-epoch
    history.
    """
    cfg = config or DistillConfig()
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    noise = torch.Generator().manual_seed(cfg.seed)
    blend = np.random.default_rng([cfg.seed, 1])  # its own stream: others unchanged
    train_rows = np.asarray(train_rows, dtype=np.int64)
    t_all = torch.from_numpy(
        np.asarray(teacher_logits, dtype=np.float32) - np.float32(cfg.target_shift))
    y_all = torch.from_numpy(np.asarray(y, dtype=np.float32))
    if len(t_all) != len(train_rows):
        raise ModelError("teacher logits and training rows differ in length")
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    y_val = torch.from_numpy(np.asarray(y, dtype=np.float32)[val_rows])
    t_val = None
    if cfg.select == "teacher":
        if val_teacher_logits is None and teacher_fn is None:
            raise ModelError("select='teacher' needs the teacher's validation logits")
        if val_teacher_logits is None:
            val_teacher_logits = np.concatenate(
                [np.asarray(teacher_fn(x.numpy()), dtype=np.float32)
                 for _, x in _batched(source, np.asarray(val_rows), 4096)])
        t_val = torch.from_numpy(
            np.asarray(val_teacher_logits, dtype=np.float32)
            - np.float32(cfg.target_shift))

    best, best_loss, stale, history = None, float("inf"), 0, []
    for epoch in range(cfg.epochs):
        # One pass over a shuffled (optionally subsampled) training set.
        model.train()
        order = rng.permutation(len(train_rows))
        if cfg.max_train_rows:
            order = order[: cfg.max_train_rows]
        total = 0.0
        for start in range(0, len(order), cfg.batch_size):
            pick = order[start : start + cfg.batch_size]
            rows = train_rows[pick]
            x = torch.from_numpy(source.windows(rows))
            target = t_all[pick]
            if teacher_fn is not None and cfg.swap > 0:
                donor = x[torch.randperm(len(x), generator=noise)]
                cols = torch.rand((len(x), 1, x.shape[2]), generator=noise) < cfg.swap
                if cfg.swap_rows < 1.0:
                    keep = torch.rand((len(x), 1, 1), generator=noise) >= cfg.swap_rows
                    cols = cols & ~keep
                x = torch.where(cols, donor, x)
            if teacher_fn is not None and cfg.mixup > 0:
                lam = blend.beta(cfg.mixup, cfg.mixup, size=(len(x), 1, 1))
                other = x[torch.from_numpy(blend.permutation(len(x)))]
                lam = torch.from_numpy(lam.astype(np.float32))
                x = lam * x + (1 - lam) * other
            if cfg.input_noise > 0:
                x = x + cfg.input_noise * torch.randn(x.shape, generator=noise)
            if teacher_fn is not None and (
                cfg.input_noise > 0 or cfg.swap > 0 or cfg.mixup > 0
            ):
                target = torch.from_numpy(
                    np.asarray(teacher_fn(x.numpy()), dtype=np.float32)
                    - np.float32(cfg.target_shift))
            loss = _soft_loss(cfg, model(x), target, y_all[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(pick)

        # Validation loss on hard labels; keep the best weights.
        val = torch.from_numpy(student_logits(model, source, val_rows))
        if cfg.select == "f1":
            val_loss = 1.0 - best_f1(y_val.numpy(), val.numpy())
        elif t_val is None:
            val_loss = float(nnf.binary_cross_entropy_with_logits(val, y_val))
        else:
            val_loss = float(_soft_loss(
                dataclasses.replace(cfg, alpha=1.0), val, t_val, y_val))
        record = {"epoch": epoch, "train_loss": total / len(order),
                  "val_loss": val_loss}
        history.append(record)
        if progress is not None:
            progress(record)
        if val_loss < best_loss - 1e-5:
            best, best_loss, stale = copy.deepcopy(model.state_dict()), val_loss, 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break

    if best is not None:
        model.load_state_dict(best)
    model.eval()
    return history
