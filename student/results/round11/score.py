"""Round 11: family gap and gate proxy of each candidate (validation only).

The students of ``candidates.txt`` beside this file, distilled from round 8's fold
teachers (kept in the same folder), scored as ``../round8/family_score.py`` scores
its own; beside it the gate's proxy: the best F1 of each student and of the
teacher on the fold's validation rows outside the held-out families. Usage, from
the repository root with GATEWATCH_DATA set::

    python student/results/round11/score.py runs/students-round8 \\
        > student/results/round11/val-results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
GROUPS = {c: [f"{c}0", f"{c}1"] for c in ("kbase", "kteach", "kmse")}
GROUPS |= {c: [f"{c}s0", f"{c}s1"] for c in ("kt1", "kep30")}
GROUPS |= {"khalf": ["khalf0", "khalf1"]}


def gate_proxy(cache: Path, groups: dict[str, list[str]], here: Path = HERE) -> dict:
    """Best F1 on known validation rows: the teacher's and each candidate's mean
    (``mean``), every value (``each``), and each candidate's misses (students under
    their fold teacher's less 0.01; rounds 12-13). ``here`` is the round's folder
    (its ``candidates.txt``)."""
    import fold_students as fs
    import torch

    from student.distill import student_logits
    from student.zoo import build_student
    from teacher.metrics import binary_metrics, choose_threshold

    fs.ROUND = here

    def best_f1(y, z):
        prob = 1 / (1 + np.exp(-np.asarray(z, np.float64)))
        return binary_metrics(y, prob, choose_threshold(y, prob))["f1"]

    out: dict = {"teacher": [], **{c: [] for c in groups}}
    misses = {c: 0 for c in groups}
    for fold in (0, 1, 2):
        net, prep, _, va = fs.teacher(fold, cache)
        known = va[~np.isin(prep.families[va].astype(str), prep.novel)]
        y = prep.y[known]
        out["teacher"].append(best_f1(y, np.concatenate(
            [fs._logits_fn(net)(prep.windows(known[i:i + 4096]))
             for i in range(0, len(known), 4096)])))
        for cand, names in groups.items():
            for name in names:
                model = build_student("mlp", prep.n_features, prep.window, 64)
                model.load_state_dict(torch.load(
                    cache / f"{name}_f{fold}_mlp-64.pt", weights_only=True))
                got = best_f1(y, student_logits(model, prep, known))
                out[cand].append(got)
                misses[cand] += int(got < out["teacher"][-1] - 0.01)
    return {"mean": {k: float(np.mean(v)) for k, v in out.items()},
            "each": out, "misses": misses}


def main(here: Path, groups: dict[str, list[str]], full: bool) -> None:
    """Score the round in ``here`` (candidates pooled as ``groups``) and print the
    JSON; ``full``: the gate proxy with every value and the misses (rounds 12-13),
    else its means only (round 11)."""
    import torch

    sys.path.insert(0, str(HERE.parent / "round8"))
    sys.path.insert(0, str(HERE.parent))
    import family_score

    torch.set_num_threads(1)
    cache = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/students-round8")
    done = {c: n for c, n in groups.items()
            if all((cache / f"{x}_f{f}.json").exists() for x in n for f in (0, 1, 2))}
    result = family_score.score_widths(here, ("mlp-64",), done, cache)
    proxy = gate_proxy(cache, done, here)
    result["gate_proxy"] = proxy if full else proxy["mean"]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(HERE, GROUPS, full=False)
