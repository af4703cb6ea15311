"""Findings of round 16: test rows that were training rows scored without a
warning under a registered dataset's name, exit codes for a missing --data file
or a teacher whose data moved, and teacher update's bookkeeping (data learned
again, a chain whose buffer was skipped, the replay counts, an ancestor --out).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from teacher.cli import main

CTU50 = "zeek-conn/ctu50-normal-40-day1.conn.log.labeled"
TINY = ["--epochs", "1", "--batch-size", "32", "--samples-per-epoch", "128",
        "--threads", "1", "-q"]
SMALL = ["--conv-filters", "8", "--lstm-hidden", "8", "--dense", "8",
         "--members", "1"]


def _run(cli, argv: list[str]) -> tuple[int, str]:
    """A command line's exit code and its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli(argv)
    return code, out.getvalue()


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


# 1. A registered dataset holding a file the teacher trained on -----------------


@pytest.fixture(scope="module")
def ctu_teacher(data_dir, tmp_path_factory) -> Path:
    """A tiny teacher trained on the CTU-50 conn.log alone (seconds)."""
    out = tmp_path_factory.mktemp("ctu") / "T1"
    code, _ = _run(main, ["train", "--data", str(data_dir / CTU50), "--out",
                          str(out), *SMALL, "--replay-size", "0", *TINY])
    assert code == 0
    return out


def _teacher_rows_in_ctu_test(data_dir: Path) -> tuple[int, int, int]:
    """Of ctu-conn's labeled test rows from the CTU-50 capture: how many there
    are, and how many the teacher's own split of the file (prepare, as teacher
    train draws it, seed 0) put in train and in val. Counted from the dataset's
    table and the file's split, not through the warning's code."""
    from flows.datasets import load_dataset
    from teacher.data import prepare

    table = load_dataset("ctu-conn", data_dir=data_dir, seed=0).table
    capture = np.array(table.column("capture").to_pylist(), dtype=object)
    split = np.array(table.column("split").to_pylist(), dtype=object)
    label = np.array(table.column("label").to_pylist(), dtype=object)
    mine = capture == "ctu50-normal-40-day1"
    test = (split[mine] == "test") & np.array([v is not None for v in label[mine]])
    own = prepare(data_dir / CTU50, seed=0, need_split=True).split
    assert len(own) == int(mine.sum())  # the capture's rows, in file order
    return (int(test.sum()), int((own[test] == "train").sum()),
            int((own[test] == "val").sum()))


def test_eval_of_a_dataset_warns_for_a_file_the_teacher_trained_on(
        ctu_teacher, data_dir, caplog):
    """Found: scored as --dataset ctu-conn, a teacher trained on the CTU-50 file
    got F1 0.9989 with no warning; 173 of the 559 test rows from that capture
    were its training rows and 305 its validation rows."""
    n, n_train, n_val = _teacher_rows_in_ctu_test(data_dir)
    assert (n, n_train, n_val) == (559, 173, 305)  # the tester's counts
    caplog.clear()
    code, text = _run(main, ["eval", "--checkpoint", str(ctu_teacher), "--dataset",
                             "ctu-conn", "--split", "test", "--json",
                             "--no-timing", "-q"])
    assert code == 0
    out = json.loads(text)
    [warning] = out["warnings"]
    assert warning.startswith(f"{CTU50} (of ctu-conn): the teacher trained on this "
                              "file (same sha256 as in its provenance")
    assert (f"{n} of the {out['n']} rows scored come from it, and {n_train} of "
            f"those were its training rows and {n_val} its validation rows") \
        in warning
    assert [r.getMessage() for r in caplog.records
            if CTU50 in r.getMessage()] == [warning]  # logged once


def test_no_warning_for_the_dataset_a_teacher_trained_on_and_the_converse(
        ctu_teacher, data_dir, tmp_path):
    """Trained on --dataset ctu-conn (provenance written here): its own split is
    held out, no warning; --data with one of its files warns, naming the file and
    the dataset's test split."""
    from flows.datasets import REGISTRY
    from teacher.checkpoint import write_checksums

    ck = tmp_path / "as-dataset"
    shutil.copytree(ctu_teacher, ck)
    prov = json.loads((ck / "provenance.json").read_text())
    prov.update(dataset="ctu-conn",
                files={f.path: f.sha256 for f in REGISTRY["ctu-conn"].files})
    (ck / "provenance.json").write_text(json.dumps(prov))
    write_checksums(ck)

    code, text = _run(main, ["eval", "--checkpoint", str(ck), "--dataset",
                             "ctu-conn", "--json", "--no-timing", "-q"])
    assert code == 0 and "warnings" not in json.loads(text)
    code, text = _run(main, ["eval", "--checkpoint", str(ck), "--data",
                             str(data_dir / CTU50), "--json", "--no-timing", "-q"])
    assert code == 0
    [warning] = json.loads(text)["warnings"]
    assert warning.startswith(f"$GATEWATCH_DATA/{CTU50}: the teacher trained on "
                              "this file")
    assert warning.endswith("(--dataset ctu-conn --split test)")


def test_compress_eval_of_a_dataset_warns_for_the_teachers_file(
        ctu_teacher, data_dir, tmp_path):
    from compress.cli import main as compress

    art = tmp_path / "art"
    code, _ = _run(compress, ["run", "--target", "onnx-fp32", "--teacher",
                              str(ctu_teacher), "--out", str(art), "--widths", "4",
                              "--epochs", "1", "--no-prune", "--no-timing",
                              "--max-f1-drop", "1", "-q"])
    assert code == 0
    code, text = _run(compress, ["eval", "--artifact", str(art), "--dataset",
                                 "ctu-conn", "--json", "--no-timing"])
    assert code == 0
    out = json.loads(text)
    n, n_train, n_val = _teacher_rows_in_ctu_test(data_dir)
    [warning] = out["warnings"]
    assert warning.startswith(f"{CTU50} (of ctu-conn): the artifact's teacher "
                              "trained on this file")
    # The manifest does not record held-out types: train and val are summed.
    assert (f"{n} of the {out['n']} rows scored come from it, and "
            f"{n_train + n_val} of those were its training or validation rows") \
        in warning


# 2. Exit codes of a missing --data file -----------------------------------------


def test_compress_missing_data_file_exits_3_and_unknown_dataset_2(
        ctu_teacher, tmp_path, capsys):
    """Found: compress eval --data nonexist.log exited 2 where compress --help
    says 3 for a missing file (teacher said 3 already)."""
    from compress.cli import main as compress

    absent = tmp_path / "nonexist.log"
    line = (f"error: --data {absent}: no such file (a registered dataset name "
            "goes with --dataset)")
    capsys.readouterr()
    for argv in (["eval", "--artifact", str(tmp_path), "--data", str(absent)],
                 ["run", "--target", "onnx-fp32", "--teacher", str(ctu_teacher),
                  "--out", str(tmp_path / "o"), "--data", str(absent)]):
        assert compress([*argv, "-q"]) == 3, argv
        assert _errors(capsys.readouterr().err) == [line], argv
    assert compress(["eval", "--artifact", str(tmp_path), "--dataset", "ctu-con",
                     "-q"]) == 2
    assert "neither a dataset name" in capsys.readouterr().err


def _moved(ctu_teacher: Path, tmp_path: Path, ref: str) -> Path:
    """A copy of the teacher whose provenance names ``ref`` as its data."""
    from teacher.checkpoint import write_checksums

    ck = tmp_path / "moved"
    shutil.copytree(ctu_teacher, ck)
    prov = json.loads((ck / "provenance.json").read_text())
    (ck / "provenance.json").write_text(json.dumps({**prov, "dataset": ref}))
    write_checksums(ck)  # a whole checkpoint, as it was, whose data moved
    return ck


def test_compress_run_names_the_teachers_moved_file_and_how_to_pass_it(
        ctu_teacher, tmp_path, capsys):
    """Found: compress run --teacher T after T's data file moved exited 2 ("neither
    a dataset name ... nor an existing file") without saying what to do."""
    from compress.cli import main as compress

    gone = str(tmp_path / "was-here.log")
    ck = _moved(ctu_teacher, tmp_path, gone)
    capsys.readouterr()
    assert compress(["run", "--target", "onnx-fp32", "--teacher", str(ck),
                     "--out", str(tmp_path / "o"), "-q"]) == 3
    assert _errors(capsys.readouterr().err) == [
        f"error: {gone}: no such file: teacher {ck} was trained on this file (its "
        "provenance.json); if it moved, pass it with --data FILE (its sha256 is in "
        "the provenance)"]
    assert not (tmp_path / "o").exists()

    ck2 = _moved(ctu_teacher, tmp_path / "2", "$GATEWATCH_DATA/zeek-conn/gone.log")
    assert compress(["run", "--target", "onnx-fp32", "--teacher", str(ck2),
                     "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"),
                     "-q"]) == 3
    [err] = _errors(capsys.readouterr().err)
    assert err.startswith("error: $GATEWATCH_DATA/zeek-conn/gone.log: no such "
                          f"file: teacher {ck2} was trained on")
    assert f"the data folder {tmp_path} has no zeek-conn/gone.log" in err
    assert "point --data-dir or ${GATEWATCH_DATA} at the folder" in err
    assert err.endswith("or pass the file with --data FILE")


# 3. teacher update's bookkeeping --------------------------------------------------


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    """Made-up NSL-KDD files a, b, c; A trained on a; B = A updated on b with
    --replay-size 0 (no buffer); C = B updated on c with --replay-size 90."""
    from tests.test_teacher_leftovers16 import kdd_rows

    root = tmp_path_factory.mktemp("chain16")
    files = {}
    for seed, name in enumerate("abc"):
        files[name] = root / f"{name}.txt"
        files[name].write_text(kdd_rows(seed, 300))
    code, _ = _run(main, ["train", "--data", str(files["a"]), "--out",
                          str(root / "A"), *SMALL, "--replay-size", "60", *TINY])
    assert code == 0
    reports = {}
    for src, name, dst, size in (("A", "b", "B", "0"), ("B", "c", "C", "90")):
        code, text = _run(main, ["update", "--checkpoint", str(root / src), "--data",
                                 str(files[name]), "--out", str(root / dst),
                                 "--replay-size", size, "--json", *TINY])
        assert code == 0
        reports[dst] = json.loads(text)
    return {"root": root, "files": files, **reports}


def test_a_buffer_skipped_once_is_rebuilt_from_the_files(chain):
    """Found: after --replay-size 0 then 1000 the buffer held only the last two
    datasets; a, still learned and readable, was dropped without a word."""
    from teacher.update import read_replay

    root, files = chain["root"], chain["files"]
    ref = {name: str(path.resolve()) for name, path in files.items()}
    assert not (root / "B" / "replay.safetensors").exists()
    assert chain["B"]["replay_out"] is None
    assert read_replay(root / "C").counts() == {ref["a"]: 30, ref["b"]: 30,
                                                ref["c"]: 30}
    assert chain["C"]["replay_rebuilt"] == [ref["a"], ref["b"]]
    assert "replay_dropped" not in chain["C"]
    # Trained on every training row of a and b (240 each: 80 % of 300), which is
    # what the replay counts; the buffer written is replay_out.
    assert chain["C"]["replayed_rows"] == chain["C"]["replay_size"] == 480
    assert chain["C"]["replay_out"]["size"] == 90


def test_data_learned_again_is_listed_once_as_new(chain, tmp_path):
    """Found: updating C with b, which the chain learned already, listed b twice
    in the report's sources and in the provenance's learned."""
    root, files = chain["root"], chain["files"]
    code, text = _run(main, ["update", "--checkpoint", str(root / "C"), "--data",
                             str(files["b"]), "--out", str(tmp_path / "D"),
                             "--replay-size", "90", "--json", *TINY])
    assert code == 0
    report = json.loads(text)
    ref = {name: str(path.resolve()) for name, path in files.items()}
    assert [(s["role"], s["data"]) for s in report["sources"]] == [
        ("trained", ref["a"]), ("update 2", ref["c"]), ("new", ref["b"])]
    assert report["sources"][-1]["learned_before"] == ["update 1"]
    prov = json.loads((tmp_path / "D" / "provenance.json").read_text())
    assert [e["data"] for e in prov["learned"]] == [ref["a"], ref["c"], ref["b"]]

    code, text = _run(main, ["update", "--checkpoint", str(root / "C"), "--data",
                             str(files["b"]), "--out", str(tmp_path / "E"),
                             "--replay-size", "90", *TINY])
    assert code == 0
    assert f"  new: {ref['b']} (learned before as update 1): F1 " in text


def test_a_chain_dataset_that_cannot_be_read_is_named(chain, tmp_path, caplog):
    root, files = chain["root"], chain["files"]
    moved = tmp_path / "a-moved.txt"
    shutil.move(files["a"], moved)
    try:
        code, text = _run(main, ["update", "--checkpoint", str(root / "B"),
                                 "--data", str(files["c"]), "--out",
                                 str(tmp_path / "C2"), "--replay-size", "90",
                                 "--json", *TINY])
    finally:
        shutil.move(moved, files["a"])
    assert code == 0
    report = json.loads(text)
    a = str(files["a"].resolve())
    assert [d["data"] for d in report["replay_dropped"]] == [a]
    assert "no such file" in report["replay_dropped"][0]["why"]
    assert f"{a} (learned by the checkpoint) is not in its replay buffer" \
        in caplog.text


def test_update_refuses_to_overwrite_an_ancestor(chain, capsys):
    """Found: update C --out B --force (B is C's parent) was accepted and made an
    updated_from cycle."""
    root, files = chain["root"], chain["files"]
    before = (root / "B" / "model.safetensors").read_bytes()
    for ancestor in ("A", "B"):
        assert main(["update", "--checkpoint", str(root / "C"), "--data",
                     str(files["a"]), "--out", str(root / ancestor), "--force",
                     "-q"]) == 2
        assert _errors(capsys.readouterr().err) == [
            f"error: --out {root / ancestor} is a checkpoint {root / 'C'} was "
            "updated from (its provenance's updated_from); replacing it would "
            "make the update chain a cycle. Write the update to another folder"]
    assert (root / "B" / "model.safetensors").read_bytes() == before


def test_a_rebuilt_share_leaves_out_the_types_teacher_train_held_out(tmp_path):
    """Found by a docs tester: a share drawn again from a dataset's file took its
    training rows without the attack types teacher train had moved to validation,
    so the buffer replayed types the teacher never trained on."""
    from teacher.checkpoint import load_teacher
    from teacher.data import prepare
    from teacher.update import read_replay
    from tests.test_teacher_leftovers16 import kdd_rows

    files = {}
    for seed, name in enumerate("abc"):
        text = kdd_rows(seed, 400)
        if name == "a":  # a second DoS type besides neptune, for the hold-out
            lines = text.splitlines(keepends=True)
            text = "".join(line.replace(",neptune,", ",pod,") if i % 4 == 3
                           else line for i, line in enumerate(lines))
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text(text)
    code, _ = _run(main, ["train", "--data", str(files["a"]), "--out",
                          str(tmp_path / "A"), *SMALL, "--replay-size", "60", *TINY])
    assert code == 0
    held = json.loads((tmp_path / "A" / "provenance.json").read_text())[
        "held_out_types"]
    assert len(held) == 1 and held[0] in ("pod", "neptune")  # 100 rows each
    for src, name, dst, size in (("A", "b", "B", "0"), ("B", "c", "C", "400")):
        code, _ = _run(main, ["update", "--checkpoint", str(tmp_path / src),
                              "--data", str(files[name]), "--out", str(tmp_path / dst),
                              "--replay-size", size, *TINY])
        assert code == 0

    buffer = read_replay(tmp_path / "C")
    mine = buffer.windows[buffer.sources == buffer.names.index(
        str(files["a"].resolve()))]
    a = prepare(files["a"], encoder=load_teacher(tmp_path / "A").encoder)
    gone = a.windows(np.flatnonzero(a.details == held[0]))
    flat = mine.reshape(len(mine), -1)
    assert len(mine) > 0 and len(gone) == 100  # 100 rows of each DoS type
    assert not any((flat == row.reshape(-1)).all(axis=1).any() for row in gone)


def test_update_names_the_datasets_its_data_takes(chain, capsys):
    """Found by a docs tester: a misspelled dataset name in teacher update's
    --data (which takes names and files) was told to use --dataset, which update
    does not have."""
    from flows.datasets import REGISTRY

    capsys.readouterr()
    code = main(["update", "--checkpoint", str(chain["root"] / "A"), "--data",
                 "nsl-kdd-2O", "--out", str(chain["root"] / "X"), *TINY])

    assert code == 3
    assert _errors(capsys.readouterr().err) == [
        "error: --data nsl-kdd-2O: no such file (nor a registered dataset name: "
        f"{', '.join(sorted(REGISTRY))})"]
    assert not (chain["root"] / "X").exists()
