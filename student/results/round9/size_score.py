"""Round 9: the family measure of round 8 for wider students (validation only).

The students ``wide0``/``wide1`` of ``candidates.txt`` beside this file (mlp-32,
mlp-64; the round-8 default settings), distilled
from round 8's fold teachers (kept in the same folder), scored as
``../round8/family_score.py`` scores its own. Usage, from the repository root with
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
    import family_score

    torch.set_num_threads(1)
    cache = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/students-round8")
    print(json.dumps(family_score.score_widths(
        HERE, ("mlp-32", "mlp-64"), {"wide": ["wide0", "wide1"]}, cache), indent=1))
