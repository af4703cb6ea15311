"""The pipeline behind ``compress run``: distill, prune, quantize, export, verify.

It turns a teacher checkpoint into an artifact folder for one target runtime
(onnx-fp32, onnx-int8, tflite-fp32, tflite-int8, tflite-micro, torch-int8) and
measures the exported file in that runtime before it writes the manifest.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("gatewatch.compress")

# Students whose converter graph compress.qat.FakeQuantStudent mirrors: the kinds
# that quantization-aware fine-tuning (--qat) applies to. Here, not in compress.qat,
# so that the CLI checks --qat always against it before torch is imported.
# TODO(gap): no QAT for the LSTM student (its unrolled int8 graph quantizes every
# gate product separately; nothing mirrors that).
QAT_KINDS = ("mlp", "cnn")
