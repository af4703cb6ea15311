"""``teacher train``/``update --out``: a folder that is not new or empty is refused
(exit 2) unless ``--force``, which replaces a teacher checkpoint and nothing else.

Found: ``--out`` at another dataset's checkpoint replaced it without a word, and
``--out`` at a folder with ``notes.txt`` and ``config.json`` overwrote that
config.json and left notes.txt inside the new checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from teacher.cli import main

TINY = ["--epochs", "1", "--members", "1", "--conv-filters", "8", "--lstm-hidden",
        "8", "--dense", "8", "--batch-size", "64", "--samples-per-epoch", "256",
        "--threads", "1", "-q"]


@pytest.fixture(scope="module")
def trained(slices, tmp_path_factory) -> Path:
    """A tiny checkpoint of the first slice, with a replay buffer."""
    out = tmp_path_factory.mktemp("ck") / "teacher"
    assert main(["train", "--data", str(slices[0]), "--out", str(out),
                 "--replay-size", "100", *TINY]) == 0
    assert (out / "replay.safetensors").is_file()
    return out


@pytest.fixture
def copy(trained, tmp_path) -> Path:
    """A copy of the trained checkpoint this test may change."""
    return Path(shutil.copytree(trained, tmp_path / "teacher"))


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def _no_prepare(monkeypatch) -> None:
    """Fail the test if the command gets as far as reading its data."""
    def prepare(*a, **k):
        raise AssertionError("data read before --out was checked")
    monkeypatch.setattr("teacher.data.prepare", prepare)


def test_an_existing_checkpoint_is_refused_without_force(copy, slices, capsys,
                                                          monkeypatch):
    before = _contents(copy)
    _no_prepare(monkeypatch)
    capsys.readouterr()

    code = main(["train", "--data", str(slices[1]), "--out", str(copy), *TINY])

    errors = _errors(capsys.readouterr().err)
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith(f"error: --out {copy} already holds a teacher "
                                f"checkpoint (trained on {slices[0]})")
    assert "pass --force to replace it" in errors[0]
    assert _contents(copy) == before


def test_unrelated_files_are_refused_with_or_without_force(slices, tmp_path,
                                                           capsys, monkeypatch):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me\n")
    (folder / "config.json").write_text('{"mine": true}\n')
    _no_prepare(monkeypatch)
    capsys.readouterr()

    for force in ([], ["--force"]):
        code = main(["train", "--data", str(slices[1]), "--out", str(folder),
                     *force, *TINY])
        errors = _errors(capsys.readouterr().err)
        assert code == 2 and len(errors) == 1, force
        assert errors[0].startswith(f"error: --out {folder} holds 'notes.txt', "
                                    "which is not part of a teacher checkpoint")
        assert ("--force replaces a teacher checkpoint only" in errors[0]) == bool(
            force)
    assert _contents(folder) == {"notes.txt": b"keep me\n",
                                 "config.json": b'{"mine": true}\n'}


@pytest.mark.parametrize("make", ["config-only", "subfolder", "link"])
def test_force_refuses_what_is_not_a_whole_checkpoint(make, copy, slices, tmp_path,
                                                      capsys, monkeypatch):
    if make == "config-only":
        for path in copy.iterdir():
            if path.name != "config.json":
                path.unlink()
        want = "but no model.safetensors: not a teacher checkpoint"
    elif make == "subfolder":
        (copy / "runs").mkdir()
        want = "holds 'runs', which is not part of a teacher checkpoint"
    else:  # a link where a checkpoint file belongs: the write would go through it
        (copy / "history.json").unlink()
        (copy / "history.json").symlink_to(tmp_path / "elsewhere.json")
        want = "holds 'history.json', which is not part of a teacher checkpoint"
    _no_prepare(monkeypatch)
    capsys.readouterr()

    code = main(["train", "--data", str(slices[1]), "--out", str(copy), "--force",
                 *TINY])

    errors = _errors(capsys.readouterr().err)
    assert code == 2 and len(errors) == 1 and want in errors[0]
    assert not (tmp_path / "elsewhere.json").exists()


def test_an_empty_folder_is_taken(slices, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()

    class Reached(Exception):
        pass

    def prepare(*a, **k):
        raise Reached
    monkeypatch.setattr("teacher.data.prepare", prepare)

    with pytest.raises(Reached):
        main(["train", "--data", str(slices[1]), "--out", str(tmp_path / "empty"),
              *TINY])


def test_force_replaces_the_checkpoint_and_leaves_nothing_of_it(copy, slices,
                                                                capsys):
    from teacher.checkpoint import load_teacher

    capsys.readouterr()
    code = main(["train", "--data", str(slices[1]), "--out", str(copy), "--force",
                 "--replay-size", "0", *TINY])

    assert code == 0, capsys.readouterr().err
    prov = json.loads((copy / "provenance.json").read_text())
    assert prov["dataset"] == str(slices[1])
    # The old replay buffer (of the other slice) is gone, not adopted.
    assert not (copy / "replay.safetensors").exists()
    sums = json.loads((copy / "checksums.json").read_text())["files"]
    assert "replay.safetensors" not in sums
    load_teacher(copy, device="cpu")


def test_force_cannot_replace_the_init_from_checkpoint(copy, slices, capsys,
                                                       monkeypatch):
    before = _contents(copy)
    _no_prepare(monkeypatch)
    capsys.readouterr()

    code = main(["train", "--data", str(slices[1]), "--init-from", str(copy),
                 "--out", str(copy) + "/", "--force", "-q"])

    errors = _errors(capsys.readouterr().err)
    assert code == 2 and "is the --init-from checkpoint" in errors[0]
    assert _contents(copy) == before


def test_update_refuses_a_used_out_and_force_replaces_a_checkpoint(
    trained, copy, slices, capsys
):
    before = _contents(copy)
    argv = ["update", "--checkpoint", str(trained), "--data", str(slices[1]),
            "--out", str(copy), "--epochs", "1", "--batch-size", "64",
            "--samples-per-epoch", "256", "--threads", "1", "-q"]
    capsys.readouterr()

    assert main(argv) == 2
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and "already holds a teacher checkpoint" in errors[0]
    assert _contents(copy) == before

    assert main([*argv, "--force"]) == 0, capsys.readouterr().err
    prov = json.loads((copy / "provenance.json").read_text())
    assert prov["updated_from"] == str(trained)


def test_a_stray_file_that_appears_while_training_stops_the_write(copy):
    """--out is looked at again just before the checkpoint is written."""
    from flows.errors import UsageError
    from teacher.cli import _replace_out

    (copy / "notes.txt").write_text("written while the model trained\n")
    before = _contents(copy)

    with pytest.raises(UsageError, match="holds 'notes.txt'"):
        _replace_out(copy, force=True)
    assert _contents(copy) == before


def test_the_demo_and_the_benchmark_replace_their_own_teachers(tmp_path,
                                                               monkeypatch):
    """`make demo` twice and a benchmark run again in its --work folder train into
    the folders of the last run: they pass --force."""
    from benchmarks.demo import Demo
    from benchmarks.run import Run, Settings

    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(Demo, "run", lambda self, *args: calls.append(args))
    Demo(tmp_path, tmp_path / "demo-out", quick=True).train()

    def command(self, *args, log):
        calls.append(args)
        raise RuntimeError("stop after the teacher")
    monkeypatch.setattr(Run, "command", command)
    run = Run(Settings.quick_settings(), tmp_path / "out", tmp_path / "work",
              tmp_path)
    run.dataset("nsl-kdd")

    trains = [c for c in calls if c[:2] == ("teacher", "train")]
    assert len(trains) == 3
    assert all("--force" in c for c in trains)


# Found later: --force replaced folders that were not ours, lost the old checkpoint
# (and left half a new one that loaded) when the disk filled, wrote inside another
# checkpoint's folder, and a deeply nested JSON file broke `teacher eval`.

@pytest.mark.parametrize("make", ["huggingface", "weights-only", "no-provenance"])
def test_force_refuses_a_folder_that_is_not_our_checkpoint(make, copy, slices,
                                                           capsys, monkeypatch):
    keep = {"huggingface": {"config.json", "model.safetensors"},
            "weights-only": {"model.safetensors"},
            "no-provenance": {p.name for p in copy.iterdir()} - {"provenance.json"}}
    for path in copy.iterdir():
        if path.name not in keep[make]:
            path.unlink()
    if make == "huggingface":
        (copy / "config.json").write_text('{"model_type": "bert"}\n')
    missing = "provenance.json" if make == "no-provenance" else "checksums.json"
    before = _contents(copy)
    _no_prepare(monkeypatch)
    capsys.readouterr()

    code = main(["train", "--data", str(slices[1]), "--out", str(copy), "--force",
                 *TINY])

    errors = _errors(capsys.readouterr().err)
    assert code == 2 and len(errors) == 1, errors
    assert "is not a gatewatch teacher checkpoint" in errors[0]
    assert f"it has no {missing}" in errors[0]
    assert _contents(copy) == before


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p != folder)


@pytest.mark.parametrize("where", ["weights", "json"])
def test_a_failed_write_keeps_the_old_checkpoint(where, copy, slices, capsys,
                                                 monkeypatch):
    import errno

    from safetensors import SafetensorError

    import teacher.checkpoint as ckpt

    if where == "weights":
        def save_file(state, filename, metadata=None):
            Path(filename).write_bytes(b"\0" * 100)  # cut short, as on a full disk
            raise SafetensorError("No space left on device (os error 28)")
        monkeypatch.setattr("safetensors.torch.save_file", save_file)
    else:
        real = ckpt._write_json

        def write_json(path, data):
            if path.name == "metrics.json":
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            real(path, data)
        monkeypatch.setattr(ckpt, "_write_json", write_json)
    before, around = _contents(copy), _siblings(copy)
    capsys.readouterr()

    code = main(["train", "--data", str(slices[1]), "--out", str(copy), "--force",
                 *TINY])

    err = capsys.readouterr().err
    errors = _errors(err)
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(f"error: --out {copy}: cannot write the checkpoint")
    assert "No space left on device" in errors[0]
    assert "the checkpoint it held is kept" in errors[0]
    assert _contents(copy) == before
    assert _siblings(copy) == around  # the half-written folder is gone
    monkeypatch.undo()
    ckpt.load_teacher(copy, device="cpu")


def test_a_failed_write_to_a_new_folder_leaves_nothing(slices, tmp_path, capsys,
                                                       monkeypatch):
    import errno

    def save_file(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("safetensors.torch.save_file", save_file)
    out = tmp_path / "new" / "teacher"
    capsys.readouterr()

    code = main(["train", "--data", str(slices[1]), "--out", str(out), *TINY])

    errors = _errors(capsys.readouterr().err)
    assert code == 1 and len(errors) == 1 and "nothing was written" in errors[0]
    assert not out.exists() and list((tmp_path / "new").iterdir()) == []


def test_force_keeps_the_folder_mode(copy, slices):
    copy.chmod(0o750)

    assert main(["train", "--data", str(slices[1]), "--out", str(copy), "--force",
                 *TINY]) == 0

    assert copy.stat().st_mode & 0o777 == 0o750
    assert [p for p in copy.parent.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("command", ["train", "update"])
def test_out_inside_a_checkpoint_is_refused(command, trained, copy, slices, capsys,
                                            monkeypatch):
    before = _contents(copy)
    _no_prepare(monkeypatch)
    monkeypatch.setattr("teacher.cli._prepare", lambda *a, **k: pytest.fail(
        "data read before --out was checked"))
    out = copy / "sub" / "deeper"
    argv = (["train", *TINY] if command == "train"
            else ["update", "--checkpoint", str(trained), "-q"])
    capsys.readouterr()

    for force in ([], ["--force"]):
        code = main([*argv, "--data", str(slices[1]), "--out", str(out), *force])
        errors = _errors(capsys.readouterr().err)
        assert code == 2 and len(errors) == 1, errors
        assert errors[0] == (f"error: --out {out} is inside the checkpoint folder "
                             f"{copy.resolve()}; name a folder outside it")
    assert _contents(copy) == before and not (copy / "sub").exists()


@pytest.mark.parametrize("name", ["threshold.json", "provenance.json",
                                  "config.json", "checksums.json"])
def test_deeply_nested_checkpoint_json_is_a_checkpoint_error(name, copy, slices,
                                                             capsys):
    from teacher.checkpoint import write_checksums

    (copy / name).write_text("[" * 100_000 + "]" * 100_000)
    if name != "checksums.json":
        write_checksums(copy)
    capsys.readouterr()

    code = main(["eval", "--checkpoint", str(copy), "--data", str(slices[1]), "-q"])

    err = capsys.readouterr().err
    errors = _errors(err)
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err
    assert str(copy / name) in errors[0] and "nested too deeply" in errors[0]
