"""Round 7: students distilled on windows with more of their columns swapped, on
the split measure (validation rows only; see ``PROTOCOL.md`` beside this file).

Scores each swap share's three seeds as round 6 scored its own (its
``ensemble_score.py``). Usage, from the repository root with GATEWATCH_DATA set::

    python student/results/round7/swap_score.py runs/students-round7 > val-results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARES = {"swap50": ("w50s0", "w50s1", "w50s2"), "swap70": ("w70s0", "w70s1", "w70s2")}

if __name__ == "__main__":
    import torch

    sys.path.insert(0, str(HERE.parent / "round6"))
    import ensemble_score as es

    torch.set_num_threads(1)
    cache = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/students-round7")
    out = {}
    for name, seeds in SHARES.items():
        rows = [row for fold in (0, 1, 2)
                for row in es.fold_gaps(fold, cache, seeds, HERE)]
        out[name] = es.summary(rows, seeds)
    print(json.dumps(out, indent=1))
