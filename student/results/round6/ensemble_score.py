"""Round 6: one student against the average of three (validation rows only).

Scores the students of ``candidates.txt`` beside this file (distilled by
``student/results/fold_students.py``) on the split measure: threshold on some
held-out attack types, F1 on the others (see ``PROTOCOL.md``). Usage, from the
repository root with GATEWATCH_DATA set::

    python student/results/round6/ensemble_score.py runs/students-round6 \
        > val-results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SEEDS = ("s0", "s1", "s2")
SIZES = ("mlp-4", "mlp-8", "mlp-16")


def _prob(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.asarray(z, np.float64)))


def fold_gaps(
    fold: int, cache: Path, seeds=SEEDS, round_dir: Path = HERE
) -> list[dict]:
    """Per split-measure pair of ``fold``: the teacher's F1 on B and each student's
    (and each three-seed average's) gap to it under the ``rate`` rule. ``seeds``
    name the candidates (of ``round_dir``'s ``candidates.txt``) averaged."""
    import torch

    sys.path.insert(0, str(HERE.parent))
    import fold_students as fs

    from student.distill import student_logits
    from student.zoo import build_student
    from teacher.metrics import (
        binary_metrics,
        choose_threshold,
        cut_at_rate,
        type_split_pairs,
    )

    def f1_at(y: np.ndarray, prob: np.ndarray, cut: float) -> float:
        return binary_metrics(y, prob, cut)["f1"]

    fs.ROUND = round_dir
    net, prep, _, va = fs.teacher(fold, cache)
    t_prob = _prob(np.concatenate([fs._logits_fn(net)(prep.windows(va[i:i + 4096]))
                                   for i in range(0, len(va), 4096)]))
    logits = {}
    for size in SIZES:
        kind, width = size.split("-")
        for cand in seeds:
            model = build_student(kind, prep.n_features, prep.window, int(width))
            model.load_state_dict(torch.load(cache / f"{cand}_f{fold}_{size}.pt",
                                             weights_only=True))
            logits[(size, cand)] = student_logits(model, prep, va)
        logits[(size, "ens3")] = np.mean([logits[(size, c)] for c in seeds], axis=0)

    y = prep.y[va].astype(np.int64)
    rows = []
    for a, b in type_split_pairs(prep.details[va].astype(str), sorted(prep.held)):
        t_cut = choose_threshold(y[a], t_prob[a])
        rate = float(np.mean(t_prob[a] >= t_cut))
        teacher_b = f1_at(y[b], t_prob[b], t_cut)
        row = {"fold": fold, "teacher_f1_b": teacher_b, "gaps": {}}
        for (size, cand), z in logits.items():
            s_prob = _prob(z)
            cut = cut_at_rate(s_prob[a], rate)
            row["gaps"][f"{size}/{cand}"] = (
                teacher_b - f1_at(y[b], s_prob[b], cut))
        rows.append(row)
    return rows


def summary(rows: list[dict], seeds=SEEDS) -> dict:
    """Mean gaps: ``single`` (mean over seeds) and ``ens3``, pooled, per fold, per
    size."""
    def gap(row: dict, size: str, how: str) -> float:
        if how == "ens3":
            return row["gaps"][f"{size}/ens3"]
        return float(np.mean([row["gaps"][f"{size}/{c}"] for c in seeds]))

    out: dict = {}
    for how in ("single", "ens3"):
        out[how] = {
            "mean_gap": float(np.mean([gap(r, s, how) for r in rows for s in SIZES])),
            "per_fold": {f: float(np.mean([gap(r, s, how) for r in rows
                                           if r["fold"] == f for s in SIZES]))
                         for f in sorted({r["fold"] for r in rows})},
            "per_size": {s: float(np.mean([gap(r, s, how) for r in rows]))
                         for s in SIZES},
        }
    out["per_seed"] = {c: float(np.mean([r["gaps"][f"{s}/{c}"] for r in rows
                                         for s in SIZES])) for c in seeds}
    out["teacher_mean_f1_b"] = float(np.mean([r["teacher_f1_b"] for r in rows]))
    return out


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    cache = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/students-round6")
    rows = [row for fold in (0, 1, 2) for row in fold_gaps(fold, cache)]
    print(json.dumps({"summary": summary(rows), "pairs": rows}, indent=1))
