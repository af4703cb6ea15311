"""The ``teacher`` command: train, eval, baselines, tune and update.

Every subcommand takes its data as ``--dataset NAME`` (a registered dataset, found
in ``--data-dir`` or ``GATEWATCH_DATA``) or ``--data FILE`` (any file ``flows``
reads; ``--timezone ZONE`` names the zone of an Argus binetflow file's start times,
as in ``flows``). Errors print ``error: <message>`` and return the documented exit
code (see ``flows/errors.py``); no tracebacks. ``teacher train`` also runs under
``torchrun`` (DistributedDataParallel; rank 0 writes the checkpoint). When
``teacher.serve`` is installed, its ``serve`` and ``alerts`` subcommands are added
here too.
"""

from __future__ import annotations

import sys

from flows.stops import sigterm_stops, stop_line
from teacher.interrupts import Closing, held, loading

# A Ctrl-C while the libraries load (numpy, a second or more) is held until they
# are loaded, then ends the command in one line, exit 130 (teacher.interrupts).
with loading():
    import argparse
    import contextlib
    import importlib
    import importlib.util
    import json
    import logging
    import os
    import shutil
    import tempfile
    import time
    from collections.abc import Callable
    from pathlib import Path
    from typing import Any

    from flows.argtypes import (
        check_writable_above,
        integer,
        integers,
        nearest_existing,
        real,
        zone_name,
    )
    from flows.encoder import DEFAULT_KNOTS, SCALINGS
    from flows.errors import (
        EXIT_BAD_INPUT,
        EXIT_FAILURE,
        EXIT_INTERRUPTED,
        EXIT_OK,
        EXIT_PARTIAL_INPUT,
        EXIT_UNAVAILABLE,
        EXIT_USAGE,
        BadInputError,
        GatewatchError,
        UsageError,
    )
    from flows.outfile import refuse_existing, write_file
    from teacher import logger
    from teacher.limits import MAX_BINS, MAX_SIZE, MAX_WINDOW

__all__ = ["build_parser", "main"]

EPILOG = f"""\
exit codes:
  {EXIT_OK}    ok
  {EXIT_FAILURE}    failure: a model or checkpoint is unusable (NaN weights, an
       encoder.json that does not fit its config.json, ...), or an output
       cannot be written once the work is done; or this is a gateway
       install (gatewatch[edge], no torch): pip install 'gatewatch[train]'
  {EXIT_USAGE}    usage: bad flags or arguments (a --dataset name that is not
       registered included); an --out that cannot be made or written in
       (a file in its path, a read-only folder), or a train/update --out
       folder that is not empty (with --force: that holds anything but a
       teacher checkpoint) or lies inside a checkpoint folder, a baselines
       --out file or tune --out tables already there (without --force), or
       one that could not be written (a folder in its place, a read-only
       file; with --force too); train size flags that make a network of
       more than 50,000,000 weights; an update --out that is a checkpoint
       --checkpoint was updated from (--force or not); checked before any
       work; an eval --seed other than the checkpoint's on the dataset it
       trained on (checked once the checkpoint is read, before any row is
       scored)
  {EXIT_BAD_INPUT}    bad input: nothing usable read. A --data file that does not
       exist (error: --data FILE: no such file), checked before any work;
       a dataset file that is missing, fails its checksum or cannot
       be read; a checkpoint folder without checksums.json (its files
       cannot be verified; --allow-unverified loads a trusted old one) or
       with one that is not valid JSON, a compress artifact in its place,
       or without them and a file a checkpoint must have (written part
       way);
       data with too few labeled rows (label 0 or 1) to train or evaluate
       on (an unlabeled conn.log, say), or training rows all of one class;
       data of another feature family than the checkpoint's (--init-from,
       eval, update --data and --old-data; a file's family is told from its
       first 64 KiB, before its rows are read); an update --old-data that
       cannot be read
  {EXIT_PARTIAL_INPUT}    partial input: a data file damaged part way. A file cut short
       (a cut gzip stream or last line) is used up to the cut and the
       results are written; a bad row (a value that does not fit its
       field) stops before anything is trained or written, and the error
       names the file, line and column
  {EXIT_UNAVAILABLE}    broker: teacher serve cannot reach or stay with the MQTT broker
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C). For train and update only before the new
       checkpoint is in place: a Ctrl-C after that is noted on stderr and
       the run ends with its own code (0 or 4), the checkpoint complete; a
       second one stops the closing steps (130, saying the same)
  143  stopped by SIGTERM: as a Ctrl-C (the same clean-up, the same note
       once the checkpoint is in place), one line saying so; serve stops in
       order on SIGTERM (exit 0)
"""

NSL_KDD_HOLDOUT = 0.5
# Training settings that differ per feature family, unless a flag says otherwise
# (NSL-KDD: input noise 0.05 in the quantile-scaled space, round 4; made-up
# anomalies in 10 % of each batch, round 10; each chosen on three held-out-type
# validation folds, teacher/results/roundN).
FAMILY_TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "nsl-kdd": {"input_noise": 0.05, "outliers": 0.1},
}
# Seeds `teacher train` averages unless told otherwise (the NSL-KDD round 3 runs).
TRAIN_MEMBERS = 3
# What `teacher tune` writes into its --out folder (teacher.tune.write_table).
TUNE_FILES = ("tune.json", "tune.csv", "tune.md")
# The range of each setting `teacher train` takes as one value and `teacher tune`
# as a grid, kept in one place so that both refuse the same values when the flags
# are parsed (TrainConfig and TeacherConfig check them again when the work starts).
SETTING_TYPES: dict[str, Callable[[str], Any]] = {
    "lr": real(0, 10, lo_open=True),
    "weight_decay": real(0, 10),
    "batch_size": integer(2, 1_000_000),
    "input_noise": real(0, 1),
    "label_smoothing": real(0, 1, hi_open=True),
    "ema": real(0, 1, hi_open=True),
    "dropout": real(0, 1, hi_open=True),
    "window": integer(1, MAX_WINDOW),
    "filters": integer(1, MAX_SIZE),
    # Not a train flag: --conv-filters gives one count per block.
    "conv_layers": integer(1, MAX_SIZE),
}
# `teacher tune`'s grid flags: flag, the setting it lists, what its help calls it.
GRID_FLAGS = (("--windows", "window", "window lengths"),
              ("--lrs", "lr", "learning rates"),
              ("--conv-layers", "conv_layers", "conv block counts"),
              ("--filters", "filters", "conv filter counts"),
              ("--batch-sizes", "batch_size", "batch sizes"),
              ("--dropouts", "dropout", "dropouts"),
              ("--weight-decays", "weight_decay", "weight decays"),
              ("--input-noises", "input_noise", "input-noise stds"),
              ("--label-smoothings", "label_smoothing", "label smoothings"),
              ("--emas", "ema", "weight-average decays"))


def _grid_of(one: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    """An argparse type for a ``teacher tune`` grid flag: comma-separated values,
    each checked by ``one``, the type of the same setting in ``teacher train``."""

    def parse(text: str) -> list[Any]:
        values = [one(v.strip()) for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated values like 1,2, got {text!r}")
        return values

    return parse


def _add_source(p: argparse.ArgumentParser, required: bool = True,
                zone_note: str = "") -> None:
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("--dataset",
                       help="registered dataset name, e.g. nsl-kdd (this or "
                            "--data is required)")
    group.add_argument("--data",
                       help="a flow file in any format flows reads (this or "
                            "--dataset is required)")
    p.add_argument("--data-dir", help="data folder (default: $GATEWATCH_DATA)")
    _add_timezone(p, "the --data file", zone_note)


def _add_timezone(p: argparse.ArgumentParser, which: str, note: str = "") -> None:
    """``--timezone``: as in ``flows inspect``/``convert``, for the files read."""
    p.add_argument("--timezone", metavar="ZONE", type=zone_name, default="UTC",
                   help="the time zone an Argus binetflow file's StartTime is "
                        f"written in ({which}), as an IANA name such as "
                        "Europe/Prague: Argus writes the local time of the machine "
                        "it ran on, without a zone, and this turns it into epoch "
                        "seconds (ts); other formats carry epoch times and ignore "
                        "it, as do the registered datasets, whose files all "
                        f"carry epoch times{note} (default: UTC)")


EVAL_SEED_HELP = (
    "seed of the train/val/test split of a --dataset (default: the seed the "
    "checkpoint's provenance.json records, the split it trained on, so the test "
    "and val rows are held out; 0 when it records none). Another seed than the "
    "recorded one is refused (exit 2) for the dataset the teacher trained on: its "
    "split would hold rows the teacher trained on")


def _add_common(p: argparse.ArgumentParser, seed_help: str | None = None) -> None:
    """--seed, --threads, -v/-q. With ``seed_help`` (eval), --seed has no default
    (None: the checkpoint's own, :func:`_eval_seed`)."""
    if seed_help is None:
        p.add_argument("--seed", type=integer(0), default=0, help="seed (default 0)")
    else:
        p.add_argument("--seed", type=integer(0), default=None, help=seed_help)
    p.add_argument("--threads", type=integer(1, 1024), default=None,
                   help="CPU threads for torch (default 1 on CPU: the model is "
                        "small and extra threads mostly wait on shared cores; use "
                        "torchrun --nproc_per_node=N to use N cores)")
    _add_loudness(p, default=argparse.SUPPRESS)


def _add_loudness(p: argparse.ArgumentParser, default) -> None:
    """-v/-q, taken before the command and after it (the command's wins)."""
    p.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="debug logging (default: info)")
    p.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="warnings only (default: info)")


def add_allow_unverified(p: argparse.ArgumentParser) -> None:
    """The opt-in for checkpoints without checksums.json (otherwise exit 3)."""
    p.add_argument("--allow-unverified", action="store_true", default=None,
                   help="load a checkpoint that has no checksums.json (one written "
                        "before checkpoints carried sha256s) without verifying its "
                        "files; default: refuse it (exit 3) unless "
                        "GATEWATCH_ALLOW_UNVERIFIED=1")


def _add_force(p: argparse.ArgumentParser) -> None:
    """``--force``: let ``--out`` replace the teacher checkpoint it holds."""
    p.add_argument("--force", action="store_true",
                   help="replace the teacher checkpoint --out already holds (the "
                        "new one is written beside it and swapped in when "
                        "complete; a failed write keeps the old one); a folder "
                        "holding anything else is still refused, exit 2 "
                        "(default: refuse any folder that is not empty)")


def _add_encoding(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scaling", choices=SCALINGS, default=None,
                   help="how numeric fields map to 0..1 when the encoder is fitted: "
                        "minmax (log1p on heavy tails, then min-max) or quantile "
                        "(training quantiles); default: the feature family's "
                        "(quantile for nsl-kdd and unsw-nb15, else minmax)")
    p.add_argument("--knots", type=integer(2, 100_000), default=None,
                   help=f"quantiles kept per field with --scaling quantile "
                        f"(default {DEFAULT_KNOTS})")


def _add_training(p: argparse.ArgumentParser, epochs: int = 50) -> None:
    p.add_argument("--epochs", type=integer(1, 100_000), default=epochs,
                   help=f"most epochs to train (default {epochs}; early stopping "
                        "usually ends sooner)")
    p.add_argument("--patience", type=integer(1), default=5,
                   help="epochs without a better validation score before stopping "
                        "(default 5)")
    p.add_argument("--lr", type=SETTING_TYPES["lr"], default=None,
                   help="Adam learning rate (default 3e-4)")
    p.add_argument("--weight-decay", type=SETTING_TYPES["weight_decay"], default=None,
                   help="Adam weight decay (default 1e-3)")
    p.add_argument("--batch-size", type=SETTING_TYPES["batch_size"], default=None,
                   help="training batch size (default 128)")
    p.add_argument("--samples-per-epoch", type=integer(1), default=None,
                   help="training samples drawn per epoch (default: the train "
                        "size, at most 40000)")
    p.add_argument("--no-balance", action="store_true",
                   help="plain shuffling instead of class-weighted sampling "
                        "(default: class-weighted)")
    p.add_argument("--smote", action="store_true",
                   help="SMOTE-oversample the training part, never val or test "
                        "(default: off)")
    p.add_argument("--threshold-rule", choices=("best-f1", "fpr"), default="best-f1",
                   help="how the decision threshold is chosen on validation rows: "
                        "best F1, or the lowest cut within --target-fpr "
                        "(default best-f1)")
    p.add_argument("--target-fpr", type=real(0, 1), default=0.01,
                   help="false-positive rate for --threshold-rule fpr (default 0.01)")
    p.add_argument("--max-minutes", type=real(0, lo_open=True), default=None,
                   help="stop training after this many minutes (default: no limit)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (cuda only where torch sees a GPU; "
                        "default: cuda when present, else cpu)")
    p.add_argument("--input-noise", type=SETTING_TYPES["input_noise"], default=None,
                   help="std of Gaussian noise on training inputs (default 0.05 "
                        "for nsl-kdd, else 0.02)")
    p.add_argument("--outliers", type=real(0, 1, hi_open=True), default=None,
                   help="share of each training batch turned into made-up "
                        "anomalies: windows with --outlier-swap of their features "
                        "taken from other windows, labelled malicious (default 0.1 "
                        "for nsl-kdd, else 0: off)")
    p.add_argument("--outlier-swap", type=real(0, 1, lo_open=True), default=None,
                   help="share of a made-up anomaly's features swapped in "
                        "(default 0.3)")
    p.add_argument("--outlier-unit", choices=("column", "field"), default=None,
                   help="what a made-up anomaly swaps: single feature columns "
                        "(default) or whole input fields, a categorical field's "
                        "one-hot block at once")
    p.add_argument("--outlier-donors", choices=("any", "malicious", "benign"),
                   default=None,
                   help="windows a made-up anomaly takes its swapped-in features "
                        "from: any window of the batch (default), or only its "
                        "malicious or only its benign ones")
    p.add_argument("--benign-mixup", type=real(0, 1, hi_open=True), default=None,
                   help="share of each training batch turned into blends of two "
                        "benign windows, labelled benign (default 0: off)")
    p.add_argument("--forest-targets", type=real(0, 0.5, hi_open=True),
                   default=None,
                   help="share of a Random Forest's out-of-bag score blended into "
                        "each training row's target (the forest of `teacher "
                        "baselines`, fitted on the training rows first; default 0: "
                        "off)")
    p.add_argument("--type-power", type=real(0, 1), default=None,
                   help="the malicious half of balanced sampling shared among "
                        "attack types by (type rows)^P: 1 as the data holds them "
                        "(default), 0.5 square root, 0 every type alike")
    p.add_argument("--benign-power", type=real(0, 1), default=None,
                   help="the benign half of balanced sampling shared among the "
                        "values of --benign-group by (rows with that value)^P: 1 "
                        "as the data holds them (default), 0.5 square root")
    p.add_argument("--benign-group", default=None, metavar="FIELD",
                   help="categorical field whose values --benign-power shares "
                        "the benign half among (default: service)")
    p.add_argument("--label-smoothing",
                   type=SETTING_TYPES["label_smoothing"], default=None,
                   help="share by which training targets are pulled towards 0.5 "
                        "(default 0.1)")
    p.add_argument("--ema", type=SETTING_TYPES["ema"], default=None,
                   help="decay of a moving average of the weights (default 0: off)")
    p.add_argument("--feature-dropout", type=real(0, 1, hi_open=True), default=None,
                   help="chance of zeroing each input feature in training "
                        "(default 0)")
    p.add_argument("--stop-on", choices=("loss", "f1"), default=None,
                   help="what early stopping watches on validation (default loss)")
    p.add_argument("--stop-rows", choices=("all", "seen"), default=None,
                   help="validation rows early stopping watches: all, or seen "
                        "(benign rows and attack types present in training; the "
                        "threshold still uses every row) (default all)")
    p.add_argument("--schedule", choices=("constant", "cosine"), default=None,
                   help="learning rate over training: constant, or cosine decay to "
                        "0 over --epochs (default constant)")
    p.add_argument("--keep", choices=("best", "last"), default=None,
                   help="weights kept: the best validation epoch's (early "
                        "stopping), or the last epoch's after every epoch has "
                        "run (default best)")


def _grid_default(flag: str) -> str:
    """The ``teacher tune`` default of a grid flag, as its help states it."""
    from teacher.tune import DEFAULT_GRID

    key = {"--lrs": "lr", "--batch-sizes": "batch_size"}.get(
        flag, flag[2:].replace("-", "_"))
    values = DEFAULT_GRID.get(key)
    return ",".join(str(v) for v in values) if values else "not searched"


def _sub(sub, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand parser whose help ends with the exit codes."""
    return sub.add_parser(
        name,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kwargs,
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``teacher`` command."""
    parser = argparse.ArgumentParser(
        prog="teacher",
        description="Train and evaluate the CNN-BiLSTM teacher.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_loudness(parser, default=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = _sub(sub, "train", help="train a teacher checkpoint")
    _add_source(p, zone_note="; recorded in the checkpoint's provenance, so that "
                             "compress run and teacher update read that data in "
                             "the same zone")
    p.add_argument("--out", required=True,
                   help="checkpoint folder to write: new or empty (required; a "
                        "file, or a folder holding anything, is refused before "
                        "training, exit 2; see --force)")
    _add_force(p)
    p.add_argument("--init-from",
                   help="checkpoint to fine-tune, same feature family (default: "
                        "train from scratch)")
    add_allow_unverified(p)
    p.add_argument("--window", type=SETTING_TYPES["window"], default=None,
                   help="window length W (default: the dataset's)")
    p.add_argument("--group-by", choices=("src_ip", "stream"), default=None,
                   help="how windows are grouped: per source host or in stream "
                        "order (default: the dataset's)")
    p.add_argument("--holdout-types", type=real(0, 1), default=None,
                   help="share of attack types moved whole into validation "
                        f"(default {NSL_KDD_HOLDOUT} for nsl-kdd, else 0)")
    p.add_argument("--conv-filters", type=integers(1, MAX_SIZE), default=None,
                   help="filters per conv block, e.g. 64,64 (default 128,128,128)")
    p.add_argument("--lstm-hidden", type=integer(1, MAX_SIZE), default=None,
                   help="hidden units per BiLSTM direction (default 64)")
    p.add_argument("--lstm-layers", type=integer(1, 64), default=None,
                   help="stacked BiLSTM layers (default 1)")
    p.add_argument("--dense", type=integers(1, MAX_SIZE), default=None,
                   help="dense layer sizes, e.g. 64 (default 64)")
    p.add_argument("--dropout", type=SETTING_TYPES["dropout"], default=None,
                   help="dropout before the dense layers (default 0.3)")
    p.add_argument("--members", type=integer(1, 64), default=None,
                   help="seeds trained apart and averaged (default "
                        f"{TRAIN_MEMBERS}; 1: a single network)")
    p.add_argument("--bins", type=integer(0, MAX_BINS), default=None,
                   help="piecewise-linear bins per quantile-scaled column inside "
                        "the network (needs --scaling quantile; default 0: none)")
    p.add_argument("--subspace", type=real(0, 1, lo_open=True), default=None,
                   help="share of input columns each member sees, drawn from its "
                        "seed (default 1.0: all)")
    p.add_argument("--replay-size", type=integer(0), default=5000,
                   help="training windows kept in the replay buffer, half of "
                        "each class where possible, drawn with --seed; each row "
                        "names the data it came from, and teacher update adds "
                        "its data to it (0: none; default 5000)")
    _add_encoding(p)
    _add_training(p)
    _add_common(p)

    p = _sub(sub, "eval", help="evaluate a checkpoint")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint folder to load (required)")
    add_allow_unverified(p)
    _add_source(p)
    p.add_argument("--split", default=None, choices=("train", "val", "test", "all"),
                   help="rows of a --dataset to score (default test); a --data file "
                        "is scored whole, so only 'all' goes with --data. A "
                        "warning names a file of the rows scored that the teacher "
                        "trained on (by sha256): a --data file, or a file of "
                        "--dataset the teacher trained on under another name, "
                        "with how many of its rows were its training and "
                        "validation rows")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (default: text)")
    p.add_argument("--no-timing", action="store_true",
                   help="skip latency timing (default: timed)")
    _add_common(p, seed_help=EVAL_SEED_HELP)

    p = _sub(sub, "baselines", help="RF, SVM and kNN on the same features")
    _add_source(p)
    p.add_argument("--window", type=integer(1, MAX_WINDOW), default=1,
                   help="window length W flattened into each row (default 1)")
    p.add_argument("--holdout-types", type=real(0, 1), default=None,
                   help="share of attack types moved whole into validation "
                        f"(default {NSL_KDD_HOLDOUT} for nsl-kdd, else 0), as in "
                        "teacher train")
    p.add_argument("--models", default="rf,svm,knn",
                   help="comma-separated baselines to run (default rf,svm,knn)")
    p.add_argument("--svm-cap", type=integer(1), default=20000,
                   help="SVM training-sample cap (default 20000)")
    p.add_argument("--knn-cap", type=integer(1), default=None,
                   help="kNN training-sample cap, at least 5 (its k; a smaller "
                        "one is refused, exit 2) (default: none)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (default: text)")
    p.add_argument("--out",
                   help="also write the JSON here; an existing file is refused "
                        "before the models run, exit 2, unless --force, and so is "
                        "a path that could not be written (a folder, a name "
                        "ending in /, a read-only file) (default: none)")
    p.add_argument("--force", action="store_true",
                   help="let --out overwrite an existing file (default: refuse it)")
    _add_encoding(p)
    _add_common(p)

    p = _sub(sub, "tune", help="grid search scored on validation data",
             description="Grid search scored on validation data. A grid flag "
                         "takes the values train takes for the same setting "
                         "(checked before any work, exit 2); a value listed "
                         "twice is tried once, with a note.")
    _add_source(p)
    p.add_argument("--budget", type=real(0, lo_open=True), required=True,
                   help="minutes the grid may take (required)")
    p.add_argument("--out", default="runs/tune",
                   help=f"folder for the table ({', '.join(TUNE_FILES)}); one "
                        "that already holds any of them is refused before the "
                        "grid runs, exit 2, unless --force, and so is one where a "
                        "table could not be written (a folder in its place, a "
                        "read-only file), --force or not (default runs/tune)")
    p.add_argument("--force", action="store_true",
                   help="let --out overwrite the tables it holds (default: "
                        "refuse them)")
    p.add_argument("--holdout-types", type=real(0, 1), default=None,
                   help="share of attack types moved whole into validation "
                        f"(default {NSL_KDD_HOLDOUT} for nsl-kdd, else 0)")
    for flag, key, what in GRID_FLAGS:
        default = "1" if key == "window" else _grid_default(flag)
        p.add_argument(flag, type=_grid_of(SETTING_TYPES[key]), default=None,
                       help=f"grid of {what}, comma-separated (default: "
                            f"{default})")
    p.add_argument("--trial-epochs", type=integer(1), default=8,
                   help="most epochs per trial (default 8)")
    p.add_argument("--trial-samples", type=integer(1), default=40000,
                   help="training samples per trial epoch (default 40000)")
    _add_encoding(p)
    _add_common(p)

    p = _sub(sub, "update", help="incremental learning with a replay buffer")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint folder to update (required)")
    add_allow_unverified(p)
    p.add_argument("--data", required=True,
                   help="new data: dataset name or file (required; a file that "
                        "does not exist is refused, exit 3). Data the checkpoint "
                        "learned before is listed once, as the new data, noting "
                        "where it was learned (learned_before)")
    p.add_argument("--old-data", default=None,
                   help="old data to measure forgetting on: a dataset name or "
                        "file, refused before training (exit 3) when it cannot "
                        "be read or is of another feature family than the "
                        "checkpoint (default: the checkpoint's dataset, skipped "
                        "with a warning when not available). Every dataset the "
                        "checkpoint learned before (its provenance) is scored "
                        "too, each named in the report's sources; one that can "
                        "no longer be read or has changed is listed as missing")
    p.add_argument("--data-dir", help="data folder (default: $GATEWATCH_DATA)")
    _add_timezone(p, "--data and --old-data",
                  "; without --old-data the checkpoint's own data is read in the "
                  "zone its provenance records (UTC if none). Recorded in the "
                  "updated checkpoint's provenance")
    p.add_argument("--out", required=True,
                   help="updated checkpoint folder to write: new or empty, and not "
                        "--checkpoint nor a checkpoint it was updated from "
                        "(required; refused before training, exit 2; see --force)")
    _add_force(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (default: text)")
    p.add_argument("--replay-size", type=integer(0), default=5000,
                   help="rows of the updated checkpoint's replay buffer: the "
                        "checkpoint's buffer plus the new training rows, an "
                        "equal share for each dataset learned so far, half of "
                        "each class where possible, drawn with --seed (0: none; "
                        "default 5000). A dataset learned before that the "
                        "checkpoint's buffer lacks (an update with 0 wrote none) "
                        "gets its share drawn again from its file when it can be "
                        "read (replay_rebuilt), else a warning names it "
                        "(replay_dropped). The report's replayed_rows (and "
                        "replay_size, its old name) counts the rows replayed in "
                        "training; replay_out is the buffer written")
    _add_training(p, epochs=10)
    _add_common(p)

    # The re-scorer's subcommands, once teacher.serve exists.
    if importlib.util.find_spec("teacher.serve") is not None:
        serve = importlib.import_module("teacher.serve")
        if hasattr(serve, "register"):
            serve.register(sub)
    return parser


def _setup(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else (
        logging.WARNING if args.quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    with held():  # a Ctrl-C inside torch's loading could abort or be lost
        import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    elif not torch.cuda.is_available():
        torch.set_num_threads(1)


def _prepare(args: argparse.Namespace, **kwargs: Any) -> Any:
    """``teacher.data.prepare`` of the command's ``--dataset`` or ``--data``.

    A ``--data`` file that is not there is bad input (exit 3: nothing usable was
    read), as in every other tool that reads a file; a ``--dataset`` name that is
    not registered stays a usage error (exit 2). ``--data`` also takes a
    registered dataset name, as it always did.
    """
    from teacher.data import missing_data, prepare

    data = getattr(args, "data", None)
    problem = (missing_data(data, dataset_flag=hasattr(args, "dataset"))
               if data else None)
    if problem is not None:
        raise problem
    return prepare(getattr(args, "dataset", None) or data,
                   timezone=args.timezone, **kwargs)


def _check_old_data(old_data: str | None) -> None:
    """Refuse up front (exit 3) a ``teacher update --old-data`` file that is not
    there, as ``--data``: the forgetting check was asked for, so it is not quietly
    skipped. (Only the checkpoint's own data, used when --old-data is not given,
    may be missing with a warning.)"""
    from flows.datasets import REGISTRY

    if old_data is None:
        return
    if not old_data.strip():
        raise UsageError("--old-data is empty; name a flow file or a dataset")
    if old_data not in REGISTRY and not Path(old_data).exists():
        raise BadInputError(
            f"--old-data {old_data}: no such file (a registered dataset name is "
            "taken too)")


def _data_ref(source: str, data_dir: str | None = None) -> str:
    """What provenance records as the data: a dataset name, else the file as
    :func:`teacher.data.data_ref` names it (``$GATEWATCH_DATA/...`` under the data
    folder, so ``compress`` finds it after the folder moved; else resolved)."""
    from teacher.data import data_ref

    return data_ref(source, data_dir) if Path(source).exists() else source


def _holdout(args: argparse.Namespace) -> float | dict[str, float]:
    """What ``prepare`` holds out for validation: ``--holdout-types``, else the
    family's default (half of NSL-KDD's attack types, none elsewhere)."""
    frac = args.holdout_types
    if frac is None:
        return {"nsl-kdd": NSL_KDD_HOLDOUT}
    if not 0.0 <= frac < 1.0:
        raise UsageError(f"--holdout-types must be in [0, 1), got {frac}")
    return frac


def _train_config(args: argparse.Namespace, **defaults: Any) -> Any:
    from teacher.train import TrainConfig

    kw: dict[str, Any] = dict(defaults)
    kw.update(epochs=args.epochs, patience=args.patience, seed=args.seed,
              balance=not args.no_balance, smote=args.smote,
              threshold_rule=args.threshold_rule, target_fpr=args.target_fpr,
              samples_per_epoch=args.samples_per_epoch, device=args.device,
              max_minutes=args.max_minutes)
    for name in ("lr", "weight_decay", "batch_size", "input_noise", "label_smoothing",
                 "ema", "feature_dropout", "stop_on", "stop_rows", "schedule",
                 "keep", "outliers", "outlier_swap", "outlier_unit", "outlier_donors",
                 "benign_mixup", "type_power", "benign_power", "benign_group",
                 "forest_targets"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    return TrainConfig(**kw)


def _progress(epochs: int, rank: int, quiet: bool,
              members: int = 1) -> tuple[Any, Any]:
    """A progress bar over every epoch of every member (an ensemble's members train
    one after another, each up to ``epochs``), and the callback that advances it."""
    if rank != 0 or quiet:
        return None, None
    from tqdm import tqdm

    members = max(1, int(members))
    desc = "epochs" if members == 1 else f"epochs ({members} members)"
    bar = tqdm(total=epochs * members, desc=desc, unit="epoch", file=sys.stderr)

    def on_epoch(rec: dict[str, Any]) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{rec['train_loss']:.4f}",
                        val_loss=f"{rec['val_loss']:.4f}",
                        val_f1=f"{rec['val_f1']:.4f}")

    return bar, on_epoch


def _check_out(out: str | Path, force: bool = False) -> None:
    """Refuse up front (exit 2) an ``--out`` that cannot become a checkpoint folder:
    an existing file, or a path under one, and a folder that is not empty (with
    ``force``, one that holds anything but a teacher checkpoint: see
    :func:`_check_out_holds`). Checked before minutes of training, so the model is
    not lost when save_checkpoint fails at the end."""
    if not str(out).strip():
        raise UsageError("--out is empty; name a checkpoint folder")
    path = Path(out)
    try:
        if path.exists() and not path.is_dir():
            raise UsageError(f"--out {out} exists and is not a folder; name a folder")
        _replace_out(out, force)
        above = nearest_existing(path.parent)
        if not above.is_dir():
            raise UsageError(f"--out {out}: {above} is a file, not a folder")
        # Make the folders once to learn now whether they can be made, then take
        # back the ones made: a failed run leaves nothing behind.
        made = [p for p in (path, *path.parents) if not p.exists()]
        path.mkdir(parents=True, exist_ok=True)
        for folder in made:
            folder.rmdir()
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot be used ({exc})") from exc


def _check_out_holds(path: Path, out: str | Path, force: bool) -> None:
    """Refuse (exit 2) an existing ``--out`` folder whose files a checkpoint would
    overwrite or mix with: without ``force`` any that is not empty; with it, one
    that holds anything but a teacher checkpoint (the entry named is one of
    those). Raises OSError when the folder cannot be listed."""
    from teacher.checkpoint import checkpoint_problem, checkpoint_strays

    entries = sorted(entry.name for entry in path.iterdir())
    if not entries:
        return
    strays = checkpoint_strays(path)
    hint = " (--force replaces a teacher checkpoint only)" if force else ""
    if strays:
        more = f" and {len(strays) - 1} more" if len(strays) > 1 else ""
        raise UsageError(
            f"--out {out} holds {strays[0]!r}{more}, which is not part of a "
            f"teacher checkpoint{hint}; name a new or empty folder")
    if "model.safetensors" not in entries:
        raise UsageError(
            f"--out {out} holds {', '.join(entries)} but no model.safetensors: not "
            "a teacher checkpoint; name a new or empty folder")
    problem = checkpoint_problem(path)
    if problem:
        raise UsageError(
            f"--out {out} holds model.safetensors but is not a gatewatch teacher "
            f"checkpoint ({problem}){hint}; name a new or empty folder")
    if not force:
        raise UsageError(
            f"--out {out} already holds a teacher checkpoint{_trained_on(path)}; "
            "pass --force to replace it, or name a new or empty folder")


def _trained_on(path: Path) -> str:
    """`` (trained on DATA)`` from a checkpoint's provenance, for messages; empty
    when it cannot be read."""
    try:
        data = json.loads((path / "provenance.json").read_text())
        name = data.get("dataset") if isinstance(data, dict) else None
    except (OSError, ValueError, RecursionError):
        return ""
    if not isinstance(name, str) or not name.strip():
        return ""
    name = "".join(c if c.isprintable() else "?" for c in " ".join(name.split()))
    return f" (trained on {name[:77] + '...' if len(name) > 80 else name})"


def _check_not_ancestor(out: str | Path, checkpoint: str | Path) -> None:
    """Refuse (exit 2) a ``teacher update --out`` that is a checkpoint the one
    being updated was updated from (its provenance's ``updated_from``, followed
    back): replacing it would make the chain a cycle and lose the data the
    forgetting check reads. Checked before any work."""
    seen: set[str] = set()
    folder = Path(checkpoint)
    while len(seen) < 100:
        try:
            prov = json.loads((folder / "provenance.json").read_text())
        except (OSError, ValueError, RecursionError):
            return
        parent = prov.get("updated_from") if isinstance(prov, dict) else None
        if not isinstance(parent, str) or not parent or parent in seen:
            return
        seen.add(parent)
        if _same_folder(out, parent):
            raise UsageError(
                f"--out {out} is a checkpoint {checkpoint} was updated from "
                "(its provenance's updated_from); replacing it would make the "
                "update chain a cycle. Write the update to another folder")
        folder = Path(parent)


def _check_not_inside(path: Path, out: str | Path) -> None:
    """Refuse (exit 2) an ``--out`` inside a folder that holds a model (a
    model.safetensors with a config.json or checksums.json beside it): the new
    checkpoint would be written into the old one's folder, which a later
    ``--force`` or a copy of it would carry along. Raises OSError when a folder
    above cannot be looked at."""
    from teacher.checkpoint import CHECKSUMS_FILE

    for folder in path.resolve().parents:
        if (folder / "model.safetensors").is_file() and (
                (folder / "config.json").is_file()
                or (folder / CHECKSUMS_FILE).is_file()):
            raise UsageError(
                f"--out {out} is inside the checkpoint folder {folder}; name a "
                "folder outside it")


def _replace_out(out: str | Path, force: bool) -> None:
    """Refuse (exit 2) an ``--out`` inside a checkpoint folder, or one holding what
    a checkpoint may not replace (:func:`_check_out_holds`). Part of
    :func:`_check_out`, and run again just before a checkpoint is written (the
    folder may have changed while the model trained). Nothing is removed here: see
    :func:`_write_out`."""
    path = Path(out)
    try:
        _check_not_inside(path, out)
        if path.is_dir():
            _check_out_holds(path, out, force)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot be used ({exc})") from exc


def _write_out(out: str | Path, write: Callable[[Path], Any],
               closing: Closing | None = None) -> Path:
    """Write a checkpoint to ``out`` with ``write(folder)`` and return ``out``.

    ``write`` fills a new hidden folder beside ``out``; only once it returns is
    that folder moved into place, and the checkpoint ``out`` held (already checked
    by :func:`_replace_out`) removed. A failed write (a full disk, say) removes
    the new folder, leaves the old checkpoint as it was and ends in one error line
    (exit 1): never half a checkpoint whose checksums.json lists what was written.
    With ``closing``, Ctrl-C is held from the swap on (:class:`Closing`): an
    interrupt between the two renames would leave ``out`` without a checkpoint.
    """
    from safetensors import SafetensorError

    path = Path(out)
    # A link to a folder is followed: the checkpoint goes where it points.
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    had = target.is_dir()
    kept = "the checkpoint it held is kept" if had else "nothing was written"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        mask = os.umask(0)
        os.umask(mask)
        mode = target.stat().st_mode & 0o7777 if had else 0o777 & ~mask
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".new",
                                    dir=target.parent))
    except OSError as exc:
        raise GatewatchError(f"--out {out}: cannot write the checkpoint "
                             f"({exc.strerror or exc}); {kept}") from exc
    try:
        os.chmod(tmp, mode)
        write(tmp)
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise GatewatchError(f"--out {out}: cannot write the checkpoint "
                             f"({reason}); {kept}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if closing is not None:
        closing.hold()
    old = None
    try:
        if had:
            # An empty folder made to take the old one's name, so no name is
            # guessed; rename replaces an empty folder.
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old",
                                        dir=target.parent))
            os.rename(target, old)
        os.rename(tmp, target)
    except OSError as exc:
        if old is not None and not target.exists():
            with contextlib.suppress(OSError):
                os.rename(old, target)
        if old is not None and old.is_dir() and not any(old.iterdir()):
            old.rmdir()
        shutil.rmtree(tmp, ignore_errors=True)
        raise GatewatchError(f"--out {out}: cannot move the new checkpoint into "
                             f"place ({exc.strerror or exc}); {kept}") from exc
    if closing is not None:
        closing.placed()
    logger.info("saved teacher checkpoint to %s", target)
    if old is not None:
        from flows.stops import deferred

        with deferred():  # a second stop waits: no half-removed folder left
            shutil.rmtree(old, ignore_errors=True)
        if old.exists():
            logger.warning("--out %s: the old checkpoint, moved to %s, could not "
                           "be removed", out, old)
        else:
            logger.info("--out %s: replaced the checkpoint it held", out)
    return path


def _check_device(device: str | None) -> None:
    """Refuse up front (exit 2) a ``--device`` torch cannot train on here: anything
    but cpu, cuda or cuda:N, and cuda where this torch has no usable GPU. Checked
    before the data loads, so a typo costs nothing."""
    if device is None:
        return
    text = device.strip().lower()
    if text == "cpu":
        return
    head, sep, index = text.partition(":")
    if head != "cuda" or (sep and not index.isdigit()):
        raise UsageError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    import torch

    if not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this torch sees no CUDA GPU "
                         "(not built with CUDA, or no GPU); use --device cpu")
    count = torch.cuda.device_count()
    if sep and int(index) >= count:
        raise UsageError(f"--device {device}: only {count} CUDA device(s) "
                         f"(cuda:0..cuda:{count - 1})")


def _same_folder(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same folder (links and ``..`` resolved)."""
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError):
        return False


def _check_out_file(out: str | Path, flag: str = "--out",
                    force: bool = False) -> None:
    """Refuse up front (exit 2) a file output that cannot be written: an existing
    folder, a name ending in ``/`` (a folder's), a path under a file, a folder
    that cannot be written in (see :func:`_unwritable`); and, without ``force``,
    a file already there (never overwritten unasked)."""
    if not str(out).strip():
        raise UsageError(f"{flag} is empty; name a file")
    path = Path(out)
    try:
        if path.is_dir():
            raise UsageError(f"{flag} {out} is a folder; name a file to write")
        if os.path.basename(os.fspath(out)) in ("", ".", ".."):
            raise UsageError(f"{flag} {out} names a folder, not a file; name a "
                             "file to write")
        refuse_existing(path, flag, force, shown=out)
        problem = _unwritable(path)
        if problem:
            raise UsageError(f"{flag} {out} {problem}")
        check_writable_above(path.parent, f"{flag} {out}")
    except OSError as exc:
        raise UsageError(f"{flag} {out}: cannot be used ({exc})") from exc


def _unwritable(path: Path) -> str | None:
    """Why a file could not be written at ``path`` once the work is done, or None
    when nothing here says so: a folder there, an existing file without write
    permission, a link whose target lies in a folder that is missing or cannot be
    written in. Only looks: nothing is made or changed, so a check that passes
    leaves no trace. Raises OSError when the path cannot be looked at."""
    if path.is_dir():
        target = f" (a link to {os.path.realpath(path)})" if path.is_symlink() else ""
        return f"is a folder{target}"
    if path.exists():
        return None if os.access(path, os.W_OK) else "exists and cannot be written"
    if path.is_symlink():
        # A dangling link: the write creates its target, in the target's folder.
        folder = Path(os.path.realpath(path)).parent
        if not folder.is_dir():
            return f"is a link into {folder}, which is not a folder here"
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"is a link into {folder}, which cannot be written in"
    return None


def _check_out_folder(out: str | Path, flag: str = "--out") -> None:
    """Refuse up front (exit 2) an output folder that cannot be made or written in:
    an existing file (never replaced), a path under a file, a folder without write
    permission."""
    if not str(out).strip():
        raise UsageError(f"{flag} is empty; name a folder")
    path = Path(out)
    try:
        if path.exists() and not path.is_dir():
            raise UsageError(f"{flag} {out} exists and is not a folder; it is "
                             "not replaced (name a folder)")
        check_writable_above(path, f"{flag} {out}")
    except OSError as exc:
        raise UsageError(f"{flag} {out}: cannot be used ({exc})") from exc


def _check_tables(out: str | Path, force: bool) -> None:
    """Refuse up front (exit 2) a ``teacher tune`` --out folder where a table
    (:data:`TUNE_FILES`) could not be written once the grid has run: a folder in
    its place, a read-only table, a link into a folder that is missing or
    read-only (:func:`_unwritable`; with ``force`` too); and, without ``force``,
    one that already holds a table it would overwrite. The folder itself is
    :func:`_check_out_folder`'s. Only looks: nothing is written before the grid."""
    folder = Path(out)
    try:
        for name in TUNE_FILES:
            problem = _unwritable(folder / name)
            if problem:
                raise UsageError(
                    f"--out {out}: {name} there {problem}, so the tuning table "
                    "could not be written; remove it or name another folder")
        if force:
            return
        taken = [name for name in TUNE_FILES
                 if (folder / name).exists() or (folder / name).is_symlink()]
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot be used ({exc})") from exc
    if taken:
        raise UsageError(
            f"--out {out} already holds {', '.join(taken)} (an earlier tuning); "
            "pass --force to overwrite them, or name a new folder")


def _finished(*preps: Any) -> int:
    """Exit code once a command's work is written: 4 when its data was damaged part
    way (what came before the damage was used; the readers' warnings name it)."""
    damaged = [p.name for p in preps if p is not None and p.partial]
    if damaged:
        logger.warning("%s: damaged part way; used the rows before the damage",
                       ", ".join(damaged))
        return EXIT_PARTIAL_INPUT
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    """``teacher train``: fit on train, stop and threshold on val, save a folder."""
    import numpy as np
    import torch

    from teacher.checkpoint import load_teacher, make_provenance, save_checkpoint
    from teacher.evaluate import evaluate
    from teacher.train import dist_info, fit
    from teacher.update import make_replay, save_replay

    _check_device(args.device)
    if args.init_from and _same_folder(args.out, args.init_from):
        raise UsageError(
            f"--out {args.out} is the --init-from checkpoint; write the fine-tuned "
            "one to another folder (the pretrained one is what it starts from)")
    _check_out(args.out, args.force)
    rank, world, _ = dist_info()
    start = time.monotonic()

    # Fine-tuning keeps the pretrained encoder and network shape.
    init_state, encoder, base = None, None, None
    if args.init_from:
        sized = [f"--{flag.replace('_', '-')}" for flag in (
            "conv_filters", "lstm_hidden", "lstm_layers", "dense", "dropout",
            "subspace", "bins", "members", "window", "scaling", "knots")
            if getattr(args, flag, None) not in (None, False)]
        if sized:
            raise UsageError(
                f"{', '.join(sized)} cannot be used with --init-from: a fine-tune "
                "keeps the pretrained checkpoint's encoder and network sizes")
        pre = load_teacher(args.init_from, device="cpu",
                           allow_unverified=args.allow_unverified)
        encoder, base = pre.encoder, pre.config
        init_state = {k: v.clone() for k, v in pre.model.state_dict().items()}
        # A registered dataset's family is known before its rows are read.
        from flows.datasets import REGISTRY

        spec = REGISTRY.get(getattr(args, "dataset", None) or "")
        if spec is not None and spec.family != encoder.family:
            raise BadInputError(
                f"{spec.name} holds {spec.family!r} records but the checkpoint's "
                f"encoder was fitted on {encoder.family!r}", path=str(args.init_from))
    else:
        # Sizes past the limit are refused before the data is read: with one input
        # feature the network is the smallest these flags can make.
        _network_config(args, n_features=1, window=1)
    prep = _prepare(args, encoder=encoder, data_dir=args.data_dir,
                    window=args.window, group_by=args.group_by, seed=args.seed,
                    need_split=True, scaling=args.scaling, knots=args.knots,
                    holdout=_holdout(args))
    held = prep.held

    # Network sizes: the pretrained ones, else the flags over the defaults.
    if base is not None:
        mc = base
    else:
        binned: tuple[int, ...] = ()
        if args.bins:
            if not prep.encoder.quantile_columns:
                raise UsageError("--bins needs quantile-scaled columns "
                                 "(--scaling quantile)")
            binned = tuple(prep.encoder.quantile_columns)
        mc = _network_config(args, n_features=prep.n_features, window=prep.window,
                             binned=binned)
    tc = _train_config(args, **FAMILY_TRAIN_DEFAULTS.get(prep.family, {}))

    bar, on_epoch = _progress(tc.epochs, rank, args.quiet, mc.members)
    try:
        result = fit(prep, mc, tc, init_state=init_state, on_epoch=on_epoch)
    finally:
        if bar is not None:
            bar.close()
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank != 0:
        # Wait until rank 0 has written the checkpoint, then leave together: a
        # rank tearing gloo down while the other still works can abort it.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        return EXIT_OK

    # Metrics: validation, and test where the data has a test split (reported only).
    from teacher.checkpoint import Teacher
    from teacher.metrics import split_measure

    teacher = Teacher(model=result.model.eval(), encoder=prep.encoder,
                      threshold=result.threshold["threshold"], config=mc,
                      threshold_info=result.threshold)
    metrics: dict[str, Any] = {"val": result.val_metrics}
    if len(held) >= 2 and prep.details is not None:
        va = prep.rows("val")
        metrics["val_split"] = split_measure(
            prep.y[va], teacher.predict_proba(prep.windows(va)), prep.details[va], held)
    if prep.rows("test").size:
        metrics["test"] = evaluate(teacher, prep, prep.rows("test"), timing=False)
    provenance = make_provenance(
        args.dataset or _data_ref(args.data, args.data_dir), prep.files, args.seed,
        family=prep.family, world_size=world,
        held_out_types=held, init_from=args.init_from, timezone=prep.timezone,
        train_config=result.train_config, best_epoch=result.best_epoch,
        epochs_run=result.epochs_run, train_wall_s=result.wall_s,
        total_wall_s=time.monotonic() - start,
        device=str(tc.device or ("cuda" if torch.cuda.is_available() else "cpu")),
    )
    _replace_out(args.out, args.force)

    def write(folder: Path) -> None:
        save_checkpoint(folder, result.model, encoder=prep.encoder,
                        threshold=result.threshold, history=result.history,
                        metrics=metrics, provenance=provenance)
        if args.replay_size > 0:
            # Each row names the data it came from; updates add theirs.
            windows, labels = make_replay(prep, args.replay_size, seed=args.seed)
            save_replay(folder, windows, labels,
                        np.zeros(len(labels), dtype=np.int32),
                        [str(provenance["dataset"])])

    # Once the checkpoint is in place the run has finished: a Ctrl-C during the
    # closing steps is noted, not turned into exit 130 (Closing).
    with Closing(args.out) as closing:
        out = _write_out(args.out, write, closing)
        # "epochs" per member (the longest run); an ensemble's total is apart.
        summary = {"checkpoint": str(out), "epochs": len(result.history),
                   "members": mc.members, "epochs_all_members": result.epochs_run,
                   "best_epoch": result.best_epoch,
                   "wall_s": round(result.wall_s, 1),
                   "threshold": result.threshold["threshold"],
                   "val_f1": result.val_metrics["f1"]}
        if metrics.get("val_split"):
            summary["val_split_f1"] = metrics["val_split"]["f1"]
        if "test" in metrics:
            summary["test_accuracy"] = metrics["test"]["accuracy"]
            summary["test_f1"] = metrics["test"]["f1"]
        _warn_small_splits(prep)
        print(json.dumps(summary))
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()  # the other ranks wait for this one
            torch.distributed.destroy_process_group()
        code = _finished(prep)
    closing.note()
    return code


# The flags that size the network, as `teacher train` names them.
SIZE_FLAGS = ("--conv-filters", "--lstm-hidden", "--lstm-layers", "--dense",
              "--members", "--bins")


def _network_config(args: argparse.Namespace, *, n_features: int, window: int,
                    binned: tuple[int, ...] = ()) -> Any:
    """The ``TeacherConfig`` of ``teacher train``'s size flags over the defaults.

    A network the flags make too large (more weights than
    :data:`teacher.limits.MAX_PARAMS`) is a usage error (exit 2) naming the flags
    given, not a damaged model."""
    from flows.errors import ModelError
    from teacher.model import TeacherConfig

    kw: dict[str, Any] = {"n_features": n_features, "window": window,
                          "members": TRAIN_MEMBERS if args.members is None
                          else args.members}
    for flag in ("conv_filters", "lstm_hidden", "lstm_layers", "dense", "dropout",
                 "subspace"):
        value = getattr(args, flag)
        if value is not None:
            kw[flag] = tuple(value) if isinstance(value, list) else value
    if args.bins and binned:
        kw.update(bins=args.bins, binned=binned)
    try:
        return TeacherConfig(**kw)
    except ModelError as exc:
        given = [flag for flag in SIZE_FLAGS
                 if getattr(args, flag[2:].replace("-", "_")) is not None]
        problem = str(exc).removeprefix("bad teacher config: ")
        if n_features == 1 and not binned:  # before the data: its least count
            problem = f"at least {problem}"
        sizes = (", ".join(given) if given else "the default sizes")
        raise UsageError(
            f"network too large for {sizes}: {problem}; choose smaller sizes") \
            from exc


# Fewer labelled rows of a class than this in a split make its F1 a guess.
SMALL_SPLIT = 30


def _warn_small_splits(prep: Any) -> None:
    """Warn when validation or test holds so few benign or malicious rows that the
    F1 printed for it says little (28 rows gave F1 1.0 without a word)."""
    for split in ("val", "test"):
        rows = prep.rows(split)
        if rows.size == 0:
            continue
        y = prep.y[rows]
        counts = {"benign": int((y == 0).sum()), "malicious": int((y == 1).sum())}
        small = {k: n for k, n in counts.items() if n < SMALL_SPLIT}
        if small:
            which = ", ".join(f"{n} {k}" for k, n in small.items())
            logger.warning(
                "the %s split holds only %s row(s) (of %d): its metrics are not a "
                "reliable estimate; train on more labelled data", split, which,
                rows.size)


def _recorded_seed(provenance: dict[str, Any] | None) -> int | None:
    """The split seed a checkpoint's provenance records, or None."""
    prov = provenance if isinstance(provenance, dict) else {}
    recorded = prov.get("seed")
    if not isinstance(recorded, int) or isinstance(recorded, bool):
        return None
    return recorded


def _eval_seed(args: argparse.Namespace, provenance: dict[str, Any] | None) -> int:
    """The split seed ``teacher eval`` draws a registered dataset's split with:
    ``--seed`` when given, else the one the checkpoint's provenance records (its
    training split), else 0. A ``--seed`` other than the recorded one is refused
    (exit 2) for the registered dataset the teacher trained on: that split's test
    and validation rows would include rows it trained on."""
    from flows.datasets import REGISTRY

    prov = provenance if isinstance(provenance, dict) else {}
    recorded = _recorded_seed(prov)
    if args.seed is None:
        return 0 if recorded is None else recorded
    source = args.dataset or args.data
    if (recorded is not None and args.seed != recorded and source in REGISTRY
            and source == prov.get("dataset")):
        raise UsageError(
            f"--seed {args.seed}: checkpoint {args.checkpoint} was trained on "
            f"{source} split with seed {recorded} (its provenance.json); a split "
            f"drawn with seed {args.seed} holds rows it trained on, so its numbers "
            f"would not be held out. Leave --seed out (or give --seed {recorded})")
    return args.seed


def cmd_eval(args: argparse.Namespace) -> int:
    """``teacher eval``: metrics and CPU latency of a checkpoint on a split or file."""
    from teacher.checkpoint import load_teacher
    from teacher.evaluate import evaluate

    if args.data and args.split not in (None, "all"):
        raise UsageError(f"--split {args.split} picks rows of a --dataset; a --data "
                         "file is scored whole (leave --split out)")
    if (Path(args.checkpoint) / "manifest.json").is_file():
        raise UsageError(f"--checkpoint {args.checkpoint} is a compress artifact "
                         "(it holds manifest.json), not a teacher checkpoint; score "
                         "it with compress eval --artifact")
    teacher = load_teacher(args.checkpoint, allow_unverified=args.allow_unverified)
    prep = _prepare(args, encoder=teacher.encoder, data_dir=args.data_dir,
                    seed=_eval_seed(args, teacher.provenance), need_split=False)
    asked = args.split or "test"
    split = None if (asked == "all" or args.data) else asked
    rows = prep.rows(split)
    from teacher.data import warn_dataset_trained_on, warn_trained_on

    if args.data:
        warn_trained_on(prep, teacher.provenance)
    else:
        # A registered dataset holding a file the teacher trained on under
        # another name: its split of that file is not the teacher's.
        warn_dataset_trained_on(prep, teacher.provenance, rows)
    if rows.size == 0:
        where = "the file" if args.data else f"split {asked!r}"
        raise BadInputError(
            f"{prep.name}: no labeled rows (label 0 or 1) in {where}; evaluation "
            "needs labels (score unlabeled flows with edge-agent or teacher serve)")
    out = evaluate(teacher, prep, rows, timing=not args.no_timing)
    out.update({"checkpoint": str(args.checkpoint), "data": prep.name,
                "split": "all" if split is None else split})
    if prep.warnings:
        out["warnings"] = prep.warnings
    _print(out, args.json)
    return _finished(prep)


def cmd_baselines(args: argparse.Namespace) -> int:
    """``teacher baselines``: RF, SVM and kNN on the teacher's features and splits."""
    from teacher.baselines import BASELINES, KNN_NEIGHBORS, run_baselines

    names = tuple(n.strip() for n in args.models.split(",") if n.strip())
    unknown = [n for n in names if n not in BASELINES]
    if not names or unknown:
        raise UsageError(
            f"--models {args.models!r}: expected a comma-separated list of "
            f"{', '.join(BASELINES)}" + (f" ({unknown[0]!r} is none)" if unknown
                                        else ""))
    if "knn" in names and args.knn_cap is not None and args.knn_cap < KNN_NEIGHBORS:
        raise UsageError(
            f"--knn-cap {args.knn_cap}: expected at least {KNN_NEIGHBORS}, the "
            "neighbours kNN looks at (a smaller cap leaves it too few rows)")
    if args.out:
        _check_out_file(args.out, force=args.force)
    prep = _prepare(args, data_dir=args.data_dir, window=args.window,
                    seed=args.seed, need_split=True, scaling=args.scaling,
                    knots=args.knots, holdout=_holdout(args))
    held = prep.held
    out = {"data": prep.name, "window": prep.window, "n_features": prep.n_features,
           "scaling": prep.encoder.scaling, "held_out_types": held,
           "baselines": run_baselines(prep, names, svm_cap=args.svm_cap,
                                      knn_cap=args.knn_cap, seed=args.seed,
                                      held=held)}
    # Printed first: the results are on stdout even when --out fails to write.
    _print_baselines(out, args.json)
    if args.out:
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            # Written beside and renamed in: a file that appeared while the models
            # ran is not overwritten, and a failed write keeps the old one.
            write_file(args.out, (json.dumps(out, indent=2) + "\n").encode(),
                       args.force)
        except FileExistsError as exc:
            raise GatewatchError(
                f"--out {args.out}: a file appeared there while the models ran; "
                "not overwritten (--force overwrites it); the results are printed "
                "above") from exc
        except OSError as exc:
            raise GatewatchError(
                f"--out {args.out}: cannot write the results "
                f"({exc.strerror or exc}); they are printed above") from exc
    return _finished(prep)


def _drop_repeats(flag: str, values: list[Any]) -> list[Any]:
    """``values`` with repeats dropped, first-seen order kept, and a note naming
    them: a grid point is worth one trial, and a repeat is most likely a slip."""
    kept = list(dict.fromkeys(values))
    if len(kept) < len(values):
        again = [v for i, v in enumerate(values) if v in values[:i]]
        logger.warning("%s lists %s more than once; each value is tried once",
                       flag, ", ".join(f"{v:g}" for v in dict.fromkeys(again)))
    return kept


def cmd_tune(args: argparse.Namespace) -> int:
    """``teacher tune``: grid over lr, layers, filters, batch size on val only."""
    from teacher.train import TrainConfig
    from teacher.tune import DEFAULT_GRID, rank_rows, tune, write_table

    _check_out_folder(args.out)
    _check_tables(args.out, args.force)
    grid = {k: list(v) for k, v in DEFAULT_GRID.items()}
    for flag, key, _ in GRID_FLAGS:
        given = getattr(args, flag[2:].replace("-", "_"))
        if given:
            grid[key] = _drop_repeats(flag, given)
    windows = grid.pop("window", [1])
    preps = {}
    for w in windows:
        prep = _prepare(args, data_dir=args.data_dir, window=w,
                        seed=args.seed, need_split=True, scaling=args.scaling,
                        knots=args.knots, holdout=_holdout(args))
        preps[w] = prep
    grid["window"] = windows
    family = next(iter(preps.values())).family
    base = TrainConfig(epochs=args.trial_epochs, patience=3,
                       samples_per_epoch=args.trial_samples, seed=args.seed,
                       **FAMILY_TRAIN_DEFAULTS.get(family, {}))

    finished: list[dict[str, Any]] = []

    def on_trial(row: dict[str, Any]) -> None:
        finished.append(dict(row))
        print(json.dumps(row), file=sys.stderr, flush=True)

    try:
        rows = tune(preps, args.budget, grid, base_train=base, on_trial=on_trial)
    except KeyboardInterrupt as exc:
        # The trials that finished are not thrown away: their table is written.
        from flows.stops import Terminated

        if finished:
            how = "stopped by SIGTERM" if isinstance(exc, Terminated) else "interrupted"
            with contextlib.suppress(OSError):
                out = write_table(rank_rows(finished), args.out)
                logger.warning("%s after %d trial(s); their table is in %s",
                               how, len(finished), out / "tune.md")
        raise
    try:
        out = write_table(rows, args.out)
    except OSError as exc:
        # The grid's minutes are not thrown away: every row goes to stdout.
        print(json.dumps({"table": None, "trials": len(rows),
                          "best": rows[0] if rows else None, "rows": rows}))
        raise GatewatchError(
            f"--out {args.out}: cannot write the tuning table "
            f"({exc.strerror or exc}); its rows are printed above") from exc
    print(json.dumps({"table": str(out / "tune.md"), "trials": len(rows),
                      "best": rows[0] if rows else None}))
    return _finished(*preps.values())


def cmd_update(args: argparse.Namespace) -> int:
    """``teacher update``: fine-tune on new data with replay; F1 before and after."""
    import numpy as np

    from teacher.checkpoint import load_teacher, make_provenance, save_checkpoint
    from teacher.data import prepare
    from teacher.update import (
        ReplayBuffer,
        grow_replay,
        learned_sources,
        make_replay,
        read_replay,
        save_replay,
        update,
    )

    _check_device(args.device)
    if _same_folder(args.out, args.checkpoint):
        raise UsageError(
            f"--out {args.out} is the checkpoint being updated; write the update to "
            "another folder (the old one is what it is compared with, and what "
            "compress and the re-scorer use until you switch)")
    _check_not_ancestor(args.out, args.checkpoint)
    _check_out(args.out, args.force)
    _check_old_data(args.old_data)
    teacher = load_teacher(args.checkpoint, allow_unverified=args.allow_unverified)
    new = _prepare(args, encoder=teacher.encoder, data_dir=args.data_dir,
                   seed=args.seed, need_split=True)
    old_source = args.old_data or teacher.provenance.get("dataset")
    # The checkpoint's own data is read in the zone it was trained with, and split
    # with the seed it was trained with: another split's test and validation rows
    # would hold rows it trained on, and "old F1" would not be held out.
    old_zone = args.timezone if args.old_data else (
        teacher.provenance.get("timezone") or "UTC")
    recorded = _recorded_seed(teacher.provenance)
    old_seed = (recorded if recorded is not None
                and old_source == teacher.provenance.get("dataset") else args.seed)
    old, old_missing = None, None
    if args.old_data:
        # Asked for by name: refused like --data when it cannot be read or is of
        # another feature family (the reader's error, exit 3), before training.
        old = prepare(args.old_data, encoder=teacher.encoder,
                      data_dir=args.data_dir, seed=old_seed, need_split=True,
                      timezone=old_zone)
    elif old_source:
        from teacher.data import recorded_data_missing

        try:
            moved = recorded_data_missing(old_source, args.data_dir,
                                          args.checkpoint, "--old-data FILE")
            if moved is not None:
                raise moved
            old = prepare(old_source, encoder=teacher.encoder, data_dir=args.data_dir,
                          seed=old_seed, need_split=True, timezone=old_zone)
        except GatewatchError as exc:
            old_missing = str(exc)
            logger.warning("old data %s not available (%s); no forgetting check",
                           old_source, exc)
    full_chain = learned_sources(teacher.provenance)
    new_ref = _data_ref(args.data, args.data_dir)
    # Data the chain learned before and learns again is listed once, as the new
    # data (its earlier places noted): its rows are the new data's now.
    again = [_chain_role(place) for place, entry in enumerate(full_chain)
             if entry.get("data") == new_ref]
    chain = [entry for entry in full_chain if entry.get("data") != new_ref]
    # The old data as provenance names data (a dataset name, $GATEWATCH_DATA/...
    # or a resolved path), to be matched with the datasets the checkpoint learned.
    old_ref = _data_ref(old_source, args.data_dir) if old_source else None
    earlier = _earlier_sources(args, teacher, full_chain, old_ref, old, old_missing)
    earlier = [item for item in earlier if item["data"] != new_ref]

    # The buffer trained on: the checkpoint's, else a sample of the old data. One
    # without sources holds the first dataset's rows (before this round an update
    # copied its checkpoint's buffer as it was). A dataset the chain learned that
    # the buffer lacks (an update with --replay-size 0 wrote none) gets its share
    # back from its file when it can still be read; else it is named in a warning.
    first = full_chain[0].get("data") if full_chain else None
    buffer = read_replay(args.checkpoint, name=str(first or args.checkpoint))
    buffer, rebuilt, dropped = _rebuild_replay(buffer, earlier, new_ref, args.seed)
    if buffer is None and old is not None:
        windows, labels = make_replay(old, seed=args.seed)
        buffer = ReplayBuffer(windows, labels,
                              np.zeros(len(labels), dtype=np.int32), [str(old_ref)])
    replay = None if buffer is None else buffer.pair()
    tc = _train_config(args, lr=3e-4)
    result, report = update(teacher, new, old, replay, tc, earlier=earlier,
                            new_name=new_ref, learned_before=again)

    # The updated checkpoint's buffer holds every dataset learned so far, and its
    # provenance lists them, for the next update's forgetting check.
    grown = grow_replay(buffer, new, new_ref, args.replay_size, seed=args.seed)
    report["replay_out"] = (None if grown is None else
                            {"size": int(len(grown.labels)), "sources": grown.counts()})
    report["replay_rebuilt"] = rebuilt
    if dropped:
        report["replay_dropped"] = dropped
    learned = [*chain]
    learned.append({"data": new_ref, "files": dict(new.files), "seed": args.seed,
                    "timezone": new.timezone})
    provenance = make_provenance(new_ref, new.files, args.seed,
                                 updated_from=str(args.checkpoint), update=report,
                                 timezone=new.timezone, learned=learned)
    metrics = {"val": result.val_metrics, "update": report}
    _replace_out(args.out, args.force)

    def write(folder: Path) -> None:
        save_checkpoint(folder, result.model, encoder=teacher.encoder,
                        threshold=result.threshold, history=result.history,
                        metrics=metrics, provenance=provenance)
        if grown is not None:
            save_replay(folder, grown.windows, grown.labels, grown.sources,
                        grown.names)

    with Closing(args.out) as closing:
        out = _write_out(args.out, write, closing)
        report["checkpoint"] = str(out)
        shown = report if args.json else {
            **report, "sources": [_source_line(e) for e in report["sources"]]}
        _print(shown, args.json)
        code = _finished(new, old)
    closing.note()
    return code


def _earlier_sources(
    args: argparse.Namespace,
    teacher: Any,
    chain: list[dict[str, Any]],
    old_ref: str | None,
    old: Any,
    old_missing: str | None,
) -> list[dict[str, Any]]:
    """The datasets ``teacher update`` scores besides the new data: each one the
    checkpoint learned (``chain``, oldest first), then ``--old-data`` when it is
    none of them (``old_ref``: the old data, named as provenance names data, read
    as ``old``, or why not, ``old_missing``). Each is ``{"data", "role"}`` with
    ``"prep"`` (read again with the seed and zone it was learned with) or
    ``"missing"`` (why it cannot be scored: not readable, or changed since it was
    learned)."""
    from teacher.data import check_teacher_files, move_to_val, prepare

    listed: list[dict[str, Any]] = []
    for place, entry in enumerate(chain):
        data = entry.get("data")
        role = _chain_role(place)
        if data is None:
            where = entry.get("checkpoint")
            listed.append({"data": f"(data learned by {where})", "role": "earlier",
                           "missing": f"{where}/provenance.json cannot be read, so "
                                      "the data it learned is not known"})
            continue
        item: dict[str, Any] = {"data": data, "role": role}
        if data == old_ref and old is not None:
            listed.append({**item, "prep": old})
            continue
        if data == old_ref and old_missing:
            listed.append({**item, "missing": old_missing})
            continue
        seed = _recorded_seed(entry)
        try:
            prep = prepare(data, encoder=teacher.encoder, data_dir=args.data_dir,
                           seed=args.seed if seed is None else seed,
                           need_split=True, timezone=entry.get("timezone") or "UTC")
            check_teacher_files(prep.files, entry, None)
            # Types teacher train held out were validation rows, never trained
            # on: a buffer drawn again from the training rows leaves them out.
            move_to_val(prep, entry.get("held_out_types") or [])
        except GatewatchError as exc:
            logger.warning("%s (learned by the checkpoint) not scored: %s", data, exc)
            item["missing"] = str(exc)
        else:
            item["prep"] = prep
        listed.append(item)
    if args.old_data and old is not None and all(
            item["data"] != old_ref for item in listed):
        listed.append({"data": old_ref, "role": "--old-data", "prep": old})
    return listed


def _chain_role(place: int) -> str:
    """How ``teacher update``'s sources name the dataset learned ``place``-th
    (0: the one the first checkpoint was trained on)."""
    return "trained" if place == 0 else f"update {place}"


def _rebuild_replay(
    buffer: Any, earlier: list[dict[str, Any]], new_ref: str, seed: int,
) -> tuple[Any, list[str], list[dict[str, str]]]:
    """The checkpoint's replay buffer with a share for each dataset the chain
    learned that it lacks (``earlier``'s entries other than ``new_ref``; with no
    buffer at all, --old-data too, whose sample an update trained on before),
    drawn again from that dataset's training rows (read with the seed it was
    learned with: :func:`_earlier_sources`), as teacher train draws a buffer.
    Returns the buffer (None when there is none and nothing to rebuild), the
    datasets rebuilt, and those left out because they cannot be read, each
    ``{"data", "why"}`` and named in a warning (an earlier checkpoint whose data
    is not known is not: its rows may be in the buffer under another name)."""
    import numpy as np

    from teacher.update import REPLAY_DEFAULT, ReplayBuffer, make_replay

    have = set(buffer.names) if buffer is not None else set()
    rebuilt: list[str] = []
    dropped: list[dict[str, str]] = []
    parts: list[tuple[str, Any, Any]] = []
    for item in earlier:
        data = str(item["data"])
        if data in have or data == new_ref or item["role"] == "earlier":
            continue
        if item["role"] == "--old-data" and buffer is not None:
            continue
        if item.get("prep") is None:
            why = item.get("missing") or "not available"
            logger.warning("%s (learned by the checkpoint) is not in its replay "
                           "buffer and cannot be read again (%s): the new buffer "
                           "holds none of its rows", data, why)
            dropped.append({"data": data, "why": why})
            continue
        windows, labels = make_replay(item["prep"], REPLAY_DEFAULT, seed=seed)
        parts.append((data, windows, labels))
        rebuilt.append(data)
    if not parts:
        return buffer, rebuilt, dropped
    if rebuilt:
        logger.info("replay buffer: rebuilt the share of %s from their files",
                    ", ".join(rebuilt))
    names = list(buffer.names) if buffer is not None else []
    windows = [buffer.windows] if buffer is not None else []
    labels = [buffer.labels] if buffer is not None else []
    sources = [buffer.sources] if buffer is not None else []
    for data, w, y in parts:
        windows.append(np.asarray(w, dtype=np.float32))
        labels.append(np.asarray(y, dtype=np.int8))
        sources.append(np.full(len(y), len(names), dtype=np.int32))
        names.append(data)
    return (ReplayBuffer(np.concatenate(windows), np.concatenate(labels),
                         np.concatenate(sources), names), rebuilt, dropped)


def _source_line(entry: dict[str, Any]) -> str:
    """One dataset of ``teacher update``'s sources as a line of the text output."""
    head = f"{entry['role']}: {entry['data']}"
    if entry.get("learned_before"):
        head += f" (learned before as {', '.join(entry['learned_before'])})"
    if "missing" in entry:
        return f"{head}: missing ({entry['missing']})"
    numbers = []
    for key, label in (("test_f1", "F1"), ("test_fpr", "FPR")):
        was = entry.get("before", {}).get(key)
        now = entry.get("after", {}).get(key)
        numbers.append(f"{label} {_as_text(was)} -> {_as_text(now)}")
    rows = entry.get("test_rows") or {}
    return (f"{head}: {', '.join(numbers)} ({rows.get('benign', 0)} benign, "
            f"{rows.get('malicious', 0)} malicious test rows)")


def _print(data: dict[str, Any], as_json: bool) -> None:
    """Print a command's result: one JSON object, or ``key: value`` lines for a
    reader (floats to 4 places, a dict as ``name value`` pairs on its line, a list
    of texts as indented lines below its key)."""
    if as_json:
        print(json.dumps(data, indent=2, default=str))
        return
    for key, value in data.items():
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            print(f"{key}:")
            for item in value:
                print(f"  {item}")
            continue
        print(f"{key}: {_as_text(value)}")


def _as_text(value: Any) -> str:
    """One value of the text output: floats to 4 places, dicts flattened."""
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_as_text(v)}" for k, v in value.items()) or "none"
    if isinstance(value, list):
        return ", ".join(_as_text(v) for v in value) or "none"
    return "-" if value is None else str(value)


# The columns of `teacher baselines`' text table: heading, result key, format.
BASELINE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("train rows", "train_rows", ",d"),
    ("accuracy", "accuracy", ".4f"),
    ("precision", "precision", ".4f"),
    ("recall", "recall", ".4f"),
    ("F1", "f1", ".4f"),
    ("ROC AUC", "roc_auc", ".4f"),
    ("FPR", "fpr", ".4f"),
    ("p50 µs", "latency_us_p50", ",.0f"),
    ("p99 µs", "latency_us_p99", ",.0f"),
)


def _print_baselines(data: dict[str, Any], as_json: bool) -> None:
    """Print ``teacher baselines``' results: one JSON object, or the settings as
    ``key: value`` lines followed by a table of the models' test metrics and
    batch-1 latency (a value a model did not report shows as ``-``)."""
    if as_json:
        _print(data, True)
        return
    settings = {k: v for k, v in data.items() if k != "baselines"}
    held = settings.get("held_out_types")
    if isinstance(held, list):
        settings["held_out_types"] = ", ".join(map(str, held)) or "none"
    _print(settings, False)
    print("test split:")
    print(_baselines_table(data.get("baselines") or {}))


def _baselines_table(results: dict[str, dict[str, Any]]) -> str:
    """The baselines' results as aligned text: a heading line, then one line per
    model, numbers right-aligned."""

    def cell(metrics: dict[str, Any], key: str, fmt: str) -> str:
        value = metrics.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "-"
        try:
            return format(int(value) if fmt.endswith("d") else value, fmt)
        except (ValueError, OverflowError):  # a NaN or infinite row count
            return str(value)

    lines = [["model", *(head for head, _, _ in BASELINE_COLUMNS)]]
    for name, metrics in results.items():
        metrics = metrics if isinstance(metrics, dict) else {}
        lines.append([str(name), *(cell(metrics, key, fmt)
                                   for _, key, fmt in BASELINE_COLUMNS)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join([line[0].ljust(widths[0]),
                   *(text.rjust(width) for text, width in zip(line[1:], widths[1:],
                                                              strict=True))])
        for line in lines)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "baselines": cmd_baselines,
            "tune": cmd_tune, "update": cmd_update}


# Top-level modules only the full install has (the train and compress extras),
# none of which a gateway install (the edge extra) brings.
FULL_INSTALL_MODULES = frozenset({
    "torch", "torchao", "sklearn", "safetensors", "tensorflow", "onnx",
    "onnxscript", "neural_compressor", "torch_pruning", "tqdm", "scipy",
})


def missing_full_install(exc: ModuleNotFoundError, command: str, extra: str) -> int:
    """Say in one line that ``command`` needs the full install (exit 1), for a
    module of :data:`FULL_INSTALL_MODULES` that is not installed; any other
    missing module is raised again (a broken install, not a gateway one)."""
    name = (exc.name or "").split(".")[0]
    if name not in FULL_INSTALL_MODULES:
        raise exc
    print(f"error: {command} needs the full install, and {name} is not installed "
          "here (a gateway install, gatewatch[edge], has no torch); install it with "
          f"pip install 'gatewatch[{extra}]'", file=sys.stderr)
    return EXIT_FAILURE


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``teacher``; returns the exit code.

    A Ctrl-C anywhere (building the parser, loading torch, the work) ends in one
    line, ``error: interrupted``, and exit 130; one while this module's own
    imports load is handled where they are."""
    try:
        return _main(argv)
    except ModuleNotFoundError as exc:
        # A gateway install (gatewatch[edge]) has the command but no torch.
        return missing_full_install(exc, "teacher", "train")
    except KeyboardInterrupt as exc:
        # A Ctrl-C or SIGTERM; its message says what it left behind (see Closing).
        line, code = stop_line(exc)
        print(f"error: {line}", file=sys.stderr)
        return code


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse prints its own usage message
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if hasattr(args, "func"):  # subcommands registered by teacher.serve
            return int(args.func(args) or 0)
        # From before torch loads (held there), to the end; as the command line
        # itself (no argv given), further stops after one are only noted.
        with sigterm_stops(exiting=argv is None):
            _setup(args)
            return COMMANDS[args.command](args)
    except GatewatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
