"""Repeated latency and throughput measurement, and the statistics the report uses.

Every scorer is timed the way :func:`teacher.metrics.time_scorer` does it (one
window at a time for latency, full batches of 256 for throughput, on one thread set
by the caller), but several times, and the raw batch-1 samples are kept so the report
can draw their distribution. :func:`interleaved` runs the repeats of several scorers
in turn (A, B, C, A, B, C, ...), so a burst of load on a shared machine hits every
model alike and the ratios measured in one run stay fair.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Timing", "interleaved", "ratio_stats", "spread", "time_once"]

Score = Callable[[np.ndarray], Any]


@dataclass
class Timing:
    """The repeats of one scorer: per-repeat p50, p99, throughput and raw samples."""

    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    throughput: list[float] = field(default_factory=list)
    samples: list[np.ndarray] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Median over repeats with min and max, in the keys results.json uses."""
        out: dict[str, Any] = {"repeats": len(self.p50)}
        for key, values in (
            ("latency_us_p50", self.p50),
            ("latency_us_p99", self.p99),
            ("throughput_flows_s", self.throughput),
        ):
            stats = spread(values)
            out[key] = stats["median"]
            out[key + "_range"] = [stats["min"], stats["max"]]
        return out

    def all_samples(self) -> np.ndarray:
        """Every batch-1 latency sample (µs) of every repeat."""
        if not self.samples:
            return np.zeros(0)
        return np.concatenate(self.samples)


def spread(values: Sequence[float]) -> dict[str, float | None]:
    """Median, min and max of ``values`` (None for each when empty)."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if arr.size == 0:
        return {"median": None, "min": None, "max": None}
    return {
        "median": float(np.median(arr)),
        "min": float(arr.min()),
        "max": float(arr.max()),
    }


def time_once(
    score: Score,
    windows: np.ndarray,
    n_single: int,
    n_batches: int,
    batch: int = 256,
    warmup: int = 10,
) -> tuple[float, float, float, np.ndarray]:
    """One repeat: (p50 µs, p99 µs, flows/s at ``batch``, raw batch-1 samples µs)."""
    arr = np.asarray(windows)

    # Warm caches and lazy initialisation first.
    for i in range(warmup):
        score(arr[i % len(arr)][None])

    # Batch 1, one window after another.
    single = np.empty(n_single, dtype=np.float64)
    for i in range(n_single):
        x = arr[i % len(arr)][None]
        start = time.perf_counter()
        score(x)
        single[i] = (time.perf_counter() - start) * 1e6

    # Full batches (inputs cycled when fewer than a batch).
    reps = int(np.ceil(batch / len(arr)))
    big = np.concatenate([arr] * reps)[:batch] if reps > 1 else arr[:batch]
    score(big)
    start = time.perf_counter()
    for _ in range(n_batches):
        score(big)
    elapsed = time.perf_counter() - start
    return (
        float(np.percentile(single, 50)),
        float(np.percentile(single, 99)),
        float(len(big) * n_batches / elapsed),
        single,
    )


def interleaved(
    scorers: dict[str, tuple[Score, np.ndarray]],
    repeats: int,
    n_single: int,
    n_batches: int,
    wrap: Callable[[str], Any] | None = None,
) -> dict[str, Timing]:
    """Time every scorer ``repeats`` times, taking turns; returns name -> Timing.

    ``wrap(name)`` may return a context manager entered around each repeat (used to
    hold torch and BLAS to one thread); a scorer that raises is dropped with its
    error recorded in ``Timing`` as no repeats.
    """
    out = {name: Timing() for name in scorers}
    failed: set[str] = set()
    for _ in range(repeats):
        for name, (score, windows) in scorers.items():
            if name in failed:
                continue
            ctx = wrap(name) if wrap is not None else None
            try:
                if ctx is not None:
                    with ctx:
                        p50, p99, tput, raw = time_once(
                            score, windows, n_single, n_batches
                        )
                else:
                    p50, p99, tput, raw = time_once(score, windows, n_single, n_batches)
            except Exception as exc:  # noqa: BLE001 - one broken runtime, not all
                print(f"  timing {name} failed: {exc}", flush=True)
                failed.add(name)
                continue
            timing = out[name]
            timing.p50.append(p50)
            timing.p99.append(p99)
            timing.throughput.append(tput)
            timing.samples.append(raw)
    return out


def ratio_stats(num: Sequence[float], den: Sequence[float]) -> dict[str, float | None]:
    """Per-repeat ratios ``num[i] / den[i]`` of paired repeats, as median/min/max."""
    pairs = [
        a / b
        for a, b in zip(num, den, strict=False)
        if a is not None and b not in (None, 0)
    ]
    return spread(pairs)
