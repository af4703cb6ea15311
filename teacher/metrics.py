"""Binary detection metrics, threshold rules and latency timing (numpy only).

One implementation for the teacher, the shallow baselines, the compressed students and
the benchmarks, so their numbers are comparable. Scores are probabilities of anomaly:
a flow is flagged when its score is at or above the threshold.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edge_agent.runtime import halfway
from flows.errors import BadInputError, UsageError

__all__ = [
    "binary_metrics",
    "choose_threshold",
    "cut_at_rate",
    "score_pairs",
    "split_measure",
    "time_scorer",
    "type_split_pairs",
]


def _as_arrays(y: Any, prob: Any) -> tuple[np.ndarray, np.ndarray]:
    y_arr = np.asarray(y).astype(np.int64).ravel()
    p_arr = np.asarray(prob, dtype=np.float64).ravel()
    if y_arr.shape != p_arr.shape:
        raise BadInputError(
            f"labels and scores differ in length: {y_arr.size} vs {p_arr.size}"
        )
    if y_arr.size and not np.isin(y_arr, (0, 1)).all():
        raise BadInputError("labels must be 0 or 1 (drop unlabeled rows first)")
    if np.isnan(p_arr).any():
        raise BadInputError("scores contain NaN")
    return y_arr, p_arr


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


def roc_auc(y: np.ndarray, prob: np.ndarray) -> float:
    """Area under the ROC curve of 0/1 labels ``y`` (both classes present) and
    scores ``prob``: the chance that a malicious row scores above a benign one,
    ties counted half (the rank-sum form, so no scikit-learn is needed: an ONNX or
    TFLite student is evaluated on a gateway install).

    >>> roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    0.75
    """
    order = np.argsort(prob, kind="mergesort")
    ranked = prob[order]

    # Rank of each row (1-based), rows of one score sharing their mean rank.
    edges = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1], True])
    starts, stops = edges[:-1], edges[1:]
    ranks = np.empty(prob.size, dtype=np.float64)
    ranks[order] = np.repeat((starts + stops + 1) / 2.0, stops - starts)

    positive = y == 1
    n_pos = int(positive.sum())
    n_neg = prob.size - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_metrics(
    y: Any,
    prob: Any,
    threshold: float,
    families: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Accuracy, precision, recall, F1, ROC AUC, FPR, confusion and per-family recall.

    ``y`` holds 0/1 labels, ``prob`` the scores; a row is flagged when its score is
    ``>= threshold``. ``per_family_recall`` (only when ``families`` is given) is, for
    each family that has malicious rows, the share of those rows that were flagged.
    ``roc_auc`` is None when only one class is present. Ratios with an empty
    denominator are 0.

    >>> m = binary_metrics([0, 0, 1, 1], [0.1, 0.6, 0.7, 0.2], 0.5)
    >>> m["accuracy"], m["confusion"]
    (0.5, {'tn': 1, 'fp': 1, 'fn': 1, 'tp': 1})
    """
    y_arr, p_arr = _as_arrays(y, prob)
    pred = (p_arr >= threshold).astype(np.int64)

    # Confusion counts and the ratios built on them.
    tp = int(((pred == 1) & (y_arr == 1)).sum())
    tn = int(((pred == 0) & (y_arr == 0)).sum())
    fp = int(((pred == 1) & (y_arr == 0)).sum())
    fn = int(((pred == 0) & (y_arr == 1)).sum())
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = _ratio(2 * precision * recall, precision + recall)
    both = 0 < y_arr.sum() < y_arr.size
    out: dict[str, Any] = {
        "n": int(y_arr.size),
        "threshold": float(threshold),
        "accuracy": _ratio(tp + tn, y_arr.size),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "roc_auc": roc_auc(y_arr, p_arr) if both else None,
        "fpr": _ratio(fp, fp + tn),
        "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
    }

    # Recall of each family of malicious rows.
    if families is not None:
        fam = np.asarray(families, dtype=object).ravel()
        if fam.shape != y_arr.shape:
            raise BadInputError(
                f"families and labels differ in length: {fam.size} vs {y_arr.size}"
            )
        per: dict[str, float] = {}
        positive = y_arr == 1
        for name in sorted({str(f) for f in fam[positive]}):
            rows = positive & (fam.astype(str) == name)
            per[name] = _ratio(int(pred[rows].sum()), int(rows.sum()))
        out["per_family_recall"] = per
    return out


def choose_threshold(
    y: Any,
    prob: Any,
    rule: str = "best-f1",
    target_fpr: float = 0.01,
) -> float:
    """A decision threshold from labeled (validation) scores.

    ``best-f1``: the score cut that maximizes F1 (ties go to the lower cut, which
    catches more). ``fpr``: the lowest cut whose false-positive rate is at most
    ``target_fpr``. Call this on validation data only, never on test data.

    The rule picks a validation score (flag it and every higher one); the threshold
    returned lies halfway between that score and the next lower distinct one (half
    of it when there is none), not on the score itself. Rows are flagged when
    ``score >= threshold``; a threshold on the score itself would lose that row
    when the model scores it again in float32 and rounding puts it just below, a
    midpoint keeps the same rows flagged (unless the two scores lie within float32
    rounding of each other). No row flagged (no positives, or no cut within
    ``target_fpr``): just above the highest score, at most 1.

    >>> choose_threshold([0, 0, 1, 1], [0.125, 0.5, 0.375, 0.875])  # 0.375 chosen
    0.25
    """
    y_arr, p_arr = _as_arrays(y, prob)
    if y_arr.size == 0:
        raise BadInputError("cannot choose a threshold on no rows")
    if rule not in ("best-f1", "fpr"):
        raise UsageError(f"threshold rule must be 'best-f1' or 'fpr', got {rule!r}")

    # Sort scores descending: flagging the top k rows is each possible cut.
    order = np.argsort(-p_arr, kind="stable")
    p_sorted, y_sorted = p_arr[order], y_arr[order]
    tp = np.cumsum(y_sorted)
    fp = np.cumsum(1 - y_sorted)
    last = np.r_[p_sorted[1:] != p_sorted[:-1], True]  # end of each group of ties
    cuts, tp, fp = p_sorted[last], tp[last], fp[last]
    pos = int(y_arr.sum())
    neg = y_arr.size - pos

    if rule == "best-f1":
        if pos == 0:
            return float(min(1.0, p_arr.max() + 1e-6))
        f1 = 2 * tp / (tp + fp + pos)
        best = np.flatnonzero(f1 >= f1.max() - 1e-12)[-1]
        return _below(cuts, best)

    if not 0.0 <= target_fpr <= 1.0:
        raise UsageError(f"target FPR must be in [0, 1], got {target_fpr}")
    fpr = fp / neg if neg else np.zeros_like(fp, dtype=np.float64)
    ok = np.flatnonzero(fpr <= target_fpr)
    if ok.size == 0:
        return float(min(1.0, p_arr.max() + 1e-6))
    return _below(cuts, ok[-1])


def _below(cuts: np.ndarray, i: int) -> float:
    """A threshold that flags ``cuts[i]`` and the scores above it, and not the next
    lower distinct score ``cuts[i + 1]`` (``cuts`` descending): their midpoint, or
    with no lower score, half of ``cuts[i]`` (0 stays 0, which flags everything)."""
    high = float(cuts[i])
    low = float(cuts[i + 1]) if i + 1 < cuts.size else min(high, 0.0)
    return halfway(low, high)


def cut_at_rate(prob: Any, rate: float) -> float:
    """The score cut that flags the share ``rate`` of ``prob`` (as near as ties allow).

    A student given the cut at which it flags as much of the validation set as its
    teacher does copies the teacher's operating point instead of choosing its own
    (student/results/round4). Of two equally near counts the lower cut wins. The
    threshold returned lies halfway below the chosen score, as in
    :func:`choose_threshold` (an int8 student's score on a level exactly would be
    lost by a port that computes the level in another precision).

    >>> cut_at_rate([0.9, 0.8, 0.7, 0.1], 0.5)  # 0.8 chosen
    0.75
    """
    p_arr = np.asarray(prob, dtype=np.float64).ravel()
    if p_arr.size == 0:
        raise BadInputError("cannot choose a threshold on no rows")
    if not 0.0 <= rate <= 1.0:
        raise UsageError(f"flag rate must be in [0, 1], got {rate}")

    # Each group of tied scores ends at one possible count of flagged rows.
    p_sorted = np.sort(p_arr)[::-1]
    last = np.r_[p_sorted[1:] != p_sorted[:-1], True]
    counts = np.flatnonzero(last) + 1
    want = rate * p_arr.size
    if want < counts[0] - want:
        return float(min(1.0, p_sorted[0] + 1e-6))  # flagging nothing is nearest
    dist = np.abs(counts - want)
    best = np.flatnonzero(dist <= dist.min() + 1e-12)[-1]
    return _below(p_sorted[last], best)


def type_split_pairs(
    details: np.ndarray, held: list[str], seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The split measure's (A, B) masks over validation rows with label texts
    ``details``: every division of the ``held`` attack types into two and the rest
    (both ways round), the other rows halved at random. Thresholds are chosen on A
    and F1 scored on B, so B's types are ones the threshold never saw. Empty with
    fewer than two held-out types."""
    types = sorted(set(held))
    if len(types) < 2:
        return []
    rest = ~np.isin(details, types)
    half = np.random.default_rng(seed).random(len(details)) < 0.5
    pairs = []
    small = len(types) // 2
    for k in sorted({small, len(types) - small}):  # as even as the count allows
        for a_types in itertools.combinations(types, k):
            b_types = [t for t in types if t not in a_types]
            pairs.append(((rest & half) | np.isin(details, a_types),
                          (rest & ~half) | np.isin(details, b_types)))
    return pairs


def split_measure(
    y: Any, prob: Any, details: Any, held: Sequence[str]
) -> dict[str, Any] | None:
    """Validation scores on attack types the threshold never saw: for each
    :func:`type_split_pairs` division, the best-F1 cut on A and the metrics on B;
    their means (F1, accuracy, FPR). None with fewer than two held-out types.

    A validation that chooses the threshold on the types it scores hides how a
    model does on novel ones; on NSL-KDD this measure put the Random Forest 0.027
    F1 ahead of the teacher, as KDDTest+ does (teacher/results/round7).
    """
    y_arr, p_arr = _as_arrays(y, prob)
    pairs = type_split_pairs(np.asarray(details).astype(str), list(held))
    if not pairs:
        return None
    scored = [m for _, m in score_pairs(y_arr, p_arr, pairs)]
    f1, acc, fpr = (float(np.mean([m[k] for m in scored]))
                    for k in ("f1", "accuracy", "fpr"))
    return {"f1": f1, "accuracy": acc, "fpr": fpr, "pairs": len(pairs),
            "held_out_types": sorted(set(map(str, held)))}


def score_pairs(
    y: np.ndarray,
    prob: np.ndarray,
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    cuts: Sequence[float] | None = None,
) -> list[tuple[float, dict[str, Any]]]:
    """(cut, metrics on B) for each (A, B) of :func:`type_split_pairs`: the cut is
    ``cuts[i]`` when given (chosen on A by the caller's rule), else the best-F1
    cut on A."""
    out = []
    for i, (a, b) in enumerate(pairs):
        cut = cuts[i] if cuts is not None else choose_threshold(y[a], prob[a])
        out.append((cut, binary_metrics(y[b], prob[b], cut)))
    return out


def time_scorer(
    score: Callable[[np.ndarray], Any],
    windows: np.ndarray,
    n_single: int = 300,
    batch: int = 256,
    n_batches: int = 20,
    warmup: int = 10,
) -> dict[str, float]:
    """Latency at batch 1 (p50, p99 in µs) and throughput at batch ``batch``.

    ``score`` maps an array of windows (or rows) to scores; ``windows`` supplies the
    inputs (cycled when there are fewer than needed). The caller sets the thread
    count (the contract measures on 1 CPU thread).
    """
    arr = np.asarray(windows)
    if len(arr) == 0:
        raise BadInputError("no inputs to time the scorer on")

    # Warm up caches and lazy initialisation.
    for i in range(warmup):
        score(arr[i % len(arr)][None])

    # One window at a time.
    single = np.empty(n_single, dtype=np.float64)
    for i in range(n_single):
        x = arr[i % len(arr)][None]
        start = time.perf_counter()
        score(x)
        single[i] = (time.perf_counter() - start) * 1e6

    # Full batches.
    reps = int(np.ceil(batch / len(arr)))
    big = np.concatenate([arr] * reps)[:batch] if reps > 1 else arr[:batch]
    score(big)
    start = time.perf_counter()
    for _ in range(n_batches):
        score(big)
    elapsed = time.perf_counter() - start
    return {
        "latency_us_p50": float(np.percentile(single, 50)),
        "latency_us_p99": float(np.percentile(single, 99)),
        "throughput_flows_s": float(len(big) * n_batches / elapsed),
    }
