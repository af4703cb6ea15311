"""Export a trained student to each target's file format.

* ``onnx-fp32``: the legacy TorchScript exporter (opset 17, dynamic batch, one
  self-contained file).
* ``onnx-int8``: onnxruntime ``quant_pre_process`` then ``quantize_static``
  (per-channel, QDQ or QOperator, calibrated on training windows); recurrent students
  use ``quantize_dynamic``, the only mode that quantizes the LSTM.
* ``tflite-fp32`` / ``tflite-int8``: a Keras rebuild with the torch weights copied,
  converted in a child process (:mod:`compress.tflite_worker`); int8 is full-integer
  (int8 input and output, every tensor int8/int32, which :func:`check_full_int8`
  verifies).
* ``tflite-micro``: the int8 model as a C array (``model.cc`` + ``model.h``), the
  list of builtin ops a TFLite Micro op resolver must register, and the tensor
  arena it needs as measured on the host (:func:`micro_arena`).

Float models end in a sigmoid and output the probability of anomaly ``[B, 1]``. int8
models output the logit instead (``output.kind = "logit"`` in the manifest; the
runtime applies the sigmoid after dequantizing): a quantized probability has a fixed
step of 1/256, which merges every window below 0.004 into one score, while a
quantized logit keeps a relative resolution at every probability.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compress import logger
from compress.tflite_worker import NO_MICRO
from flows.errors import ExportError

__all__ = [
    "ProbabilityModel",
    "check_full_int8",
    "export_onnx",
    "export_tflite",
    "micro_arena",
    "micro_resolver_ops",
    "quantize_onnx",
    "tflite_ops",
    "write_c_array",
]

REPO = Path(__file__).resolve().parent.parent


class ProbabilityModel(nn.Module):
    """Wraps a logit model: ``x [B, W, F] -> probability [B, 1]`` (or logit [B, 1])."""

    def __init__(self, model: nn.Module, output: str = "probability") -> None:
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Probability of anomaly (or its logit) per window, shape ``[B, 1]``."""
        z = self.model(x).unsqueeze(1)
        return torch.sigmoid(z) if self.output == "probability" else z


def export_onnx(
    model: nn.Module, path: Path, window: int, n_features: int,
    output: str = "probability",
) -> Path:
    """Write the model as ONNX with a dynamic batch axis (``output``: or "logit").

    The graph's output is named after what it holds: ``prob`` or ``logit``.
    """
    wrapped = ProbabilityModel(model, output).eval()
    out_name = "logit" if output == "logit" else "prob"
    example = torch.zeros(2, window, n_features)
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapped,
                (example,),
                str(path),
                input_names=["x"],
                output_names=[out_name],
                dynamic_axes={"x": {0: "batch"}, out_name: {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
    except OSError:
        raise  # the file could not be written (a full disk): not the model's fault
    except Exception as exc:
        raise ExportError(
            f"onnx-fp32: torch.onnx.export failed for {_layers(model)}: {exc}"
        ) from exc
    return path


class _Calibration:
    """onnxruntime calibration reader over training windows, in small batches."""

    def __init__(self, windows: np.ndarray, batch: int = 16) -> None:
        self.batches = [
            {"x": windows[i : i + batch].astype(np.float32)}
            for i in range(0, len(windows), batch)
        ]
        self.pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= len(self.batches):
            return None
        self.pos += 1
        return self.batches[self.pos - 1]

    def rewind(self) -> None:
        self.pos = 0


def quantize_onnx(
    fp32_path: Path,
    out_path: Path,
    calibration: np.ndarray,
    *,
    recurrent: bool = False,
    quant_format: str = "qoperator",
    method: str = "minmax",
) -> dict[str, Any]:
    """int8 ONNX from a float ONNX; returns the options used (for the manifest)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(fp32_path), str(pre))
            if recurrent:
                quantize_dynamic(str(pre), str(out_path), weight_type=QuantType.QInt8)
                return {"mode": "dynamic", "weight_type": "int8"}
            fmt = QuantFormat.QDQ if quant_format == "qdq" else QuantFormat.QOperator
            act = QuantType.QInt8 if quant_format == "qdq" else QuantType.QUInt8
            calib_method = {
                "minmax": CalibrationMethod.MinMax,
                "percentile": CalibrationMethod.Percentile,
                "entropy": CalibrationMethod.Entropy,
            }[method]
            # The histogram calibrators print their settings on stdout, which
            # would land in the middle of `compress run --json`: kept for the log.
            chatter = io.StringIO()
            with contextlib.redirect_stdout(chatter):
                quantize_static(
                    str(pre),
                    str(out_path),
                    _Calibration(calibration),
                    quant_format=fmt,
                    activation_type=act,
                    weight_type=QuantType.QInt8,
                    per_channel=True,
                    calibrate_method=calib_method,
                )
            if chatter.getvalue().strip():
                logger.debug("onnxruntime calibration: %s", chatter.getvalue().strip())
        except OSError:
            raise  # a file could not be written (a full disk): not the model's fault
        except Exception as exc:
            raise ExportError(
                f"onnx-int8: onnxruntime quantization failed for {fp32_path.name}: "
                f"{exc}"
            ) from exc
    return {
        "mode": "static",
        "format": quant_format,
        "per_channel": True,
        "calibration": method,
        "calibration_windows": int(len(calibration)),
    }


def _layers(model: nn.Module) -> str:
    names = [type(m).__name__ for m in model.modules() if not list(m.children())]
    return "layers " + ", ".join(dict.fromkeys(names))


def export_tflite(
    model: nn.Module,
    kind: str,
    path: Path,
    calibration: np.ndarray,
    *,
    int8: bool,
    window: int,
    n_features: int,
    timeout: float = 600.0,
    output: str | None = None,
) -> dict[str, Any]:
    """Convert a student to TFLite in a child process; a crash is an ExportError.

    ``output`` is "probability" or "logit" (default: logit for int8, else
    probability).
    """
    output = output or ("logit" if int8 else "probability")
    target = "tflite-int8" if int8 else "tflite-fp32"
    model = model.eval()
    check = calibration[: min(16, len(calibration))].astype(np.float32)
    with torch.inference_mode():
        z = model(torch.from_numpy(check))
        probs = (torch.sigmoid(z) if output == "probability" else z).numpy()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        weights = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        np.savez(work / "weights.npz", **weights)
        np.save(work / "calib.npy", calibration.astype(np.float32))
        np.save(work / "check.npy", check)
        np.save(work / "probs.npy", probs)
        spec = {
            "kind": kind,
            "weights": str(work / "weights.npz"),
            "calibration": str(work / "calib.npy"),
            "check_windows": str(work / "check.npy"),
            "check_probs": str(work / "probs.npy"),
            "int8": int8,
            "output": output,
            "window": window,
            "n_features": n_features,
            # The child runs in the repository root: hand it an absolute path.
            "out": str(Path(path).resolve()),
        }
        (work / "spec.json").write_text(json.dumps(spec))
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), *filter(None, [env.get("PYTHONPATH")])]
        )
        try:
            done = subprocess.run(
                [sys.executable, "-m", "compress.tflite_worker",
                 str(work / "spec.json")],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                cwd=str(REPO),
            )
        except subprocess.TimeoutExpired as exc:
            raise ExportError(
                f"{target}: the TFLite converter ran past {timeout:.0f} s for the "
                f"{kind} student ({_layers(model)})"
            ) from exc
    _raise_write_failure(done)
    if done.returncode != 0:
        how = (
            f"crashed with signal {-done.returncode}"
            if done.returncode < 0
            else f"exited with status {done.returncode}"
        )
        tail = (done.stderr or "").strip().splitlines()[-3:]
        raise ExportError(
            f"{target}: the TFLite converter {how} on the {kind} student "
            f"({_layers(model)}); last output: {' | '.join(tail) or 'none'}"
        )
    report = {}
    for line in done.stdout.splitlines():
        if line.startswith("GATEWATCH-RESULT "):
            report = json.loads(line.split(" ", 1)[1])
    if report.get("keras_max_abs_diff", 0.0) > 1e-4 * max(1.0, float(
            np.abs(probs).max(initial=0.0))):
        raise ExportError(
            f"{target}: the Keras rebuild of the {kind} student disagrees with torch "
            f"by {report['keras_max_abs_diff']:.3g} (weight copy is wrong)"
        )
    logger.info("exported %s (%d bytes)", path, path.stat().st_size)
    return report


def _raise_write_failure(done: subprocess.CompletedProcess) -> None:
    """Raise the OSError the TFLite worker met writing the model (it exits
    :data:`~compress.tflite_worker.WRITE_FAILED` with a ``GATEWATCH-OSERROR`` line):
    a full disk is the output's problem, not a failed conversion."""
    from compress.tflite_worker import WRITE_FAILED, WRITE_FAILED_TAG

    if done.returncode != WRITE_FAILED:
        return
    for line in (done.stdout or "").splitlines():
        if line.startswith(WRITE_FAILED_TAG):
            said = json.loads(line.split(" ", 1)[1])
            raise OSError(said.get("errno"), said.get("strerror") or "write failed",
                          said.get("filename"))


def _interpreter(content: bytes):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_content=content)


def check_full_int8(content: bytes) -> list[str]:
    """Tensors of a TFLite model that are neither int8 nor int32 (empty = full-int8)."""
    interp = _interpreter(content)
    bad = []
    for t in interp.get_tensor_details():
        name = np.dtype(t["dtype"]).name
        if name not in ("int8", "int32"):
            bad.append(f"{t['name']}:{name}")
    return bad


def tflite_ops(content: bytes) -> list[str]:
    """The distinct builtin op names a TFLite model uses, sorted."""
    interp = _interpreter(content)
    return sorted({op["op_name"] for op in interp._get_ops_details()})


# The tensor arena search: 16-byte steps (TFLite Micro aligns what it places in
# the arena to 16 bytes) up to 1 MiB, one child process per size tried.
ARENA_STEP = 16
ARENA_LIMIT = 1 << 20


def micro_arena(content: bytes, timeout: float = 60.0) -> dict[str, Any]:
    """The tensor arena a TFLite Micro build of ``content`` needs, as measured here.

    ``bytes`` is the smallest arena (a multiple of :data:`ARENA_STEP`) with which
    the host's TFLite Micro interpreter allocates the model's tensors and runs a
    window, found by bisection; each size is tried in a child process
    (``compress.tflite_worker --arena``), because some sizes that are too small
    crash that interpreter. More arena never hurts (checked on cnn, mlp and lstm
    students), so the search is sound. ``bytes`` is None, with ``why``, when
    tflite-micro is not installed or the model does not run in
    :data:`ARENA_LIMIT`. The interpreter's reference kernels on a 64-bit host:
    a device's own build can differ (``compress/README.md``)."""
    from compress.artifact import library_versions

    how = (f"smallest arena in {ARENA_STEP}-byte steps with which tflite-micro "
           f"{library_versions().get('tflite-micro', '?')} (reference kernels, "
           f"{platform.machine() or 'this host'}) allocated and ran the model")
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model.tflite"
        model.write_bytes(content)

        def fits(size: int) -> int:
            return _arena_probe(model, size, timeout)

        top = fits(ARENA_LIMIT)
        if top != 0:
            why = ("tflite-micro is not installed" if top == NO_MICRO else
                   f"the model does not run in TFLite Micro with {ARENA_LIMIT} bytes")
            return {"bytes": None, "why": why}
        lo, hi = 0, ARENA_LIMIT // ARENA_STEP  # in steps: lo fails, hi fits
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(mid * ARENA_STEP) == 0:
                hi = mid
            else:
                lo = mid
    return {"bytes": hi * ARENA_STEP, "measured": how}


def _arena_probe(model: Path, size: int, timeout: float) -> int:
    """Exit status of ``compress.tflite_worker --arena MODEL SIZE`` (0: it fits;
    a crash or a run past ``timeout`` counts as not fitting)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    try:
        done = subprocess.run(
            [sys.executable, "-m", "compress.tflite_worker", "--arena", str(model),
             str(size)],
            capture_output=True, timeout=timeout, env=env, cwd=str(REPO))
    except subprocess.TimeoutExpired:
        return 1
    return done.returncode


def _camel(op: str) -> str:
    return "".join(part.capitalize() for part in op.lower().split("_"))


def micro_resolver_ops(ops: list[str]) -> list[str]:
    """TFLite Micro ``MicroMutableOpResolver`` calls for ops (``AddFullyConnected``)."""
    special = {"FULLY_CONNECTED": "FullyConnected", "CONV_2D": "Conv2D"}
    return [f"Add{special.get(op, _camel(op))}" for op in ops]


def write_c_array(
    content: bytes, folder: Path, ops: list[str], name: str = "g_gatewatch_model",
    arena: int | None = None,
) -> tuple[Path, Path]:
    """Write ``model.cc`` (the bytes, 16-byte aligned) and ``model.h``; with
    ``arena`` (:func:`micro_arena`'s bytes) the header states it too."""
    calls = micro_resolver_ops(ops)
    arena_lines = "" if arena is None else (
        "// Tensor arena: the smallest that ran on the host's TFLite Micro\n"
        "// (64-bit, reference kernels); give a device build some headroom.\n"
        f"constexpr int kGatewatchTensorArenaBytes = {arena};\n\n")
    header = (
        "// gatewatch student model for TensorFlow Lite Micro (generated).\n"
        "#ifndef GATEWATCH_MODEL_H_\n#define GATEWATCH_MODEL_H_\n\n"
        f"extern const unsigned char {name}[];\n"
        f"extern const unsigned int {name}_len;\n\n"
        f"// Ops to register: tflite::MicroMutableOpResolver<{len(calls)}> resolver;\n"
        + "".join(f"//   resolver.{c}();\n" for c in calls)
        + f"constexpr int kGatewatchModelOpCount = {len(calls)};\n\n"
        + arena_lines
        + "#endif  // GATEWATCH_MODEL_H_\n"
    )
    rows = []
    for start in range(0, len(content), 12):
        chunk = content[start : start + 12]
        rows.append("  " + ", ".join(f"0x{b:02x}" for b in chunk) + ",")
    body = (
        "// gatewatch student model for TensorFlow Lite Micro (generated).\n"
        '#include "model.h"\n\n'
        f"alignas(16) const unsigned char {name}[] = {{\n"
        + "\n".join(rows)
        + f"\n}};\nconst unsigned int {name}_len = {len(content)};\n"
    )
    cc, h = folder / "model.cc", folder / "model.h"
    cc.write_text(body)
    h.write_text(header)
    return cc, h
