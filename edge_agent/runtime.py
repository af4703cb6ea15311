"""Load a compressed artifact and score windows with it, on the gateway.

An artifact is a folder written by ``compress run``: a model file (``model.onnx``,
``model.tflite`` or the ``model.cc`` C array of a TFLite Micro build), ``encoder.json``,
``thresholds.json`` and ``manifest.json``. :func:`load_artifact` checks the sha256 of
every file against the manifest before it loads anything, checks that the model's input
and output are the ones the manifest declares and that the encoder makes the windows
the model takes, and returns a :class:`Scorer` whose ``score`` maps
float32 windows ``[B, W, F]`` to float32 probabilities ``[B]`` (higher means more
anomalous).

Layering: numpy and one inference runtime only (onnxruntime, or the LiteRT interpreter
from ``ai-edge-litert``; the ``tflite-micro`` interpreter for C-array builds when it is
installed). Runtimes are imported when a model needs them. Never torch or tensorflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent import logger
from edge_agent.protocol import MAX_MODEL_VERSION, text_problem
from flows.errors import BadInputError, ModelError, json_problem

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
MAX_PROBE_ATOL = 0.05  # the most a manifest may allow its probe scores to differ

_ONNX_TARGETS = {"onnx-fp32", "onnx-int8"}
_TFLITE_TARGETS = {"tflite-fp32", "tflite-int8"}
_MICRO_TARGETS = {"tflite-micro"}

_NP_DTYPES = {"float32": np.float32, "int8": np.int8, "uint8": np.uint8}

# The ONNX versions gatewatch loads: what its exporter and onnxruntime's quantizer
# write (IR 8, ai.onnx opset 17), with room on both sides for files made by other
# tools that onnxruntime 1.32 runs. Anything else is refused by name before loading.
ONNX_IR_VERSIONS = range(7, 11)
ONNX_OPSETS = range(13, 22)
_ONNX_DTYPES = {
    "tensor(float)": "float32", "tensor(int8)": "int8", "tensor(uint8)": "uint8"
}


@dataclass(frozen=True)
class TensorSpec:
    """What a model takes or gives: shape (None = any batch), dtype, int8 params."""

    shape: tuple[int | None, ...]
    dtype: str
    scale: float | None = None
    zero_point: int | None = None

    @classmethod
    def from_manifest(cls, entry: dict[str, Any], what: str) -> TensorSpec:
        """Read one ``input``/``output`` entry of a manifest."""
        if not isinstance(entry, dict):
            raise ModelError(f"manifest {what} entry is not an object: {entry!r}")
        try:
            shape = tuple(None if d is None else int(d) for d in entry.get("shape", []))
            dtype = str(entry["dtype"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"manifest {what} entry is malformed: {entry!r}") from exc
        if dtype not in _NP_DTYPES:
            raise ModelError(f"manifest {what} dtype {dtype!r} is not supported")
        scale = entry.get("scale")
        zero_point = entry.get("zero_point")
        return cls(
            shape=shape,
            dtype=dtype,
            scale=None if scale is None else float(scale),
            zero_point=None if zero_point is None else int(zero_point),
        )


def model_version_problem(value: Any) -> str | None:
    """Why a manifest's ``model_version`` cannot name the model on the wire, or None.

    The name goes into every escalation and status message, and the re-scorer
    rejects an escalation whose ``model_version`` :func:`edge_agent.protocol.
    text_problem` finds fault with (a control character, a lone surrogate, a
    bidirectional control): an agent running such an artifact would have every
    escalation refused. The manifest is not in its own sha256 list, so anyone
    can edit the name; it is checked wherever a manifest is read. It must be a
    string of at most :data:`MAX_MODEL_VERSION` characters.
    """
    if not isinstance(value, str):
        return f"is a JSON {_json_type(value)}, not a string"
    if len(value) > MAX_MODEL_VERSION:
        return f"is {len(value)} characters long, more than {MAX_MODEL_VERSION}"
    return text_problem(value)


def check_model_version(manifest: dict[str, Any], path: Path | str) -> None:
    """BadInputError (exit 3) naming ``path`` unless the manifest's ``model_version``
    (when it has one) passes :func:`model_version_problem`."""
    value = manifest.get("model_version", "")
    problem = model_version_problem(value)
    if problem is not None:
        raise BadInputError(
            f"manifest field 'model_version' {str(value)[:60]!r} {problem}; expected "
            f"printable text of at most {MAX_MODEL_VERSION} characters (the "
            "re-scorer refuses escalations that carry anything else)",
            path=str(path),
        )


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (object, array, number, ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {dict: "object", list: "array"}.get(type(value), type(value).__name__)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def c_array_bytes(text: str) -> bytes:
    """The model bytes held in the C array of a ``model.cc`` written by compress."""
    start = text.find("{")
    end = text.find("}", start)
    if start < 0 or end < 0:
        raise ModelError("model.cc holds no C array initializer { ... }")
    values = re.findall(r"0x([0-9a-fA-F]{1,2})", text[start:end])
    if not values:
        raise ModelError("model.cc holds an empty C array")
    return bytes(int(v, 16) for v in values)


class Scorer:
    """A loaded artifact: scores windows in the artifact's own runtime.

    Attributes: ``manifest`` (dict), ``model_version``, ``target``, ``thresholds``
    (``decision``, ``escalate_low``, ``alert``), ``input_spec`` and ``output_spec``
    (:class:`TensorSpec`), ``encoder`` (the artifact's fitted feature encoder, loaded on
    first use).
    """

    def __init__(self, folder: Path, manifest: dict[str, Any], backend: _Backend):
        self.folder = folder
        self.manifest = manifest
        self.target = str(manifest["target"])
        self.model_version = str(manifest.get("model_version", ""))
        self.input_spec = TensorSpec.from_manifest(manifest["input"], "input")
        self.output_spec = TensorSpec.from_manifest(manifest["output"], "output")
        self.output_kind = str(manifest["output"].get("kind", "probability"))
        self.thresholds = _read_thresholds(folder / "thresholds.json")
        self._backend = backend
        self._encoder = None
        # An 8-bit output has 256 levels: their scores, computed once by the same
        # float32 steps as any other output (see _probabilities), are looked up.
        self._levels: np.ndarray | None = None
        if self.output_spec.dtype in ("int8", "uint8"):
            dtype = _NP_DTYPES[self.output_spec.dtype]
            info = np.iinfo(dtype)
            self._level_min = int(info.min)
            self._levels = self._probabilities(
                np.arange(info.min, info.max + 1, dtype=dtype)
            )

    @property
    def window(self) -> int:
        """Window length W the model takes."""
        return int(self.input_spec.shape[1])

    @property
    def n_features(self) -> int:
        """Feature count F the model takes."""
        return int(self.input_spec.shape[2])

    @property
    def encoder(self):
        """The artifact's ``flows.encoder.Encoder`` (from ``encoder.json``)."""
        if self._encoder is None:
            try:
                from flows.encoder import Encoder
            except ImportError as exc:
                raise ModelError("flows.encoder is not available to load") from exc
            self._encoder = Encoder.load(self.folder / "encoder.json")
        return self._encoder

    def score(self, windows: np.ndarray) -> np.ndarray:
        """Probabilities of anomaly, float32 ``[B]``, for windows ``[B, W, F]``."""
        x = self._check_windows(windows)
        if x.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)

        # Quantize the input when the model takes int8.
        spec = self.input_spec
        if spec.dtype != "float32":
            x = _quantize(x, spec)

        out = self._backend.run(x).reshape(x.shape[0], -1)[:, 0]
        if self._levels is not None:
            return self._levels[out.astype(np.intp) - self._level_min]
        return self._probabilities(out)

    def _probabilities(self, out: np.ndarray) -> np.ndarray:
        """The model's raw outputs as float32 probabilities: an integer output
        dequantized, a logit mapped through the sigmoid."""
        ospec = self.output_spec
        if ospec.dtype != "float32":
            out = (out.astype(np.float32) - np.float32(ospec.zero_point or 0)) * (
                np.float32(ospec.scale or 1.0)
            )
        out = out.astype(np.float32)
        if self.output_kind == "logit":
            out = (1.0 / (1.0 + np.exp(-out))).astype(np.float32)
        return out

    def check_probe(self, atol: float | None = None) -> float:
        """Score the manifest's probe windows; ModelError if off by more than ``atol``.

        Returns the largest absolute difference from the expected scores. The default
        tolerance is the manifest's ``probe.atol`` (else 1e-4).
        """
        probe = self.manifest.get("probe") or {}
        windows = np.asarray(probe.get("windows", []), dtype=np.float32)
        expected = np.asarray(probe.get("expected", []), dtype=np.float32)
        if windows.size == 0:
            raise ModelError(f"{self.folder}: manifest has no probe windows")
        want = [self.window, self.n_features]
        if windows.ndim != 3 or list(windows.shape[1:]) != want:
            raise ModelError(
                f"{self.folder}: the probe's windows have shape "
                f"{list(windows.shape)}; expected [n, {want[0]}, {want[1]}], the "
                "model input's window x features")
        if expected.shape != (len(windows),):
            raise ModelError(
                f"{self.folder}: the probe's expected scores have shape "
                f"{list(expected.shape)}; expected [{len(windows)}], one score per "
                f"probe window (its windows are {list(windows.shape)})")
        if not np.all(np.isfinite(expected)):
            raise ModelError(f"{self.folder}: the probe's expected scores are not all "
                             "finite numbers")
        tol = float(atol if atol is not None else probe.get("atol", 1e-4))
        if atol is None and not (math.isfinite(tol) and 0 < tol <= MAX_PROBE_ATOL):
            # The manifest is not in its own sha256 list: a tolerance edited to NaN
            # or 10 would let any edit of the output scale through.
            raise ModelError(
                f"{self.folder}: the probe's atol is {tol!r}; expected a number in "
                f"(0, {MAX_PROBE_ATOL}] (compress writes 1e-4, or 1/256 for int8)"
            )
        got = self.score(windows)
        diff = float(np.max(np.abs(got - expected)))
        if diff > tol:
            raise ModelError(
                f"{self.folder}: probe scores differ from the manifest by {diff:.3g} "
                f"(tolerance {tol:g}); the model or runtime does not behave as built"
            )
        return diff

    def _check_windows(self, windows: np.ndarray) -> np.ndarray:
        x = np.asarray(windows)
        want = (self.window, self.n_features)
        if x.ndim != 3 or tuple(x.shape[1:]) != want:
            raise BadInputError(
                f"windows for {self.target} model: expected shape [B, {want[0]}, "
                f"{want[1]}] float32, received {list(x.shape)} {x.dtype}"
            )
        if not np.issubdtype(x.dtype, np.number):
            raise BadInputError(f"windows must be numeric, received dtype {x.dtype}")
        return np.ascontiguousarray(x, dtype=np.float32)


def _quantize(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Float windows as an integer input tensor: ``x / scale`` in float32, rounded
    half to even (``np.round``; TFLite's own quantize op rounds halves away from
    zero), plus the zero point, clipped to the type. compress verifies and writes
    the probe with this same rounding; a reimplementation must round alike to
    reproduce every decision (float64 or halves away from zero moved 2 of 22,544
    KDDTest+ decisions of an NSL-KDD mlp-64 tflite-int8 student)."""
    dtype = _NP_DTYPES[spec.dtype]
    low, high = _INT_RANGES[dtype]
    q = np.rint(x / np.float32(spec.scale or 1.0))  # what np.round does at 0 digits
    q += np.float32(spec.zero_point or 0)
    # minimum/maximum in place: np.clip costs more than the model on one window.
    np.minimum(q, high, out=q)
    np.maximum(q, low, out=q)
    return q.astype(dtype)


_INT_RANGES = {
    t: (np.float32(np.iinfo(t).min), np.float32(np.iinfo(t).max))
    for t in (np.int8, np.uint8)
}


# The most a threshold may be: one ulp above 1, as compress writes ``alert`` just
# past a top score of 1.0 to mean "never alert" (as ``edge_agent.agent`` allows).
_MAX_THRESHOLD = float(np.nextafter(1.0, np.inf))
_THRESHOLD_KEYS = ("escalate_low", "decision", "alert")
_THRESHOLDS_EXPECTED = (
    'expected a JSON object with numbers "escalate_low" <= "decision" <= "alert", '
    "each in 0..1"
)


def _read_thresholds(path: Path) -> dict[str, float]:
    """``decision``, ``escalate_low`` and ``alert`` of an artifact's thresholds.json.

    The file was already checked against the manifest's sha256, so what is wrong
    here was written wrong (or edited and its sha256 updated to match). Content
    that breaks the contract of docs/contracts.md (not JSON, not an object, a key
    missing, a value that is no finite number in 0..1, ``escalate_low <= decision
    <= alert`` not holding) is a BadInputError (exit 3, as a manifest that is not
    JSON) naming the file and the key; a file that cannot be read at all is a
    ModelError (exit 1, as a missing one).
    """
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ModelError(
            f"{path}: cannot be read ({exc.strerror or exc})"
        ) from exc
    try:
        data = json.loads(text)
    except (RecursionError, ValueError) as exc:  # also UnicodeDecodeError
        raise BadInputError(
            f"is not valid JSON ({json_problem(exc)}); {_THRESHOLDS_EXPECTED}",
            path=str(path),
        ) from exc
    if not isinstance(data, dict):
        raise BadInputError(
            f"holds a JSON {_json_type(data)}; {_THRESHOLDS_EXPECTED}", path=str(path)
        )
    out: dict[str, float] = {}
    for key in _THRESHOLD_KEYS:
        if key not in data:
            raise BadInputError(
                f"lacks {key!r}; {_THRESHOLDS_EXPECTED}", path=str(path)
            )
        value = data[key]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        # An int is compared exactly: math.isfinite(10**400) would overflow.
        if not (
            number
            and (isinstance(value, int) or math.isfinite(value))
            and 0.0 <= value <= _MAX_THRESHOLD
        ):
            what = str(value) if number else json.dumps(value)
            what = what if len(what) <= 40 else what[:37] + "..."
            if not number and value is not None:
                kind = "string" if isinstance(value, str) else _json_type(value)
                what += f" (a JSON {kind})"
            raise BadInputError(
                f"{key!r} is {what}, not a number in 0..1; {_THRESHOLDS_EXPECTED}",
                path=str(path),
            )
        out[key] = float(value)
    if not out["escalate_low"] <= out["decision"] <= out["alert"]:
        shown = ", ".join(f"{k} {out[k]!r}" for k in _THRESHOLD_KEYS)
        raise BadInputError(
            f"{shown}: out of order; {_THRESHOLDS_EXPECTED}", path=str(path)
        )
    return {k: out[k] for k in ("decision", "escalate_low", "alert")}


# ---------------------------------------------------------------------------- backends


class _Backend:
    """One inference runtime holding one model; ``run`` takes model-dtype input."""

    name = "?"
    input_shape: tuple[Any, ...] = ()
    input_dtype = "float32"
    # The model's own output: dtype and, for an integer output, (scale, zero point);
    # None where the runtime does not say.
    output_dtype: str | None = None
    out_quant: tuple[float, int] | None = None

    def run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class _OnnxBackend(_Backend):
    name = "onnxruntime"

    def __init__(self, path: Path, threads: int = 1) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelError(
                "onnxruntime is not installed; install gatewatch[edge]"
            ) from exc
        check_onnx_versions(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelError(
                f"{path}: onnxruntime cannot load the model: {exc}"
            ) from exc
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = tuple(d if isinstance(d, int) else None for d in inp.shape)
        self.input_dtype = _ONNX_DTYPES.get(inp.type, inp.type)
        out = self.session.get_outputs()[0]
        self.output_dtype = _ONNX_DTYPES.get(out.type, out.type)
        if self.output_dtype != "float32":
            self.out_quant = onnx_output_quantization(Path(path).read_bytes())

    def run(self, x: np.ndarray) -> np.ndarray:
        try:
            return np.asarray(self.session.run(None, {self.input_name: x})[0])
        except Exception as exc:
            raise ModelError(f"onnxruntime failed to run the model: {exc}") from exc


def onnx_versions(data: bytes) -> tuple[int | None, dict[str, int]]:
    """Read an ONNX file's IR version and opset imports without the onnx package.

    Walks the top-level fields of the ``ModelProto`` message (field 1: ``ir_version``,
    field 8: ``opset_import`` with domain and version); every other field is skipped
    by its wire type. Raises :class:`ModelError` when the bytes are not a protobuf.
    """
    ir_version = None
    opsets: dict[str, int] = {}
    for number, wire, value in _proto_fields(data):
        if number == 1 and wire == 0:
            ir_version = value
        elif number == 8 and wire == 2:
            domain, version = "", 1
            for inner, inner_wire, inner_value in _proto_fields(value):
                if inner == 1 and inner_wire == 2:
                    domain = inner_value.decode("utf-8", "replace")
                elif inner == 2 and inner_wire == 0:
                    version = inner_value
            opsets[domain] = version
    return ir_version, opsets


def check_onnx_versions(path: Path) -> None:
    """Refuse, by name, an ONNX file of an IR or ai.onnx opset gatewatch won't load."""
    ir_version, opsets = onnx_versions(Path(path).read_bytes())
    if ir_version not in ONNX_IR_VERSIONS:
        raise ModelError(
            f"{path}: ONNX IR version {ir_version} is not supported (gatewatch "
            f"loads IR {ONNX_IR_VERSIONS.start}-{ONNX_IR_VERSIONS.stop - 1})"
        )
    opset = opsets.get("", opsets.get("ai.onnx"))
    if opset not in ONNX_OPSETS:
        raise ModelError(
            f"{path}: ONNX opset {opset} of domain ai.onnx is not supported (gatewatch "
            f"loads opsets {ONNX_OPSETS.start}-{ONNX_OPSETS.stop - 1})"
        )


def onnx_output_quantization(data: bytes) -> tuple[float, int] | None:
    """The (scale, zero point) of an ONNX model's first output, when a
    ``QuantizeLinear`` whose scale and zero point are initializers makes it.

    Read with the protobuf walk of :func:`onnx_versions` (graph: field 7; in it
    nodes 1, initializers 5, outputs 12). None when the output is made some
    other way: there is then nothing to compare the manifest with.
    """
    graph = next((v for n, w, v in _proto_fields(data) if n == 7 and w == 2), b"")
    nodes, inits, output = [], {}, None
    for number, wire, value in _proto_fields(graph):
        if wire != 2:
            continue
        if number == 1:
            nodes.append(value)
        elif number == 5:
            name, tensor = _onnx_tensor(value)
            inits[name] = tensor
        elif number == 12 and output is None:
            output = _proto_string(value, 1)
    for node in nodes:
        fields = [(n, v) for n, w, v in _proto_fields(node) if w == 2]
        outs = [v.decode("utf-8", "replace") for n, v in fields if n == 2]
        if output not in outs:
            continue
        ins = [v.decode("utf-8", "replace") for n, v in fields if n == 1]
        op = next((v for n, v in fields if n == 4), b"").decode("utf-8", "replace")
        if op != "QuantizeLinear" or len(ins) < 3:
            return None
        scale, zero_point = inits.get(ins[1]), inits.get(ins[2])
        if scale is None or zero_point is None or not (scale.size == zero_point.size
                                                       == 1):
            return None
        return float(scale.ravel()[0]), int(zero_point.ravel()[0])
    return None


# ONNX TensorProto data types read by _onnx_tensor: FLOAT, UINT8, INT8, INT32.
_ONNX_TENSOR_TYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 6: np.int32}


def _onnx_tensor(data: bytes) -> tuple[str, np.ndarray | None]:
    """Name and values of a small ONNX TensorProto (None: a type not read here)."""
    name, dtype, raw, floats, ints = "", 0, None, [], []
    for number, wire, value in _proto_fields(data):
        if number == 8 and wire == 2:
            name = value.decode("utf-8", "replace")
        elif number == 2 and wire == 0:
            dtype = value
        elif number == 9 and wire == 2:
            raw = value
        elif number == 4:  # float_data: packed, or one fixed32 a field
            floats.append(np.frombuffer(value, "<f4"))
        elif number == 5:  # int32_data (int8/uint8 too): packed varints, or one
            if wire == 0:
                ints.append(value)
            else:
                pos = 0
                while pos < len(value):
                    item, pos = _varint(value, pos)
                    ints.append(item)
    np_type = _ONNX_TENSOR_TYPES.get(dtype)
    if np_type is None:
        return name, None
    if raw is not None:
        return name, np.frombuffer(raw, np.dtype(np_type).newbyteorder("<"))
    if np_type is np.float32:
        return name, np.concatenate(floats) if floats else np.zeros(0, np.float32)
    # A negative int32 is written as a 64-bit two's complement varint.
    signed = [v - (1 << 64) if v >= 1 << 63 else v for v in ints]
    return name, np.asarray(signed, dtype=np.int64)


def _proto_string(data: bytes, field: int) -> str | None:
    """The first length-delimited field ``field`` of a message, as text."""
    for number, wire, value in _proto_fields(data):
        if number == field and wire == 2:
            return value.decode("utf-8", "replace")
    return None


def _proto_fields(data: bytes):
    """Yield ``(field number, wire type, value)`` of one protobuf message's fields."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ModelError(f"not an ONNX file: protobuf wire type {wire} at {pos}")
        if pos > end:
            raise ModelError("not an ONNX file: a protobuf field runs past the end")
        yield number, wire, value


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ModelError("not an ONNX file: a protobuf varint is cut or too long")
        byte = data[pos]
        result |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return result, pos
        shift += 7


# LiteRT's C++ runtime writes this INFO line to the process's stderr each time it
# applies its default XNNPACK delegate (in allocate_tensors); no Python setting
# turns it off short of turning the delegate off, which makes scoring slower.
_DELEGATE_BANNER = b"Created TensorFlow Lite XNNPACK delegate"
_STDERR_HELD = threading.Lock()


@contextlib.contextmanager
def _without_delegate_banner() -> Iterator[None]:
    """Run the block with the process's stderr (file descriptor 2) sent to a
    temporary file, then write back to stderr everything that came but LiteRT's
    XNNPACK line: other messages (ours from other threads too) are delayed for the
    block's few milliseconds, not lost. Where stderr cannot be redirected (no
    descriptor 2), the block just runs."""
    with _STDERR_HELD:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):
            yield
            return
        try:
            with tempfile.TemporaryFile() as held:
                os.dup2(held.fileno(), 2)
                try:
                    yield
                finally:
                    with contextlib.suppress(OSError, ValueError):
                        sys.stderr.flush()
                    os.dup2(saved, 2)
                    held.seek(0)
                    kept = b"".join(line for line in held.read().splitlines(True)
                                    if _DELEGATE_BANNER not in line)
                    if kept:
                        os.write(2, kept)
        finally:
            os.close(saved)


def _litert_interpreter(content: bytes, threads: int = 1):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError as exc:
            raise ModelError(
                "no TFLite interpreter: install ai-edge-litert (gatewatch[edge])"
            ) from exc
    try:
        return Interpreter(model_content=content, num_threads=threads)
    except Exception as exc:
        raise ModelError(
            f"the TFLite interpreter cannot load the model: {exc}"
        ) from exc


class _TfliteBackend(_Backend):
    """LiteRT interpreter; a static batch of 1 is resized, or looped over."""

    name = "ai-edge-litert"

    def __init__(self, content: bytes, threads: int = 1) -> None:
        self.interp = _litert_interpreter(content, threads)
        try:
            with _without_delegate_banner():
                self.interp.allocate_tensors()
        except Exception as exc:
            raise ModelError(f"the TFLite interpreter cannot allocate: {exc}") from exc
        self.inp = self.interp.get_input_details()[0]
        self.out = self.interp.get_output_details()[0]
        sig = self.inp.get("shape_signature", self.inp["shape"])
        self.input_shape = tuple(None if int(d) < 0 else int(d) for d in sig)
        self.input_dtype = np.dtype(self.inp["dtype"]).name
        self.quant = self.inp.get("quantization", (0.0, 0))
        self.output_dtype = np.dtype(self.out["dtype"]).name
        scale, zero_point = self.out.get("quantization", (0.0, 0))
        self.out_quant = (float(scale), int(zero_point)) if scale else None
        self._batch = int(self.inp["shape"][0])
        self._resizable = True

    def _invoke(self, x: np.ndarray) -> np.ndarray:
        self.interp.set_tensor(self.inp["index"], x)
        self.interp.invoke()
        return np.array(self.interp.get_tensor(self.out["index"]))

    def _resize(self, batch: int) -> bool:
        if batch == self._batch:
            return True
        if not self._resizable:
            return False
        shape = [batch, *[int(d) for d in self.inp["shape"][1:]]]
        try:
            self.interp.resize_tensor_input(self.inp["index"], shape, strict=False)
            with _without_delegate_banner():
                self.interp.allocate_tensors()
        except Exception:
            # Graphs with a batch-1 reshape baked in cannot be resized: loop instead.
            self._resizable = False
            self.interp.resize_tensor_input(
                self.inp["index"], [self._batch, *shape[1:]], strict=False
            )
            with _without_delegate_banner():
                self.interp.allocate_tensors()
            logger.debug("TFLite model cannot be resized; scoring one window at a time")
            return False
        self._batch = batch
        return True

    def run(self, x: np.ndarray) -> np.ndarray:
        try:
            if self._resize(x.shape[0]):
                out = self._invoke(x)
                if out.shape[0] == x.shape[0]:
                    return out
                self._resizable = False
            self._resize(1)
            return np.concatenate([self._invoke(x[i : i + 1]) for i in range(len(x))])
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"the TFLite interpreter failed to run: {exc}") from exc


class _MicroBackend(_Backend):
    """TFLite Micro interpreter on the host (``tflite-micro``), one window a call."""

    name = "tflite-micro"

    def __init__(self, content: bytes, arena_size: int = 256 * 1024) -> None:
        from tflite_micro import runtime as tflm

        try:
            self.interp = tflm.Interpreter.from_bytes(content, arena_size=arena_size)
        except Exception as exc:
            raise ModelError(f"TFLite Micro cannot load the model: {exc}") from exc
        detail = self.interp.get_input_details(0)
        self.input_shape = tuple(int(d) for d in detail["shape"])
        self.input_dtype = np.dtype(detail["dtype"]).name
        try:
            out = self.interp.get_output_details(0)
            params = out.get("quantization_parameters") or {}
            scales, zero_points = params.get("scales"), params.get("zero_points")
            self.output_dtype = np.dtype(out["dtype"]).name
            if scales is not None and len(scales) == 1 and float(scales[0]):
                self.out_quant = (float(scales[0]), int(zero_points[0]))
        except Exception:  # an older interpreter that does not say: not compared
            self.output_dtype, self.out_quant = None, None

    def run(self, x: np.ndarray) -> np.ndarray:
        outs = []
        try:
            for i in range(len(x)):
                self.interp.set_input(x[i : i + 1], 0)
                self.interp.invoke()
                outs.append(np.array(self.interp.get_output(0)))
        except Exception as exc:
            raise ModelError(f"TFLite Micro failed to run: {exc}") from exc
        return np.concatenate(outs)


def _micro_backend(content: bytes, prefer_micro: bool, threads: int = 1) -> _Backend:
    if prefer_micro:
        try:
            import tflite_micro  # noqa: F401
        except ImportError:
            logger.info("tflite-micro is not installed; running the C array in LiteRT")
        else:
            return _MicroBackend(content)
    return _TfliteBackend(content, threads)


# ---------------------------------------------------------------------------- loading


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not folder.is_dir():
        what = (
            "is a file, not an artifact folder (the folder that holds manifest.json)"
            if folder.exists()
            else "artifact folder does not exist"
        )
        raise ModelError(f"{folder}: {what}")
    expected = (
        "expected a JSON object with target, model_file, input, output and sha256 "
        "(input and output objects with shape and dtype)"
    )
    try:
        manifest = json.loads(path.read_text())
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the manifest ({exc})") from exc
    except (RecursionError, ValueError) as exc:  # bad input, as a JSON list is
        raise BadInputError(
            f"the manifest is not valid JSON ({json_problem(exc)}); {expected}",
            path=str(path),
        ) from exc
    if not isinstance(manifest, dict):
        raise BadInputError(
            f"the manifest is a JSON {type(manifest).__name__}; {expected}",
            path=str(path),
        )
    for key in ("input", "output"):
        if key in manifest and not isinstance(manifest[key], dict):
            raise BadInputError(
                f"manifest {key!r} is {str(manifest[key])[:40]!r}; {expected}",
                path=str(path),
            )
    missing = [
        k
        for k in ("target", "model_file", "input", "output", "sha256")
        if k not in manifest
    ]
    if missing:
        raise ModelError(f"{path}: manifest lacks {', '.join(missing)}")
    check_model_version(manifest, path)
    for key in ("input", "output"):
        _check_quant_fields(manifest[key], key, path)
    return manifest


def _check_quant_fields(entry: dict[str, Any], what: str, path: Path) -> None:
    """BadInputError (exit 3) naming ``path`` unless the ``scale`` and
    ``zero_point`` of a manifest's ``input``/``output`` entry are null or JSON
    numbers: a positive finite scale, a whole zero point in the dtype's range. A
    string such as "-128" would otherwise be turned into a number silently (the
    manifest is not in its own sha256 list, so anyone can edit it)."""
    scale, zero = entry.get("scale"), entry.get("zero_point")
    if scale is not None and (
            isinstance(scale, bool) or not isinstance(scale, int | float)
            or not math.isfinite(scale) or scale <= 0):
        raise BadInputError(
            f"manifest field '{what}.scale' {str(scale)[:40]!r} is a JSON "
            f"{_json_type(scale)}; expected null or a positive finite number",
            path=str(path))
    dtype = _NP_DTYPES.get(str(entry.get("dtype")))
    if dtype is not None and np.issubdtype(dtype, np.integer):
        lo, hi = int(np.iinfo(dtype).min), int(np.iinfo(dtype).max)
    else:
        lo, hi = -(2**31), 2**31 - 1
    whole = (isinstance(zero, int) and not isinstance(zero, bool)) or (
        isinstance(zero, float) and zero.is_integer())
    if zero is not None and not (whole and lo <= zero <= hi):
        raise BadInputError(
            f"manifest field '{what}.zero_point' {str(zero)[:40]!r} is a JSON "
            f"{_json_type(zero)}; expected null or a whole number in {lo}..{hi}",
            path=str(path))


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """ModelError unless every file the manifest lists has its recorded sha256."""
    hashes = manifest["sha256"]
    if not isinstance(hashes, dict) or not hashes:
        raise ModelError(f"{folder}: manifest sha256 must map file names to digests")
    needed = {str(manifest["model_file"]), "encoder.json", "thresholds.json"}
    if manifest["target"] in _MICRO_TARGETS:
        needed.add("model.h")
    unlisted = sorted(needed - set(hashes))
    if unlisted:
        raise ModelError(f"{folder}: manifest has no sha256 for {', '.join(unlisted)}")
    for name, expected in hashes.items():
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ModelError(f"{folder}: manifest names a file outside it: {name!r}")
        if not path.is_file():
            raise ModelError(f"{folder}: {name} is listed in the manifest but absent")
        actual = sha256_file(path)
        if actual != str(expected).lower():
            raise ModelError(
                f"{folder}: sha256 mismatch for {name}: manifest {expected}, "
                f"file {actual}; refusing to load a modified artifact"
            )


def _check_input(folder: Path, spec: TensorSpec, backend: _Backend) -> None:
    got_shape = backend.input_shape
    want = spec.shape
    same_rank = len(got_shape) == len(want) == 3
    # Batch: None in the manifest accepts any; feature dims must match exactly.
    if not same_rank or tuple(got_shape[1:]) != tuple(want[1:]):
        raise ModelError(
            f"{folder}: model input shape {list(got_shape)} does not match the "
            f"manifest: expected {list(want)}, received {list(got_shape)}"
        )
    if want[0] is not None and got_shape[0] not in (None, want[0]):
        raise ModelError(
            f"{folder}: model batch {got_shape[0]} does not match the manifest's "
            f"{want[0]}"
        )
    if backend.input_dtype != spec.dtype:
        raise ModelError(
            f"{folder}: model input dtype does not match the manifest: expected "
            f"{spec.dtype}, received {backend.input_dtype}"
        )
    quant = getattr(backend, "quant", None)
    if spec.dtype != "float32" and quant is not None and spec.scale is not None:
        scale, zero_point = float(quant[0]), int(quant[1])
        same = np.isclose(scale, spec.scale, rtol=1e-6)
        if not same or zero_point != spec.zero_point:
            raise ModelError(
                f"{folder}: model input quantization does not match the manifest: "
                f"expected scale {spec.scale} zero point {spec.zero_point}, received "
                f"scale {scale} zero point {zero_point}"
            )


def _check_output(folder: Path, spec: TensorSpec, backend: _Backend) -> None:
    """ModelError naming manifest.json unless its output dtype, scale and zero
    point are the model's own (where the runtime says what they are).

    The manifest is not in its own sha256 list, and the probe tolerates a few
    quantization steps: an output zero point edited by 3 changes decisions yet
    still passes the probe. So the manifest is compared with the model itself.
    """
    where = f"{folder / MANIFEST}"
    got = backend.output_dtype
    if got is not None and got != spec.dtype:
        raise ModelError(
            f"{where}: output dtype {spec.dtype} does not match the model's output "
            f"tensor, which is {got}; refusing an edited or mismatched manifest"
        )
    quant = backend.out_quant
    if spec.dtype == "float32" or quant is None:
        return
    scale, zero_point = quant
    same = spec.scale is not None and bool(np.isclose(scale, spec.scale, rtol=1e-6))
    if not same or spec.zero_point != zero_point:
        raise ModelError(
            f"{where}: output quantization scale {spec.scale} zero point "
            f"{spec.zero_point} does not match the model's output tensor, which has "
            f"scale {scale} zero point {zero_point}; refusing an edited or "
            "mismatched manifest"
        )


def check_encoder_fits(scorer: Scorer) -> None:
    """ModelError naming encoder.json unless the encoder's windows are the model's
    input: ``[window, n_features]`` of the encoder against the model's ``[W, F]``.

    Every command that scores flows encodes them with this encoder first; one of
    another shape would make windows the model refuses, flow after flow.
    """
    encoder = scorer.encoder
    made = [int(encoder.window), int(encoder.n_features)]
    taken = [scorer.window, scorer.n_features]
    if made != taken:
        raise ModelError(
            f"{scorer.folder / 'encoder.json'}: the encoder makes windows {made} but "
            f"the model takes {taken}; refusing an artifact whose model does not "
            "match its encoder"
        )


def _backend_for(
    folder: Path, target: str, model_path: Path, threads: int, prefer_micro: bool
) -> _Backend:
    """The runtime of ``target`` with the model file loaded."""
    if target in _ONNX_TARGETS:
        return _OnnxBackend(model_path, threads)
    if target in _TFLITE_TARGETS:
        return _TfliteBackend(model_path.read_bytes(), threads)
    if target in _MICRO_TARGETS:
        return _micro_backend(
            c_array_bytes(model_path.read_text()), prefer_micro, threads
        )
    raise ModelError(
        f"{folder}: target {target!r} has no edge runtime (expected one of "
        f"{sorted(_ONNX_TARGETS | _TFLITE_TARGETS | _MICRO_TARGETS)})"
    )


def load_artifact(
    folder: str | Path,
    *,
    threads: int = 1,
    prefer_micro: bool = False,
    probe: bool = True,
) -> Scorer:
    """Verify an artifact folder and load its model in the matching runtime.

    Raises :class:`~flows.errors.ModelError` when a file is missing or modified (sha256
    differs from the manifest), when the model's input does not match the manifest
    (shape, dtype, int8 scale and zero point), when the manifest's output dtype or
    int8 scale and zero point are not the model's own, when ``encoder.json`` is not
    an encoder or makes windows of another shape than the model takes
    (:func:`check_encoder_fits`), when the runtime cannot load it, or when the
    manifest's probe
    windows do not score as recorded (an edited manifest, a misbehaving runtime);
    :class:`~flows.errors.BadInputError` (exit 3) naming ``manifest.json`` when the
    manifest is not valid JSON or not a JSON object of objects, or when its
    ``model_version`` is text the re-scorer would refuse in every escalation
    (:func:`model_version_problem`), and naming ``thresholds.json`` and the key when
    its values break the contract (:func:`_read_thresholds`).
    ``prefer_micro`` runs a ``tflite-micro`` C array in the TFLite Micro interpreter
    when it is installed.
    ``probe=False`` leaves the probe to the caller (the update health check, which
    takes its own tolerance).
    """
    folder = Path(folder)
    manifest = _read_manifest(folder)

    # Every byte is checked before any of it reaches a parser.
    verify_files(folder, manifest)

    target = str(manifest["target"])
    model_path = folder / str(manifest["model_file"])
    try:
        backend = _backend_for(folder, target, model_path, threads, prefer_micro)
    except ModelError as exc:
        if str(folder) in str(exc):
            raise
        raise ModelError(f"{folder}: {model_path.name} ({target}): {exc}") from exc

    spec = TensorSpec.from_manifest(manifest["input"], "input")
    _check_input(folder, spec, backend)
    if spec.dtype != "float32" and (spec.scale is None or spec.zero_point is None):
        raise ModelError(f"{folder}: int8 input needs scale and zero_point")
    _check_output(folder, TensorSpec.from_manifest(manifest["output"], "output"),
                  backend)
    scorer = Scorer(folder, manifest, backend)
    # Once here, so that no command reads a flow with an encoder that does not fit.
    check_encoder_fits(scorer)

    # The manifest itself is not in its sha256 list: an edited output scale or kind
    # would change every score silently. Its probe windows catch that at load.
    if probe and not manifest.get("probe"):
        raise ModelError(
            f"{folder}: the manifest has no probe windows to check the model with "
            "(compress run writes them; rebuild the artifact)"
        )
    if probe:
        try:
            scorer.check_probe()
        except (BadInputError, TypeError, ValueError) as exc:
            raise ModelError(f"{folder}: the manifest's probe is malformed: {exc}") \
                from exc
    logger.info(
        "loaded %s (%s, %s, input %s %s)",
        model_path,
        target,
        backend.name,
        list(spec.shape),
        spec.dtype,
    )
    return scorer


def midway_below(p: np.ndarray, cut: float, floor: float | None = None) -> float:
    """A threshold that flags the same scores of ``p`` as ``cut`` (``p >= cut``) but
    lies halfway between ``cut`` and the highest score below it (or ``floor``, if
    that is higher), not on a score itself; ``cut`` when there is neither (moving
    it down would take in scores no window of ``p`` showed).

    An int8 model's scores are a few fixed levels: a threshold on one of them keeps
    that level flagged only where the level is computed exactly as it was here
    (float32 here; a port that dequantizes in float64 lands just below it). Halfway
    to the next lower level, every correct implementation flags the same windows."""
    p = np.asarray(p, dtype=np.float64)
    lower = p[p < cut]
    lows = ([float(lower.max())] if lower.size else []) + (
        [float(floor)] if floor is not None else [])
    if not lows:
        return float(cut)
    return halfway(max(lows), float(cut))


def halfway(low: float, high: float) -> float:
    """The threshold midway between two scores, ``low`` < ``high``: flags
    ``high`` and not ``low``. Two adjacent doubles have no double between them:
    then ``high`` itself."""
    mid = low + (high - low) / 2
    return mid if low < mid <= high else high


def doubt_floor(
    p: np.ndarray, decision: float, lo: float, share: float, most: float
) -> float:
    """``lo``, lowered where needed so that at least ``share`` of all windows fall
    in ``[lo, decision)``: the highest scores below the decision, a tie group whole
    (or left out, if taking it would put more than ``most`` of them there, unless
    it is the group right below the decision: then it is taken whole all the same,
    since leaving it out would close the band)."""
    n = max(len(p), 1)
    below = np.sort(p[p < decision])
    want = int(np.ceil(share * n))
    if want == 0 or below.size == 0:
        return lo
    if below.size - np.searchsorted(below, lo, "left") >= want:
        return lo
    cut = below[max(below.size - want, 0)]
    if (below.size - np.searchsorted(below, cut, "left")) / n > most:
        right = np.searchsorted(below, cut, "right")
        if right < below.size:
            cut = below[right]
    return float(min(lo, cut))
