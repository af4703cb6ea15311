"""Post-hoc check: RF and the teacher on two other held-out-type folds (val only).

Usage: ``python teacher/results/round3/other_folds.py SEED`` (1 or 2 were run) with
GATEWATCH_DATA set. The fold is ``holdout_types(prep, 0.5, seed=SEED)``; prints
validation F1 (best-F1 cut) of RF, the three round-3 members and their ensemble,
and the round-2 single network (seed 0, no input noise). Run after the round-3
choice was made and its test number seen, so it chose nothing.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from teacher.data import holdout_types, prepare
from teacher.metrics import binary_metrics, choose_threshold
from teacher.model import TeacherConfig
from teacher.train import TrainConfig, fit, score_rows


def main(fold: int) -> dict:
    """Validation F1 of each model on the fold drawn with seed ``fold``."""
    from sklearn.ensemble import RandomForestClassifier

    torch.set_num_threads(1)
    prep = prepare("nsl-kdd", seed=0, need_split=True)
    out: dict = {"fold": fold, "held": holdout_types(prep, 0.5, seed=fold)}
    va, cpu = prep.rows("val"), torch.device("cpu")
    y = prep.y[va]

    def f1(z: np.ndarray) -> float:
        p = 1 / (1 + np.exp(-z))
        return binary_metrics(y, p, choose_threshold(y, p, "best-f1"))["f1"]

    # Random Forest as teacher.baselines builds it (F1 on its probabilities).
    tr, flat = prep.rows("train"), prep.window * prep.n_features
    rf = RandomForestClassifier(n_estimators=100, random_state=0, n_jobs=1)
    rf.fit(prep.windows(tr).reshape(len(tr), flat), prep.y[tr])
    p_rf = rf.predict_proba(prep.windows(va).reshape(len(va), flat))[:, 1]
    out["rf"] = binary_metrics(y, p_rf, choose_threshold(y, p_rf, "best-f1"))["f1"]

    # Round-3 members (defaults: input noise 0.02) and their average.
    mc = TeacherConfig(n_features=prep.n_features, window=prep.window)
    logits = []
    for seed in (0, 1, 2):
        model = fit(prep, mc, TrainConfig(seed=seed)).model.eval()
        logits.append(score_rows(model, prep.windows, va, cpu))
        out[f"noise02_s{seed}"] = f1(logits[-1])
    out["noise02_ens3"] = f1(np.mean(logits, axis=0))

    # The round-2 default, one network.
    model = fit(prep, mc, TrainConfig(seed=0, input_noise=0.0)).model.eval()
    out["round2_s0"] = f1(score_rows(model, prep.windows, va, cpu))
    return out


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]))))
