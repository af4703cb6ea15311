"""``torch-int8``: the teacher quantized by Intel Neural Compressor, for the re-scorer.

Intel Neural Compressor 3.10 without IPEX quantizes through PyTorch 2 export (PT2E)
with the X86 inductor quantizer: static post-training quantization of the
convolutions and dense layers (the LSTM stays float). Its accuracy-driven
``autotune`` tries INC's own int8 tuning space until the validation F1 loses at most
``max_f1_drop`` (INC's loss is relative: ``(base - q) / base``). The result is
measured against the float teacher on the test split (F1, decision agreement,
|Δprob|, latency on one thread) and saved as a ``torch.export`` program
(``model.pt2``, dynamic batch axis: any batch from 1 to 65536) with a manifest.
It is not an edge target: the gateway never runs torch; ``compress eval`` does not
load it. Load it with :func:`load_program`: the program calls the
``quantized_decomposed`` ops, which ``torch.export.load`` cannot resolve until
torchao (or ``torch.ao.quantization``) has registered them in the process.
"""

from __future__ import annotations

# TODO(gap): `teacher serve` cannot load a torch-int8 artifact (it takes checkpoints
# only), so the re-scorer still runs the fp32 teacher; on this CPU int8 is slower.
import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress import logger
from compress.artifact import portable_path, write_manifest, write_thresholds
from flows.errors import ExportError

__all__ = ["load_program", "quantize_teacher", "save_program", "torch_int8_artifact"]


MAX_BATCH = 1 << 16


def _batch_dims() -> dict[str, dict[int, Any]]:
    """``dynamic_shapes`` for torch.export: the batch axis of input ``x`` is free."""
    return {"x": {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}}


def _calibrate(model: Any, windows: np.ndarray, batch: int = 64) -> None:
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            model(torch.from_numpy(windows[i : i + batch]))


def _probs(model: Any, windows: np.ndarray, batch: int = 1024) -> np.ndarray:
    with torch.no_grad():
        parts = [torch.sigmoid(model(torch.from_numpy(windows[i : i + batch])))
                 .float().numpy() for i in range(0, len(windows), batch)]
    return np.concatenate(parts)


@contextlib.contextmanager
def _inc_quiet() -> Iterator[None]:
    """INC logs every tuning step at INFO on a handler of its own (over a hundred
    lines a run) and sets its level from ``$LOGLEVEL`` when it first loads: kept
    for ``-v``, otherwise only its errors reach the terminal."""
    level = "DEBUG" if logger.isEnabledFor(logging.DEBUG) else "ERROR"
    saved = os.environ.get("LOGLEVEL")
    os.environ["LOGLEVEL"] = level
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("LOGLEVEL", None)
        else:
            os.environ["LOGLEVEL"] = saved
        logging.getLogger("neural_compressor").setLevel(level)


def quantize_teacher(
    net: torch.nn.Module,
    calibration: np.ndarray,
    val_windows: np.ndarray,
    y_val: np.ndarray,
    max_f1_drop: float,
) -> tuple[Any, dict[str, Any]]:
    """INC PT2E static int8 of ``net``; autotune against validation F1 when it works."""
    with _inc_quiet():
        from neural_compressor.torch.export import export
        from neural_compressor.torch.quantization import (
            TuningConfig,
            autotune,
            convert,
            get_default_static_config,
            prepare,
        )

    from teacher.metrics import binary_metrics, choose_threshold

    net = net.eval().cpu()
    example = (torch.from_numpy(calibration[:4]),)
    dims = _batch_dims()

    def val_f1(model: Any) -> float:
        p = _probs(model, val_windows)
        return float(binary_metrics(y_val, p, choose_threshold(y_val, p))["f1"])

    try:
        exported = export(net, example, dynamic_shapes=dims)
    except Exception as exc:
        raise ExportError(
            f"torch-int8: torch.export of the teacher failed: {exc}"
        ) from exc

    # Accuracy-driven tuning first; a plain default static PTQ when it fails.
    info: dict[str, Any] = {"tool": "neural-compressor PT2E static (X86 inductor)"}
    base_f1 = val_f1(net)
    tolerable = max_f1_drop / base_f1 if base_f1 > 0 else max_f1_drop
    try:
        from neural_compressor.torch.quantization import StaticQuantConfig

        space = StaticQuantConfig.get_config_set_for_tuning()
        space = list(space) if isinstance(space, list | tuple) else [space]
        tune = TuningConfig(config_set=space, tolerable_loss=tolerable, max_trials=4)
        q = autotune(exported, tune, eval_fn=val_f1, run_fn=lambda m: _calibrate(
            m, calibration), example_inputs=example)
        info.update(mode="autotune", tolerable_relative_loss=tolerable)
    except Exception as exc:  # INC's tuner raises many kinds; fall back, and say so
        logger.warning("INC autotune failed (%s); using default static PTQ", exc)
        info.update(mode="static-default", autotune_error=str(exc)[:200])
        exported = export(net, example, dynamic_shapes=dims)
        prepared = prepare(exported, get_default_static_config())
        _calibrate(prepared, calibration)
        q = convert(prepared)
    if q is None:
        info.update(mode="static-default", autotune_error="no config met the budget")
        prepared = prepare(export(net, example, dynamic_shapes=dims),
                           get_default_static_config())
        _calibrate(prepared, calibration)
        q = convert(prepared)
    info["float_val_f1"] = base_f1
    return q, info


def _timing(fn: Any, windows: np.ndarray) -> dict[str, float]:
    from teacher.metrics import time_scorer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return time_scorer(fn, windows[:512], n_single=200, n_batches=10)
    finally:
        torch.set_num_threads(threads)


def save_program(q: Any, example: np.ndarray, path: Path) -> Path:
    """Save the quantized model as a ``torch.export`` program with a dynamic batch."""
    try:
        program = torch.export.export(q, (torch.from_numpy(example),),
                                      dynamic_shapes=_batch_dims())
        torch.export.save(program, str(path))
    except Exception as exc:
        raise ExportError(f"torch-int8: saving the quantized teacher failed: {exc}") \
            from exc
    return path


def load_program(path: Path) -> Any:
    """The saved int8 program as a callable module (any batch size).

    Registers the ``quantized_decomposed`` quantize/dequantize ops first (importing
    torchao's PT2E package does); without them loading fails in a fresh process.
    """
    import torchao.quantization.pt2e  # noqa: F401  (registers quantized_decomposed)

    try:
        return torch.export.load(str(path)).module()
    except Exception as exc:
        raise ExportError(f"{path}: cannot load the torch-int8 program: {exc}") \
            from exc


def torch_int8_artifact(ctx: Any, folder: Path) -> Path:
    """Quantize the teacher with INC, measure it against fp32, write the folder."""
    from teacher.metrics import binary_metrics, choose_threshold

    ctx.progress("torch-int8: quantizing the teacher with Neural Compressor")
    net = ctx.teacher.model
    y_val, y_test = ctx.y[ctx.val], ctx.y[ctx.test]
    q, info = quantize_teacher(net, ctx.calibration, ctx.val_windows, y_val,
                               ctx.cfg.max_f1_drop)

    # Measure int8 against fp32 on the same windows.
    p_val, p_test = _probs(q, ctx.val_windows), _probs(q, ctx.test_windows)
    f_test = _probs(net, ctx.test_windows)
    decision = choose_threshold(y_val, p_val)
    val_m = binary_metrics(y_val, p_val, decision)
    test_m = binary_metrics(y_test, p_test, decision, ctx.families_test)
    fp32_test = dict(ctx.teacher_test)
    if ctx.cfg.time_latency:
        def score(model: Any):
            return lambda x: _probs(model, np.asarray(x, dtype=np.float32))

        test_m.update(_timing(score(q), ctx.test_windows))
        fp32_test.update(_timing(score(net), ctx.test_windows))

    # Save the quantized program and the manifest.
    folder.mkdir(parents=True, exist_ok=True)
    save_program(q, ctx.calibration[:4], folder / "model.pt2")
    ctx.teacher.encoder.save(folder / "encoder.json")
    from compress.artifact import escalation_band

    lo, hi = escalation_band(y_val, p_val, decision)
    write_thresholds(folder, decision, lo, hi)
    W, F = ctx.prep.window, ctx.prep.n_features
    gate_ok = val_m["f1"] >= ctx.teacher_val["f1"] - ctx.cfg.max_f1_drop
    fields = {
        "target": "torch-int8",
        "model_file": "model.pt2",
        "params": int(sum(p.numel() for p in net.parameters())),
        "student": {"kind": "teacher", "config": ctx.teacher.config.to_dict()},
        "input": {"shape": [None, W, F], "dtype": "float32", "scale": None,
                  "zero_point": None, "max_batch": MAX_BATCH},
        "output": {"dtype": "float32", "scale": None, "zero_point": None,
                   "kind": "logit"},
        "metrics": {"test": test_m, "val": val_m, "runtime": "torch (PT2E int8)"},
        "agreement": {
            "decision_agreement": float(np.mean(
                (p_test >= decision) == (f_test >= ctx.teacher.threshold))),
            "max_abs_prob_diff": float(np.max(np.abs(p_test - f_test))),
            "mean_abs_prob_diff": float(np.mean(np.abs(p_test - f_test))),
            "reference": "float teacher", "split": "test",
        },
        "teacher_metrics": {"test": fp32_test, "val": ctx.teacher_val},
        "gate": {"split": "val", "max_f1_drop": ctx.cfg.max_f1_drop,
                 "teacher_f1": ctx.teacher_val["f1"], "artifact_f1": val_m["f1"],
                 "passed": bool(gate_ok)},
        "export": {"quantization": info},
        "provenance": {"teacher": portable_path(str(Path(ctx.cfg.teacher).resolve()),
                                                folder, ctx.cfg.data_dir),
                       "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "probe": {"windows": ctx.val_windows[:4].tolist(),
                  "expected": p_val[:4].tolist(), "atol": 1e-3},
    }
    write_manifest(folder, fields, ["model.pt2", "encoder.json", "thresholds.json"])
    manifest = json.loads((folder / "manifest.json").read_text())
    digest = manifest["sha256"]["model.pt2"][:12]
    manifest["model_version"] = f"torch-int8-teacher-{digest}"
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("torch-int8: val F1 %.4f (fp32 %.4f)", val_m["f1"],
                info["float_val_f1"])
    return folder
