"""The reliability part of the benchmark report: soak, long fuzz run, faults.

Reads what :mod:`benchmarks.soak` and :mod:`benchmarks.fuzz_long` wrote (their
``--json`` files) and, optionally, a JUnit XML file of ``pytest tests/test_faults.py``,
and writes ``reliability.md`` with the figures issue #9 asks for (faults survived,
inputs fuzzed per parser, the soak's RSS, descriptor and thread counts) and
``soak_rss.png``, the RSS curve of each soak.

    python -m benchmarks.report_reliability --soak benchmarks/results/soak-30min.json \\
        --fuzz benchmarks/results/fuzz-long.json [--fuzz MORE.json] \\
        --faults runs/faults.xml \\
        --out benchmarks/results

Nothing here is measured anew; it only lays out what the runs recorded.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

__all__ = ["faults_table", "fuzz_table", "main", "soak_table"]

DPI = 80


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise SystemExit(f"{path}: cannot read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise SystemExit(
            f"{path}:{exc.lineno}:{exc.colno}: not JSON ({exc.msg}); expected the file "
            "that benchmarks.soak or benchmarks.fuzz_long wrote with --json"
        ) from None


def soak_table(soaks: dict[str, dict]) -> list[str]:
    """Markdown rows, one per soak run: length, rate held, RSS, fds, threads."""
    lines = [
        "| soak | minutes | flows fed | mean rate/s | RSS first → last MB | growth |"
        " fds | threads | outbox at exit | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in soaks.items():
        res, samples = run["result"], run["samples"]
        minutes = samples[-1]["t"] / 60 if samples else 0.0
        lines.append(
            f"| {name} | {minutes:.1f} | {res['fed']:,} | {res['mean_rate']:,.0f} | "
            f"{res['rss_first_mb']:.1f} → {res['rss_last_mb']:.1f} | "
            f"{res['rss_growth_pct']:+.1f} % | "
            f"{res['fds_first']} → {res['fds_last']} | "
            f"{res['threads_first']} → {res['threads_last']} | "
            f"{res['outbox_pending_at_exit']} | {'pass' if res['ok'] else 'FAIL'} |"
        )
    return lines


def fuzz_table(runs: list[dict]) -> list[str]:
    """Markdown rows, one per fuzzed parser: inputs, time, rate, crashes, hangs.

    A run stopped before its count says so after its inputs; a run that records the
    ``code`` it fuzzed (a commit) gets a column for it.
    """
    with_code = any("code" in r for r in runs)
    lines = [
        "| parser | inputs | seconds | inputs/s | crashes | hangs "
        "| distinct failures |" + (" code fuzzed |" if with_code else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if with_code else ""),
    ]
    for run in runs:
        failures = ", ".join(f"{k} ×{v}" for k, v in run.get("failures", {}).items())
        stopped = " (stopped)" if run.get("complete") is False else ""
        lines.append(
            f"| {run['target']} | {run['inputs']:,}{stopped} | {run['seconds']:,.0f} | "
            f"{run['inputs_per_s']:,.0f} | {run['crashes']} | {run['hangs']} | "
            f"{failures or '-'} |" + (f" {run.get('code', '-')} |" if with_code else "")
        )
    total = sum(r["inputs"] for r in runs)
    lines.append(f"| **all** | **{total:,}** | | | "
                 f"{sum(r['crashes'] for r in runs)} | "
                 f"{sum(r['hangs'] for r in runs)} | |" + (" |" if with_code else ""))
    return lines


def faults_table(junit: Path) -> list[str]:
    """Markdown rows from a JUnit XML file: each fault test and how it ended."""
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError) as exc:
        raise SystemExit(f"{junit}: not a JUnit XML file: {exc}") from None

    lines = ["| fault test | outcome | seconds |", "|---|---|---|"]
    for case in root.iter("testcase"):
        if case.find("skipped") is not None:
            outcome = "skipped: " + (case.find("skipped").get("message") or "")
        elif case.find("failure") is not None or case.find("error") is not None:
            outcome = "**FAILED**"
        else:
            outcome = "survived (passed)"
        lines.append(f"| `{case.get('name')}` | {outcome} | "
                     f"{float(case.get('time', 0)):.1f} |")
    return lines


def _plot(soaks: dict[str, dict], out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None

    fig, ax = plt.subplots(figsize=(7, 3.2))
    for name, run in soaks.items():
        t = [s["t"] / 60 for s in run["samples"]]
        ax.plot(t, [s["rss_mb"] for s in run["samples"]], label=name, lw=1.2)
    ax.set_xlabel("minutes")
    ax.set_ylabel("agent RSS (MB)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("edge-agent RSS at 5,000 flows/s")
    fig.tight_layout()
    path = out / "soak_rss.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.report_reliability",
        description="Write reliability.md and soak_rss.png from soak, fuzz and "
        "fault-test results.",
    )
    p.add_argument("--soak", type=Path, action="append", default=[],
                   help="a soak --json file (repeatable; the file name labels it)")
    p.add_argument("--fuzz", type=Path, action="append", default=[],
                   help="a fuzz_long --json file (repeatable; rows in the order given)")
    p.add_argument("--faults", type=Path,
                   help="JUnit XML of `pytest tests/test_faults.py --junitxml FILE`")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                   help="folder for reliability.md and soak_rss.png "
                   "(default: benchmarks/results)")
    args = p.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    md = ["# Reliability: soak, long fuzz run, faults", ""]
    soaks = {path.stem: _load(path) for path in args.soak}
    if soaks:
        md += ["## Soak (`python -m benchmarks.soak`)", "", *soak_table(soaks), ""]
        png = _plot(soaks, args.out)
        if png is not None:
            md += [f"![agent RSS during the soak]({png.name})", ""]
    if args.fuzz:
        runs = [run for path in args.fuzz for run in _load(path)]
        md += ["## Long fuzz run (`python -m benchmarks.fuzz_long`)", "",
               *fuzz_table(runs), ""]
    if args.faults:
        md += ["## Faults (`pytest tests/test_faults.py`)", "",
               *faults_table(args.faults), ""]

    (args.out / "reliability.md").write_text("\n".join(md))
    print(f"wrote {args.out / 'reliability.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
