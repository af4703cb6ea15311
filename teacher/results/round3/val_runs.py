"""Round-3 NSL-KDD teacher variants, scored on validation rows only.

Usage (from the repository root, GATEWATCH_DATA set)::

    python teacher/results/round3/val_runs.py run NAME 'SPEC-JSON' [OUT]
    python teacher/results/round3/val_runs.py ens NAME1,NAME2,... [OUT]

``run`` trains the variant (a TeacherConfig / TrainConfig override in SPEC, plus
``seeds``; ``{"rf": true}`` fits the Random Forest baseline instead) on KDDTrain+
with the held-out-type validation (0.5, seed 0) and writes NAME.json and the
validation logits NAME.npy to OUT (default runs/exp). ``ens`` averages saved
logits and scores the average. Test rows are never scored here.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from teacher.data import holdout_types, prepare
from teacher.metrics import binary_metrics, choose_threshold


def _validation() -> tuple:
    prep = prepare("nsl-kdd", seed=0, need_split=True)
    held = holdout_types(prep, 0.5, seed=0)
    return prep, held, prep.rows("val")


def _scores(name: str, prob: np.ndarray, prep, held, va) -> dict:
    y = prep.y[va]
    details = prep.details[va].astype(str)
    cut = choose_threshold(y, prob, "best-f1")
    m = binary_metrics(y, prob, cut)
    per_type = {h: round(float((prob[details == h] >= cut).mean()), 4)
                for h in held}
    return {"name": name, "val_f1": m["f1"], "val_auc": m["roc_auc"],
            "val_acc": m["accuracy"], "val_fpr": m["fpr"], "cut": cut,
            "held_recall": float((prob[np.isin(details, held)] >= cut).mean()),
            "per_type": per_type}


def run(name: str, spec: dict, out: Path) -> dict:
    """Train one variant (or RF) and score it on validation."""
    from teacher.model import TeacherConfig
    from teacher.train import TrainConfig, fit, score_rows

    torch.set_num_threads(1)
    prep, held, va = _validation()

    # The Random Forest baseline, as teacher.baselines builds it.
    if spec.get("rf"):
        from sklearn.ensemble import RandomForestClassifier

        tr, flat = prep.rows("train"), prep.window * prep.n_features
        start = time.time()
        rf = RandomForestClassifier(n_estimators=100, random_state=0, n_jobs=1)
        rf.fit(prep.windows(tr).reshape(len(tr), flat), prep.y[tr])
        prob = rf.predict_proba(prep.windows(va).reshape(len(va), flat))[:, 1]
        return {**_scores(name, prob, prep, held, va), "wall_s": time.time() - start}

    # One fit per seed; each run capped at 3.5 minutes of training.
    mc = TeacherConfig(n_features=prep.n_features, window=prep.window,
                       **spec.get("model", {}))
    logits, walls, epochs = [], [], []
    for seed in spec.get("seeds", [0]):
        tc = TrainConfig(seed=seed, **{"max_minutes": 3.5, **spec.get("train", {})})
        result = fit(prep, mc, tc)
        logits.append(score_rows(result.model.eval(), prep.windows, va,
                                 torch.device("cpu")))
        walls.append(result.wall_s)
        epochs.append((result.best_epoch, result.epochs_run))

    np.save(out / f"{name}.npy", np.array(logits))
    prob = 1 / (1 + np.exp(-np.mean(logits, axis=0)))
    return {**_scores(name, prob, prep, held, va), "wall_s": sum(walls),
            "epochs": epochs, "spec": spec}


def ensemble(names: list[str], out: Path) -> dict:
    """Score the mean of saved validation logits of several runs."""
    prep, held, va = _validation()
    z = np.concatenate([np.load(out / f"{n}.npy") for n in names])
    prob = 1 / (1 + np.exp(-z.mean(axis=0)))
    return _scores("+".join(names), prob, prep, held, va)


if __name__ == "__main__":
    what, name = sys.argv[1], sys.argv[2]
    if what == "run":
        out = Path(sys.argv[4] if len(sys.argv) > 4 else "runs/exp")
        out.mkdir(parents=True, exist_ok=True)
        result = run(name, json.loads(sys.argv[3]), out)
        (out / f"{name}.json").write_text(json.dumps(result))
    else:
        out = Path(sys.argv[3] if len(sys.argv) > 3 else "runs/exp")
        result = ensemble(name.split(","), out)
    print(json.dumps(result))
