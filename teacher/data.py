"""Turn a dataset or a flow file into what the teacher trains and scores on.

:func:`prepare` loads a registered dataset (``flows.datasets.load_dataset``) or any
file ``flows.readers.read`` understands, fits the feature encoder on the training rows
(or applies a given, already fitted one), and works out each row's window of
predecessors. The result, :class:`Prepared`, keeps the encoded rows once (``X``) and
the window indices (``idx``); ``windows(rows)`` gathers the ``[n, W, F]`` windows on
demand, so large sets never hold W copies of every row.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flows.errors import BadInputError, UsageError
from teacher import logger

__all__ = [
    "Prepared",
    "check_teacher_files",
    "concat",
    "holdout_types",
    "missing_data",
    "prepare",
    "recorded_data_missing",
    "sniff_family",
    "stratified_split",
    "trained_on",
    "unknown_dataset",
    "warn_trained_on",
    "warn_dataset_trained_on",
]

_FAMILY_COLUMN = {"nsl-kdd": "attack_family"}
_BENIGN_DETAILS = {"normal", "benign", "background", ""}


@dataclass
class Prepared:
    """Encoded rows, their windows, labels and splits for one dataset or file.

    ``y`` is int8 with -1 for unlabeled rows; ``split`` holds "train", "val" or
    "test"; ``families`` (attack family per row, when the data has one) and
    ``details`` (the source's label text) feed per-family recall. ``partial`` says
    the file was damaged part way (a cut gzip or last line): the rows before the
    damage are here, and commands exit 4 after their work. ``timezone`` is the zone
    an Argus binetflow file's start times were read in (files of other formats and
    registered datasets carry epoch times, which it leaves alone); provenance
    records it with the files. ``held`` names the attack types ``prepare`` moved
    to validation before it fitted the encoder (``holdout``). ``origin`` says, per
    row, which key of ``files`` the row was read from (None: all from the one
    file), so a warning can count the rows scored from a file.
    """

    X: np.ndarray
    idx: np.ndarray
    y: np.ndarray
    split: np.ndarray
    encoder: Any
    name: str
    family: str
    families: np.ndarray | None = None
    details: np.ndarray | None = None
    files: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    partial: bool = False
    timezone: str = "UTC"
    held: list[str] = field(default_factory=list)
    origin: np.ndarray | None = None

    @property
    def window(self) -> int:
        """Window length W."""
        return int(self.idx.shape[1])

    @property
    def n_features(self) -> int:
        """Feature count F."""
        return int(self.X.shape[1])

    def rows(self, split: str | None = None, labeled: bool = True) -> np.ndarray:
        """Row numbers of one split (all when None), labeled rows only by default."""
        mask = np.ones(len(self.y), dtype=bool)
        if split is not None:
            mask &= self.split == split
        if labeled:
            mask &= self.y >= 0
        return np.flatnonzero(mask)

    def windows(self, rows: Any) -> np.ndarray:
        """The windows ``float32 [n, W, F]`` of the given rows."""
        from flows.windows import gather_windows

        return gather_windows(self.X, self.idx[np.asarray(rows, dtype=np.int64)])


def stratified_split(
    y: np.ndarray,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> np.ndarray:
    """Seeded stratified train/val/test assignment (array of str) by label."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(y), dtype=object)
    for value in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == value))
        n_train = int(round(fractions[0] * len(rows)))
        n_val = int(round(fractions[1] * len(rows)))
        out[rows[:n_train]] = "train"
        out[rows[n_train:n_train + n_val]] = "val"
        out[rows[n_train + n_val:]] = "test"
    return out


def holdout_types(
    prep: Prepared, fraction: float = 0.3, seed: int = 0, min_rows: int = 20
) -> list[str]:
    """Move whole attack types from train to val, so val measures novel attacks.

    Within each attack family, types other than the family's most common one are
    candidates; a seeded draw holds out about ``fraction`` of them (at least one
    per family with a candidate). Every row of a held-out type, train or val, ends
    up in val. Returns the held-out type names. Test rows are never touched.

    This moves the rows of an encoded ``prep``, whose encoder was fitted with the
    held-out types among its training rows (their value ranges and quantiles, not
    their labels); ``prepare(..., holdout=...)`` holds them out before the encoder
    is fitted, as the teacher commands do.
    """
    if prep.details is None:
        return []
    prep.split, held = _held_out_split(prep.split, prep.y, prep.details,
                                       prep.families, fraction, seed, min_rows)
    return held


def _held_out_split(
    split: np.ndarray, y: np.ndarray, details: Any, families: Any,
    fraction: float, seed: int, min_rows: int = 20,
) -> tuple[np.ndarray, list[str]]:
    """The split with whole attack types moved to val (see :func:`holdout_types`),
    and their names."""
    details = np.asarray(details, dtype=object).astype(str)
    fams = (np.asarray(families, dtype=object).astype(str) if families is not None
            else details)
    dev = np.isin(split, ("train", "val")) & (np.asarray(y) == 1)
    rng = np.random.default_rng(seed)
    held: list[str] = []
    for fam in sorted(set(fams[dev])):
        names, counts = np.unique(details[dev & (fams == fam)], return_counts=True)
        order = np.argsort(-counts, kind="stable")
        candidates = [str(names[i]) for i in order[1:] if counts[i] >= min_rows]
        if not candidates:
            continue
        k = max(1, int(round(fraction * len(candidates))))
        held += sorted(rng.choice(candidates, size=k, replace=False).tolist())
    split = np.asarray(split, dtype=object).copy()
    _types_to_val(split, details, held)
    logger.info("held out %d attack types for validation: %s", len(held), held)
    return split, held


def _types_to_val(split: np.ndarray, details: Any, held: list[str]) -> None:
    """Move, in ``split`` (in place), the train and val rows whose attack type
    (``details``) is one of ``held`` to val; test rows stay where they are."""
    names = np.asarray(details, dtype=object).astype(str)
    split[np.isin(names, [str(h) for h in held])
          & np.isin(split, ("train", "val"))] = "val"


def _registry() -> dict[str, Any]:
    from flows.datasets import REGISTRY

    return REGISTRY


def _entry_files(entry: Any) -> dict[str, str]:
    # Registry entries list their files (relative path + sha256); dicts or objects.
    files = entry.get("files", []) if isinstance(entry, dict) else getattr(
        entry, "files", [])
    out = {}
    for item in files or []:
        get = item.get if isinstance(item, dict) else (
            lambda key, _item=item: getattr(_item, key, None))
        rel = get("path") or get("relpath") or get("name")
        if rel:
            out[str(rel)] = get("sha256")
    return out


DATA_REF = "$GATEWATCH_DATA/"  # how provenance names a file under the data folder


def data_ref(path: str | os.PathLike[str], data_dir: Any = None) -> str:
    """How provenance names the flow file at ``path``: ``$GATEWATCH_DATA/<rel>``
    when it lies under the data folder (``data_dir``, else ``$GATEWATCH_DATA``),
    so a checkpoint still finds it after the folder moved; else its resolved
    path (found from any working folder)."""
    from flows.datasets import data_dir as find_data_dir

    resolved = Path(path).resolve()
    try:
        root = find_data_dir(data_dir).resolve()
    except UsageError:  # no data folder known: the path as it is
        return str(resolved)
    if root in resolved.parents:
        return DATA_REF + resolved.relative_to(root).as_posix()
    return str(resolved)


def sniff_family(path: str | os.PathLike[str]) -> str | None:
    """The feature family of the flow file at ``path``, from its first 64 KiB
    (gunzipped; a Parquet file's schema), without reading the rest; None where the
    head does not tell (then only a whole read can say, and name the problem)."""
    from flows.errors import GatewatchError
    from flows.readers.stream import FORMAT_FAMILY, stream_format

    try:
        found = stream_format(str(path))
    except (GatewatchError, OSError, EOFError, ValueError):
        return None
    if found == "parquet":
        return _parquet_family(path)
    return FORMAT_FAMILY.get(found)


def _parquet_family(path: str | os.PathLike[str]) -> str | None:
    """A Parquet file's feature family from its schema, as the reader finds it
    (the family in the file's metadata, else its column names); None if unsure."""
    try:
        import pyarrow.parquet as pq

        from flows.readers.parquet import FAMILY_KEY, _family_from_columns

        schema = pq.read_schema(str(path))
        family = (schema.metadata or {}).get(FAMILY_KEY, b"").decode()
        return family or _family_from_columns(schema.empty_table(), str(path))
    except Exception:  # noqa: BLE001 - unsure: the whole read names the problem
        return None


def _family_mismatch(source: Any, found: str, encoder: Any,
                     encoder_of: str) -> BadInputError:
    """The error for data of another feature family than a given encoder's."""
    return BadInputError(
        f"{source} holds {found!r} records but {encoder_of}'s encoder was fitted "
        f"on {encoder.family!r}"
    )


def _load(
    source: str | os.PathLike[str], data_dir: Any, seed: int, timezone: str = "UTC",
    encoder: Any = None, encoder_of: str = "the checkpoint",
) -> dict[str, Any]:
    """The table, family and files of a dataset name or a flow file; ``timezone``
    is the zone of a binetflow file's start times (see :func:`prepare`). Data of
    another family than ``encoder``'s (when given) is refused before its rows are
    read: a registered dataset's family is in the registry, a file's in its head
    (:func:`sniff_family`)."""
    from flows.readers import check_timezone

    check_timezone(timezone)  # refused for a dataset name too, as read() does
    registry = _registry()
    text = str(source)
    known = getattr(registry.get(text), "family", None)
    if encoder is not None and known is not None and known != encoder.family:
        raise _family_mismatch(source, known, encoder, encoder_of)
    if text in registry:
        from flows.datasets import load_dataset

        ds = load_dataset(text, data_dir=data_dir, seed=seed)
        return {
            "table": ds.table, "family": ds.family, "name": ds.name,
            "group_by": ds.group_by_default, "window": ds.window_default,
            "files": _entry_files(registry[text]), "warnings": [], "partial": False,
            "origin": _origin(ds.table, registry[text]),
        }

    from flows.readers import read

    if text.startswith(DATA_REF):  # a file under the data folder, wherever it is
        from flows.datasets import data_dir as find_data_dir

        path = find_data_dir(data_dir) / text[len(DATA_REF):]
    else:
        path = Path(text)
    if not path.exists():
        if text.startswith(DATA_REF) or os.sep in text or "/" in text:
            # A path (a file provenance recorded, or one typed): a missing file,
            # not an unknown name.
            raise BadInputError("no such file", path=str(path))
        raise unknown_dataset(text)
    if encoder is not None and path.is_file():  # not a pipe: its head is its data
        sniffed = sniff_family(path)
        if sniffed is not None and sniffed != encoder.family:
            raise _family_mismatch(source, sniffed, encoder, encoder_of)
    result = read(str(path), timezone=timezone)
    # flows' digest, not teacher.checkpoint's: that module imports torch, and an
    # ONNX/TFLite student is evaluated on a --data file without it.
    from flows.datasets import sha256_of

    return {
        "table": result.table, "family": result.family, "name": path.name,
        "group_by": "src_ip" if result.family == "conn" else "stream",
        # Provenance must name the file from any working folder, and after the
        # data folder moved (data_ref).
        "window": None, "files": {data_ref(path, data_dir): sha256_of(path)},
        "warnings": list(result.warnings), "partial": bool(result.partial),
        "origin": None,
    }


def _origin(table: Any, spec: Any) -> np.ndarray | None:
    """Per row of a registered dataset's table, the path (as :attr:`Prepared.files`
    names it) of the file it was read from, from its ``capture`` column."""
    if "capture" not in table.column_names:
        return None
    path_of = {f.capture: f.path for f in spec.files}
    return np.array([path_of.get(c, c) for c in table.column("capture").to_pylist()],
                    dtype=object)


def unknown_dataset(name: str) -> UsageError:
    """The error (exit 2) for a dataset name that is not registered and names no
    file either."""
    return UsageError(f"{name!r} is neither a dataset name "
                      f"({', '.join(sorted(_registry()))}) nor an existing file")


def missing_data(data: Any, flag: str = "--data",
                 dataset_flag: bool = True) -> BadInputError | None:
    """The error (exit 3) for a ``--data`` FILE that is not there, or None when it
    is there or is a registered dataset name (``--data`` takes those too). Its
    hint points at ``--dataset`` where the command has one (``dataset_flag``),
    else lists the names ``--data`` takes (``teacher update``)."""
    from flows.datasets import REGISTRY

    if data is None or str(data) in REGISTRY or Path(data).exists():
        return None
    hint = ("a registered dataset name goes with --dataset" if dataset_flag else
            f"nor a registered dataset name: {', '.join(sorted(REGISTRY))}")
    return BadInputError(f"{flag} {data}: no such file ({hint})")


def recorded_data_missing(ref: Any, data_dir: Any, teacher: Any,
                          how: str) -> BadInputError | None:
    """The error (exit 3) for a teacher whose recorded data file (``ref``, as its
    provenance names it) is no longer there, naming the file and how to give it
    where it is now (``how``: the command's option); None when it is there, or is
    a registered dataset name (those are checked when loaded)."""
    from flows.datasets import REGISTRY
    from flows.datasets import data_dir as find_data_dir

    if not isinstance(ref, str) or not ref or ref in REGISTRY:
        return None
    if ref.startswith(DATA_REF):
        rel = ref[len(DATA_REF):]
        try:
            root = find_data_dir(data_dir)
        except UsageError:
            root = None
        if root is not None and (root / rel).exists():
            return None
        where = (f"the data folder {root} has no {rel}" if root is not None
                 else "no data folder is set")
        return BadInputError(
            f"no such file: teacher {teacher} was trained on {ref} (its "
            f"provenance.json) and {where}; point --data-dir or ${{GATEWATCH_DATA}} "
            f"at the folder that holds {rel}, or pass the file with {how}",
            path=ref)
    if Path(ref).exists():
        return None
    return BadInputError(
        f"no such file: teacher {teacher} was trained on this file (its "
        f"provenance.json); if it moved, pass it with {how} (its sha256 is in "
        "the provenance)", path=ref)


def check_teacher_files(
    files: dict[str, Any], provenance: dict[str, Any] | None, teacher: Any
) -> None:
    """Refuse (BadInputError, exit 3) data read again for a teacher when a file of
    it is not the one the teacher was trained on.

    ``files`` maps each file read (its resolved path, or its path in a registered
    dataset) to its sha256, as :attr:`Prepared.files` does; ``provenance`` is the
    teacher's, whose ``files`` recorded the same at training. A file named in both
    with different digests changed since: its rows, and the seeded split drawn
    over them, are not the teacher's (a grown log would put rows the teacher
    trained on into the test split). Files the provenance does not name (other
    data, on purpose) and provenance without digests are let through.
    """
    recorded = (provenance or {}).get("files")
    if not isinstance(recorded, dict):
        return
    for path, digest in files.items():
        was = recorded.get(path)
        if isinstance(was, str) and was and digest and str(digest) != was:
            raise BadInputError(
                f"changed since the teacher{f' {teacher}' if teacher else ''} was "
                f"trained on it: sha256 is now {digest}, the teacher's provenance "
                f"records {was}; its rows and splits would not be the teacher's. "
                "Restore the file the teacher was trained on, or retrain the "
                "teacher on the file as it is now",
                path=str(path),
            )


# TODO(gap): files are matched by the sha256 of their bytes: a gzipped copy of a
# training file, or one of several files joined for training, is not recognised.
def trained_on(files: dict[str, Any], provenance: dict[str, Any] | None) -> list[str]:
    """The files of ``files`` (path -> sha256, as :attr:`Prepared.files`) whose
    rows the teacher trained on, by digest, for a warning when one is scored whole.

    Of a registered dataset with an official split only the files of role
    ``train`` count (KDDTest+ is the test set, never trained on); otherwise every
    file the provenance records held the training rows (an 80/10/10 split of it).
    """
    from flows.datasets import REGISTRY

    recorded = (provenance or {}).get("files")
    if not isinstance(recorded, dict):
        return []
    digests = {str(d) for d in recorded.values() if isinstance(d, str) and d}
    spec = REGISTRY.get(str((provenance or {}).get("dataset")))
    if spec is not None and spec.split == "official":
        digests &= {f.sha256 for f in spec.files if f.role == "train"}
    return [path for path, digest in files.items() if str(digest) in digests]


def warn_trained_on(prep: Prepared, provenance: dict[str, Any] | None,
                    model: str = "the teacher", where: str = "its provenance") -> None:
    """Warn (log and ``prep.warnings``, which eval prints) for each file of ``prep``
    that ``model`` trained on: numbers on it count training rows, not a test."""
    for path in trained_on(prep.files, provenance):
        registered = _registered_name(provenance)
        held_out = (f"--dataset {registered} --split test" if registered
                    else "--dataset NAME --split test")
        text = (f"{path}: {model} trained on this file (same sha256 as in {where}), "
                "so these numbers count rows it trained on; for held-out numbers "
                f"score the test split ({held_out})")
        logger.warning("%s", text)
        prep.warnings.append(text)


def _registered_name(provenance: dict[str, Any] | None) -> str | None:
    """The registered dataset ``provenance`` names as its data, or None."""
    from flows.datasets import REGISTRY

    name = (provenance or {}).get("dataset")
    return name if isinstance(name, str) and name in REGISTRY else None


def move_to_val(prep: Prepared, held: list[str]) -> None:
    """Move the train and validation rows of the attack types ``held`` to
    validation in ``prep`` (in place), as teacher train did with the types it held
    out; test rows stay where they are."""
    if held and prep.details is not None:
        _types_to_val(prep.split, prep.details, held)


def _teacher_split(prep: Prepared, rows: np.ndarray,
                   provenance: dict[str, Any]) -> np.ndarray:
    """The split the teacher drew over ``rows`` (all of one file, in file order)
    when it trained on that file alone: the seeded 80/10/10 of :func:`prepare`,
    then the attack types its provenance says it held out moved to val."""
    seed = provenance.get("seed")
    seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else 0
    split = stratified_split(prep.y[rows], seed=seed)
    held = provenance.get("held_out_types")
    if isinstance(held, list) and held and prep.details is not None:
        _types_to_val(split, prep.details[rows], held)
    return split


def warn_dataset_trained_on(
    prep: Prepared, provenance: dict[str, Any] | None, rows: Any,
    model: str = "the teacher", where: str = "its provenance",
) -> list[str]:
    """Warn (log and ``prep.warnings``) when rows scored of a registered dataset
    (``rows`` of ``prep``) come from a file ``model`` trained on, by sha256, under
    another name than that dataset: the dataset's split of the file is not the one
    the teacher drew, so its test rows hold the teacher's training and validation
    rows. Each warning names the file and counts its rows scored; where the
    teacher trained on that file alone, how many of them were its training and
    validation rows (the teacher's split, drawn again from its seed). Nothing is
    said for the dataset the teacher trained on itself (its own split). Returns
    the warnings."""
    prov = provenance if isinstance(provenance, dict) else {}
    if prov.get("dataset") == prep.name:
        return []
    rows = np.asarray(rows, dtype=np.int64)
    said: list[str] = []
    for path in trained_on(prep.files, prov):
        if prep.origin is None:
            own = np.arange(len(prep.y))
        else:
            own = np.flatnonzero(prep.origin == path)
        scored = np.intersect1d(rows, own)
        if scored.size == 0:
            continue
        text = (f"{path} (of {prep.name}): {model} trained on this file (same "
                f"sha256 as in {where}, which names {prov.get('dataset')}); "
                f"{scored.size} of the {rows.size} rows scored come from it")
        recorded = prov.get("files")
        alone = (isinstance(recorded, dict) and len(recorded) == 1
                 and _registered_name(prov) is None)
        if alone:
            split = _teacher_split(prep, own, prov)
            picked = split[np.isin(own, scored)]
            n_train = int((picked == "train").sum())
            n_val = int((picked == "val").sum())
            # Held-out types move rows from train to val only: without their
            # names the sum is still exact.
            text += (f", and {n_train} of those were its training rows and {n_val} "
                     "its validation rows" if "held_out_types" in prov else
                     f", and {n_train + n_val} of those were its training or "
                     "validation rows")
        text += (f" ({prep.name}'s split of the file is not the one it trained "
                 "with), so these numbers count rows it trained on; for held-out "
                 "numbers score data it did not train on")
        logger.warning("%s", text)
        prep.warnings.append(text)
        said.append(text)
    return said


def prepare(
    source: str | os.PathLike[str],
    encoder: Any = None,
    *,
    data_dir: Any = None,
    window: int | None = None,
    group_by: str | None = None,
    seed: int = 0,
    need_split: bool | None = None,
    scaling: str | None = None,
    knots: int | None = None,
    encoder_of: str = "the checkpoint",
    timezone: str = "UTC",
    holdout: float | Mapping[str, float] = 0.0,
    holdout_seed: int | None = None,
) -> Prepared:
    """Encode a dataset name or a flow file into a :class:`Prepared`.

    With ``encoder=None`` a new encoder is fitted on the training rows (window
    ``window`` or the dataset default, grouping ``group_by`` or the default);
    otherwise the given fitted encoder is applied as is (its window and grouping
    win, and a family mismatch is a BadInputError). A file without a ``split``
    column is split 80/10/10 (seeded, stratified) when ``need_split`` (default:
    when an encoder is to be fitted), else it is all "test". ``scaling`` and
    ``knots`` go to :meth:`flows.encoder.Encoder.fit` (None: the family's default).
    ``encoder_of`` names whose encoder was given, for that mismatch's message.
    ``timezone`` (an IANA name, default UTC) is the zone an Argus binetflow file's
    StartTime is written in, as in :func:`flows.readers.read`; other formats and
    the registered datasets carry epoch times and ignore it. ``holdout`` (a share,
    or a share per family) moves that share of the attack types to validation
    (:func:`holdout_types`, seeded with ``holdout_seed``, else ``seed``) before
    the encoder is fitted, so that their value ranges do not shape it; their names
    are in ``Prepared.held`` (a fold of the rounds' scripts: split seed 0, the fold
    as ``holdout_seed``).
    An unknown name is a UsageError.
    """
    from flows.encoder import Encoder
    from flows.record import table_to_columns
    from flows.windows import window_index_for

    loaded = _load(source, data_dir, seed, timezone, encoder, encoder_of)
    table = loaded["table"]
    if table.num_rows == 0:
        raise BadInputError(f"{source}: no rows to prepare")
    columns = table_to_columns(table)

    # Labels (-1 = unlabeled), families and label texts.
    if "label" not in columns:
        y = np.full(table.num_rows, -1, dtype=np.int8)
    else:
        raw = np.asarray(columns["label"], dtype=np.float64)
        y = np.where(np.isnan(raw), -1, raw).astype(np.int8)
    details = columns.get("label_detail")
    fam_col = _FAMILY_COLUMN.get(loaded["family"])
    families = columns.get(fam_col) if fam_col else None
    if families is None and details is not None:
        families = np.array(
            [None if d is None else str(d) for d in details], dtype=object)

    # Splits: the dataset's own, else a seeded one (or all test for scoring).
    if "split" in columns:
        split = np.asarray(columns["split"], dtype=object)
    elif need_split or (need_split is None and encoder is None):
        split = stratified_split(y, seed=seed)
    else:
        split = np.full(table.num_rows, "test", dtype=object)
    share = (holdout.get(loaded["family"], 0.0) if isinstance(holdout, Mapping)
             else holdout)
    held: list[str] = []
    if share > 0 and details is not None:
        split, held = _held_out_split(
            split, y, details, families, share,
            seed if holdout_seed is None else holdout_seed)

    # Encoder: fit on labeled training rows, or check the given one fits the data.
    if encoder is None:
        train = np.flatnonzero(split == "train")
        if train.size == 0:
            raise BadInputError(f"{source}: no training rows to fit the encoder on")
        fit_cols = {k: np.asarray(v)[train] for k, v in columns.items()}
        encoder = Encoder.fit(
            fit_cols, loaded["family"],
            window=window or loaded["window"],
            group_by=group_by or loaded["group_by"],
            scaling=scaling, knots=knots,
        )
    elif encoder.family != loaded["family"]:  # a head that did not tell
        raise _family_mismatch(source, loaded["family"], encoder, encoder_of)
    X = np.ascontiguousarray(encoder.transform(columns), dtype=np.float32)
    idx = window_index_for(columns, encoder)

    logger.info("prepared %s: %d rows, %d features, W=%d", loaded["name"],
                len(X), X.shape[1], encoder.window)
    return Prepared(
        X=X, idx=np.asarray(idx, dtype=np.int64), y=y,
        split=split.astype(str).astype(object), encoder=encoder,
        name=loaded["name"], family=loaded["family"],
        families=None if families is None else np.asarray(families, dtype=object),
        details=None if details is None else np.asarray(details, dtype=object),
        files=loaded["files"], warnings=loaded["warnings"],
        partial=loaded["partial"], timezone=timezone, held=held,
        origin=loaded["origin"],
    )


def concat(parts: list[Prepared], name: str | None = None) -> Prepared:
    """One Prepared from several encoded with the same encoder (windows kept apart).

    Window indices are shifted so each part's windows still point into its own rows.
    Parts read in different time zones give a ``timezone`` naming each, joined with
    "+" as the names are.
    """
    if not parts:
        raise BadInputError("nothing to concatenate")
    first = parts[0]
    for part in parts[1:]:
        if (part.n_features, part.window) != (first.n_features, first.window):
            raise BadInputError("parts differ in feature count or window length")
    offsets = np.cumsum([0] + [len(p.X) for p in parts[:-1]])
    idx = np.concatenate([np.where(p.idx >= 0, p.idx + off, -1)
                          for p, off in zip(parts, offsets, strict=True)])

    def join(attr: str) -> np.ndarray | None:
        values = [getattr(p, attr) for p in parts]
        if any(v is None for v in values):
            return None
        return np.concatenate([np.asarray(v, dtype=object) for v in values])

    files: dict[str, str] = {}
    for part in parts:
        files.update(part.files)
    zones = list(dict.fromkeys(p.timezone for p in parts))
    origin = None
    if all(p.origin is not None or len(p.files) == 1 for p in parts):
        origin = np.concatenate([
            np.asarray(p.origin, dtype=object) if p.origin is not None
            else np.full(len(p.y), next(iter(p.files)), dtype=object)
            for p in parts])
    return Prepared(
        X=np.concatenate([p.X for p in parts]), idx=idx,
        y=np.concatenate([p.y for p in parts]),
        split=np.concatenate([p.split for p in parts]), encoder=first.encoder,
        name=name or "+".join(p.name for p in parts), family=first.family,
        families=join("families"), details=join("details"), files=files,
        warnings=[w for p in parts for w in p.warnings],
        partial=any(p.partial for p in parts), timezone="+".join(zones),
        origin=origin,
    )
