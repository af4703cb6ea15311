"""compress run and teacher update re-read the teacher's own data: a file that
changed since the teacher was trained (its sha256 no longer the one provenance
records) is refused as bad input (exit 3), naming the file and both digests.

Found: compress run read a grown conn.log silently; its seeded split then drew
other rows (teacher-training rows into the test split), and the manifest recorded
the new digest beside a teacher that names the old one.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

pytest.importorskip("torch")

from flows.errors import BadInputError  # noqa: E402
from tests.test_compress import synthetic_flows  # noqa: E402

W = 4


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _teacher(base: Path, data: Path) -> Path:
    """An untrained tiny teacher whose provenance names ``data`` (as train does):
    the check runs before any scoring, so its weights do not matter."""
    import torch

    from teacher.checkpoint import make_provenance, save_checkpoint
    from teacher.data import prepare
    from teacher.model import TeacherConfig, TeacherNet

    torch.manual_seed(0)
    prep = prepare(str(data), window=W, group_by="src_ip", need_split=True)
    config = TeacherConfig(n_features=prep.n_features, window=W, conv_filters=(4,),
                           lstm_hidden=4, dense=(4,), dropout=0.0)
    return save_checkpoint(
        base / "ckpt", TeacherNet(config), encoder=prep.encoder,
        threshold={"threshold": 0.5, "rule": "best-f1", "chosen_on": "val"},
        provenance=make_provenance(str(data.resolve()), prep.files, 0),
    )


@pytest.fixture
def trained(tmp_path: Path) -> tuple[Path, Path, str]:
    """(teacher folder, its data file, the file's sha256 at training)."""
    data = synthetic_flows(tmp_path / "flows.parquet", n=800)
    ckpt = _teacher(tmp_path, data)
    prov = json.loads((ckpt / "provenance.json").read_text())
    assert prov["files"] == {str(data.resolve()): _sha(data)}
    return ckpt, data, _sha(data)


def _grow(data: Path) -> str:
    """The file rewritten with more flows (a conn.log that grew); its new sha256."""
    synthetic_flows(data, n=900)
    return _sha(data)


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_check_refuses_only_a_named_file_with_another_digest() -> None:
    from teacher.data import check_teacher_files

    prov = {"dataset": "nsl-kdd", "files": {"nsl-kdd/KDDTrain+.txt": "a" * 64,
                                            "nsl-kdd/KDDTest+.txt": "b" * 64}}
    # A dataset by name whose files match; other files; no digests recorded.
    check_teacher_files({"nsl-kdd/KDDTrain+.txt": "a" * 64,
                         "nsl-kdd/KDDTest+.txt": "b" * 64}, prov, "t")
    check_teacher_files({"/elsewhere/other.log": "c" * 64}, prov, "t")
    check_teacher_files({"nsl-kdd/KDDTrain+.txt": "c" * 64}, {"files": None}, "t")
    check_teacher_files({"nsl-kdd/KDDTrain+.txt": "c" * 64}, None, "t")
    with pytest.raises(BadInputError) as info:
        check_teacher_files({"nsl-kdd/KDDTrain+.txt": "a" * 64,
                             "nsl-kdd/KDDTest+.txt": "d" * 64}, prov, "runs/t")
    text = str(info.value)
    assert text.startswith("nsl-kdd/KDDTest+.txt: changed since the teacher runs/t")
    assert "d" * 64 in text and "b" * 64 in text and "\n" not in text
    assert info.value.exit_code == 3


def test_compress_run_refuses_a_teacher_data_file_that_changed(
    trained, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from compress.cli import main

    ckpt, data, old = trained
    new = _grow(data)
    assert new != old
    out = tmp_path / "art"
    code = main(["run", "--target", "onnx-fp32", "--teacher", str(ckpt),
                 "--out", str(out), "--student", "mlp", "--widths", "2",
                 "--epochs", "1", "--no-prune", "-q"])
    errors = _errors(capsys.readouterr().err)
    assert code == 3
    assert len(errors) == 1
    line = errors[0]
    assert line.startswith(f"error: {data.resolve()}: changed since the teacher")
    assert old in line and new in line
    assert "Restore the file" in line and "retrain the teacher" in line
    assert not out.exists()

    # The same file named with --data is the same file: refused the same way.
    code = main(["run", "--target", "onnx-fp32", "--teacher", str(ckpt),
                 "--out", str(out), "--data", str(data), "-q"])
    assert code == 3 and old in capsys.readouterr().err


def test_compress_reads_an_unchanged_file_and_other_data(trained,
                                                         tmp_path: Path) -> None:
    """The check lets the teacher's own file through while it is unchanged, and
    other data given on purpose (a file the provenance does not name)."""
    from compress.pipeline import RunConfig, _context

    ckpt, data, old = trained
    ctx = _context(RunConfig(target="onnx-fp32", teacher=ckpt, out=tmp_path / "a"),
                   lambda _: None)
    assert ctx.prep.files == {str(data.resolve()): old}

    other = synthetic_flows(tmp_path / "other.parquet", n=900, seed=1)
    ctx = _context(RunConfig(target="onnx-fp32", teacher=ckpt, out=tmp_path / "b",
                             dataset=str(other)), lambda _: None)
    assert ctx.prep.files == {str(other.resolve()): _sha(other)}


def _update(ckpt: Path, new: Path, out: Path, *extra: str) -> int:
    from teacher.cli import main

    return main(["update", "--checkpoint", str(ckpt), "--data", str(new),
                 "--out", str(out), "--epochs", "1", "--batch-size", "64",
                 "--threads", "1", "-q", *extra])


def test_teacher_update_refuses_changed_old_data(
    trained, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The default old data is the teacher's own file: changed, it is refused
    (before, the forgetting check measured other rows); unchanged, it is used."""
    ckpt, data, old = trained
    batch = synthetic_flows(tmp_path / "batch.parquet", n=800, seed=2)

    assert _update(ckpt, batch, tmp_path / "u1") == 0
    capsys.readouterr()

    new = _grow(data)
    assert _update(ckpt, batch, tmp_path / "u2") == 3
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1
    assert errors[0].startswith(f"error: {data.resolve()}: changed since the teacher")
    assert old in errors[0] and new in errors[0]
    assert not (tmp_path / "u2").exists()

    # Old data given on purpose that is not the teacher's file: used as told.
    assert _update(ckpt, batch, tmp_path / "u3", "--old-data", str(batch)) == 0


def test_a_dataset_by_name_whose_files_match_is_read(data_dir: Path,
                                                     tmp_path: Path) -> None:
    """A teacher trained on a registered dataset: its files (checked against the
    registry when read) match the provenance, so compress reads them; a digest the
    provenance records otherwise (the data changed since) is refused."""
    import torch

    from compress.pipeline import RunConfig, _context
    from teacher.checkpoint import make_provenance, save_checkpoint
    from teacher.data import prepare
    from teacher.model import TeacherConfig, TeacherNet

    torch.manual_seed(0)
    prep = prepare("nsl-kdd-20", data_dir=data_dir, need_split=True)
    config = TeacherConfig(n_features=prep.n_features, window=prep.window,
                           conv_filters=(4,), lstm_hidden=4, dense=(4,), dropout=0.0)

    def teacher(name: str, files: dict[str, str]) -> Path:
        return save_checkpoint(
            tmp_path / name, TeacherNet(config), encoder=prep.encoder,
            threshold={"threshold": 0.5, "rule": "best-f1", "chosen_on": "val"},
            provenance=make_provenance("nsl-kdd-20", files, 0),
        )

    same = teacher("same", prep.files)
    ctx = _context(RunConfig(target="onnx-fp32", teacher=same, out=tmp_path / "a",
                             data_dir=data_dir), lambda _: None)
    assert ctx.prep.files == prep.files and len(ctx.test) > 0

    first = next(iter(prep.files))
    other = teacher("other", {**prep.files, first: "0" * 64})
    with pytest.raises(BadInputError,
                       match=f"^{re.escape(first)}: changed since the teacher"):
        _context(RunConfig(target="onnx-fp32", teacher=other, out=tmp_path / "b",
                           data_dir=data_dir), lambda _: None)
