"""Conn-family distillation settings, scored by label-free agreement with the teacher.

Round 1 of the conn family (PROTOCOL.md beside this file). One ctu-conn teacher
(``teacher train --dataset ctu-conn``, seed 0) is kept under ``OUT/teacher``; each
candidate (a line ``NAME JSON-LIST-OF-FLAGS`` of ``candidates.txt``: extra
``compress run`` flags) is compressed with seeds 0-2 into a fixed student shape
(cnn-4, pruned 50 %, onnx-int8), and every artifact that passes the gate is scored
on flow files none of the models learned from: the share of windows on which its
decision equals the teacher's (``benchmarks.bench_fidelity.fidelity``). No labels are
used. Usage, from the repository root with GATEWATCH_DATA set::

    python student/results/conn1/conn_round.py teacher [OUT]
    python student/results/conn1/conn_round.py run CAND SEED [OUT]
    python student/results/conn1/conn_round.py score [OUT] > val-results.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SEEDS = (0, 1, 2)
# Chosen on: label-free inputs of the conn family, none in ctu-conn.
SELECTION = (
    "zeek-conn/nmap-portscans.conn.json.log",
    "binetflow/test4-malicious.binetflow",
    "binetflow/test5-mixed.binetflow",
    "binetflow/test11-portscan.binetflow",
    "pcap/ftp_bruteforce.pcap",
    "pcap/nmap-vsn.pcap",
    "pcap/wikipedia.pcap",
)
# Reported only (the inputs of compress/README.md's earlier table).
REPORT = (
    "pcap/test7-malicious.pcap",
    "zeek-conn/android-mischief-rat01-androidtester.conn.log",
)
SHAPE = ["--target", "onnx-int8", "--student", "cnn", "--widths", "4",
         "--prune-ratios", "0.5", "--no-timing", "--threads", "1", "--json"]


def candidates() -> dict[str, list[str]]:
    """The fixed candidate list: name -> extra compress flags."""
    out = {}
    for line in (HERE / "candidates.txt").read_text().splitlines():
        if line.strip():
            name, flags = line.split(" ", 1)
            out[name] = json.loads(flags)
    return out


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def teacher(out: Path) -> None:
    """Train the round's teacher once."""
    if (out / "teacher" / "model.safetensors").exists():
        return
    subprocess.run([_bin("teacher"), "train", "--dataset", "ctu-conn", "--out",
                    str(out / "teacher"), "--seed", "0", "--threads", "1", "-q"],
                   check=True)


def run(name: str, seed: int, out: Path) -> dict:
    """Compress one candidate at one seed; record the exit code and summary."""
    folder = out / f"{name}-s{seed}"
    done = folder.with_suffix(".json")
    if done.exists():
        return json.loads(done.read_text())
    proc = subprocess.run(
        [_bin("compress"), "run", "--teacher", str(out / "teacher"), "--out",
         str(folder), "--seed", str(seed), *SHAPE, *candidates()[name]],
        capture_output=True, text=True)
    info = {"candidate": name, "seed": seed, "exit": proc.returncode,
            "stderr_tail": proc.stderr[-400:]}
    if proc.returncode == 0:
        info["summary"] = json.loads(proc.stdout)
    done.write_text(json.dumps(info))
    return info


def _inputs(names: tuple[str, ...]) -> list[str]:
    base = Path(os.environ["GATEWATCH_DATA"])
    return [str(base / n) for n in names]


def score(out: Path) -> dict:
    """Per candidate: agreement with the teacher on each input, seeds averaged."""
    from benchmarks.bench_fidelity import fidelity

    table: dict = {"selection": list(SELECTION), "report": list(REPORT),
                   "candidates": {}}
    for name, flags in candidates().items():
        runs = [run(name, s, out) for s in SEEDS]
        passed = [r for r in runs if r["exit"] == 0]
        entry: dict = {"flags": flags, "exits": [r["exit"] for r in runs],
                       "complete": len(passed) == len(SEEDS)}
        per_seed = {}
        for r in passed:
            folder = str(out / f"{name}-s{r['seed']}")
            rows = fidelity(str(out / "teacher"), {"a": folder},
                            _inputs(SELECTION + REPORT))
            per_seed[r["seed"]] = {Path(x["input"]).name: {
                "flows": x["flows"], "teacher_alerts": x["teacher_alerts"],
                "alerts": x["a"]["alerts"], "agreement": x["a"]["agreement"]}
                for x in rows}
        entry["per_seed"] = per_seed
        if per_seed:
            for part, names in (("selection", SELECTION), ("report", REPORT)):
                keys = [Path(n).name for n in names]
                entry[f"{part}_agreement"] = {k: float(np.mean(
                    [per_seed[s][k]["agreement"] for s in per_seed])) for k in keys}
                entry[f"mean_{part}"] = float(np.mean(
                    list(entry[f"{part}_agreement"].values())))
        table["candidates"][name] = entry
    return table


if __name__ == "__main__":
    what, args = sys.argv[1], sys.argv[2:]
    if what == "teacher":
        teacher(Path(args[0] if args else "runs/conn1"))
    elif what == "run":
        out = Path(args[2] if len(args) > 2 else "runs/conn1")
        print(json.dumps(run(args[0], int(args[1]), out)))
    else:
        print(json.dumps(score(Path(args[0] if args else "runs/conn1")), indent=1))
