"""How often students decide as their teacher on traffic none of them learned from.

A label-free check of distillation: each flow of each input (captures and logs the
models never saw) is windowed as the agent does, scored by the teacher at its
threshold and by every artifact at its decision threshold; the table gives each
model's alert share and each artifact's agreement with the teacher.

    python benchmarks/bench_fidelity.py --teacher demo-out/teacher-ctu-conn \\
        --artifact new=demo-out/student-ctu-conn-onnx-int8 \\
        --artifact old=runs/ctu-old-onnx \\
        pcap/test7-malicious.pcap \\
        zeek-conn/android-mischief-rat01-androidtester.conn.log

Inputs are paths, or paths under ``--data-dir`` / ``$GATEWATCH_DATA``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np


def windows_of(path: str, encoder) -> np.ndarray:
    """The windows ``[N, W, F]`` of a file's flows, in file order, as the agent forms
    them (per source host, or in stream order)."""
    from flows.readers import read
    from flows.windows import StreamWindower

    records = read(path, on_error="skip").table.to_pylist()
    features = encoder.transform_records(records)
    windower = StreamWindower(encoder.window, encoder.n_features)
    keys = ([0] * len(records) if encoder.group_by == "stream"
            else [r.get("src_ip") for r in records])
    return windower.push_many(keys, features)


def fidelity(teacher_dir: str, artifacts: dict[str, str], inputs: list[str]) -> list:
    """One row per input: flows, the teacher's alert share, each artifact's alert
    share and agreement with the teacher."""
    from edge_agent.runtime import load_artifact
    from teacher.checkpoint import load_teacher

    teacher = load_teacher(teacher_dir, device="cpu")
    scorers = {name: load_artifact(folder) for name, folder in artifacts.items()}
    rows = []
    for path in inputs:
        windows = windows_of(path, teacher.encoder)
        said = teacher.predict_proba(windows) >= teacher.threshold
        row = {"input": path, "flows": len(windows),
               "teacher_alerts": float(said.mean())}
        for name, scorer in scorers.items():
            decided = scorer.score(windows) >= scorer.thresholds["decision"]
            row[name] = {"alerts": float(decided.mean()),
                         "agreement": float(np.mean(decided == said))}
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="teacher checkpoint folder")
    parser.add_argument("--artifact", action="append", required=True,
                        help="NAME=FOLDER of an artifact (repeat for several)")
    parser.add_argument("--data-dir", default=os.environ.get("GATEWATCH_DATA"),
                        help="folder relative inputs are looked up in")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("inputs", nargs="+", help="captures or flow logs")
    args = parser.parse_args(argv)

    artifacts = dict(a.split("=", 1) for a in args.artifact)
    inputs = [p if Path(p).exists() or not args.data_dir
              else str(Path(args.data_dir) / p) for p in args.inputs]
    rows = fidelity(args.teacher, artifacts, inputs)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        parts = [f"{Path(row['input']).name[:40]:40}", f"{row['flows']:6}",
                 f"teacher alerts {row['teacher_alerts']:.3f}"]
        parts += [f"{name}: alerts {row[name]['alerts']:.3f} agree "
                  f"{row[name]['agreement']:.3f}" for name in artifacts]
        print(" | ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
