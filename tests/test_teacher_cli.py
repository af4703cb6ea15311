"""The teacher command end to end on small NSL-KDD slices, and its error exits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from teacher.cli import build_parser, main

KEYS = {"accuracy", "precision", "recall", "f1", "roc_auc", "fpr", "confusion",
        "per_family_recall", "latency_us_p50", "latency_us_p99",
        "throughput_flows_s"}


@pytest.fixture(scope="module")
def checkpoint(slices, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ck") / "teacher"
    code = main(["train", "--data", str(slices[0]), "--out", str(out), "--epochs", "2",
                 "--batch-size", "64", "--conv-filters", "16", "--lstm-hidden", "16",
                 "--dense", "16", "--threads", "1", "--replay-size", "200",
                 "--samples-per-epoch", "640", "-q"])
    assert code == 0
    return out


def test_train_writes_a_full_checkpoint(checkpoint):
    import hashlib

    names = {p.name for p in checkpoint.iterdir()}
    assert {"model.safetensors", "config.json", "encoder.json", "threshold.json",
            "history.json", "metrics.json", "provenance.json",
            "replay.safetensors", "checksums.json"} <= names
    # The replay buffer, written after the rest, is covered by the checksums too.
    sums = json.loads((checkpoint / "checksums.json").read_text())["files"]
    replay = (checkpoint / "replay.safetensors").read_bytes()
    assert sums["replay.safetensors"] == hashlib.sha256(replay).hexdigest()
    threshold = json.loads((checkpoint / "threshold.json").read_text())
    assert threshold["chosen_on"] == "val" and threshold["rule"] == "best-f1"
    history = json.loads((checkpoint / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    prov = json.loads((checkpoint / "provenance.json").read_text())
    assert prov["seed"] == 0 and len(next(iter(prov["files"].values()))) == 64
    assert prov["held_out_types"]  # nsl-kdd holds out attack types for val
    # One type held out in this slice: no division of them to score (the measure
    # itself: tests/test_teacher_metrics.py, with a baseline: test_baselines.py).
    assert prov["held_out_types"] == ["ipsweep"]
    assert "val_split" not in json.loads((checkpoint / "metrics.json").read_text())
    # The nsl-kdd defaults: quantile features, input noise 0.05 (round 4), made-up
    # anomalies in 10 % of each batch, 30 % of their features swapped (round 10).
    assert prov["train_config"]["input_noise"] == 0.05
    assert prov["train_config"]["outliers"] == 0.1
    assert prov["train_config"]["outlier_swap"] == 0.3
    assert json.loads((checkpoint / "encoder.json").read_text())["scaling"] == \
        "quantile"


def test_eval_json_matches_an_independent_recount(checkpoint, slices, capsys):
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(slices[1]),
                 "--json", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert KEYS <= set(out)
    assert out["latency_us_p50"] > 0 and out["throughput_flows_s"] > 0

    # Recount with the loaded teacher and the reader, outside the CLI.
    from flows.readers import read
    from flows.record import table_to_columns
    from flows.windows import gather_windows, window_index_for
    from teacher.checkpoint import load_teacher

    teacher = load_teacher(checkpoint, device="cpu")
    cols = table_to_columns(read(str(slices[1])).table)
    X = teacher.encoder.transform(cols)
    prob = teacher.predict_proba(gather_windows(X, window_index_for(cols,
                                                                    teacher.encoder)))
    y = np.asarray(cols["label"]).astype(int)
    pred = prob >= teacher.threshold
    assert out["confusion"] == {
        "tn": int((~pred & (y == 0)).sum()), "fp": int((pred & (y == 0)).sum()),
        "fn": int((~pred & (y == 1)).sum()), "tp": int((pred & (y == 1)).sum())}
    assert out["accuracy"] == pytest.approx((pred == y).mean())


def test_update_reports_old_and_new_f1(checkpoint, slices, tmp_path, capsys):
    capsys.readouterr()
    out_dir = tmp_path / "updated"
    assert main(["update", "--checkpoint", str(checkpoint), "--data", str(slices[1]),
                 "--old-data", str(slices[0]), "--out", str(out_dir), "--epochs", "1",
                 "--batch-size", "64", "--samples-per-epoch", "640", "--json",
                 "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    for when in ("before", "after"):
        assert 0.0 <= report[when]["old_test_f1"] <= 1.0
        assert 0.0 <= report[when]["new_test_f1"] <= 1.0
    assert report["replayed_rows"] == report["replay_size"] == 200
    assert (out_dir / "model.safetensors").is_file()
    # Counted as teacher train counts them: --epochs 1 reads 1, per member.
    members = json.loads((checkpoint / "config.json").read_text()).get("members", 1)
    assert (report["epochs"], report["members"]) == (1, members)
    assert report["epochs_all_members"] == members


def test_baselines_and_tune(slices, tmp_path, capsys):
    capsys.readouterr()
    assert main(["baselines", "--data", str(slices[0]), "--models", "rf,svm,knn",
                 "--svm-cap", "300", "--json", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["baselines"]) == {"rf", "svm", "knn"}
    assert out["baselines"]["svm"]["train_rows"] <= 300
    assert out["baselines"]["svm"]["cap"] == 300
    assert KEYS <= set(out["baselines"]["rf"])

    assert main(["tune", "--data", str(slices[0]), "--budget", "0.01",
                 "--out", str(tmp_path / "tune"), "--lrs", "0.001",
                 "--conv-layers", "1", "--filters", "8", "--batch-sizes", "64",
                 "--trial-epochs", "1", "--trial-samples", "256", "-q"]) == 0
    rows = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert len(rows) == 1 and rows[0]["rank"] == 1
    assert (tmp_path / "tune" / "tune.md").read_text().startswith("| rank")


def test_error_exits(tmp_path, capsys, checkpoint):
    assert main([]) == 2
    assert main(["train", "--out", str(tmp_path)]) == 2  # no data source
    assert main(["train", "--data", str(tmp_path / "absent.txt"),
                 "--out", str(tmp_path / "x"), "-q"]) == 3
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\x00\x01 this is no flow file \xff\n" * 3)
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(bad),
                 "-q"]) == 3
    assert main(["eval", "--checkpoint", str(tmp_path / "none"), "--data",
                 str(bad), "-q"]) == 1
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_a_missing_data_file_is_bad_input_and_an_unknown_dataset_usage(
    checkpoint, tmp_path, capsys
):
    """Found: a --data file that does not exist exited 2 (usage), while every
    other tool calls a missing input file bad input (3: nothing usable read)."""
    absent = tmp_path / "absent.txt"
    line = (f"error: --data {absent}: no such file (a registered dataset name "
            "goes with --dataset)")
    for argv in (
        ["train", "--data", str(absent), "--out", str(tmp_path / "x")],
        ["eval", "--checkpoint", str(checkpoint), "--data", str(absent)],
        ["baselines", "--data", str(absent)],
        ["tune", "--data", str(absent), "--budget", "1"],
        ["update", "--checkpoint", str(checkpoint), "--data", str(absent),
         "--out", str(tmp_path / "u")],
    ):
        assert main([*argv, "-q"]) == 3, argv
        if argv[0] == "update":  # no --dataset there: the names --data takes
            line = (f"error: --data {absent}: no such file (nor a registered "
                    "dataset name: ctu-conn, nsl-kdd, nsl-kdd-20, unsw-nb15)")
        assert _errors(capsys.readouterr().err) == [line], argv
    assert not (tmp_path / "x").exists() and not (tmp_path / "u").exists()
    # A name that is no dataset, given as one, is a usage error as before.
    assert main(["train", "--dataset", "nsl-kd", "--out", str(tmp_path / "x"),
                 "-q"]) == 2
    assert _errors(capsys.readouterr().err) == [
        "error: 'nsl-kd' is neither a dataset name (ctu-conn, nsl-kdd, nsl-kdd-20, "
        "unsw-nb15) nor an existing file"]


def test_parser_lists_the_subcommands():
    text = build_parser().format_help()
    for name in ("train", "eval", "baselines", "tune", "update"):
        assert name in text


def test_single_class_training_data_exits_3(slices, tmp_path, capsys):
    lines = slices[0].read_text().splitlines(keepends=True)
    normal = [ln for ln in lines if ln.split(",")[41] == "normal"]
    assert 100 < len(normal) < len(lines)
    only = tmp_path / "only-normal.txt"
    only.write_text("".join(normal))
    capsys.readouterr()
    assert main(["train", "--data", str(only), "--out", str(tmp_path / "ck"),
                 "--epochs", "1", "--members", "1", "-q"]) == 3
    err = capsys.readouterr().err
    assert "only-normal.txt" in err and "all benign" in err
    assert "Traceback" not in err
    assert not (tmp_path / "ck").exists()


def test_relative_data_path_is_recorded_resolved(slices, tmp_path, monkeypatch):
    monkeypatch.chdir(slices[0].parent)
    out = tmp_path / "ck"
    assert main(["train", "--data", slices[0].name, "--out", str(out), "--epochs",
                 "1", "--members", "1", "--conv-filters", "8", "--lstm-hidden", "8",
                 "--dense", "8", "--samples-per-epoch", "256", "--replay-size", "0",
                 "-q"]) == 0
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["dataset"] == str(slices[0].resolve())
    assert list(prov["files"]) == [str(slices[0].resolve())]
    # From another directory, the recorded data is found again (as compress does).
    monkeypatch.chdir(tmp_path)
    from teacher.checkpoint import load_teacher
    from teacher.data import prepare

    teacher = load_teacher(out, device="cpu")
    prep = prepare(prov["dataset"], encoder=teacher.encoder, need_split=True)
    assert len(prep.X) == 1000


def test_every_teacher_option_has_help():
    import argparse

    parser = build_parser()
    sub = next(a for a in parser._actions
               if isinstance(a, argparse._SubParsersAction))
    missing = [(name, opt.option_strings)
               for name in ("train", "eval", "baselines", "tune", "update")
               for opt in sub.choices[name]._actions
               if opt.option_strings and not opt.help]
    assert missing == []



def test_bins_and_subspace_from_the_command_line(slices, tmp_path, capsys):
    from teacher.checkpoint import load_teacher

    small = ["--epochs", "1", "--batch-size", "64", "--conv-filters", "8",
             "--lstm-hidden", "8", "--dense", "8", "--members", "2",
             "--samples-per-epoch", "256", "--replay-size", "0", "-q"]
    code = main(["train", "--data", str(slices[0]), "--out", str(tmp_path / "m"),
                 "--bins", "8", "--scaling", "minmax", *small])
    err = capsys.readouterr().err
    assert code == 2 and "--bins needs quantile-scaled columns" in err

    code = main(["train", "--data", str(slices[0]), "--out", str(tmp_path / "q"),
                 "--bins", "4", "--subspace", "0.5", "--scaling", "quantile", *small])
    out, err = capsys.readouterr()
    assert code == 0, err
    # Found: "--epochs 1" with two members reported "epochs": 2 (their sum).
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["epochs"], summary["members"]) == (1, 2)
    assert summary["epochs_all_members"] == 2
    teacher = load_teacher(tmp_path / "q", device="cpu")
    assert teacher.config.bins == 4
    assert list(teacher.config.binned) == teacher.encoder.quantile_columns
    masks = [m.feature_mask for m in teacher.model.members]
    assert all(int(m.sum()) == round(0.5 * teacher.config.n_features) for m in masks)
    assert not np.array_equal(masks[0].numpy(), masks[1].numpy())


def test_schedule_keep_and_stop_rows_from_the_command_line(slices, tmp_path, capsys):
    out = tmp_path / "cos"
    code = main(["train", "--data", str(slices[0]), "--out", str(out), "--epochs", "3",
                 "--patience", "1", "--batch-size", "64", "--conv-filters", "8",
                 "--lstm-hidden", "8", "--dense", "8", "--members", "1",
                 "--samples-per-epoch", "256", "--replay-size", "0", "-q",
                 "--schedule", "cosine", "--keep", "last", "--stop-rows", "seen"])
    assert code == 0, capsys.readouterr().err
    used = json.loads((out / "provenance.json").read_text())["train_config"]
    assert (used["schedule"], used["keep"], used["stop_rows"]) == (
        "cosine", "last", "seen")
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 3  # keep=last runs every epoch whatever patience says
    assert history[-1]["lr"] == pytest.approx(0, abs=1e-12)

    code = main(["train", "--data", str(slices[0]), "--out", str(tmp_path / "x"),
                 "--schedule", "step"])
    assert code == 2 and "invalid choice" in capsys.readouterr().err


def test_damaged_data_is_used_up_to_the_damage_and_exits_4(checkpoint, slices,
                                                            tmp_path, capsys):
    text = slices[1].read_text()
    cut = tmp_path / "cut.txt"
    cut.write_text(text[: text.rindex("\n", 0, len(text) - 1) + 30])  # last line cut
    whole_rows = text.count("\n") - 1

    capsys.readouterr()
    code = main(["eval", "--checkpoint", str(checkpoint), "--data", str(cut),
                 "--json", "--no-timing", "-q"])

    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert code == 4  # EXIT_PARTIAL_INPUT, after the metrics were printed
    assert sum(out["confusion"].values()) == whole_rows
    assert any("cut short" in w for w in out["warnings"])
    assert "Traceback" not in captured.err


# ------------------------------------------------- flags and outputs checked up front

def _no_prepare(monkeypatch):
    """Fail the test if a command gets as far as loading its data."""
    def prepare(*a, **k):
        raise AssertionError("data loaded before the flags were checked")
    monkeypatch.setattr("teacher.data.prepare", prepare)


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu0", "cuda"])
def test_bad_device_is_a_usage_error_before_the_data_loads(device, slices, tmp_path,
                                                           capsys, monkeypatch,
                                                           checkpoint):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _no_prepare(monkeypatch)
    capsys.readouterr()
    assert main(["train", "--data", str(slices[0]), "--out", str(tmp_path / "x"),
                 "--device", device, "-q"]) == 2
    assert main(["update", "--checkpoint", str(checkpoint), "--data",
                 str(slices[1]), "--out", str(tmp_path / "y"), "--device", device,
                 "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: --device") == 2 and "Traceback" not in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cuda_index_past_the_devices_is_refused(slices, tmp_path, capsys,
                                                monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    _no_prepare(monkeypatch)
    assert main(["train", "--data", str(slices[0]), "--out", str(tmp_path / "x"),
                 "--device", "cuda:1", "-q"]) == 2
    assert "only 1 CUDA device" in capsys.readouterr().err


def test_baselines_out_folder_is_refused_before_the_models_run(slices, tmp_path,
                                                               capsys, monkeypatch):
    def run_baselines(*a, **k):
        raise AssertionError("baselines ran before --out was checked")
    monkeypatch.setattr("teacher.baselines.run_baselines", run_baselines)
    assert main(["baselines", "--data", str(slices[0]), "--models", "rf",
                 "--json", "--out", str(tmp_path), "-q"]) == 2
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["baselines", "--data", str(slices[0]), "--models", "rf",
                 "--out", str(blocker / "b.json"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: --out") == 2 and "Traceback" not in err


def test_baselines_results_survive_a_failed_write(slices, tmp_path, capsys,
                                                  monkeypatch):
    out = tmp_path / "b.json"

    def run_baselines(*a, **k):
        out.mkdir()  # the path turns into a folder while the models run
        return {"rf": {"f1": 0.5}}
    monkeypatch.setattr("teacher.baselines.run_baselines", run_baselines)
    capsys.readouterr()
    assert main(["baselines", "--data", str(slices[0]), "--models", "rf",
                 "--json", "--out", str(out), "-q"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["baselines"] == {"rf": {"f1": 0.5}}
    assert captured.err.startswith("error: --out") and "Traceback" not in captured.err


def test_tune_out_file_is_refused_before_the_grid(slices, tmp_path, capsys,
                                                  monkeypatch):
    def tune(*a, **k):
        raise AssertionError("the grid ran before --out was checked")
    monkeypatch.setattr("teacher.tune.tune", tune)
    _no_prepare(monkeypatch)
    existing = tmp_path / "passwd"
    existing.write_text("root:x:0:0\n")
    assert main(["tune", "--data", str(slices[0]), "--budget", "0.1",
                 "--out", str(existing), "-q"]) == 2
    err = capsys.readouterr().err
    assert "error: --out" in err and "not a folder" in err
    assert "Traceback" not in err
    assert existing.read_text() == "root:x:0:0\n"


def test_tune_rows_survive_a_failed_write(slices, tmp_path, capsys, monkeypatch):
    out = tmp_path / "tune"
    rows = [{"rank": 1, "val_f1": 0.9, "val_loss": 0.1}]

    def tune(*a, **k):
        out.write_text("taken")  # a file appears where the folder was to go
        return rows
    monkeypatch.setattr("teacher.tune.tune", tune)
    capsys.readouterr()
    assert main(["tune", "--data", str(slices[0]), "--budget", "0.1",
                 "--out", str(out), "-q"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["rows"] == rows
    assert captured.err.startswith("error: --out") and "Traceback" not in captured.err


def test_baselines_out_file_already_there_needs_force(slices, tmp_path, capsys,
                                                     monkeypatch):
    """Found: ``teacher baselines --out FILE`` overwrote an existing FILE without a
    word; now refused before the models run (exit 2) unless --force, as
    ``teacher train --out`` refuses a folder that holds something."""
    ran = []

    def run_baselines(*a, **k):
        ran.append(1)
        return {"rf": {"f1": 0.5}}
    monkeypatch.setattr("teacher.baselines.run_baselines", run_baselines)
    out = tmp_path / "b.json"
    out.write_text("earlier results\n")
    argv = ["baselines", "--data", str(slices[0]), "--models", "rf", "--json",
            "--out", str(out), "-q"]
    capsys.readouterr()

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --out {out} already exists; pass --force to overwrite "
                   "it, or name a new file\n")
    assert ran == [] and out.read_text() == "earlier results\n"

    assert main([*argv, "--force"]) == 0
    assert ran == [1]
    assert json.loads(out.read_text())["baselines"] == {"rf": {"f1": 0.5}}


def test_baselines_out_file_made_while_the_models_ran_is_kept(slices, tmp_path,
                                                              capsys, monkeypatch):
    out = tmp_path / "b.json"

    def run_baselines(*a, **k):
        out.write_text("someone else's\n")  # appears while the models run
        return {"rf": {"f1": 0.5}}
    monkeypatch.setattr("teacher.baselines.run_baselines", run_baselines)
    capsys.readouterr()
    assert main(["baselines", "--data", str(slices[0]), "--models", "rf",
                 "--json", "--out", str(out), "-q"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["baselines"] == {"rf": {"f1": 0.5}}
    assert captured.err.startswith(f"error: --out {out}: a file appeared there")
    assert out.read_text() == "someone else's\n"


def test_tune_out_tables_already_there_need_force(slices, tmp_path, capsys,
                                                  monkeypatch):
    """Found: ``teacher tune`` wrote its tables over an earlier run's in --out
    (runs/tune by default) without a word; now refused before the grid (exit 2)
    unless --force."""
    rows = [{"rank": 1, "val_f1": 0.9, "val_loss": 0.1}]
    ran = []

    def tune(*a, **k):
        ran.append(1)
        return rows
    monkeypatch.setattr("teacher.tune.tune", tune)
    out = tmp_path / "tune"
    out.mkdir()
    (out / "tune.md").write_text("| an earlier grid |\n")
    (out / "notes.txt").write_text("mine\n")  # not a table: no reason to refuse
    argv = ["tune", "--data", str(slices[0]), "--budget", "0.1", "--out", str(out),
            "-q"]
    capsys.readouterr()

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --out {out} already holds tune.md (an earlier tuning); "
                   "pass --force to overwrite them, or name a new folder\n")
    assert ran == [] and (out / "tune.md").read_text() == "| an earlier grid |\n"

    assert main([*argv, "--force"]) == 0
    assert ran == [1] and json.loads((out / "tune.json").read_text()) == rows
    assert (out / "notes.txt").read_text() == "mine\n"

    # A folder holding other files only is used as before.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine\n")
    assert main([*argv[:-3], "--out", str(other), "-q"]) == 0


def test_sizes_with_init_from_and_an_update_in_place_are_refused(checkpoint, slices,
                                                                  tmp_path, capsys):
    # Found: --init-from silently kept the pretrained sizes over --lstm-hidden and
    # --members; an update written over its own checkpoint replaced it, and its
    # provenance then named the update batch as the teacher's data.
    code = main(["train", "--data", str(slices[1]), "--out", str(tmp_path / "ft"),
                 "--init-from", str(checkpoint), "--lstm-hidden", "32",
                 "--members", "1", "-q"])
    errors = [ln for ln in capsys.readouterr().err.splitlines()
              if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1
    assert "--lstm-hidden, --members cannot be used with --init-from" in errors[0]
    assert not (tmp_path / "ft").exists()

    before = {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()}
    code = main(["update", "--checkpoint", str(checkpoint), "--data",
                 str(slices[1]), "--out", str(checkpoint) + "/", "-q"])
    errors = [ln for ln in capsys.readouterr().err.splitlines()
              if ln.startswith("error:")]
    assert code == 2 and "is the checkpoint being updated" in errors[0]
    after = {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()}
    assert after == before


@pytest.mark.parametrize("models", ["", " , ", "rf,xgb"])
def test_baselines_models_are_checked_before_the_data(models, tmp_path, capsys):
    # Found: --models "" ran nothing and exited 0 with "baselines: {}".
    missing = tmp_path / "never-read.log"
    code = main(["baselines", "--data", str(missing), "--models", models])
    errors = [ln for ln in capsys.readouterr().err.splitlines()
              if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1
    assert "expected a comma-separated list of rf, svm, knn" in errors[0]


def test_a_file_given_as_the_checkpoint_is_named_as_a_file(slices, tmp_path, capsys):
    # Found: "checkpoint folder not found" for a path that exists as a file.
    code = main(["eval", "--checkpoint", str(slices[0]), "--data", str(slices[1])])
    errors = [ln for ln in capsys.readouterr().err.splitlines()
              if ln.startswith("error:")]
    assert code == 1
    assert errors == [f"error: checkpoint {slices[0]} is a file, not a checkpoint "
                      "folder"]


def test_train_on_tiny_data_warns_that_its_metrics_say_little(
    slices, tmp_path, caplog
):
    """Found: 28 rows trained to val and test F1 1.0 without a word about the
    handful of rows behind them."""
    rows = slices[0].read_text().splitlines(keepends=True)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("".join(rows[:120]))  # 80/10/10: about 12 val and test rows
    out = tmp_path / "teacher"

    with caplog.at_level("WARNING", logger="gatewatch.teacher"):
        code = main(["train", "--data", str(tiny), "--out", str(out), "--epochs",
                     "1", "--batch-size", "16", "--conv-filters", "8",
                     "--lstm-hidden", "8", "--dense", "8", "--threads", "1",
                     "--members", "1", "-q"])

    err = caplog.text
    assert code == 0, err
    for split in ("val", "test"):
        assert f"the {split} split holds only " in err
    assert "its metrics are not a reliable estimate" in err



# ------------------------------------------- outputs that could not be written, late

@pytest.mark.parametrize("name", ["tune.json", "tune.csv", "tune.md"])
def test_tune_table_that_cannot_be_written_is_refused_before_the_grid(
        name, slices, tmp_path, capsys, monkeypatch):
    """Found: ``teacher tune --out DIR --force`` with DIR/tune.json a folder ran
    every trial, then ended "cannot write the tuning table (Is a directory)",
    exit 1. A table path that cannot be written is refused before the data loads
    and the grid runs (exit 2), --force or not."""
    ran = []
    monkeypatch.setattr("teacher.tune.tune", lambda *a, **k: ran.append(1))
    _no_prepare(monkeypatch)
    out = tmp_path / "tune3"
    (out / name).mkdir(parents=True)
    argv = ["tune", "--data", str(slices[0]), "--budget", "0.1", "--out", str(out),
            "-q"]
    capsys.readouterr()

    for flags in (["--force"], []):
        assert main([*argv, *flags]) == 2
        err = capsys.readouterr().err
        assert err == (f"error: --out {out}: {name} there is a folder, so the "
                       "tuning table could not be written; remove it or name "
                       "another folder\n")
    assert ran == [] and sorted(p.name for p in out.iterdir()) == [name]

    # A link to a table in a folder that is not there: refused alike.
    link_out = tmp_path / "linked"
    link_out.mkdir()
    (link_out / name).symlink_to(tmp_path / "gone" / name)
    assert main([*argv[:-3], "--out", str(link_out), "--force", "-q"]) == 2
    assert f"{name} there is a link into {tmp_path / 'gone'}" in \
        capsys.readouterr().err
    assert ran == []


def test_tune_out_check_leaves_nothing_behind(slices, tmp_path, capsys,
                                             monkeypatch):
    """The up-front check of the tables only looks: when the grid starts, a new
    --out folder has not been made and holds no probe files; the tables come at
    the end. With a table path that is a folder, the same run is refused."""
    out = tmp_path / "new" / "tune"
    seen = []

    def tune(*a, **k):
        seen.append(out.parent.exists())
        return [{"rank": 1, "val_f1": 0.9, "val_loss": 0.1}]
    monkeypatch.setattr("teacher.tune.tune", tune)
    argv = ["tune", "--data", str(slices[0]), "--budget", "0.1", "--out", str(out),
            "--force", "-q"]

    assert main(argv) == 0
    assert seen == [False]
    assert sorted(p.name for p in out.iterdir()) == ["tune.csv", "tune.json",
                                                      "tune.md"]
    (out / "tune.json").unlink()
    (out / "tune.json").mkdir()
    assert main(argv) == 2 and seen == [False]


def test_baselines_out_that_names_a_folder_is_refused_before_the_models(
        slices, tmp_path, capsys, monkeypatch):
    """Found with tune's: ``baselines --out b.json/`` (a name ending in /) and
    ``--out LINK --force`` (a link into a folder that is not there) ran every
    model, then could not write (exit 1). Now refused before the models, exit
    2."""
    def run_baselines(*a, **k):
        raise AssertionError("baselines ran before --out was checked")
    monkeypatch.setattr("teacher.baselines.run_baselines", run_baselines)
    argv = ["baselines", "--data", str(slices[0]), "--models", "rf", "-q", "--out"]
    capsys.readouterr()

    slashed = f"{tmp_path / 'b.json'}/"
    assert main([*argv, slashed]) == 2
    assert capsys.readouterr().err == (f"error: --out {slashed} names a folder, not "
                                       "a file; name a file to write\n")
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "gone" / "b.json")
    assert main([*argv, str(link), "--force"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --out {link} is a link into {tmp_path / 'gone'}, which "
                   "is not a folder here\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json"]


# --------------------------------------------------------- baselines as text

def test_baselines_text_output_is_a_table(slices, capsys, monkeypatch):
    """Found: without --json, ``teacher baselines`` printed its results as a raw
    Python dict. Now a table, one line per model, a value a model did not report
    shown as "-"."""
    results = {
        "rf": {"train_rows": 1234, "accuracy": 0.99, "precision": 1.0,
               "recall": 0.97959, "f1": 0.98969, "roc_auc": 0.9992, "fpr": 0.0,
               "latency_us_p50": 7372.24, "latency_us_p99": 10551.45,
               "confusion": {"tn": 51, "fp": 0, "fn": 1, "tp": 48}},
        "svm": {"train_rows": 300, "accuracy": 0.5, "precision": 0.0,
                "recall": 0.0, "f1": 0.0, "roc_auc": None, "fpr": 0.0},
    }
    monkeypatch.setattr("teacher.baselines.run_baselines",
                        lambda *a, **k: results)
    capsys.readouterr()

    assert main(["baselines", "--data", str(slices[0]), "--models", "rf,svm",
                 "-q"]) == 0
    out = capsys.readouterr().out
    assert "{" not in out
    lines = out.splitlines()
    assert lines[:2] == ["data: first.txt", "window: 1"]
    assert "held_out_types: ipsweep" in lines
    table = lines[lines.index("test split:") + 1:]
    assert [line.split("  ")[0].strip() for line in table] == ["model", "rf", "svm"]
    assert table[0].split() == ["model", "train", "rows", "accuracy", "precision",
                                "recall", "F1", "ROC", "AUC", "FPR", "p50", "µs",
                                "p99", "µs"]
    assert table[1].split() == ["rf", "1,234", "0.9900", "1.0000", "0.9796",
                                "0.9897", "0.9992", "0.0000", "7,372", "10,551"]
    assert table[2].split() == ["svm", "300", "0.5000", "0.0000", "0.0000",
                                "0.0000", "-", "0.0000", "-", "-"]
    # Every line as wide as the heading: the columns line up.
    assert len({len(line) for line in table}) == 1


# ----------------------------------------------- Ctrl-C once the run has finished

TINY_TRAIN = ["--epochs", "1", "--batch-size", "64", "--conv-filters", "8",
              "--lstm-hidden", "8", "--dense", "8", "--threads", "1", "--members",
              "1", "--replay-size", "50", "--samples-per-epoch", "200", "-q"]


def _interrupt_after_the_checkpoint(monkeypatch, times: int) -> None:
    """Send this process SIGINT ``times`` times from a closing step of
    ``teacher train`` (after the checkpoint is written, before the summary)."""
    import os
    import signal

    def warn(prep):
        for _ in range(times):
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr("teacher.cli._warn_small_splits", warn)


def test_ctrl_c_after_the_checkpoint_is_written_keeps_the_run_finished(
        slices, tmp_path, capsys, monkeypatch, interactive_sigint):
    """Found: Ctrl-C just after ``teacher train`` had written its checkpoint gave
    exit 130, although the checkpoint was in place and complete. Now the closing
    steps go on (the summary is printed), a note says so, and the run exits 0."""
    import signal

    from teacher.checkpoint import load_teacher

    _interrupt_after_the_checkpoint(monkeypatch, times=1)
    out = tmp_path / "teacher"
    capsys.readouterr()

    code = main(["train", "--data", str(slices[0]), "--out", str(out),
                 *TINY_TRAIN])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["checkpoint"] == str(out)
    assert captured.err == (f"note: interrupted after the checkpoint {out} was "
                            "written; it is complete and the run has finished\n")
    assert load_teacher(out).threshold is not None  # checksums verified
    # Ctrl-C is Python's own again once the command has returned.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_second_ctrl_c_after_the_checkpoint_stops_saying_it_is_complete(
        slices, tmp_path, capsys, monkeypatch):
    """A second Ctrl-C stops the closing steps (exit 130), and the error line
    says that the checkpoint was written and is complete."""
    from teacher.checkpoint import load_teacher

    _interrupt_after_the_checkpoint(monkeypatch, times=2)
    out = tmp_path / "teacher"
    capsys.readouterr()

    code = main(["train", "--data", str(slices[0]), "--out", str(out),
                 *TINY_TRAIN])

    captured = capsys.readouterr()
    assert code == 130 and captured.out == ""
    assert captured.err == (f"error: interrupted after the checkpoint {out} was "
                            "written (it is complete)\n")
    assert load_teacher(out).threshold is not None


def test_ctrl_c_while_python_tears_down_after_train_is_no_failure(slices,
                                                                  tmp_path):
    """The reported case end to end: ``teacher train`` as its own process, SIGINT
    just after its summary line. Python's teardown with torch loaded lasts about
    a second and a half here, and a Ctrl-C in it killed the finished run (130 to
    the shell); now it exits 0."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "teacher"
    proc = subprocess.Popen(
        [sys.executable, "-m", "teacher.cli", "train", "--data", str(slices[0]),
         "--out", str(out), *TINY_TRAIN],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parent.parent)
    try:
        line = proc.stdout.readline()
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert json.loads(line)["checkpoint"] == str(out), err
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_tune_interrupted_writes_the_trials_that_finished(slices, tmp_path, capsys,
                                                          monkeypatch):
    """Found by a fresh tester: Ctrl-C in ``teacher tune`` exited 130 and threw
    every finished trial away. Their table is now written before it exits."""
    import teacher.tune as tune_module

    real_fit = tune_module.fit
    calls = []

    def fit_then_interrupt(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(tune_module, "fit", fit_then_interrupt)

    code = main(["tune", "--data", str(slices[0]), "--budget", "5",
                 "--out", str(tmp_path / "tune"), "--lrs", "0.001,0.002",
                 "--conv-layers", "1", "--filters", "8", "--batch-sizes", "64",
                 "--trial-epochs", "1", "--trial-samples", "256", "-q"])

    assert code == 130
    rows = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert len(rows) == 1 and rows[0]["rank"] == 1
    assert capsys.readouterr().err.rstrip().endswith("error: interrupted")


def test_eval_split_with_a_data_file_is_a_usage_error(checkpoint, slices, capsys):
    # A --data file is scored whole; a --split other than 'all' would be ignored.
    capsys.readouterr()
    code = main(["eval", "--checkpoint", str(checkpoint), "--data", str(slices[1]),
                 "--split", "test", "--no-timing", "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--split test" in err and "scored whole" in err
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(slices[1]),
                 "--split", "all", "--no-timing", "-q"]) == 0


def test_eval_warns_when_the_data_file_is_the_training_file(checkpoint, slices,
                                                           capsys):
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(slices[0]),
                 "--no-timing", "--json", "-q"]) == 0
    warnings = json.loads(capsys.readouterr().out).get("warnings", [])
    assert len(warnings) == 1
    assert str(slices[0].resolve()) in warnings[0] and "trained on" in warnings[0]

    # Another file: no such warning.
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(slices[1]),
                 "--no-timing", "--json", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert not any("trained on" in w for w in out.get("warnings", []))


def test_eval_text_output_names_each_count(checkpoint, slices, capsys):
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(slices[1]),
                 "--no-timing", "-q"]) == 0
    lines = capsys.readouterr().out.splitlines()
    confusion = next(line for line in lines if line.startswith("confusion: "))
    assert "{" not in confusion
    counts = dict(part.split() for part in confusion[len("confusion: "):].split(", "))
    assert set(counts) == {"tn", "fp", "fn", "tp"}
    n = next(line for line in lines if line.startswith("n: "))
    assert sum(int(v) for v in counts.values()) == int(n.split()[1])


def test_trained_on_counts_only_the_files_that_held_training_rows():
    from flows.datasets import REGISTRY
    from teacher.data import trained_on

    spec = REGISTRY["nsl-kdd"]
    train = next(f for f in spec.files if f.role == "train")
    test = next(f for f in spec.files if f.role == "test")
    official = {"dataset": "nsl-kdd",
                "files": {train.path: train.sha256, test.path: test.sha256}}
    scored = {"/x/KDDTrain+.txt.gz": train.sha256, "/x/KDDTest+.txt": test.sha256}
    # The official test file was never trained on.
    assert trained_on(scored, official) == ["/x/KDDTrain+.txt.gz"]
    # A teacher trained on a flow file (80/10/10 of it): every recorded file.
    from_file = {"dataset": None, "files": {"/d/a.log": "aa", "/d/b.log": "bb"}}
    assert trained_on({"/e/copy.log": "bb", "/e/other.log": "cc"}, from_file) == \
        ["/e/copy.log"]
    assert trained_on(scored, None) == [] and trained_on(scored, {"files": 3}) == []


@pytest.mark.parametrize(("flag", "value", "bound"), [
    ("--dropouts", "0.3,1.5", "[0, 1)"),
    ("--lrs", "0", "(0, 10]"),
    ("--batch-sizes", "1", "[2, 1000000]"),
    ("--emas", "1", "[0, 1)"),
    ("--label-smoothings", "1", "[0, 1)"),
    ("--input-noises", "2", "[0, 1]"),
])
def test_tune_grid_values_are_checked_as_train_checks_them(
        flag, value, bound, tmp_path, capsys, monkeypatch):
    # Found: --dropouts 1.5 failed with exit 1 once the data was loaded, and
    # --lrs 0 was taken though train refuses --lr 0.
    _no_prepare(monkeypatch)
    bad = value.split(",")[-1]
    code = main(["tune", "--data", str(tmp_path / "never-read.log"), "--budget", "1",
                 "--out", str(tmp_path / "tune"), flag, value])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"argument {flag}: must be a number {'in ' + bound}, got '{bad}'" in err
    # The same value is refused by train's flag for the same setting.
    single = {"--dropouts": "--dropout", "--lrs": "--lr", "--emas": "--ema",
              "--batch-sizes": "--batch-size",
              "--label-smoothings": "--label-smoothing",
              "--input-noises": "--input-noise"}[flag]
    assert main(["train", "--data", "x", "--out", str(tmp_path / "t"),
                 single, bad]) == 2
    assert f"got '{bad}'" in capsys.readouterr().err
    assert not (tmp_path / "tune").exists()


def test_tune_runs_a_repeated_grid_value_once(slices, tmp_path, caplog,
                                               monkeypatch):
    # Found: --lrs 1e-3,1e-3 ran the same grid point twice.
    import teacher.tune

    seen = {}

    def tune(preps, budget, grid, **kwargs):
        seen.update(grid=grid, windows=sorted(preps))
        return []

    monkeypatch.setattr(teacher.tune, "tune", tune)
    with caplog.at_level("WARNING", logger="gatewatch.teacher"):
        assert main(["tune", "--data", str(slices[0]), "--budget", "1",
                     "--out", str(tmp_path / "tune"), "--lrs", "1e-3,3e-4,0.001",
                     "--batch-sizes", "64,64", "--windows", "1,1", "-q"]) == 0
    assert seen["grid"]["lr"] == [1e-3, 3e-4]
    assert seen["grid"]["batch_size"] == [64]
    assert seen["grid"]["window"] == [1] and seen["windows"] == [1]
    err = caplog.text
    assert "--lrs lists 0.001 more than once; each value is tried once" in err
    assert "--batch-sizes lists 64 more than once" in err


def test_update_on_an_unlabeled_file_counts_that_file_rows(data_dir, tmp_path,
                                                           tmp_path_factory,
                                                           capsys):
    # Found: an unlabeled 361-row conn.log was said to have "5856 of its 7016 rows
    # labeled": the old data's rows were counted as the new file's.
    from tests.conftest import data_file
    from tests.test_agent_fixtures import CTU_NORMAL, make_teacher, tiny

    new = data_file(data_dir, "zeek-conn/android-mischief-rat01-androidtester.conn.log")
    old = data_file(data_dir, CTU_NORMAL)
    folder, _ = make_teacher(tiny(data_dir, tmp_path_factory),
                             tmp_path_factory.mktemp("t") / "teacher")
    code = main(["update", "--checkpoint", str(folder), "--data", str(new),
                 "--old-data", str(old), "--out", str(tmp_path / "up"),
                 "--epochs", "1", "-q"])
    errors = [ln for ln in capsys.readouterr().err.splitlines()
              if ln.startswith("error:")]
    assert code == 3 and len(errors) == 1
    assert errors[0].startswith(f"error: {new.name}: none of its 361 rows has a "
                                "label (0/1); an update needs at least 2 labeled "
                                "training rows of the new data")
    assert f"the old data, {old.name}," in errors[0]
    assert not (tmp_path / "up").exists()


@pytest.mark.parametrize("unverified", [[], ["--allow-unverified"]])
def test_eval_names_the_files_a_half_written_checkpoint_lacks(
        checkpoint, unverified, tmp_path, capsys, monkeypatch):
    # Found: a folder holding only config.json was said to lack checksums.json
    # (exit 3, "load it with --allow-unverified"), and with that flag it failed
    # with exit 1 for the missing weights.
    _no_prepare(monkeypatch)
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
    capsys.readouterr()
    code = main(["eval", "--checkpoint", str(half), "--data", str(tmp_path / "x"),
                 *unverified, "-q"])
    errors = [ln for ln in capsys.readouterr().err.splitlines()
              if ln.startswith("error:")]
    assert code == 3 and len(errors) == 1
    assert errors[0].startswith(
        f"error: {half}: not a complete teacher checkpoint: it has no "
        "model.safetensors, encoder.json, threshold.json, history.json, "
        "metrics.json, provenance.json (nor checksums.json)")
    assert "--allow-unverified" not in errors[0]


def test_update_on_benign_only_data_reports_the_false_positive_rate(
    checkpoint, slices, tmp_path, capsys
):
    """Found by an ML tester: new data with no malicious row reported F1 0.0 before
    and after, hiding that the false positives fell to none. F1 is None there (no
    malicious row to find); the FPR and the test rows' make-up are reported."""
    lines = slices[1].read_text().splitlines(keepends=True)
    benign = [line for line in lines if line.split(",")[41] == "normal"]
    new = tmp_path / "benign.txt"
    new.write_text("".join(benign))
    capsys.readouterr()
    assert main(["update", "--checkpoint", str(checkpoint), "--data", str(new),
                 "--old-data", str(slices[0]), "--out", str(tmp_path / "u"),
                 "--epochs", "1", "--batch-size", "64", "--samples-per-epoch", "640",
                 "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)

    rows = report["new_test_rows"]
    assert rows["malicious"] == 0
    assert 0.08 * len(benign) <= rows["benign"] <= 0.12 * len(benign)
    for when in ("before", "after"):
        assert report[when]["new_test_f1"] is None
        assert 0.0 <= report[when]["new_test_fpr"] <= 1.0
        assert 0.0 <= report[when]["old_test_f1"] <= 1.0
    assert report["old_test_rows"]["malicious"] > 0


def test_init_from_of_another_family_is_refused_before_the_data_is_read(
    checkpoint, tmp_path, capsys, monkeypatch
):
    """Found by an ML tester: a conn checkpoint fine-tuned on nsl-kdd was refused
    only after all 148,517 rows were read and encoded."""
    import teacher.cli as cli

    def no_read(*_a, **_k):
        raise AssertionError("the data was read")

    monkeypatch.setattr(cli, "_prepare", no_read)
    code = main(["train", "--dataset", "ctu-conn", "--init-from", str(checkpoint),
                 "--out", str(tmp_path / "ft"), "-q"])

    [line] = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert line.endswith("ctu-conn holds 'conn' records but the checkpoint's encoder "
                         "was fitted on 'nsl-kdd'")


def test_forest_targets_flag_is_bounded_and_reaches_the_training_settings(
        tmp_path, capsys):
    from teacher.cli import _train_config, build_parser

    assert main(["train", "--data", "x", "--out", str(tmp_path / "t"),
                 "--forest-targets", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "argument --forest-targets: must be a number in [0, 0.5), got '0.5'" in err
    args = build_parser().parse_args(["train", "--data", "x", "--out", "t",
                                      "--forest-targets", "0.3"])
    assert _train_config(args).forest_targets == 0.3
