"""Round 10: the family measure of round 8 for mlp-96 students (validation only).

The students ``w96s0``/``w96s1`` of ``candidates.txt`` beside this file, distilled
from round 8's fold teachers, scored as ``../round8/family_score.py`` scores.
Usage, from the repository root with GATEWATCH_DATA set::

    python student/results/round10/width_score.py runs/students-round8 \\
        > student/results/round10/val-results.json
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
    fsc.HERE, fsc.SIZES = HERE, ("mlp-96",)
    rows = [row for fold in (0, 1, 2)
            for row in fsc.fold_rows(fold, cache, ["w96s0", "w96s1"])]
    print(json.dumps({"summary": fsc.summary(rows, {"w96": ["w96s0", "w96s1"]}),
                      "pairs": rows}, indent=1))
