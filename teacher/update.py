"""Incremental learning: fine-tune a teacher on new data without forgetting the old.

A checkpoint may carry a replay buffer (``replay.safetensors``: a seeded,
class-balanced sample of its training windows and labels, written by
``teacher train``). :func:`update` fine-tunes the checkpoint on the new data's
training rows plus that buffer, picks the epoch and threshold on the new data's
validation rows (plus the old data's, when the old data can be prepared again), and
reports F1 on the old and new test rows before and after, so forgetting shows.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from flows.errors import BadInputError, ModelError
from teacher import logger
from teacher.checkpoint import Teacher, write_checksums
from teacher.data import Prepared, check_teacher_files, concat
from teacher.metrics import binary_metrics
from teacher.train import TrainConfig, TrainResult, fit

__all__ = ["REPLAY_FILE", "load_replay", "make_replay", "save_replay", "update"]

REPLAY_FILE = "replay.safetensors"


def make_replay(
    prep: Prepared, size: int = 5000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded sample of training windows, half of each class where possible."""
    rows = prep.rows("train")
    rng = np.random.default_rng(seed)
    picked = []
    for value in (0, 1):
        part = rows[prep.y[rows] == value]
        take = min(len(part), size // 2)
        if take:
            picked.append(rng.choice(part, size=take, replace=False))
    chosen = np.sort(np.concatenate(picked)) if picked else rows[:0]
    return prep.windows(chosen), prep.y[chosen].astype(np.int8)


def save_replay(ckpt_dir: str | Path, windows: np.ndarray, labels: np.ndarray) -> Path:
    """Write the replay buffer next to a checkpoint (safetensors, no pickle).

    The checkpoint's ``checksums.json`` is rewritten to cover it.
    """
    from safetensors.numpy import save_file

    path = Path(ckpt_dir) / REPLAY_FILE
    save_file({"windows": np.ascontiguousarray(windows, dtype=np.float32),
               "labels": np.ascontiguousarray(labels, dtype=np.int8)}, str(path))
    write_checksums(ckpt_dir)
    return path


def load_replay(ckpt_dir: str | Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The checkpoint's replay buffer, or None when it has none."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(ckpt_dir) / REPLAY_FILE
    if not path.is_file():
        return None
    try:
        data = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"cannot read the replay buffer {path}: {exc}") from exc
    return data["windows"], data["labels"]


def _scores(teacher_like: Any, prep: Prepared | None, threshold: float,
            name: str) -> dict[str, float | None]:
    """F1 and false-positive rate on the test rows of ``prep`` (``name``: old or
    new), as ``{name}_test_f1`` and ``{name}_test_fpr``; None where the rows
    cannot give one: no test rows, no malicious rows (F1), no benign rows (FPR)."""
    out: dict[str, float | None] = {f"{name}_test_f1": None, f"{name}_test_fpr": None}
    if prep is None:
        return out
    rows = prep.rows("test")
    if rows.size == 0:
        return out
    y = prep.y[rows]
    m = binary_metrics(y, teacher_like(prep.windows(rows)), threshold)
    if (y == 1).any():
        out[f"{name}_test_f1"] = m["f1"]
    if (y == 0).any():
        out[f"{name}_test_fpr"] = m["fpr"]
    return out


def _test_rows(prep: Prepared | None) -> dict[str, int] | None:
    """How many benign and malicious test rows ``prep`` holds (None: no data)."""
    if prep is None:
        return None
    y = prep.y[prep.rows("test")]
    return {"benign": int((y == 0).sum()), "malicious": int((y == 1).sum())}


def _check_labels(
    new: Prepared,
    n_train: int,
    n_val: int,
    replay: tuple[np.ndarray, np.ndarray] | None,
    old: Prepared | None,
) -> None:
    """Refuse (BadInputError) an update without the labeled rows it needs: two
    training rows of the new data, and one validation row of the new or old data.
    The message counts the new file's rows; the replay buffer and the old data only
    keep the old traffic in mind, so they are named apart."""
    if n_train >= 2 and n_val >= 1:
        return
    labeled = int((new.y >= 0).sum())
    rows = len(new.y)
    have = (f"none of its {rows} rows has a label (0/1)" if not labeled
            else f"{labeled} of its {rows} rows are labeled, {n_train} in its "
                 f"training part and {int(new.rows('val').size)} in its "
                 "validation part")
    if n_train < 2:
        need = "an update needs at least 2 labeled training rows of the new data"
        kept = [f"the checkpoint's {len(replay[1])} replay rows"] if replay else []
        kept += [f"the old data, {old.name},"] if old is not None else []
        if kept:
            need += f" ({' and '.join(kept)} only guard against forgetting)"
    else:
        where = "the new data" + (f" or {old.name}" if old is not None else "")
        need = f"an update needs a labeled validation row of {where}"
    raise BadInputError(f"{new.name}: {have}; {need}")


def update(
    teacher: Teacher,
    new: Prepared,
    old: Prepared | None = None,
    replay: tuple[np.ndarray, np.ndarray] | None = None,
    train_config: TrainConfig | None = None,
    target_f1: float | None = None,
) -> tuple[TrainResult, dict[str, Any]]:
    """Fine-tune ``teacher`` on ``new`` with a replay buffer; returns (result, report).

    ``new`` and ``old`` must be encoded with the teacher's encoder. The report
    holds F1 and the false-positive rate on old and new test rows before and
    after (None where the rows hold no malicious, or no benign, row), how many
    of each the test rows hold, the replay size and the
    wall time. ``target_f1`` is passed to :func:`~teacher.train.fit` (benchmarks).
    A file of ``old`` that the teacher's provenance records with another sha256
    (changed since it was trained) is a BadInputError: its test rows would not be
    the teacher's, so the forgetting check would measure nothing.
    """
    if (new.n_features, new.window) != (teacher.config.n_features,
                                        teacher.config.window):
        raise BadInputError("new data was not encoded with the teacher's encoder")
    if old is not None:
        check_teacher_files(old.files, getattr(teacher, "provenance", None),
                            getattr(teacher, "path", None))
    tc = train_config or TrainConfig(epochs=10, patience=3, lr=3e-4)

    # Data: new train + replay; validation on new val (and old val when known).
    parts = [new] if old is None else [new, old]
    both = concat(parts, name=new.name) if old is not None else new
    n_new = len(new.X)
    train_rows = np.flatnonzero((both.split == "train") & (both.y >= 0)
                                & (np.arange(len(both.y)) < n_new))
    val_rows = both.rows("val")
    _check_labels(new, train_rows.size, val_rows.size, replay, old)

    # Before: the checkpoint as it is.
    before = {**_scores(teacher.predict_proba, old, teacher.threshold, "old"),
              **_scores(teacher.predict_proba, new, teacher.threshold, "new")}
    if replay is None and old is not None:
        replay = make_replay(old, seed=tc.seed)
    start = time.monotonic()
    init = {k: v.detach().cpu().clone() for k, v in teacher.model.state_dict().items()}
    result = fit(both, teacher.config, replace(tc), init_state=init,
                 train_rows=train_rows, val_rows=val_rows, extra_train=replay,
                 target_f1=target_f1)
    wall = time.monotonic() - start

    # After: the fine-tuned model with its new threshold.
    from teacher.checkpoint import Teacher as _Teacher

    after_teacher = _Teacher(model=result.model.eval(), encoder=teacher.encoder,
                             threshold=result.threshold["threshold"],
                             config=teacher.config)
    cut = after_teacher.threshold
    after = {**_scores(after_teacher.predict_proba, old, cut, "old"),
             **_scores(after_teacher.predict_proba, new, cut, "new")}
    report = {
        "before": before, "after": after,
        "old_test_rows": _test_rows(old), "new_test_rows": _test_rows(new),
        "replay_size": 0 if replay is None else int(len(replay[1])),
        "new_train_rows": int(train_rows.size), "val_rows": int(val_rows.size),
        # As teacher train reports them: "epochs" per member (the longest run),
        # the ensemble's total apart.
        "epochs": len(result.history),
        "members": int(getattr(teacher.config, "members", 1) or 1),
        "epochs_all_members": result.epochs_run, "best_epoch": result.best_epoch,
        "wall_s": wall, "threshold": result.threshold,
    }
    logger.info("update: %s -> %s", before, after)
    return result, report
