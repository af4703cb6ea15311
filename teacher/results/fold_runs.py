"""NSL-KDD teacher candidates, scored on three held-out-type folds (validation only).

The driver of rounds 4 and 5 (``teacher/results/roundN/``: PROTOCOL.md, the
candidate list ``candidates.txt``, the results). Usage, from the repository root
with GATEWATCH_DATA set::

    python teacher/results/fold_runs.py ROUND member CAND FOLD SEED [OUT]
    python teacher/results/fold_runs.py ROUND rf CAND FOLD [OUT]
    python teacher/results/fold_runs.py ROUND score [OUT] > results.json

ROUND is the round's folder (``teacher/results/round5``). CAND is a line of its
``candidates.txt``: ``NAME SPEC-JSON`` with optional keys ``encoder`` (``scaling``,
``knots``: passed to ``prepare``; absent means the round-3 encoder, min-max),
``train`` (TrainConfig overrides), ``model`` (TeacherConfig overrides; ``bins``
expands the encoder's quantile columns) and ``seeds`` (default 0, 1, 2).
``member`` trains one network (one seed) on KDDTrain+ with
fold FOLD's attack types (``holdout=0.5, holdout_seed=FOLD``) as validation and
saves its validation logits (from round 21 the types are moved before the encoder
is fitted, as ``teacher train`` does; rounds up to 20 fitted it first, see
``_fold``); ``rf`` fits the Random Forest of teacher.baselines on the candidate's
encoded features. Members are stored under a key of the spec
without its seeds, so candidates that differ only in member count share them.
``score`` averages each candidate's member logits per fold (the shipped ensemble),
scores them with the best-F1 threshold and prints the table data as JSON. Test
rows are never scored here.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

FOLDS = (0, 1, 2)
ROUND = Path(__file__).resolve().parent / "round4"  # set by the command line


def candidates() -> dict[str, dict]:
    """The fixed candidate list of the round, in priority order."""
    out = {}
    for line in (ROUND / "candidates.txt").read_text().splitlines():
        if line.strip():
            name, spec = line.split(" ", 1)
            out[name] = json.loads(spec)
    return out


def _encoder(spec: dict) -> dict:
    enc = spec.get("encoder", {})
    out = {"scaling": enc.get("scaling", "minmax"), "knots": enc.get("knots")}
    out["encoder_first"] = bool(enc.get("encoder_first", _round_number() <= 20))
    return out


def _fit_args(spec: dict) -> dict:
    """The arguments of ``prepare`` that shape the encoder."""
    enc = _encoder(spec)
    return {"scaling": enc["scaling"], "knots": enc["knots"]}


def _round_number() -> int:
    """The number of the round folder (``round21`` -> 21; other names: 99)."""
    digits = ROUND.name.removeprefix("round")
    return int(digits) if digits.isdigit() else 99


def _key(spec: dict, rf: bool = False) -> str:
    """File key: what determines a member (or the RF), seeds left out."""
    enc = _encoder(spec)
    if not enc.pop("encoder_first"):  # rounds up to 20 keep the keys they had
        enc["holdout_first"] = True
    what = {"encoder": enc} if rf else {
        "encoder": enc, "train": spec.get("train", {}),
        "model": spec.get("model", {})}
    text = json.dumps(what, sort_keys=True)
    return ("rf-" if rf else "m-") + hashlib.sha256(text.encode()).hexdigest()[:10]


def _fold(spec: dict, fold: int):
    """KDDTrain+ with fold ``fold``'s attack types moved to validation.

    Rounds up to 20 fitted the encoder before moving them (``holdout_types`` after
    ``prepare``), so the held-out types shaped the features; ``"encoder_first":
    true`` in a spec's ``encoder`` keeps that for re-scoring those rounds. Without
    it the types are moved first, as ``teacher train`` does since session 15.
    """
    from teacher.data import holdout_types, prepare

    if _encoder(spec)["encoder_first"]:
        prep = prepare("nsl-kdd", seed=0, need_split=True, **_fit_args(spec))
        held = holdout_types(prep, 0.5, seed=fold)
    else:
        prep = prepare("nsl-kdd", seed=0, need_split=True, holdout=0.5,
                       holdout_seed=fold, **_fit_args(spec))
        held = prep.held
    return prep, held, prep.rows("val")


def member(name: str, fold: int, seed: int, out: Path) -> dict:
    """Train one member of candidate ``name`` on fold ``fold``; save val logits."""
    import torch

    from teacher.model import TeacherConfig
    from teacher.train import TrainConfig, fit, score_rows

    torch.set_num_threads(1)
    spec = candidates()[name]
    stem = out / f"{_key(spec)}_f{fold}_s{seed}"
    if stem.with_suffix(".json").exists():
        return json.loads(stem.with_suffix(".json").read_text())
    prep, held, va = _fold(spec, fold)
    overrides = dict(spec.get("model", {}))
    if overrides.get("bins"):
        overrides["binned"] = prep.encoder.quantile_columns
    mc = TeacherConfig(n_features=prep.n_features, window=prep.window, **overrides)
    result = fit(prep, mc, TrainConfig(seed=seed, **spec.get("train", {})))
    z = score_rows(result.model.eval(), prep.windows, va, torch.device("cpu"))
    np.save(stem.with_suffix(".npy"), z)
    info = {"candidate": name, "fold": fold, "seed": seed, "held": held,
            "wall_s": result.wall_s, "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run, **_scores(prep, va, z)}
    stem.with_suffix(".json").write_text(json.dumps(info))
    return info


def rf(name: str, fold: int, out: Path) -> dict:
    """Random Forest (teacher.baselines settings) on the candidate's features."""
    from sklearn.ensemble import RandomForestClassifier

    spec = candidates()[name]
    stem = out / f"{_key(spec, rf=True)}_f{fold}"
    if stem.with_suffix(".json").exists():
        return json.loads(stem.with_suffix(".json").read_text())
    prep, held, va = _fold(spec, fold)
    tr, flat = prep.rows("train"), prep.window * prep.n_features
    start = time.time()
    model = RandomForestClassifier(n_estimators=100, random_state=0, n_jobs=1)
    model.fit(prep.windows(tr).reshape(len(tr), flat), prep.y[tr])
    p = model.predict_proba(prep.windows(va).reshape(len(va), flat))[:, 1]
    p = np.clip(p, 1e-7, 1 - 1e-7)
    z = np.log(p / (1 - p))  # stored as logits like the members
    np.save(stem.with_suffix(".npy"), z)
    info = {"encoder": _fit_args(spec), "fold": fold, "held": held,
            "wall_s": time.time() - start, **_scores(prep, va, z)}
    stem.with_suffix(".json").write_text(json.dumps(info))
    return info


_LABELS: dict[int, tuple] = {}


def _labels(fold: int) -> tuple:
    """Validation labels and label texts of a fold (the same for any encoder)."""
    if fold not in _LABELS:
        prep, _, va = _fold({}, fold)
        _LABELS[fold] = (prep.y[va], prep.details[va].astype(str))
    return _LABELS[fold]


def _scores(prep, va: np.ndarray, z: np.ndarray) -> dict:
    from teacher.metrics import binary_metrics, choose_threshold

    y = prep.y[va]
    prob = 1 / (1 + np.exp(-z))
    cut = choose_threshold(y, prob, "best-f1")
    m = binary_metrics(y, prob, cut)
    return {"val_f1": m["f1"], "val_acc": m["accuracy"], "val_auc": m["roc_auc"],
            "val_fpr": m["fpr"], "cut": cut}


def score(out: Path) -> dict:
    """Per candidate and fold: the ensemble's validation scores; then the means."""
    from teacher.metrics import binary_metrics, choose_threshold

    table: dict = {"folds": list(FOLDS), "candidates": {}, "rf": {}}
    for name, spec in candidates().items():
        for kind in ("member", "rf"):
            rows = {}
            for fold in FOLDS:
                y, details = _labels(fold)
                if kind == "rf":
                    files = [out / f"{_key(spec, rf=True)}_f{fold}.npy"]
                else:
                    files = [out / f"{_key(spec)}_f{fold}_s{s}.npy"
                             for s in spec.get("seeds", [0, 1, 2])]
                if not all(f.exists() for f in files):
                    continue
                z = np.mean([np.load(f) for f in files], axis=0)
                prob = 1 / (1 + np.exp(-z))
                cut = choose_threshold(y, prob, "best-f1")
                m = binary_metrics(y, prob, cut)
                held = json.loads(files[0].with_suffix(".json").read_text())["held"]
                rows[fold] = {
                    "val_f1": m["f1"], "val_acc": m["accuracy"],
                    "val_auc": m["roc_auc"], "val_fpr": m["fpr"], "cut": cut,
                    "held_recall": float((prob[np.isin(details, held)] >= cut).mean()),
                    "members_f1": [json.loads(f.with_suffix(".json").read_text())
                                   ["val_f1"] for f in files],
                    "members_wall_s": [json.loads(f.with_suffix(".json").read_text())
                                       ["wall_s"] for f in files],
                }
            entry = {"spec": spec, "folds": rows, "complete": len(rows) == len(FOLDS)}
            if entry["complete"]:
                for k in ("val_f1", "val_acc", "val_auc"):
                    entry[f"mean_{k}"] = float(np.mean([r[k] for r in rows.values()]))
            if kind == "rf":
                table["rf"][json.dumps(_fit_args(spec), sort_keys=True)] = entry
                table["candidates"].setdefault(name, {})["rf_key"] = json.dumps(
                    _fit_args(spec), sort_keys=True)
            else:
                table["candidates"].setdefault(name, {}).update(entry)
    return table


if __name__ == "__main__":
    ROUND = Path(sys.argv[1]).resolve()
    what, args = sys.argv[2], sys.argv[3:]
    if what == "member":
        out = Path(args[3] if len(args) > 3 else f"runs/{ROUND.name}-val")
        out.mkdir(parents=True, exist_ok=True)
        print(json.dumps(member(args[0], int(args[1]), int(args[2]), out)))
    elif what == "rf":
        out = Path(args[2] if len(args) > 2 else f"runs/{ROUND.name}-val")
        out.mkdir(parents=True, exist_ok=True)
        print(json.dumps(rf(args[0], int(args[1]), out)))
    else:
        out = Path(args[0] if args else f"runs/{ROUND.name}-val")
        print(json.dumps(score(out), indent=1))
