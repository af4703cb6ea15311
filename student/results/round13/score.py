"""Round 13: family gap and gate proxy of each candidate (validation only).

The students of ``candidates.txt`` beside this file, distilled from round 8's fold
teachers (kept in the same folder), scored as ``../round8/family_score.py`` scores
its own; beside it the gate's proxy: the best F1 of each student and of the
teacher on the fold's validation rows outside the held-out families, and the
misses (``../round11/score.py`` does the work). Usage, from
the repository root with GATEWATCH_DATA set::

    python student/results/round13/score.py runs/students-round8 \\
        > student/results/round13/val-results.json
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
GROUPS = {c: [f"{c}3", f"{c}4", f"{c}5"] for c in ("rbase", "rep30")}

if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent / "round11"))
    import score as round11

    round11.main(HERE, GROUPS, full=True)
