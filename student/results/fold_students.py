"""NSL-KDD distillation settings, scored on three held-out-type folds (validation only).

For each fold (``holdout_types(prep, 0.5, seed=FOLD)`` of KDDTrain+, as the teacher
rounds use), a teacher of the round's teacher spec is trained on that fold's
training rows and kept under ``OUT``; students of each candidate's distillation
settings are then distilled from it and scored on the fold's validation rows with
the best-F1 threshold (the rule ``compress run`` re-chooses thresholds by). Test
rows are never scored here. Usage, from the repository root with GATEWATCH_DATA
set (ROUND is the round's folder: PROTOCOL.md, ``candidates.txt``)::

    python student/results/fold_students.py ROUND teacher FOLD [OUT]
    python student/results/fold_students.py ROUND student CAND FOLD [OUT]
    python student/results/fold_students.py ROUND score [OUT] > results.json

``candidates.txt`` holds a ``teacher SPEC-JSON`` line (``encoder``, ``train``,
``model``, ``seeds`` as in ``teacher/results/fold_runs.py``) and one ``NAME
SPEC-JSON`` line per candidate: ``distill`` (DistillConfig overrides),
``rescore`` (true: the teacher scores the noisy windows), ``students``
(``["mlp-16", ...]``), ``stop_on`` (``"known"``, round 11: the epoch is chosen on
the validation rows outside the held-out families) and ``shift``
(``"teacher-cut"``: the soft targets are
the teacher's logits less the logit of its best-F1 cut on validation). A
``families`` list on the teacher line (round 8) also holds out every row of those
attack families, so the fold teacher never sees them; ``fold_seeds`` gives the
draw of held-out types of each fold (default: the fold number).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

FOLDS = (0, 1, 2)
ROUND = Path(".")  # set by the command line


def _lines() -> dict[str, dict]:
    out = {}
    for line in (ROUND / "candidates.txt").read_text().splitlines():
        if line.strip():
            name, spec = line.split(" ", 1)
            out[name] = json.loads(spec)
    return out


def _fold(fold: int):
    from teacher.data import holdout_types, prepare

    enc = _lines()["teacher"].get("encoder", {})
    prep = prepare("nsl-kdd", seed=0, need_split=True,
                   scaling=enc.get("scaling", "minmax"), knots=enc.get("knots"))
    draws = _lines()["teacher"].get("fold_seeds", list(FOLDS))
    prep.held = holdout_types(prep, 0.5, seed=draws[fold])
    novel = _lines()["teacher"].get("families", [])
    if novel:
        # Whole families held out too (round 8): every row of theirs in val.
        fams = prep.families.astype(str)
        dev = np.isin(prep.split, ("train", "val"))
        moving = dev & np.isin(fams, novel)
        prep.split = prep.split.copy()
        prep.split[moving] = "val"
        kept = [t for t in prep.held
                if t not in set(prep.details[moving].astype(str))]
        prep.held = kept + sorted(map(str, set(prep.details[moving].astype(str))))
    prep.novel = novel
    return prep, prep.rows("train"), prep.rows("val")


def teacher(fold: int, out: Path):
    """The fold's teacher (trained once, weights kept in ``OUT``) and its data."""
    import torch

    from teacher.model import TeacherConfig, TeacherNet
    from teacher.train import TrainConfig, fit

    torch.set_num_threads(1)
    spec = _lines()["teacher"]
    prep, tr, va = _fold(fold)
    overrides = dict(spec.get("model", {}))
    if overrides.get("bins"):
        overrides["binned"] = prep.encoder.quantile_columns
    seeds = spec.get("seeds", [0, 1, 2])
    mc = TeacherConfig(n_features=prep.n_features, window=prep.window,
                       members=len(seeds), **overrides)
    path = out / f"teacher_f{fold}.pt"
    net = TeacherNet(mc)
    if path.exists():
        net.load_state_dict(torch.load(path, weights_only=True))
    else:
        tc = TrainConfig(seed=seeds[0], **spec.get("train", {}))
        net = fit(prep, mc, tc).model
        torch.save(net.state_dict(), path)
    return net.eval(), prep, tr, va


def _logits_fn(net):
    import torch

    @torch.inference_mode()
    def run(windows: np.ndarray) -> np.ndarray:
        return net(torch.from_numpy(np.asarray(windows, np.float32))).numpy()

    return run


def _val_f1(prep, va: np.ndarray, z: np.ndarray) -> dict:
    from teacher.metrics import binary_metrics, choose_threshold

    y = prep.y[va]
    prob = 1 / (1 + np.exp(-np.asarray(z, np.float64)))
    cut = choose_threshold(y, prob, "best-f1")
    m = binary_metrics(y, prob, cut)
    held = np.isin(prep.details[va].astype(str), prep.held)
    return {"val_f1": m["f1"], "val_auc": m["roc_auc"], "val_fpr": m["fpr"],
            "cut": cut, "held_recall": float((prob[held] >= cut).mean())}


def student(name: str, fold: int, out: Path) -> dict:
    """Distil each student of candidate ``name`` on fold ``fold``; score on val."""
    import torch

    from student.distill import DistillConfig, distill, student_logits
    from student.zoo import build_student

    path = out / f"{name}_f{fold}.json"
    if path.exists():
        return json.loads(path.read_text())
    spec = _lines()[name]
    net, prep, tr, va = teacher(fold, out)
    run = _logits_fn(net)
    t_train = np.concatenate([run(prep.windows(tr[i:i + 4096]))
                              for i in range(0, len(tr), 4096)])
    t_val = np.concatenate([run(prep.windows(va[i:i + 4096]))
                            for i in range(0, len(va), 4096)])
    info = {"candidate": name, "fold": fold, "teacher": _val_f1(prep, va, t_val),
            "students": {}}
    settings = dict(spec.get("distill", {}))
    if spec.get("shift") == "teacher-cut":
        # The teacher's best-F1 cut on validation without the novel families.
        known = ~np.isin(prep.families[va].astype(str), prep.novel)
        cut = _val_f1(prep, va[known], t_val[known])["cut"]
        cut = min(max(cut, 1e-6), 1 - 1e-6)
        settings["target_shift"] = float(np.log(cut / (1 - cut)))
        info["target_shift"] = settings["target_shift"]
    cfg = DistillConfig(**settings)
    stop = va
    if spec.get("stop_on") == "known":
        # Round 11: the epoch is chosen without the novel families' rows, as in
        # the product, whose validation split never holds them.
        stop = va[~np.isin(prep.families[va].astype(str), prep.novel)]
    t_stop = t_val[np.isin(va, stop)]
    for label in spec.get("students", ["mlp-16", "mlp-32", "mlp-64"]):
        kind, width = label.split("-")
        model = build_student(kind, prep.n_features, prep.window, int(width),
                              seed=cfg.seed)
        start = time.time()
        history = distill(model, prep, tr, prep.y.astype(np.int64), t_train, stop,
                          cfg, teacher_fn=run if spec.get("rescore") else None,
                          val_teacher_logits=t_stop)
        z = student_logits(model, prep, va)
        agree = float(np.mean((z >= 0) == (t_val >= 0)))
        info["students"][label] = {**_val_f1(prep, va, z), "agree_at_0": agree,
                                   "epochs": len(history),
                                   "wall_s": time.time() - start}
        torch.save(model.state_dict(), out / f"{name}_f{fold}_{label}.pt")
    path.write_text(json.dumps(info))
    return info


def score(out: Path) -> dict:
    """Per candidate: each student's validation F1 per fold, the means, the gaps."""
    table: dict = {"folds": list(FOLDS), "candidates": {}}
    for name, spec in _lines().items():
        if name == "teacher":
            continue
        runs = {f: json.loads((out / f"{name}_f{f}.json").read_text())
                for f in FOLDS if (out / f"{name}_f{f}.json").exists()}
        entry: dict = {"spec": spec, "complete": len(runs) == len(FOLDS),
                       "folds": runs}
        if entry["complete"]:
            labels = list(runs[FOLDS[0]]["students"])
            entry["mean_teacher_f1"] = float(np.mean(
                [r["teacher"]["val_f1"] for r in runs.values()]))
            entry["mean_f1"] = {lab: float(np.mean(
                [r["students"][lab]["val_f1"] for r in runs.values()]))
                for lab in labels}
            entry["score"] = float(np.mean(list(entry["mean_f1"].values())))
        table["candidates"][name] = entry
    return table


if __name__ == "__main__":
    ROUND = Path(sys.argv[1]).resolve()
    what, args = sys.argv[2], sys.argv[3:]
    default = Path(f"runs/students-{ROUND.name}")
    if what == "teacher":
        out = Path(args[1]) if len(args) > 1 else default
        out.mkdir(parents=True, exist_ok=True)
        teacher(int(args[0]), out)
    elif what == "student":
        out = Path(args[2]) if len(args) > 2 else default
        out.mkdir(parents=True, exist_ok=True)
        print(json.dumps(student(args[0], int(args[1]), out)))
    else:
        print(json.dumps(score(Path(args[0]) if args else default), indent=1))
