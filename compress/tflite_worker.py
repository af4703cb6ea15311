"""Rebuild a student in Keras, copy its weights and convert it to TFLite.

Run as ``python -m compress.tflite_worker SPEC.json`` in a child process, because the
TFLite converter can crash the interpreter (TOOLCHAIN.md: a Keras 3 recurrent layer
that is not unrolled segfaults the int8 converter). The spec names the student kind,
a ``.npz`` of its torch weights (state-dict names), the window and feature count, the
calibration windows (``.npy``, float32 ``[N, W, F]``), whether to make full-int8, and
where to write the model. Layer widths are read from the weights, so pruned students
convert as they are. On success it prints one JSON line with the layer list; when
the model cannot be written (a full disk) it exits :data:`WRITE_FAILED` with the
OSError on a ``GATEWATCH-OSERROR`` line, so the parent reports the output's
problem, not a failed conversion.

The models take one window (static batch 1) and output the probability of anomaly
(a final sigmoid), or its logit when the spec says ``"output": "logit"``.

``python -m compress.tflite_worker --arena MODEL.tflite BYTES`` is the other use: it
loads the model in the TFLite Micro interpreter with a tensor arena of BYTES and runs
one window, exiting 0 when that works, 1 when the interpreter refuses, and
:data:`NO_MICRO` when tflite-micro is not installed. It is a child process too,
because that interpreter crashes (SIGSEGV) with some arenas that are too small.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _mlp(keras: Any, w: dict[str, np.ndarray], W: int, F: int, act: Any) -> Any:
    inp = keras.Input((W, F), batch_size=1, name="x")
    h = keras.layers.Flatten(name="flatten")(inp)
    h = keras.layers.Dense(w["fc1.weight"].shape[0], activation="relu", name="fc1")(h)
    h = keras.layers.Dense(w["fc2.weight"].shape[0], activation="relu", name="fc2")(h)
    out = keras.layers.Dense(1, activation=act, name="fc")(h)
    model = keras.Model(inp, out)
    for name in ("fc1", "fc2", "fc"):
        model.get_layer(name).set_weights([w[f"{name}.weight"].T, w[f"{name}.bias"]])
    return model


def _cnn(keras: Any, w: dict[str, np.ndarray], W: int, F: int, act: Any) -> Any:
    inp = keras.Input((W, F), batch_size=1, name="x")
    h = inp
    for name in ("conv1", "conv2"):
        kernel = w[f"{name}.weight"]
        h = keras.layers.Conv1D(
            kernel.shape[0], kernel.shape[2], padding="same", activation="relu",
            name=name,
        )(h)
    h = keras.layers.GlobalAveragePooling1D(name="pool")(h)
    out = keras.layers.Dense(1, activation=act, name="fc")(h)
    model = keras.Model(inp, out)
    for name in ("conv1", "conv2"):
        # torch Conv1d [out, in, k] -> Keras Conv1D [k, in, out].
        kernel = w[f"{name}.weight"].transpose(2, 1, 0)
        model.get_layer(name).set_weights([kernel, w[f"{name}.bias"]])
    model.get_layer("fc").set_weights([w["fc.weight"].T, w["fc.bias"]])
    return model


def _lstm(keras: Any, w: dict[str, np.ndarray], W: int, F: int, act: Any) -> Any:
    hidden = w["lstm.weight_hh_l0"].shape[1]
    inp = keras.Input((W, F), batch_size=1, name="x")
    # unroll=True: the while-loop form crashes the full-int8 converter.
    h = keras.layers.LSTM(hidden, unroll=True, name="lstm")(inp)
    out = keras.layers.Dense(1, activation=act, name="fc")(h)
    model = keras.Model(inp, out)
    # Gate order i, f, g, o is the same in torch and Keras; biases add up.
    model.get_layer("lstm").set_weights([
        w["lstm.weight_ih_l0"].T,
        w["lstm.weight_hh_l0"].T,
        w["lstm.bias_ih_l0"] + w["lstm.bias_hh_l0"],
    ])
    model.get_layer("fc").set_weights([w["fc.weight"].T, w["fc.bias"]])
    return model


BUILDERS = {"mlp": _mlp, "cnn": _cnn, "lstm": _lstm}
NO_MICRO = 3  # exit status of an arena probe where tflite-micro is not installed
# Exit status when the model could not be written (a full disk), with a line
# starting with WRITE_FAILED_TAG that holds the OSError's errno, text and file.
WRITE_FAILED = 4
WRITE_FAILED_TAG = "GATEWATCH-OSERROR "


def convert(spec: dict[str, Any]) -> dict[str, Any]:
    """Build, check against the torch output and convert; returns a short report."""
    import keras
    import tensorflow as tf

    weights = dict(np.load(spec["weights"]))
    W, F = int(spec["window"]), int(spec["n_features"])
    act = "sigmoid" if spec.get("output", "probability") == "probability" else None
    model = BUILDERS[spec["kind"]](keras, weights, W, F, act)

    # The rebuilt float model must match the torch probabilities it was given.
    calib = np.load(spec["calibration"]).astype(np.float32)
    check = np.load(spec["check_windows"]).astype(np.float32)
    want = np.load(spec["check_probs"]).astype(np.float32)
    got = np.concatenate(
        [model(check[i : i + 1]).numpy()[:, 0] for i in range(len(check))]
    )
    keras_diff = float(np.max(np.abs(got - want))) if len(want) else 0.0

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if spec["int8"]:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = lambda: (
            [calib[i : i + 1]] for i in range(len(calib))
        )
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
    data = conv.convert()
    Path(spec["out"]).write_bytes(data)
    return {
        "bytes": len(data),
        "keras_max_abs_diff": keras_diff,
        "layers": [layer.__class__.__name__ for layer in model.layers],
    }


def arena_probe(model: Path, arena_bytes: int) -> int:
    """Exit status of one arena probe: 0 when the model allocates its tensors in
    an arena of ``arena_bytes`` and runs a window of zeros, 1 when the TFLite
    Micro interpreter refuses, :data:`NO_MICRO` without tflite-micro."""
    try:
        from tflite_micro import runtime as tflm
    except ImportError:
        return NO_MICRO

    try:
        interp = tflm.Interpreter.from_bytes(model.read_bytes(),
                                             arena_size=arena_bytes)
        detail = interp.get_input_details(0)
        interp.set_input(np.zeros(detail["shape"], dtype=detail["dtype"]), 0)
        interp.invoke()
    except Exception:  # the interpreter's refusals are plain RuntimeErrors
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the child process: ``SPEC.json`` in, one JSON line out; or
    ``--arena MODEL BYTES``, an arena probe (:func:`arena_probe`)."""
    args = sys.argv[1:] if argv is None else argv
    if args[0] == "--arena":
        return arena_probe(Path(args[1]), int(args[2]))
    spec = json.loads(Path(args[0]).read_text())
    try:
        report = convert(spec)
    except OSError as exc:
        # Said to the parent as it is, so that it can tell a full disk from a
        # converter that failed.
        print(WRITE_FAILED_TAG + json.dumps({
            "errno": exc.errno, "strerror": exc.strerror,
            "filename": None if exc.filename is None else str(exc.filename),
        }), flush=True)
        return WRITE_FAILED
    print("GATEWATCH-RESULT " + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
