"""Found by a fresh tester: teacher baselines on one class, update --old-data that
cannot be used, absurd network sizes, damaged checkpoints, and an early Ctrl-C.

Every input is a tiny NSL-KDD-format file the tests write themselves."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from teacher.cli import main


def kdd_rows(n: int = 300, attack_share: float = 0.4, seed: int = 0) -> str:
    """``n`` NSL-KDD rows (41 features, label, difficulty): benign http sessions
    and SYN-flood-like rows (neptune) with high error rates, easy to tell apart."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        bad = rng.random() < attack_share
        lo, hi = (0.8, 1.0) if bad else (0.0, 0.2)

        def rates(k: int, lo=lo, hi=hi) -> list[str]:
            return [f"{rng.uniform(lo, hi):.2f}" for _ in range(k)]

        if bad:
            head = ["0", "tcp", "private", "S0", "0", "0"]
        else:
            head = [str(rng.randint(0, 5)), "tcp", "http", "SF",
                    str(rng.randint(100, 2000)), str(rng.randint(100, 9000))]
        ints = [str(rng.randint(0, 3)) for _ in range(16)]
        counts = [str(rng.randint(1, 255)) for _ in range(2)]
        row = head + ints + counts + rates(7) + counts + rates(8)
        out.append(",".join([*row, "neptune" if bad else "normal", "20"]))
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("found")
    made = {
        "mixed": kdd_rows(300, 0.4, seed=1),
        "allnormal": kdd_rows(300, 0.0, seed=2),
        "allattack": kdd_rows(300, 1.0, seed=3),
    }
    paths = {}
    for name, text in made.items():
        paths[name] = folder / f"kdd_{name}.txt"
        paths[name].write_text(text)
    return paths


@pytest.fixture(scope="module")
def checkpoint(files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ck") / "teacher"
    code = main(["train", "--data", str(files["mixed"]), "--out", str(out),
                 "--epochs", "1", "--members", "1", "--conv-filters", "8",
                 "--lstm-hidden", "8", "--dense", "8", "--threads", "1",
                 "--samples-per-epoch", "128", "--replay-size", "50", "-q"])
    assert code == 0
    return out


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


# 1. teacher baselines ------------------------------------------------------------

@pytest.mark.parametrize("model", ["rf", "svm", "knn"])
def test_baselines_on_one_class_is_bad_input_as_in_train(files, model, capsys):
    """Found: rf ended in an IndexError, svm in "The number of classes has to be
    greater than one", knn alike (exit 1, tracebacks)."""
    capsys.readouterr()
    assert main(["baselines", "--data", str(files["allnormal"]), "--models", model,
                 "-q"]) == 3
    err = capsys.readouterr().err
    assert _errors(err) == [
        "error: kdd_allnormal.txt: its 240 labeled training rows are all benign "
        "(0); the baselines need both benign and malicious training rows"]
    assert "Traceback" not in err
    assert main(["baselines", "--data", str(files["allattack"]), "--models", model,
                 "-q"]) == 3
    assert "are all malicious (1); the baselines need both" in capsys.readouterr().err


def test_baselines_wording_is_train_s(files, tmp_path, capsys):
    """The same words as teacher train's for all-benign training rows."""
    assert main(["train", "--data", str(files["allnormal"]), "--out",
                 str(tmp_path / "ck"), "--epochs", "1", "--members", "1", "-q"]) == 3
    train = _errors(capsys.readouterr().err)[0]
    assert train.endswith("the teacher needs both benign and malicious training rows")
    assert train.split("; ")[0] == ("error: kdd_allnormal.txt: its 240 labeled "
                                    "training rows are all benign (0)")


@pytest.mark.parametrize("cap", ["1", "4"])
def test_knn_cap_below_k_is_a_usage_error_before_the_data(cap, files, capsys,
                                                           monkeypatch):
    """Found: --knn-cap 1 ended in "Expected n_neighbors <= n_samples_fit"."""
    import teacher.data

    def prepare(*a, **k):
        raise AssertionError("data read before the cap was checked")

    monkeypatch.setattr(teacher.data, "prepare", prepare)
    assert main(["baselines", "--data", str(files["mixed"]), "--models", "rf,knn",
                 "--knn-cap", cap, "-q"]) == 2
    assert _errors(capsys.readouterr().err) == [
        f"error: --knn-cap {cap}: expected at least 5, the neighbours kNN looks at "
        "(a smaller cap leaves it too few rows)"]


def test_knn_cap_of_k_is_fitted_on_k_rows(files, capsys):
    """A cap of k trains on k rows (the stratified shares rounded down to 4 are
    topped up) rather than failing inside scikit-learn."""
    assert main(["baselines", "--data", str(files["mixed"]), "--models", "knn",
                 "--knn-cap", "5", "--json", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["baselines"]["knn"]["train_rows"] == 5


def test_cap_is_topped_up_to_the_cap():
    from teacher.baselines import _cap

    rows = np.arange(100)
    y = rows % 2  # 50/50: round(2.5) twice gives 4
    picked = _cap(rows, y, 5, seed=0)
    assert len(picked) == 5 and len(set(picked)) == 5
    assert set(y[picked]) == {0, 1}


def test_run_baselines_refuses_one_class_and_a_small_knn_cap():
    from flows.errors import BadInputError, UsageError
    from teacher.baselines import run_baselines
    from tests.test_teacher_train import synthetic

    prep = synthetic(n=200)
    with pytest.raises(UsageError, match="--knn-cap 2"):
        run_baselines(prep, ("knn",), knn_cap=2, timing=False)
    prep.y[:] = 0
    with pytest.raises(BadInputError, match="all benign"):
        run_baselines(prep, ("rf",), timing=False)


# 2. teacher update --old-data ----------------------------------------------------

def _old_data_cases(folder: Path) -> dict[str, tuple[Path, str]]:
    garbage = folder / "garbage.txt"
    garbage.write_bytes(b"\x00\x01 this is no flow file \xff\n" * 3)
    unsw = folder / "unsw.csv"
    unsw.write_text("id,dur,proto,service,state,spkts,sbytes,rate,attack_cat,label\n"
                    + "".join(f"{i},0.1,udp,-,INT,2,496,9.0,Normal,0\n"
                              f"{i + 100},1.5,tcp,http,FIN,10,1000,6.6,Exploits,1\n"
                              for i in range(60)))
    nan = folder / "nan.txt"
    rows = [line.split(",") for line in kdd_rows(100, 0.4).splitlines()]
    for row in rows:
        row[24:31] = ["nan"] * 7
        row[33:41] = ["inf"] * 8
    nan.write_text("".join(",".join(row) + "\n" for row in rows))
    absent = folder / "absent.txt"
    return {
        "missing": (absent, f"error: --old-data {absent}: no such file (a registered "
                            "dataset name is taken too)"),
        "garbage": (garbage, f"error: {garbage}: unknown format (binary data)"),
        "family": (unsw, f"error: {unsw} holds 'unsw-nb15' records but the "
                         "checkpoint's encoder was fitted on 'nsl-kdd'"),
        "nan": (nan, f"error: {nan}, line 1, column 'serror_rate': expected a "
                     "finite number, found 'nan'"),
    }


@pytest.mark.parametrize("case", ["missing", "garbage", "family", "nan"])
def test_update_refuses_old_data_it_cannot_use_before_training(
    case, checkpoint, files, tmp_path, capsys, monkeypatch
):
    """Found: each only warned "old data ... not available; no forgetting check",
    trained and exited 0."""
    import teacher.update

    def update(*a, **k):
        raise AssertionError("trained despite unusable --old-data")

    monkeypatch.setattr(teacher.update, "update", update)
    old, line = _old_data_cases(tmp_path)[case]
    capsys.readouterr()
    code = main(["update", "--checkpoint", str(checkpoint), "--data",
                 str(files["mixed"]), "--old-data", str(old), "--out",
                 str(tmp_path / "u"), "--epochs", "1", "-q"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert len(_errors(err)) == 1 and _errors(err)[0].startswith(line), err
    assert "no forgetting check" not in err and "Traceback" not in err
    assert not (tmp_path / "u").exists()


def test_update_with_usable_old_data_still_reports_forgetting(checkpoint, files,
                                                              tmp_path, capsys):
    assert main(["update", "--checkpoint", str(checkpoint), "--data",
                 str(files["mixed"]), "--old-data", str(files["mixed"]),
                 "--out", str(tmp_path / "u"), "--epochs", "1",
                 "--samples-per-epoch", "64", "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["before"]["old_test_f1"] is not None


# 3. absurd network sizes ---------------------------------------------------------

@pytest.mark.parametrize("flags, named", [
    (["--conv-filters", "65536,65536"], "--conv-filters"),
    (["--lstm-hidden", "65536"], "--lstm-hidden"),
    (["--dense", "65536,65536", "--members", "64"], "--dense, --members"),
])
def test_a_network_too_large_is_a_usage_error_before_the_data(
    flags, named, files, tmp_path, capsys, monkeypatch
):
    """Found: exit 1 with "bad teacher config: ...", after the data was read."""
    import teacher.data

    def prepare(*a, **k):
        raise AssertionError("data read before the sizes were checked")

    monkeypatch.setattr(teacher.data, "prepare", prepare)
    assert main(["train", "--data", str(files["mixed"]), "--out",
                 str(tmp_path / "ck"), *flags, "-q"]) == 2
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1
    assert errors[0].startswith(f"error: network too large for {named}: at least ")
    assert "more than the 50,000,000 a teacher may have" in errors[0]
    assert not (tmp_path / "ck").exists()


def test_a_network_too_large_for_the_data_is_a_usage_error(files, tmp_path, capsys):
    """Sizes that pass with one feature but not with the data's: still exit 2."""
    from teacher.limits import MAX_PARAMS
    from teacher.model import TeacherConfig

    sizes = {"conv_filters": (20000,), "lstm_hidden": 1, "dense": (1,),
             "members": 64}
    # Under the limit with one feature, over it with the data's 46 or so.
    assert TeacherConfig(n_features=1, **sizes).estimated_params() < MAX_PARAMS
    code = main(["train", "--data", str(files["mixed"]), "--out",
                 str(tmp_path / "ck"), "--conv-filters", "20000", "--lstm-hidden",
                 "1", "--dense", "1", "--members", "64", "-q"])
    errors = _errors(capsys.readouterr().err)
    assert code == 2, errors
    assert errors[0].startswith("error: network too large for --conv-filters, "
                                "--lstm-hidden, --dense, --members: ")
    assert "at least" not in errors[0]


# 4. damaged checkpoints ----------------------------------------------------------

def _copy(checkpoint: Path, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    shutil.copytree(checkpoint, out)
    return out


def _nan_weights(checkpoint: Path, tmp_path: Path) -> Path:
    from safetensors.torch import load_file, save_file

    from teacher.checkpoint import write_checksums

    out = _copy(checkpoint, tmp_path, "nan-weights")
    state = load_file(str(out / "model.safetensors"))
    for value in state.values():
        if value.is_floating_point():
            value.fill_(float("nan"))
    save_file(state, str(out / "model.safetensors"))
    write_checksums(out)  # the checksums agree: only the weights are wrong
    return out


def test_nan_weights_name_the_checkpoint_in_eval(checkpoint, files, tmp_path,
                                                 capsys):
    """Found: "error: scores contain NaN" without naming the checkpoint."""
    bad = _nan_weights(checkpoint, tmp_path)
    code = main(["eval", "--checkpoint", str(bad), "--data", str(files["mixed"]),
                 "--no-timing", "-q"])
    errors = _errors(capsys.readouterr().err)
    assert code == 1
    assert errors == [
        f"error: checkpoint {bad}: its model scores NaN: the weights are damaged "
        "(model.safetensors holds NaN or infinite values in 'conv.0.0.bias')"]


def test_nan_weights_name_the_checkpoint_in_compress_run(checkpoint, files,
                                                         tmp_path, capsys):
    from compress.cli import main as compress_main

    bad = _nan_weights(checkpoint, tmp_path)
    code = compress_main(["run", "--teacher", str(bad), "--data",
                          str(files["mixed"]), "--target", "torch-int8",
                          "--out", str(tmp_path / "art"), "-q"])
    errors = _errors(capsys.readouterr().err)
    assert code == 1
    assert errors[0].startswith(f"error: checkpoint {bad}: its model scores NaN: "
                                "the weights are damaged")


def test_scores_that_turn_nan_name_the_checkpoint(checkpoint, files):
    """Weights that load finite but score NaN (an overflow): evaluate names the
    checkpoint too."""
    import torch

    from flows.errors import ModelError
    from teacher.checkpoint import load_teacher
    from teacher.data import prepare
    from teacher.evaluate import evaluate

    teacher = load_teacher(checkpoint, device="cpu")
    prep = prepare(str(files["mixed"]), encoder=teacher.encoder)
    with torch.no_grad():
        for p in teacher.model.parameters():
            p.fill_(float("nan"))
    with pytest.raises(ModelError, match=f"^checkpoint {checkpoint}: its model "
                                         "scores NaN: the weights are damaged"):
        evaluate(teacher, prep, prep.rows(), timing=False)


def test_an_encoder_of_another_shape_is_refused_at_load(checkpoint, files,
                                                        tmp_path, capsys):
    """Found: another checkpoint's encoder.json loaded without complaint and the
    run failed later on a tensor shape."""
    from teacher.checkpoint import write_checksums

    bad = _copy(checkpoint, tmp_path, "mixed")
    encoder = json.loads((bad / "encoder.json").read_text())
    encoder["window"] = 4
    (bad / "encoder.json").write_text(json.dumps(encoder))
    write_checksums(bad)
    config = json.loads((bad / "config.json").read_text())
    code = main(["eval", "--checkpoint", str(bad), "--data", str(files["mixed"]),
                 "--no-timing", "-q"])
    errors = _errors(capsys.readouterr().err)
    assert code == 1
    f = config["n_features"]
    assert errors == [
        f"error: checkpoint {bad}: encoder.json does not fit config.json: the "
        f"encoder makes windows of 4 x {f} features (window x n_features), the "
        f"network takes 1 x {f}; the checkpoint is damaged or its files come from "
        "different checkpoints"]


# 5. Ctrl-C early -----------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent

# Runs an entry point in a fresh Python that sends itself SIGINT the moment a
# given module starts to be imported: a Ctrl-C at exactly that point, no timing.
INTERRUPT_AT = """
import os, signal, sys

# As from a terminal: a suite run in the background inherits SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)

class Hook:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, Hook())
from {package}.cli import main
sys.exit(main({argv!r}))
"""


def _interrupted_at(module: str, package: str, argv: list[str]):
    import subprocess
    import sys

    code = INTERRUPT_AT.format(module=module, package=package, argv=argv)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, text=True,
                          capture_output=True, timeout=120)


def test_ctrl_c_while_teacher_cli_loads_is_one_line_and_130(tmp_path):
    """Found: a Ctrl-C in the first second of teacher train printed a traceback
    ending in KeyboardInterrupt (numpy loading, outside main)."""
    done = _interrupted_at("flows.encoder", "teacher",
                           ["train", "--data", "x.txt", "--out", str(tmp_path / "o")])
    assert (done.returncode, done.stderr) == (130, "error: interrupted\n")


def test_ctrl_c_while_compress_loads_numpy_is_not_lost(tmp_path):
    """Found: a Ctrl-C while compress run loaded numpy (inside torch's own import
    of it, which clears the error) was lost, and the run died later on "module
    'numpy' has no attribute 'nonzero'"."""
    done = _interrupted_at("numpy", "compress",
                           ["run", "--teacher", str(tmp_path / "absent"),
                            "--data", "x.txt", "--target", "torch-int8",
                            "--out", str(tmp_path / "o"), "-q"])
    assert (done.returncode, done.stderr) == (130, "error: interrupted\n")


@pytest.mark.parametrize("package", ["teacher", "compress"])
def test_ctrl_c_while_the_parser_is_built_is_one_line_and_130(package, capsys,
                                                               monkeypatch):
    import importlib

    cli = importlib.import_module(f"{package}.cli")

    def build_parser():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", build_parser)
    try:
        code = cli.main(["--help"])
    except KeyboardInterrupt:  # not let through to pytest, which would stop
        pytest.fail("a KeyboardInterrupt escaped main")
    assert code == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_held_notes_a_ctrl_c_and_raises_it_after_the_block(interactive_sigint):
    import os
    import signal

    from teacher.interrupts import held

    ran = []
    with pytest.raises(KeyboardInterrupt):
        with held():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # bytecodes where the handler runs
                ran.append(1)
    assert len(ran) == 1000
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with held():  # no Ctrl-C: nothing raised
        pass
