"""``python -m benchmarks run``: every model, target and pipeline stage, in one run.

For each dataset the run trains a teacher (``teacher train``), evaluates it in
PyTorch and, exported, in onnxruntime; compresses it to every edge target with
:func:`compress.pipeline.run` (the engine of ``compress run``; the artifacts'
manifests carry the metrics measured in the target runtime) and to torch-int8 where
compress offers it; trains the RF, SVM and kNN baselines (``teacher baselines
--json``). Then it times every model at batch 1 and batch 256 on one thread, the
repeats of all models taking turns. The pipeline part measures the flow meter
against tshark, the agent, the escalation round trip through mosquitto and the
agent process. Everything lands in ``benchmarks/results/<name>/``: ``results.json``
(one record per model x target x dataset), ``report.md`` and PNG plots.

    python -m benchmarks run [--quick] [--out DIR] [--name NAME] [--data-dir DIR]

``--quick`` is the smoke test (NSL-KDD 20 % and the conn logs, one epoch, one
student width, few repeats; about 5 minutes on 2 free cores). Steps that fail are
recorded in the report with their error and the run goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report_timing import Timing, interleaved, ratio_stats

__all__ = ["Settings", "main", "run_benchmarks"]

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
EDGE_TARGETS = ("onnx-fp32", "onnx-int8", "tflite-fp32", "tflite-int8")
METRIC_KEYS = ("accuracy", "precision", "recall", "f1", "roc_auc", "fpr", "n",
               "threshold")
CTU50 = "zeek-conn/ctu50-normal-40-day1.conn.log.labeled"
VERSIONED = ("numpy", "pyarrow", "torch", "scikit-learn", "onnx", "onnxruntime",
             "tensorflow-cpu", "ai-edge-litert", "neural-compressor",
             "torch-pruning", "paho-mqtt", "matplotlib", "dpkt")


@dataclass
class Settings:
    """What one run measures and how hard it tries."""

    quick: bool = False
    # The command line that started the run, for the report's "Reproduce with".
    command: str = ""
    datasets: tuple[str, ...] = ("ctu-conn", "nsl-kdd", "unsw-nb15")
    targets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    teacher_epochs: int = 15
    teacher_minutes: float = 3.0
    samples_per_epoch: int | None = None
    student: str | None = None
    widths: tuple[int, ...] = (8, 16, 32)
    prune_ratios: tuple[float, ...] = (0.5,)
    distill_epochs: int = 5
    max_train_rows: int | None = 20_000
    max_f1_drop: float = 0.01
    fallback_f1_drop: float | None = 0.03
    student_overrides: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        # 20,000 rows x 5 epochs left every UNSW-NB15 student 4+ points short.
        "unsw-nb15": {"distill_epochs": 12, "max_train_rows": None,
                      "widths": (16, 32, 64)},
    })
    torch_int8: bool = True
    svm_cap: int = 10_000
    knn_cap: int = 20_000
    repeats: int = 5
    n_single: int = 300
    n_batches: int = 20
    meter_packets: int = 400_000
    agent_flows: int = 12_000
    paced_rate: float = 2000.0
    paced_seconds: float = 10.0
    rt_rate: float = 200.0
    rt_seconds: float = 10.0
    rtt_n: int = 200
    agent_runs: int = 5
    threads: int = 2
    budget_minutes: float = 50.0

    @classmethod
    def quick_settings(cls) -> Settings:
        """The smoke-test settings (small data, one width, few repeats)."""
        return cls(
            quick=True, datasets=("nsl-kdd-20", "ctu-conn"),
            targets={"ctu-conn": ("onnx-int8",)},
            teacher_epochs=1, teacher_minutes=1.0, samples_per_epoch=6000,
            student="cnn", widths=(16,), prune_ratios=(), distill_epochs=1,
            max_train_rows=6000, max_f1_drop=1.0, fallback_f1_drop=None,
            student_overrides={}, torch_int8=False,
            svm_cap=1500, knn_cap=4000, repeats=3, n_single=100, n_batches=5,
            meter_packets=20_000, agent_flows=1500, paced_rate=1000.0,
            paced_seconds=2.0, rt_rate=50.0, rt_seconds=2.0, rtt_n=20, agent_runs=1,
            budget_minutes=5.0,
        )

    def targets_for(self, dataset: str) -> tuple[str, ...]:
        """The edge targets compressed for ``dataset``."""
        return self.targets.get(dataset, EDGE_TARGETS)

    def teacher_args(self, dataset: str) -> list[str]:
        """Extra ``teacher train`` flags (a shorter epoch on the largest set)."""
        args = ["--epochs", str(self.teacher_epochs),
                "--max-minutes", str(self.teacher_minutes)]
        if self.samples_per_epoch:
            args += ["--samples-per-epoch", str(self.samples_per_epoch)]
        return args


class Run:
    """One benchmark run: settings, folders, the records and the step log."""

    def __init__(self, settings: Settings, out: Path, work: Path, data: Path) -> None:
        self.s = settings
        self.out = out
        self.work = work
        self.data = data
        self.started = time.monotonic()
        self.results: dict[str, Any] = {
            "schema": "gatewatch-bench/v1",
            "quick": settings.quick,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "settings": _jsonable(asdict(settings)),
            "records": [],
            "candidates": {},
            "pipeline": {},
            "datasets": {},
            "steps": [],
        }
        self.samples: dict[str, dict[str, np.ndarray]] = {}
        self.teachers: dict[str, Path] = {}
        self.artifacts: dict[str, dict[str, Path]] = {}

    # -- bookkeeping ----------------------------------------------------------------

    def say(self, msg: str) -> None:
        """One progress line with the minutes since the start."""
        print(f"[{(time.monotonic() - self.started) / 60:5.1f} min] {msg}", flush=True)

    @contextlib.contextmanager
    def step(self, name: str):
        """Run one step; its time and any error go to the step log, not up."""
        self.say(name)
        start = time.monotonic()
        entry: dict[str, Any] = {"step": name, "status": "ok"}
        try:
            yield entry
        except Exception as exc:  # noqa: BLE001 - a broken step must not end the run
            entry["status"] = "failed"
            entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
            print(f"  step failed: {entry['error']}", flush=True)
            traceback.print_exc(limit=4)
        entry["wall_s"] = round(time.monotonic() - start, 1)
        self.results["steps"].append(entry)

    def over_budget(self, share: float = 1.0) -> bool:
        """True once ``share`` of the run's time budget is spent."""
        spent = (time.monotonic() - self.started) / 60
        return spent > share * self.s.budget_minutes

    def skipped(self, name: str, why: str) -> None:
        """Log a step that was not run."""
        self.say(f"{name}: skipped ({why})")
        self.results["steps"].append({"step": name, "status": "skipped",
                                      "error": why, "wall_s": 0.0})

    def command(self, *args: str, log: str) -> None:
        """Run a gatewatch CLI as a child; its output goes to ``work/<log>``."""
        cmd = [str(BIN / args[0]), *args[1:]]
        env = dict(os.environ, GATEWATCH_DATA=str(self.data))
        with open(self.work / log, "wb") as handle:
            done = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT,
                                  env=env, check=False)
        if done.returncode != 0:
            tail = (self.work / log).read_text(errors="replace")[-600:]
            raise RuntimeError(f"{' '.join(args[:2])} exited {done.returncode}: {tail}")

    def add(self, record: dict[str, Any]) -> None:
        """Append one model x target x dataset record."""
        self.results["records"].append(_jsonable(record))

    # -- per dataset ----------------------------------------------------------------

    def dataset(self, name: str) -> None:
        """Teacher, students, baselines and timing for one dataset."""
        s = self.s
        if self.over_budget(0.85):
            self.skipped(f"{name}: every step", "time budget spent")
            return
        teacher_dir = self.work / f"teacher-{name}"
        with self.step(f"{name}: teacher train") as entry:
            # --force: a run again in the same --work folder (or --merge)
            # replaces the teacher the last one trained there.
            args = ["teacher", "train", "--dataset", name, "--out", str(teacher_dir),
                    *s.teacher_args(name), "--threads", str(s.threads), "-q",
                    "--data-dir", str(self.data), "--force"]
            self.command(*args, log=f"train-{name}.log")
            self.teachers[name] = teacher_dir
            entry["checkpoint"] = str(teacher_dir)
        if name not in self.teachers:
            return

        scorers: dict[str, tuple[Any, np.ndarray]] = {}
        pending: dict[str, dict[str, Any]] = {}
        with self.step(f"{name}: teacher in torch and onnxruntime"):
            self._teacher_records(name, teacher_dir, scorers, pending)
        with self.step(f"{name}: compress to {', '.join(s.targets_for(name))}"):
            self._students(name, teacher_dir, scorers, pending)
        if s.torch_int8 and importlib.util.find_spec("compress.inc") is not None:
            if self.over_budget(0.6):
                self.skipped(f"{name}: torch-int8", "time budget")
            else:
                with self.step(f"{name}: compress torch-int8 (Neural Compressor)"):
                    self._torch_int8(name, teacher_dir, scorers, pending)
        with self.step(f"{name}: timing {len(scorers)} models, {s.repeats} repeats"):
            self._time(name, scorers, pending)
        with self.step(f"{name}: baselines rf, svm, knn"):
            self._baselines(name)

    def _prepared(self, name: str, teacher: Any) -> Any:
        from teacher.data import prepare

        seed = int((teacher.provenance or {}).get("seed") or 0)
        return prepare(name, encoder=teacher.encoder, data_dir=self.data, seed=seed,
                       need_split=True)

    def _teacher_records(self, name, teacher_dir, scorers, pending) -> None:
        import onnxruntime as ort
        import torch

        from compress.export import export_onnx
        from teacher.checkpoint import load_teacher
        from teacher.metrics import binary_metrics

        torch.set_num_threads(self.s.threads)
        teacher = load_teacher(teacher_dir, device="cpu")
        prep = self._prepared(name, teacher)
        test = prep.rows("test")
        windows = prep.windows(test)
        y = prep.y[test]
        fams = prep.families[test] if prep.families is not None else None
        self.results["datasets"][name] = {
            "rows": {k: int(len(prep.rows(k))) for k in ("train", "val", "test")},
            "window": prep.window, "n_features": prep.n_features,
            "test_positive_share": float(np.mean(y)),
            "teacher_config": teacher.config.to_dict(),
            "teacher_git_commit": (teacher.provenance or {}).get("git_commit"),
            "teacher_epochs_run": (teacher.provenance or {}).get("epochs_run"),
        }
        self._test_windows = windows
        params = int(sum(p.numel() for p in teacher.model.parameters()))
        base = {"model": "teacher", "family": "teacher", "dataset": name,
                "split": "test", "params": params,
                "threshold_rule": teacher.threshold_info.get("rule")}

        # PyTorch fp32.
        prob = teacher.predict_proba(windows)
        metrics = binary_metrics(y, prob, teacher.threshold, fams)
        pending["teacher/torch-fp32"] = {
            **base, "target": "torch-fp32", "runtime": f"torch {torch.__version__}",
            "size_bytes": (teacher_dir / "model.safetensors").stat().st_size,
            "metrics_source": "this run (torch, teacher threshold from val)",
            **_pick(metrics),
        }
        scorers["teacher/torch-fp32"] = (teacher.predict_proba, windows[:512])

        # ONNX fp32 of the same network, in onnxruntime on one thread.
        path = self.work / f"teacher-{name}.onnx"
        export_onnx(teacher.model, path, prep.window, prep.n_features)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(path), opts,
                                    providers=["CPUExecutionProvider"])

        def onnx_score(x: np.ndarray) -> np.ndarray:
            return sess.run(None, {"x": np.ascontiguousarray(x, np.float32)})[0][:, 0]

        prob = np.concatenate([onnx_score(windows[i : i + 4096])
                               for i in range(0, len(windows), 4096)])
        metrics = binary_metrics(y, prob, teacher.threshold, fams)
        pending["teacher/onnx-fp32"] = {
            **base, "target": "onnx-fp32", "runtime": f"onnxruntime {ort.__version__}",
            "size_bytes": path.stat().st_size,
            "metrics_source": "this run (onnxruntime, teacher threshold from val)",
            **_pick(metrics),
        }
        scorers["teacher/onnx-fp32"] = (onnx_score, windows[:512])

    def _students(self, name, teacher_dir, scorers, pending) -> None:
        import torch

        import compress.pipeline as pipeline
        from edge_agent.runtime import load_artifact
        from flows.errors import GateError
        from student.distill import DistillConfig

        s = self.s
        torch.set_num_threads(s.threads)
        out = self.work / f"artifacts-{name}"
        over = s.student_overrides.get(name, {})

        def attempt(max_drop: float):
            cfg = pipeline.RunConfig(
                target="all", teacher=teacher_dir, out=out, student=s.student,
                max_f1_drop=max_drop, data_dir=self.data,
                widths=tuple(over.get("widths", s.widths)),
                prune_ratios=s.prune_ratios,
                distill=DistillConfig(
                    epochs=over.get("distill_epochs", s.distill_epochs),
                    max_train_rows=over.get("max_train_rows", s.max_train_rows)),
                time_latency=False, argv=["python", "-m", "benchmarks", "run"],
            )
            # TODO(gap): RunConfig takes one target or "all"; the target list is set
            # through the module's TARGETS so every target shares one distillation.
            saved = pipeline.TARGETS
            pipeline.TARGETS = tuple(s.targets_for(name))
            try:
                return pipeline.run(
                    cfg, progress=lambda m: self.say(f"  compress: {m}"))
            finally:
                pipeline.TARGETS = saved

        gate = {"max_f1_drop": s.max_f1_drop, "relaxed": False}
        try:
            result = attempt(s.max_f1_drop)
        except GateError as exc:
            if not s.fallback_f1_drop or s.fallback_f1_drop <= s.max_f1_drop:
                raise
            first = str(exc).splitlines()[0]
            self.say(f"  no student passed at {s.max_f1_drop}; retrying the search "
                     f"with --max-f1-drop {s.fallback_f1_drop}")
            gate = {"max_f1_drop": s.fallback_f1_drop, "relaxed": True,
                    "first_attempt": first[:300]}
            result = attempt(s.fallback_f1_drop)
        self.results.setdefault("compress_gate", {})[name] = gate
        self.results["candidates"][name] = _jsonable(
            [c.row() for c in result.frontier])
        if result.failed:
            self.results.setdefault("compress_failed", {})[name] = result.failed
        self.artifacts[name] = dict(result.artifacts)
        for folder in result.artifacts.values():
            manifest = json.loads((Path(folder) / "manifest.json").read_text())
            key, record = _artifact_record(name, manifest)
            pending[key] = record
            scorer = load_artifact(folder)
            scorers[key] = (scorer.score, self._test_windows[:512])

    def _torch_int8(self, name, teacher_dir, scorers, pending) -> None:
        import compress.pipeline as pipeline
        from student.distill import DistillConfig

        out = self.work / f"artifacts-{name}-torch-int8"
        cfg = pipeline.RunConfig(
            target="torch-int8", teacher=teacher_dir, out=out, data_dir=self.data,
            max_f1_drop=self.s.max_f1_drop, distill=DistillConfig(),
            time_latency=True, argv=["python", "-m", "benchmarks", "run"],
        )
        result = pipeline.run(cfg, progress=lambda m: self.say(f"  compress: {m}"))
        if "torch-int8" not in result.artifacts:
            raise RuntimeError(f"torch-int8 not made: {result.failed}")
        folder = Path(result.artifacts["torch-int8"])
        manifest = json.loads((folder / "manifest.json").read_text())
        test = manifest.get("metrics", {}).get("test", {})
        key = "teacher/torch-int8"
        pending[key] = {
            "model": "teacher", "family": "teacher", "dataset": name,
            "split": "test", "target": "torch-int8",
            "runtime": manifest.get("metrics", {}).get("runtime"),
            "params": manifest.get("params"), "size_bytes": manifest.get("size_bytes"),
            "metrics_source": "manifest (compress, measured in torch PT2E int8)",
            **_pick(test),
            "manifest_timing": {k: test.get(k) for k in (
                "latency_us_p50", "latency_us_p99", "throughput_flows_s")},
        }
        # Same-call ratio against the float teacher that compress timed with it.
        fp32 = manifest.get("teacher_metrics", {}).get("test", {})
        if fp32.get("latency_us_p50") and test.get("latency_us_p50"):
            pending[key]["latency_p50_vs_fp32_in_compress"] = (
                test["latency_us_p50"] / fp32["latency_us_p50"])
        try:
            import torch

            from compress.inc import load_program

            program = load_program(folder / "model.pt2")

            def score(x: np.ndarray) -> np.ndarray:
                with torch.no_grad():
                    return program(torch.from_numpy(np.asarray(x, np.float32))).numpy()

            score(self._test_windows[:1])
            score(self._test_windows[:256])
            scorers[key] = (score, self._test_windows[:512])
        except Exception as exc:  # noqa: BLE001 - fall back to the manifest's timing
            pending[key]["notes"] = (
                f"model.pt2 does not run at batch 1 and 256 here "
                f"({str(exc).splitlines()[0][:80]}); timing from the manifest "
                "(compress, one repeat)")
            pending[key].update(pending[key]["manifest_timing"])
            pending[key]["repeats"] = 1
            pending[key]["timing_source"] = "manifest (compress, one repeat)"

    def _time(self, name, scorers, pending) -> None:
        from teacher.evaluate import one_thread

        s = self.s

        def wrap(_key: str):
            return one_thread()

        timings = interleaved(scorers, s.repeats, s.n_single, s.n_batches, wrap=wrap)
        ref: Timing | None = timings.get("teacher/torch-fp32")
        ref_size = pending.get("teacher/torch-fp32", {}).get("size_bytes")
        self.samples[name] = {}
        for key, record in pending.items():
            timing = timings.get(key)
            if timing is not None and timing.p50:
                record.update(timing.summary())
                record["timing_source"] = "this run, repeats interleaved, 1 thread"
                self.samples[name][key] = timing.all_samples()
                if ref is not None and ref.p50:
                    record["latency_p50_vs_teacher"] = ratio_stats(timing.p50, ref.p50)
                    record["throughput_vs_teacher"] = ratio_stats(
                        timing.throughput, ref.throughput)
            if ref_size and record.get("size_bytes"):
                record["size_vs_teacher"] = record["size_bytes"] / ref_size
            self.add(record)

    def _baselines(self, name: str) -> None:
        s = self.s
        path = self.work / f"baselines-{name}.json"
        # --force: a run again in the same --work folder replaces the last results.
        self.command(
            "teacher", "baselines", "--dataset", name, "--json", "--out", str(path),
            "--force", "--svm-cap", str(s.svm_cap), "--knn-cap", str(s.knn_cap),
            "--threads", "1", "-q", "--data-dir", str(self.data),
            log=f"baselines-{name}.log",
        )
        data = json.loads(path.read_text())
        for model, metrics in data.get("baselines", {}).items():
            self.add({
                "model": model, "family": "baseline", "dataset": name,
                "split": "test", "target": "sklearn", "runtime": "scikit-learn",
                "params": None, "size_bytes": metrics.get("size_bytes"),
                "structure": metrics.get("structure"),
                "metrics_source": "teacher baselines --json",
                "timing_source": "teacher baselines --json (one repeat)",
                "repeats": 1 if "latency_us_p50" in metrics else 0,
                "train_rows": metrics.get("train_rows"), "cap": metrics.get("cap"),
                "fit_s": metrics.get("fit_s"),
                **_pick(metrics),
                **{k: metrics.get(k) for k in ("latency_us_p50", "latency_us_p99",
                                               "throughput_flows_s")},
                "notes": "size: the pickled scikit-learn model; no parameter "
                "count (see structure: trees and nodes, support vectors or rows)",
            })

    # -- pipeline -------------------------------------------------------------------

    def pipeline(self) -> None:
        """Meter vs tshark, the agent, the round trip and the agent process."""
        from benchmarks import report_pipeline as rp

        s = self.s
        pipe = self.results["pipeline"]
        with self.step("pipeline: flow meter vs tshark"):
            pipe["meter"] = rp.meter_vs_tshark(self.data, s.meter_packets,
                                               min(3, s.repeats))
        artifact = self._agent_artifact()
        teacher = self.teachers.get("ctu-conn")
        conn_log = self.data / CTU50
        if artifact is None or teacher is None:
            pipe["agent_note"] = "no conn-family teacher and artifact; agent skipped"
            return
        with self.step("pipeline: bench_agent.py (latency, round trip, RSS)"):
            try:
                pipe["bench_agent"] = rp.bench_agent_cli(
                    artifact, teacher, self.data, self.work / "agent",
                    flows=s.agent_flows, live_rate=s.paced_rate,
                    seconds=s.rt_seconds, rates=(s.rt_rate,),
                )
            finally:
                if "bench_agent" not in pipe:
                    pipe["broker"] = rp.round_trip(
                        teacher, artifact, conn_log, s.rtt_n, self.work / "broker",
                        s.agent_runs,
                    )
        with self.step("pipeline: agent flows/s, repeated"):
            pipe["agent"] = rp.agent_throughput(
                artifact, conn_log, 1, max(2, s.repeats // 2), s.paced_rate,
                s.paced_seconds, limit=s.agent_flows,
            )
        if "broker" not in pipe:
            with self.step("pipeline: edge-agent run start-up and peak RSS"):
                from benchmarks.broker import EmbeddedBroker

                with EmbeddedBroker() as broker:
                    pipe["agent_process"] = rp.agent_process(
                        artifact, conn_log, broker.url, s.agent_runs,
                        self.work / "agent",
                    )

    def _agent_artifact(self) -> Path | None:
        arts = self.artifacts.get("ctu-conn", {})
        for target in ("tflite-int8", "onnx-int8", "onnx-fp32", "tflite-fp32"):
            if target in arts:
                return Path(arts[target])
        return None


# ------------------------------------------------------------------ helpers


def _pick(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {k: metrics.get(k) for k in METRIC_KEYS}
    if "confusion" in metrics:
        out["confusion"] = metrics["confusion"]
    return out


def _artifact_record(dataset: str, manifest: dict[str, Any]) -> tuple[str, dict]:
    """The record of one compress artifact, from its manifest."""
    student = manifest.get("student", {})
    ratio = float(student.get("prune_ratio") or 0.0)
    model = f"student-{student.get('kind')}{student.get('width')}"
    if ratio:
        model += f"-pruned{int(round(ratio * 100))}"
    target = manifest["target"]
    test = manifest.get("metrics", {}).get("test", {})
    record = {
        "model": model, "family": "student", "dataset": dataset, "split": "test",
        "target": target, "runtime": manifest.get("metrics", {}).get("runtime"),
        "params": manifest.get("params"), "size_bytes": manifest.get("size_bytes"),
        "prune_ratio": ratio, "model_version": manifest.get("model_version"),
        "input_dtype": manifest.get("input", {}).get("dtype"),
        "metrics_source": "artifact manifest (measured in the target runtime)",
        "gate": manifest.get("gate"),
        "agreement": {k: manifest.get("agreement", {}).get(k) for k in (
            "decision_agreement", "max_abs_prob_diff")},
        **_pick(test),
    }
    return f"{model}/{target}", record


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


def machine() -> dict[str, Any]:
    """CPU, cores, memory, load and OS of this machine."""
    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "machine": platform.machine(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_gib"] = round(int(line.split()[1]) / 2**20, 1)
    with contextlib.suppress(OSError):
        info["load_avg_start"] = list(os.getloadavg())
    return info


def versions() -> dict[str, str]:
    """Installed versions of the libraries that shape the numbers."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    for tool, args in (("tshark", ["--version"]), ("mosquitto", ["-h"])):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run([tool, *args], capture_output=True, text=True,
                                  timeout=10, check=False)
            first = (done.stdout or done.stderr).splitlines()[:1]
            if first:
                out[tool] = first[0].strip()
    return out


def git_commit() -> str | None:
    """The repository's HEAD commit, if git answers."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10,
                              check=False)
        return done.stdout.strip() or None
    return None


def run_benchmarks(settings: Settings, out: Path, work: Path, data: Path) -> Path:
    """Run everything, write results.json, report.md and the plots; return ``out``."""
    from benchmarks import plots, report_md

    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    run = Run(settings, out, work, data)
    run.results.update(machine=machine(), versions=versions(), git_commit=git_commit())
    for name in settings.datasets:
        run.dataset(name)
        if name == "ctu-conn":
            run.pipeline()
    if "ctu-conn" not in settings.datasets:
        run.pipeline()

    with contextlib.suppress(OSError):
        run.results["machine"]["load_avg_end"] = list(os.getloadavg())
    run.results["wall_s"] = round(time.monotonic() - run.started, 1)
    _save_samples(run.samples, work / "samples.npz")
    with run.step("plots"):
        run.results["plots"] = plots.write_all(run.results, run.samples, out)
    (out / "results.json").write_text(_dump(run.results))
    with run.step("report"):
        (out / "report.md").write_text(report_md.render(run.results))
        (out / "headline.md").write_text(report_md.headline(
            run.results, prefix=_rel_prefix(out)))
    (out / "results.json").write_text(_dump(run.results))
    run.say(f"done in {run.results['wall_s'] / 60:.1f} min; report in {out}")
    return out


def _save_samples(samples: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    """The raw batch-1 latency samples, kept out of the committed results."""
    flat = {f"{ds}|{key}": arr for ds, per in samples.items()
            for key, arr in per.items()}
    if flat:
        np.savez_compressed(path, **flat)


def _load_samples(path: Path) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    if path.exists():
        with np.load(path) as data:
            for name in data.files:
                ds, key = name.split("|", 1)
                out.setdefault(ds, {})[key] = data[name]
    return out


def pipeline_again(settings: Settings, out: Path, work: Path, data: Path) -> Path:
    """Re-measure only the pipeline of a finished run, then redraw its report."""
    path = out / "results.json"
    results = json.loads(path.read_text())
    run = Run(settings, out, work, data)
    teacher = work / "teacher-ctu-conn"
    if teacher.is_dir():
        run.teachers["ctu-conn"] = teacher
    arts = work / "artifacts-ctu-conn"
    run.artifacts["ctu-conn"] = {p.name: p for p in arts.glob("*")
                                 if (p / "manifest.json").exists()}
    run.pipeline()
    results["pipeline"] = run.results["pipeline"]
    results["steps"] = [e for e in results.get("steps", [])
                        if not e["step"].startswith("pipeline")] + run.results["steps"]
    results["pipeline_measured"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path.write_text(_dump(results))
    return rerender(out, work)


def merge_datasets(settings: Settings, out: Path, work: Path, data: Path) -> Path:
    """Measure ``settings.datasets`` again and put them into a finished run."""
    path = out / "results.json"
    results = json.loads(path.read_text())
    run = Run(settings, out, work, data)
    for name in settings.datasets:
        run.dataset(name)
    names = set(settings.datasets)
    results["records"] = [r for r in results["records"] if r["dataset"] not in names]
    results["records"] += run.results["records"]
    for key in ("candidates", "datasets", "compress_gate", "compress_failed"):
        part = {k: v for k, v in results.get(key, {}).items() if k not in names}
        part.update(run.results.get(key, {}))
        results[key] = part
    results["steps"] = [e for e in results.get("steps", [])
                        if e["step"].split(":")[0] not in names] + run.results["steps"]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results.setdefault("merged", []).append(
        {"datasets": sorted(names), "at": stamp, "git_commit": git_commit(),
         "wall_s": round(time.monotonic() - run.started, 1)})
    samples = _load_samples(work / "samples.npz")
    samples.update(run.samples)
    _save_samples(samples, work / "samples.npz")
    path.write_text(_dump(results))
    return rerender(out, work)


def rerender(out: Path, work: Path) -> Path:
    """Rewrite the plots and report.md of a finished run from its results.json.

    Latency distributions need the raw samples in ``work/samples.npz``; without
    them the existing distribution figures are kept.
    """
    from benchmarks import plots, report_md

    results = json.loads((out / "results.json").read_text())
    made = plots.write_all(results, _load_samples(work / "samples.npz"), out)
    kept = {k: v for k, v in results.get("plots", {}).items()
            if k.startswith("latency_") and k not in made and (out / v).exists()}
    results["plots"] = {**made, **kept}
    (out / "report.md").write_text(report_md.render(results))
    (out / "headline.md").write_text(report_md.headline(results,
                                                        prefix=_rel_prefix(out)))
    (out / "results.json").write_text(_dump(results))
    return out


def _rel_prefix(out: Path) -> str:
    """The run folder as seen from the repository root (for README links)."""
    try:
        return str(out.resolve().relative_to(REPO)) + "/"
    except ValueError:
        return ""


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m benchmarks run``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks run",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small data, one epoch, one width (smoke test)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                        help="results folder; the run goes to OUT/NAME")
    parser.add_argument("--name", help="run name (default: quick or full)")
    parser.add_argument("--data-dir", help="data folder (default: $GATEWATCH_DATA)")
    parser.add_argument("--work", type=Path,
                        help="scratch folder for checkpoints and artifacts "
                             "(default: runs/bench-NAME, not committed)")
    parser.add_argument("--datasets", help="comma-separated datasets to run")
    parser.add_argument("--repeats", type=int, help="timing repeats")
    parser.add_argument("--pipeline-only", action="store_true",
                        help="measure the pipeline again for the run in OUT/NAME "
                             "(its work folder's ctu-conn teacher and artifacts), "
                             "then redraw")
    parser.add_argument("--merge", action="store_true",
                        help="measure only --datasets (no pipeline) and merge them "
                             "into the finished run in OUT/NAME, replacing what it "
                             "had for them")
    parser.add_argument("--report-only", action="store_true",
                        help="only redraw the plots and report.md of OUT/NAME")
    return parser


def _dump(results: dict) -> str:
    """results.json's text, with no path of this machine in it: every string that
    names a file under the data folder says ``$GATEWATCH_DATA/...``, and one under
    the repository the path relative to it (the stages record their commands,
    artifacts and checkpoints by absolute path)."""
    # (the folder, what it becomes alone, what a path below it starts with)
    roots = []
    given = os.environ.get("GATEWATCH_DATA")
    if given:
        roots.append((str(Path(given).resolve()), "$GATEWATCH_DATA",
                      "$GATEWATCH_DATA/"))
    roots.append((str(REPO), ".", ""))
    patterns = [(re.compile(re.escape(root) + r"(/|(?=[\s'\"]|$))"), alone, below)
                for root, alone, below in roots]

    def scrub(value):
        if isinstance(value, str):
            for pattern, alone, below in patterns:
                value = pattern.sub(
                    lambda m, a=alone, b=below: b if m.group(1) else a, value)
            return value
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        return value

    return json.dumps(scrub(results), indent=1) + "\n"


def _portable(words: list[str]) -> list[str]:
    """The command line's words as the report may show them: an absolute path
    (``--out /tmp/x``) written relative to the working folder when it lies
    inside it, else as ``PATH``, so that no path of this machine is committed
    with the results."""
    out = []
    for word in words:
        if os.path.isabs(word):
            rel = os.path.relpath(word)
            word = rel if not rel.startswith("..") else "PATH"
        out.append(word)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    from flows.datasets import data_dir
    from flows.errors import EXIT_INTERRUPTED, GatewatchError

    words = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(words)
    settings = Settings.quick_settings() if args.quick else Settings()
    settings.command = shlex.join(
        ["python", "-m", "benchmarks", "run", *_portable(words)]
    )
    if args.datasets:
        settings.datasets = tuple(d.strip() for d in args.datasets.split(",") if d)
    if args.repeats:
        settings.repeats = max(1, args.repeats)
    name = args.name or ("quick" if args.quick else "full")
    try:
        out = Path(args.out) / name
        work = args.work or REPO / "runs" / f"bench-{name}"
        if args.report_only:
            rerender(out.resolve(), Path(work).resolve())
            return 0
        data = data_dir(args.data_dir)
        if args.pipeline_only:
            pipeline_again(settings, out.resolve(), Path(work).resolve(), data)
            return 0
        if args.merge:
            merge_datasets(settings, out.resolve(), Path(work).resolve(), data)
            return 0
        run_benchmarks(settings, out.resolve(), Path(work).resolve(), data)
    except GatewatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
