"""Measure every artifact of a ``compress run --target all`` folder in its runtime.

For each ``<folder>/<target>/manifest.json``: parameters (as the manifest records
them), model size (measured here: the bytes of the model file the manifest names; for
``tflite-micro`` the flatbuffer held in ``model.cc``, as ``compress run`` counts it),
F1 on the test split (re-scored here with ``compress eval``'s code, in the artifact's
runtime), p50 latency at batch 1 and throughput at batch 256 on one thread.
``tflite-micro`` runs in the TFLite Micro interpreter on the host when it is
installed. The metrics of ``torch-int8`` (the teacher quantized by Neural Compressor)
are read from its manifest, next to the float teacher it was measured against.

    python -m benchmarks.bench_targets --artifacts runs/c-nsl-all --dataset nsl-kdd \
        --out benchmarks/results/targets-nsl-kdd.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ORDER = ("onnx-fp32", "onnx-int8", "tflite-fp32", "tflite-int8", "tflite-micro",
         "torch-int8")


def measure(folder: Path, dataset: str, data_dir: Path | None) -> list[dict[str, Any]]:
    """One row per artifact under ``folder`` (plus the float teacher)."""
    from compress.cli import evaluate_artifact

    rows = []
    for target in ORDER:
        path = folder / target
        if not (path / "manifest.json").is_file():
            continue
        manifest = json.loads((path / "manifest.json").read_text())
        student = manifest.get("student", {})
        name = student.get("kind", "?")
        if "width" in student:
            name += f"-{student['width']}"
            if student.get("prune_ratio"):
                name += f" pruned {student['prune_ratio']:.0%}"
        if target == "torch-int8":
            m = manifest["metrics"]["test"]
            runtime = manifest["metrics"]["runtime"]
            teacher = manifest["teacher_metrics"]["test"]
            rows.append(_row("teacher fp32", "teacher", manifest["params"], None,
                             teacher, "torch fp32"))
        else:
            m = evaluate_artifact(path, dataset, "test", data_dir,
                                  micro=target == "tflite-micro")
            runtime = "tflite-micro" if target == "tflite-micro" else (
                "onnxruntime" if target.startswith("onnx") else "ai-edge-litert")
        rows.append(_row(target, name, manifest["params"], model_size(path, manifest),
                         m, runtime, manifest["input"]["dtype"]))
    return rows


def model_size(folder: Path, manifest: dict[str, Any]) -> int:
    """Bytes of the artifact's model, read from its model file (not the manifest).

    Counted as ``compress run`` writes ``size_bytes`` for an artifact as built: the
    model file, and for ``tflite-micro`` the flatbuffer its ``model.cc`` holds (the
    bytes the device stores), not the C source.
    """
    path = folder / str(manifest["model_file"])
    if manifest.get("target") == "tflite-micro":
        from edge_agent.runtime import c_array_bytes

        return len(c_array_bytes(path.read_text()))
    return path.stat().st_size


def _row(target: str, name: str, params: int, size: int | None, m: dict[str, Any],
         runtime: str, io: str = "float32") -> dict[str, Any]:
    return {"target": target, "model": name, "params": params, "size_bytes": size,
            "io": io, "f1": m.get("f1"), "latency_us_p50": m.get("latency_us_p50"),
            "throughput_flows_s": m.get("throughput_flows_s"), "runtime": runtime}


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    """The rows as a markdown table."""
    def f(v: Any, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, int | float) else "-"

    out = [f"### {title}", "",
           "| target | model | params (manifest) | size (B) | I/O | F1 (test) "
           "| b1 p50 (µs) "
           "| b256 (flows/s) | runtime |",
           "|---|---|---:|---:|---|---:|---:|---:|---|"]
    for r in rows:
        out.append(
            f"| {r['target']} | {r['model']} | {f(r['params'], 'd')} | "
            f"{f(r['size_bytes'], 'd')} | {r['io']} | {f(r['f1'], '.4f')} | "
            f"{f(r['latency_us_p50'], '.1f')} | {f(r['throughput_flows_s'], ',.0f')} | "
            f"{r['runtime']} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point; writes the table (and a JSON next to it) and prints it."""
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifacts", required=True, type=Path)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = measure(args.artifacts, args.dataset, args.data_dir)
    if not rows:
        print(f"error: no artifacts under {args.artifacts}", file=sys.stderr)
        return 3
    text = markdown(rows, f"{args.dataset}: artifacts of {args.artifacts}")
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
