"""The gateway agent: score each local flow as it happens, escalate the doubtful.

Layering: this package imports numpy, onnxruntime or a TFLite runtime, paho-mqtt and
the numpy part of ``flows``. It never imports torch, tensorflow, ``teacher`` or
``compress``; a test checks it.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("gatewatch.edge_agent")
