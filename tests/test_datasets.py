"""Tests of the dataset registry, checksums, download and the splits."""

from __future__ import annotations

import gzip
import hashlib
import io
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import flows.datasets as datasets
from flows.datasets import (
    REGISTRY,
    DataFile,
    DatasetSpec,
    data_dir,
    download,
    load_dataset,
    locate,
    sha256_of,
)
from flows.errors import DataMissingError, UsageError
from flows.splits import (
    leave_capture_out,
    leave_one_out_folds,
    official_split,
    strata_of,
    stratified_split,
    train_val_split,
)
from tests.conftest import data_file

# ---- splits ------------------------------------------------------------------------


def expected_counts(n: int, fractions=(0.8, 0.1, 0.1)) -> list[int]:
    """Rows per part of a stratum of n rows, from the documented rounding rule."""
    cuts = [0] + [int(np.rint(c * n)) for c in np.cumsum(fractions)]
    cuts[-1] = n
    return [cuts[k + 1] - cuts[k] for k in range(len(fractions))]


def test_stratified_split_is_deterministic_and_seeded():
    strata = ["a"] * 500 + ["b"] * 120 + ["c"] * 7
    one = stratified_split(strata, seed=3)
    assert np.array_equal(one, stratified_split(strata, seed=3))
    assert not np.array_equal(one, stratified_split(strata, seed=4))
    assert set(one.tolist()) == {"train", "val", "test"}


def test_stratified_split_proportions_per_stratum():
    rng = np.random.default_rng(0)
    sizes = {"normal": 1000, "dos": 333, "probe": 41, "u2r": 3, "lonely": 1}
    strata = np.array([k for k, n in sizes.items() for _ in range(n)], dtype=object)
    strata = strata[rng.permutation(strata.size)]
    split = stratified_split(strata, seed=0)
    for name, n in sizes.items():
        got = Counter(split[strata == name].tolist())
        want = dict(zip(("train", "val", "test"), expected_counts(n), strict=True))
        assert {k: got.get(k, 0) for k in want} == want, name
    assert abs((split == "train").mean() - 0.8) < 0.01


def test_train_val_and_official_split():
    strata = ["x"] * 90 + ["y"] * 10 + ["x"] * 30
    is_test = np.array([False] * 100 + [True] * 30)
    split = official_split(is_test, strata, val_fraction=0.1, seed=1)
    assert (split[is_test] == "test").all()
    assert not (split[~is_test] == "test").any()
    assert Counter(split[:90].tolist()) == {"train": 81, "val": 9}
    assert Counter(split[90:100].tolist()) == {"train": 9, "val": 1}
    assert set(train_val_split(strata, 0.1).tolist()) == {"train", "val"}


def test_leave_capture_out_keeps_held_out_groups_out_of_training():
    groups = np.array(["cap1"] * 50 + ["cap2"] * 30 + ["cap3"] * 20, dtype=object)
    strata = np.where(np.arange(100) % 3 == 0, "bad", "good")
    split = leave_capture_out(groups, ["cap2"], strata, seed=0)
    assert (split[groups == "cap2"] == "test").all()
    assert not (split[groups != "cap2"] == "test").any()
    assert {"train", "val"} <= set(split[groups != "cap2"].tolist())

    folds = dict(leave_one_out_folds(groups, strata))
    assert sorted(folds) == ["cap1", "cap2", "cap3"]
    for group, fold in folds.items():
        np.testing.assert_array_equal(fold == "test", groups == group)
    with pytest.raises(UsageError, match="cap9"):
        leave_capture_out(groups, "cap9")
    with pytest.raises(UsageError, match="nothing to train"):
        leave_capture_out(groups, ["cap1", "cap2", "cap3"])


def test_strata_prefer_detail_then_label():
    cols = {
        "label": [1, 0, None, 1],
        "label_detail": ["neptune", None, None, "CC"],
        "capture": ["a", "a", "b", "b"],
    }
    assert strata_of(cols).tolist() == ["neptune", "label=0", "label=null", "CC"]
    assert strata_of(cols, by_capture=True).tolist() == [
        "a|neptune", "a|label=0", "b|label=null", "b|CC"
    ]


def test_bad_fractions_are_usage_errors():
    with pytest.raises(UsageError):
        stratified_split(["a"], (0.5, 0.4, 0.3))
    with pytest.raises(UsageError):
        stratified_split(["a"], (0.5, 0.5))
    with pytest.raises(UsageError):
        train_val_split(["a"], 1.5)


# ---- data directory, checksums, missing files ----------------------------------------


def test_data_dir_flag_then_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GATEWATCH_DATA", str(tmp_path / "env"))
    assert data_dir(tmp_path / "flag") == tmp_path / "flag"
    assert data_dir() == tmp_path / "env"
    monkeypatch.delenv("GATEWATCH_DATA")
    with pytest.raises(UsageError, match="GATEWATCH_DATA"):
        data_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        data_dir(tmp_path / "file")


def test_registry_entries_are_complete():
    assert {"nsl-kdd", "nsl-kdd-20", "unsw-nb15", "ctu-conn"} <= set(REGISTRY)
    for spec in REGISTRY.values():
        for entry in spec.files:
            assert len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0
            assert entry.url.startswith("https://raw.githubusercontent.com/")
            assert entry.homepage.startswith("https://")
            assert entry.role in ("train", "test", "all")
    assert REGISTRY["nsl-kdd"].files[1].path == "nsl-kdd/KDDTest+.txt"
    assert REGISTRY["ctu-conn"].group_by_default == "src_ip"
    assert REGISTRY["nsl-kdd"].group_by_default == "stream"
    with pytest.raises(UsageError, match="known"):
        load_dataset("no-such-set", data_dir=".")


def test_missing_file_names_it_and_its_source(tmp_path):
    with pytest.raises(DataMissingError) as info:
        load_dataset("nsl-kdd", data_dir=tmp_path)
    message = str(info.value)
    assert "nsl-kdd/KDDTrain+.txt.gz" in message
    assert "mekkheir/Dataset" in message and "unb.ca/cic" in message
    assert "download" in message
    assert info.value.exit_code == 3


def test_wrong_checksum_is_refused(tmp_path):
    for entry in REGISTRY["ctu-conn"].files:
        path = tmp_path / entry.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#separator \\x09\nnot the real file\n")
    with pytest.raises(DataMissingError, match="does not match"):
        load_dataset("ctu-conn", data_dir=tmp_path)


def test_checksums_are_cached_per_path_mtime_and_size(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    want = hashlib.sha256(b"abc").hexdigest()
    assert sha256_of(path) == want

    # Cached: hashing again does not open the file.
    def no_open(*args, **kwargs):
        raise AssertionError("the file was read again")

    monkeypatch.setattr(datasets, "open", no_open, raising=False)
    assert sha256_of(path) == want
    monkeypatch.undo()

    # Changed content and size: hashed again.
    path.write_bytes(b"abcd")
    assert sha256_of(path) == hashlib.sha256(b"abcd").hexdigest()


# ---- download (file:// only: tests never use the network) ----------------------------


def make_spec(tmp_path: Path) -> tuple[DatasetSpec, bytes, bytes]:
    """A spec of two files served from file:// URLs: a plain file, a zipped member."""
    plain = b"first file\n" * 50
    member = b"inside the zip\n" * 80
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "plain.txt").write_bytes(plain)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("__MACOSX/dir/._member.txt", b"junk")
        archive.writestr("dir/member.txt", member)
    (tmp_path / "src" / "pack.zip").write_bytes(buffer.getvalue())
    base = (tmp_path / "src").as_uri()
    files = (
        DataFile(
            path="set/plain.txt", sha256=hashlib.sha256(plain).hexdigest(),
            url=f"{base}/plain.txt", homepage="https://example.org/home",
            role="all", capture="plain",
        ),
        DataFile(
            path="set/member.txt.gz", sha256="0" * 64,
            content_sha256=hashlib.sha256(member).hexdigest(),
            url=f"{base}/pack.zip", member="member.txt",
            homepage="https://example.org/home", role="all", capture="member",
        ),
    )
    spec = DatasetSpec(
        name="toy", family="conn", files=files, split="stratified",
        group_by_default="src_ip", window_default=8, time_ordered=True,
        homepage="https://example.org/home", citation="none",
    )
    return spec, plain, member


def test_download_from_file_urls(tmp_path):
    spec, plain, member = make_spec(tmp_path)
    root = tmp_path / "data"
    paths = download(spec, root)
    assert paths == [root / "set/plain.txt", root / "set/member.txt.gz"]
    assert paths[0].read_bytes() == plain
    assert gzip.decompress(paths[1].read_bytes()) == member
    assert locate(spec, root) == paths  # both verify (the .gz by its content)
    assert not list((root / "set").glob(".download-*"))

    # Present and valid: left alone.
    stamp = paths[0].stat().st_mtime_ns
    download(spec, root)
    assert paths[0].stat().st_mtime_ns == stamp


def test_download_refuses_a_wrong_checksum(tmp_path):
    spec, _, _ = make_spec(tmp_path)
    bad = DataFile(**{**spec.files[0].__dict__, "sha256": "1" * 64})
    spec = DatasetSpec(**{**spec.__dict__, "files": (bad,)})
    root = tmp_path / "data"
    with pytest.raises(DataMissingError, match="does not match"):
        download(spec, root)
    assert not (root / bad.path).exists()
    assert not list((root / "set").glob(".download-*"))


def test_download_reports_missing_member_and_bad_url(tmp_path):
    spec, _, _ = make_spec(tmp_path)
    gone = DataFile(**{**spec.files[1].__dict__, "member": "absent.txt"})
    with pytest.raises(DataMissingError, match="absent.txt"):
        download(DatasetSpec(**{**spec.__dict__, "files": (gone,)}), tmp_path / "d")
    nowhere = DataFile(**{**spec.files[0].__dict__,
                          "url": (tmp_path / "nope.txt").as_uri()})
    with pytest.raises(DataMissingError, match="cannot download"):
        download(DatasetSpec(**{**spec.__dict__, "files": (nowhere,)}), tmp_path / "d")
    ftp = DataFile(**{**spec.files[0].__dict__, "url": "ftp://127.0.0.1/x"})
    with pytest.raises(UsageError, match="refusing"):
        download(DatasetSpec(**{**spec.__dict__, "files": (ftp,)}), tmp_path / "d")


# ---- loading a self-made conn dataset ------------------------------------------------

ZEEK_HEADER = (
    "#separator \\x09\n#set_separator\t,\n#empty_field\t(empty)\n#unset_field\t-\n"
    "#path\tconn\n#open\t2026-01-01-00-00-00\n"
    "#fields\tts\tuid\tid.orig_h\tid.orig_p\tid.resp_h\tid.resp_p\tproto\tservice\t"
    "duration\torig_bytes\tresp_bytes\tconn_state\tmissed_bytes\thistory\torig_pkts\t"
    "orig_ip_bytes\tresp_pkts\tresp_ip_bytes\tlabel\tdetailedlabel\n"
    "#types\ttime\tstring\taddr\tport\taddr\tport\tenum\tstring\tinterval\tcount\t"
    "count\tstring\tcount\tstring\tcount\tcount\tcount\tcount\tstring\tstring\n"
)


def write_labeled_log(path: Path, labels: list[str], seed: int) -> None:
    """A small labeled Zeek conn.log with the given label per row."""
    rng = np.random.default_rng(seed)
    lines = [ZEEK_HEADER]
    for i, label in enumerate(labels):
        detail = "CC" if label == "Malicious" else "-"
        host = f"10.0.0.{rng.integers(1, 4)}"
        lines.append(
            f"{100 + i}.5\tC{i}\t{host}\t{40000 + i}\t8.8.8.8\t53\tudp\tdns\t0.1\t"
            f"{rng.integers(10, 99)}\t50\tSF\t0\tDd\t1\t80\t1\t90\t{label}\t{detail}\n"
        )
    path.write_text("".join(lines) + "#close\t2026-01-01-00-10-00\n")


def test_load_dataset_adds_capture_and_split_and_keeps_background(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    one = ["Benign"] * 60 + ["Malicious"] * 30 + ["Background"] * 10
    two = ["Malicious"] * 40 + ["Background"] * 20
    write_labeled_log(root / "one.log", one, seed=1)
    write_labeled_log(root / "two.log", two, seed=2)
    files = tuple(
        DataFile(path=name, sha256=sha256_of(root / name), url="file:///unused",
                 homepage="https://example.org", role="all", capture=name[:-4])
        for name in ("one.log", "two.log")
    )
    spec = DatasetSpec(
        name="toy", family="conn", files=files, split="stratified",
        group_by_default="src_ip", window_default=8, time_ordered=True,
        homepage="https://example.org", citation="none", stratify_by_capture=True,
    )
    ds = load_dataset(spec, data_dir=root, seed=0)
    table = ds.table
    assert table.num_rows == 160
    assert table.column_names[-2:] == ["capture", "split"]
    captures = np.array(table.column("capture").to_pylist())
    labels = table.column("label").to_pylist()
    split = ds.split
    assert Counter(captures.tolist()) == {"one": 100, "two": 60}
    assert labels.count(None) == 30  # Background kept, label null

    # Stratified within each capture: e.g. capture one's 60 benign rows -> 48/6/6.
    benign_one = (captures == "one") & np.array([y == 0 for y in labels])
    assert Counter(split[benign_one].tolist()) == {"train": 48, "val": 6, "test": 6}
    bg_two = (captures == "two") & np.array([y is None for y in labels])
    assert Counter(split[bg_two].tolist()) == {"train": 16, "val": 2, "test": 2}

    held = ds.leave_capture_out("two")
    np.testing.assert_array_equal(held.split == "test", captures == "two")
    assert [g for g, _ in ds.folds()] == ["one", "two"]
    assert ds.counts()["train"]["null"] == 24


# ---- real data -----------------------------------------------------------------------


@pytest.mark.data
def test_real_nsl_kdd_official_split(data_dir):
    data_file(data_dir, "nsl-kdd/KDDTrain+.txt.gz")
    data_file(data_dir, "nsl-kdd/KDDTest+.txt")
    ds = load_dataset("nsl-kdd", data_dir=data_dir, seed=0)
    split, capture = ds.split, np.array(ds.table.column("capture").to_pylist())
    assert ds.family == "nsl-kdd" and ds.group_by_default == "stream"
    assert (split == "test").sum() == 22544
    assert np.isin(split, ["train", "val"]).sum() == 125973
    np.testing.assert_array_equal(split == "test", capture == "KDDTest+")

    # Validation is 10% of each KDDTrain+ attack name, by the rounding rule.
    details = np.array(ds.table.column("label_detail").to_pylist(), dtype=object)
    dev = capture == "KDDTrain+"
    for name, n in Counter(details[dev].tolist()).items():
        want = n - int(np.rint(0.9 * n))
        assert ((split == "val") & (details == name)).sum() == want, name
    assert Counter(details[dev].tolist())["normal"] == 67343

    again = load_dataset("nsl-kdd", data_dir=data_dir, seed=0)
    np.testing.assert_array_equal(again.split, split)
    other = load_dataset("nsl-kdd", data_dir=data_dir, seed=1)
    assert not np.array_equal(other.split, split)
    assert ((other.split == "test") == (split == "test")).all()


@pytest.mark.data
def test_real_ctu_conn_counts_and_captures(data_dir):
    for entry in REGISTRY["ctu-conn"].files:
        data_file(data_dir, entry.path)
    ds = load_dataset("ctu-conn", data_dir=data_dir)
    assert ds.family == "conn" and ds.group_by_default == "src_ip"
    assert ds.table.num_rows == 5663 + 992
    labels = Counter(ds.table.column("label").to_pylist())
    assert labels == {1: 4201 + 244, 0: 1402 + 9, None: 60 + 739}
    captures = Counter(ds.table.column("capture").to_pylist())
    assert captures == {"ctu50-normal-40-day1": 5663,
                        "ctu-malware-botnet-230-1-njrat": 992}
    split = ds.split
    assert abs((split == "train").mean() - 0.8) < 0.01
    held = ds.leave_capture_out("ctu-malware-botnet-230-1-njrat")
    njrat = np.array(ds.table.column("capture").to_pylist()) != "ctu50-normal-40-day1"
    np.testing.assert_array_equal(held.split == "test", njrat)


@pytest.mark.data
def test_real_nsl_kdd_20_and_unsw(data_dir):
    data_file(data_dir, "nsl-kdd/KDDTrain+_20Percent.txt")
    data_file(data_dir, "unsw-nb15/UNSW_NB15_training-set.csv.gz")
    ds = load_dataset("nsl-kdd-20", data_dir=data_dir)
    assert np.isin(ds.split, ["train", "val"]).sum() == 25192
    assert (ds.split == "test").sum() == 22544

    ds = load_dataset("unsw-nb15", data_dir=data_dir)
    assert ds.table.num_rows == 82332 and ds.window_default == 1
    details = np.array(ds.table.column("label_detail").to_pylist(), dtype=object)
    worms = ds.split[details == "Worms"]
    assert Counter(worms.tolist()) == dict(
        zip(("train", "val", "test"), expected_counts(44), strict=True)
    )
