"""The teacher: the large CNN-BiLSTM that learns normal and malicious traffic.

It trains on windows of encoded flows (on a GPU where one is present), is evaluated
against shallow baselines, and is what the central re-scorer runs. Its score is the
probability that the last flow of a window is malicious: higher means more anomalous.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("gatewatch.teacher")
