"""``compress run``: distill, prune, quantize, export, verify, gate, search.

For one target (or every target), students are tried width by width in the run's
order (smallest first, except nsl-kdd's default, which starts wide: see
:data:`FAMILY_WIDTHS`): for each kind and width a student is distilled from the
teacher (for NSL-KDD teachers by default on training windows with the teacher's
own training noise and swapped columns, each such window re-scored by the teacher:
:func:`distill_settings`); if
its float validation F1 is within reach it is exported, loaded back with
:func:`edge_agent.runtime.load_artifact` and scored on the validation and test splits in
the target runtime. The decision threshold and escalation band are re-chosen on
validation for the exported model. The gate compares validation F1 with the teacher's
(``max_f1_drop``); a passing student is then pruned (structured, with fine-tuning) to
look for a smaller one. Per kind, the first width that passes is kept with its
pruned versions, and the smallest of those is written; every candidate tried is a
row of the frontier. No candidate passing is a :class:`GateError`.

Kinds searched by default: the MLP, and the temporal CNN where the window has at
least 3 flows (its kernel); the LSTM only with ``student="lstm"``.

Quantization-aware fine-tuning (``qat``, see :mod:`compress.qat`): with ``"auto"``,
when every PTQ export of an int8 target (onnx-int8, tflite-int8, tflite-micro) of an
MLP or CNN student misses the gate while the float student passes it, the student is
fine-tuned with int8 simulated and exported again the same way. QAT recovers what
quantization lost; with ``gate="split"`` a float student whose own unseen-type gap
is over ``max_f1_drop`` has lost nothing to quantization there, so ``"auto"`` does
not fine-tune it (the PTQ row's note says so). With ``"always"`` it is tried after a
passing PTQ too, and kept only when its validation F1 is higher; ``"off"`` never
runs it. Each attempt is a frontier row marked ``qat``; the manifest's
``quantization`` says which one was kept, with the PTQ and QAT validation F1.

A candidate that misses the gate says why in its note (validation F1 below the
floor, or with ``gate="split"`` an unseen-type gap over ``max_f1_drop``), and so does
the :class:`GateMissed` error when none passes; it keeps the run's
:class:`RunResult` for a caller that reports it (``compress run --json``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress import logger
from compress.artifact import (
    escalation_band,
    library_versions,
    portable_argv,
    portable_path,
    write_manifest,
    write_thresholds,
)
from compress.export import (
    check_full_int8,
    export_onnx,
    export_tflite,
    micro_arena,
    quantize_onnx,
    tflite_ops,
    write_c_array,
)
from compress.prune import magnitude_sparsity, structured_prune
from compress.qat import ACT_RANGE, QAT_KINDS, WEIGHT_RANGE, qat_finetune
from flows.errors import (
    EXIT_FAILURE,
    BadInputError,
    ExportError,
    GateError,
    GatewatchError,
    ModelError,
    UsageError,
)
from flows.readers.writers import write_problem
from flows.stops import deferred
from student.distill import DistillConfig, TeacherCache, distill, student_logits
from student.zoo import KINDS, build_student, student_targets
from teacher.metrics import score_pairs, type_split_pairs

__all__ = [
    "EDGE_TARGETS",
    "TARGETS",
    "UNSEEN_LEGEND",
    "Candidate",
    "ExportsFailed",
    "GateMissed",
    "RunConfig",
    "RunResult",
    "export_candidate",
    "check_out",
    "frontier_table",
    "io_specs",
    "run",
    "write_model",
]

EDGE_TARGETS = ("onnx-fp32", "onnx-int8", "tflite-fp32", "tflite-int8", "tflite-micro")
TARGETS = (*EDGE_TARGETS, "torch-int8")
MODEL_FILES = {
    "onnx-fp32": ["model.onnx"],
    "onnx-int8": ["model.onnx"],
    "tflite-fp32": ["model.tflite"],
    "tflite-int8": ["model.tflite"],
    "tflite-micro": ["model.cc", "model.h"],
}
# int8 models output the logit (see compress.export): finer steps at low scores.
OUTPUT_KIND = {
    "onnx-fp32": "probability",
    "onnx-int8": "logit",
    "tflite-fp32": "probability",
    "tflite-int8": "logit",
    "tflite-micro": "logit",
}
SEARCH_KINDS = ("mlp", "cnn")
INT8_TARGETS = ("onnx-int8", "tflite-int8", "tflite-micro")
QAT_MODES = ("auto", "off", "always")
SCORE_BATCH = 4096
# Feature families whose students learn on altered windows by default, with the
# share of columns swapped: what three-fold student rounds validated there
# (student/results/round1, round2; round 5 dropped the input noise beside it).
FAMILY_SWAP: dict[str, float] = {"nsl-kdd": 0.3}
# The share of each batch's windows that are swapped (the rest stay as the data has
# them): student round 11 (student/results/round11) found half the batch swapped
# closer to the nsl-kdd teacher on whole attack families neither saw than every
# window swapped (family gap 0.048 vs 0.088), the known types' F1 kept.
FAMILY_SWAP_ROWS: dict[str, float] = {"nsl-kdd": 0.5}
# Families whose students learn on noisy (not swapped) windows, with the noise: the
# conn family's round 1 chose 0.05 on label-free teacher agreement over foreign
# flow files (student/results/conn1). Other families distil on clean windows.
FAMILY_NOISE: dict[str, float] = {"conn": 0.05}
# How an artifact's decision threshold is chosen on validation: ``f1``, its own best
# F1 against the labels; ``teacher-rate``, the cut that flags as much of validation
# as the teacher does. Round 4 of the nsl-kdd students (student/results/round4)
# found the second leaves them closer to the teacher on attack types the threshold
# never saw; other families keep ``f1`` until something validates a change there.
THRESHOLD_RULES = ("f1", "teacher-rate")
FAMILY_THRESHOLD: dict[str, str] = {"nsl-kdd": "teacher-rate"}
# The student widths searched when --widths is not given, and the pruning ratios
# tried when --prune-ratios is not. On nsl-kdd, narrow students pass the gate yet
# fall furthest behind the teacher on whole attack families it never saw
# (student/results/round8-10: the gap falls from 0.193 at width 16 to 0.099 at
# 64; 96 gives 0.102), so its search starts at the width round 10 chose, goes on
# to 96 when that misses the gate, only then to the narrow widths (some seeds' wide
# students miss the gate), and prunes nothing (no pruned student was measured
# there). Widths are tried in the order given; the first that passes is kept.
DEFAULT_WIDTHS: tuple[int, ...] = (4, 8, 16, 32, 64)
DEFAULT_PRUNE: tuple[float, ...] = (0.5,)
FAMILY_WIDTHS: dict[str, tuple[int, ...]] = {"nsl-kdd": (64, 96, 4, 8, 16, 32)}
FAMILY_PRUNE: dict[str, tuple[float, ...]] = {"nsl-kdd": ()}
# How many more initialisations of a width are tried when its first misses the
# gate, before the next width. On nsl-kdd one seed in three left mlp-64 and mlp-96
# under the gate's floor (float validation F1 0.958-0.962 against 0.963), and the
# search fell back to mlp-8, which the family measure ranks far worse (round 11's
# KDDTest+ check, student/results/r11-check.md); another initialisation, chosen on
# validation like any candidate, keeps the width the family measure chose.
# TODO(gap): three tries are not always enough (seed 2: six wide tries missed).
DEFAULT_RESTARTS = 0
FAMILY_RESTARTS: dict[str, int] = {"nsl-kdd": 2}
# What the gate compares. ``same``: validation F1, threshold chosen on the same
# rows. ``split``: where the teacher held out attack types (nsl-kdd), also the mean
# F1 on some held-out types with the threshold chosen on the others (every 2/3
# division; student/results/round4), which shows the gap on unseen types that
# ``same`` hides. Both are measured and written to the manifest either way.
GATES = ("same", "split")


@dataclass
class RunConfig:
    """Settings of one ``compress run``."""

    target: str
    teacher: Path
    out: Path
    student: str | None = None
    max_f1_drop: float = 0.01
    data_dir: Path | None = None
    dataset: str | None = None
    # Zone of a binetflow file's start times; None: the teacher's recorded one for
    # its own data, else UTC.
    timezone: str | None = None
    # None: the teacher family's default (FAMILY_WIDTHS, FAMILY_PRUNE), else
    # DEFAULT_WIDTHS, DEFAULT_PRUNE.
    widths: tuple[int, ...] | None = None
    prune_ratios: tuple[float, ...] | None = None
    # None: FAMILY_RESTARTS of the teacher's family, else DEFAULT_RESTARTS.
    restarts: int | None = None
    distill: DistillConfig = field(default_factory=DistillConfig)
    calibration_windows: int = 512
    seed: int = 0
    time_latency: bool = True
    qat: str = "auto"
    qat_epochs: int = 3
    distill_noise: float | None = None
    distill_swap: float | None = None
    distill_swap_rows: float | None = None
    distill_alpha: float | None = None
    threshold_rule: str | None = None
    gate: str = "same"
    argv: list[str] = field(default_factory=list)
    # What holds Ctrl-C while the new artifacts are put in place: an object with
    # hold() (from the first rename on, Ctrl-C is noted, not raised) and placed()
    # (they are all in place: the run has finished). None: nothing is held, and a
    # Ctrl-C part way moves the old files back before it goes on.
    closing: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.target != "all" and self.target not in TARGETS:
            raise UsageError(
                f"unknown target {self.target!r}; choose one of {', '.join(TARGETS)}"
                " or all"
            )
        if self.student is not None and self.student not in KINDS:
            raise UsageError(
                f"unknown student {self.student!r}; choose one of {sorted(KINDS)}"
            )
        if not 0.0 <= self.max_f1_drop <= 1.0:
            raise UsageError(f"--max-f1-drop must be in [0, 1], got {self.max_f1_drop}")
        if self.qat not in QAT_MODES:
            raise UsageError(
                f"unknown --qat {self.qat!r}; choose one of {', '.join(QAT_MODES)}")
        if self.restarts is not None and self.restarts < 0:
            raise UsageError(f"--restarts must be >= 0, got {self.restarts}")
        if self.qat_epochs < 1:
            raise UsageError(f"--qat-epochs must be >= 1, got {self.qat_epochs}")
        if self.distill_noise is not None and not 0.0 <= self.distill_noise <= 1.0:
            raise UsageError(
                f"--distill-noise must be in [0, 1], got {self.distill_noise}")
        if self.distill_swap is not None and not 0.0 <= self.distill_swap <= 1.0:
            raise UsageError(
                f"--distill-swap must be in [0, 1], got {self.distill_swap}")
        if self.distill_swap_rows is not None and not (
                0.0 < self.distill_swap_rows <= 1.0):
            raise UsageError(
                f"--distill-swap-rows must be in (0, 1], got {self.distill_swap_rows}")
        if self.distill_alpha is not None and not 0.0 <= self.distill_alpha <= 1.0:
            raise UsageError(
                f"--distill-alpha must be in [0, 1], got {self.distill_alpha}")
        if self.gate not in GATES:
            raise UsageError(
                f"unknown --gate {self.gate!r}; choose one of {', '.join(GATES)}")
        if self.threshold_rule is not None and self.threshold_rule not in (
                THRESHOLD_RULES):
            raise UsageError(
                f"unknown --threshold-rule {self.threshold_rule!r}; choose one of "
                f"{', '.join(THRESHOLD_RULES)}")


@dataclass
class Candidate:
    """One student tried for one target: what it is and what it measured."""

    target: str
    kind: str
    width: int
    prune_ratio: float = 0.0
    quant: str = ""
    params: int = 0
    # Which initialisation of this kind and width (0: the first; see --restarts).
    restart: int = 0
    size_bytes: int | None = None
    float_val_f1: float | None = None
    val_f1: float | None = None
    test_f1: float | None = None
    agreement: float | None = None
    split_gap: float | None = None
    passed: bool = False
    qat: bool = False
    note: str = ""
    folder: Path | None = None
    # Why an exported candidate missed the gate, one phrase per failed rule
    # (:func:`_gate_misses`); empty when it passed or was never exported.
    misses: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """``mlp-64``; ``mlp-64#2`` for its second initialisation."""
        tail = f"#{self.restart + 1}" if self.restart else ""
        return f"{self.kind}-{self.width}{tail}"

    def row(self) -> dict[str, Any]:
        """The frontier row as a plain dict."""
        return {
            "target": self.target,
            "student": self.label,
            "prune": self.prune_ratio,
            "quant": self.quant,
            "params": self.params,
            "size_bytes": self.size_bytes,
            "float_val_f1": self.float_val_f1,
            "val_f1": self.val_f1,
            "test_f1": self.test_f1,
            "agreement": self.agreement,
            "split_gap": self.split_gap,
            "passed": self.passed,
            "qat": self.qat,
            "note": self.note,
        }


@dataclass
class RunResult:
    """What ``compress run`` made: artifact folder per target, and the frontier."""

    artifacts: dict[str, Path]
    frontier: list[Candidate]
    teacher_metrics: dict[str, Any]
    failed: dict[str, str] = field(default_factory=dict)
    partial: bool = False  # the data was damaged part way (see teacher.data)
    warnings: list[str] = field(default_factory=list)  # the data's, naming places


class GateMissed(GateError):
    """No artifact passed the gate (exit 5), with what the run measured.

    ``reason`` is the one-line error (the gate's rule and why the candidates
    missed it); the message adds the frontier table. ``result`` is the run's
    :class:`RunResult` (no artifacts, ``failed`` per target, the frontier and the
    teacher's metrics), so a caller can still report it, e.g. as JSON.
    """

    def __init__(self, reason: str, result: RunResult, table: str) -> None:
        super().__init__(f"{reason}\n{table}")
        self.reason = reason
        self.result = result
        self.table = table if result.frontier else ""


class ExportsFailed(GateMissed):
    """No artifact was made because every candidate failed before the gate (an
    export the converter or its runtime refused): a failure (exit 1), not the
    gate's rule missed. Carries the run's result as GateMissed does."""

    exit_code = EXIT_FAILURE


# ------------------------------------------------------------------ context


@dataclass
class _Context:
    """Everything candidates share: data, teacher logits, teacher metrics."""

    cfg: RunConfig
    teacher: Any
    prep: Any
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    y: np.ndarray
    t_train: np.ndarray
    teacher_val: dict[str, Any]
    teacher_test: dict[str, Any]
    distill: DistillConfig
    calibration: np.ndarray
    val_windows: np.ndarray
    test_windows: np.ndarray
    progress: Callable[[str], None]
    # The rule for every artifact's threshold, and the share of validation windows
    # the teacher flags at its own threshold (what ``teacher-rate`` copies).
    threshold_rule: str = "f1"
    teacher_val_rate: float = 0.0
    # The split measure: (A, B) masks over the validation rows, the teacher's flag
    # rate on each A at its best-F1 cut there, and its mean F1 on the Bs (None where
    # fewer than two attack types were held out).
    split_pairs: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    split_teacher_rates: list[float] = field(default_factory=list)
    split_teacher_f1: float | None = None
    held_out_types: list[str] = field(default_factory=list)
    students: dict[tuple[str, int, float], torch.nn.Module] = field(
        default_factory=dict
    )
    # QAT students with their training history: the int8 targets share one grid.
    qat_students: dict[tuple[str, int, float], tuple[torch.nn.Module, list]] = field(
        default_factory=dict
    )

    @property
    def families_test(self) -> np.ndarray | None:
        fam = self.prep.families
        return None if fam is None else fam[self.test]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))).astype(np.float32)


def _context(cfg: RunConfig, progress: Callable[[str], None]) -> _Context:
    from teacher.checkpoint import load_teacher, sha256_file
    from teacher.data import check_teacher_files, prepare
    from teacher.metrics import binary_metrics

    teacher = load_teacher(cfg.teacher, device="cpu")
    # Filled in on the caller's config itself: it is the run's, read again later.
    resolved = with_search_defaults(cfg, teacher.provenance or {})
    cfg.widths, cfg.prune_ratios = resolved.widths, resolved.prune_ratios
    cfg.restarts = resolved.restarts
    dataset = cfg.dataset or (teacher.provenance or {}).get("dataset")
    if not dataset:
        raise UsageError(
            f"{cfg.teacher}: provenance names no dataset; pass --dataset or --data"
        )
    progress(f"preparing {dataset} with the teacher's encoder")
    prov = teacher.provenance or {}
    zone = cfg.timezone or (None if cfg.dataset else prov.get("timezone")) or "UTC"
    prep = prepare(dataset, encoder=teacher.encoder, data_dir=cfg.data_dir,
                   seed=split_seed(prov), need_split=True, timezone=zone)
    # A file changed since the teacher was trained gives other rows and splits.
    check_teacher_files(prep.files, prov, cfg.teacher)

    # The teacher's own validation split: attack types it held out go to val.
    held = prov.get("held_out_types") or []
    if held and prep.details is not None:
        moving = np.isin(prep.details.astype(str), held) & np.isin(
            prep.split, ("train", "val"))
        prep.split = prep.split.copy()
        prep.split[moving] = "val"
    train, val, test = prep.rows("train"), prep.rows("val"), prep.rows("test")
    if min(len(train), len(val), len(test)) == 0:
        raise BadInputError(
            f"{dataset}: needs labeled train, val and test rows (got {len(train)}, "
            f"{len(val)}, {len(test)}); distillation and the gate need rows labeled "
            "0 or 1 (score unlabeled flows with edge-agent or teacher serve)"
        )
    y = prep.y.astype(np.int64)
    one_class = [name for name, rows in (("validation", val), ("train", train))
                 if np.unique(y[rows]).size < 2]
    if one_class:
        which = one_class[0]
        rows = val if which == "validation" else train
        kind = "malicious" if y[rows][0] == 1 else "benign"
        updated = prov.get("updated_from")
        raise BadInputError(
            f"{dataset}: its {len(rows)} {which} rows are all {kind}; the gate, "
            "the thresholds and distillation need benign and malicious rows (a "
            "student that flags everything would pass). Give --dataset or --data "
            "with both"
            + (f" (this teacher was updated from {updated} with this file alone: "
               "its provenance names only the update's data)" if updated else "")
        )

    # The teacher runs once; every student reuses its logits.
    key = sha256_file(Path(cfg.teacher) / "model.safetensors")
    cache = TeacherCache(teacher.logits, prep, key=key)
    progress(f"teacher scoring {len(train) + len(val) + len(test)} windows (once)")
    t_train = cache.logits(train)
    p_val = _sigmoid(cache.logits(val))
    p_test = _sigmoid(cache.logits(test))
    fam = prep.families
    teacher_val = binary_metrics(y[val], p_val, teacher.threshold,
                                 None if fam is None else fam[val])
    teacher_test = binary_metrics(y[test], p_test, teacher.threshold,
                                  None if fam is None else fam[test])

    # The split measure's divisions of the held-out types, and the teacher on them.
    details = None if prep.details is None else prep.details[val].astype(str)
    pairs = type_split_pairs(details, held) if details is not None else []
    if cfg.gate == "split" and not pairs:
        raise UsageError(
            f"--gate split needs a teacher that held out at least two attack types "
            f"for validation (nsl-kdd); {cfg.teacher} held out {len(held)}")
    scored = score_pairs(y[val], p_val, pairs)
    t_rates = [float(np.mean(p_val[a] >= cut)) for (a, _), (cut, _) in zip(
        pairs, scored, strict=True)]
    t_split = float(np.mean([m["f1"] for _, m in scored])) if scored else None

    # Calibration windows come from the training split only.
    distill_cfg = distill_settings(cfg, teacher.provenance or {})
    rng = np.random.default_rng(cfg.seed)
    pick = rng.choice(train, size=min(cfg.calibration_windows, len(train)),
                      replace=False)
    return _Context(
        threshold_rule=threshold_rule(cfg, teacher.provenance or {}),
        teacher_val_rate=float(np.mean(p_val >= teacher.threshold)),
        split_pairs=pairs, split_teacher_rates=t_rates, split_teacher_f1=t_split,
        held_out_types=[str(t) for t in held],
        cfg=cfg, teacher=teacher, prep=prep, train=train, val=val, test=test, y=y,
        t_train=t_train, teacher_val=teacher_val, teacher_test=teacher_test,
        distill=distill_cfg, calibration=prep.windows(np.sort(pick)),
        val_windows=prep.windows(val), test_windows=prep.windows(test),
        progress=progress,
    )


def split_seed(provenance: dict[str, Any]) -> int:
    """The seed the teacher's train/val/test split was drawn with (its provenance's
    ``seed``; 0 when none is recorded): the split its students are scored on, and
    that an artifact records (``provenance.data.split_seed``) so that ``compress
    eval`` scores the same held-out rows."""
    seed = provenance.get("seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else 0


def with_search_defaults(cfg: RunConfig, provenance: dict[str, Any]) -> RunConfig:
    """``cfg`` with the widths, pruning ratios and restarts not given filled in:
    the teacher family's (:data:`FAMILY_WIDTHS`, :data:`FAMILY_PRUNE`,
    :data:`FAMILY_RESTARTS`) or the general defaults."""
    family = provenance.get("family")
    widths = cfg.widths
    if widths is None:
        widths = FAMILY_WIDTHS.get(family, DEFAULT_WIDTHS)
    ratios = cfg.prune_ratios
    if ratios is None:
        ratios = FAMILY_PRUNE.get(family, DEFAULT_PRUNE)
    restarts = cfg.restarts
    if restarts is None:
        restarts = FAMILY_RESTARTS.get(family, DEFAULT_RESTARTS)
    return dataclasses.replace(cfg, widths=tuple(widths), prune_ratios=tuple(ratios),
                               restarts=restarts)


def threshold_rule(cfg: RunConfig, provenance: dict[str, Any]) -> str:
    """The run's threshold rule: ``--threshold-rule`` if given, else the default of
    the teacher's family (:data:`FAMILY_THRESHOLD`), else ``f1``."""
    return cfg.threshold_rule or FAMILY_THRESHOLD.get(provenance.get("family"), "f1")


def distill_settings(cfg: RunConfig, provenance: dict[str, Any]) -> DistillConfig:
    """The distillation settings of a run, the defaults of the teacher's family.

    For a family in :data:`FAMILY_SWAP` (nsl-kdd) students learn, unless told
    otherwise, on training windows with that share of each window's columns swapped
    in from another window (``DistillConfig.swap``), no input noise, the teacher
    re-scoring every such window, on soft targets only (alpha 1.0): of the settings
    scored on three held-out-type folds of NSL-KDD this stayed closest to the
    teacher on attack types its threshold never saw (student/results/round5). Of
    each batch, the share :data:`FAMILY_SWAP_ROWS` of the windows is swapped, the
    rest left as they are (round 11).
    For a family in :data:`FAMILY_NOISE` (conn) they learn on windows with that
    noise, re-scored, soft targets only. Other families distil on the clean windows
    with alpha ``cfg.distill.alpha``.
    Flags given in ``cfg`` win; alpha below 1 with swapping is a UsageError (a
    window with swapped columns has no label).
    """
    swap_default = FAMILY_SWAP.get(provenance.get("family"))
    noise = cfg.distill_noise
    if noise is None:
        noise = FAMILY_NOISE.get(provenance.get("family"), 0.0)
    swap = cfg.distill_swap
    if swap is None:
        swap = swap_default or 0.0
    alpha = cfg.distill_alpha
    if alpha is None:
        alpha = 1.0 if noise > 0 or swap > 0 else cfg.distill.alpha
    if swap > 0 and alpha < 1:
        raise UsageError(
            f"--distill-alpha {alpha} weighs in hard labels, but a window with "
            "swapped columns has none; use --distill-alpha 1 or --distill-swap 0")
    swap_rows = cfg.distill_swap_rows
    if swap_rows is not None and swap == 0:
        raise UsageError(
            f"--distill-swap-rows {swap_rows:g} says how many windows get swapped "
            "columns, but none are swapped here (--distill-swap 0, or a teacher "
            "family without swapping); drop it or give --distill-swap")
    if swap_rows is None:
        swap_rows = FAMILY_SWAP_ROWS.get(provenance.get("family"), 1.0)
    return DistillConfig(**{**cfg.distill.__dict__, "input_noise": noise,
                            "swap": swap, "swap_rows": swap_rows, "alpha": alpha})


def _rescorer(ctx: _Context, cfg: DistillConfig) -> Callable | None:
    """The teacher as ``teacher_fn`` when the students' windows are altered."""
    return ctx.teacher.logits if cfg.input_noise > 0 or cfg.swap > 0 else None


# ------------------------------------------------------------------ students


def _decision_cut(ctx: _Context, p_val: np.ndarray) -> float:
    """A student's decision threshold on its validation scores, by the run's rule."""
    from teacher.metrics import choose_threshold, cut_at_rate

    if ctx.threshold_rule == "teacher-rate":
        return cut_at_rate(p_val, ctx.teacher_val_rate)
    return choose_threshold(ctx.y[ctx.val], p_val)


def _split_f1(ctx: _Context, p_val: np.ndarray) -> float | None:
    """A student's mean F1 on the B parts, its threshold chosen on each A by the
    run's rule (``teacher-rate``: the teacher's flag rate on that A)."""
    from teacher.metrics import cut_at_rate

    if not ctx.split_pairs:
        return None
    cuts = None  # f1: the best-F1 cut on each A
    if ctx.threshold_rule == "teacher-rate":
        cuts = [cut_at_rate(p_val[a], rate) for (a, _), rate in zip(
            ctx.split_pairs, ctx.split_teacher_rates, strict=True)]
    scored = score_pairs(ctx.y[ctx.val], p_val, ctx.split_pairs, cuts)
    return float(np.mean([m["f1"] for _, m in scored]))


def _float_val_f1(ctx: _Context, model: torch.nn.Module) -> float:
    from teacher.metrics import binary_metrics

    p = _sigmoid(student_logits(model, ctx.prep, ctx.val))
    return float(binary_metrics(ctx.y[ctx.val], p, _decision_cut(ctx, p))["f1"])


def student_seed(seed: int, restart: int) -> int:
    """The seed of a width's ``restart``-th initialisation (0: the run's seed)."""
    return seed + 1000 * restart


def _student(ctx: _Context, kind: str, width: int, ratio: float,
             restart: int = 0) -> torch.nn.Module:
    """Distilled (and optionally pruned + fine-tuned) student, trained once per run.

    ``restart`` > 0 is another initialisation of the same kind and width: its
    weights and its batches' order and swaps are drawn from another seed."""
    key = (kind, width, ratio, restart)
    if key in ctx.students:
        return ctx.students[key]
    cfg = ctx.distill
    if restart:
        cfg = dataclasses.replace(cfg, seed=student_seed(cfg.seed, restart))
    rescore = _rescorer(ctx, cfg)
    if ratio == 0.0:
        tail = f" (initialisation {restart + 1})" if restart else ""
        ctx.progress(f"distilling {kind}-{width}{tail}")
        model = build_student(kind, ctx.prep.n_features, ctx.prep.window, width,
                              seed=cfg.seed)
        distill(model, ctx.prep, ctx.train, ctx.y, ctx.t_train, ctx.val, cfg,
                teacher_fn=rescore)
    else:
        base = _student(ctx, kind, width, 0.0, restart)
        ctx.progress(f"pruning {kind}-{width} by {ratio:.0%} and fine-tuning")
        example = torch.from_numpy(ctx.calibration[:2])
        model = structured_prune(base, ratio, example)
        tune = DistillConfig(**{**cfg.__dict__, "epochs": max(2, cfg.epochs // 2),
                                "lr": cfg.lr / 3})
        distill(model, ctx.prep, ctx.train, ctx.y, ctx.t_train, ctx.val, tune,
                teacher_fn=rescore)
    ctx.students[key] = model.eval()
    return ctx.students[key]


# ------------------------------------------------------------------ export + verify


def _quant_options(target: str, kind: str) -> list[dict[str, str]]:
    if target == "onnx-int8" and kind != "lstm":
        return [
            {"quant_format": "qoperator", "method": "minmax"},
            {"quant_format": "qdq", "method": "percentile"},
        ]
    return [{}]


def write_model(
    target: str, kind: str, model: torch.nn.Module, folder: Path,
    calibration: np.ndarray, window: int, n_features: int,
    options: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Model file(s) of ``target`` into ``folder``; returns export details.

    ``calibration`` holds training windows (int8 calibration and the converter's
    check of the rebuilt model). Raises ExportError naming the target on failure.
    """
    W, F = window, n_features
    details: dict[str, Any] = {}
    if target.startswith("onnx"):
        fp32 = folder / ("model.onnx" if target == "onnx-fp32" else "fp32.onnx")
        export_onnx(model, fp32, W, F, output=OUTPUT_KIND[target])
        if target == "onnx-int8":
            details["quantization"] = quantize_onnx(
                fp32, folder / "model.onnx", calibration,
                recurrent=kind == "lstm", **(options or {}),
            )
            # A very small student's int8 file can outweigh its float one (the
            # quantize nodes and per-channel scales cost more than int8 saves).
            details["float_size_bytes"] = fp32.stat().st_size
            fp32.unlink()
        return details
    if target not in EDGE_TARGETS:
        raise UsageError(f"{target} is not an edge target")

    int8 = target in ("tflite-int8", "tflite-micro")
    path = folder / "model.tflite"
    # The int8 converter now and then leaves an unrolled LSTM's weight split in
    # float (seen on the same model in one run of three); convert again then.
    for attempt in range(1, 4):
        details["converter"] = export_tflite(
            model, kind, path, calibration, int8=int8, window=W, n_features=F,
            output=OUTPUT_KIND[target],
        )
        content = path.read_bytes()
        bad = check_full_int8(content) if int8 else []
        if not bad:
            break
        logger.warning("%s: attempt %d left float tensors: %s", target, attempt,
                       ", ".join(bad[:3]))
    details["converter"]["attempts"] = attempt
    if bad:
        raise ExportError(
            f"{target}: model is not full-int8 after {attempt} conversions; tensors "
            f"{', '.join(bad[:5])}"
        )
    if int8:
        details["quantization"] = {
            "mode": "full-integer", "io": "int8", "all_tensors": "int8/int32",
            "calibration_windows": int(len(calibration)),
        }
    details["ops"] = tflite_ops(content)
    if target == "tflite-micro":
        details["arena"] = micro_arena(content)
        write_c_array(content, folder, details["ops"],
                      arena=details["arena"]["bytes"])
        details["flatbuffer_bytes"] = len(content)
        path.unlink()
    return details


def io_specs(folder: Path, target: str, W: int, F: int) -> tuple[dict, dict]:
    """Manifest ``input`` and ``output`` entries, read from the exported model."""
    if target.startswith("onnx"):
        spec = {"shape": [None, W, F], "dtype": "float32", "scale": None,
                "zero_point": None}
        return spec, {"dtype": "float32", "scale": None, "zero_point": None,
                      "kind": OUTPUT_KIND[target]}
    from ai_edge_litert.interpreter import Interpreter

    if target == "tflite-micro":
        from edge_agent.runtime import c_array_bytes

        content = c_array_bytes((folder / "model.cc").read_text())
    else:
        content = (folder / "model.tflite").read_bytes()
    interp = Interpreter(model_content=content)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]

    def one(detail: dict, shape: bool) -> dict:
        dtype = np.dtype(detail["dtype"]).name
        scale, zp = detail["quantization"]
        entry = {"dtype": dtype,
                 "scale": float(scale) if dtype != "float32" else None,
                 "zero_point": int(zp) if dtype != "float32" else None}
        if shape:
            entry["shape"] = [int(d) for d in detail["shape"]]
        return entry

    return one(inp, True), {**one(out, False), "kind": OUTPUT_KIND[target]}


def _score(scorer: Any, windows: np.ndarray) -> np.ndarray:
    parts = [scorer.score(windows[i : i + SCORE_BATCH])
             for i in range(0, len(windows), SCORE_BATCH)]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def export_candidate(
    ctx: _Context, cand: Candidate, model: torch.nn.Module, folder: Path,
    options: dict[str, str], quantization: dict[str, Any] | None = None,
) -> Candidate:
    """Export, load back in the target runtime, measure, write the artifact folder.

    ``quantization`` (int8 targets) becomes the manifest's ``quantization`` entry;
    the validation F1 measured here is added to it (``ptq_val_f1`` for a PTQ
    export, ``qat_val_f1`` after quantization-aware fine-tuning).
    """
    from edge_agent.runtime import load_artifact
    from teacher.metrics import binary_metrics, time_scorer

    target, kind = cand.target, cand.kind
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    W, F = ctx.prep.window, ctx.prep.n_features

    # Export, then a first manifest so the runtime can load (and hash-check) it.
    details = write_model(target, kind, model, folder, ctx.calibration, W, F, options)
    ctx.teacher.encoder.save(folder / "encoder.json")
    write_thresholds(folder, 0.5, 0.5, 0.5)
    inp, out = io_specs(folder, target, W, F)
    files = [*MODEL_FILES[target], "encoder.json", "thresholds.json"]
    base = {"target": target, "model_file": MODEL_FILES[target][0],
            "input": inp, "output": out}
    if target == "tflite-micro":
        base["size_bytes"] = details["flatbuffer_bytes"]
    write_manifest(folder, base, files)
    # No probe yet: it is made from this very scorer below, then checked.
    scorer = load_artifact(folder, prefer_micro=target == "tflite-micro", probe=False)

    # Scores in the target runtime; threshold and band from validation only.
    y_val, y_test = ctx.y[ctx.val], ctx.y[ctx.test]
    p_val = _score(scorer, ctx.val_windows)
    p_test = _score(scorer, ctx.test_windows)
    decision = _decision_cut(ctx, p_val)
    lo, hi = escalation_band(y_val, p_val, decision)
    val_m = binary_metrics(y_val, p_val, decision)
    test_m = binary_metrics(y_test, p_test, decision, ctx.families_test)

    # Agreement with the float student (its own validation threshold).
    f_val = _sigmoid(student_logits(model, ctx.prep, ctx.val))
    f_test = _sigmoid(student_logits(model, ctx.prep, ctx.test))
    f_thr = _decision_cut(ctx, f_val)
    agree = {
        "decision_agreement": float(np.mean((p_test >= decision) == (f_test >= f_thr))),
        "decision_agreement_same_threshold": float(
            np.mean((p_test >= f_thr) == (f_test >= f_thr))),
        "max_abs_prob_diff": float(np.max(np.abs(p_test - f_test))),
        "mean_abs_prob_diff": float(np.mean(np.abs(p_test - f_test))),
        "float_val_f1": cand.float_val_f1,
        "float_threshold": f_thr,
        "split": "test",
    }
    if ctx.cfg.time_latency:
        test_m.update(time_scorer(scorer.score, ctx.test_windows[:512]))

    # Final thresholds, probe and manifest.
    write_thresholds(folder, decision, lo, hi, rule=ctx.threshold_rule)
    probe_x = ctx.val_windows[:4]
    probe = {"windows": probe_x.tolist(), "expected": scorer.score(probe_x).tolist(),
             "atol": 1.0 / 256 if out["dtype"] != "float32" else 1e-4}
    # TODO(gap): the gate cannot see students fall behind on whole attack families
    # the teacher never saw (R2L/U2R on KDDTest+); only the offline family measure
    # does (student/results/round8), which needs fold teachers trained without them.
    split_f1 = _split_f1(ctx, p_val)
    split = None
    if split_f1 is not None:
        split = {"teacher_f1": ctx.split_teacher_f1, "artifact_f1": split_f1,
                 "gap": ctx.split_teacher_f1 - split_f1,
                 "pairs": len(ctx.split_pairs),
                 "held_out_types": ctx.held_out_types}
    misses = _gate_misses(ctx, float(val_m["f1"]),
                          None if split is None else split["gap"])
    gate_ok = not misses
    in_band = (p_val >= lo) & (p_val < hi)
    fields = {
        **base,
        "params": int(sum(p.numel() for p in model.parameters())),
        "student": {"kind": kind, "width": cand.width, "prune_ratio": cand.prune_ratio,
                    "initialisation": cand.restart + 1,
                    "seed": student_seed(ctx.distill.seed, cand.restart),
                    "layers": {k: list(v.shape) for k, v in model.state_dict().items()},
                    "window": W, "n_features": F},
        "metrics": {"test": test_m, "val": val_m, "runtime": scorer._backend.name},
        "agreement": agree,
        "teacher_metrics": {"test": ctx.teacher_test, "val": ctx.teacher_val},
        "gate": {"split": "val", "max_f1_drop": ctx.cfg.max_f1_drop,
                 "teacher_f1": ctx.teacher_val["f1"], "artifact_f1": val_m["f1"],
                 "rule": ctx.cfg.gate, "split_measure": split, "passed": bool(gate_ok)},
        "threshold_rule": {"rule": ctx.threshold_rule, "split": "val",
                           "teacher_flag_rate": ctx.teacher_val_rate,
                           "artifact_flag_rate": float(np.mean(p_val >= decision))},
        "escalation": {"val_share": float(in_band.mean())},
        "export": details,
        "provenance": _provenance(ctx, artifact_dest(ctx.cfg, target)),
        "probe": probe,
    }
    if quantization is not None:
        key = "qat_val_f1" if quantization.get("qat") else "ptq_val_f1"
        fields["quantization"] = {**quantization, key: float(val_m["f1"])}
    write_manifest(folder, fields, files)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["model_version"] = (
        f"{target}-{kind}{cand.width}-p{int(cand.prune_ratio * 100)}-"
        f"{'qat-' if cand.qat else ''}"
        f"{manifest['sha256'][MODEL_FILES[target][0]][:12]}"
    )
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    load_artifact(folder, prefer_micro=target == "tflite-micro").check_probe()

    cand.params = fields["params"]
    cand.size_bytes = int(manifest["size_bytes"])
    cand.val_f1, cand.test_f1 = float(val_m["f1"]), float(test_m["f1"])
    cand.agreement = agree["decision_agreement"]
    cand.split_gap = None if split is None else float(split["gap"])
    cand.passed = bool(gate_ok)
    cand.misses = misses
    cand.folder = folder
    return cand


GAP_MISS = "unseen-type gap"  # how a miss on the split measure's gap begins


def _gate_misses(ctx: _Context, val_f1: float, gap: float | None) -> list[str]:
    """Why a model with this validation F1 and unseen-type gap misses the gate: one
    phrase per rule it fails (the gap counts with ``--gate split`` only); empty
    when it passes."""
    drop = ctx.cfg.max_f1_drop
    floor = ctx.teacher_val["f1"] - drop
    misses = []
    if val_f1 < floor:
        misses.append(f"validation F1 {val_f1:.4f} < floor {floor:.4f}")
    if ctx.cfg.gate == "split" and gap is not None and gap > drop:
        misses.append(f"{GAP_MISS} {gap:.4f} > {drop:g}")
    return misses


def _float_split_gap(ctx: _Context, model: torch.nn.Module) -> float | None:
    """The float student's unseen-type gap (teacher minus student F1 on held-out
    types the threshold never saw) when the gate uses it (``--gate split``), else
    None: what QAT, which recovers quantization loss, could at best get back to."""
    if ctx.cfg.gate != "split" or ctx.split_teacher_f1 is None:
        return None
    f1 = _split_f1(ctx, _sigmoid(student_logits(model, ctx.prep, ctx.val)))
    return None if f1 is None else ctx.split_teacher_f1 - f1


def _provenance(ctx: _Context, dest: Path) -> dict[str, Any]:
    """What made the artifact at ``dest``. Paths are recorded relative to ``dest``,
    or as ``$GATEWATCH_DATA/...`` under the data folder, never as this machine's
    absolute build paths: the manifest ships inside bundles."""
    from teacher.checkpoint import sha256_file

    tdir = Path(ctx.cfg.teacher)
    data_dir = ctx.cfg.data_dir

    def where(value: Any) -> Any:
        return portable_path(value, dest, data_dir)

    files = ctx.prep.files
    if isinstance(files, dict):
        files = {where(k): v for k, v in files.items()}
    elif isinstance(files, list):
        files = [where(f) for f in files]
    return {
        "teacher": {
            "path": where(str(tdir.resolve())),
            "model_sha256": sha256_file(tdir / "model.safetensors"),
            "config": ctx.teacher.config.to_dict(),
            "threshold": ctx.teacher.threshold,
            "dataset": where((ctx.teacher.provenance or {}).get("dataset")),
        },
        "data": {"dataset": where(ctx.prep.name), "files": files,
                 "timezone": ctx.prep.timezone,
                 "split_seed": split_seed(ctx.teacher.provenance or {}),
                 "rows": {"train": len(ctx.train), "val": len(ctx.val),
                          "test": len(ctx.test)},
                 # A file damaged part way: the artifact learned from the rows
                 # before the damage, and says so (the warnings name the place).
                 "partial": bool(ctx.prep.partial),
                 "warnings": list(ctx.prep.warnings)},
        "distill": {**ctx.distill.__dict__,
                    "rescored_by_teacher": _rescorer(ctx, ctx.distill) is not None},
        "versions": library_versions(),
        "argv": portable_argv(ctx.cfg.argv or list(sys.argv), dest, data_dir),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ------------------------------------------------------------ the --out folder

STAGE_NAME = ".search"
# Files an artifact folder may hold besides manifest.json and the files it lists:
# the site's calibrated thresholds (edge-agent calibrate), made for its model.
ARTIFACT_EXTRAS = ("site_thresholds.json",)


def _listing(names: list[str], most: int = 6) -> str:
    shown = ", ".join(sorted(names)[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def artifact_files_in(folder: Path) -> tuple[str | None, set[str]] | None:
    """``(target, file names)`` of the artifact in ``folder``: manifest.json, the
    files it lists and the extras; None when it holds no readable manifest."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, RecursionError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sha256"), dict):
        return None
    names = {n for n in manifest["sha256"]
             if isinstance(n, str) and n and "/" not in n and "\\" not in n
             and not n.startswith(".")}
    target = manifest.get("target")
    return (target if isinstance(target, str) else None,
            {"manifest.json", *names, *ARTIFACT_EXTRAS})


def _check_artifact_folder(folder: Path, target: str) -> None:
    """Refuse (UsageError) a folder that holds anything but ``target``'s artifact."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise UsageError(f"--out {folder} exists and is not a folder; name a folder")
    entries = [e.name for e in folder.iterdir() if e.name != STAGE_NAME]
    if not entries:
        return
    found = artifact_files_in(folder)
    if found is None:
        raise UsageError(
            f"--out {folder} holds files that are not a gatewatch artifact "
            f"({_listing(entries)}); name a new or empty folder")
    old_target, own = found
    if old_target != target:
        raise UsageError(
            f"--out {folder} holds a {old_target or 'unknown-target'} artifact "
            f"(manifest.json says target {old_target!r}); writing {target} there "
            "would mix the two: name another folder or remove that artifact first")
    stray = [n for n in entries if n not in own]
    if stray:
        raise UsageError(
            f"--out {folder} holds files that are not part of its {target} "
            f"artifact ({_listing(stray)}); move them or name another folder")


def check_out(out: str | Path, target: str) -> None:
    """Refuse up front (UsageError, exit 2) an ``--out`` the run would turn into a
    mixed folder: one holding another target's artifact (its manifest.json names
    the target) or files that are no artifact's. An artifact of the same target may
    be replaced. With ``all``, ``out`` holds only ``<target>`` folders, each checked
    the same way."""
    out = Path(out)
    try:
        if target != "all":
            _check_artifact_folder(out, target)
            return
        if not out.exists():
            return
        if not out.is_dir():
            raise UsageError(f"--out {out} exists and is not a folder; name a folder")
        if (out / "manifest.json").exists():
            found = artifact_files_in(out)
            what = f"a {found[0]} artifact" if found and found[0] else "a manifest.json"
            raise UsageError(
                f"--out {out} holds {what}; --target all writes one folder per "
                "target under --out, so name another folder")
        stray = [e.name for e in out.iterdir()
                 if e.name != STAGE_NAME and not (e.name in TARGETS and e.is_dir())]
        if stray:
            raise UsageError(
                f"--out {out} holds files that are not per-target artifact folders "
                f"({_listing(stray)}); name a new or empty folder")
        for name in TARGETS:
            _check_artifact_folder(out / name, name)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot be used ({exc})") from exc


def _drop_stale(dest: Path, old: set[str]) -> None:
    """Remove the files of the artifact ``dest`` held before that the new one does
    not list (another model file name, stale site thresholds). The new artifact is
    in place by then: a file that cannot be removed is a warning."""
    found = artifact_files_in(dest)
    keep = set() if found is None else found[1] - set(ARTIFACT_EXTRAS)
    for name in sorted(old - keep):
        path = dest / name
        if path.is_file() or path.is_symlink():
            if name in ARTIFACT_EXTRAS:
                logger.warning("%s: removed %s, made for the replaced model; "
                               "calibrate again", dest, name)
            try:
                path.unlink()
            except OSError as exc:
                logger.warning("%s: could not remove %s of the replaced artifact "
                               "(%s)", dest, name, write_problem(exc, path))


def artifact_dest(cfg: RunConfig, target: str) -> Path:
    """Where ``target``'s artifact ends up: ``out``, or ``out/<target>`` with all."""
    out = Path(cfg.out)
    return out / target if cfg.target == "all" else out


# ------------------------------------------------------------------ search


def _name(kind: str, width: int, ratio: float, quant: str, restart: int = 0) -> str:
    tail = quant.replace("/", "-").replace("+", "-")
    init = f"-i{restart + 1}" if restart else ""
    return f"{kind}{width}{init}-p{int(ratio * 100)}" + (f"-{tail}" if tail else "")


def _try(ctx: _Context, target: str, kind: str, width: int, ratio: float,
         stage: Path, frontier: list[Candidate], restart: int = 0) -> Candidate | None:
    """Train (or reuse) one student and try its quantization options for a target.

    PTQ options first; then quantization-aware fine-tuning as ``ctx.cfg.qat`` says.
    """
    try:
        model = _student(ctx, kind, width, ratio, restart)
    except ModelError as exc:
        frontier.append(Candidate(target, kind, width, ratio, restart=restart,
                                  note=str(exc)[:80]))
        return None
    float_f1 = _float_val_f1(ctx, model)
    floor = ctx.teacher_val["f1"] - ctx.cfg.max_f1_drop
    params = int(sum(p.numel() for p in model.parameters()))
    if float_f1 < floor:
        frontier.append(Candidate(target, kind, width, ratio, params=params,
                                  restart=restart, float_val_f1=float_f1,
                                  note=FLOAT_MISSES))
        return None
    int8 = target in INT8_TARGETS
    what = "quantized model" if int8 else "exported model"
    exported: list[tuple[Candidate, dict[str, str]]] = []
    passed = None
    for options in _quant_options(target, kind):
        quant = "/".join(options.values())
        cand = Candidate(target, kind, width, ratio, quant=quant, params=params,
                         restart=restart, float_val_f1=float_f1)
        name = _name(kind, width, ratio, quant, restart)
        ctx.progress(f"{target}: exporting and verifying {name}")
        try:
            export_candidate(ctx, cand, model, stage / name, options,
                             {"qat": False, "mode": "ptq", "qat_setting": ctx.cfg.qat}
                             if int8 else None)
        except (ExportError, ModelError) as exc:  # ModelError: the runtime refused it
            cand.note = str(exc)[:120]
            frontier.append(cand)
            logger.warning("%s", exc)
            continue
        frontier.append(cand)
        exported.append((cand, options))
        if cand.passed:
            passed = cand
            break
        cand.note = f"{what} misses the gate: {'; '.join(cand.misses)}"
    mode = ctx.cfg.qat
    if (not int8 or not exported or mode == "off" or (mode == "auto" and passed)
            or kind not in QAT_KINDS):
        return passed
    if mode == "auto":
        # QAT gets back what quantization lost; a gap on unseen types the float
        # student already has is generalization, which it cannot repair.
        float_gap = _float_split_gap(ctx, model)
        if float_gap is not None and float_gap > ctx.cfg.max_f1_drop:
            last = exported[-1][0]
            last.note += (f"; no QAT: the float student's {GAP_MISS} "
                          f"{float_gap:.4f} > {ctx.cfg.max_f1_drop:g} already")
            return passed
    ptq, options = max(exported, key=lambda pair: pair[0].val_f1 or 0.0)
    qat = _qat_attempt(ctx, ptq, model, options, stage, frontier)
    if qat is None or not qat.passed:
        return passed
    if passed is not None and (qat.val_f1 or 0.0) <= (passed.val_f1 or 0.0):
        qat.note = "passes, but no better than PTQ: PTQ kept"
        return passed
    qat.note = "kept"
    return qat


def _qat_attempt(ctx: _Context, ptq: Candidate, model: torch.nn.Module,
                 options: dict[str, str], stage: Path,
                 frontier: list[Candidate]) -> Candidate | None:
    """Quantization-aware fine-tuning of ``model``, then the PTQ export of ``ptq``."""
    cfg = ctx.cfg
    quant = f"{ptq.quant}+qat" if ptq.quant else "qat"
    cand = Candidate(ptq.target, ptq.kind, ptq.width, ptq.prune_ratio, quant=quant,
                     params=ptq.params, restart=ptq.restart,
                     float_val_f1=ptq.float_val_f1, qat=True)
    name = _name(ptq.kind, ptq.width, ptq.prune_ratio, quant, ptq.restart)
    tune = DistillConfig(**{**ctx.distill.__dict__, "epochs": cfg.qat_epochs,
                            "patience": cfg.qat_epochs, "lr": ctx.distill.lr / 10})
    key = (ptq.kind, ptq.width, ptq.prune_ratio, ptq.restart)
    if key not in ctx.qat_students:
        ctx.progress(f"{ptq.target}: quantization-aware fine-tuning of "
                     f"{_name(ptq.kind, ptq.width, ptq.prune_ratio, '', ptq.restart)} "
                     f"({cfg.qat_epochs} epochs)")
        try:
            student, _, history = qat_finetune(
                model, ctx.prep, ctx.train, ctx.y, ctx.t_train, ctx.val,
                ctx.calibration, tune, teacher_fn=_rescorer(ctx, tune))
        except ModelError as exc:
            cand.note = str(exc)[:120]
            frontier.append(cand)
            return None
        ctx.qat_students[key] = (student, history)
    student, history = ctx.qat_students[key]
    info = {
        "qat": True, "mode": "qat", "qat_setting": cfg.qat, "epochs": len(history),
        "best_epoch": int(np.argmin([h["val_loss"] for h in history])),
        "lr": tune.lr, "ptq_val_f1": ptq.val_f1, "ptq_quant": ptq.quant or None,
        "weights": f"per-channel symmetric int8 {list(WEIGHT_RANGE)}",
        "activations": f"per-tensor affine int8 {list(ACT_RANGE)}",
        "fake_quant": "torchao.quantization.pt2e FakeQuantize (straight-through)",
        "loss": "distillation",
    }
    ctx.progress(f"{ptq.target}: exporting and verifying {name}")
    try:
        export_candidate(ctx, cand, student, stage / name, options, info)
    except (ExportError, ModelError) as exc:  # ModelError: the runtime refused it
        cand.note = str(exc)[:120]
        frontier.append(cand)
        logger.warning("%s", exc)
        return None
    frontier.append(cand)
    if not cand.passed:
        better = (cand.val_f1 or 0.0) > (ptq.val_f1 or 0.0)
        cand.note = ("qat improves PTQ but misses the gate" if better
                     else "qat misses the gate") + f": {'; '.join(cand.misses)}"
    return cand


def _search(ctx: _Context, target: str, stage: Path) -> tuple[Candidate | None,
                                                               list[Candidate]]:
    """Smallest passing candidate for one target, and every candidate tried.

    Per student kind, widths are tried in ``cfg.widths`` order (as given; the
    general default is smallest first), each up to ``1 + cfg.restarts`` times from
    other initialisations while it misses the gate; the first that passes is kept,
    with its pruned versions."""
    # A temporal CNN (kernel 3) over a window shorter than 3 only multiplies
    # padding with most of its taps: an MLP with dead weights, so not searched.
    kinds = [ctx.cfg.student] if ctx.cfg.student else [
        k for k in SEARCH_KINDS if target in student_targets(k)
        and not (k == "cnn" and ctx.prep.window < 3)]
    if not ctx.cfg.student and ctx.prep.window < 3 and "cnn" in SEARCH_KINDS:
        logger.info("windows of %d flow(s): cnn students are not searched (a kernel "
                    "of 3 over them is an mlp with dead weights; --student cnn "
                    "tries one anyway)", ctx.prep.window)
    kinds = [k for k in kinds if target in student_targets(k)]
    if not kinds:
        raise UsageError(f"student {ctx.cfg.student!r} does not support {target}")
    frontier: list[Candidate] = []
    passing: list[Candidate] = []
    tries = [(width, restart) for width in ctx.cfg.widths
             for restart in range(1 + (ctx.cfg.restarts or 0))]
    for kind in kinds:
        for width, restart in tries:
            found = _try(ctx, target, kind, width, 0.0, stage, frontier, restart)
            if found is None:
                continue
            passing.append(found)
            # A passing student: can structured pruning make it smaller still?
            if kind != "lstm":
                for ratio in ctx.cfg.prune_ratios:
                    pruned = _try(ctx, target, kind, width, ratio, stage, frontier,
                                  restart)
                    if pruned is not None:
                        passing.append(pruned)
            break
    best = min(passing, key=lambda c: (c.size_bytes or 0, -(c.val_f1 or 0)),
               default=None)
    return best, frontier


def _report_sparsity(ctx: _Context, best: Candidate) -> dict[str, Any]:
    model = _student(ctx, best.kind, best.width, best.prune_ratio, best.restart)
    sparse, share = magnitude_sparsity(model, 0.5)
    return {"amount": 0.5, "sparsity": share,
            "float_val_f1": _float_val_f1(ctx, sparse),
            "note": "unstructured magnitude pruning zeroes weights only; the file "
                    "keeps its size, so no artifact uses it"}


def run(cfg: RunConfig, progress: Callable[[str], None] | None = None) -> RunResult:
    """Run the pipeline for ``cfg.target`` (or all); writes artifacts under ``out``.

    With one target, ``out`` is the artifact folder; with ``all``, ``out/<target>``.
    Every artifact is made in the staging folder first and put in place only once
    all targets are done (:func:`_place`), so an error or a Ctrl-C before that
    leaves the old artifacts whole. A file that cannot be written (a full disk) stops
    the run at once: a GatewatchError naming ``out`` and the reason (exit 1), not a
    candidate that failed. Raises :class:`GateMissed` (a GateError) when no
    candidate of any requested target passes; a run that writes no artifact removes
    the ``out`` folder (and its parents) again where it made them.
    """
    say = progress or (lambda msg: logger.info("%s", msg))
    made = _first_missing(Path(cfg.out))  # removed again if nothing is written
    check_out(cfg.out, cfg.target)
    ctx = _context(cfg, say)
    say(f"teacher validation F1 {ctx.teacher_val['f1']:.4f}, gate floor "
        f"{ctx.teacher_val['f1'] - cfg.max_f1_drop:.4f}")
    targets = list(TARGETS) if cfg.target == "all" else [cfg.target]
    out = Path(cfg.out)
    stage = out / STAGE_NAME
    kept = _kept(cfg, targets)
    artifacts: dict[str, Path] = {}
    frontier: list[Candidate] = []
    failed: dict[str, str] = {}
    # Per target: the staged artifact folder and where it goes.
    ready: dict[str, tuple[Path, Path]] = {}
    # The staging folder goes whatever happens: a gate miss, an error, Ctrl-C.
    try:
        try:
            for target in targets:
                dest = artifact_dest(cfg, target)
                if target == "torch-int8":
                    from compress.inc import torch_int8_artifact

                    src = stage / target / "artifact"
                    try:
                        torch_int8_artifact(ctx, src, dest)
                    except (ExportError, ModelError) as exc:
                        failed[target] = str(exc)
                        continue
                    ready[target] = (src, dest)
                    continue
                best, rows = _search(ctx, target, stage / target)
                frontier.extend(rows)
                if best is None:
                    failed[target] = (
                        f"no candidate passed the gate ({_tried(ctx, rows)})"
                        if any(_at_gate(c) for c in rows) or not rows else
                        f"every export failed ({_first_failure(rows)})")
                    continue
                _publish(best.folder, dest, _report_sparsity(ctx, best))
                ready[target] = (best.folder, dest)
            old = {target: _old_files(dest) for target, (_, dest) in ready.items()}
            if ready:
                _place(list(ready.values()), stage, cfg.closing)
        except OSError as exc:
            raise write_failed(out, exc, kept) from exc
        artifacts = {target: dest for target, (_, dest) in ready.items()}
        for target, dest in artifacts.items():
            _drop_stale(dest, old[target])
    finally:
        with deferred():  # a stop now waits: no half-removed staging folder
            shutil.rmtree(stage, ignore_errors=True)
            if not artifacts and made is not None:
                _remove_made(out, made)
    result = RunResult(artifacts, frontier, {"val": ctx.teacher_val,
                                             "test": ctx.teacher_test}, failed,
                       partial=ctx.prep.partial, warnings=list(ctx.prep.warnings))
    if not artifacts:
        # Targets that failed before any gate (torch-int8's export) say why.
        others = "".join(f"; {_named(t, why)}" for t, why in failed.items()
                         if t not in {c.target for c in frontier})
        table = f"{frontier_table(frontier)}\n{UNSEEN_LEGEND}"
        if failed and not any(_at_gate(c) for c in frontier):
            whys = [f"every export failed ({_first_failure(frontier)})"] \
                if frontier else []
            whys += [_named(t, why) for t, why in failed.items()
                     if t not in {c.target for c in frontier}]
            raise ExportsFailed(f"no artifact was made for {', '.join(targets)}: "
                                f"{'; '.join(whys)}", result, table)
        reason = (f"no artifact passed the gate for {', '.join(targets)}: "
                  f"{_why_none(ctx, frontier)}{others}")
        raise GateMissed(reason, result, table)
    return result


def _named(target: str, why: str) -> str:
    """``TARGET: WHY`` for an error line, the target named once (an export error
    already starts with it)."""
    return why if why.startswith(f"{target}:") else f"{target}: {why}"


def _kept(cfg: RunConfig, targets: list[str]) -> str:
    """What a run that fails before its artifacts are in place leaves in ``out``:
    the artifacts it held (kept whole), or nothing."""
    held = [t for t in targets if artifact_files_in(artifact_dest(cfg, t))]
    if not held:
        return "nothing was written"
    return ("the artifact it held is kept" if cfg.target != "all"
            else f"the artifacts it held ({', '.join(held)}) are kept")


def write_failed(out: Path, exc: OSError, kept: str) -> GatewatchError:
    """The one-line error (exit 1) of a file under ``out`` that could not be
    written (a full disk, a folder that refuses new files): ``out``, the reason and
    what is left there. A file elsewhere (the temporary folder) is named too."""
    name = exc.filename
    where = Path(os.fsdecode(name)) if isinstance(name, str | bytes) else None
    reason = write_problem(exc, where or out)
    try:
        inside = where is None or Path(os.path.abspath(out)) in [
            Path(os.path.abspath(where)), *Path(os.path.abspath(where)).parents]
    except (OSError, ValueError):
        inside = True
    if not inside:
        reason = f"{where}: {reason}"
    return GatewatchError(f"--out {out}: cannot write the artifact ({reason}); {kept}")


def _gate_rule(ctx: _Context) -> str:
    """The gate's rule as a sentence's clause, with the teacher's numbers."""
    drop = ctx.cfg.max_f1_drop
    rule = f"validation F1 must be >= teacher {ctx.teacher_val['f1']:.4f} - {drop:g}"
    if ctx.cfg.gate == "split":
        rule += (f", and (--gate split) the {GAP_MISS} (teacher minus artifact F1 on "
                 f"held-out attack types the threshold never saw) must be <= {drop:g}")
    return rule


def _at_gate(c: Candidate) -> bool:
    """Whether ``c`` was measured against the gate: exported and scored, or a float
    student already below the floor (the others failed before: an export the
    converter or the runtime refused)."""
    return c.val_f1 is not None or c.note == FLOAT_MISSES


def _why_none(ctx: _Context, rows: list[Candidate]) -> str:
    """Why none of ``rows`` passed, for the error line: the gate's rule and what
    the candidates came to; or, when none was measured against that rule, that
    every export failed, with the first one's reason."""
    if not rows:
        return "no candidate was made"
    if any(_at_gate(c) for c in rows):
        return f"{_gate_rule(ctx)} ({_tried(ctx, rows)})"
    return f"no candidate reached it, every export failed ({_first_failure(rows)})"


def _first_failure(rows: list[Candidate]) -> str:
    """``N candidates tried; the first, LABEL QUANT: NOTE`` of failed ``rows``."""
    first = rows[0]
    return (f"{_count(rows)}; the first, {first.label} {first.quant or 'float'}: "
            f"{first.note}")


def _count(rows: list[Candidate]) -> str:
    """``N candidates tried``."""
    return f"{len(rows)} candidate{'' if len(rows) == 1 else 's'} tried"


def _tried(ctx: _Context, rows: list[Candidate]) -> str:
    """What the candidates tried came to: how many, the best validation F1 of those
    measured against the gate, how many failed before it (an export refused) with
    the first one's reason, and with ``--gate split`` the smallest unseen-type gap
    and how many missed on it alone."""
    parts = [_count(rows)]
    gated = [c for c in rows if _at_gate(c)]
    scores = [c.val_f1 if c.val_f1 is not None else c.float_val_f1 for c in gated]
    scores = [s for s in scores if s is not None]
    if scores:
        parts.append(f"best validation F1 {max(scores):.4f}")
    broken = [c for c in rows if not _at_gate(c)]
    if broken:
        parts.append(f"{len(broken)} failed before the gate (first: {broken[0].note})")
    if ctx.cfg.gate == "split":
        gaps = [c.split_gap for c in rows if c.split_gap is not None]
        if gaps:
            parts.append(f"smallest {GAP_MISS} {min(gaps):.4f}")
        alone = sum(1 for c in rows
                    if c.misses and all(m.startswith(GAP_MISS) for m in c.misses))
        if alone:
            parts.append(f"{alone} passed on validation F1 but missed on the "
                         f"{GAP_MISS} alone")
    return "; ".join(parts)


def _first_missing(out: Path) -> Path | None:
    """The highest folder of ``out``'s path that does not exist yet (``out`` itself
    or a parent the run would make), or None when ``out`` exists already."""
    top = None
    path = out
    while not path.exists() and not path.is_symlink():
        top = path
        if path.parent == path:
            break
        path = path.parent
    return top


def _remove_made(out: Path, top: Path) -> None:
    """Remove the empty folders a run that wrote nothing made: those under ``out``,
    ``out`` and its parents up to ``top``. Only empty folders go (``rmdir``): a
    file anyone put there keeps its folder, and a folder that existed before the run
    is above ``top``, so never touched."""
    if out.is_dir() and not out.is_symlink():
        for sub in sorted(out.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if sub.is_dir() and not sub.is_symlink():
                try:
                    sub.rmdir()
                except OSError:
                    pass
    path = out
    while True:
        try:
            path.rmdir()
        except OSError:
            return
        if path == top or path.parent == path:
            return
        path = path.parent


def _old_files(dest: Path) -> set[str]:
    """The files of the artifact ``dest`` holds now (none when it holds none)."""
    found = artifact_files_in(dest)
    return set() if found is None else found[1]


def _publish(src: Path, dest: Path, sparsity: dict[str, Any]) -> None:
    """Finish the staged artifact ``src`` that is to go to ``dest``: its manifest's
    pruning entry (model files are unchanged). :func:`_place` moves it there."""
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["pruning"] = {"structured_ratio": manifest["student"]["prune_ratio"],
                           "unstructured": sparsity}
    (src / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


class _Unheld:
    """Ctrl-C held by nobody while artifacts are put in place (a library call):
    :func:`_place` moves the old files back when one comes part way."""

    def hold(self) -> None:
        """Nothing to hold."""

    def placed(self) -> None:
        """Nothing to say."""


def _move(src: Path, dest: Path) -> None:
    """One rename of :func:`_place` (a test waits in it to send a Ctrl-C)."""
    os.replace(src, dest)


def _place(ready: list[tuple[Path, Path]], stage: Path, closing: Any) -> None:
    """Put each staged artifact ``(src, dest)`` in place: its files renamed into
    ``dest``, the old artifact's files of the same names first moved aside (into
    ``stage``, removed with it). Renames only, on the one file system of ``out``:
    no copy that a full disk could cut short.

    ``closing`` holds Ctrl-C from the first rename (``hold``) and hears when the
    last is done (``placed``): from then on the run has finished. An OSError part
    way (or, with nothing holding it, a Ctrl-C) moves every file back where it was,
    so the old artifacts stay whole, and is raised again."""
    closing = closing or _Unheld()
    aside = stage / "replaced"
    for _, dest in ready:
        dest.mkdir(parents=True, exist_ok=True)
    aside.mkdir(parents=True, exist_ok=True)
    done: list[tuple[Path, Path]] = []  # the renames made, to undo in reverse
    closing.hold()
    try:
        for i, (src, dest) in enumerate(ready):
            manifest = json.loads((src / "manifest.json").read_text())
            names = ["manifest.json", *manifest["sha256"]]
            old = aside / str(i)
            old.mkdir()
            for name in names:
                if (dest / name).exists() or (dest / name).is_symlink():
                    _move(dest / name, old / name)
                    done.append((dest / name, old / name))
            for name in names:
                _move(src / name, dest / name)
                done.append((src / name, dest / name))
    except BaseException:
        for before, after in reversed(done):
            with contextlib.suppress(OSError):
                os.replace(after, before)
        raise
    closing.placed()


FLOAT_MISSES = "float student below the gate"  # the note of one never quantized
# The line under a frontier table: what its ``unseen`` column means.
UNSEEN_LEGEND = ("unseen: teacher minus artifact F1 on held-out attack types the "
                 "threshold never saw (positive: the artifact is worse; -: not "
                 "measured, the teacher held out no types)")


def _passed(c: Candidate) -> str:
    """The pass column: ``yes`` or ``no``, with the candidate's note in brackets."""
    word = "yes" if c.passed else "no"
    return f"{word} ({c.note})" if c.note else word


def frontier_table(rows: list[Candidate]) -> str:
    """The candidates as a fixed-width text table (``unseen``: the split measure's
    gap, teacher minus artifact F1 on held-out types the threshold never saw)."""
    head = (f"{'target':<13}{'student':<10}{'prune':>6}{'quant':>22}{'params':>8}"
            f"{'bytes':>9}{'fF1val':>8}{'F1val':>8}{'F1test':>8}{'agree':>7}"
            f"{'unseen':>8}  pass")
    lines = [head, "-" * len(head)]

    def num(v: float | None, fmt: str) -> str:
        return format(v, fmt) if v is not None else "-"

    for c in rows:
        lines.append(
            f"{c.target:<13}{c.label:<10}{c.prune_ratio:>6.2f}"
            f"{c.quant or '-':>22}{c.params:>8}{num(c.size_bytes, 'd'):>9}"
            f"{num(c.float_val_f1, '.4f'):>8}{num(c.val_f1, '.4f'):>8}"
            f"{num(c.test_f1, '.4f'):>8}{num(c.agreement, '.3f'):>7}"
            f"{num(c.split_gap, '+.4f'):>8}  {_passed(c)}"
        )
    return "\n".join(lines)
