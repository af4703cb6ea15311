"""Incremental learning leftovers (session 16): a replay buffer that grows along a
chain of ``teacher update``s, forgetting measured on every dataset learned before,
and a ``--data`` file of another feature family refused from its head.

The data are made up here (NSL-KDD text rows of two kinds, a Zeek conn.log), so
these tests need no data folder.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from teacher.cli import main

# A tiny network, one epoch: these tests check bookkeeping, not accuracy.
TINY = ["--epochs", "1", "--batch-size", "32", "--samples-per-epoch", "128",
        "--threads", "1", "-q"]
CAP = 90  # the updates' --replay-size: 30 rows for each of three datasets


def kdd_rows(seed: int, n: int) -> str:
    """``n`` NSL-KDD text rows, half normal (http) and half neptune (SYN flood),
    drawn with ``seed`` so that each made-up dataset differs from the others."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        attack = i % 2 == 1
        rates = rng.uniform(0.8, 1.0, 35) if attack else rng.uniform(0.0, 0.2, 35)
        counts = rng.integers(100, 500, 2) if attack else rng.integers(1, 20, 2)
        fields = [
            str(int(rng.integers(0, 5))), "tcp", "private" if attack else "http",
            "S0" if attack else "SF",
            str(0 if attack else int(rng.integers(150, 400))),
            str(0 if attack else int(rng.integers(500, 9000))),
            *["0"] * 16,
            *[str(int(c)) for c in counts],
            *[f"{r:.2f}" for r in rates[:7]],
            str(int(rng.integers(1, 255))), str(int(rng.integers(1, 255))),
            *[f"{r:.2f}" for r in rates[7:15]],
            "neptune" if attack else "normal", "20",
        ]
        assert len(fields) == 43
        lines.append(",".join(fields) + "\n")
    return "".join(lines)


def _run(argv: list[str]) -> tuple[int, str]:
    """``teacher`` with ``argv``: exit code and what it printed on stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def _update(ckpt: Path, data: Path, out: Path, *extra: str) -> dict:
    """``teacher update --json``'s report (the update must succeed)."""
    code, text = _run(["update", "--checkpoint", str(ckpt), "--data", str(data),
                       "--out", str(out), "--replay-size", str(CAP), "--json",
                       *extra, *TINY])
    assert code == 0
    return json.loads(text)


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    """Three made-up datasets a, b, c; A trained on a, B = A updated on b, C = B
    updated on c; the updates' reports."""
    root = tmp_path_factory.mktemp("chain")
    files = {}
    for seed, name in enumerate("abc"):
        files[name] = root / f"{name}.txt"
        files[name].write_text(kdd_rows(seed, 300))
    code, _ = _run(["train", "--data", str(files["a"]), "--out", str(root / "A"),
                    "--conv-filters", "8", "--lstm-hidden", "8", "--dense", "8",
                    "--members", "1", "--replay-size", "60", *TINY])
    assert code == 0
    report_b = _update(root / "A", files["b"], root / "B")
    report_c = _update(root / "B", files["c"], root / "C")
    return {"root": root, "files": files, "B": report_b, "C": report_c}


def _windows(ckpt: Path, path: Path, split: str | None) -> set[bytes]:
    """The encoded windows of a file's rows (one split, or all but test), read
    with the checkpoint's encoder, as bytes to look rows up by."""
    from teacher.checkpoint import load_teacher
    from teacher.data import prepare

    prep = prepare(path, encoder=load_teacher(ckpt, device="cpu").encoder,
                   seed=0, need_split=True)
    rows = (prep.rows(split) if split else
            np.flatnonzero((prep.split != "test") & (prep.y >= 0)))
    return {w.tobytes() for w in prep.windows(rows)}


# 1. The replay buffer grows along a chain of updates ---------------------------


def test_the_replay_buffer_keeps_every_dataset_along_a_chain(chain):
    """Found: B and C carried A's buffer byte for byte (the update copied it), so
    after A -> B -> C the buffer held a's rows only and b was never replayed."""
    from teacher.update import read_replay

    root, files = chain["root"], chain["files"]
    ref = {name: str(path.resolve()) for name, path in files.items()}
    b_buf, c_buf = read_replay(root / "B"), read_replay(root / "C")

    # Equal shares: B holds a and b, C holds a, b and c, half of each class.
    assert read_replay(root / "A").counts() == {ref["a"]: 60}
    assert b_buf.counts() == {ref["a"]: 45, ref["b"]: 45}
    assert c_buf.counts() == {ref["a"]: 30, ref["b"]: 30, ref["c"]: 30}
    for i in range(3):
        labels = c_buf.labels[c_buf.sources == i]
        assert (np.bincount(labels, minlength=2) == [15, 15]).all()

    # Each row is one of its own dataset's windows: a's from A's training (not
    # its test rows), b's and c's from their training rows.
    for i, name in enumerate("abc"):
        own = _windows(root / "C", files[name], "train" if name != "a" else None)
        rows = c_buf.windows[c_buf.sources == i]
        assert all(w.tobytes() in own for w in rows), name
    assert chain["C"]["replay_out"] == {"size": CAP, "sources": c_buf.counts()}


def test_the_grown_buffer_is_the_same_for_one_seed(chain, tmp_path):
    from teacher.update import read_replay

    root, files = chain["root"], chain["files"]
    first = read_replay(root / "C")
    _update(root / "B", files["c"], tmp_path / "again")
    again = read_replay(tmp_path / "again")
    assert np.array_equal(first.windows, again.windows)
    assert np.array_equal(first.sources, again.sources)
    assert first.names == again.names

    _update(root / "B", files["c"], tmp_path / "other", "--seed", "7")
    other = read_replay(tmp_path / "other")
    assert other.counts() == first.counts()  # the shares do not depend on it
    assert not np.array_equal(first.windows, other.windows)


def test_grow_replay_shares_out_what_a_small_source_cannot_fill():
    from teacher.data import Prepared
    from teacher.update import ReplayBuffer, grow_replay

    # An earlier buffer: source "x" with 4 rows (1 malicious), "y" with 40.
    labels = np.array([0, 0, 0, 1] + [0, 1] * 20, dtype=np.int8)
    windows = np.arange(len(labels), dtype=np.float32).reshape(-1, 1, 1)
    sources = np.array([0] * 4 + [1] * 40, dtype=np.int32)
    earlier = ReplayBuffer(windows, labels, sources, ["x", "y"])
    # New data: 50 training rows (10 malicious) and 10 test rows, never replayed.
    y = np.array([1] * 10 + [0] * 50, dtype=np.int8)
    split = np.array(["train"] * 50 + ["test"] * 10, dtype=object)
    new = Prepared(X=1000 + np.arange(60, dtype=np.float32)[:, None],
                   idx=np.arange(60)[:, None], y=y, split=split, encoder=None,
                   name="z", family="nsl-kdd")

    grown = grow_replay(earlier, new, "z", size=31, seed=3)
    # x keeps its 4; y and z share the other 27 (13 and 14); within a source the
    # classes share alike (z: 7 malicious, 7 benign).
    assert grown.counts() == {"x": 4, "y": 13, "z": 14}
    assert np.bincount(grown.labels[grown.sources == 2]).tolist() == [7, 7]
    z_rows = grown.windows[grown.sources == 2].ravel() - 1000
    assert set(z_rows.astype(int)) <= set(range(50))
    assert grow_replay(earlier, new, "z", size=0) is None


def test_a_buffer_written_without_sources_is_one_named_source(tmp_path):
    from flows.errors import ModelError
    from teacher.update import read_replay, save_replay

    windows = np.zeros((6, 1, 2), dtype=np.float32)
    labels = np.array([0, 1] * 3, dtype=np.int8)
    save_replay(tmp_path, windows, labels)  # as teacher train wrote it before
    assert read_replay(tmp_path, name="nsl-kdd").counts() == {"nsl-kdd": 6}

    save_replay(tmp_path, windows, labels, np.array([0, 0, 0, 1, 1, 2]), ["a", "b"])
    with pytest.raises(ModelError, match="its sources do not fit its rows"):
        read_replay(tmp_path)


# 2. Forgetting measured on every dataset learned -------------------------------


def _f1_fpr(ckpt: Path, path: Path) -> tuple[dict, dict]:
    """F1 and FPR of a checkpoint on a file's test rows, counted here (sklearn),
    and how many benign and malicious rows those are."""
    from sklearn.metrics import confusion_matrix, f1_score

    from teacher.checkpoint import load_teacher
    from teacher.data import prepare

    teacher = load_teacher(ckpt, device="cpu")
    prep = prepare(path, encoder=teacher.encoder, seed=0, need_split=True)
    rows = prep.rows("test")
    y = prep.y[rows].astype(int)
    pred = (teacher.predict_proba(prep.windows(rows)) >= teacher.threshold)
    tn, fp, _, _ = confusion_matrix(y, pred.astype(int), labels=[0, 1]).ravel()
    scores = {"test_f1": f1_score(y, pred), "test_fpr": fp / (fp + tn)}
    return scores, {"benign": int((y == 0).sum()), "malicious": int((y == 1).sum())}


def test_an_update_scores_every_dataset_the_chain_learned(chain):
    """Found: B -> C measured forgetting on b only; a, learned first, went
    unmeasured."""
    root, files = chain["root"], chain["files"]
    sources = chain["C"]["sources"]
    assert [(s["role"], s["data"]) for s in sources] == [
        ("trained", str(files["a"].resolve())),
        ("update 1", str(files["b"].resolve())),
        ("new", str(files["c"].resolve()))]
    for entry, name in zip(sources, "abc", strict=True):
        for when, ckpt in (("before", root / "B"), ("after", root / "C")):
            want, rows = _f1_fpr(ckpt, files[name])
            assert entry[when] == pytest.approx(want), (name, when)
            assert entry["test_rows"] == rows
    # The flat keys stay: old is the checkpoint's own data (b), new is c.
    assert chain["C"]["before"]["old_test_f1"] == sources[1]["before"]["test_f1"]
    assert chain["C"]["after"]["new_test_f1"] == sources[2]["after"]["test_f1"]

    # C's provenance lists the three datasets for the next update.
    prov = json.loads((root / "C" / "provenance.json").read_text())
    assert [e["data"] for e in prov["learned"]] == [s["data"] for s in sources]


def test_an_earlier_dataset_no_longer_there_is_reported_missing(chain, tmp_path,
                                                               capsys):
    root, files = chain["root"], chain["files"]
    moved = tmp_path / "a-moved.txt"
    shutil.move(files["a"], moved)
    try:
        report = _update(root / "B", files["c"], tmp_path / "without-a")
        code = main(["update", "--checkpoint", str(root / "B"), "--data",
                     str(files["c"]), "--out", str(tmp_path / "text"), *TINY])
    finally:
        shutil.move(moved, files["a"])
    first = report["sources"][0]
    assert first["role"] == "trained" and first["data"] == str(files["a"].resolve())
    assert first["missing"] == f"{files['a'].resolve()}: no such file"
    assert "before" not in first
    assert [s["role"] for s in report["sources"][1:]] == ["update 1", "new"]
    assert report["sources"][1]["before"] == chain["C"]["sources"][1]["before"]

    # The text output names it on its own line.
    assert code == 0
    out = capsys.readouterr().out
    assert f"  trained: {files['a'].resolve()}: missing (" in out


def test_old_data_is_listed_once_and_apart_when_not_learned(chain, tmp_path,
                                                            monkeypatch):
    root, files = chain["root"], chain["files"]
    # Named by a relative path, a learned file is still that dataset.
    monkeypatch.chdir(files["a"].parent)
    report = _update(root / "B", files["c"], tmp_path / "old-a", "--old-data",
                     files["a"].name)
    roles = [(s["role"], s["data"]) for s in report["sources"]]
    assert roles == [(s["role"], s["data"]) for s in chain["C"]["sources"]]
    assert report["before"]["old_test_f1"] == \
        report["sources"][0]["before"]["test_f1"]

    other = tmp_path / "d.txt"
    other.write_text(kdd_rows(9, 200))
    report = _update(root / "B", files["c"], tmp_path / "old-d", "--old-data",
                     str(other))
    assert [s["role"] for s in report["sources"]] == [
        "trained", "update 1", "--old-data", "new"]
    assert report["sources"][2]["data"] == str(other.resolve())


def test_learned_sources_follows_checkpoints_updated_before_the_list(tmp_path):
    """A checkpoint updated before ``learned`` was recorded: its chain is found
    through ``updated_from``; an earlier checkpoint that is gone is named."""
    from teacher.update import learned_sources

    first = tmp_path / "first"
    first.mkdir()
    (first / "provenance.json").write_text(json.dumps(
        {"dataset": "nsl-kdd", "files": {}, "seed": 2}))
    second = {"dataset": "/d/b.txt", "seed": 0, "updated_from": str(first),
              "timezone": "Europe/Prague"}
    got = learned_sources(second)
    assert [(e["data"], e["seed"], e["timezone"]) for e in got] == [
        ("nsl-kdd", 2, "UTC"), ("/d/b.txt", 0, "Europe/Prague")]
    gone = {**second, "updated_from": str(tmp_path / "gone")}
    assert learned_sources(gone)[0] == {"data": None,
                                        "checkpoint": str(tmp_path / "gone")}


# 3. --init-from with a file of another family: refused from its head -----------

CONN_HEADER = (
    "#separator \\x09\n#set_separator\t,\n#empty_field\t(empty)\n"
    "#unset_field\t-\n#path\tconn\n"
    "#fields\tts\tuid\tid.orig_h\tid.orig_p\tid.resp_h\tid.resp_p\tproto\tservice"
    "\tduration\torig_bytes\tresp_bytes\tconn_state\tmissed_bytes\thistory"
    "\torig_pkts\torig_ip_bytes\tresp_pkts\tresp_ip_bytes\n"
    "#types\ttime\tstring\taddr\tport\taddr\tport\tenum\tstring\tinterval\tcount"
    "\tcount\tstring\tcount\tstring\tcount\tcount\tcount\tcount\n"
)


@pytest.fixture(scope="module", params=["plain", "gzip"])
def big_conn(request, tmp_path_factory) -> Path:
    """A 60 000-flow Zeek conn.log (about 6 MB), plain or gzipped."""
    lines = [CONN_HEADER]
    for i in range(60_000):
        lines.append(f"{1600000000 + i}.000000\tC{i:017d}\t10.0.0.{i % 200}\t"
                     f"{40000 + i % 9000}\t10.1.0.1\t80\ttcp\thttp\t0.5\t300\t"
                     "900\tSF\t0\tShADadFf\t6\t620\t5\t1160\n")
    text = "".join(lines).encode()
    folder = tmp_path_factory.mktemp("conn")
    if request.param == "gzip":
        path = folder / "big.conn.log.gz"
        path.write_bytes(gzip.compress(text))
    else:
        path = folder / "big.conn.log"
        path.write_bytes(text)
    return path


@pytest.mark.parametrize("command", ["train", "update"])
def test_a_file_of_another_family_is_refused_before_it_is_read(
        chain, big_conn, command, tmp_path, monkeypatch, capsys):
    """Found: ``train --init-from`` (and ``update``) on a conn.log with an
    nsl-kdd checkpoint read and parsed the whole file before refusing it."""
    import flows.readers
    import teacher.data

    calls = []
    real_read = flows.readers.read

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real_read(*args, **kwargs)

    monkeypatch.setattr(flows.readers, "read", counted)
    flag = "--init-from" if command == "train" else "--checkpoint"
    argv = [command, flag, str(chain["root"] / "A"), "--data", str(big_conn),
            "--out", str(tmp_path / "out"), "-q"]

    capsys.readouterr()
    code = main(argv)
    [line] = capsys.readouterr().err.strip().splitlines()
    assert (code, calls) == (3, [])
    assert not (tmp_path / "out").exists()

    # The same exit and words as when the whole file is read (a head that does
    # not tell the family), which needs one whole read.
    monkeypatch.setattr(teacher.data, "sniff_family", lambda _path: None)
    code = main(argv)
    [after_read] = capsys.readouterr().err.strip().splitlines()
    assert (code, calls) == (3, [str(big_conn)])
    assert line == after_read == (
        f"error: {big_conn} holds 'conn' records but the checkpoint's encoder was "
        "fitted on 'nsl-kdd'")


def test_sniff_family_reads_the_head_only(big_conn):
    from teacher.data import sniff_family

    assert sniff_family(big_conn) == "conn"
