"""``teacher serve`` with a torch-int8 artifact: the re-scorer runs the int8 teacher.

A tiny teacher (windows of 4 x 3, the shape of the escalations
:mod:`tests.test_rescorer_faults` builds) is trained here for a few seconds, saved
as a checkpoint and made into a torch-int8 artifact by compress's own writer
(:func:`compress.inc.torch_int8_artifact`). The expected scores come from
compress's own measurement of the saved program (``compress.inc._probs``), the
expected version from a sha256 of the manifest computed here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("neural_compressor")

from edge_agent import protocol as proto  # noqa: E402
from edge_agent.mqtt import MqttLink  # noqa: E402
from flows.errors import EXIT_FAILURE, EXIT_OK  # noqa: E402
from tests.conftest import wait_for  # noqa: E402
from tests.test_rescorer_faults import WINDOW, escalation, publish  # noqa: E402
from tests.test_teacher_model import _encoder  # noqa: E402

pytestmark = pytest.mark.timeout(300)

BIN = Path(sys.executable).parent
W, F = 4, 3  # the shape of tests.test_rescorer_faults.WINDOW


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> SimpleNamespace:
    """A trained tiny teacher checkpoint and its torch-int8 artifact."""
    from compress.inc import torch_int8_artifact
    from teacher.checkpoint import load_teacher, save_checkpoint
    from teacher.metrics import binary_metrics
    from tests.test_compress_inc import fit_tiny_teacher

    rng = np.random.default_rng(0)
    x = rng.random(size=(600, W, F)).astype(np.float32)
    y = (x[:, -1, 0] + x[:, :, 1].mean(axis=1) > 1.0).astype(np.int64)
    net = fit_tiny_teacher(x, y)

    # The checkpoint, and the artifact compress writes from it (one thread).
    root = tmp_path_factory.mktemp("int8")
    ckpt = save_checkpoint(root / "teacher", net, encoder=_encoder(F, W),
                           threshold={"threshold": 0.5, "rule": "best-f1",
                                      "chosen_on": "val"})
    teacher = load_teacher(ckpt, device="cpu")
    val, test = np.arange(400, 500), np.arange(500, 600)
    p_val = teacher.predict_proba(x[val])
    ctx = SimpleNamespace(
        progress=lambda msg: None, teacher=teacher, y=y, val=val, test=test,
        calibration=x[:128], val_windows=x[val], test_windows=x[test],
        families_test=None, prep=SimpleNamespace(window=W, n_features=F),
        teacher_val=binary_metrics(y[val], p_val, 0.5), teacher_test={},
        cfg=SimpleNamespace(max_f1_drop=0.05, time_latency=False, teacher=str(ckpt),
                            data_dir=None),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        art = torch_int8_artifact(ctx, root / "artifact")
    finally:
        torch.set_num_threads(threads)
    return SimpleNamespace(ckpt=ckpt, art=art, windows=x[test])


def measured(art: Path, windows: np.ndarray) -> np.ndarray:
    """compress's own measurement of the saved program on ``windows``, one thread
    (as the re-scorer runs it)."""
    from compress.inc import _probs, load_program

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _probs(load_program(art / "model.pt2"), windows)
    finally:
        torch.set_num_threads(threads)


def version_of(art: Path) -> str:
    """The teacher version a verdict of this artifact must carry."""
    digest = hashlib.sha256((art / "manifest.json").read_bytes()).hexdigest()
    return f"torch-int8:sha256:{digest[:16]}"


def test_the_int8_teacher_scores_as_compress_measured(made) -> None:
    """Loaded for the re-scorer, the artifact scores as compress measures its
    program, under its own threshold, window shape and version."""
    from compress.inc import load_int8_teacher

    teacher = load_int8_teacher(made.art)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = teacher.predict_proba(made.windows)
    finally:
        torch.set_num_threads(threads)

    np.testing.assert_array_equal(got, measured(made.art, made.windows))
    manifest = json.loads((made.art / "manifest.json").read_text())
    probe = manifest["probe"]
    np.testing.assert_allclose(teacher.predict_proba(probe["windows"]),
                               probe["expected"], atol=1e-5)
    thresholds = json.loads((made.art / "thresholds.json").read_text())
    assert teacher.threshold == thresholds["decision"]
    assert teacher.config == {"window": W, "n_features": F}
    assert teacher.version == version_of(made.art)


class Verdicts:
    """The verdicts published to gateway s1/g1, as parsed JSON."""

    def __init__(self, url: str) -> None:
        self.got: list[dict] = []
        self.link = MqttLink(url, "int8-verdicts", protocol="5",
                             on_message=lambda t, p: self.got.append(json.loads(p)))
        self.link.connect(timeout=5)
        self.link.subscribe(proto.topic("s1", "g1", proto.Channel.VERDICTS),
                            timeout=5)

    def close(self) -> None:
        self.link.close()


@pytest.mark.broker
def test_serve_answers_an_escalation_with_the_int8_score(made, mosquitto, tmp_path):
    """``teacher serve --checkpoint ARTIFACT`` answers an escalation over a real
    mosquitto with the int8 program's probability, naming the artifact."""
    log_path = tmp_path / "serve.log"
    cmd = [str(BIN / "teacher"), "serve", "--checkpoint", str(made.art),
           "--broker", mosquitto.url, "--store", str(tmp_path / "alerts.sqlite"),
           "--client-id", "rs-int8", "--duration", "120"]
    with open(log_path, "w") as log:
        serve = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    verdicts = Verdicts(mosquitto.url)
    try:
        wait_for(lambda: "serving:" in log_path.read_text() or serve.poll() is not None,
                 120, "teacher serve to start")
        assert serve.poll() is None, log_path.read_text()
        body = escalation(1)
        publish(mosquitto.url, [body])
        wait_for(lambda: verdicts.got, 60, "the verdict")
    finally:
        verdicts.close()
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
        serve.wait(60)
    out = log_path.read_text()
    assert serve.returncode == EXIT_OK, out
    assert "Traceback" not in out

    # The verdict is the int8 program's for that window, under the artifact's name.
    want = float(measured(made.art, np.asarray([WINDOW], np.float32))[0])
    decision = json.loads((made.art / "thresholds.json").read_text())["decision"]
    (verdict,) = verdicts.got
    assert verdict["escalation_id"] == body["id"]
    assert verdict["score"] == want
    assert verdict["threshold"] == decision
    assert verdict["verdict"] == ("malicious" if want >= decision else "benign")
    assert verdict["teacher_version"] == version_of(made.art)
    assert f"serving: teacher {version_of(made.art)}," in out


def _rehash(folder: Path, name: str) -> None:
    """Record ``name``'s present sha256 in the manifest (a consistent artifact
    whose content is wrong, as a mix-up of files would make)."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["sha256"][name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    path.write_text(json.dumps(manifest))


def _edit_manifest(folder: Path, **fields) -> None:
    """Set top-level ``fields`` of the manifest (which no sha256 covers)."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(fields)
    path.write_text(json.dumps(manifest))


def _flip_byte(path: Path) -> None:
    """Damage one byte in the middle of ``path``."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _other_encoder(folder: Path) -> None:
    """An encoder of windows of 5 flows in place of 4, its sha256 recorded."""
    _encoder(F, W + 1).save(folder / "encoder.json")
    _rehash(folder, "encoder.json")


def _wrong_probe(folder: Path) -> None:
    """Probe scores the program does not give (1 - p): a model.pt2 swapped for
    another one with its sha256 recorded looks the same to the loader."""
    manifest = json.loads((folder / "manifest.json").read_text())
    probe = manifest["probe"]
    probe["expected"] = [1.0 - p for p in probe["expected"]]
    _edit_manifest(folder, probe=probe)


def _not_a_program(folder: Path) -> None:
    """model.pt2 replaced by bytes that are no program, its sha256 recorded."""
    (folder / "model.pt2").write_bytes(np.random.default_rng(1).bytes(5000))
    _rehash(folder, "model.pt2")


def _bad_thresholds(folder: Path) -> None:
    """Thresholds out of order (escalate_low above alert), sha256 recorded."""
    (folder / "thresholds.json").write_text(
        json.dumps({"decision": 0.5, "escalate_low": 0.9, "alert": 0.6}))
    _rehash(folder, "thresholds.json")


DAMAGE = {
    "missing model": (lambda d: (d / "model.pt2").unlink(),
                      ["model.pt2", "absent"]),
    "altered model": (lambda d: _flip_byte(d / "model.pt2"),
                      ["sha256 mismatch for model.pt2"]),
    "altered encoder": (lambda d: _flip_byte(d / "encoder.json"),
                        ["sha256 mismatch for encoder.json"]),
    "wrong target": (lambda d: _edit_manifest(d, target="onnx-int8"),
                     ["manifest.json", "'onnx-int8'", "torch-int8"]),
    "manifest not JSON": (lambda d: (d / "manifest.json").write_text("{"),
                          ["manifest.json", "not valid JSON"]),
    "encoder of another window": (_other_encoder,
                                  ["encoder.json does not fit", "5 x 3", "4 x 3"]),
    "program off its probe": (_wrong_probe, ["model.pt2 scores the probe windows"]),
    "model not a program": (_not_a_program,
                            ["model.pt2: cannot load the torch-int8 program"]),
    "thresholds out of order": (_bad_thresholds, ["thresholds.json", "escalate_low"]),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_artifact_is_refused_at_start_with_exit_1(
    case, made, tmp_path, capfd
) -> None:
    """Each damage stops ``teacher serve`` before the store and the broker: exit
    1, one ``error:`` line naming the artifact's file, no traceback."""
    from teacher.cli import main

    damage, words = DAMAGE[case]
    folder = tmp_path / "artifact"
    shutil.copytree(made.art, folder)
    damage(folder)

    threads = torch.get_num_threads()
    try:
        code = main(["serve", "--checkpoint", str(folder), "--broker",
                     "mqtt://127.0.0.1:1", "--store", str(tmp_path / "a.sqlite"),
                     "--client-id", "rs-damaged", "-q"])
    finally:
        torch.set_num_threads(threads)
    err = capfd.readouterr().err
    assert code == EXIT_FAILURE, err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert str(folder) in line, line
    for word in words:
        assert word in line, line
    assert not (tmp_path / "a.sqlite").exists()  # refused before the store


def test_a_model_file_that_is_no_program_is_refused_without_a_traceback(
    made, tmp_path
) -> None:
    """Found: torch logged the traceback of its failed read of model.pt2 (bytes
    that are no program, with their sha256 recorded) before our error line."""
    folder = tmp_path / "artifact"
    shutil.copytree(made.art, folder)
    _not_a_program(folder)

    done = subprocess.run(
        [str(BIN / "teacher"), "serve", "--checkpoint", str(folder), "--broker",
         "mqtt://127.0.0.1:1", "--store", str(tmp_path / "a.sqlite")],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_FAILURE, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"error: {folder / 'model.pt2'}: cannot load the torch-int8 program: File "
        "is not a zip file")


def test_serve_help_says_it_takes_a_torch_int8_artifact(capsys) -> None:
    """--help says what --checkpoint takes, the verdicts' version and exit 1."""
    from teacher.cli import main

    assert main(["serve", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "or a torch-int8 artifact folder" in out
    assert "teacher_version torch-int8:sha256:HEX" in out
    assert "checkpoint or torch-int8 artifact that cannot be loaded" in out



def test_compress_eval_scores_the_int8_teacher_with_torch(made, monkeypatch) -> None:
    """Found: the model the re-scorer runs could not be measured on a user's file
    (``compress eval`` said torch-int8 has no edge runtime)."""
    import compress.cli
    import teacher.data
    from compress.inc import load_int8_teacher
    from teacher.data import Prepared
    from teacher.metrics import binary_metrics

    windows = made.windows
    n = len(windows)
    y = (windows[:, -1, 0] > 0.5).astype(np.int8)
    rows = np.arange(n * W).reshape(n, W)  # each row's window: its own W rows
    int8 = load_int8_teacher(made.art)

    def prepared(source, encoder=None, **kw):
        assert source == "flows.log"
        return Prepared(X=windows.reshape(n * W, F), idx=rows, y=y,
                        split=np.zeros(n, np.int8), encoder=encoder,
                        name="flows.log", family="unsw-nb15")

    monkeypatch.setattr(teacher.data, "prepare", prepared)
    out = compress.cli.evaluate_artifact(made.art, "flows.log", None, timing=False,
                                         source_is_dataset=False)

    want = binary_metrics(y, measured(made.art, windows), int8.threshold)
    assert out["target"] == "torch-int8"
    assert out["confusion"] == want["confusion"] and out["n"] == n
    assert out["f1"] == pytest.approx(want["f1"])


def test_teacher_eval_on_an_artifact_points_to_compress_eval(made, capsys) -> None:
    """Found: teacher eval named a missing config.json, though serve takes the
    folder."""
    from teacher.cli import main

    code = main(["eval", "--checkpoint", str(made.art), "--data", "x.log", "-q"])

    assert code == 2
    err = capsys.readouterr().err
    assert "is a compress artifact" in err and "compress eval --artifact" in err
