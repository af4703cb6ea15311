"""Shallow baselines trained on one conn-log capture and scored on another.

The cross-capture counterpart of ``teacher baselines`` (which scores a file's own
test split): fit the encoder and the models on capture A's train rows (threshold on
A's validation rows), then score every labeled row of capture B. Usage, from the
repository root::

    python teacher/results/xcap/baselines_across.py A.conn.log B.conn.log > out.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from teacher.baselines import run_baselines
from teacher.data import concat, prepare


def _shown(path: str) -> str:
    """A path under $GATEWATCH_DATA relative to it: no machine's paths in results."""
    base = os.environ.get("GATEWATCH_DATA")
    if base:
        try:
            return str(Path(path).resolve().relative_to(Path(base).resolve()))
        except ValueError:
            pass
    return path


if __name__ == "__main__":
    train_file, test_file = sys.argv[1], sys.argv[2]
    a = prepare(train_file, seed=0, need_split=True)
    b = prepare(test_file, encoder=a.encoder, seed=0, need_split=True)
    a.split = np.where(a.split == "test", "unused", a.split).astype(object)
    b.split = np.full(len(b.y), "test", dtype=object)
    both = concat([a, b])
    out = run_baselines(both, timing=False)
    keep = ("accuracy", "precision", "recall", "f1", "roc_auc", "fpr", "confusion",
            "train_rows", "threshold", "val_f1")
    print(json.dumps({"train": _shown(train_file), "test": _shown(test_file),
                      "models": {k: {f: v.get(f) for f in keep}
                                 for k, v in out.items()}}, indent=1))
