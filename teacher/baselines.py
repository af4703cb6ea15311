"""Shallow baselines on the teacher's own features and splits: RF, SVM and kNN.

Each baseline sees exactly what the teacher sees, the encoded window of a flow
flattened to ``W * F`` numbers, trains on the "train" rows, has its decision threshold
chosen on the "val" rows (the same rule as the teacher) and is scored on the "test"
rows with :func:`teacher.metrics.binary_metrics`, plus latency on one CPU thread.

The RBF SVM's training cost grows with the square of its sample count, so it trains
on a seeded stratified sample of at most ``svm_cap`` rows (stated in the output);
kNN may be capped the same way with ``knn_cap``, at least :data:`KNN_NEIGHBORS`
(its k: a smaller cap is a usage error, not quietly raised). Random Forest uses
every row. Training rows of one class only are bad input, as for the teacher.
"""

from __future__ import annotations

import pickle
import time
from typing import Any

import numpy as np

from flows.errors import BadInputError, UsageError
from teacher import logger
from teacher.data import Prepared
from teacher.evaluate import one_thread
from teacher.metrics import (
    binary_metrics,
    choose_threshold,
    split_measure,
    time_scorer,
)

__all__ = ["BASELINES", "KNN_NEIGHBORS", "run_baselines"]

BASELINES = ("rf", "svm", "knn")
# The k of the kNN baseline: the fewest training rows it can be fitted on.
KNN_NEIGHBORS = 5


def _cap(rows: np.ndarray, y: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    """A seeded stratified subsample of ``rows``: ``cap`` rows, each class at least
    one (so a class's rounding may add one or two); topped up from the rest when
    the classes' rounded shares fall short of ``cap``."""
    if cap is None or len(rows) <= cap:
        return rows
    rng = np.random.default_rng(seed)
    keep = []
    for value in np.unique(y):
        part = rows[y == value]
        share = max(1, int(round(cap * len(part) / len(rows))))
        keep.append(rng.choice(part, size=min(share, len(part)), replace=False))
    picked = np.concatenate(keep)
    if len(picked) < cap:
        rest = np.setdiff1d(rows, picked)
        picked = np.concatenate(
            [picked, rng.choice(rest, size=cap - len(picked), replace=False)])
    return np.sort(picked)


def _build(name: str, seed: int) -> Any:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC

    if name == "rf":
        return RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=1)
    if name == "svm":
        return SVC(kernel="rbf", C=1.0, gamma="scale", random_state=seed)
    if name == "knn":
        return KNeighborsClassifier(n_neighbors=KNN_NEIGHBORS, n_jobs=1)
    raise UsageError(f"unknown baseline {name!r}; choose from {BASELINES}")


def _structure(name: str, model: Any) -> dict[str, int]:
    """What a fitted baseline holds to score a flow: trees and nodes, support
    vectors, or stored training rows (the shallow models' counterpart of a
    network's parameter count)."""
    if name == "rf":
        return {
            "trees": len(model.estimators_),
            "nodes": int(sum(t.tree_.node_count for t in model.estimators_)),
        }
    if name == "svm":
        return {"support_vectors": int(len(model.support_))}
    return {"stored_rows": int(model.n_samples_fit_)}


def _model_bytes(model: Any) -> int:
    """Size of the fitted model serialized with pickle: how much a deployment would
    ship and hold (measured only; gatewatch never loads a pickle)."""
    return len(pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL))


def _scorer(model: Any, flat: int) -> Any:
    # Probability of the malicious class; the SVM's margin through a sigmoid.
    if hasattr(model, "predict_proba") and not hasattr(model, "support_"):
        def score(x: np.ndarray) -> np.ndarray:
            return model.predict_proba(x.reshape(len(x), flat))[:, 1]
    else:
        def score(x: np.ndarray) -> np.ndarray:
            margin = model.decision_function(x.reshape(len(x), flat))
            return 1.0 / (1.0 + np.exp(-margin))
    return score


def run_baselines(
    prep: Prepared,
    names: tuple[str, ...] = BASELINES,
    *,
    svm_cap: int | None = 20000,
    knn_cap: int | None = None,
    seed: int = 0,
    threshold_rule: str = "best-f1",
    target_fpr: float = 0.01,
    timing: bool = True,
    held: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Train and score each baseline; returns ``{name: metrics}`` on the test rows.

    Each entry also holds ``train_rows`` (after any cap), ``cap``, ``fit_s``,
    ``threshold`` (chosen on val), ``val_f1``, ``size_bytes`` (the pickled model)
    and ``structure`` (trees and nodes, support vectors, or stored rows); with
    two or more ``held`` attack types in val, ``val_split``: the validation
    scores on held-out types the threshold never saw (``split_measure``).
    """
    tr, va, te = prep.rows("train"), prep.rows("val"), prep.rows("test")
    if min(tr.size, va.size, te.size) == 0:
        raise BadInputError(
            f"{prep.name}: baselines need train, val and test rows "
            f"(got {tr.size}, {va.size}, {te.size})"
        )
    present = np.unique(prep.y[tr])
    if present.size < 2:
        # The wording of teacher train's (teacher.train.fit).
        only = "benign (0)" if present[0] == 0 else "malicious (1)"
        raise BadInputError(
            f"{prep.name}: its {tr.size} labeled training rows are all {only}; the "
            "baselines need both benign and malicious training rows")
    if "knn" in names:
        if knn_cap is not None and knn_cap < KNN_NEIGHBORS:
            raise UsageError(
                f"--knn-cap {knn_cap}: expected at least {KNN_NEIGHBORS}, the "
                "neighbours kNN looks at")
        if tr.size < KNN_NEIGHBORS:
            raise BadInputError(
                f"{prep.name}: kNN needs at least {KNN_NEIGHBORS} labeled training "
                f"rows, got {tr.size}")
    flat = prep.window * prep.n_features
    x_va, x_te = prep.windows(va), prep.windows(te)
    fams = prep.families[te] if prep.families is not None else None

    out: dict[str, dict[str, Any]] = {}
    for name in names:
        cap = {"svm": svm_cap, "knn": knn_cap}.get(name)
        rows = _cap(tr, prep.y[tr], cap, seed)
        model = _build(name, seed)

        # Fit on (capped) training rows, threshold on val, metrics on test.
        start = time.perf_counter()
        with one_thread():
            model.fit(prep.windows(rows).reshape(len(rows), flat), prep.y[rows])
        fit_s = time.perf_counter() - start
        score = _scorer(model, flat)
        with one_thread():
            p_va = score(x_va)
            p_te = score(x_te)
        cut = choose_threshold(prep.y[va], p_va, threshold_rule, target_fpr)
        metrics = binary_metrics(prep.y[te], p_te, cut, families=fams)
        metrics.update({
            "train_rows": int(len(rows)), "cap": cap, "fit_s": fit_s,
            "val_f1": binary_metrics(prep.y[va], p_va, cut)["f1"],
            "threshold_rule": threshold_rule,
            "size_bytes": _model_bytes(model), "structure": _structure(name, model),
        })
        if held and prep.details is not None:
            metrics["val_split"] = split_measure(prep.y[va], p_va, prep.details[va],
                                                 held)
        if timing:
            with one_thread():
                metrics.update(time_scorer(score, x_te[:512], n_single=200,
                                           n_batches=5))
        logger.info("baseline %s: test accuracy %.4f, F1 %.4f (fit %.1f s)",
                    name, metrics["accuracy"], metrics["f1"], fit_s)
        out[name] = metrics
    return out
