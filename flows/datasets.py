"""Where each dataset lives, how to check it, and how to load it with its splits.

:data:`REGISTRY` names the datasets gatewatch knows. Each file has a path relative
to the data directory, its sha256, the raw download address of the copy the project
was built with (a public repository pinned to a commit) and the official homepage of
the dataset. The data directory is the ``--data-dir`` flag, else the
``GATEWATCH_DATA`` environment variable (:func:`data_dir`).

:func:`load_dataset` checks every file's sha256 (the result is cached per path,
modification time and size, so loading again costs no hashing), reads the files
with :func:`flows.readers.read`, and returns one table with two extra columns:
``capture`` (which file a row came from) and ``split`` (``train``/``val``/``test``):

* ``nsl-kdd``, ``nsl-kdd-20``: the official split. KDDTest+ is the test set and only
  the test set; train/val is a stratified 90/10 of KDDTrain+ (or of its 20% file),
  stratified on the attack name. (KDDTest+ and KDDTrain+ share 610 identical rows:
  that is the published data, not a leak made here.)
* ``unsw-nb15``, ``ctu-conn``: a stratified 80/10/10, on ``label_detail`` where a row
  has one, else the label; for ``ctu-conn`` within each capture.

``ctu-conn`` keeps the Background rows with a null label: they are context inside
windows, not training targets.

Window defaults: ``ctu-conn`` is in capture order (Zeek's: each connection as it
ends; windows keep that order, see ``flows.windows``) and is windowed per source
host with W = 8 (short enough that a host's first flows are not mostly padding;
the teacher tunes it). NSL-KDD and UNSW-NB15 records are not in time order, so
they default to W = 1 in stream order. In the UNSW-NB15 CSV the rows are even
sorted by class (four label runs in 82,332 rows), so stream windows with W > 1
would let a row's neighbours give its label away.

:func:`download` fetches missing files from the registry's addresses with urllib,
unpacks zip members and gzips where the registry's copy is gzipped, and checks the
sha256 before putting a file in place. The addresses are the pinned public copies the
project was built with; the official homepages are listed for users, but their
download pages (forms, cloud folders) are not fetched automatically.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from flows import logger
from flows.errors import BadInputError, DataMissingError, UsageError
from flows.splits import (
    leave_capture_out,
    official_split,
    strata_of,
    stratified_split,
)

ENV_VAR = "GATEWATCH_DATA"

NSL_KDD_HOME = "https://www.unb.ca/cic/datasets/nsl.html"
UNSW_NB15_HOME = "https://research.unsw.edu.au/projects/unsw-nb15-dataset"
STRATOSPHERE_HOME = "https://www.stratosphereips.org/datasets-overview"

_RAW = "https://raw.githubusercontent.com"
_NSL_ZIP = (
    f"{_RAW}/mekkheir/Dataset/33515a0cc85db4c22ca38258c7c7ed91b7b9675f/NSL_KDD.zip"
)
_UNSW_ZIP = (
    f"{_RAW}/Moe433/Assignment_1/65e21bc9c290ef3edab0e27c011f2e41a63fedce/"
    "UNSW_NB15_training-set.csv.zip"
)
_STRATO = (
    f"{_RAW}/stratosphereips/security-datasets-for-testing/"
    "1c90a3692012ad7ee9c271241965da4e2799f957"
)


@dataclass(frozen=True)
class DataFile:
    """One file of a dataset: where it goes, what it hashes to, where it comes from.

    ``sha256`` is the hash of the file as stored. ``content_sha256``, for a gzipped
    file, is the hash of its uncompressed bytes: a copy gzipped again by
    :func:`download` has other bytes but the same content. ``member`` names the file
    inside a zip at ``url``. ``role`` is ``train``, ``test`` or ``all``.
    """

    path: str
    sha256: str
    url: str
    homepage: str
    role: str
    capture: str
    member: str | None = None
    content_sha256: str | None = None
    note: str = ""


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its files, feature family, split rule and defaults."""

    name: str
    family: str
    files: tuple[DataFile, ...]
    split: str  # "official" (train/test files) or "stratified" (80/10/10)
    group_by_default: str
    window_default: int
    time_ordered: bool
    homepage: str
    citation: str
    stratify_by_capture: bool = False


_KDD_TRAIN = DataFile(
    path="nsl-kdd/KDDTrain+.txt.gz",
    sha256="39e78eaceffb1a183af002b4994b100b69795895bfbf67cfc62dabd4c9b76d4e",
    content_sha256="1b86d2f957b33082081bba410fe129b475efebcc13c9014c3f447c8271aadf95",
    url=_NSL_ZIP, member="KDDTrain+.txt", homepage=NSL_KDD_HOME, role="train",
    capture="KDDTrain+", note="member of the zip, gzipped here",
)
_KDD_TRAIN_20 = DataFile(
    path="nsl-kdd/KDDTrain+_20Percent.txt",
    sha256="7ea86479faab5ca2190b7f18b4982fb058ce5bf2b46e0e1017d0d9ef90f9c16e",
    url=_NSL_ZIP, member="KDDTrain+_20Percent.txt", homepage=NSL_KDD_HOME,
    role="train", capture="KDDTrain+_20Percent", note="member of the zip",
)
_KDD_TEST = DataFile(
    path="nsl-kdd/KDDTest+.txt",
    sha256="fa46b0935342616aa83b7c2578db355b6a7aaabbc492248172c7a1e8b7ab8f84",
    url=_NSL_ZIP, member="KDDTest+.txt", homepage=NSL_KDD_HOME, role="test",
    capture="KDDTest+", note="member of the zip",
)
_KDD_CITATION = (
    "Tavallaee, Bagheri, Lu, Ghorbani: A Detailed Analysis of the KDD CUP 99 Data "
    "Set, CISDA 2009"
)

# TODO(gap): no CIC-IDS dataset is registered (no copy small enough in the shared
# data); the encoder knows the cic family, the registry does not.
REGISTRY: dict[str, DatasetSpec] = {
    "nsl-kdd": DatasetSpec(
        name="nsl-kdd", family="nsl-kdd", files=(_KDD_TRAIN, _KDD_TEST),
        split="official", group_by_default="stream", window_default=1,
        time_ordered=False, homepage=NSL_KDD_HOME, citation=_KDD_CITATION,
    ),
    "nsl-kdd-20": DatasetSpec(
        name="nsl-kdd-20", family="nsl-kdd", files=(_KDD_TRAIN_20, _KDD_TEST),
        split="official", group_by_default="stream", window_default=1,
        time_ordered=False, homepage=NSL_KDD_HOME, citation=_KDD_CITATION,
    ),
    "unsw-nb15": DatasetSpec(
        name="unsw-nb15", family="unsw-nb15",
        files=(
            DataFile(
                path="unsw-nb15/UNSW_NB15_training-set.csv.gz",
                sha256="611e2b334b3980ce1a7208a5ca55f751472b9dc47b8382e19b6bf89701ca31f7",
                # Hash of the uncompressed CSV, taken from the registry's copy.
                content_sha256=(
                    "734fe6642edf758f7c94d7d9149426b49d202fe8e7bf0bef47392489c3c0a559"
                ),
                url=_UNSW_ZIP, member="UNSW_NB15_training-set.csv",
                homepage=UNSW_NB15_HOME, role="all", capture="UNSW_NB15_training-set",
                note="member of the zip, gzipped here; its 82,332 rows are the "
                "partition the UNSW paper calls the testing set",
            ),
        ),
        split="stratified", group_by_default="stream", window_default=1,
        time_ordered=False, homepage=UNSW_NB15_HOME,
        citation="Moustafa, Slay: UNSW-NB15, MilCIS 2015",
    ),
    "ctu-conn": DatasetSpec(
        name="ctu-conn", family="conn",
        files=(
            DataFile(
                path="zeek-conn/ctu50-normal-40-day1.conn.log.labeled",
                sha256="d8ebdbd675c1659b4b283fcd26ad0dad8a2043ed6ca37f9806c11d99f24ba40f",
                url=f"{_STRATO}/008-zeek-mixed/data/conn.log.labeled",
                homepage=STRATOSPHERE_HOME, role="all",
                capture="ctu50-normal-40-day1",
            ),
            DataFile(
                path="zeek-conn/ctu-malware-botnet-230-1-njrat-first1000.conn.log.labeled",
                sha256="0871016451ce1ebf8713bc0b117079c490615290cbff034b735d096b35722e82",
                url=f"{_STRATO}/001-zeek-scenario-malicious/labeled-conn.log",
                homepage=STRATOSPHERE_HOME, role="all",
                capture="ctu-malware-botnet-230-1-njrat",
                note="first 1,000 lines of the capture; ts are relative seconds",
            ),
        ),
        split="stratified", group_by_default="src_ip", window_default=8,
        time_ordered=True, homepage=STRATOSPHERE_HOME,
        citation="Garcia, Valeros: Stratosphere Laboratory datasets, CTU Prague",
        stratify_by_capture=True,
    ),
}


def data_dir(flag: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: ``flag``, else ``$GATEWATCH_DATA``, else a UsageError."""
    value = flag if flag is not None else os.environ.get(ENV_VAR)
    if not value:
        raise UsageError(
            "no data directory: pass --data-dir DIR or set "
            f"{ENV_VAR}=DIR (the folder that holds nsl-kdd/, zeek-conn/, ...)"
        )
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"data directory {path} is not a directory")
    return path


def get_spec(name: str | DatasetSpec) -> DatasetSpec:
    """The registry entry of ``name`` (a spec passes through); UsageError if unknown."""
    if isinstance(name, DatasetSpec):
        return name
    try:
        return REGISTRY[name]
    except KeyError:
        raise UsageError(
            f"unknown dataset {name!r}; known: {', '.join(sorted(REGISTRY))}"
        ) from None


# ---- checksums ---------------------------------------------------------------------

_DIGESTS: dict[tuple[str, int, int, bool], str] = {}


def sha256_of(path: str | os.PathLike[str], uncompressed: bool = False) -> str:
    """sha256 of a file (of its gunzipped bytes with ``uncompressed``), cached.

    The cache key is the resolved path, modification time and size, so a changed
    file is hashed again.
    """
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, uncompressed)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        opener = gzip.open if uncompressed else open
        with opener(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def verify_file(path: Path, entry: DataFile, dataset: str = "") -> None:
    """Check ``path`` against the registry entry; DataMissingError if it differs."""
    got = sha256_of(path)
    if got == entry.sha256:
        return
    if entry.content_sha256 and _is_gzip(path):
        try:
            if sha256_of(path, uncompressed=True) == entry.content_sha256:
                return
        except (OSError, EOFError, gzip.BadGzipFile):
            pass
    raise DataMissingError(
        f"{path}: sha256 {got} does not match the registry's {entry.sha256} for "
        f"{entry.path} of dataset {dataset!r}; the file is damaged or another "
        f"version. Fetch it again from {entry.url} (official source: "
        f"{entry.homepage})."
    )


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def locate(name: str | DatasetSpec, data_dir_flag: Any = None) -> list[Path]:
    """Paths of a dataset's files, each present and verified; else DataMissingError."""
    spec = get_spec(name)
    root = data_dir(data_dir_flag)
    paths = []
    for entry in spec.files:
        path = root / entry.path
        if not path.is_file():
            raise DataMissingError(
                f"{entry.path} of dataset {spec.name!r} is missing from {root}. It "
                f"comes from {entry.url}"
                + (f" ({entry.note})" if entry.note else "")
                + f"; official source: {entry.homepage}. Get it with "
                f"flows.datasets.download({spec.name!r}, {str(root)!r}), or put the "
                "file there by hand."
            )
        verify_file(path, entry, spec.name)
        paths.append(path)
    return paths


# ---- download ----------------------------------------------------------------------


def download(
    name: str | DatasetSpec,
    data_dir_flag: Any = None,
    *,
    force: bool = False,
    timeout: float = 120.0,
) -> list[Path]:
    """Fetch the dataset's missing (or, with ``force``, all) files into the data dir.

    Each file is fetched from its registry address (``https://`` or ``file://``),
    taken out of its zip when it is a member, gzipped when the registry's copy is a
    ``.gz``, and checked against the registry's sha256 before it is moved in place.
    Files that are present and verify are left alone. Returns the files' paths.
    """
    spec = get_spec(name)
    root = data_dir(data_dir_flag)
    fetched: dict[str, bytes] = {}
    paths = []
    for entry in spec.files:
        target = root / entry.path
        if target.is_file() and not force:
            try:
                verify_file(target, entry, spec.name)
                paths.append(target)
                continue
            except DataMissingError:
                logger.warning("%s fails its checksum; fetching it again", target)

        # Fetch (once per address), unpack, gzip, check, then move in place.
        if entry.url not in fetched:
            fetched[entry.url] = _fetch(entry.url, timeout)
        body = _unpack(fetched[entry.url], entry)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".download-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(body)
            verify_file(Path(tmp), entry, spec.name)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        logger.info("downloaded %s (%d bytes) from %s", target, len(body), entry.url)
        paths.append(target)
    return paths


def _fetch(url: str, timeout: float) -> bytes:
    """The bytes at ``url`` (https, http or file); DataMissingError when unreachable."""
    if not url.startswith(("https://", "http://", "file://")):
        raise UsageError(f"refusing to download from {url!r}: not http(s) or file")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            return response.read()
    except (OSError, ValueError) as exc:
        raise DataMissingError(f"cannot download {url}: {exc}") from exc


def _unpack(raw: bytes, entry: DataFile) -> bytes:
    """The file's bytes from what was fetched: zip member out, gzip on if needed."""
    body = raw
    if entry.member is not None:
        try:
            with zipfile.ZipFile(io.BytesIO(raw)) as archive:
                names = [
                    n for n in archive.namelist()
                    if n.rsplit("/", 1)[-1] == entry.member and "__MACOSX" not in n
                ]
                if not names:
                    raise DataMissingError(
                        f"{entry.url} has no member {entry.member!r} "
                        f"(members: {archive.namelist()[:10]})"
                    )
                body = archive.read(names[0])
        except zipfile.BadZipFile as exc:
            raise DataMissingError(f"{entry.url} is not a zip file ({exc})") from exc
    if entry.path.endswith(".gz") and body[:2] != b"\x1f\x8b":
        body = gzip.compress(body, compresslevel=9, mtime=0)
    return body


# ---- loading -----------------------------------------------------------------------


@dataclass
class Dataset:
    """A loaded dataset: one table of every row, with ``capture`` and ``split``.

    ``group_by_default`` and ``window_default`` are the window settings to fit an
    encoder with; ``time_ordered`` says whether the rows follow capture time (see the
    module doc for why W = 1 where they do not). ``files`` maps each relative path to
    its verified sha256.
    """

    name: str
    family: str
    table: Any  # pyarrow.Table
    group_by_default: str
    window_default: int
    time_ordered: bool
    spec: DatasetSpec
    files: dict[str, str] = field(default_factory=dict)

    @property
    def split(self) -> np.ndarray:
        """The split of each row (object array of str)."""
        return np.array(self.table.column("split").to_pylist(), dtype=object)

    def rows(self, split: str) -> np.ndarray:
        """Row indices of one split."""
        return np.flatnonzero(self.split == split)

    def counts(self) -> dict[str, dict[str, int]]:
        """Rows per split and label (``"1"``, ``"0"``, ``"null"``)."""
        labels = self.table.column("label").to_pylist()
        out: dict[str, dict[str, int]] = {}
        for s, y in zip(self.split.tolist(), labels, strict=True):
            key = "null" if y is None else str(int(y))
            out.setdefault(s, {}).setdefault(key, 0)
            out[s][key] += 1
        return out

    def with_split(self, split: Sequence[str]) -> Dataset:
        """A copy whose ``split`` column is ``split``."""
        import pyarrow as pa

        split = np.asarray(split, dtype=object)
        if split.shape != (self.table.num_rows,):
            raise UsageError(
                f"{split.size} split values for {self.table.num_rows} rows"
            )
        bad = set(split.tolist()) - {"train", "val", "test"}
        if bad:
            raise UsageError(f"split values must be train/val/test, got {sorted(bad)}")
        index = self.table.column_names.index("split")
        column = pa.array(split.tolist(), pa.string())
        table = self.table.set_column(index, "split", column)
        return replace(self, table=table)

    def groups(self, by: str = "capture") -> np.ndarray:
        """Per row the capture file (``by="capture"``) or source host (``"src_ip"``)."""
        if by not in self.table.column_names:
            raise UsageError(f"dataset {self.name!r} has no {by!r} column to group by")
        return np.array(self.table.column(by).to_pylist(), dtype=object)

    def leave_capture_out(
        self,
        held_out: Any,
        by: str = "capture",
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> Dataset:
        """A copy where every row of the held-out captures (or hosts) is test."""
        columns = _label_columns(self.table)
        split = leave_capture_out(
            self.groups(by), held_out, strata_of(columns), val_fraction, seed
        )
        return self.with_split(split)

    def folds(
        self, by: str = "capture", seed: int = 0
    ) -> Iterator[tuple[str, Dataset]]:
        """Leave-one-out over captures (or hosts): ``(held-out group, dataset)``."""
        for group in sorted({"" if g is None else str(g) for g in self.groups(by)}):
            yield group, self.leave_capture_out(group, by=by, seed=seed)


def load_dataset(name: str, data_dir: Any = None, seed: int = 0) -> Dataset:
    """Verify, read and split a registered dataset (see the module doc)."""
    import pyarrow as pa

    from flows.readers import read

    spec = get_spec(name)
    paths = locate(spec, data_dir)

    # Read each file; tag its rows with the capture and the file's role.
    tables, roles = [], []
    for entry, path in zip(spec.files, paths, strict=True):
        result = read(str(path))
        if result.family != spec.family:
            raise BadInputError(
                f"read as {result.family!r}, expected the {spec.family!r} family",
                path=str(path),
            )
        for warning in result.warnings:
            logger.warning("%s", warning)  # readers name the file
        table = result.table
        table = table.append_column(
            "capture", pa.array([entry.capture] * table.num_rows, pa.string())
        )
        tables.append(table)
        roles.extend([entry.role] * table.num_rows)
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    table = table.combine_chunks()

    # Splits.
    columns = _label_columns(table)
    strata = strata_of(columns, by_capture=spec.stratify_by_capture)
    if spec.split == "official":
        split = official_split(np.array(roles) == "test", strata, 0.1, seed)
    else:
        # TODO(gap): a row-level split lets a test row's window hold train rows as
        # context (their features, never their labels); leave_capture_out avoids it.
        split = stratified_split(strata, (0.8, 0.1, 0.1), seed)
    table = table.append_column("split", pa.array(split.tolist(), pa.string()))

    logger.info(
        "loaded %s: %d rows from %d files (train %d, val %d, test %d)",
        spec.name, table.num_rows, len(paths), *(int((split == s).sum())
                                                 for s in ("train", "val", "test")),
    )
    return Dataset(
        name=spec.name,
        family=spec.family,
        table=table,
        group_by_default=spec.group_by_default,
        window_default=spec.window_default,
        time_ordered=spec.time_ordered,
        spec=spec,
        files={e.path: e.sha256 for e in spec.files},
    )


def _label_columns(table: Any) -> dict[str, Any]:
    """The label, label_detail and capture columns of a table, as Python lists."""
    return {
        name: table.column(name).to_pylist()
        for name in ("label", "label_detail", "capture")
        if name in table.column_names
    }


__all__ = [
    "REGISTRY",
    "DataFile",
    "Dataset",
    "DatasetSpec",
    "data_dir",
    "download",
    "get_spec",
    "load_dataset",
    "locate",
    "sha256_of",
    "verify_file",
]
