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


def _midpoint_below(prob, chosen):
    """Halfway between the score ``chosen`` and the next lower distinct score of
    ``prob`` (half of ``chosen`` when none is lower): where the threshold goes."""
    lower = [c for c in np.unique(prob) if c < chosen]
    return (max(lower) + chosen) / 2 if lower else chosen / 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_f1_threshold_is_the_brute_force_optimum(seed):
    y, prob = _data(seed)
    cut = choose_threshold(y, prob, "best-f1")
    scores = {c: f1_score(y, (prob >= c).astype(int)) for c in np.unique(prob)}
    best = max(scores.values())
    # Ties go to the lowest score that reaches the best F1; the threshold sits
    # halfway between it and the next lower score, flagging the same rows.
    chosen = min(c for c, s in scores.items() if s >= best - 1e-12)
    assert cut == pytest.approx(_midpoint_below(prob, chosen), abs=1e-12)
    assert ((prob >= cut) == (prob >= chosen)).all()
    assert f1_score(y, (prob >= cut).astype(int)) == pytest.approx(best)
    assert cut not in set(prob.tolist())


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
    chosen = min(c for c in np.unique(prob) if fpr(c) <= target)
    assert cut == pytest.approx(_midpoint_below(prob, chosen), abs=1e-12)
    assert ((prob >= cut) == (prob >= chosen)).all()


@pytest.mark.parametrize("rule", ["best-f1", "fpr"])
@pytest.mark.parametrize("case", ["t-conn", "rounding"])
def test_threshold_holds_when_scores_come_back_in_float32(rule, case):
    """The threshold is chosen on float64 scores; later tools score in float32,
    which can put the boundary row just below a threshold sitting on its float64
    score. t-conn: the boundary positive scored 0.5678221728 (stored) and
    0.5678221583 in float32. rounding: a float64 score that float32 rounds down.
    Either way the threshold must flag the same rows."""
    if case == "t-conn":
        boundary, boundary32 = 0.5678221728, np.float32(0.5678221583)
    else:
        boundary = float(np.float32(0.6)) + 1e-9
        boundary32 = np.float32(boundary)
    assert float(boundary32) < boundary  # float32 drops the boundary row
    y = np.array([0, 0, 0, 1, 1, 1])
    prob = np.array([0.01, 0.2, 0.31, boundary, 0.8, 0.99])
    prob32 = prob.astype(np.float32)
    prob32[3] = boundary32
    cut = choose_threshold(y, prob, rule, target_fpr=0.0)
    m64 = binary_metrics(y, prob, cut)
    m32 = binary_metrics(y, prob32, cut)
    assert m64["confusion"] == {"tn": 3, "fp": 0, "fn": 0, "tp": 3}
    assert m32["confusion"] == m64["confusion"]
    assert 0.31 < cut < float(boundary32)


@pytest.mark.parametrize("rule", ["best-f1", "fpr"])
def test_threshold_below_the_lowest_score_when_all_are_flagged(rule):
    """All rows positive: every row flagged; with no lower score the threshold is
    half the lowest one, and exactly 0 stays 0 (still in [0, 1], flags all)."""
    prob = np.array([0.4, 0.6, 0.9])
    cut = choose_threshold([1, 1, 1], prob, rule, target_fpr=0.0)
    assert cut == pytest.approx(0.2)
    assert choose_threshold([1, 1], [0.0, 0.7], rule, target_fpr=0.0) == 0.0


@pytest.mark.parametrize("rate", [0.0, 0.013, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("levels", [None, 7])
def test_rate_cut_flags_the_nearest_share_brute_force(rate, levels):
    """Every possible cut tried: the chosen one flags the count nearest rate * n,
    the lower cut on a tie; ``levels`` makes int8-like ties."""
    _, prob = _data(4)
    if levels:
        prob = np.round(prob * levels) / levels
    cut = cut_at_rate(prob, rate)

    nothing = min(1.0, prob.max() + 1e-6)  # "flag nothing" (at most 1)
    options = [(abs(int((prob >= c).sum()) - rate * prob.size), c)
               for c in [*np.unique(prob), nothing]]
    best = min(options)  # nearest count first, then the lower cut
    np.testing.assert_array_equal(prob >= cut, prob >= best[1])
    # A score chosen: the cut lies halfway between it and the next lower one.
    below = prob[prob < best[1]]
    if cut != nothing and below.size:
        assert cut == pytest.approx((best[1] + below.max()) / 2)
        assert below.max() < cut < best[1]


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
    """Each division's cut is the best F1 on A (every cut tried, lowest on ties,
    placed halfway down to A's next lower score), scored with sklearn on B; the
    measure is their mean. Too few types: None."""
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
        chosen = min(c for c, s in scores.items() if s >= best - 1e-12)
        cut = _midpoint_below(prob[a], chosen)  # between A's scores, applied to B
        f1s.append(f1_score(y[b], (prob[b] >= cut).astype(int)))
    assert got["pairs"] == 6 and got["held_out_types"] == types
    assert got["f1"] == pytest.approx(np.mean(f1s))
    assert split_measure(y, prob, details, ["a"]) is None
