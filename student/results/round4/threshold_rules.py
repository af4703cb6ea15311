"""Round 4: which rule for a student's threshold keeps it closest to its teacher on
attack types the threshold never saw (validation rows of KDDTrain+ only).

Reads the round-1 fold teachers and round-3 ``swap30`` students cached under
``runs/students-round3`` (see ``PROTOCOL.md`` beside this file). Usage, from the
repository root with GATEWATCH_DATA set::

    python student/results/round4/threshold_rules.py [CACHE] > val-results.json

Round 5 scores other cached candidates the same way (``CAND`` of the round whose
students are in ``CACHE``, ``STUDENTS`` their sizes)::

    python student/results/round4/threshold_rules.py CACHE CAND STUDENT...
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
STUDENTS = ("mlp-4", "mlp-8", "mlp-16")
RULES = ("f1", "teacher-f1", "agree", "rate")


def agree_cut(target: np.ndarray, prob: np.ndarray) -> float:
    """The cut on ``prob`` whose decisions (prob >= cut) agree most with ``target``
    (ties go to the lower cut, as ``choose_threshold`` breaks them)."""
    order = np.argsort(-prob, kind="stable")
    p, t = prob[order], target[order].astype(np.int64)
    last = np.r_[p[1:] != p[:-1], True]
    flagged_pos = np.cumsum(t)[last]
    flagged = np.arange(1, p.size + 1)[last]
    # agreement = positives flagged + negatives not flagged
    agree = flagged_pos + (t.size - t.sum()) - (flagged - flagged_pos)
    best = np.flatnonzero(agree >= agree.max())[-1]
    return float(p[last][best])


def rate_cut(rate: float, prob: np.ndarray) -> float:
    """The cut that flags ``rate`` of the rows (the nearest count it can)."""
    k = int(round(rate * prob.size))
    if k <= 0:
        return float(prob.max() + 1e-6)
    return float(np.sort(prob)[::-1][min(k, prob.size) - 1])


def choose(rule: str, y, s_prob, t_dec) -> float:
    from teacher.metrics import choose_threshold

    if rule == "f1":
        return choose_threshold(y, s_prob)
    if rule == "teacher-f1":
        return choose_threshold(t_dec.astype(np.int64), s_prob)
    if rule == "agree":
        return agree_cut(t_dec, s_prob)
    return rate_cut(float(t_dec.mean()), s_prob)


def f1_at(y: np.ndarray, prob: np.ndarray, cut: float) -> float:
    flag = prob >= cut
    tp = int(np.sum(flag & (y == 1)))
    denom = int(flag.sum()) + int((y == 1).sum())
    return 2 * tp / denom if denom else 0.0


def fold_scores(
    fold: int, cache: Path, cand: str = "swap30", students=STUDENTS
) -> list[dict]:
    import torch

    sys.path.insert(0, str(HERE.parent))
    import fold_students as fs

    from student.distill import student_logits
    from student.zoo import build_student
    from teacher.metrics import choose_threshold

    fs.ROUND = HERE.parent / "round3"
    net, prep, _, va = fs.teacher(fold, cache)
    t_z = np.concatenate([fs._logits_fn(net)(prep.windows(va[i:i + 4096]))
                          for i in range(0, len(va), 4096)])
    t_prob = 1 / (1 + np.exp(-t_z.astype(np.float64)))
    s_prob = {}
    for label in students:
        kind, width = label.split("-")
        model = build_student(kind, prep.n_features, prep.window, int(width))
        model.load_state_dict(torch.load(cache / f"{cand}_f{fold}_{label}.pt",
                                         weights_only=True))
        z = student_logits(model, prep, va).astype(np.float64)
        s_prob[label] = 1 / (1 + np.exp(-z))

    y = prep.y[va].astype(np.int64)
    details = prep.details[va].astype(str)
    held = sorted(prep.held)
    rest = ~np.isin(details, held)
    half = np.random.default_rng(0).random(len(va)) < 0.5

    rows = []
    for k in (2, 3):
        for a_types in itertools.combinations(held, k):
            b_types = [t for t in held if t not in a_types]
            a = (rest & half) | np.isin(details, a_types)
            b = (rest & ~half) | np.isin(details, b_types)
            b_new = np.isin(details, b_types)
            t_cut = choose_threshold(y[a], t_prob[a])
            t_dec = t_prob[a] >= t_cut
            teacher_b = f1_at(y[b], t_prob[b], t_cut)
            row = {"fold": fold, "a_types": list(a_types), "b_types": b_types,
                   "teacher_f1_b": teacher_b,
                   "teacher_recall_b_types": float((t_prob[b_new] >= t_cut).mean()),
                   "students": {}}
            for label in students:
                entry = {}
                for rule in RULES:
                    cut = choose(rule, y[a], s_prob[label][a], t_dec)
                    f1 = f1_at(y[b], s_prob[label][b], cut)
                    entry[rule] = {
                        "cut": cut, "f1_b": f1, "gap": teacher_b - f1,
                        "recall_b_types": float((s_prob[label][b_new] >= cut).mean()),
                        "agree_b": float(np.mean(
                            (s_prob[label][b] >= cut) == (t_prob[b] >= t_cut))),
                    }
                row["students"][label] = entry
            rows.append(row)
    return rows


def summary(rows: list[dict]) -> dict:
    out = {}
    labels = list(rows[0]["students"])
    for rule in RULES:
        gaps = [r["students"][s][rule]["gap"] for r in rows for s in labels]
        per_fold = {
            f: float(np.mean([r["students"][s][rule]["gap"] for r in rows
                              if r["fold"] == f for s in labels]))
            for f in sorted({r["fold"] for r in rows})
        }
        per_student = {
            s: float(np.mean([r["students"][s][rule]["gap"] for r in rows]))
            for s in labels
        }
        out[rule] = {
            "mean_gap": float(np.mean(gaps)), "sd_gap": float(np.std(gaps)),
            "per_fold": per_fold, "per_student": per_student,
            "mean_recall_b_types": float(np.mean(
                [r["students"][s][rule]["recall_b_types"]
                 for r in rows for s in labels])),
            "mean_agree_b": float(np.mean(
                [r["students"][s][rule]["agree_b"] for r in rows for s in labels])),
        }
    out["teacher_mean_f1_b"] = float(np.mean([r["teacher_f1_b"] for r in rows]))
    out["teacher_mean_recall_b_types"] = float(np.mean(
        [r["teacher_recall_b_types"] for r in rows]))
    return out


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    cache = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/students-round3")
    cand = sys.argv[2] if len(sys.argv) > 2 else "swap30"
    students = tuple(sys.argv[3:]) or STUDENTS
    rows = [row for fold in (0, 1, 2)
            for row in fold_scores(fold, cache, cand, students)]
    print(json.dumps({"summary": summary(rows), "pairs": rows}, indent=1))
