"""Round 8: students against their teacher on attack families neither ever saw.

Scores the students of ``candidates.txt`` beside this file (distilled by
``student/results/fold_students.py``) on the family measure of ``PROTOCOL.md``:
per fold, A = half of the validation rows outside the held-out families and types
plus the held-out types of the other families, B = the benign rows of the other
half plus every row of the held-out families (R2L, U2R); the teacher's best-F1
cut on A, each student's cut on A at the teacher's flag rate there (the ``rate``
rule), F1 on B. Five halvings per fold. Usage, from the repository root with
GATEWATCH_DATA set::

    python student/results/round8/family_score.py runs/students-round8 \\
        > student/results/round8/val-results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SIZES = ("mlp-4", "mlp-8", "mlp-16")
HALVINGS = 5


def _prob(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.asarray(z, np.float64)))


def family_pairs(prep, va: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(A, B) masks over the rows ``va`` (see the module docstring)."""
    fams = prep.families[va].astype(str)
    details = prep.details[va].astype(str)
    novel = np.isin(fams, prep.novel)
    other_held = np.isin(details, prep.held) & ~novel
    rest = ~novel & ~other_held
    pairs = []
    for seed in range(HALVINGS):
        half = np.random.default_rng(seed).random(len(va)) < 0.5
        benign = prep.y[va] == 0
        pairs.append(((rest & half) | other_held, (rest & ~half & benign) | novel))
    return pairs


def fold_rows(fold: int, cache: Path, names: list[str]) -> list[dict]:
    """Per halving of ``fold``: the teacher's scores on B and each student's."""
    import torch

    sys.path.insert(0, str(HERE.parent))
    import fold_students as fs

    from student.distill import student_logits
    from student.zoo import build_student
    from teacher.metrics import binary_metrics, choose_threshold, cut_at_rate

    fs.ROUND = HERE
    net, prep, _, va = fs.teacher(fold, cache)
    t_prob = _prob(np.concatenate([fs._logits_fn(net)(prep.windows(va[i:i + 4096]))
                                   for i in range(0, len(va), 4096)]))
    probs = {}
    for name in names:
        for size in SIZES:
            kind, width = size.split("-")
            model = build_student(kind, prep.n_features, prep.window, int(width))
            model.load_state_dict(torch.load(cache / f"{name}_f{fold}_{size}.pt",
                                             weights_only=True))
            probs[f"{size}/{name}"] = _prob(student_logits(model, prep, va))

    y = prep.y[va].astype(np.int64)
    novel = np.isin(prep.families[va].astype(str), prep.novel)

    def scores(prob: np.ndarray, cut: float, b: np.ndarray) -> dict:
        m = binary_metrics(y[b], prob[b], cut)
        return {"f1": m["f1"], "fpr": m["fpr"], "auc": m["roc_auc"],
                "novel_recall": float(np.mean(prob[b & novel] >= cut))}

    rows = []
    for a, b in family_pairs(prep, va):
        t_cut = choose_threshold(y[a], t_prob[a])
        rate = float(np.mean(t_prob[a] >= t_cut))
        row = {"fold": fold, "teacher": scores(t_prob, t_cut, b), "students": {}}
        for key, prob in probs.items():
            got = scores(prob, cut_at_rate(prob[a], rate), b)
            got["gap"] = row["teacher"]["f1"] - got["f1"]
            row["students"][key] = got
        rows.append(row)
    return rows


def summary(rows: list[dict], candidates: dict[str, list[str]]) -> dict:
    """Mean gap per candidate (its seeds' students pooled), per fold, per size."""
    out: dict = {"teacher": {k: float(np.mean([r["teacher"][k] for r in rows]))
                             for k in ("f1", "fpr", "auc", "novel_recall")}}
    for cand, names in candidates.items():
        def mean(key: str, fold=None, size=None, names=names) -> float:
            return float(np.mean([
                r["students"][f"{s}/{n}"][key] for r in rows for s in SIZES
                for n in names if (fold is None or r["fold"] == fold)
                and (size is None or s == size)]))

        out[cand] = {
            "gap": mean("gap"), "f1": mean("f1"), "fpr": mean("fpr"),
            "auc": mean("auc"),
            "novel_recall": mean("novel_recall"),
            "per_fold": {f: mean("gap", fold=f)
                         for f in sorted({r["fold"] for r in rows})},
            "per_size": {s: mean("gap", size=s) for s in SIZES},
        }
    return out


def score_widths(
    round_dir: Path, sizes: tuple[str, ...], groups: dict[str, list[str]],
    cache: Path,
) -> dict:
    """Another round's students (``round_dir``'s ``candidates.txt``, distilled
    from this round's fold teachers in ``cache``) scored as this round scores its
    own: ``groups`` maps a reported name to the candidates pooled under it."""
    global HERE, SIZES
    HERE, SIZES = round_dir, sizes
    names = [n for group in groups.values() for n in group]
    rows = [row for fold in (0, 1, 2) for row in fold_rows(fold, cache, names)]
    return {"summary": summary(rows, groups), "pairs": rows}


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    cache = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/students-round8")
    groups = {"base": ["base0", "base1"], "shift": ["shift0", "shift1"],
              "shiftT2": ["shiftT2s0", "shiftT2s1"]}
    done = {c: n for c, n in groups.items()
            if all((cache / f"{x}_f{f}.json").exists() for x in n for f in (0, 1, 2))}
    names = [x for n in done.values() for x in n]
    rows = [row for fold in (0, 1, 2) for row in fold_rows(fold, cache, names)]
    print(json.dumps({"summary": summary(rows, done), "pairs": rows}, indent=1))
