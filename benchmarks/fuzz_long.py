"""The long fuzz run: a million mutated inputs per parser, counted and timed.

Each target of :mod:`tests.test_fuzz_targets` (captures, Zeek TSV and JSON,
binetflow, the CSV families, escalations, verdicts, bundles, signed bundle
manifests) gets ``--inputs`` inputs made by mutating its seeds (built ones and the
heads of the real files under ``--data-dir``) and, now and then, an earlier mutant.
An input passes when the parser returns or raises a gatewatch error. Anything else
is a *crash*; an input that uses more than ``--hang-seconds`` of CPU time is a
*hang* (CPU time, not the clock: a run at ``nice 19`` on a busy machine can wait
longer than that for a core without hanging). Both are
written to ``--out`` (the input bytes and the traceback), one file per distinct
place of failure, and counted.

    python -m benchmarks.fuzz_long                      # 1,000,000 per target
    python -m benchmarks.fuzz_long --inputs 2000 --targets pcap,escalation

The run is deterministic for one ``--seed``. It prints one line per target (inputs,
seconds, inputs/s, crashes, hangs, distinct failures) and exits 1 if any target
crashed or hung. An exception that a library swallows but reports as *unraisable*
(one raised inside a callback of pyarrow's CSV reader, say) does not fail the input
but is counted per target, by place, under ``unraisable``.

``--json`` is rewritten after every target, so a run stopped early (SIGTERM, or
``--total-seconds`` spent) still leaves the counts of the targets it finished and,
marked ``"complete": false``, of the one it was in.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path

from tests.test_fuzz_targets import TARGETS, Scratch, mutate, run_target, seeds


class Hang(Exception):
    """Raised by the alarm when one input runs too long."""


class Stop(BaseException):
    """Raised by SIGTERM: end the run, keeping the counts so far."""


def _alarm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise Hang()


def _term(signum, frame):  # noqa: ARG001 - signal handler signature
    raise Stop()


class _Unraisable:
    """Counts exceptions that libraries swallow and hand to ``sys.unraisablehook``."""

    def __init__(self) -> None:
        self.places: dict[str, int] = {}
        self.fresh: list[tuple[str, str]] = []  # (place, text) seen for the first time

    def __call__(self, info) -> None:
        exc = info.exc_value
        where = (
            _where(exc) if exc is not None and exc.__traceback__ else str(info.exc_type)
        )
        if where not in self.places:
            text = "".join(
                traceback.format_exception(info.exc_type, exc, info.exc_traceback)
            )
            self.fresh.append((where, f"in {info.object!r}\n{text}"))
        self.places[where] = self.places.get(where, 0) + 1


def _where(exc: BaseException) -> str:
    """The innermost frame inside the project (the place of a failure)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/site-packages/" not in f.filename] or frames
    last = ours[-1]
    return f"{type(exc).__name__} at {Path(last.filename).name}:{last.lineno}"


def fuzz_target(
    kind: str,
    *,
    inputs: int,
    seconds: float | None,
    rng_seed: int,
    data_dir: Path | None,
    out: Path,
    hang_seconds: float,
) -> dict:
    """Fuzz one target; return its counts (``complete`` false if it was stopped)."""
    rng = random.Random(f"{rng_seed}:{kind}")
    corpus = seeds(kind, data_dir)
    mutants: list[bytes] = []
    scratch = Scratch()
    failures: dict[str, int] = {}
    crashes = hangs = n = 0
    stopped = in_flight = False
    unraisable = _Unraisable()
    old_hook = sys.unraisablehook
    sys.unraisablehook = unraisable
    started = time.perf_counter()
    signal.signal(signal.SIGPROF, _alarm)
    try:
        while n < inputs:
            if seconds is not None and time.perf_counter() - started > seconds:
                break
            base = (
                rng.choice(mutants)
                if mutants and rng.random() < 0.3
                else rng.choice(corpus)
            )
            data = mutate(base, rng)
            n += 1
            in_flight = True
            signal.setitimer(signal.ITIMER_PROF, hang_seconds)
            try:
                run_target(kind, data, scratch)
            except Hang:
                hangs += 1
                _record(
                    out,
                    kind,
                    "hang",
                    data,
                    f"no result within {hang_seconds} s of CPU time",
                    failures,
                )
            except Exception as exc:  # noqa: BLE001 - every escape is a finding
                crashes += 1
                _record(out, kind, _where(exc), data, traceback.format_exc(), failures)
            finally:
                signal.setitimer(signal.ITIMER_PROF, 0)
            in_flight = False
            while unraisable.fresh:  # keep the input that first showed each place
                where, text = unraisable.fresh.pop()
                _record(out, kind, f"unraisable {where}", data, text, {})
            if len(mutants) < 256 and rng.random() < 0.01:
                mutants.append(data)
    except Stop:
        stopped = True
        n -= in_flight  # the input in flight when the signal came is not counted
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        sys.unraisablehook = old_hook
        scratch.cleanup()
    elapsed = time.perf_counter() - started
    return {
        "target": kind,
        "inputs": n,
        "complete": n >= inputs,
        "stopped": stopped,
        "seconds": round(elapsed, 2),
        "inputs_per_s": round(n / elapsed, 1) if elapsed else None,
        "crashes": crashes,
        "hangs": hangs,
        "failures": failures,
        "unraisable": unraisable.places,
    }


def _record(
    out: Path, kind: str, where: str, data: bytes, text: str, failures: dict[str, int]
) -> None:
    first = where not in failures
    failures[where] = failures.get(where, 0) + 1
    if first:
        out.mkdir(parents=True, exist_ok=True)
        tag = hashlib.sha256(f"{kind}:{where}".encode()).hexdigest()[:10]
        (out / f"{kind}-{tag}.input").write_bytes(data)
        (out / f"{kind}-{tag}.txt").write_text(f"{kind}: {where}\n\n{text}")


def main(argv: list[str] | None = None) -> int:
    """Entry point; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--inputs", type=int, default=1_000_000, help="per target")
    p.add_argument("--seconds", type=float, help="stop each target after this long")
    p.add_argument(
        "--total-seconds",
        type=float,
        help="stop the whole run after this long (the target in flight is cut)",
    )
    p.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help=f"comma-separated, of: {', '.join(TARGETS)}",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--data-dir",
        type=Path,
        default=os.environ.get("GATEWATCH_DATA")
        or Path(__file__).resolve().parents[2] / "shared" / "data",
    )
    p.add_argument("--out", type=Path, default=Path("runs/fuzz"))
    p.add_argument("--hang-seconds", type=float, default=10.0,
                   help="CPU seconds one input may use before it counts as a hang "
                        "(default 10)")
    p.add_argument("--json", type=Path, help="also write the counts here")
    args = p.parse_args(argv)
    kinds = [k.strip() for k in args.targets.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(TARGETS))
    if unknown:
        p.error(f"unknown targets {unknown}")
    logging.disable(logging.WARNING)  # the parsers warn once per damaged input
    data_dir = args.data_dir if args.data_dir and args.data_dir.is_dir() else None
    signal.signal(signal.SIGTERM, _term)
    run_started = time.perf_counter()
    results = []
    for kind in kinds:
        seconds = args.seconds
        if args.total_seconds is not None:
            left = args.total_seconds - (time.perf_counter() - run_started)
            if left <= 0:
                break
            seconds = left if seconds is None else min(seconds, left)
        res = fuzz_target(
            kind,
            inputs=args.inputs,
            seconds=seconds,
            rng_seed=args.seed,
            data_dir=data_dir,
            out=args.out,
            hang_seconds=args.hang_seconds,
        )
        results.append(res)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(
            f"{kind:16s} inputs {res['inputs']:>9,d}  {res['seconds']:>8.1f} s  "
            f"{res['inputs_per_s'] or 0:>8.1f}/s  crashes {res['crashes']}  "
            f"hangs {res['hangs']}  distinct {len(res['failures'])}",
            flush=True,
        )
        for where, count in sorted(res["failures"].items()):
            print(f"    {count:>7d} x {where}", flush=True)
        for where, count in sorted(res["unraisable"].items()):
            print(f"    {count:>7d} x unraisable {where}", flush=True)
        if res["stopped"]:
            break
    total = sum(r["inputs"] for r in results)
    bad = sum(r["crashes"] + r["hangs"] for r in results)
    print(f"total inputs {total:,d}; failing inputs {bad}; reproducers in {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
