"""``torch-int8``: the teacher quantized by Intel Neural Compressor, for the re-scorer.

Intel Neural Compressor 3.10 without IPEX quantizes through PyTorch 2 export (PT2E)
with the X86 inductor quantizer: static post-training quantization of the
convolutions and dense layers (the LSTM stays float). Its accuracy-driven
``autotune`` tries INC's own int8 tuning space until the validation F1 loses at most
``max_f1_drop`` (INC's loss is relative: ``(base - q) / base``). The result is
measured against the float teacher on the test split (F1, decision agreement,
|Δprob|, latency on one thread) and saved as a ``torch.export`` program
(``model.pt2``, dynamic batch axis: any batch from 1 to 65536) with a manifest.
It is not an edge target: the gateway never runs torch; ``compress eval`` scores it
with torch through :class:`Int8Teacher`, as the re-scorer does. Load the program
with :func:`load_program`: it calls the
``quantized_decomposed`` ops, which ``torch.export.load`` cannot resolve until
torchao (or ``torch.ao.quantization``) has registered them in the process.

The re-scorer serves such an artifact (``teacher serve --checkpoint ARTIFACT``):
:func:`load_int8_teacher` checks the folder against its manifest and gives an
:class:`Int8Teacher`, which has the interface ``teacher serve`` uses of a teacher
checkpoint. It lives here, beside :func:`torch_int8_artifact`, so that the code
that writes the folder and the code that reads it back change together.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress import logger
from compress.artifact import portable_path, write_manifest, write_thresholds
from flows.errors import BadInputError, ExportError, ModelError, one_line

__all__ = [
    "Int8Teacher",
    "load_int8_teacher",
    "load_program",
    "quantize_teacher",
    "save_program",
    "torch_int8_artifact",
]


MAX_BATCH = 1 << 16
TARGET = "torch-int8"


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


@contextlib.contextmanager
def _torch_quiet(*names: str) -> Iterator[None]:
    """Only errors of the loggers ``names`` reach the terminal, unless ``-v``.

    torchao's first import warns about GPU kernels a CPU host lacks (three lines,
    and a deprecation from torch's pytree); ``torch.export.load`` logs the
    traceback of its first try at a file that is no program before it raises.
    Our own error line says what matters, so a re-scorer starts without them.
    """
    if logger.isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [logging.getLogger(n) for n in names]
    saved = [one.level for one in loggers]
    for one in loggers:
        one.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for one, level in zip(loggers, saved, strict=True):
            one.setLevel(level)


def quantize_teacher(
    net: torch.nn.Module,
    calibration: np.ndarray,
    val_windows: np.ndarray,
    y_val: np.ndarray,
    max_f1_drop: float,
) -> tuple[Any, dict[str, Any]]:
    """INC PT2E static int8 of ``net``; autotune against validation F1 when it works."""
    with _inc_quiet():  # INC's first load sets its log level (used by _tune too)
        import neural_compressor.torch.quantization  # noqa: F401
        from neural_compressor.torch.export import export

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

    with _pytree_quiet():
        return _tune(net, exported, example, dims, calibration, val_f1, max_f1_drop)


@contextlib.contextmanager
def _pytree_quiet() -> Iterator[None]:
    """INC deep-copies the exported graph for every trial, and torch's pytree warns
    on each copy (a FutureWarning on stderr) that a check inside torch itself is
    deprecated: nothing a user can act on, so it is dropped here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)`",
                                category=FutureWarning)
        yield


def _tune(net: torch.nn.Module, exported: Any, example: tuple, dims: Any,
          calibration: np.ndarray, val_f1: Any, max_f1_drop: float,
          ) -> tuple[Any, dict[str, Any]]:
    """:func:`quantize_teacher`'s tuning of the exported graph."""
    from neural_compressor.torch.export import export
    from neural_compressor.torch.quantization import (
        TuningConfig,
        autotune,
        convert,
        get_default_static_config,
        prepare,
    )

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
    except OSError:
        raise  # the file could not be written (a full disk): not the model's fault
    except Exception as exc:
        raise ExportError(f"torch-int8: saving the quantized teacher failed: {exc}") \
            from exc
    return path


def load_program(path: Path) -> Any:
    """The saved int8 program as a callable module (any batch size).

    Registers the ``quantized_decomposed`` quantize/dequantize ops first (importing
    torchao's PT2E package does); without them loading fails in a fresh process.
    """
    try:
        with _torch_quiet("torchao", "torch.utils._pytree"):
            import torchao.quantization.pt2e  # noqa: F401  (registers the ops)
    except ImportError as exc:
        raise ModelError(
            f"{path}: a torch-int8 program needs torchao to load ({exc}); install "
            "gatewatch[compress]"
        ) from exc
    try:
        with _torch_quiet("torch.export"):
            return torch.export.load(str(path)).module()
    except Exception as exc:
        raise ExportError(
            f"{path}: cannot load the torch-int8 program: {one_line(exc)}"
        ) from exc


def torch_int8_artifact(ctx: Any, folder: Path, dest: Path | None = None) -> Path:
    """Quantize the teacher with INC, measure it against fp32, write the folder.

    ``dest`` is where the folder will be moved once written (``compress run``
    stages it first); the provenance's paths are relative to it (default:
    ``folder``)."""
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
    from compress.pipeline import split_seed

    lo, hi = escalation_band(y_val, p_val, decision)
    write_thresholds(folder, decision, lo, hi)
    W, F = ctx.prep.window, ctx.prep.n_features
    gate_ok = val_m["f1"] >= ctx.teacher_val["f1"] - ctx.cfg.max_f1_drop
    fields = {
        "target": TARGET,
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
                                                dest or folder, ctx.cfg.data_dir),
                       "data": {"split_seed": split_seed(ctx.teacher.provenance
                                                         or {})},
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


class Int8Teacher:
    """A torch-int8 artifact loaded for the re-scorer (:func:`load_int8_teacher`).

    It offers what ``teacher serve`` uses of a loaded teacher checkpoint:
    ``config`` (``window`` and ``n_features``), ``threshold`` (the artifact's
    decision threshold, from thresholds.json), ``version``, ``device`` and
    :meth:`predict_proba`, which runs the int8 program on the CPU. ``version``
    names the artifact: ``torch-int8:sha256:`` and the first 16 hex digits of the
    sha256 of its manifest.json, which holds the sha256 of every other file, so
    another model, encoder or threshold is another version.
    """

    batch_size = 4096  # windows per call of the program

    def __init__(
        self,
        program: Any,
        *,
        folder: Path,
        manifest: dict[str, Any],
        encoder: Any,
        thresholds: dict[str, float],
        version: str,
    ) -> None:
        self.program = program
        self.path = folder
        self.manifest = manifest
        self.encoder = encoder
        self.thresholds = thresholds
        self.threshold = float(thresholds["decision"])
        self.version = version
        self.config = {"window": int(encoder.window),
                       "n_features": int(encoder.n_features)}
        self.device = torch.device("cpu")

    def predict_proba(self, windows: Any) -> np.ndarray:
        """Probability of anomaly ``float32 [B]`` for windows ``[B, W, F]`` (higher
        means more anomalous): the sigmoid of the program's logit, computed as
        ``compress run`` measured it."""
        arr = np.ascontiguousarray(windows, dtype=np.float32)
        want = (self.config["window"], self.config["n_features"])
        if arr.ndim != 3 or tuple(arr.shape[1:]) != want:
            raise BadInputError(
                f"windows must have shape [B, {want[0]}, {want[1]}], "
                f"got {list(arr.shape)}"
            )

        if len(arr) == 0:
            return np.zeros(0, dtype=np.float32)
        return _probs(self.program, arr, self.batch_size)

    # What ``compress eval`` asks of an artifact's scorer (edge_agent.runtime).
    target = "torch-int8"

    def score(self, windows: Any) -> np.ndarray:
        """:meth:`predict_proba`, by the name edge scorers give it."""
        return self.predict_proba(windows)

    @property
    def model_version(self) -> str:
        """The artifact's manifest ``model_version``, as edge scorers report it."""
        return str(self.manifest.get("model_version") or self.version)


def load_int8_teacher(folder: str | os.PathLike[str]) -> Int8Teacher:
    """A torch-int8 artifact folder, checked against its manifest, to serve.

    Refused with ModelError (exit 1), naming the file: a manifest that cannot be
    read or is of another target; a file missing, or whose sha256 differs from the
    manifest's; thresholds that are not ordered scores in 0..1; an encoder whose
    windows are not the program's input; a program that cannot be loaded, or that
    no longer scores the manifest's probe windows as ``compress run`` measured.
    """
    from edge_agent.runtime import verify_files

    path = Path(folder)
    manifest_path = path / "manifest.json"
    raw = _read_bytes(manifest_path)
    manifest = _int8_manifest(raw, manifest_path)

    # Every file as compress wrote it, then what each one holds.
    verify_files(path, manifest)
    thresholds = _artifact_thresholds(path / "thresholds.json")
    encoder = _fitting_encoder(path / "encoder.json", manifest, manifest_path)
    program = load_program(path / str(manifest["model_file"]))

    version = "torch-int8:sha256:" + hashlib.sha256(raw).hexdigest()[:16]
    teacher = Int8Teacher(program, folder=path, manifest=manifest, encoder=encoder,
                          thresholds=thresholds, version=version)
    _check_probe(teacher, path / str(manifest["model_file"]), manifest_path)
    logger.info("loaded torch-int8 teacher %s from %s (W=%d, F=%d, threshold %.4f)",
                version, path, teacher.config["window"],
                teacher.config["n_features"], teacher.threshold)
    return teacher


def _read_bytes(path: Path) -> bytes:
    """The bytes of one file of the artifact; ModelError naming it if unreadable."""
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ModelError(f"{path}: no such file; a torch-int8 artifact folder "
                         "holds manifest.json, model.pt2, encoder.json and "
                         "thresholds.json") from exc
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _int8_manifest(raw: bytes, path: Path) -> dict[str, Any]:
    """The parsed manifest, if it is a torch-int8 one with an input [None, W, F]."""
    expected = (f"expected the JSON object compress run --target {TARGET} writes "
                "(target, model_file, input, sha256)")
    try:
        manifest = json.loads(raw)
    except (RecursionError, ValueError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc}); {expected}") from exc
    if not isinstance(manifest, dict):
        raise ModelError(f"{path}: a JSON {type(manifest).__name__}; {expected}")
    missing = [k for k in ("target", "model_file", "input", "sha256")
               if k not in manifest]
    if missing:
        raise ModelError(f"{path}: lacks {', '.join(missing)}; {expected}")

    target = manifest["target"]
    if target != TARGET:
        raise ModelError(
            f"{path}: target {str(target)[:40]!r}, not {TARGET!r}: teacher serve "
            f"takes a teacher checkpoint or a {TARGET} artifact (an edge artifact "
            "is for edge-agent run)")

    shape = manifest["input"].get("shape") if isinstance(manifest["input"], dict) \
        else None
    sizes = shape[1:] if isinstance(shape, list) and len(shape) == 3 else []
    if not sizes or not all(type(n) is int and n >= 1 for n in sizes):
        raise ModelError(f"{path}: input shape {str(shape)[:40]} is not "
                         "[null, W, F] with W and F whole numbers >= 1")
    return manifest


def _artifact_thresholds(path: Path) -> dict[str, float]:
    """decision, escalate_low and alert of thresholds.json, checked as the agent
    checks them; ModelError naming the file otherwise."""
    from edge_agent.agent import read_thresholds_file

    try:
        return read_thresholds_file(path)
    except BadInputError as exc:
        raise ModelError(str(exc)) from exc


def _fitting_encoder(path: Path, manifest: dict[str, Any], manifest_path: Path) -> Any:
    """The artifact's encoder, if its windows are the program's input."""
    from teacher.checkpoint import load_encoder

    try:
        text = _read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelError(f"{path}: not UTF-8 text ({exc})") from exc
    encoder = load_encoder(text, source=str(path))

    made = (int(encoder.window), int(encoder.n_features))
    taken = tuple(manifest["input"]["shape"][1:])
    if made != taken:
        raise ModelError(
            f"{path} does not fit {manifest_path.name}: the encoder makes windows "
            f"of {made[0]} x {made[1]} features (window x n_features), the int8 "
            f"model takes {taken[0]} x {taken[1]}; the artifact is damaged or its "
            "files come from different artifacts")
    return encoder


def _check_probe(teacher: Int8Teacher, model_path: Path, manifest_path: Path) -> None:
    """ModelError unless the program scores the manifest's probe windows (one
    plain window when it has none) as compress measured, within its ``atol``."""
    probe = teacher.manifest.get("probe")
    window, features = teacher.config["window"], teacher.config["n_features"]
    try:
        windows = np.asarray(probe["windows"], dtype=np.float32)
        expected = np.asarray(probe["expected"], dtype=np.float64).reshape(-1)
        atol = float(probe.get("atol", 1e-3))
        if windows.shape != (len(expected), window, features) or not len(expected):
            raise ValueError(f"{len(expected)} scores for windows of shape "
                             f"{list(windows.shape)}")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if probe is not None:
            raise ModelError(f"{manifest_path}: its probe is malformed ({exc}); "
                             "expected windows [N, W, F] and N expected scores") \
                from exc
        windows, expected, atol = np.zeros((1, window, features), np.float32), None, 0

    try:
        got = teacher.predict_proba(windows).astype(np.float64)
    except Exception as exc:  # the program's own errors, whatever their type
        raise ModelError(f"{model_path}: the int8 program cannot score windows of "
                         f"{window} x {features}: {one_line(exc)}") from exc
    if expected is not None and not np.all(np.abs(got - expected) <= atol):
        raise ModelError(
            f"{model_path} scores the probe windows of {manifest_path.name} as "
            f"{np.round(got, 6).tolist()}, not {np.round(expected, 6).tolist()} "
            f"(within {atol:g}) as compress measured; the artifact is damaged")
