"""Scoring a teacher on prepared rows: detection metrics plus CPU latency.

:func:`evaluate` scores the chosen rows with the checkpoint's own threshold, adds
per-family recall where the data has families, and times the network on the CPU
with one thread: the p50/p99 latency of one window at a time and the throughput of
batches of 256 windows.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch

from flows.errors import BadInputError, ModelError
from teacher.checkpoint import Teacher
from teacher.data import Prepared
from teacher.metrics import binary_metrics, time_scorer

__all__ = ["cpu_timing", "evaluate", "one_thread"]


class one_thread:
    """Context manager: torch (and BLAS through threadpoolctl) on one CPU thread."""

    def __enter__(self) -> one_thread:
        self._torch = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            from threadpoolctl import threadpool_limits

            self._pool = threadpool_limits(limits=1)
        except ImportError:  # pragma: no cover - sklearn depends on threadpoolctl
            self._pool = None
        return self

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self._torch)
        if self._pool is not None:
            self._pool.restore_original_limits()


def cpu_timing(teacher: Teacher, windows: np.ndarray) -> dict[str, float]:
    """Latency (batch 1) and throughput (batch 256) of the teacher on 1 CPU thread."""
    cpu = copy.copy(teacher)
    cpu.model = copy.deepcopy(teacher.model).cpu().eval()
    with one_thread():
        return time_scorer(cpu.predict_proba, windows[:512])


def evaluate(
    teacher: Teacher,
    prep: Prepared,
    rows: np.ndarray,
    timing: bool = True,
) -> dict[str, Any]:
    """Metrics of ``teacher`` on the labeled ``rows`` of ``prep`` (plus timing)."""
    rows = np.asarray(rows, dtype=np.int64)
    rows = rows[prep.y[rows] >= 0]
    if rows.size == 0:
        raise BadInputError(f"{prep.name}: no labeled rows to evaluate on")

    start = time.perf_counter()
    windows = prep.windows(rows)
    prob = teacher.predict_proba(windows)
    scored_s = time.perf_counter() - start
    bad = ~np.isfinite(np.asarray(prob, dtype=np.float64))
    if bad.any():
        # Weights that load finite can still overflow; name the checkpoint.
        which = f"checkpoint {teacher.path}" if teacher.path else "the teacher"
        raise ModelError(
            f"{which}: its model scores NaN: the weights are damaged ({int(bad.sum())}"
            f" of {bad.size} windows scored NaN or infinite)")
    fams = prep.families[rows] if prep.families is not None else None
    out = binary_metrics(prep.y[rows], prob, teacher.threshold, families=fams)
    out["threshold_rule"] = teacher.threshold_info.get("rule")
    out["scoring_s"] = scored_s
    if timing:
        out.update(cpu_timing(teacher, windows))
    return out
