"""Round 9: the family measure of round 8 for wider students (validation only).

The students ``wide0``/``wide1`` of ``candidates.txt`` beside this file (mlp-32,
mlp-64; the round-8 default settings) are distilled from round 8's fold teachers
(the same weights, kept in the same folder) and scored exactly as round 8 scores
its own (``../round8/family_score.py``). Usage, from the repository root with
GATEWATCH_DATA set::

    python student/results/round9/size_score.py runs/students-round8 \\
        > student/results/round9/val-results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    import torch

    sys.path.insert(0, str(HERE.parent / "round8"))
    import family_score as fsc

    torch.set_num_threads(1)
    cache = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/students-round8")
    fsc.HERE, fsc.SIZES = HERE, ("mlp-32", "mlp-64")
    rows = [row for fold in (0, 1, 2)
            for row in fsc.fold_rows(fold, cache, ["wide0", "wide1"])]
    print(json.dumps({"summary": fsc.summary(rows, {"wide": ["wide0", "wide1"]}),
                      "pairs": rows}, indent=1))
