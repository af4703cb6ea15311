"""What the loader compares an artifact's manifest and encoder with, and the
artifact numbers ``compress eval`` and ``benchmarks.bench_targets`` report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from edge_agent.runtime import load_artifact  # noqa: E402
from flows.errors import ModelError  # noqa: E402
from tests.test_runtime import (  # noqa: E402
    IN_SCALE,
    IN_ZP,
    OUT_SCALE,
    OUT_ZP,
    W,
    _float_model,
    _int8_model,
    _sha,
    tiny_encoder,
    write_artifact,
)

REPO = Path(__file__).resolve().parent.parent


def _edit_manifest(folder: Path, edit) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


# ------------------------------------------------------------ output quantization


def test_onnx_output_zero_point_edited_within_the_probe_is_refused(tmp_path):
    """Found: the manifest's output zero point was trusted; an edit of a few steps
    stays inside the probe's tolerance and moves every score."""
    folder = write_artifact(tmp_path / "q", _int8_model(), dtype="int8",
                            in_q=(IN_SCALE, IN_ZP), out_q=(OUT_SCALE, OUT_ZP))
    load_artifact(folder)  # as written
    _edit_manifest(folder, lambda m: m["output"].update(zero_point=OUT_ZP + 2))

    with pytest.raises(ModelError) as info:
        load_artifact(folder)

    message = str(info.value)
    assert "manifest.json" in message
    assert f"zero point {OUT_ZP + 2}" in message and f"zero point {OUT_ZP}" in message


@pytest.fixture(scope="module")
def tflite_int8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tflite-int8 artifact as compress writes one, from a tiny MLP student."""
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("tensorflow")
    from compress.artifact import write_manifest, write_thresholds
    from compress.pipeline import MODEL_FILES, io_specs, write_model
    from student.zoo import build_student

    w, f = 4, 3
    folder = tmp_path_factory.mktemp("tflite") / "art"
    folder.mkdir()
    calibration = np.random.default_rng(0).uniform(0, 1, (64, w, f)).astype(np.float32)
    model = build_student("mlp", f, w, width=8, seed=0).eval()
    write_model("tflite-int8", "mlp", model, folder, calibration, w, f)
    tiny_encoder(w, f).save(folder / "encoder.json")
    write_thresholds(folder, 0.5, 0.4, 0.6)
    inp, out = io_specs(folder, "tflite-int8", w, f)
    fields = {"target": "tflite-int8", "model_file": "model.tflite",
              "input": inp, "output": out}
    files = [*MODEL_FILES["tflite-int8"], "encoder.json", "thresholds.json"]
    write_manifest(folder, fields, files)
    scores = load_artifact(folder, probe=False).score(calibration[:4])
    fields["probe"] = {"windows": calibration[:4].tolist(),
                       "expected": scores.tolist(), "atol": 1.0 / 256}
    write_manifest(folder, fields, files)
    return folder


@pytest.mark.parametrize(("key", "delta"), [("zero_point", 6), ("scale", 0.02)])
def test_tflite_output_quantization_edited_is_refused(tflite_int8, tmp_path,
                                                      key, delta):
    """The tester's case: output.zero_point of a tflite-int8 manifest edited by
    6 steps loaded, and changed decisions. Compared with the model's own output
    tensor, it is refused naming manifest.json and both values."""
    folder = tmp_path / "art"
    folder.mkdir()
    for path in tflite_int8.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    built = json.loads((folder / "manifest.json").read_text())["output"]
    load_artifact(folder, probe=False)  # as written
    load_artifact(folder)

    def edit(manifest):
        value = manifest["output"][key]
        manifest["output"][key] = value + delta if key == "zero_point" else (
            value * (1 + delta))

    _edit_manifest(folder, edit)
    with pytest.raises(ModelError) as info:
        load_artifact(folder, probe=False)  # refused by the model, not the probe

    message = str(info.value)
    assert "manifest.json" in message and "output quantization" in message
    assert f"zero point {built['zero_point']}" in message
    assert f"scale {built['scale']}" in message


# ------------------------------------------------------------ encoder against model


def test_an_encoder_of_another_window_is_refused_at_load(tmp_path):
    """Found: encoder.json making windows of another length than the model takes
    (its sha256 updated) loaded; only the bundle refused it."""
    folder = write_artifact(tmp_path / "a", _float_model())
    tiny_encoder(window=2 * W).save(folder / "encoder.json")
    _edit_manifest(folder, lambda m: m["sha256"].update(
        {"encoder.json": _sha(folder / "encoder.json")}))

    with pytest.raises(ModelError) as info:
        load_artifact(folder)

    message = str(info.value)
    assert "encoder.json" in message
    assert f"encoder makes windows [{2 * W}, 3] but the model takes [{W}, 3]" in message


def test_compress_eval_refuses_a_misfit_encoder_before_reading_flows(tmp_path):
    folder = write_artifact(tmp_path / "a", _float_model())
    tiny_encoder(window=2 * W).save(folder / "encoder.json")
    _edit_manifest(folder, lambda m: m["sha256"].update(
        {"encoder.json": _sha(folder / "encoder.json")}))
    data = tmp_path / "flows.csv"
    data.write_text("not,a,flow,file\n")

    done = subprocess.run(
        [sys.executable, "-m", "compress.cli", "eval", "--artifact", str(folder),
         "--data", str(data), "--split", "all"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )

    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and "encoder.json" in lines[-1], lines
    assert f"[{2 * W}, 3]" in lines[-1] and "Traceback" not in done.stderr


# ------------------------------------------------------------ compress eval threads


def test_compress_eval_threads_reach_the_runtime(tmp_path, monkeypatch):
    """Found: compress eval timed on as many threads as torch and onnxruntime
    chose (throughput 637-9,523 flows/s between runs); --threads N (default 1)
    sets the loader's (onnxruntime, TFLite), and torch's for a torch-int8
    artifact, the one kind that runs in torch."""
    import json

    import torch

    import compress.inc as inc
    import edge_agent.runtime as runtime
    from compress.cli import build_parser, evaluate_artifact

    args = build_parser().parse_args(
        ["eval", "--artifact", "a", "--data", "f", "--threads", "3"])
    assert args.threads == 3
    assert build_parser().parse_args(
        ["eval", "--artifact", "a", "--data", "f"]).threads == 1

    seen = {}

    class Stop(Exception):
        pass

    def fake_load(folder, **kwargs):
        seen.update(kwargs, torch=torch.get_num_threads())
        raise Stop

    def fake_int8(folder):
        seen.update(int8_torch=torch.get_num_threads())
        raise Stop

    before = torch.get_num_threads()
    monkeypatch.setattr(runtime, "load_artifact", fake_load)
    monkeypatch.setattr(inc, "load_int8_teacher", fake_int8)
    int8 = tmp_path / "int8"
    int8.mkdir()
    (int8 / "manifest.json").write_text(json.dumps({"target": "torch-int8"}))
    try:
        with pytest.raises(Stop):
            evaluate_artifact(tmp_path, "f", None, threads=2)
        with pytest.raises(Stop):
            evaluate_artifact(int8, "f", None, threads=3)
    finally:
        torch.set_num_threads(before)
    assert seen["threads"] == 2 and seen["int8_torch"] == 3


def test_compress_eval_help_says_latency_is_on_n_threads():
    from compress.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["eval"]
    text = " ".join(sub.format_help().split())
    assert "--threads N" in text and "measured on N threads" in text


# ------------------------------------------------------------ bench_targets sizes


def test_bench_targets_size_is_measured_from_the_model_file(tmp_path, monkeypatch):
    """Found: the size column was the manifest's size_bytes, which anyone can
    edit (the manifest is not in its own sha256 list)."""
    import compress.cli
    from benchmarks import bench_targets

    folder = write_artifact(tmp_path / "all" / "onnx-fp32", _float_model())
    _edit_manifest(folder, lambda m: m.update(size_bytes=1, params=7))
    monkeypatch.setattr(compress.cli, "evaluate_artifact",
                        lambda *a, **k: {"f1": 0.5})

    rows = bench_targets.measure(tmp_path / "all", "x", None)

    assert rows[0]["size_bytes"] == (folder / "model.onnx").stat().st_size
    assert rows[0]["params"] == 7
    assert "params (manifest)" in bench_targets.markdown(rows, "t")


def test_bench_targets_micro_size_is_the_flatbuffer(tmp_path):
    from benchmarks.bench_targets import model_size
    from compress.export import write_c_array

    content = bytes(range(40))
    write_c_array(content, tmp_path, ["FULLY_CONNECTED"])
    manifest = {"target": "tflite-micro", "model_file": "model.cc"}

    assert model_size(tmp_path, manifest) == len(content)


# ------------------------------------------------------------ onnx output name


@pytest.mark.parametrize(("output", "name"), [("logit", "logit"),
                                              ("probability", "prob")])
def test_onnx_export_names_its_output_after_what_it_holds(tmp_path, output, name):
    import onnx

    from compress.export import export_onnx
    from student.zoo import build_student

    path = export_onnx(build_student("mlp", 3, 4, width=4, seed=0),
                       tmp_path / "m.onnx", 4, 3, output)

    assert [o.name for o in onnx.load(str(path)).graph.output] == [name]


def test_loading_a_tflite_artifact_prints_no_delegate_banner(tflite_int8, capfd,
                                                             monkeypatch):
    """Found: every TFLite load wrote LiteRT's "INFO: Created TensorFlow Lite
    XNNPACK delegate for CPU." to stderr (its C++ runtime, past our logging). It is
    dropped; whatever else reaches stderr meanwhile still comes through."""
    import os

    import edge_agent.runtime as runtime

    # LiteRT says it once per process: a fresh one.
    script = ("import sys, numpy as np\n"
              "from edge_agent.runtime import load_artifact\n"
              "s = load_artifact(sys.argv[1], probe=False).score(\n"
              "    np.zeros((5, 4, 3), dtype=np.float32))\n"
              "print(s.shape)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tflite_int8)],
                          capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert (done.returncode, done.stdout) == (0, "(5,)\n"), done.stderr
    assert "XNNPACK" not in done.stderr

    real = runtime._litert_interpreter

    class Talking:
        def __init__(self, content, threads=1):
            self.inner = real(content, threads)

        def allocate_tensors(self):
            os.write(2, b"a message of the runtime\n")
            self.inner.allocate_tensors()

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(runtime, "_litert_interpreter", Talking)
    load_artifact(tflite_int8, probe=False)
    err = capfd.readouterr().err
    assert err == "a message of the runtime\n"
