"""Train / validation / test splits: seeded, stratified, and by capture or host.

Every split here is a per-row array of ``"train"``, ``"val"`` or ``"test"`` and is a
pure function of its inputs and the seed, so the same call always gives the same
rows (numpy's ``default_rng(seed)``; no global random state).

* :func:`stratified_split`: within each stratum (e.g. each attack name) the rows are
  shuffled with the seed and cut at the cumulative fractions, rounded; so every
  stratum keeps about the same proportions (a stratum of one row goes to train).
* :func:`train_val_split`: the same with two parts, for datasets with an official
  test file (NSL-KDD: validation is 10% of KDDTrain+, KDDTest+ stays the test set).
* :func:`leave_capture_out`: every row of the held-out groups (capture files, or
  source hosts) is test, the rest is split train/val, so no held-out capture or host
  is ever seen in training. :func:`leave_one_out_folds` walks every group in turn.
* :func:`strata_of`: the stratum of each row: ``label_detail`` where present, else
  the binary label, optionally prefixed by the capture so each capture is split
  alike.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from flows.errors import UsageError

SPLITS = ("train", "val", "test")


def strata_of(columns: Mapping[str, Any], by_capture: bool = False) -> np.ndarray:
    """Per row, the text a split is stratified on (object array of str).

    ``label_detail`` when the row has one, else ``label=<0|1|null>``; with
    ``by_capture`` the row's ``capture`` comes first.
    """
    n = _n_rows(columns)
    labels = columns.get("label")
    details = columns.get("label_detail")
    out = np.empty(n, dtype=object)
    for i in range(n):
        detail = None if details is None else details[i]
        if detail is not None and not (isinstance(detail, float) and np.isnan(detail)):
            out[i] = str(detail)
            continue
        label = None if labels is None else labels[i]
        if label is None or (isinstance(label, float) and np.isnan(label)):
            out[i] = "label=null"
        else:
            out[i] = f"label={int(label)}"
    if by_capture and "capture" in columns:
        captures = columns["capture"]
        out = np.array([f"{captures[i]}|{out[i]}" for i in range(n)], dtype=object)
    return out


def stratified_split(
    strata: Sequence[Any],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    names: Sequence[str] = SPLITS,
) -> np.ndarray:
    """Assign each row to one of ``names`` by seeded cuts within each stratum.

    Within each stratum (strata sorted by their text, so the order of appearance does
    not matter) the rows are permuted with ``default_rng(seed)`` and cut at
    ``round(cumsum(fractions) * n)``. Returns an object array of split names.
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    if len(fractions) != len(names) or (fractions < 0).any():
        raise UsageError(f"need one non-negative fraction per split name: {fractions}")
    if not np.isclose(fractions.sum(), 1.0):
        raise UsageError(f"split fractions must sum to 1, got {fractions.sum()}")
    keys = np.array(["" if s is None else str(s) for s in strata], dtype=object)
    n = keys.size
    out = np.empty(n, dtype=object)
    rng = np.random.default_rng(seed)

    # One shuffled cut per stratum, strata in sorted order for determinism.
    uniques, inverse = np.unique(keys.astype(str), return_inverse=True)
    by_stratum = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[by_stratum], np.arange(len(uniques) + 1))
    cum = np.cumsum(fractions)
    for s in range(len(uniques)):
        rows = by_stratum[bounds[s] : bounds[s + 1]]
        rows = rows[rng.permutation(rows.size)]
        cuts = np.concatenate([[0], np.rint(cum * rows.size).astype(np.int64)])
        cuts[-1] = rows.size
        for k, name in enumerate(names):
            out[rows[cuts[k] : cuts[k + 1]]] = name
    return out


def train_val_split(
    strata: Sequence[Any], val_fraction: float = 0.1, seed: int = 0
) -> np.ndarray:
    """Stratified seeded train/val split (``"train"``/``"val"`` per row)."""
    if not 0.0 <= val_fraction < 1.0:
        raise UsageError(f"val_fraction must be in [0, 1), got {val_fraction}")
    return stratified_split(
        strata, (1.0 - val_fraction, val_fraction), seed, names=("train", "val")
    )


def official_split(
    is_test: Sequence[bool],
    strata: Sequence[Any],
    val_fraction: float = 0.1,
    seed: int = 0,
) -> np.ndarray:
    """Rows of the official test file are test; the others a stratified train/val."""
    is_test = np.asarray(is_test, dtype=bool)
    strata = np.asarray(strata, dtype=object)
    out = np.full(is_test.size, "test", dtype=object)
    dev = np.flatnonzero(~is_test)
    out[dev] = train_val_split(strata[dev], val_fraction, seed)
    return out


def leave_capture_out(
    groups: Sequence[Any],
    held_out: Any,
    strata: Sequence[Any] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> np.ndarray:
    """Rows of the ``held_out`` groups are test; the rest a stratified train/val.

    ``groups`` is per row the capture file (or source host); ``held_out`` one group
    or a collection of them. An unknown held-out group is a UsageError.
    """
    groups = np.array(["" if g is None else str(g) for g in groups], dtype=object)
    if isinstance(held_out, (str, bytes)) or not hasattr(held_out, "__iter__"):
        held_out = [held_out]
    held = {str(g) for g in held_out}
    unknown = held - set(groups.tolist())
    if unknown:
        raise UsageError(
            f"held-out groups {sorted(unknown)} are not among "
            f"{sorted(set(groups.tolist()))[:20]}"
        )
    is_test = np.isin(groups, list(held))
    if is_test.all():
        raise UsageError("holding out every group leaves nothing to train on")
    strata = groups if strata is None else np.asarray(strata, dtype=object)
    return official_split(is_test, strata, val_fraction, seed)


def leave_one_out_folds(
    groups: Sequence[Any],
    strata: Sequence[Any] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Iterator[tuple[str, np.ndarray]]:
    """For each group in sorted order: ``(group, split with that group held out)``."""
    names = sorted({"" if g is None else str(g) for g in groups})
    for group in names:
        yield group, leave_capture_out(groups, group, strata, val_fraction, seed)


def _n_rows(columns: Mapping[str, Any]) -> int:
    """The row count of a mapping of columns (0 for none)."""
    for values in columns.values():
        return len(values)
    return 0
