"""Incremental learning: fine-tune a teacher on new data without forgetting the old.

A checkpoint may carry a replay buffer (``replay.safetensors``: a seeded,
class-balanced sample of its training windows and labels, written by
``teacher train``). :func:`update` fine-tunes the checkpoint on the new data's
training rows plus that buffer, picks the epoch and threshold on the new data's
validation rows (plus the old data's, when the old data can be prepared again), and
reports F1 on the old and new test rows before and after, so forgetting shows; and
on the test rows of every other dataset the checkpoint learned before
(:func:`learned_sources`), each named.

The updated checkpoint's buffer is :func:`grow_replay`'s: the earlier buffer plus
the new data's training rows, sampled down to a cap with an equal share for every
dataset learned so far, so a chain of updates keeps each of them in mind. Each row
of a buffer records which dataset it came from (``sources`` and the names in the
file's metadata).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from flows.errors import BadInputError, ModelError
from teacher import logger
from teacher.checkpoint import Teacher, write_checksums
from teacher.data import Prepared, check_teacher_files, concat
from teacher.metrics import binary_metrics
from teacher.train import TrainConfig, TrainResult, fit

__all__ = [
    "REPLAY_DEFAULT",
    "REPLAY_FILE",
    "ReplayBuffer",
    "grow_replay",
    "learned_sources",
    "load_replay",
    "make_replay",
    "read_replay",
    "save_replay",
    "update",
]

REPLAY_FILE = "replay.safetensors"
# Rows drawn for a buffer made from data (teacher train's default --replay-size).
REPLAY_DEFAULT = 5000
_NAMES_KEY = "sources"  # the buffer file's metadata: JSON list of source names
_MAX_CHAIN = 100  # most earlier checkpoints followed through ``updated_from``


def make_replay(
    prep: Prepared, size: int = 5000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded sample of training windows, half of each class where possible."""
    rows = prep.rows("train")
    rng = np.random.default_rng(seed)
    picked = []
    for value in (0, 1):
        part = rows[prep.y[rows] == value]
        take = min(len(part), size // 2)
        if take:
            picked.append(rng.choice(part, size=take, replace=False))
    chosen = np.sort(np.concatenate(picked)) if picked else rows[:0]
    return prep.windows(chosen), prep.y[chosen].astype(np.int8)


@dataclass
class ReplayBuffer:
    """A replay buffer with the dataset each row came from.

    ``sources[i]`` indexes ``names`` (a dataset name or a file as provenance
    records it); ``pair()`` is the ``(windows, labels)`` that training takes.
    """

    windows: np.ndarray
    labels: np.ndarray
    sources: np.ndarray
    names: list[str]

    def pair(self) -> tuple[np.ndarray, np.ndarray]:
        """The ``(windows, labels)`` to train on."""
        return self.windows, self.labels

    def counts(self) -> dict[str, int]:
        """How many rows each source holds, in the order of ``names``."""
        found = np.bincount(self.sources, minlength=len(self.names))
        return {name: int(n) for name, n in zip(self.names, found, strict=True)}


def save_replay(
    ckpt_dir: str | Path,
    windows: np.ndarray,
    labels: np.ndarray,
    sources: np.ndarray | None = None,
    names: list[str] | None = None,
) -> Path:
    """Write the replay buffer next to a checkpoint (safetensors, no pickle).

    ``sources`` (one index into ``names`` per row) says which dataset each row
    came from; the names go in the file's metadata. The checkpoint's
    ``checksums.json`` is rewritten to cover it.
    """
    from safetensors.numpy import save_file

    path = Path(ckpt_dir) / REPLAY_FILE
    tensors = {"windows": np.ascontiguousarray(windows, dtype=np.float32),
               "labels": np.ascontiguousarray(labels, dtype=np.int8)}
    metadata = None
    if sources is not None:
        tensors["sources"] = np.ascontiguousarray(sources, dtype=np.int32)
        metadata = {_NAMES_KEY: json.dumps(list(names or []))}
    save_file(tensors, str(path), metadata=metadata)
    write_checksums(ckpt_dir)
    return path


def load_replay(ckpt_dir: str | Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The checkpoint's replay buffer as ``(windows, labels)``, or None."""
    buffer = read_replay(ckpt_dir)
    return None if buffer is None else buffer.pair()


def read_replay(ckpt_dir: str | Path, name: str = "(earlier data)"
                ) -> ReplayBuffer | None:
    """The checkpoint's replay buffer with its rows' sources, or None when it has
    none. A buffer written before sources were recorded is all one source,
    ``name`` (the caller passes the checkpoint's dataset)."""
    from safetensors import SafetensorError, safe_open

    path = Path(ckpt_dir) / REPLAY_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="np") as fh:
            data = {key: fh.get_tensor(key) for key in fh.keys()}
            metadata = fh.metadata() or {}
        windows, labels = data["windows"], data["labels"]
        if "sources" not in data:
            return ReplayBuffer(windows, labels,
                                np.zeros(len(labels), dtype=np.int32), [name])
        names = json.loads(metadata.get(_NAMES_KEY, "[]"))
        sources = data["sources"].astype(np.int32)
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise ModelError(f"cannot read the replay buffer {path}: {exc}") from exc
    fits = (isinstance(names, list) and all(isinstance(n, str) for n in names)
            and len(sources) == len(labels) == len(windows)
            and (sources.size == 0 or 0 <= sources.min() <= sources.max()
                 < len(names)))
    if not fits:
        raise ModelError(f"cannot read the replay buffer {path}: its sources do "
                         "not fit its rows")
    return ReplayBuffer(windows, labels, sources, names)


def _shares(available: list[int], total: int) -> list[int]:
    """Split ``total`` rows equally among groups holding ``available`` rows each;
    a group with fewer rows than its share gives them all and the rest is split
    among the others (the smallest groups are served first; a remainder that does
    not divide goes to the largest)."""
    take = [0] * len(available)
    left = total
    order = sorted(range(len(available)), key=lambda i: (available[i], i))
    for done, i in enumerate(order):
        take[i] = min(available[i], left // (len(order) - done))
        left -= take[i]
    return take


def grow_replay(
    earlier: ReplayBuffer | None,
    new: Prepared,
    name: str,
    size: int = 5000,
    seed: int = 0,
) -> ReplayBuffer | None:
    """The replay buffer of an updated checkpoint: every dataset learned so far.

    The pool is the earlier buffer's rows, each kept under its own source, plus
    the labeled training rows of ``new`` as the source ``name`` (which replace an
    earlier source of that same name: the same data learned again). At most
    ``size`` rows are kept: each source gets an equal share (:func:`_shares`; a
    source with fewer rows keeps them all and the others share the rest), and
    within a source half of each class where possible, by the same rule. The rows
    are drawn with ``numpy.random.default_rng(seed)``, source by source in the
    order of the names, benign before malicious, so one seed gives one buffer.
    None when ``size`` is 0.
    """
    if size <= 0:
        return None

    # The pools: each source's labels, and how its chosen rows become windows.
    names: list[str] = []
    pools: list[tuple[np.ndarray, Any]] = []
    if earlier is not None:
        for i, source in enumerate(earlier.names):
            if source == name:
                continue
            rows = np.flatnonzero(earlier.sources == i)
            names.append(source)
            pools.append((earlier.labels[rows],
                          lambda pick, rows=rows: earlier.windows[rows[pick]]))
    train = new.rows("train")
    names.append(name)
    pools.append((new.y[train], lambda pick: new.windows(train[pick])))

    # Equal shares per source, then per class within each source.
    quota = _shares([len(labels) for labels, _ in pools], size)
    rng = np.random.default_rng(seed)
    windows, labels, sources = [], [], []
    for i, ((pool_y, fetch), want) in enumerate(zip(pools, quota, strict=True)):
        by_class = [np.flatnonzero(pool_y == value) for value in (0, 1)]
        takes = _shares([len(rows) for rows in by_class], want)
        picked = [rng.choice(rows, size=take, replace=False)
                  for rows, take in zip(by_class, takes, strict=True) if take]
        if not picked:
            continue
        chosen = np.sort(np.concatenate(picked))
        windows.append(np.asarray(fetch(chosen), dtype=np.float32))
        labels.append(pool_y[chosen].astype(np.int8))
        sources.append(np.full(len(chosen), i, dtype=np.int32))
    if not labels:
        shape = (0, new.window, new.n_features)
        return ReplayBuffer(np.zeros(shape, dtype=np.float32),
                            np.zeros(0, dtype=np.int8), np.zeros(0, dtype=np.int32),
                            names)
    return ReplayBuffer(np.concatenate(windows), np.concatenate(labels),
                        np.concatenate(sources), names)


def _entry(provenance: dict[str, Any]) -> dict[str, Any]:
    """What :func:`learned_sources` records of the data one provenance names."""
    files = provenance.get("files")
    entry = {"data": provenance.get("dataset"),
             "files": dict(files) if isinstance(files, dict) else {},
             "seed": provenance.get("seed"),
             "timezone": provenance.get("timezone") or "UTC"}
    held = provenance.get("held_out_types")
    if isinstance(held, list) and held:  # never trained on: not replayed either
        entry["held_out_types"] = [str(name) for name in held]
    return entry


def learned_sources(provenance: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The datasets a checkpoint has learned, oldest first, its own data last.

    Each is ``{"data", "files", "seed", "timezone"}`` as its provenance recorded
    them (the seed drew its split), with ``held_out_types`` where ``teacher
    train`` moved attack types to validation. An update records the list in its
    provenance (``learned``); for a checkpoint without one (trained, or updated
    before the list was recorded) it is found by following ``updated_from`` to the
    earlier checkpoints' ``provenance.json``. An earlier checkpoint that cannot be
    read there is an entry ``{"data": None, "checkpoint": FOLDER}``: its data is
    not known.
    """
    prov = provenance if isinstance(provenance, dict) else {}
    chain: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(chain) <= _MAX_CHAIN:
        recorded = prov.get("learned")
        if isinstance(recorded, list) and all(
                isinstance(e, dict) and "data" in e for e in recorded):
            chain.extend(reversed([dict(e) for e in recorded]))
            break
        if prov.get("dataset"):
            chain.append(_entry(prov))
        parent = prov.get("updated_from")
        if not isinstance(parent, str) or parent in seen:
            break
        seen.add(parent)
        try:
            prov = json.loads((Path(parent) / "provenance.json").read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            prov = None
        if not isinstance(prov, dict):
            chain.append({"data": None, "checkpoint": parent})
            break
    return list(reversed(chain))


def _test_scores(teacher_like: Any, prep: Prepared | None,
                 threshold: float) -> dict[str, float | None]:
    """F1 and false-positive rate on the test rows of ``prep``, as ``test_f1``
    and ``test_fpr``; None where the rows cannot give one: no test rows, no
    malicious rows (F1), no benign rows (FPR)."""
    out: dict[str, float | None] = {"test_f1": None, "test_fpr": None}
    if prep is None:
        return out
    rows = prep.rows("test")
    if rows.size == 0:
        return out
    y = prep.y[rows]
    m = binary_metrics(y, teacher_like(prep.windows(rows)), threshold)
    if (y == 1).any():
        out["test_f1"] = m["f1"]
    if (y == 0).any():
        out["test_fpr"] = m["fpr"]
    return out


def _scores(teacher_like: Any, prep: Prepared | None, threshold: float,
            name: str) -> dict[str, float | None]:
    """:func:`_test_scores` as ``{name}_test_f1`` and ``{name}_test_fpr``
    (``name``: old or new)."""
    found = _test_scores(teacher_like, prep, threshold)
    return {f"{name}_{key}": value for key, value in found.items()}


def _test_rows(prep: Prepared | None) -> dict[str, int] | None:
    """How many benign and malicious test rows ``prep`` holds (None: no data)."""
    if prep is None:
        return None
    y = prep.y[prep.rows("test")]
    return {"benign": int((y == 0).sum()), "malicious": int((y == 1).sum())}


def _source_scores(
    listed: list[dict[str, Any]],
    teacher_like: Any,
    threshold: float,
    into: list[dict[str, Any]] | None = None,
    when: str = "before",
) -> list[dict[str, Any]]:
    """Score each listed dataset's test rows: one entry per dataset, ``{"data",
    "role", "test_rows", "before": {"test_f1", "test_fpr"}}`` (``"after"`` added
    by a second call with ``into``), or ``{"data", "role", "missing": why}``. A
    Prepared listed twice (the old data is also an earlier source) is scored
    once."""
    out = into if into is not None else [
        {"data": item["data"], "role": item["role"],
         **({"learned_before": item["learned_before"]}
            if item.get("learned_before") else {})} for item in listed]
    done: dict[int, dict[str, float | None]] = {}
    for item, entry in zip(listed, out, strict=True):
        prep = item.get("prep")
        if prep is None:
            entry["missing"] = item.get("missing") or "not available"
            continue
        if id(prep) not in done:
            done[id(prep)] = _test_scores(teacher_like, prep, threshold)
        entry.setdefault("test_rows", _test_rows(prep))
        entry[when] = done[id(prep)]
    return out


def _check_labels(
    new: Prepared,
    n_train: int,
    n_val: int,
    replay: tuple[np.ndarray, np.ndarray] | None,
    old: Prepared | None,
) -> None:
    """Refuse (BadInputError) an update without the labeled rows it needs: two
    training rows of the new data, and one validation row of the new or old data.
    The message counts the new file's rows; the replay buffer and the old data only
    keep the old traffic in mind, so they are named apart."""
    if n_train >= 2 and n_val >= 1:
        return
    labeled = int((new.y >= 0).sum())
    rows = len(new.y)
    have = (f"none of its {rows} rows has a label (0/1)" if not labeled
            else f"{labeled} of its {rows} rows are labeled, {n_train} in its "
                 f"training part and {int(new.rows('val').size)} in its "
                 "validation part")
    if n_train < 2:
        need = "an update needs at least 2 labeled training rows of the new data"
        kept = [f"the checkpoint's {len(replay[1])} replay rows"] if replay else []
        kept += [f"the old data, {old.name},"] if old is not None else []
        if kept:
            need += f" ({' and '.join(kept)} only guard against forgetting)"
    else:
        where = "the new data" + (f" or {old.name}" if old is not None else "")
        need = f"an update needs a labeled validation row of {where}"
    raise BadInputError(f"{new.name}: {have}; {need}")


def update(
    teacher: Teacher,
    new: Prepared,
    old: Prepared | None = None,
    replay: tuple[np.ndarray, np.ndarray] | None = None,
    train_config: TrainConfig | None = None,
    target_f1: float | None = None,
    earlier: list[dict[str, Any]] | None = None,
    new_name: str | None = None,
    learned_before: list[str] | None = None,
) -> tuple[TrainResult, dict[str, Any]]:
    """Fine-tune ``teacher`` on ``new`` with a replay buffer; returns (result, report).

    ``new`` and ``old`` must be encoded with the teacher's encoder. The report
    holds F1 and the false-positive rate on old and new test rows before and
    after (None where the rows hold no malicious, or no benign, row), how many
    of each the test rows hold, the replay size and the
    wall time. ``target_f1`` is passed to :func:`~teacher.train.fit` (benchmarks).
    ``earlier`` lists the datasets learned before, each ``{"data": name, "role":
    ...}`` with ``"prep"`` (a Prepared, scored) or ``"missing"`` (why not); the
    report's ``sources`` gives each of them, then the new data (``new_name``),
    the same numbers (:func:`_source_scores`); ``learned_before`` names the
    places in the chain where the new data was learned before (the new data's
    entry says so, as ``learned_before``; the caller leaves those places out of
    ``earlier``). ``replayed_rows`` counts the replay rows trained on here
    (``replay_size``, its old name, is kept for scripts); the buffer the updated
    checkpoint is written with is the caller's (``replay_out``).
    A file of ``old`` that the teacher's provenance records with another sha256
    (changed since it was trained) is a BadInputError: its test rows would not be
    the teacher's, so the forgetting check would measure nothing.
    """
    if (new.n_features, new.window) != (teacher.config.n_features,
                                        teacher.config.window):
        raise BadInputError("new data was not encoded with the teacher's encoder")
    if old is not None:
        check_teacher_files(old.files, getattr(teacher, "provenance", None),
                            getattr(teacher, "path", None))
    tc = train_config or TrainConfig(epochs=10, patience=3, lr=3e-4)

    # Data: new train + replay; validation on new val (and old val when known).
    parts = [new] if old is None else [new, old]
    both = concat(parts, name=new.name) if old is not None else new
    n_new = len(new.X)
    train_rows = np.flatnonzero((both.split == "train") & (both.y >= 0)
                                & (np.arange(len(both.y)) < n_new))
    val_rows = both.rows("val")
    _check_labels(new, train_rows.size, val_rows.size, replay, old)

    # Before: the checkpoint as it is.
    before = {**_scores(teacher.predict_proba, old, teacher.threshold, "old"),
              **_scores(teacher.predict_proba, new, teacher.threshold, "new")}
    listed = [*(earlier or []),
              {"data": new_name or new.name, "role": "new", "prep": new,
               "learned_before": list(learned_before or [])}]
    sources = _source_scores(listed, teacher.predict_proba, teacher.threshold)
    if replay is None and old is not None:
        replay = make_replay(old, seed=tc.seed)
    start = time.monotonic()
    init = {k: v.detach().cpu().clone() for k, v in teacher.model.state_dict().items()}
    result = fit(both, teacher.config, replace(tc), init_state=init,
                 train_rows=train_rows, val_rows=val_rows, extra_train=replay,
                 target_f1=target_f1)
    wall = time.monotonic() - start

    # After: the fine-tuned model with its new threshold.
    from teacher.checkpoint import Teacher as _Teacher

    after_teacher = _Teacher(model=result.model.eval(), encoder=teacher.encoder,
                             threshold=result.threshold["threshold"],
                             config=teacher.config)
    cut = after_teacher.threshold
    after = {**_scores(after_teacher.predict_proba, old, cut, "old"),
             **_scores(after_teacher.predict_proba, new, cut, "new")}
    _source_scores(listed, after_teacher.predict_proba, cut, sources, "after")
    report = {
        "before": before, "after": after,
        "old_test_rows": _test_rows(old), "new_test_rows": _test_rows(new),
        "sources": sources,
        "replayed_rows": 0 if replay is None else int(len(replay[1])),
        "replay_size": 0 if replay is None else int(len(replay[1])),
        "new_train_rows": int(train_rows.size), "val_rows": int(val_rows.size),
        # As teacher train reports them: "epochs" per member (the longest run),
        # the ensemble's total apart.
        "epochs": len(result.history),
        "members": int(getattr(teacher.config, "members", 1) or 1),
        "epochs_all_members": result.epochs_run, "best_epoch": result.best_epoch,
        "wall_s": wall, "threshold": result.threshold,
    }
    logger.info("update: %s -> %s", before, after)
    return result, report
