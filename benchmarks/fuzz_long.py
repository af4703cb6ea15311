"""The long fuzz run: a million mutated inputs per parser, counted and timed.

Each target of :mod:`tests.test_fuzz_targets` (captures, Zeek TSV and JSON,
binetflow, the CSV families, escalations, verdicts, bundles, signed bundle
manifests) gets ``--inputs`` inputs made by mutating its seeds (built ones and the
heads of the real files under ``--data-dir``) and, now and then, an earlier mutant.
An input passes when the parser returns or raises a gatewatch error. Anything else
is a *crash*; an input that runs past ``--hang-seconds`` is a *hang*. Both are
written to ``--out`` (the input bytes and the traceback), one file per distinct
place of failure, and counted.

    python -m benchmarks.fuzz_long                      # 1,000,000 per target
    python -m benchmarks.fuzz_long --inputs 2000 --targets pcap,escalation

The run is deterministic for one ``--seed``. It prints one line per target (inputs,
seconds, inputs/s, crashes, hangs, distinct failures) and exits 1 if any target
crashed or hung.
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


def _alarm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise Hang()


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
    """Fuzz one target; return its counts."""
    rng = random.Random(f"{rng_seed}:{kind}")
    corpus = seeds(kind, data_dir)
    mutants: list[bytes] = []
    scratch = Scratch()
    failures: dict[str, int] = {}
    crashes = hangs = n = 0
    started = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
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
            signal.setitimer(signal.ITIMER_REAL, hang_seconds)
            try:
                run_target(kind, data, scratch)
            except Hang:
                hangs += 1
                _record(
                    out,
                    kind,
                    "hang",
                    data,
                    f"no result within {hang_seconds} s",
                    failures,
                )
            except Exception as exc:  # noqa: BLE001 - every escape is a finding
                crashes += 1
                _record(out, kind, _where(exc), data, traceback.format_exc(), failures)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if len(mutants) < 256 and rng.random() < 0.01:
                mutants.append(data)
    finally:
        scratch.cleanup()
    elapsed = time.perf_counter() - started
    return {
        "target": kind,
        "inputs": n,
        "seconds": round(elapsed, 2),
        "inputs_per_s": round(n / elapsed, 1) if elapsed else None,
        "crashes": crashes,
        "hangs": hangs,
        "failures": failures,
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
    p.add_argument("--hang-seconds", type=float, default=10.0)
    p.add_argument("--json", type=Path, help="also write the counts here")
    args = p.parse_args(argv)
    kinds = [k.strip() for k in args.targets.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(TARGETS))
    if unknown:
        p.error(f"unknown targets {unknown}")
    logging.disable(logging.WARNING)  # the parsers warn once per damaged input
    data_dir = args.data_dir if args.data_dir and args.data_dir.is_dir() else None
    results = []
    for kind in kinds:
        res = fuzz_target(
            kind,
            inputs=args.inputs,
            seconds=args.seconds,
            rng_seed=args.seed,
            data_dir=data_dir,
            out=args.out,
            hang_seconds=args.hang_seconds,
        )
        results.append(res)
        print(
            f"{kind:16s} inputs {res['inputs']:>9,d}  {res['seconds']:>8.1f} s  "
            f"{res['inputs_per_s'] or 0:>8.1f}/s  crashes {res['crashes']}  "
            f"hangs {res['hangs']}  distinct {len(res['failures'])}",
            flush=True,
        )
        for where, count in sorted(res["failures"].items()):
            print(f"    {count:>7d} x {where}", flush=True)
    total = sum(r["inputs"] for r in results)
    bad = sum(r["crashes"] + r["hangs"] for r in results)
    print(f"total inputs {total:,d}; failing inputs {bad}; reproducers in {args.out}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
