"""``python -m benchmarks run --quick`` end to end, and the report's building blocks.

The end-to-end run trains, compresses and times real models on the shared data, so
it is marked slow (about 5 minutes on 2 free cores, more on a loaded machine):
``pytest -m slow tests/test_benchmarks_quick.py``. The other tests check the
statistics, the Pareto frontier, the plots and the report on
small inputs made here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import plots, report_md
from benchmarks.report_timing import interleaved, ratio_stats, spread

REPO = Path(__file__).resolve().parent.parent
RECORD_FIELDS = (
    "model", "target", "dataset", "params", "size_bytes", "accuracy", "precision",
    "recall", "f1", "roc_auc", "fpr", "latency_us_p50", "latency_us_p99",
    "throughput_flows_s",
)


def _record(model, target, family, f1, size, p50, dataset="nsl-kdd"):
    return {
        "model": model, "target": target, "family": family, "dataset": dataset,
        "split": "test", "params": 100, "size_bytes": size, "accuracy": f1,
        "precision": f1, "recall": f1, "f1": f1, "roc_auc": 0.9, "fpr": 0.1,
        "latency_us_p50": p50, "latency_us_p50_range": [p50 * 0.9, p50 * 1.2],
        "latency_us_p99": p50 * 2, "throughput_flows_s": 1e5, "repeats": 3,
    }


def _results():
    return {
        "quick": True, "started": "2026-01-01T00:00:00Z", "wall_s": 60.0,
        "settings": {"datasets": ["nsl-kdd"], "repeats": 3},
        "records": [
            _record("teacher", "torch-fp32", "teacher", 0.80, 400_000, 900.0),
            _record("student-cnn16", "tflite-int8", "student", 0.79, 9_000, 20.0),
            _record("student-cnn16", "onnx-fp32", "student", 0.78, 30_000, 40.0),
            _record("rf", "sklearn", "baseline", 0.75, None, 3000.0),
        ],
        "candidates": {"nsl-kdd": [{"target": "onnx-int8", "student": "cnn-16",
                                    "prune": 0.5, "size_bytes": 5000,
                                    "test_f1": 0.7, "passed": False}]},
        "pipeline": {}, "steps": [{"step": "x", "status": "ok", "wall_s": 1.0}],
    }


def test_spread_and_ratios():
    assert spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert spread([]) == {"median": None, "min": None, "max": None}
    stats = ratio_stats([2.0, 4.0, 6.0], [1.0, 2.0, 0.0])
    assert stats == {"median": 2.0, "min": 2.0, "max": 2.0}


def test_interleaved_takes_turns_and_drops_a_broken_scorer():
    order = []

    def good(x):
        order.append("good")
        return np.zeros(len(x))

    def bad(x):
        raise RuntimeError("broken runtime")

    windows = np.zeros((8, 1, 3), np.float32)
    out = interleaved({"good": (good, windows), "bad": (bad, windows)},
                      repeats=2, n_single=5, n_batches=2)
    assert len(out["good"].p50) == 2 and out["bad"].p50 == []
    assert out["good"].all_samples().shape == (10,)
    assert out["good"].summary()["repeats"] == 2


def test_pareto_frontier():
    pts = [(1.0, 0.5), (2.0, 0.9), (3.0, 0.8), (0.5, 0.4), (2.0, 0.9)]
    front = plots.pareto(pts)
    assert [pts[i] for i in front][:3] == [(0.5, 0.4), (1.0, 0.5), (2.0, 0.9)]
    assert 2 not in front


def test_plots_and_report_from_results(tmp_path):
    results = _results()
    samples = {"nsl-kdd": {"teacher/torch-fp32": np.array([900.0, 950.0, 1000.0]),
                           "student-cnn16/tflite-int8": np.array([20.0, 22.0])}}
    made = plots.write_all(results, samples, tmp_path)
    assert set(made) == {"size_vs_f1", "latency_vs_f1", "latency_nsl-kdd"}
    for name in made.values():
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    results["plots"] = made
    text = report_md.render(results)
    assert "## Headline" in text and "size_vs_f1.png" in text
    assert "as published, not reproduced" in text and "92.3%" in text
    assert "Table 2" in text and "UNSW-NB15" in text


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.timeout(900)
def test_quick_run_writes_report_results_and_plots(tmp_path):
    data = os.environ.get("GATEWATCH_DATA") or str(REPO.parent / "shared" / "data")
    if not (Path(data) / "nsl-kdd" / "KDDTest+.txt").exists():
        pytest.skip(f"NSL-KDD is not in the data folder {data}")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--quick", "--out",
         str(tmp_path), "--name", "ci", "--work", str(tmp_path / "work"),
         "--data-dir", data],
        cwd=REPO, capture_output=True, text=True, timeout=880, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "ci"
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    assert "## Headline" in report

    # Every step ran, and every record carries the contract's fields.
    failed = [s for s in results["steps"] if s["status"] != "ok"]
    assert not failed, failed
    records = results["records"]
    for rec in records:
        assert all(key in rec for key in RECORD_FIELDS), rec
    combos = {(r["model"].split("-")[0], r["target"]) for r in records
              if r["dataset"] == "nsl-kdd-20"}
    for target in ("torch-fp32", "onnx-fp32"):
        assert ("teacher", target) in combos
    for target in ("onnx-fp32", "onnx-int8", "tflite-fp32", "tflite-int8"):
        assert ("student", target) in combos
    assert {"rf", "svm", "knn"} <= {r["model"] for r in records}

    # Timed models have repeated timings; the pipeline has its numbers; PNGs exist.
    timed = [r for r in records if r["family"] != "baseline"]
    assert all(r["repeats"] >= 2 and r["latency_us_p50"] > 0 for r in timed)
    pipe = results["pipeline"]
    assert pipe["meter"]["meter"]["packets_s"]["median"] > 0
    assert pipe["agent"]["flows_s"]["median"] > 0
    if "bench_agent" in pipe:
        trips = pipe["bench_agent"]["round_trip"]
        trips = trips if isinstance(trips, list) else [trips]
        assert all(t["verdicts"] > 0 for t in trips)
        assert pipe["agent_process"]["startup_to_online_s"]["median"] > 0
    else:
        assert pipe["broker"]["round_trip_ms"]["n"] > 0
    for name in results["plots"].values():
        assert (out / name).stat().st_size > 1000


def test_results_name_no_path_of_this_machine(monkeypatch, tmp_path):
    """Found: the committed results.json held the stages' absolute paths (their
    commands, artifacts, checkpoints and sources) under the repository and data."""
    from benchmarks.run import REPO, _dump

    data = tmp_path / "data"
    monkeypatch.setenv("GATEWATCH_DATA", str(data))
    results = {"agent": {"command": f"bench_agent.py --data-dir {data} "
                                    f"--artifact {REPO}/runs/b/a --work {REPO}",
                         "runs": [{"source": f"zeek:{data}/zeek-conn/c.log"}]},
               "n": 3}
    text = _dump(results)
    assert str(REPO) not in text and str(data) not in text
    assert json.loads(text) == {
        "agent": {"command": "bench_agent.py --data-dir $GATEWATCH_DATA "
                             "--artifact runs/b/a --work .",
                  "runs": [{"source": "zeek:$GATEWATCH_DATA/zeek-conn/c.log"}]},
        "n": 3}
