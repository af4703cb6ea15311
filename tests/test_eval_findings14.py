"""Findings of session 14 on the eval tools: the split seed a teacher trained with,
the threshold rule's name, a gateway install without torch, the wrong kind of
folder, a checksums.json that is not JSON, the saved-checkpoint log line, manifest
types and the probe's shape, and the trained-on warning said once."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, data_file

CTU_FILE = "zeek-conn/ctu-malware-botnet-230-1-njrat-first1000.conn.log.labeled"


class _Collect(logging.Handler):
    """Keeps the info (and louder) messages of the gatewatch loggers."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def made(data_dir: Path, tmp_path_factory):
    """A tiny ctu-conn teacher trained with --seed 3 and an onnx-fp32 artifact of
    it (about a minute on one core), with the log messages of the training."""
    from compress.cli import main as compress_main
    from teacher.cli import main as teacher_main

    root = tmp_path_factory.mktemp("seed3")
    ckpt, art = root / "t-s3", root / "a-s3"
    os.environ["GATEWATCH_DATA"] = str(data_dir)
    logs = _Collect()
    gw = logging.getLogger("gatewatch")
    level = gw.level
    gw.addHandler(logs)
    gw.setLevel(logging.DEBUG)  # INFO records reach the handler whatever root says
    try:
        code = teacher_main([
            "train", "--dataset", "ctu-conn", "--out", str(ckpt), "--members", "1",
            "--epochs", "2", "--conv-filters", "8,8", "--lstm-hidden", "8",
            "--seed", "3", "--data-dir", str(data_dir)])
    finally:
        gw.removeHandler(logs)
        gw.setLevel(level)
    assert code == 0
    code = compress_main([
        "run", "--target", "onnx-fp32", "--teacher", str(ckpt), "--out", str(art),
        "--student", "cnn", "--widths", "4", "--no-prune", "--epochs", "2",
        "--max-f1-drop", "1", "--no-timing", "--json", "-q",
        "--data-dir", str(data_dir)])
    assert code == 0
    return ckpt, art, logs.messages


def _eval(capsys, *argv: str) -> tuple[int, dict | str, str]:
    """``compress eval`` in-process: exit code, stdout (parsed with --json) and
    stderr."""
    from compress.cli import main

    capsys.readouterr()
    code = main(["eval", *argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 and "--json" in argv else out), err


# ------------------------------------------------------------ 1: the split seed


@pytest.mark.data
def test_compress_eval_scores_the_split_the_artifact_was_made_on(made, data_dir,
                                                                 capsys):
    ckpt, art, _ = made
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["provenance"]["data"]["split_seed"] == 3

    code, out, err = _eval(capsys, "--artifact", str(art), "--dataset", "ctu-conn",
                           "--data-dir", str(data_dir), "--json", "--no-timing")

    # compress run scored the artifact on the teacher's (seed 3) test split.
    assert code == 0, err
    test = manifest["metrics"]["test"]
    assert out["n"] == test["n"]
    assert out["confusion"] == test["confusion"]
    assert out["f1"] == pytest.approx(test["f1"])


@pytest.mark.data
def test_teacher_eval_uses_the_checkpoints_split_seed(made, data_dir, capsys):
    from teacher.cli import main

    ckpt, _, _ = made
    recorded = json.loads((ckpt / "metrics.json").read_text())["test"]
    capsys.readouterr()

    code = main(["eval", "--checkpoint", str(ckpt), "--dataset", "ctu-conn",
                 "--data-dir", str(data_dir), "--json", "--no-timing", "-q"])

    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["n"] == recorded["n"] and out["confusion"] == recorded["confusion"]


@pytest.mark.data
def test_teacher_eval_refuses_another_seed_on_its_own_dataset(made, data_dir,
                                                              capsys):
    from teacher.cli import main

    ckpt, _, _ = made
    capsys.readouterr()

    code = main(["eval", "--checkpoint", str(ckpt), "--dataset", "ctu-conn",
                 "--data-dir", str(data_dir), "--seed", "0", "--no-timing", "-q"])

    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "--seed 0" in err and "seed 3" in err and "not be held out" in err
    # The recorded seed itself is fine.
    code = main(["eval", "--checkpoint", str(ckpt), "--dataset", "ctu-conn",
                 "--data-dir", str(data_dir), "--seed", "3", "--no-timing", "-q",
                 "--json"])
    assert code == 0


def test_eval_seed_of_an_old_artifact_is_zero_with_a_warning(caplog):
    from compress.cli import _split_seed

    with caplog.at_level(logging.WARNING, logger="gatewatch"):
        assert _split_seed({"data": {"split_seed": 7}}, Path("a"), "ctu-conn",
                           "test") == 7
        assert not caplog.records
        assert _split_seed({}, Path("a"), "nsl-kdd", "test") == 0
        assert not caplog.records  # KDDTest+ is fixed: the seed moves nothing
        assert _split_seed({}, Path("a"), "ctu-conn", "test") == 0
    assert "records no split seed" in caplog.text


# ------------------------------------------------------ 2: the threshold rule


def test_thresholds_json_names_the_rule_used(tmp_path):
    from compress.artifact import write_thresholds

    write_thresholds(tmp_path, 0.4, 0.3, 0.6, rule="teacher-rate")
    rule = json.loads((tmp_path / "thresholds.json").read_text())["rule"]
    assert rule.startswith("decision: the cut flagging") and "teacher-rate" in rule
    assert "best F1" not in rule

    write_thresholds(tmp_path, 0.4, 0.3, 0.6)
    rule = json.loads((tmp_path / "thresholds.json").read_text())["rule"]
    assert rule.startswith("decision: best F1 on validation;")


@pytest.mark.data
def test_compress_eval_reports_the_manifests_threshold_rule(made, data_dir,
                                                           tmp_path, capsys):
    _, art, _ = made
    code, out, err = _eval(capsys, "--artifact", str(art), "--dataset", "ctu-conn",
                           "--data-dir", str(data_dir), "--json", "--no-timing")
    assert code == 0 and out["threshold_rule"] == "best-f1", err

    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["threshold_rule"]["rule"] = "teacher-rate"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = _eval(capsys, "--artifact", str(copy), "--dataset", "ctu-conn",
                           "--data-dir", str(data_dir), "--json", "--no-timing")
    assert code == 0 and out["threshold_rule"] == "teacher-rate", err


# ------------------------------------------------- 3: a gateway install, no torch

BLOCK_TORCH = """
import runpy, sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
sys.meta_path.insert(0, _NoTorch())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize(("command", "args", "extra"), [
    ("teacher", ["--help"], "train"),
    # compress eval of an onnx/tflite artifact needs no torch (leftovers16).
    ("compress", ["run", "--target", "onnx-fp32", "--teacher", "ART", "--out",
                  "ART"], "compress"),
])
def test_commands_without_torch_say_so_in_one_line(command, args, extra, tmp_path):
    script = Path(sys.executable).parent / command
    if not script.is_file():
        pytest.skip(f"no {command} console script beside {sys.executable}")
    args = [str(tmp_path) if a == "ART" else a for a in args]

    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH, str(script), *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO)

    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"error: {command} needs the full install")
    assert f"pip install 'gatewatch[{extra}]'" in lines[0]


def test_other_missing_modules_are_not_called_a_gateway_install():
    from teacher.cli import missing_full_install

    with pytest.raises(ModuleNotFoundError):
        missing_full_install(ModuleNotFoundError("x", name="flows_gone"), "teacher",
                             "train")


# ------------------------------------------------- 4: the wrong kind of folder


def test_compress_run_refuses_an_artifact_as_teacher(tmp_path, capsys):
    from compress.cli import main

    art = tmp_path / "art"
    art.mkdir()
    (art / "manifest.json").write_text("{}")
    (art / "encoder.json").write_text("{}")

    code = main(["run", "--target", "onnx-fp32", "--teacher", str(art), "--out",
                 str(tmp_path / "out")])

    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--teacher {art} is a compress artifact" in err
    assert "compress eval --artifact" in err


def test_compress_eval_refuses_a_teacher_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("config.json", "model.safetensors", "encoder.json"):
        (ckpt / name).write_text("{}")

    code, _, err = _eval(capsys, "--artifact", str(ckpt), "--data", "x.log")

    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--artifact {ckpt} is a teacher checkpoint" in err
    assert "teacher eval --checkpoint" in err


def test_load_teacher_names_an_artifact_folder(tmp_path):
    from flows.errors import BadInputError
    from teacher.checkpoint import load_teacher

    for name in ("manifest.json", "encoder.json", "thresholds.json"):
        (tmp_path / name).write_text("{}")

    with pytest.raises(BadInputError, match="is a compress artifact"):
        load_teacher(tmp_path)


# ------------------------------------------- 5: a checksums.json that is not JSON


def test_checksums_that_are_not_json_are_bad_input(tmp_path):
    from flows.errors import EXIT_BAD_INPUT, BadInputError
    from teacher.checkpoint import verify_checksums

    (tmp_path / "checksums.json").write_text("nope\n")

    with pytest.raises(BadInputError) as info:
        verify_checksums(tmp_path)

    assert info.value.exit_code == EXIT_BAD_INPUT
    text = str(info.value)
    assert text.startswith(f"{tmp_path / 'checksums.json'}: not valid JSON")
    assert 'expected {"algorithm": "sha256"' in text


@pytest.mark.data
def test_teacher_eval_of_checksums_that_are_not_json_exits_3(made, data_dir,
                                                            tmp_path, capsys):
    from teacher.cli import main

    copy = tmp_path / "ckpt"
    shutil.copytree(made[0], copy)
    (copy / "checksums.json").write_text("nope\n")
    capsys.readouterr()

    code = main(["eval", "--checkpoint", str(copy), "--dataset", "ctu-conn",
                 "--data-dir", str(data_dir), "-q"])

    err = capsys.readouterr().err
    assert code == 3 and "not valid JSON" in err and "Traceback" not in err


# ----------------------------------------------- 6: the saved-checkpoint log line


@pytest.mark.data
def test_train_logs_the_final_checkpoint_folder(made):
    ckpt, _, messages = made
    saved = [m for m in messages if m.startswith("saved teacher checkpoint to")]
    assert saved == [f"saved teacher checkpoint to {ckpt}"]
    assert not any(".new" in m for m in messages)


# ------------------------------------------- 7: manifest types and probe shape


def _manifest(folder: Path, **input_fields) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({
        "target": "tflite-int8", "model_file": "model.tflite", "sha256": {},
        "model_version": "m1",
        "input": {"shape": [None, 8, 3], "dtype": "int8", "scale": 0.0039,
                  "zero_point": -128, **input_fields},
        "output": {"dtype": "int8", "scale": 0.0039, "zero_point": -128}}))


@pytest.mark.parametrize(("field", "value", "said"), [
    ("zero_point", "-128", "'input.zero_point' '-128' is a JSON str"),
    ("scale", "0.0039", "'input.scale' '0.0039' is a JSON str"),
    ("zero_point", 1.5, "'input.zero_point' '1.5' is a JSON number; expected null "
                        "or a whole number in -128..127"),
    ("zero_point", 300, "in -128..127"),
    ("scale", 0, "'input.scale' '0' is a JSON number"),
    ("zero_point", True, "is a JSON boolean"),
])
def test_manifest_quantization_fields_must_be_numbers(tmp_path, field, value, said):
    from edge_agent.runtime import _read_manifest
    from flows.errors import EXIT_BAD_INPUT, BadInputError

    _manifest(tmp_path, **{field: value})

    with pytest.raises(BadInputError) as info:
        _read_manifest(tmp_path)

    assert info.value.exit_code == EXIT_BAD_INPUT and said in str(info.value)


def test_manifest_with_numeric_quantization_fields_reads(tmp_path):
    from edge_agent.runtime import _read_manifest

    _manifest(tmp_path, zero_point=-128.0)
    assert _read_manifest(tmp_path)["input"]["zero_point"] == -128.0


@pytest.mark.data
def test_compress_eval_refuses_a_string_zero_point(made, tmp_path, capsys):
    copy = tmp_path / "art"
    shutil.copytree(made[1], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["input"]["scale"] = "0.0039"
    (copy / "manifest.json").write_text(json.dumps(manifest))

    # The data file exists (a missing one is refused first, exit 3 too): the
    # manifest is what is refused here.
    data = tmp_path / "x.log"
    data.write_text("")
    code, _, err = _eval(capsys, "--artifact", str(copy), "--data", str(data))

    assert code == 3 and "'input.scale'" in err and "Traceback" not in err


@pytest.mark.data
def test_a_probe_too_long_is_named_against_the_model_input(made, tmp_path):
    from edge_agent.runtime import load_artifact
    from flows.errors import ModelError

    copy = tmp_path / "art"
    shutil.copytree(made[1], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["probe"]["expected"] = manifest["probe"]["expected"] * 2000
    (copy / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(ModelError) as info:
        load_artifact(copy)

    text = str(info.value)
    assert "probe's expected scores have shape [8000]; expected [4]" in text
    assert "broadcast" not in text


@pytest.mark.data
def test_probe_windows_of_another_shape_are_named(made, tmp_path):
    from edge_agent.runtime import load_artifact
    from flows.errors import ModelError

    copy = tmp_path / "art"
    shutil.copytree(made[1], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["probe"]["windows"] = [w[:-1] for w in manifest["probe"]["windows"]]
    (copy / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(ModelError, match=r"probe's windows have shape \[4, 7, "):
        load_artifact(copy)


# ------------------------------------------------- 8: the warning said once


@pytest.mark.data
def test_trained_on_warning_is_said_once(made, data_dir, capsys):
    path = data_file(data_dir, CTU_FILE)

    code, out, err = _eval(capsys, "--artifact", str(made[1]), "--data", str(path),
                           "--no-timing")

    assert code == 0, err
    assert (out + err).count("trained on this file") == 1, out + err
    assert "warning:" in out and "trained on this file" in out

    # With --json: in the JSON's warnings, and one line on stderr.
    code, out, err = _eval(capsys, "--artifact", str(made[1]), "--data", str(path),
                           "--no-timing", "--json")
    assert code == 0 and len(out["warnings"]) == 1, err
    assert err.count("trained on this file") == 1


def test_update_splits_the_old_data_with_the_checkpoints_seed(made, data_dir, tmp_path,
                                                               monkeypatch, capsys):
    """Found: ``teacher update`` split the teacher's own dataset with ``--seed``
    (default 0), not the seed it trained with: for a --seed 3 ctu-conn teacher
    about 82 % of the "old test" rows it scored before and after were rows it
    had trained on. The old data is split with the recorded seed now; the new
    data with --seed."""
    import teacher.data
    from teacher.cli import main

    ckpt, _, _ = made
    calls: list[tuple[str, int]] = []
    real = teacher.data.prepare

    def spy(source, *args, **kwargs):
        calls.append((str(source), kwargs.get("seed")))
        return real(source, *args, **kwargs)

    monkeypatch.setattr(teacher.data, "prepare", spy)
    new = data_file(
        data_dir, "zeek-conn/ctu-malware-botnet-230-1-njrat-first1000.conn.log.labeled")

    code = main(["update", "--checkpoint", str(ckpt), "--data", str(new),
                 "--out", str(tmp_path / "upd"), "--epochs", "1", "--batch-size", "64",
                 "--samples-per-epoch", "256", "--json", "-q",
                 "--data-dir", str(data_dir)])

    assert code == 0, capsys.readouterr().err
    assert ("ctu-conn", 3) in calls
    assert (str(new), 0) in calls
