"""Round 7: teacher candidates of rounds 5-6 and the Random Forest, scored with the
threshold chosen on some held-out attack types and F1 measured on the others
(validation rows of KDDTrain+ only; see ``PROTOCOL.md`` beside this file).

Reads the cached validation logits that ``teacher/results/fold_runs.py`` wrote.
Usage, from the repository root with GATEWATCH_DATA set::

    python teacher/results/round7/split_score.py > val-results.json

Another round's candidates, with the cache their members are in (round 8)::

    python teacher/results/round7/split_score.py round8=runs/round5-val
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROUNDS = {"round5": Path("runs/round5-val"), "round6": Path("runs/round6-val")}
FOLDS = (0, 1, 2)


def pairs(details: np.ndarray, held: list[str]):
    """(A mask, B mask) for every 2/3 division of the held-out types, both ways."""
    rest = ~np.isin(details, held)
    half = np.random.default_rng(0).random(len(details)) < 0.5
    for k in (2, 3):
        for a_types in itertools.combinations(sorted(held), k):
            b_types = [t for t in held if t not in a_types]
            yield (list(a_types),
                   (rest & half) | np.isin(details, a_types),
                   (rest & ~half) | np.isin(details, b_types))


def split_scores(y: np.ndarray, details: np.ndarray, held: list[str],
                 prob: np.ndarray) -> list[dict]:
    from teacher.metrics import binary_metrics, choose_threshold

    out = []
    for a_types, a, b in pairs(details, held):
        cut = choose_threshold(y[a], prob[a])
        m = binary_metrics(y[b], prob[b], cut)
        out.append({"a_types": a_types, "cut": cut, "f1_b": m["f1"],
                    "acc_b": m["accuracy"], "fpr_b": m["fpr"]})
    return out


def main(rounds: dict[str, Path]) -> dict:
    sys.path.insert(0, str(HERE.parent))
    import fold_runs as fr

    labels = {f: fr._labels(f) for f in FOLDS}
    table: dict = {"candidates": {}}
    for rnd, cache in rounds.items():
        fr.ROUND = HERE.parent / rnd
        for name, spec in fr.candidates().items():
            key = name if name not in table["candidates"] else f"{name}@{rnd}"
            per_fold = {}
            for fold in FOLDS:
                files = [cache / f"{fr._key(spec)}_f{fold}_s{s}.npy"
                         for s in spec.get("seeds", [0, 1, 2])]
                if not all(f.exists() for f in files):
                    print(f"{key}: fold {fold} incomplete", file=sys.stderr)
                    break
                z = np.mean([np.load(f) for f in files], axis=0)
                held = json.loads(files[0].with_suffix(".json").read_text())["held"]
                y, details = labels[fold]
                per_fold[fold] = split_scores(y, details, held, 1 / (1 + np.exp(-z)))
            else:
                table["candidates"][key] = _summary(per_fold, spec)
        if rnd == "round5":
            spec = fr.candidates()["r4"]
            per_fold = {}
            for fold in FOLDS:
                f = cache / f"{fr._key(spec, rf=True)}_f{fold}.npy"
                held = json.loads(f.with_suffix(".json").read_text())["held"]
                y, details = labels[fold]
                per_fold[fold] = split_scores(y, details, held,
                                              1 / (1 + np.exp(-np.load(f))))
            table["rf"] = _summary(per_fold, {"encoder": spec["encoder"]})
    return table


def _summary(per_fold: dict, spec: dict) -> dict:
    fold_f1 = {f: float(np.mean([r["f1_b"] for r in rows]))
               for f, rows in per_fold.items()}
    return {
        "spec": spec,
        "score": float(np.mean(list(fold_f1.values()))),
        "per_fold_f1": fold_f1,
        "mean_acc_b": float(np.mean([r["acc_b"] for rows in per_fold.values()
                                     for r in rows])),
        "mean_fpr_b": float(np.mean([r["fpr_b"] for rows in per_fold.values()
                                     for r in rows])),
        "sd_f1_b": float(np.std([r["f1_b"] for rows in per_fold.values()
                                 for r in rows])),
    }


if __name__ == "__main__":
    given = dict(arg.split("=", 1) for arg in sys.argv[1:])
    rounds = {k: Path(v) for k, v in given.items()} if given else ROUNDS
    print(json.dumps(main(rounds), indent=1))
