"""Students: small models that learn from the teacher and fit on a gateway.

Each student takes the teacher's input contract (the teacher's encoder and window,
``[batch, W, F]``), returns one logit per window (higher means more anomalous) and
declares the export targets its layers support.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("gatewatch.student")

# The widest student: a wider one would be no smaller than the teachers it learns from.
MAX_WIDTH = 1024
