"""``compress``: turn a teacher into a verified edge artifact, and evaluate artifacts.

``compress run --target T --teacher DIR --out DIR`` distills, prunes, quantizes,
exports and verifies students, gates them against the teacher and writes the
artifact the search keeps (exit 5 when none passes). ``compress eval --artifact DIR``
scores an artifact in its own runtime and prints the same keys as ``teacher eval``.
"""

from __future__ import annotations

import sys

from flows.stops import sigterm_stops, stop_line
from teacher.interrupts import held, loading

# A Ctrl-C while the modules load is held until they are loaded, then ends the
# command in one line, exit 130 (teacher.interrupts).
with loading():
    import argparse
    import contextlib
    import json
    import logging
    import os
    import time
    from pathlib import Path
    from typing import Any

    from compress import QAT_KINDS, logger
    from flows.argtypes import (
        check_can_create,
        check_writable_above,
        integer,
        integers,
        named,
        real,
        reals,
        zone_name,
    )
    from flows.errors import (
        EXIT_BAD_INPUT,
        EXIT_FAILURE,
        EXIT_GATE,
        EXIT_INTERRUPTED,
        EXIT_OK,
        EXIT_PARTIAL_INPUT,
        EXIT_USAGE,
        BadInputError,
        GatewatchError,
        ModelError,
        UsageError,
    )
    from student import MAX_WIDTH

DESCRIPTION = (
    "compress: turn a teacher into a verified edge artifact, and evaluate artifacts."
)
EPILOG = f"""\
exit codes:
  {EXIT_OK}    ok
  {EXIT_FAILURE}    failure: a model, checkpoint or artifact is unusable, or an
       export failed; or this is a gateway install (gatewatch[edge], no
       torch): pip install 'gatewatch[compress]' for compress
  {EXIT_USAGE}    usage: bad flags or arguments; a --dataset name that is not
       registered
  {EXIT_BAD_INPUT}    bad input: a dataset file is missing or cannot be read (a
       --data file that does not exist: error: --data FILE: no such file);
       data with too few labeled rows (label 0 or 1) to train or evaluate
       on (an unlabeled conn.log, say)
  {EXIT_PARTIAL_INPUT}    partial input: a --dataset/--data file was damaged part way.
       A file cut short (a cut gzip stream or last line) is used up to
       the cut and the results are written; a bad row (a value that does
       not fit its field) stops the run before anything is trained or
       written, and the error names the file, line and column
  {EXIT_GATE}    gate: no compressed artifact met the quality gate
  {EXIT_INTERRUPTED}  interrupted
  143  stopped by SIGTERM
"""

RUN_DESCRIPTION = """\
Distill students from the teacher, prune, quantize and export them for --target,
load each back in its runtime and gate it against the teacher: validation F1 at
most --max-f1-drop below the teacher's (with --gate split, also the unseen-type
gap). Per student kind, the widths are tried in order and the first width that
passes is kept, with its pruned versions; of those kept, the smallest artifact is
written to --out. Every candidate tried is a row of the printed frontier, whose
'unseen' column is the split measure's gap: teacher minus artifact F1 on held-out
attack types the threshold never saw (positive: the artifact is worse; '-': the
teacher held out no types). --json
prints the summary (artifacts, failed, frontier, teacher_metrics) on stdout, also
when no candidate passes (exit 5, with the error line on stderr)."""
RUN_EPILOG = f"""\
exit codes:
  {EXIT_OK}    ok: an artifact was written (with --target all, for at least one
       target; the others are listed as not made)
  {EXIT_FAILURE}    failure: the teacher checkpoint or a model is unusable, or no
       artifact was made because every export failed (a converter or
       runtime refused each candidate, or torch-int8's program could not
       be saved); or a file under --out could not be written (a full
       disk): one line naming --out and the reason, at the first such
       failure; the artifact --out held is kept whole
  {EXIT_USAGE}    usage: bad flags or arguments; a --teacher that is a compress
       artifact, not a checkpoint; an --out that is a file, lies
       under a file or in a folder where nothing can be made (checked
       before any work, by making and removing a probe there), lies in
       the teacher's checkpoint or holds another target's artifact or
       other files; --gate split with a teacher that held out no types;
       --target torch-int8 with --student, --widths, a distillation,
       pruning or QAT flag (--epochs, --lr, --batch-size,
       --max-train-rows, --restarts, --prune-ratios, --no-prune, --distill-noise,
       --distill-swap, --distill-swap-rows, --distill-alpha, --qat, --qat-epochs),
       --threshold-rule teacher-rate or --gate split (the teacher itself
       is quantized: no student is made, its threshold is the best
       validation F1 one and its gate validation F1); --qat always with
       a float target (onnx-fp32, tflite-fp32) or with --student lstm
       (QAT exists for mlp and cnn students only)
  {EXIT_BAD_INPUT}    bad input: a dataset file is missing or cannot be read; a
       --data file that does not exist; without --dataset/--data, the
       teacher's recorded data file when it is no longer there (the error
       names it and says to pass it with --data FILE, or where the data
       folder should point); all checked before any work; data with too
       few labeled rows (label 0 or 1) to train or evaluate on (an
       unlabeled conn.log, say)
  {EXIT_PARTIAL_INPUT}    partial input: a --dataset/--data file was damaged part way.
       A file cut short is used up to the cut and the artifact written; a
       bad row stops the run before anything is trained or written
  {EXIT_GATE}    gate: no candidate passed the gate; the error line says which
       rule they missed (validation F1, or the unseen-type gap). An --out
       folder the run made is removed again; one that existed is kept
  {EXIT_INTERRUPTED}  interrupted: the artifact --out held is kept whole. Once the new
       artifact is being put in place, a Ctrl-C is noted instead: the run
       finishes (its exit code, and a note saying the artifact is
       complete)
  143  stopped by SIGTERM: as a Ctrl-C, with one line saying so
"""
EVAL_DESCRIPTION = """\
Score an artifact in its own runtime (ONNX Runtime or TFLite; with --micro, a
tflite-micro C array in the TFLite Micro interpreter; torch for a torch-int8
teacher, on the CPU, as teacher serve runs it) on a labeled split of
--dataset or on every labeled row of --data, at the artifact's own decision
threshold (the split drawn with the seed the artifact records, its teacher's, so
the test rows are held out), and print the same metrics as teacher eval (--json:
every key). The artifact's files are checked against the sha256 in its manifest,
and its probe windows scored, before any flow is. Only a torch-int8 artifact
needs torch: the others are read, encoded (numpy) and scored in their runtime
without importing torch, scikit-learn or scipy (a gateway install, on a --dataset
or a --data file)."""
EVAL_EPILOG = f"""\
exit codes:
  {EXIT_OK}    ok
  {EXIT_FAILURE}    failure: the artifact is unusable: its folder or a file
       missing, a file modified after it was written (sha256), a model
       its runtime refuses, probe windows that do not score as recorded;
       a torch-int8 artifact where torch is not installed
  {EXIT_USAGE}    usage: bad flags or arguments; a --dataset that is neither a
       registered dataset nor an existing file; an --artifact
       that is a teacher checkpoint (score it with teacher eval)
  {EXIT_BAD_INPUT}    bad input: a dataset file is missing or cannot be read (a
       --data file that does not exist: error: --data FILE: no such file,
       before the artifact is read), the data is of another family than
       the artifact's encoder, the split has no labeled rows, the
       manifest is not valid JSON or not a JSON object, or a field of it
       has the wrong type (a model_version that is no string, an
       input/output scale or zero_point that is no number), or the
       artifact holds a thresholds.json whose values break the contract
       (not JSON, a key missing, a value that is no number in 0..1,
       escalate_low <= decision <= alert not holding)
  {EXIT_PARTIAL_INPUT}    partial input: a --data file was damaged part way. A file
       cut short is scored up to the cut and its metrics printed; a bad
       row stops with an error naming the file, line and column
  {EXIT_INTERRUPTED}  interrupted
  143  stopped by SIGTERM
"""

TARGET_CHOICES = (
    "onnx-fp32", "onnx-int8", "tflite-fp32", "tflite-int8", "tflite-micro",
    "torch-int8", "all",
)

# The run flags that shape students (distillation, pruning, quantization-aware
# fine-tuning), with their defaults. The parser leaves them None when not given,
# so that one given with --target torch-int8, which makes no student, is refused
# (:func:`_check_torch_int8_flags`); :func:`_student_settings` fills in the rest.
STUDENT_DEFAULTS: dict[str, Any] = {
    "epochs": 12, "lr": 3e-3, "batch_size": 512, "max_train_rows": None,
    "prune_ratios": None, "restarts": None, "no_prune": False, "distill_noise": None,
    "distill_swap": None, "distill_swap_rows": None, "distill_alpha": None,
    "qat": "auto", "qat_epochs": 3,
}


def _add_timezone(p: argparse.ArgumentParser, which: str, tail: str,
                  default: str | None = None) -> None:
    """``--timezone``: as in ``flows inspect``/``convert``, for the file read.
    ``tail`` closes its help, saying what is used without it."""
    p.add_argument("--timezone", metavar="ZONE", type=zone_name, default=default,
                   help="the time zone an Argus binetflow file's StartTime is "
                        f"written in ({which}), as an IANA name such as "
                        "Europe/Prague: Argus writes the local time of the machine "
                        "it ran on, without a zone, and this turns it into epoch "
                        "seconds (ts); other formats carry epoch times and ignore "
                        "it, as do the registered datasets, whose files all carry "
                        f"epoch times{tail}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``compress``."""
    parser = argparse.ArgumentParser(
        prog="compress",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress lines on stderr (also after the command)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log gatewatch's info messages too (also after the "
                             "command)")
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="distill, prune, quantize, export, verify, gate",
                         description=RUN_DESCRIPTION, epilog=RUN_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--target", required=True, choices=TARGET_CHOICES,
                     help="runtime and file format of the artifact; torch-int8: "
                          "the teacher itself int8-quantized for the re-scorer (no "
                          "student: --student and --widths are refused with it, "
                          "exit 2, as are the distillation, pruning and QAT flags, "
                          "--threshold-rule teacher-rate and --gate split); all: "
                          "every target, each in OUT/<target>")
    run.add_argument("--teacher", required=True,
                     type=named("a teacher checkpoint folder"),
                     help="checkpoint folder")
    run.add_argument("--out", required=True, type=named("an artifact folder"),
                     help="artifact folder: new, empty, or holding an artifact of "
                          "the same --target (replaced); another target's artifact "
                          "or other files there are refused (exit 2)")
    run.add_argument("--student", choices=("cnn", "mlp", "lstm"),
                     help="only this student kind (default: search mlp and cnn; "
                          "mlp only for windows shorter than 3 flows, as NSL-KDD's "
                          "and UNSW-NB15's single-flow windows); not with --target "
                          "torch-int8 (exit 2)")
    run.add_argument("--max-f1-drop", type=real(0, 1), default=0.01,
                     help="allowed validation F1 drop from the teacher (default 0.01)")
    run.add_argument("--data-dir", type=named("a data folder"),
                     help="data folder ($GATEWATCH_DATA)")
    source = run.add_mutually_exclusive_group()
    source.add_argument(
        "--dataset", type=named("a dataset or a file", as_path=False),
        help="dataset name or file (default: the teacher's)",
    )
    source.add_argument(
        "--data", type=named("a flow file"),
        help="a flow file flows can read (as in compress eval "
        "and teacher; the same as --dataset FILE)",
    )
    _add_timezone(run, "a --dataset/--data file", " (default: UTC; without "
                  "--dataset/--data, the zone the teacher's provenance records "
                  "for its data, UTC if none); recorded in the artifact's "
                  "provenance")
    run.add_argument("--widths", type=integers(1, MAX_WIDTH),
                     help="student widths to search, tried in the order given "
                          "(a repeat once); the first width that passes is kept, "
                          "with its pruned "
                          "versions (default for nsl-kdd teachers 64,96,4,8,16,32, "
                          "else 4,8,16,32,64); not with "
                          "--target torch-int8 (exit 2)")
    run.add_argument("--restarts", type=integer(0, 10), default=None,
                     help="more initialisations of a width tried when it misses the "
                          "gate, before the next width (default 2 for nsl-kdd "
                          "teachers, else 0)")
    run.add_argument("--prune-ratios", type=reals(0, 1, lo_open=True, hi_open=True),
                     help="structured pruning ratios tried on a passing student, "
                          "each once (default: none for nsl-kdd teachers, else "
                          "0.5)")
    run.add_argument("--no-prune", action="store_true", default=None,
                     help="skip pruning")
    run.add_argument("--epochs", type=integer(1, 100_000),
                     help="distillation epochs per student (default 12; early "
                          "stopping on validation loss)")
    run.add_argument("--lr", type=real(0, 10, lo_open=True),
                     help="distillation learning rate (default 3e-3; pruning "
                          "fine-tunes at lr/3, QAT at lr/10)")
    run.add_argument("--distill-noise", type=real(0, 1), default=None,
                     help="Gaussian input noise on the students' training windows, "
                          "re-scored by the teacher (default 0.05 for conn-log "
                          "teachers, else 0: none)")
    run.add_argument("--distill-swap", type=real(0, 1), default=None,
                     help="share of each student training window's columns taken "
                          "from another window, re-scored by the teacher (default "
                          "0.3 for nsl-kdd teachers, else 0: none)")
    run.add_argument("--distill-swap-rows", type=real(0, 1, lo_open=True),
                     default=None,
                     help="share of each batch's windows that get swapped columns, "
                          "the rest left as they are (default 0.5 for nsl-kdd "
                          "teachers, else 1: every window)")
    run.add_argument("--distill-alpha", type=real(0, 1), default=None,
                     help="weight of the teacher's soft targets against the hard "
                          "labels (default 1.0 with noise or swapping, else 0.5)")
    run.add_argument("--gate", choices=("same", "split"), default="same",
                     help="what the gate compares with the teacher: same = "
                          "validation F1 (default); split = also F1 on held-out "
                          "attack types the threshold was not chosen on (needs a "
                          "teacher that held out types: nsl-kdd). Both are "
                          "measured and written to the manifest; the frontier's "
                          "'unseen' column is the split gap, teacher minus "
                          "artifact (positive: the artifact is worse)")
    run.add_argument("--threshold-rule", choices=("f1", "teacher-rate"), default=None,
                     help="how each artifact's decision threshold is chosen on "
                          "validation: f1 = its own best F1 on the labels; "
                          "teacher-rate = the cut flagging as many validation "
                          "windows as the teacher does (default teacher-rate for "
                          "nsl-kdd teachers, f1 for others)")
    run.add_argument("--batch-size", type=integer(2, 1_000_000),
                     help="students' training batch size (default 512)")
    run.add_argument("--max-train-rows", type=integer(1),
                     help="training windows drawn per epoch (default: all)")
    run.add_argument("--calibration-windows", type=integer(1, 1_000_000), default=512,
                     help="training windows used for int8 calibration (default 512)")
    run.add_argument("--qat", choices=("auto", "off", "always"),
                     help="quantization-aware fine-tuning of MLP/CNN students for "
                          "int8 targets: auto (default) when every post-training "
                          "quantization of a student misses the gate but the float "
                          "student passes it. QAT recovers what quantization lost, "
                          "so with --gate split a float student whose own "
                          "unseen-type gap is over --max-f1-drop is not fine-tuned "
                          "(a generalization gap, not a quantization loss); "
                          "always: also after a passing one, whatever the float "
                          "student's gap (kept if its validation F1 is higher; "
                          "refused, exit 2, with a float target or --student "
                          "lstm, which has no QAT); off: never")
    run.add_argument("--qat-epochs", type=integer(1, 1000),
                     help="epochs of quantization-aware fine-tuning (default 3)")
    run.add_argument("--no-timing", action="store_true", help="skip latency timing")
    run.add_argument("--threads", type=integer(1, 1024), default=1,
                     help="torch threads (default 1)")
    run.add_argument("--seed", type=integer(0), default=0,
                     help="seed of students, sampling and calibration (default 0)")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    run.add_argument("-q", "--quiet", action="store_true",
                     default=argparse.SUPPRESS,
                     help="no progress lines on stderr")
    run.add_argument("-v", "--verbose", action="store_true",
                     default=argparse.SUPPRESS,
                     help="log gatewatch's info messages too")

    ev = sub.add_parser("eval", help="score an artifact in its runtime",
                        description=EVAL_DESCRIPTION, epilog=EVAL_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("--artifact", required=True, type=named("an artifact folder"),
                    help="artifact folder (with manifest.json)")
    src = ev.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="registered dataset name (a warning names "
                     "a file of it the artifact's teacher trained on under another "
                     "name, and counts its rows scored)")
    src.add_argument("--data", type=named("a flow file"),
                     help="a flow file flows can read")
    ev.add_argument("--split", default=None, choices=("train", "val", "test", "all"),
                    help="split of --dataset to score (default test); a --data file "
                         "is scored whole, so only 'all' goes with --data")
    ev.add_argument("--data-dir", type=Path, help="data folder ($GATEWATCH_DATA)")
    _add_timezone(ev, "the --data file", " (default: UTC)", default="UTC")
    ev.add_argument("--micro", action="store_true",
                    help="run a tflite-micro C array in the TFLite Micro interpreter")
    ev.add_argument("--no-timing", action="store_true", help="skip latency timing")
    ev.add_argument("--threads", type=integer(1, 1024), default=1, metavar="N",
                    help="CPU threads of the runtime (torch, onnxruntime or the "
                         "TFLite interpreter) for scoring; latency and throughput "
                         "are measured on N threads (default 1, as teacher eval; "
                         "TFLite Micro always runs on one)")
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")
    ev.add_argument("-q", "--quiet", action="store_true",
                    default=argparse.SUPPRESS,
                    help="accepted as in run (eval prints no progress lines)")
    ev.add_argument("-v", "--verbose", action="store_true",
                    default=argparse.SUPPRESS,
                    help="log gatewatch's info messages too")
    return parser


# Libraries whose warnings are noise on this command line: TF/absl start-up talk,
# torchao's optional CUDA kernels that a CPU install cannot load, torch's pytree
# notices and the quantizers' calibration chatter.
NOISY_LOGGERS = ("tensorflow", "absl", "onnxruntime", "torchao",
                 "torch.utils._pytree", "neural_compressor")


class _StderrHandler(logging.StreamHandler):
    """A log handler on whatever ``sys.stderr`` is when a record comes."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup(args: argparse.Namespace) -> None:
    """Logging: the ``gatewatch`` logger on stderr; the noisy libraries quietened.

    The root logger is left alone (its level and handlers stay what the caller set;
    gatewatch records still propagate to it, so a host that captures logs sees them).
    """
    level = logging.INFO if getattr(args, "verbose", False) else logging.WARNING
    gw = logging.getLogger("gatewatch")
    gw.setLevel(level)
    if not any(getattr(h, "_gatewatch_cli", False) for h in gw.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._gatewatch_cli = True  # type: ignore[attr-defined]
        gw.addHandler(handler)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _progress(quiet: bool):
    """A progress printer: one line per pipeline step with the elapsed time.

    On a terminal the current step also stays on a tqdm status line.
    """
    if quiet:
        return lambda msg: None
    start = time.monotonic()
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=None, bar_format="{desc}", file=sys.stderr, leave=False)

    def say(msg: str) -> None:
        line = f"[{time.monotonic() - start:6.1f}s] {msg}"
        if bar is None:
            print(line, file=sys.stderr, flush=True)
        else:
            bar.write(line, file=sys.stderr)
            bar.set_description_str(msg)

    return say


def _check_out(out: Path, teacher: Path | None = None) -> None:
    """Refuse up front an ``--out`` that exists and is not a folder, that is the
    teacher's checkpoint folder or lies inside it, or where nothing can be made
    (:func:`flows.argtypes.check_can_create`) (exit 2)."""
    try:
        bad = out.exists() and not out.is_dir()
        inside = teacher is not None and (
            out.resolve() == teacher.resolve() or teacher.resolve() in
            out.resolve().parents)
    except (OSError, RuntimeError) as exc:
        raise UsageError(f"--out {out}: cannot be used ({exc})") from exc
    if bad:
        raise UsageError(f"--out {out} exists and is not a folder; name a folder")
    check_writable_above(out, f"--out {out}")
    if inside:
        raise UsageError(
            f"--out {out} is the --teacher folder {teacher} or inside it; the "
            "artifact's files would mix with the teacher's (name another folder)")
    check_can_create(out, f"--out {out}")


def _check_torch_int8_flags(args: argparse.Namespace) -> None:
    """Refuse, with ``--target torch-int8``, every flag given that only shapes
    students (exit 2): ``--student``, ``--widths``, those of
    :data:`STUDENT_DEFAULTS`, ``--threshold-rule teacher-rate`` and ``--gate
    split``. That target quantizes the teacher itself, with its threshold at the
    best validation F1 and a gate on validation F1, so they would be silently
    ignored. With ``--target all`` they shape the edge targets' students."""
    if args.target != "torch-int8":
        return
    dests = ("student", "widths", *STUDENT_DEFAULTS)
    given = [f"--{d.replace('_', '-')}" for d in dests if getattr(args, d) is not None]
    measures = [flag for flag, used in (
        ("--threshold-rule teacher-rate", args.threshold_rule == "teacher-rate"),
        ("--gate split", args.gate == "split")) if used]
    given += measures
    if not given:
        return
    one = len(given) == 1
    flags = given[0] if one else f"{', '.join(given[:-1])} and {given[-1]}"
    why = "no student is made" + (
        "; its threshold is the best validation F1 one, and its gate validation F1"
        if measures else "")
    raise UsageError(
        f"{flags} {'does' if one else 'do'} not apply to --target torch-int8, which "
        f"quantizes the teacher itself for the re-scorer ({why}); drop "
        f"{'it' if one else 'them'}, or use --target all, where "
        f"{'it applies' if one else 'they apply'} to the edge targets' students")


def _student_settings(args: argparse.Namespace) -> None:
    """Give each student flag not on the command line its default
    (:data:`STUDENT_DEFAULTS`)."""
    for dest, default in STUDENT_DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)


def _once(flag: str, values: list | None) -> list | None:
    """``values`` without repeats, in the order given (None stays None): a width
    or pruning ratio given twice would be distilled, pruned and verified twice
    for the same result. Repeats are said in one warning."""
    if values is None:
        return None
    kept = list(dict.fromkeys(values))
    if len(kept) < len(values):
        twice = [v for v in kept if values.count(v) > 1]
        logger.warning("%s: %s given more than once; each is tried once", flag,
                       ", ".join(f"{v:g}" for v in twice))
    return kept


def cmd_run(args: argparse.Namespace) -> int:
    """``compress run``."""
    _check_torch_int8_flags(args)  # before torch is imported: a usage error is quick
    if args.qat == "always" and args.target in ("onnx-fp32", "tflite-fp32"):
        raise UsageError(
            f"--qat always does not apply to --target {args.target}: a float "
            "artifact has no int8 quantization to fine-tune for; drop it, or give "
            "an int8 target (or --target all, where it applies to those)")
    if args.qat == "always" and args.student not in (None, *QAT_KINDS):
        raise UsageError(
            f"--qat always does not apply to --student {args.student}: "
            f"quantization-aware fine-tuning exists for {' and '.join(QAT_KINDS)} "
            "students only (nothing mirrors the int8 graph of an "
            f"{args.student}); drop it, or give --student "
            f"{' or '.join(QAT_KINDS)}")
    _refuse_artifact(args.teacher)
    _check_data(args.data)
    if args.dataset is None and args.data is None:
        _check_teacher_data(args.teacher, args.data_dir)
    if args.no_prune and args.prune_ratios is not None:
        raise UsageError("--no-prune and --prune-ratios contradict each other; "
                         "give one of them")
    _student_settings(args)
    args.widths = _once("--widths", args.widths)
    args.prune_ratios = _once("--prune-ratios", args.prune_ratios)
    # numpy before torch, Ctrl-C held while they load: torch's C++ code imports
    # numpy itself and swallows a KeyboardInterrupt raised in that import, leaving
    # a half-loaded numpy ("module 'numpy' has no attribute 'nonzero'" later).
    with held():
        import numpy  # noqa: F401
        import torch

    from compress.pipeline import RunConfig, run
    from student.distill import DistillConfig

    _check_out(args.out, args.teacher)  # what the --out folder holds: run() checks

    torch.set_num_threads(max(1, args.threads))
    cfg = RunConfig(
        target=args.target,
        teacher=args.teacher,
        out=args.out,
        student=args.student,
        max_f1_drop=args.max_f1_drop,
        data_dir=args.data_dir,
        dataset=args.dataset if args.data is None else str(args.data),
        timezone=args.timezone,
        widths=RunConfig.widths if args.widths is None else tuple(args.widths),
        restarts=args.restarts,
        prune_ratios=() if args.no_prune else (
            None if args.prune_ratios is None else tuple(args.prune_ratios)),
        distill=DistillConfig(epochs=args.epochs, lr=args.lr, seed=args.seed,
                              batch_size=args.batch_size,
                              max_train_rows=args.max_train_rows),
        calibration_windows=args.calibration_windows,
        seed=args.seed,
        qat=args.qat,
        qat_epochs=args.qat_epochs,
        distill_noise=args.distill_noise,
        distill_swap=args.distill_swap,
        distill_swap_rows=args.distill_swap_rows,
        distill_alpha=args.distill_alpha,
        threshold_rule=args.threshold_rule,
        gate=args.gate,
        time_latency=not args.no_timing,
        argv=["compress", *sys.argv[1:]],
    )
    # Once the new artifacts are in place the run has finished: a Ctrl-C from the
    # first rename on is noted, not turned into exit 130 (_placing).
    with _placing(args.out) as closing:
        cfg.closing = closing
        code = _run_and_report(cfg, args, run)
    closing.note()
    return code


def _run_and_report(cfg: Any, args: argparse.Namespace, run: Any) -> int:
    """Run the pipeline with ``cfg`` and print what it made (``args``: the
    command line's flags); returns the exit code."""
    from compress.pipeline import UNSEEN_LEGEND, GateMissed, frontier_table
    from flows.errors import one_line

    try:
        result = run(cfg, progress=_progress(args.quiet))
    except GateMissed as exc:
        # The error line on stderr; with --json the summary on stdout as after a
        # success (no artifacts), which holds the table; else the frontier table
        # (when any candidate was made) after the line, on lines of its own.
        if args.json:
            print(json.dumps(_summary(exc.result), indent=2))
        print(f"error: {one_line(exc.reason)}", file=sys.stderr)
        if exc.table and not args.json:
            print(exc.table, file=sys.stderr)
        return exc.exit_code
    summary = _summary(result)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        gate = ("validation F1, and F1 on unseen held-out types (--gate split)"
                if cfg.gate == "split" else "validation F1")
        print(f"frontier (every candidate tried; gate on {gate}):")
        print(frontier_table(result.frontier))
        print(UNSEEN_LEGEND)
        print()
        print(_artifact_table(summary["artifacts"]))
        for line in _larger_than_float(summary["artifacts"]):
            print(line)
        for target, why in result.failed.items():
            print(f"{target}: not made ({why})")
    return _finished(result.partial, result.warnings)


def _placing(out: Path) -> Any:
    """Teacher train's :class:`~teacher.interrupts.Closing` in an artifact's
    words: from the first rename that puts the new artifacts in place (``hold``),
    a Ctrl-C is noted, and once they are all in place (``placed``) the run ends as
    finished, with a note saying so; a second Ctrl-C then stops the report (exit
    130, its line saying the artifact is complete). Before the hold, Ctrl-C is
    exit 130 with the old artifact kept whole."""
    from teacher.interrupts import Closing

    return Closing(out, thing=f"the artifact in {out}")


def _summary(result: Any) -> dict[str, Any]:
    """The run's summary as plain data (what ``--json`` prints): each artifact
    written, each target not made with why, every candidate tried, the teacher's
    metrics."""
    arts = {}
    for target, folder in result.artifacts.items():
        m = json.loads((Path(folder) / "manifest.json").read_text())
        test = m.get("metrics", {}).get("test", {})
        arts[target] = {
            "folder": str(folder), "model_file": m.get("model_file"),
            "student": m.get("student", {}).get("kind"),
            "params": m.get("params"), "size_bytes": m.get("size_bytes"),
            "val_f1": m.get("metrics", {}).get("val", {}).get("f1"),
            "test_f1": test.get("f1"),
            "teacher_test_f1": m.get("teacher_metrics", {}).get("test", {}).get("f1"),
            "latency_us_p50": test.get("latency_us_p50"),
            "throughput_flows_s": test.get("throughput_flows_s"),
            "input_dtype": m.get("input", {}).get("dtype"),
            "quantization": m.get("quantization"),
            "float_size_bytes": m.get("export", {}).get("float_size_bytes"),
        }
    return {"artifacts": arts, "failed": result.failed,
            "frontier": [c.row() for c in result.frontier],
            "teacher_metrics": result.teacher_metrics}


def _larger_than_float(arts: dict[str, dict[str, Any]]) -> list[str]:
    """A note for each int8 ONNX artifact whose file came out no smaller than
    the float ONNX it was quantized from (tiny students: the quantize and
    dequantize nodes and per-channel scales outweigh the bytes int8 saves)."""
    notes = []
    for target, a in arts.items():
        size, float_size = a.get("size_bytes"), a.get("float_size_bytes")
        if isinstance(size, int) and isinstance(float_size, int) and (
                size >= float_size):
            notes.append(
                f"note: the {target} file ({size:,} B) is not smaller than the float "
                f"ONNX it was quantized from ({float_size:,} B): for a student "
                "this small, --target onnx-fp32 gives the smaller file")
    return notes


def _artifact_table(arts: dict[str, dict[str, Any]]) -> str:
    head = (f"{'target':<13}{'student':<8}{'params':>8}{'bytes':>9}{'in':>8}"
            f"{'F1val':>8}{'F1test':>8}{'teacher':>8}{'b1 us':>9}{'b256 f/s':>11}")

    def f(v: Any, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, int | float) else "-"

    lines = [head, "-" * len(head)]
    for target, a in arts.items():
        lines.append(
            f"{target:<13}{a['student'] or '-':<8}{f(a['params'], 'd'):>8}"
            f"{f(a['size_bytes'], 'd'):>9}{a['input_dtype'] or '-':>8}"
            f"{f(a['val_f1'], '.4f'):>8}{f(a['test_f1'], '.4f'):>8}"
            f"{f(a['teacher_test_f1'], '.4f'):>8}{f(a['latency_us_p50'], '.1f'):>9}"
            f"{f(a['throughput_flows_s'], '.0f'):>11}"
        )
    return "\n".join(lines)


def _target_of(artifact: Path) -> str | None:
    """The ``target`` an artifact's manifest names, or None when it cannot be
    read (the loader then says what is wrong with it)."""
    try:
        target = json.loads((Path(artifact) / "manifest.json").read_text()).get(
            "target")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None  # a manifest nested past Python's stack, too
    return target if isinstance(target, str) else None


class _Drop(logging.Filter):
    """A log filter that lets nothing through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextlib.contextmanager
def _unlogged(quiet: bool):
    """With ``quiet``, the gatewatch.teacher logger says nothing inside (for a
    warning the caller prints itself, so that it is said once)."""
    if not quiet:
        yield
        return
    teacher_log, drop = logging.getLogger("gatewatch.teacher"), _Drop()
    teacher_log.addFilter(drop)
    try:
        yield
    finally:
        teacher_log.removeFilter(drop)


def _threshold_rule(manifest: dict[str, Any]) -> str:
    """The rule that chose the artifact's decision threshold, as its manifest
    records it (``threshold_rule.rule``): ``best-f1`` (the run's ``f1``, and
    torch-int8 and older artifacts, which record none) or ``teacher-rate``."""
    rule = manifest.get("threshold_rule")
    rule = rule.get("rule") if isinstance(rule, dict) else None
    return "teacher-rate" if rule == "teacher-rate" else "best-f1"


def _split_seed(provenance: dict[str, Any], artifact: Path, source: str,
                split: str | None) -> int:
    """The seed of the train/val/test split to score ``source`` on: the one the
    artifact records (its teacher's split, ``provenance.data.split_seed``).

    An artifact written before artifacts recorded it gets seed 0, with a warning
    where the seed moves the rows scored (a registered dataset's seeded split, or
    the validation/training rows of an official one): its teacher's split was
    drawn with seed 0 only if it was trained with ``--seed 0``."""
    from flows.datasets import REGISTRY

    data = provenance.get("data")
    seed = data.get("split_seed") if isinstance(data, dict) else None
    if isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0:
        return seed
    spec = REGISTRY.get(source)
    if spec is not None and split is not None and (
            spec.split != "official" or split != "test"):
        logger.warning(
            "%s: the manifest records no split seed (provenance.data.split_seed; "
            "written before artifacts recorded it): split %r is drawn with seed 0, "
            "which holds out the teacher's rows only if the teacher was trained "
            "with --seed 0 (its provenance.json says); run compress run again for "
            "an artifact that records it", artifact, split)
    return 0


def _torch_int8_scorer(artifact: Path, threads: int) -> Any:
    """The scorer of a torch-int8 artifact (the re-scorer's int8 teacher), which
    runs in torch itself on ``threads`` threads. Without torch (a gateway install)
    it is one ModelError line saying so (exit 1), where the other targets, which
    run in onnxruntime or a TFLite runtime, are scored without torch."""
    try:
        import torch
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "torch":
            raise
        raise ModelError(
            f"--artifact {artifact} is a torch-int8 artifact, which runs in torch, "
            "and torch is not installed here; score it where torch is (pip install "
            "'gatewatch[compress]'), or score an onnx-* or tflite-* artifact, which "
            "needs no torch") from None

    from compress.inc import load_int8_teacher

    torch.set_num_threads(threads)
    return load_int8_teacher(artifact)


def evaluate_artifact(
    artifact: Path, source: str, split: str | None, data_dir: Path | None = None,
    timing: bool = True, micro: bool = False, timezone: str = "UTC",
    source_is_dataset: bool = True, threads: int = 1, log_trained_on: bool = True,
) -> dict[str, Any]:
    """Metrics of an artifact run in its runtime (same keys as ``teacher eval``);
    ``timezone`` is the zone of a binetflow file's start times (as in
    :func:`teacher.data.prepare`). A flow file (``source_is_dataset`` false) that
    the artifact was trained on is scored with a warning saying so. The runtime
    scores, and the latency is timed, on ``threads`` CPU threads: those of the
    onnxruntime or TFLite session, or torch's for torch-int8 (the key
    ``threads``). Only a torch-int8 artifact imports torch; the others are read,
    encoded (numpy) and scored without it, as on a gateway.

    A registered dataset is split with the seed the artifact records
    (``provenance.data.split_seed``, the teacher's split), so its test rows are
    the held-out ones ``compress run`` scored. The trained-on warning is logged
    unless ``log_trained_on`` is false (the text output prints it itself)."""
    import numpy as np

    from edge_agent.runtime import load_artifact
    from teacher.data import prepare, warn_dataset_trained_on, warn_trained_on
    from teacher.metrics import binary_metrics, time_scorer

    if _target_of(artifact) == "torch-int8":
        scorer = _torch_int8_scorer(artifact, threads)
    else:
        # ONNX Runtime or TFLite, with numpy around them: no torch is imported.
        scorer = load_artifact(artifact, prefer_micro=micro, threads=threads)
    provenance = scorer.manifest.get("provenance")
    provenance = provenance if isinstance(provenance, dict) else {}
    seed = _split_seed(provenance, artifact, source, split)
    prep = prepare(source, encoder=scorer.encoder, data_dir=data_dir, seed=seed,
                   need_split=False, encoder_of="the artifact", timezone=timezone)
    rows = prep.rows(split)
    data = provenance.get("data")
    data = data if isinstance(data, dict) else {}
    with _unlogged(not log_trained_on):
        if not source_is_dataset:
            warn_trained_on(prep, data, "the artifact's teacher", "its manifest")
        else:
            # The teacher's split seed is the artifact's split_seed.
            warn_dataset_trained_on(prep, {**data, "seed": data.get("split_seed")},
                                    rows, "the artifact's teacher", "its manifest")
    if rows.size == 0:
        where = "the file" if split is None else f"split {split!r}"
        raise BadInputError(
            f"{prep.name}: no labeled rows (label 0 or 1) in {where}; evaluation "
            "needs labels")
    start = time.perf_counter()
    windows = prep.windows(rows)
    prob = np.concatenate([scorer.score(windows[i : i + 4096])
                           for i in range(0, len(windows), 4096)])
    scored_s = time.perf_counter() - start
    fams = prep.families[rows] if prep.families is not None else None
    out = binary_metrics(prep.y[rows], prob, scorer.thresholds["decision"], fams)
    out["threshold_rule"] = _threshold_rule(scorer.manifest)
    out["scoring_s"] = scored_s
    out["threads"] = threads
    if timing:
        out.update(time_scorer(scorer.score, windows[:512]))
    out.update({"artifact": str(artifact), "target": scorer.target,
                "model_version": scorer.model_version, "data": prep.name,
                "split": "all" if split is None else split})
    if prep.partial:
        out["partial"] = True
    if prep.warnings:
        out["warnings"] = prep.warnings
    return out


def _refuse_checkpoint(artifact: Path) -> None:
    """Refuse (exit 2) an ``--artifact`` that is a teacher checkpoint: it holds
    no manifest.json but a checkpoint's config.json and model.safetensors."""
    folder = Path(artifact)
    if (folder / "manifest.json").exists() or not all(
            (folder / name).is_file() for name in ("config.json", "model.safetensors")):
        return  # an artifact, or neither: the loader says what is wrong
    raise UsageError(
        f"--artifact {artifact} is a teacher checkpoint (it holds config.json and "
        "model.safetensors, no manifest.json), not a compress artifact; score it "
        "with teacher eval --checkpoint, or make an artifact of it with compress "
        "run --teacher")


def _refuse_artifact(teacher: Path) -> None:
    """Refuse (exit 2) a ``--teacher`` that is a compress artifact (it holds
    manifest.json): students are distilled from a teacher checkpoint."""
    if (Path(teacher) / "manifest.json").is_file():
        raise UsageError(
            f"--teacher {teacher} is a compress artifact (it holds manifest.json), "
            "not a teacher checkpoint; give the teacher checkpoint folder it was "
            "made from (teacher train --out), or score the artifact with compress "
            "eval --artifact")


def _check_data(data: Path | None) -> None:
    """Refuse (exit 3) a ``--data`` FILE that is not there, in the words teacher
    uses: nothing usable can be read (an unknown ``--dataset`` name stays a usage
    error, exit 2)."""
    from teacher.data import missing_data

    problem = missing_data(data)
    if problem is not None:
        raise problem


def _check_dataset(name: str | None) -> None:
    """Refuse (exit 2) before the artifact is loaded a ``--dataset`` that is no
    registered name (nor a file, which it takes too)."""
    from flows.datasets import REGISTRY
    from teacher.data import unknown_dataset

    if name is not None and name not in REGISTRY and not Path(name).exists():
        if "/" in name or os.sep in name:
            return  # a path: the loader says the file is missing (exit 3)
        raise unknown_dataset(name)


def _check_teacher_data(teacher: Path, data_dir: Path | None) -> None:
    """Refuse (exit 3) before any work a ``compress run`` without --dataset/--data
    whose teacher's recorded data file is no longer where its provenance.json
    says, naming the file and how to give it where it is now (``--data FILE``, or
    the data folder for a file under it). A provenance that cannot be read is
    left to the loader, which says what is wrong with the checkpoint."""
    from teacher.data import recorded_data_missing

    try:
        prov = json.loads((Path(teacher) / "provenance.json").read_text())
    except (OSError, ValueError, RecursionError):
        return
    if not isinstance(prov, dict):
        return
    problem = recorded_data_missing(prov.get("dataset"), data_dir, teacher,
                                    "--data FILE")
    if problem is not None:
        raise problem


def cmd_eval(args: argparse.Namespace) -> int:
    """``compress eval``."""
    if args.data and args.split not in (None, "all"):
        raise UsageError(f"--split {args.split} picks rows of a --dataset; a --data "
                         "file is scored whole (leave --split out)")
    _refuse_checkpoint(args.artifact)
    _check_data(args.data)
    _check_dataset(args.dataset)
    source = args.dataset if args.dataset else str(args.data)
    asked = args.split or "test"
    split = None if (asked == "all" or args.data) else asked
    # The text output prints the trained-on warning itself (once); with --json
    # it is logged on stderr and is in the JSON's warnings.
    out = evaluate_artifact(args.artifact, source, split, args.data_dir,
                            timing=not args.no_timing, micro=args.micro,
                            timezone=args.timezone,
                            source_is_dataset=not args.data, threads=args.threads,
                            log_trained_on=args.json)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{'artifact':>13}: {out['artifact']} ({out['target']}, model "
              f"{out['model_version']})")
        print(f"{'data':>13}: {out['data']}, split {out['split']}, {out['n']} rows")
        print(f"{'threshold':>13}: {out['threshold']:.4f}")
        for key in ("accuracy", "precision", "recall", "f1", "roc_auc", "fpr"):
            value = out.get(key)
            print(f"{key:>13}: {value:.4f}" if value is not None else f"{key:>13}: -")
        print(f"{'confusion':>13}: "
              + ", ".join(f"{k} {v}" for k, v in out["confusion"].items()))
        recall = out.get("per_family_recall")
        if recall:
            print(f"{'family recall':>13}: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in recall.items()))
        if "latency_us_p50" in out:
            print(f"{'latency':>13}: p50 {out['latency_us_p50']:.1f} µs, p99 "
                  f"{out['latency_us_p99']:.1f} µs (batch 1), "
                  f"{out['throughput_flows_s']:,.0f} flows/s (batch 256), "
                  f"{out['threads']} thread{'s' if out['threads'] > 1 else ''}")
        for text in out.get("warnings", []):
            print(f"      warning: {text}")
    return _finished(out.get("partial", False))


def _finished(partial: bool, warnings: list[str] | None = None) -> int:
    """Exit code once the work is written: 4 when the data was damaged part way
    (``warnings``: the data's own, which name the file and the place)."""
    if partial:
        where = "; ".join(warnings or []) or "see the lines above"
        logger.warning(
            "the data was damaged part way; used the rows before it (%s)", where
        )
        return EXIT_PARTIAL_INPUT
    return EXIT_OK


COMMANDS = {"run": cmd_run, "eval": cmd_eval}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``compress``; returns the exit code.

    A Ctrl-C anywhere (building the parser, loading torch, the work) ends in one
    line, ``error: interrupted``, and exit 130. On a gateway install (no torch)
    the command ends in one line saying so, exit 1."""
    try:
        return _main(argv)
    except KeyboardInterrupt as exc:
        # A Ctrl-C or SIGTERM; its message says what it left behind (see _placing).
        line, code = stop_line(exc)
        print(f"error: {line}", file=sys.stderr)
        return code
    except ModuleNotFoundError as exc:
        # compress run needs torch; compress eval of an onnx-*/tflite-* artifact
        # imports neither torch nor scikit-learn, so this is a missing runtime
        # (onnxruntime, a TFLite one) or a torch-int8 artifact's torch.
        from teacher.cli import missing_full_install

        return missing_full_install(exc, "compress", "compress")


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed its usage message
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        # As the command line itself (no argv given), further stops after one are
        # only noted.
        with sigterm_stops(exiting=argv is None):
            _setup(args)
            return COMMANDS[args.command](args)
    except GatewatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
