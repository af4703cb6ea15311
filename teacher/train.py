"""Training the teacher: Adam, early stopping on validation loss, a chosen threshold.

:func:`fit` trains a :class:`~teacher.model.TeacherNet` on the "train" rows of a
:class:`~teacher.data.Prepared` and watches the "val" rows: up to ``epochs`` epochs,
stopping after ``patience`` epochs without a lower validation loss, and keeping the
weights of the best epoch. Mini-batches are drawn class-weighted (each class equally
likely) so the minority class is seen as often as the majority; SMOTE on the training
rows is an option. The decision threshold is then chosen on validation scores (best F1
or a target false-positive rate), never on test data.

Runs are seeded and deterministic on CPU. CUDA is used when present, with mixed
precision. Started by ``torchrun`` (``WORLD_SIZE`` > 1) the same call trains with
DistributedDataParallel (gloo on CPU, nccl on GPU): every rank draws the same seeded
sample order and takes its own slice of each global batch, so replicas stay equal.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from flows.errors import BadInputError, ModelError, UsageError
from teacher import logger
from teacher.checkpoint import pick_device
from teacher.data import Prepared
from teacher.metrics import binary_metrics, choose_threshold
from teacher.model import TeacherConfig, TeacherNet

__all__ = [
    "TrainConfig", "TrainResult", "dist_info", "fit", "score_rows", "watched_rows",
]

# Samples per epoch unless told otherwise (the NSL-KDD tuning used 40 000).
EPOCH_SAMPLES = 40_000


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (model sizes live in TeacherConfig).

    Defaults come from the NSL-KDD tuning runs (validation with held-out attack
    types; see teacher/README.md): lr 3e-4, batch 128, weight decay 1e-3, label
    smoothing 0.1, input noise 0.02, no weight averaging, and epochs of at most
    40 000 samples (``samples_per_epoch=None``: the training size, capped there;
    an explicit value is used as given).

    ``input_noise`` adds Gaussian noise of that standard deviation to the (0..1)
    training inputs; ``label_smoothing`` pulls training targets towards 0.5 by that
    share. Both are regularisers against over-confidence on unseen attack types.
    ``ema`` > 0 keeps an exponential moving average of the weights (that decay per
    step); validation, early stopping and the saved model then use the average.
    ``feature_dropout`` zeroes each encoded feature of a training window with that
    probability, so the model cannot lean on a few features alone.
    ``stop_on`` picks what early stopping watches on validation: the loss (lower
    is better) or the best-threshold F1 (higher is better). ``stop_rows`` picks the
    validation rows it watches: ``all``, or ``seen``: benign rows and rows of the
    label types that training holds, so that held-out (novel) types, whose loss
    climbs as soon as the known ones are fitted, do not stop training early; the
    threshold is still chosen on every validation row. ``schedule`` ``cosine``
    decays the learning rate to zero over ``epochs`` (per step); ``keep`` ``last``
    trains every epoch and keeps the final weights instead of the best epoch's.
    ``type_power`` shares the malicious half of balanced sampling among the attack
    types of the training rows (their label text) in proportion to each type's
    row count raised to that power: 1 draws types as often as the data holds them,
    0.5 by the square root of their counts, 0 every type equally often.
    ``outliers`` turns that share of each training batch into made-up anomalies:
    windows with ``outlier_swap`` of their features taken from other windows of
    the batch, labelled malicious whatever they were, so that what lies off the
    training rows' joint distribution is not taken for benign. ``outlier_unit``
    "field" swaps whole input fields (a categorical field's one-hot block at
    once, so the made-up windows stay validly encoded) instead of single columns.
    ``outlier_donors`` "malicious" takes the swapped-in features from the batch's
    malicious windows only, so that a made-up anomaly is a window with some of an
    attack's features, never a mix of benign windows; "benign" from its benign
    windows only ("any", the default, takes them from every window).
    ``benign_mixup`` turns that share of each batch (its last windows, apart from
    the made-up anomalies) into blends of two of the batch's benign windows,
    ``l * a + (1 - l) * b`` with ``l`` uniform in [0, 1], labelled benign, so that
    what lies between benign windows is not taken for an attack.
    ``benign_power`` shares the benign half of balanced sampling among the values
    of the categorical field ``benign_group`` (``service`` by default) of each
    window's last flow, by (rows with that value)^P: 1 as the data holds them, 0.5
    by the square root, so that rarer benign connections are drawn more often.
    ``forest_targets`` blends that share of a Random Forest's out-of-bag score into
    each training row's target: ``(1 - a) * label + a * forest``, the forest
    (teacher.baselines' settings, seeded with ``seed``) fitted on the training
    windows, each row scored only by the trees that did not see it; made-up
    anomalies and benign blends keep their own targets. Below 0.5, so the label
    still decides which side of 0.5 a target lies.
    """

    epochs: int = 50
    patience: int = 5
    lr: float = 3e-4
    weight_decay: float = 1e-3
    batch_size: int = 128
    balance: bool = True
    smote: bool = False
    seed: int = 0
    threshold_rule: str = "best-f1"
    target_fpr: float = 0.01
    samples_per_epoch: int | None = None
    amp: bool = True
    device: str | None = None
    max_minutes: float | None = None
    input_noise: float = 0.02
    label_smoothing: float = 0.1
    ema: float = 0.0
    feature_dropout: float = 0.0
    stop_on: str = "loss"
    stop_rows: str = "all"
    schedule: str = "constant"
    keep: str = "best"
    type_power: float = 1.0
    benign_power: float = 1.0
    benign_group: str = "service"
    outliers: float = 0.0
    outlier_swap: float = 0.3
    outlier_unit: str = "column"
    outlier_donors: str = "any"
    benign_mixup: float = 0.0
    forest_targets: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if self.input_noise < 0 or not 0.0 <= self.label_smoothing < 1.0:
            problems.append("input_noise must be >= 0, label_smoothing in [0, 1)")
        if not 0.0 <= self.ema < 1.0:
            problems.append("ema must be in [0, 1)")
        if self.stop_on not in ("loss", "f1"):
            problems.append("stop_on must be 'loss' or 'f1'")
        if self.stop_rows not in ("all", "seen"):
            problems.append("stop_rows must be 'all' or 'seen'")
        if self.schedule not in ("constant", "cosine"):
            problems.append("schedule must be 'constant' or 'cosine'")
        if self.keep not in ("best", "last"):
            problems.append("keep must be 'best' or 'last'")
        if self.outlier_unit not in ("column", "field"):
            problems.append("outlier_unit must be 'column' or 'field'")
        if self.outlier_donors not in ("any", "malicious", "benign"):
            problems.append("outlier_donors must be 'any', 'malicious' or 'benign'")
        if not 0.0 <= self.type_power <= 1.0:
            problems.append("type_power must be in [0, 1]")
        if self.type_power != 1.0 and (self.smote or not self.balance):
            problems.append("type_power needs balanced sampling and no SMOTE")
        if not 0.0 <= self.benign_power <= 1.0:
            problems.append("benign_power must be in [0, 1]")
        if self.benign_power != 1.0 and (self.smote or not self.balance):
            problems.append("benign_power needs balanced sampling and no SMOTE")
        if not 0.0 <= self.outliers < 1.0 or not 0.0 < self.outlier_swap <= 1.0:
            problems.append("outliers must be in [0, 1), outlier_swap in (0, 1]")
        if not 0.0 <= self.benign_mixup < 1.0 - self.outliers:
            problems.append("benign_mixup must be in [0, 1 - outliers)")
        if not 0.0 <= self.forest_targets < 0.5:
            problems.append("forest_targets must be in [0, 0.5)")
        if not 0.0 <= self.feature_dropout < 1.0:
            problems.append("feature_dropout must be in [0, 1)")
        if self.epochs < 1 or self.patience < 1:
            problems.append("epochs and patience must be >= 1")
        if self.lr <= 0 or self.weight_decay < 0:
            problems.append("lr must be > 0 and weight_decay >= 0")
        if self.batch_size < 2:
            problems.append("batch_size must be >= 2 (BatchNorm needs two rows)")
        if self.threshold_rule not in ("best-f1", "fpr"):
            problems.append("threshold_rule must be 'best-f1' or 'fpr'")
        if not 0.0 <= self.target_fpr <= 1.0:
            problems.append("target_fpr must be in [0, 1]")
        if problems:
            raise UsageError("bad training settings: " + "; ".join(problems))


@dataclass
class TrainResult:
    """What :func:`fit` returns: the best model and how it got there."""

    model: TeacherNet
    history: list[dict[str, Any]]
    threshold: dict[str, Any]
    val_metrics: dict[str, Any]
    best_epoch: int
    epochs_run: int
    wall_s: float
    train_config: dict[str, Any] = field(default_factory=dict)
    reached_at: dict[str, Any] | None = None


def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the torchrun environment (0, 1, 0 alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.cuda.is_available():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def _init_distributed(device: torch.device) -> bool:
    import torch.distributed as dist

    _, world, _ = dist_info()
    if world <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return True


@torch.inference_mode()
def score_rows(
    model: nn.Module,
    get_windows: Callable[[np.ndarray], np.ndarray],
    rows: np.ndarray,
    device: torch.device,
    batch: int = 4096,
) -> np.ndarray:
    """Logits ``float64 [n]`` of the given rows, in eval mode, batch by batch."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(rows), batch):
        x = torch.from_numpy(get_windows(rows[start:start + batch])).to(device)
        out.append(model(x).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def _sync_buffers(model: nn.Module) -> None:
    import torch.distributed as dist

    with torch.no_grad():
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _bce(y: np.ndarray, z: np.ndarray) -> float:
    # Numerically stable mean binary cross-entropy on logits.
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


def _smote(
    windows: np.ndarray, y: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    from imblearn.over_sampling import SMOTE

    n, w, f = windows.shape
    counts = np.bincount(y, minlength=2)
    k = int(min(5, counts.min() - 1))
    if k < 1:
        raise BadInputError("SMOTE needs at least two rows of each class in train")
    flat, labels = SMOTE(random_state=seed, k_neighbors=k).fit_resample(
        windows.reshape(n, w * f), y)
    return flat.reshape(-1, w, f).astype(np.float32), labels.astype(np.int64)


def watched_rows(
    prep: Prepared, train_rows: np.ndarray, val_rows: np.ndarray, stop_rows: str
) -> np.ndarray:
    """Mask over ``val_rows``: the rows early stopping watches (see TrainConfig).

    ``seen`` keeps benign rows and rows whose label text (``prep.details``) is one
    of the malicious types among ``train_rows``. Without label texts, or where that
    leaves one class only, every row is watched.
    """
    every = np.ones(len(val_rows), dtype=bool)
    if stop_rows == "all" or prep.details is None:
        return every
    details = prep.details.astype(str)
    y_tr, y_va = prep.y[train_rows], prep.y[val_rows]
    seen_types = np.unique(details[train_rows][y_tr == 1])
    mask = (y_va == 0) | np.isin(details[val_rows], seen_types)
    if np.unique(y_va[mask]).size < 2:
        logger.warning("stop_rows=seen leaves one class in validation; watching all")
        return every
    return mask


def _category_codes(prep: Prepared, rows: np.ndarray, name: str) -> np.ndarray:
    """The category of field ``name`` in the last flow of each row's window, as the
    column of its one-hot block that is set (for benign_power)."""
    block = getattr(prep.encoder, "category_block", lambda _: None)(name)
    if block is None:
        names = [f.name for f in getattr(prep.encoder, "categorical", [])]
        raise UsageError(
            f"benign_group {name!r} is not a categorical field of the {prep.family} "
            f"encoder (its categorical fields: {', '.join(names) or 'none'})")
    start, stop = block
    return np.argmax(prep.X[prep.idx[rows, -1], start:stop], axis=1).astype(np.int64)


def forest_scores(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Out-of-bag probability of "malicious" for each training window ``x``.

    The Random Forest of ``teacher baselines`` (same trees, seeded with ``seed``),
    fitted on ``x`` flattened; each window is scored by the trees whose bootstrap
    sample left it out, so the score says how a forest judges a row it has not
    learned. A row that every tree saw (rare with 100 trees) keeps its label.
    Float32 ``[N]``; fitted on as many threads as torch uses.
    """
    from teacher.baselines import _build

    logger.info("fitting the forest of --forest-targets on %d training windows "
                "(100 trees)", len(x))
    forest = _build("rf", seed).set_params(oob_score=True,
                                           n_jobs=torch.get_num_threads())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "some inputs have no OOB"
        forest.fit(x.reshape(len(x), -1), y)
    oob = forest.oob_decision_function_[:, list(forest.classes_).index(1)]
    return np.where(np.isnan(oob), y, oob).astype(np.float32)


def _epoch_order(
    y: np.ndarray, n: int, balance: bool, seed: int, epoch: int,
    types: np.ndarray | None = None, type_power: float = 1.0,
    groups: np.ndarray | None = None, benign_power: float = 1.0,
) -> np.ndarray:
    """The seeded sample of training positions for one epoch (same on every rank).

    Balanced: half benign, half malicious; ``types`` (a label per row) and
    ``type_power`` share the malicious half among types, ``groups`` (a category
    per row) and ``benign_power`` the benign half among groups (see TrainConfig).
    """
    rng = np.random.default_rng([seed, epoch])
    if not balance:
        if n <= len(y):
            return rng.permutation(len(y))[:n]
        return rng.integers(0, len(y), n)
    counts = np.bincount(y, minlength=2).astype(np.float64)
    weights = np.where(counts[y] > 0, 1.0 / np.maximum(counts[y], 1), 0.0)
    for label, kinds, power in ((1, types, type_power), (0, groups, benign_power)):
        rows = y == label
        if kinds is not None and power != 1.0 and rows.any():
            # This class's half shared among its kinds by (rows of the kind)^power.
            _, which, per_kind = np.unique(kinds[rows], return_inverse=True,
                                           return_counts=True)
            share = per_kind.astype(np.float64) ** power
            weights[rows] = (share / share.sum())[which] / per_kind[which]
    weights /= weights.sum()
    return rng.choice(len(y), size=n, replace=True, p=weights)


def _with_outliers(
    x: torch.Tensor,
    target: torch.Tensor,
    share: float,
    swap: float,
    fields: torch.Tensor | None = None,
    donors_from: str = "any",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch with its first ``share`` of windows made anomalies (see
    TrainConfig.outliers): ``swap`` of each one's features (the same ones at every
    step of the window) replaced by another window's, and the label set to 1.
    With ``fields`` (the input field of each feature column, int64 ``[F]``) whole
    fields are swapped: ``swap`` of the fields, every column of a chosen one.
    ``donors_from`` "malicious" draws the donor windows among those labelled 1,
    "benign" among those labelled 0 (any window when the batch holds none)."""
    n = int(round(share * x.shape[0]))
    if n == 0:
        return x, target
    pool = torch.arange(x.shape[0], device=x.device)
    wanted = {"malicious": target > 0.5, "benign": target <= 0.5}.get(donors_from)
    if wanted is not None and bool(wanted.any()):
        pool = pool[wanted]
    donors = x[pool[torch.randint(0, len(pool), (n,), device=x.device)]]
    if fields is None:
        taken = torch.rand(n, 1, x.shape[2], device=x.device) < swap
    else:
        count = int(fields.max()) + 1
        taken = (torch.rand(n, 1, count, device=x.device) < swap)[:, :, fields]
    x = x.clone()
    x[:n] = torch.where(taken, donors, x[:n])
    target = target.clone()
    target[:n] = 1.0
    return x, target


def _with_benign_mixup(
    x: torch.Tensor, target: torch.Tensor, share: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch with its last ``share`` of windows replaced by blends of two of its
    benign windows (see TrainConfig.benign_mixup), labelled 0; unchanged when the
    batch holds no benign window."""
    n = int(round(share * x.shape[0]))
    benign = torch.nonzero(target <= 0.5).flatten()
    if n == 0 or len(benign) == 0:
        return x, target

    a = x[benign[torch.randint(0, len(benign), (n,), device=x.device)]]
    b = x[benign[torch.randint(0, len(benign), (n,), device=x.device)]]
    weight = torch.rand(n, 1, 1, device=x.device, dtype=x.dtype)
    x = x.clone()
    x[-n:] = weight * a + (1 - weight) * b
    target = target.clone()
    target[-n:] = 0.0
    return x, target


def fit(
    prep: Prepared,
    model_config: TeacherConfig | None = None,
    train_config: TrainConfig | None = None,
    *,
    init_state: dict[str, torch.Tensor] | None = None,
    train_rows: np.ndarray | None = None,
    val_rows: np.ndarray | None = None,
    extra_train: tuple[np.ndarray, np.ndarray] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    target_f1: float | None = None,
) -> TrainResult:
    """Train a teacher on ``prep`` and return the best epoch's model and threshold.

    ``model_config`` defaults to ``TeacherConfig(n_features, window)``; its
    ``n_features``/``window`` must match the data. ``init_state`` starts from given
    weights (transfer, incremental update). ``train_rows``/``val_rows`` override the
    splits; ``extra_train`` adds ``(windows, labels)`` to the training part (a replay
    buffer). ``on_epoch`` gets each epoch's history record (for a progress bar).
    ``target_f1``: note the first epoch whose validation F1 reaches it (benchmarks).
    """
    tc = train_config or TrainConfig()
    mc = model_config or TeacherConfig(n_features=prep.n_features, window=prep.window)
    if (mc.n_features, mc.window) != (prep.n_features, prep.window):
        raise ModelError(
            f"model expects W={mc.window}, F={mc.n_features} but the data has "
            f"W={prep.window}, F={prep.n_features}"
        )
    if mc.members > 1:
        return _fit_ensemble(
            prep, mc, tc, init_state=init_state, train_rows=train_rows,
            val_rows=val_rows, extra_train=extra_train, on_epoch=on_epoch)
    start_time = time.monotonic()
    rank, world, local = dist_info()
    device = pick_device(tc.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    distributed = _init_distributed(device)
    _seed_everything(tc.seed)

    # Rows of each part.
    tr = prep.rows("train") if train_rows is None else np.asarray(train_rows)
    va = prep.rows("val") if val_rows is None else np.asarray(val_rows)
    if tr.size < 2 or va.size < 1:
        labeled = int((prep.y >= 0).sum())
        why = (f"none of its {len(prep.y)} rows has a label (0/1)" if not labeled
               else f"{labeled} of its {len(prep.y)} rows are labeled")
        raise BadInputError(
            f"{prep.name}: need labeled training and validation rows, got "
            f"{tr.size} and {va.size}; {why}")
    y_tr = prep.y[tr].astype(np.int64)
    y_va = prep.y[va].astype(np.float64)
    watch_mask = watched_rows(prep, tr, va, tc.stop_rows)
    present = np.unique(y_tr if extra_train is None
                        else np.concatenate([y_tr, extra_train[1]]))
    if present.size < 2:
        only = "benign (0)" if present.size and present[0] == 0 else "malicious (1)"
        raise BadInputError(
            f"{prep.name}: its {tr.size} labeled training rows are all {only}; the "
            "teacher needs both benign and malicious training rows")

    # Label types of the training rows, for type_power (replay rows: one type).
    types_tr = None
    if tc.type_power != 1.0 and prep.details is not None:
        types_tr = prep.details[tr].astype(str)
        if extra_train is not None:
            types_tr = np.concatenate(
                [types_tr, np.full(len(extra_train[1]), "(replay)")])

    # Categories of the training rows' last flows, for benign_power (replay rows:
    # a group of their own).
    groups_tr = None
    if tc.benign_power != 1.0:
        groups_tr = _category_codes(prep, tr, tc.benign_group)
        if extra_train is not None:
            groups_tr = np.concatenate(
                [groups_tr, np.full(len(extra_train[1]), -1, dtype=np.int64)])

    # Training windows: gathered on demand, or materialised for SMOTE and replay.
    train_x: np.ndarray | None = None
    if tc.smote or extra_train is not None:
        train_x = prep.windows(tr)
        if extra_train is not None:
            train_x = np.concatenate([train_x, extra_train[0].astype(np.float32)])
            y_tr = np.concatenate([y_tr, extra_train[1].astype(np.int64)])
        if tc.smote:
            train_x, y_tr = _smote(train_x, y_tr, tc.seed)
            logger.info("SMOTE: %d training windows after resampling", len(y_tr))

    def train_windows(pos: np.ndarray) -> np.ndarray:
        return train_x[pos] if train_x is not None else prep.windows(tr[pos])

    # The forest's out-of-bag scores of the training rows, for forest_targets.
    forest_tr = None
    if tc.forest_targets > 0:
        every = np.arange(len(y_tr))
        forest_tr = forest_scores(train_windows(every), y_tr, tc.seed)

    def val_windows(pos: np.ndarray) -> np.ndarray:
        return prep.windows(pos)

    # Model, optimiser, mixed precision on CUDA.
    model = TeacherNet(mc)
    if mc.subspace < 1.0 and mc.members == 1:
        model.draw_feature_mask(tc.seed)
    if init_state is not None:
        try:
            model.load_state_dict(init_state, strict=True)
        except RuntimeError as exc:
            raise ModelError(f"initial weights do not fit the model: {exc}") from exc
    model.to(device)
    net: nn.Module = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.Adam(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    use_amp = tc.amp and device.type == "cuda"
    bf16 = use_amp and torch.cuda.is_bf16_supported()
    amp_dtype = torch.bfloat16 if bf16 else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and not bf16)
    loss_fn = nn.BCEWithLogitsLoss()
    averaged = None
    if tc.ema > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(tc.ema),
                                 use_buffers=True)
    watched = model if averaged is None else averaged.module
    fields = None
    if tc.outliers > 0 and tc.outlier_unit == "field":
        of_column = getattr(prep.encoder, "field_of_column", None)
        if of_column is None or len(of_column) != prep.n_features:
            raise UsageError(f"{prep.name}: outlier_unit 'field' needs the "
                             "encoder's field of each feature column")
        fields = torch.as_tensor(of_column, dtype=torch.int64, device=device)

    # Every rank takes an equal slice of each global batch.
    per_rank = max(2, tc.batch_size // world)
    n_samples = tc.samples_per_epoch or min(len(y_tr), EPOCH_SAMPLES)
    steps = max(1, n_samples // (per_rank * world))
    sched = None
    if tc.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tc.epochs * steps)

    history: list[dict[str, Any]] = []
    best_loss, best_epoch, best_state, stale = math.inf, 0, None, 0
    best_watch = math.inf
    reached_at = None
    for epoch in range(1, tc.epochs + 1):
        t0 = time.monotonic()
        net.train()
        order = _epoch_order(y_tr, steps * per_rank * world, tc.balance, tc.seed,
                             epoch, types_tr, tc.type_power, groups_tr,
                             tc.benign_power)
        total, seen = 0.0, 0
        for step in range(steps):
            chunk = order[step * per_rank * world:(step + 1) * per_rank * world]
            mine = chunk[rank::world]
            x = torch.from_numpy(train_windows(mine)).to(device, non_blocking=True)
            target = torch.from_numpy(y_tr[mine].astype(np.float32)).to(device)
            if forest_tr is not None:
                forest = torch.from_numpy(forest_tr[mine]).to(device)
                target = (1 - tc.forest_targets) * target + tc.forest_targets * forest
            if tc.outliers > 0:
                x, target = _with_outliers(x, target, tc.outliers, tc.outlier_swap,
                                           fields, tc.outlier_donors)
            if tc.benign_mixup > 0:
                x, target = _with_benign_mixup(x, target, tc.benign_mixup)
            if tc.input_noise > 0:
                x = x + tc.input_noise * torch.randn_like(x)
            if tc.feature_dropout > 0:
                # Zero whole features of a window (same ones at every step).
                keep = torch.rand(x.shape[0], 1, x.shape[2], device=x.device)
                x = x * (keep >= tc.feature_dropout).to(x.dtype)
            if tc.label_smoothing > 0:
                target = target * (1 - tc.label_smoothing) + 0.5 * tc.label_smoothing
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                loss = loss_fn(net(x).float(), target)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if averaged is not None:
                averaged.update_parameters(model)
            if sched is not None:
                sched.step()
            total += float(loss.detach()) * len(mine)
            seen += len(mine)

        # BatchNorm statistics: each rank's last forward updated them on its own
        # slice, so take rank 0's; then every rank holds the same model.
        if distributed:
            _sync_buffers(model)
            if averaged is not None:
                _sync_buffers(averaged)

        # Validation on every rank (same weights, same numbers, no gather needed).
        z = score_rows(watched, val_windows, va, device)
        val_loss = _bce(y_va, z)
        prob = _sigmoid(z)
        cut = choose_threshold(y_va, prob, tc.threshold_rule, tc.target_fpr)
        m = binary_metrics(y_va, prob, cut)
        record = {
            "epoch": epoch, "train_loss": total / max(seen, 1), "val_loss": val_loss,
            "val_f1": m["f1"], "val_accuracy": m["accuracy"], "val_auc": m["roc_auc"],
            "val_threshold": cut, "lr": opt.param_groups[0]["lr"],
            "seconds": time.monotonic() - t0,
            "elapsed_s": time.monotonic() - start_time,
        }
        if not watch_mask.all():
            z_w, y_w = z[watch_mask], y_va[watch_mask]
            record["watch_loss"] = _bce(y_w, z_w)
            cut_w = choose_threshold(y_w, _sigmoid(z_w), tc.threshold_rule,
                                     tc.target_fpr)
            record["watch_f1"] = binary_metrics(y_w, _sigmoid(z_w), cut_w)["f1"]
        history.append(record)
        if target_f1 is not None and reached_at is None and m["f1"] >= target_f1:
            reached_at = {"epoch": epoch, "elapsed_s": record["elapsed_s"]}
        if on_epoch is not None and rank == 0:
            on_epoch(record)
        logger.debug("epoch %d: %s", epoch, record)

        # Early stopping on validation loss (or -F1) of the watched rows; keep the
        # best weights (or, with keep=last, every epoch's until the last).
        if tc.stop_on == "loss":
            watch = record.get("watch_loss", val_loss)
        else:
            watch = -record.get("watch_f1", m["f1"])
        if tc.keep == "last" or watch < best_watch - 1e-6:
            best_watch, best_loss, best_epoch, stale = watch, val_loss, epoch, 0
            best_state = copy.deepcopy({k: v.detach().cpu()
                                        for k, v in watched.state_dict().items()})
        else:
            stale += 1
        over_time = tc.max_minutes is not None and \
            (time.monotonic() - start_time) / 60 > tc.max_minutes
        if (stale >= tc.patience and tc.keep == "best") or over_time:
            break

    # Best weights, then the threshold on validation scores.
    model.load_state_dict(best_state)
    model.eval()
    prob = _sigmoid(score_rows(model, val_windows, va, device))
    cut = choose_threshold(y_va, prob, tc.threshold_rule, tc.target_fpr)
    fams = prep.families[va] if prep.families is not None else None
    val_metrics = binary_metrics(y_va, prob, cut, families=fams)
    val_metrics["loss"] = best_loss
    threshold = {"threshold": cut, "rule": tc.threshold_rule, "chosen_on": "val"}
    if tc.threshold_rule == "fpr":
        threshold["target_fpr"] = tc.target_fpr
    wall = time.monotonic() - start_time
    logger.info("trained %d epochs (best %d, val loss %.4f, val F1 %.4f) in %.1f s",
                len(history), best_epoch, best_loss, val_metrics["f1"], wall)
    return TrainResult(
        model=model.cpu(), history=history, threshold=threshold,
        val_metrics=val_metrics, best_epoch=best_epoch, epochs_run=len(history),
        wall_s=wall, train_config=asdict(tc), reached_at=reached_at,
    )


def _fit_ensemble(
    prep: Prepared,
    mc: TeacherConfig,
    tc: TrainConfig,
    *,
    init_state: dict[str, torch.Tensor] | None,
    train_rows: np.ndarray | None,
    val_rows: np.ndarray | None,
    extra_train: tuple[np.ndarray, np.ndarray] | None,
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> TrainResult:
    """Train ``mc.members`` single networks apart (seeds ``seed``, ``seed + 1``...).

    Each member stops early on its own; ``max_minutes`` is shared out equally.
    The threshold is then chosen on the averaged logits of the validation rows.
    The history holds one record per epoch: member means, and each member's own
    record under ``members``.
    """
    import dataclasses

    start_time = time.monotonic()
    single = mc.replace(members=1)
    share = None if tc.max_minutes is None else tc.max_minutes / mc.members
    ensemble = TeacherNet(mc)

    # Members one after the other, each from its own seed.
    parts: list[list[dict[str, Any]]] = []
    best_epochs, runs = [], 0
    for i, member in enumerate(ensemble.members):
        start = None
        if init_state is not None:
            prefix = f"members.{i}."
            start = {k[len(prefix):]: v for k, v in init_state.items()
                     if k.startswith(prefix)}
        member_tc = dataclasses.replace(tc, seed=tc.seed + i, max_minutes=share)
        part = fit(prep, single, member_tc, init_state=start, train_rows=train_rows,
                   val_rows=val_rows, extra_train=extra_train, on_epoch=on_epoch)
        member.load_state_dict(part.model.state_dict())
        parts.append(part.history)
        best_epochs.append(part.best_epoch)
        runs += part.epochs_run

    # One history record per epoch: the mean over the members that ran it.
    history: list[dict[str, Any]] = []
    for epoch in range(1, max(len(p) for p in parts) + 1):
        ran = [p[epoch - 1] for p in parts if len(p) >= epoch]
        record: dict[str, Any] = {"epoch": epoch}
        for key in ran[0]:
            if key != "epoch":
                record[key] = float(np.mean([r[key] for r in ran]))
        record["members"] = [{"member": i, **p[epoch - 1]}
                             for i, p in enumerate(parts) if len(p) >= epoch]
        history.append(record)

    # Threshold on the ensemble's validation scores.
    ensemble.eval()
    va = prep.rows("val") if val_rows is None else np.asarray(val_rows)
    y_va = prep.y[va].astype(np.float64)
    z = score_rows(ensemble, prep.windows, va, torch.device("cpu"))
    prob = _sigmoid(z)
    cut = choose_threshold(y_va, prob, tc.threshold_rule, tc.target_fpr)
    fams = prep.families[va] if prep.families is not None else None
    val_metrics = binary_metrics(y_va, prob, cut, families=fams)
    val_metrics["loss"] = _bce(y_va, z)
    threshold = {"threshold": cut, "rule": tc.threshold_rule, "chosen_on": "val"}
    if tc.threshold_rule == "fpr":
        threshold["target_fpr"] = tc.target_fpr
    wall = time.monotonic() - start_time
    logger.info("trained an ensemble of %d (best epochs %s, val F1 %.4f) in %.1f s",
                mc.members, best_epochs, val_metrics["f1"], wall)
    return TrainResult(
        model=ensemble, history=history, threshold=threshold,
        val_metrics=val_metrics, best_epoch=max(best_epochs), epochs_run=runs,
        wall_s=wall, train_config=asdict(tc),
    )
