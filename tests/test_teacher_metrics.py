"""binary_metrics and the threshold rules, checked against sklearn and brute force."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from flows.errors import BadInputError, UsageError
from teacher.metrics import (
    binary_metrics,
    choose_threshold,
    cut_at_rate,
    split_measure,
    time_scorer,
)


def _data(seed=0, n=400):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    prob = np.clip(0.35 * y + rng.random(n) * 0.65, 0, 1).round(2)  # many ties
    return y, prob


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.77])
def test_matches_sklearn(threshold):
    y, prob = _data()
    m = binary_metrics(y, prob, threshold)
    pred = (prob >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred).ravel()
    assert m["confusion"] == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["recall"] == pytest.approx(recall_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, prob))
    assert m["fpr"] == pytest.approx(fp / (fp + tn))


def test_per_family_recall_by_hand():
    y = [0, 1, 1, 1, 1, 0]
    prob = [0.9, 0.8, 0.1, 0.7, 0.6, 0.2]
    fams = ["normal", "DoS", "DoS", "Probe", "Probe", "normal"]
    m = binary_metrics(y, prob, 0.5, families=fams)
    assert m["per_family_recall"] == {"DoS": 0.5, "Probe": 1.0}


def test_one_class_and_bad_input():
    m = binary_metrics([0, 0, 0], [0.1, 0.6, 0.2], 0.5)
    assert m["roc_auc"] is None and m["precision"] == 0.0 and m["fpr"] == 1 / 3
    with pytest.raises(BadInputError, match="length"):
        binary_metrics([0, 1], [0.5], 0.5)
    with pytest.raises(BadInputError, match="0 or 1"):
        binary_metrics([0, -1], [0.5, 0.2], 0.5)
    with pytest.raises(BadInputError, match="NaN"):
        binary_metrics([0, 1], [np.nan, 0.2], 0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_f1_threshold_is_the_brute_force_optimum(seed):
    y, prob = _data(seed)
    cut = choose_threshold(y, prob, "best-f1")
    scores = {c: f1_score(y, (prob >= c).astype(int)) for c in np.unique(prob)}
    best = max(scores.values())
    assert scores[cut] == pytest.approx(best)
    # Ties go to the lowest cut that reaches the best F1.
    assert cut == min(c for c, s in scores.items() if s >= best - 1e-12)


@pytest.mark.parametrize("target", [0.0, 0.05, 0.2])
def test_fpr_threshold_is_the_lowest_cut_within_target(target):
    y, prob = _data(3)
    cut = choose_threshold(y, prob, "fpr", target_fpr=target)

    def fpr(c):
        pred = prob >= c
        return (pred & (y == 0)).sum() / (y == 0).sum()

    assert fpr(cut) <= target
    lower = [c for c in np.unique(prob) if c < cut]
    assert all(fpr(c) > target for c in lower)


@pytest.mark.parametrize("rate", [0.0, 0.013, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("levels", [None, 7])
def test_rate_cut_flags_the_nearest_share_brute_force(rate, levels):
    """Every possible cut tried: the chosen one flags the count nearest rate * n,
    the lower cut on a tie; ``levels`` makes int8-like ties."""
    _, prob = _data(4)
    if levels:
        prob = np.round(prob * levels) / levels
    cut = cut_at_rate(prob, rate)

    options = [(abs(int((prob >= c).sum()) - rate * prob.size), c)
               for c in [*np.unique(prob), prob.max() + 1e-6]]
    best = min(options)  # nearest count first, then the lower cut
    assert best[1] == pytest.approx(cut)


def test_rate_cut_errors():
    with pytest.raises(UsageError):
        cut_at_rate([0.2, 0.8], 1.5)
    with pytest.raises(BadInputError):
        cut_at_rate([], 0.1)


def test_threshold_rule_errors():
    with pytest.raises(UsageError):
        choose_threshold([0, 1], [0.2, 0.8], "median")
    with pytest.raises(BadInputError):
        choose_threshold([], [], "best-f1")


def test_time_scorer_reports_positive_numbers():
    calls = []

    def score(x):
        calls.append(len(x))
        return x.sum(axis=(1, 2))

    out = time_scorer(score, np.zeros((10, 2, 3), dtype=np.float32), n_single=20,
                      batch=256, n_batches=3, warmup=2)
    assert set(out) == {"latency_us_p50", "latency_us_p99", "throughput_flows_s"}
    assert 0 < out["latency_us_p50"] <= out["latency_us_p99"]
    assert out["throughput_flows_s"] > 0
    assert calls.count(1) == 22 and calls.count(256) == 4


def test_split_measure_matches_a_brute_force_recount():
    """Each division's cut is the best F1 on A (every cut tried, lowest on ties),
    scored with sklearn on B; the measure is their mean. Too few types: None."""
    import itertools

    rng = np.random.default_rng(7)
    types = ["a", "b", "c", "d"]
    details = np.array(["normal"] * 120 + types * 20)
    y = (details != "normal").astype(int)
    prob = np.clip(0.3 * y + rng.random(details.size) * 0.7, 0, 1).round(2)
    got = split_measure(y, prob, details, types)

    half = np.random.default_rng(0).random(details.size) < 0.5
    rest = details == "normal"
    f1s = []
    for a_types in itertools.combinations(types, 2):
        a = (rest & half) | np.isin(details, a_types)
        b = (rest & ~half) | ~np.isin(details, [*a_types, "normal"])
        scores = {c: f1_score(y[a], (prob[a] >= c).astype(int))
                  for c in np.unique(prob[a])}
        best = max(scores.values())
        cut = min(c for c, s in scores.items() if s >= best - 1e-12)
        f1s.append(f1_score(y[b], (prob[b] >= cut).astype(int)))
    assert got["pairs"] == 6 and got["held_out_types"] == types
    assert got["f1"] == pytest.approx(np.mean(f1s))
    assert split_measure(y, prob, details, ["a"]) is None
