"""Grid search for the teacher, scored on validation data only.

:func:`tune` trains one short run per grid point (learning rate, number of conv
blocks, filters per block, batch size, and optionally window length and dropout) in
a seeded shuffled order until the time budget is spent, and ranks the runs by
validation F1 (ties: lower validation loss). Test rows are never looked at.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from flows.errors import UsageError
from teacher import logger
from teacher.data import Prepared
from teacher.model import TeacherConfig
from teacher.train import TrainConfig, fit

__all__ = ["DEFAULT_GRID", "rank_rows", "tune", "write_table"]

DEFAULT_GRID: dict[str, list[Any]] = {
    "lr": [1e-3, 3e-3],
    "conv_layers": [1, 2],
    "filters": [32, 64],
    "batch_size": [256, 512],
}

TRAIN_KEYS = ("weight_decay", "input_noise", "label_smoothing", "ema")

COLUMNS = ("rank", "val_f1", "val_loss", "val_auc", "best_epoch", "seconds",
           "window", "lr", "conv_layers", "filters", "batch_size", "dropout",
           "lstm_hidden", "weight_decay", "input_noise", "label_smoothing", "ema")


def _points(grid: dict[str, list[Any]], seed: int) -> list[dict[str, Any]]:
    keys = sorted(grid)
    points = [dict(zip(keys, values, strict=True))
              for values in itertools.product(*(grid[k] for k in keys))]
    order = np.random.default_rng(seed).permutation(len(points))
    return [points[i] for i in order]


def tune(
    preps: dict[int, Prepared],
    budget_minutes: float,
    grid: dict[str, list[Any]] | None = None,
    *,
    base_model: dict[str, Any] | None = None,
    base_train: TrainConfig | None = None,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run grid points until ``budget_minutes`` is spent; rows ranked best first.

    ``preps`` maps a window length to the data prepared with it (one entry when
    the window is not tuned). Grid keys: ``lr``, ``conv_layers``, ``filters``,
    ``batch_size``, and optionally ``window`` (a key of ``preps``), ``dropout``
    and ``lstm_hidden``.
    """
    grid = dict(grid or DEFAULT_GRID)
    grid.setdefault("window", sorted(preps))
    unknown = set(grid) - {"lr", "conv_layers", "filters", "batch_size", "window",
                           "dropout", "lstm_hidden", *TRAIN_KEYS}
    if unknown:
        raise UsageError(f"unknown grid keys: {sorted(unknown)}")
    missing = [w for w in grid["window"] if w not in preps]
    if missing:
        raise UsageError(f"no prepared data for window(s) {missing}")
    base_train = base_train or TrainConfig(epochs=8, patience=3,
                                           samples_per_epoch=40000)
    start = time.monotonic()
    rows: list[dict[str, Any]] = []
    points = _points(grid, base_train.seed)
    for i, point in enumerate(points):
        spent = (time.monotonic() - start) / 60
        if rows and spent >= budget_minutes:
            logger.info("tuning budget spent after %d of %d points", i, len(points))
            break
        prep = preps[point["window"]]
        model_kw = dict(base_model or {})
        model_kw.update(n_features=prep.n_features, window=point["window"],
                        conv_filters=(point["filters"],) * point["conv_layers"])
        for key in ("dropout", "lstm_hidden"):
            if key in point:
                model_kw[key] = point[key]
        mc = TeacherConfig(**model_kw)
        remaining = max(0.5, budget_minutes - spent)
        extra = {k: point[k] for k in TRAIN_KEYS if k in point}
        tc = replace(base_train, lr=point["lr"], batch_size=point["batch_size"],
                     max_minutes=remaining, **extra)
        result = fit(prep, mc, tc)
        row = {
            **point, "dropout": mc.dropout, "lstm_hidden": mc.lstm_hidden,
            **{k: getattr(tc, k) for k in TRAIN_KEYS},
            "val_f1": result.val_metrics["f1"], "val_loss": result.val_metrics["loss"],
            "val_auc": result.val_metrics["roc_auc"], "best_epoch": result.best_epoch,
            "seconds": result.wall_s,
        }
        rows.append(row)
        if on_trial is not None:
            on_trial(row)
    return rank_rows(rows)


def rank_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` best first (validation F1, then loss), each given its ``rank``."""
    rows.sort(key=lambda r: (-r["val_f1"], r["val_loss"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def write_table(rows: list[dict[str, Any]], out_dir: str | Path) -> Path:
    """Write ``tune.json``, ``tune.csv`` and ``tune.md`` (ranked) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune.json").write_text(json.dumps(rows, indent=2) + "\n")
    fmt = {float: lambda v: f"{v:.4g}"}

    def cell(value: Any) -> str:
        return fmt.get(type(value), str)(value)

    lines = [",".join(COLUMNS)]
    lines += [",".join(cell(r.get(c, "")) for c in COLUMNS) for r in rows]
    (out / "tune.csv").write_text("\n".join(lines) + "\n")
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(cell(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    (out / "tune.md").write_text("\n".join(md) + "\n")
    return out
