"""Shallow baselines: the teacher's rows and features, stated caps, honest scores."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier

from flows.errors import BadInputError, UsageError
from teacher.baselines import _cap, run_baselines
from teacher.metrics import binary_metrics, choose_threshold
from tests.test_teacher_train import synthetic


def test_random_forest_matches_an_independent_fit():
    prep = synthetic(n=500, window=2, seed=4)
    out = run_baselines(prep, ("rf",), timing=False)["rf"]

    tr, va, te = prep.rows("train"), prep.rows("val"), prep.rows("test")
    flat = lambda rows: prep.windows(rows).reshape(len(rows), -1)  # noqa: E731
    rf = RandomForestClassifier(n_estimators=100, random_state=0, n_jobs=1)
    rf.fit(flat(tr), prep.y[tr])
    cut = choose_threshold(prep.y[va], rf.predict_proba(flat(va))[:, 1])
    expected = binary_metrics(prep.y[te], rf.predict_proba(flat(te))[:, 1], cut)
    assert out["threshold"] == pytest.approx(cut)
    assert out["confusion"] == expected["confusion"]
    assert out["train_rows"] == len(tr) and out["cap"] is None
    # Its size: the independent fit's nodes, and about its pickled bytes.
    nodes = sum(t.tree_.node_count for t in rf.estimators_)
    assert out["structure"] == {"trees": 100, "nodes": nodes}
    pickled = len(pickle.dumps(rf, protocol=5))
    assert out["size_bytes"] == pytest.approx(pickled, rel=0.01)


def test_held_out_types_add_the_split_measure_of_the_validation_scores():
    """With attack types held out, each baseline also reports its validation
    scores on types the threshold never saw, recounted here from its own fit."""
    from teacher.metrics import split_measure

    prep = synthetic(n=800, window=1, seed=6)
    attack = np.flatnonzero(prep.y == 1)
    prep.details = np.full(len(prep.y), "normal", dtype=object)
    prep.details[attack] = [f"t{i % 4}" for i in range(len(attack))]
    held = ["t0", "t1", "t2", "t3"]

    out = run_baselines(prep, ("rf",), timing=False, held=held)["rf"]

    tr, va = prep.rows("train"), prep.rows("val")
    rf = RandomForestClassifier(n_estimators=100, random_state=0, n_jobs=1)
    rf.fit(prep.windows(tr).reshape(len(tr), -1), prep.y[tr])
    p_va = rf.predict_proba(prep.windows(va).reshape(len(va), -1))[:, 1]
    assert out["val_split"] == split_measure(prep.y[va], p_va, prep.details[va], held)
    assert out["val_split"]["pairs"] == 6
    assert "val_split" not in run_baselines(prep, ("rf",), timing=False)["rf"]


def test_svm_and_knn_with_caps_and_timing():
    prep = synthetic(n=600, seed=5)
    out = run_baselines(prep, ("svm", "knn"), svm_cap=120, knn_cap=200)
    assert out["svm"]["cap"] == 120 and out["svm"]["train_rows"] <= 121
    assert out["knn"]["train_rows"] <= 201
    assert out["knn"]["structure"] == {"stored_rows": out["knn"]["train_rows"]}
    assert 0 < out["svm"]["structure"]["support_vectors"] <= out["svm"]["train_rows"]
    # kNN holds its rows: at least train_rows x W x F float32s.
    least = out["knn"]["train_rows"] * prep.window * prep.n_features * 4
    assert out["knn"]["size_bytes"] >= least
    for name in ("svm", "knn"):
        assert out[name]["accuracy"] > 0.8  # an easy toy problem
        assert out[name]["latency_us_p50"] > 0 and out[name]["throughput_flows_s"] > 0


def test_cap_is_stratified_and_seeded():
    rows = np.arange(1000)
    y = (rows % 10 == 0).astype(int)  # 10% positive
    picked = _cap(rows, y, 200, seed=0)
    assert len(picked) == 200 and y[picked].sum() == 20
    assert np.array_equal(picked, _cap(rows, y, 200, seed=0))


def test_errors():
    prep = synthetic(n=100)
    with pytest.raises(UsageError, match="unknown baseline"):
        run_baselines(prep, ("xgb",), timing=False)
    prep.split[prep.split == "test"] = "train"
    with pytest.raises(BadInputError, match="test"):
        run_baselines(prep, ("rf",), timing=False)
