"""Edge agent speed: flows/s, decision latency, escalation round trip, peak RSS.

Four measurements, on real conn records (the shared CTU-50 normal conn.log, repeated
to ``--flows`` records):

1. **throughput**: ``Agent.run_file`` with the int8 student, pinned to one core, no
   broker (escalations go to the on-disk outbox, fsync included), plus the split into
   encode / window / score;
2. **decision latency**: a live source paced at ``--live-rate`` flows/s, from a
   flow's arrival to its decision (micro-batching with ``--max-wait-ms``), and the
   cost of a batch of one;
3. **round trip**: every flow escalated at ``--rate`` escalations/s for ``--seconds``
   through the embedded broker (mosquitto when on PATH) to a ``teacher serve``
   child process, from the escalation's creation to its verdict's arrival;
4. **peak RSS** of an ``edge-agent run`` child process on the conn.log (VmHWM).

The student is ``--artifact`` (default: the ``onnx-int8`` artifact of a ``runs/``
bench when present, else a tiny int8 ONNX model built here); the teacher is
``--checkpoint`` (default: the ctu-conn teacher of that run, else a small untrained
CNN-BiLSTM). Usage::

    nice -n 10 python benchmarks/bench_agent.py --out benchmarks/results/agent.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONN_LOG = "zeek-conn/ctu50-normal-40-day1.conn.log.labeled"
RUN = REPO / "runs" / "bench-dev-quick"
REPEATS = 3  # timings per throughput figure; the best (shortest) is reported


def pct(values, q: float) -> float:
    """Percentile in milliseconds."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q) * 1000.0)


def student(args, tmp: Path, conn_log: Path) -> Path:
    """The artifact to benchmark (built here when none is given or found)."""
    if args.artifact:
        return Path(args.artifact)
    found = RUN / "artifacts-ctu-conn" / "onnx-int8"
    if (found / "manifest.json").is_file():
        return found
    from tests.test_agent_fixtures import (
        fit_encoder,
        make_artifact,
        numpy_scores,
        quantile_thresholds,
        read_records,
    )

    enc = fit_encoder(conn_log)
    _, scores = numpy_scores(read_records(conn_log), enc)
    return make_artifact(tmp / "tiny-int8", enc, quantile_thresholds(scores), int8=True)


def teacher_checkpoint(args, tmp: Path, scorer) -> Path:
    """The teacher folder for ``teacher serve``."""
    if args.checkpoint:
        return Path(args.checkpoint)
    found = RUN / "teacher-ctu-conn"
    if (found / "model.safetensors").is_file():
        return found
    import torch

    from teacher.checkpoint import save_checkpoint
    from teacher.model import TeacherConfig, TeacherNet

    torch.manual_seed(0)
    enc = scorer.encoder
    net = TeacherNet(TeacherConfig(n_features=enc.n_features, window=enc.window))
    threshold = {"threshold": 0.5, "rule": "best-f1", "chosen_on": "val"}
    return save_checkpoint(tmp / "teacher", net, encoder=enc, threshold=threshold)


def conn_records(conn_log: Path, n: int) -> list[dict]:
    """``n`` records: the log repeated, each copy shifted in time (new flows)."""
    from edge_agent.sources import iter_conn

    base = list(iter_conn(conn_log))
    out: list[dict] = []
    copy = 0
    while len(out) < n:
        shift = copy * 86400.0
        for rec in base:
            out.append(dict(rec, ts=(rec["ts"] or 0.0) + shift))
        copy += 1
    return out[:n]


def calibrated(art: Path, conn_log: Path, tmp: Path, fpr: float) -> dict:
    """Site thresholds from ``edge-agent calibrate`` on the conn.log (kept in tmp)."""
    from edge_agent.cli import main as agent_main

    out = tmp / "site_thresholds.json"
    rc = agent_main(
        [
            "calibrate",
            "--artifact",
            str(art),
            "--source",
            f"zeek:{conn_log}",
            "--target-fpr",
            str(fpr),
            "--out",
            str(out),
        ]
    )
    if rc != 0:
        raise RuntimeError("edge-agent calibrate failed")
    return json.loads(out.read_text())


def bench_throughput(
    art: Path,
    records: list[dict],
    tmp: Path,
    batch: int,
    thresholds: dict | None = None,
) -> dict:
    """Flows/s of the whole agent path on one core, and its parts."""
    from edge_agent.agent import Agent
    from edge_agent.outbox import Outbox
    from edge_agent.runtime import load_artifact
    from flows.windows import StreamWindower, record_key

    tag = "site" if thresholds else "artifact"
    scorer = load_artifact(art, threads=1)

    def fresh_agent(name: str) -> Agent:
        return Agent(
            scorer,
            site="bench",
            gateway="g1",
            outbox=Outbox(tmp / f"{name}-{tag}.sqlite"),
            max_batch=batch,
            thresholds=thresholds,
        )

    fresh_agent("tp").run_file(records[:2000])  # warm-up (first ONNX runs, caches)

    # The whole path and its parts, each the best of REPEATS timings, so that the
    # parts and the whole are measured alike and can be compared.
    total = math.inf
    for i in range(REPEATS):
        agent = fresh_agent(f"tp{i}")
        t0 = time.perf_counter()
        agent.run_file(records)
        total = min(total, time.perf_counter() - t0)

    enc = scorer.encoder
    chunks = [records[i : i + batch] for i in range(0, len(records), batch)]
    t_enc = t_win = t_score = math.inf
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        encoded = [enc.transform_records(c) for c in chunks]
        t_enc = min(t_enc, time.perf_counter() - t0)
        windower = StreamWindower(enc.window, enc.n_features)
        t0 = time.perf_counter()
        windows = [
            windower.push_many([record_key(r, enc) for r in c], x)
            for c, x in zip(chunks, encoded, strict=True)
        ]
        t_win = min(t_win, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for w in windows:
            scorer.score(w)
        t_score = min(t_score, time.perf_counter() - t0)
    c = agent.counters
    return {
        "thresholds": tag,
        "escalate_low": agent.thresholds["escalate_low"],
        "flows": c.flows,
        "batch": batch,
        "seconds": round(total, 3),
        "repeats": REPEATS,
        "flows_per_s": round(c.flows / total),
        "escalations": c.escalate + c.alert,
        "encode_flows_per_s": round(len(records) / t_enc),
        "window_flows_per_s": round(len(records) / t_win),
        "score_flows_per_s": round(len(records) / t_score),
        "target": scorer.target,
        "model_version": scorer.model_version,
    }


def paced(records: list[dict], rate: float, seconds: float):
    """Yield records at ``rate`` per second for at most ``seconds``."""
    start = time.perf_counter()
    for i, rec in enumerate(records):
        due = start + i / rate
        if due - start > seconds:
            return
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        yield rec


def bench_latency(
    art: Path,
    records: list[dict],
    tmp: Path,
    rate: float,
    seconds: float,
    max_wait_ms: float,
    thresholds: dict | None = None,
) -> dict:
    """Arrival-to-decision latency of a live source, and a batch of one."""
    from edge_agent.agent import Agent
    from edge_agent.outbox import Outbox
    from edge_agent.runtime import load_artifact

    scorer = load_artifact(art, threads=1)
    agent = Agent(
        scorer,
        site="bench",
        gateway="g1",
        outbox=Outbox(tmp / "lat.sqlite"),
        max_wait_ms=max_wait_ms,
        thresholds=thresholds,
        track_latency=True,
    )
    agent.run_live(paced(records, rate, seconds))
    single = []
    for rec in records[:2000]:
        t0 = time.perf_counter()
        agent.process([rec])
        single.append(time.perf_counter() - t0)
    lat = list(agent.latencies)
    return {
        "rate_flows_per_s": rate,
        "flows": len(lat),
        "max_wait_ms": max_wait_ms,
        "decision_ms_p50": round(pct(lat, 50), 3),
        "decision_ms_p99": round(pct(lat, 99), 3),
        "batch_of_one_ms_p50": round(pct(single, 50), 3),
        "batch_of_one_ms_p99": round(pct(single, 99), 3),
    }


def bench_round_trip(
    art: Path, ckpt: Path, records: list[dict], tmp: Path, rate: float, seconds: float
) -> dict:
    """Escalation -> verdict through the embedded broker and ``teacher serve``."""
    from benchmarks.broker import EmbeddedBroker
    from edge_agent.agent import Agent
    from edge_agent.mqtt import MqttLink
    from edge_agent.outbox import Outbox
    from edge_agent.runtime import load_artifact

    # Escalate every flow and never alert: the largest alert threshold the agent
    # accepts lies just above a score of 1.0.
    never = float(np.nextafter(1.0, np.inf))
    everything = {"decision": 0.0, "escalate_low": 0.0, "alert": never}
    tmp.mkdir(parents=True, exist_ok=True)
    with EmbeddedBroker() as broker:
        serve_log = open(tmp / "serve.log", "w")
        serve = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "teacher"),
                "serve",
                "--checkpoint",
                str(ckpt),
                "--broker",
                broker.url,
                "--store",
                str(tmp / "store.sqlite"),
                "--stats-json",
                str(tmp / "serve.json"),
                "--max-batch",
                "64",
                "--max-wait-ms",
                "5",
            ],
            stdout=serve_log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 120
            while "serving" not in (tmp / "serve.log").read_text():
                if time.monotonic() > deadline or serve.poll() is not None:
                    raise RuntimeError((tmp / "serve.log").read_text()[-2000:])
                time.sleep(0.1)
            agent = Agent(
                load_artifact(art, threads=1),
                site="bench",
                gateway="g1",
                outbox=Outbox(tmp / "rt.sqlite"),
                link=MqttLink(broker.url, "bench-agent"),
                thresholds=everything,
                max_wait_ms=2,
                track_latency=True,
            )
            agent.start()
            t0 = time.perf_counter()
            agent.run_live(paced(records, rate, seconds))
            fed = time.perf_counter() - t0
            drained = agent.drain(60)
            rt = list(agent.round_trips)
            counters = agent.counters.as_dict()
            agent.close()
        finally:
            serve.terminate()
            serve.wait(30)
    stats = json.loads((tmp / "serve.json").read_text())
    return {
        "broker": broker.kind,
        "rate_target_per_s": rate,
        "rate_achieved_per_s": round(counters["escalations_queued"] / fed),
        "escalations": counters["escalations_queued"],
        "sent": counters["escalations_sent"],
        "verdicts": counters["verdicts_received"],
        "stored": stats["stored"],
        "drained": drained,
        "round_trip_ms_p50": round(pct(rt, 50), 2) if rt else None,
        "round_trip_ms_p99": round(pct(rt, 99), 2) if rt else None,
        "rescorer_batches": stats["batches"],
    }


def _peak_rss(cmd: list[str], stdin_text: str | None = None) -> tuple[int, int, str]:
    """Run ``cmd``; return (VmHWM in kB, exit code, last stderr line)."""
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE if stdin_text else None,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if stdin_text:
        import threading

        def feed() -> None:
            proc.stdin.write(stdin_text)
            proc.stdin.close()

        threading.Thread(target=feed, daemon=True).start()
    peak = 0
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    err = proc.stderr.read().strip().splitlines()
    return peak, proc.returncode, err[-1] if err else ""


def bench_rss(art: Path, conn_log: Path, tmp: Path, thresholds: dict) -> dict:
    """Peak RSS (VmHWM) of ``edge-agent run`` children on the whole conn.log.

    Two sources: ``zeek:`` (through ``flows.readers``, which imports pyarrow) and
    ``-`` (the same records as JSON lines on stdin, no pyarrow). A plain subscriber
    takes the escalations, so the broker routes them.
    """
    import paho.mqtt.client as paho

    from benchmarks.broker import EmbeddedBroker
    from edge_agent.sources import iter_conn

    site = tmp / "site_thresholds.json"
    site.write_text(json.dumps(thresholds))
    lines = "".join(json.dumps(r) + "\n" for r in iter_conn(conn_log))
    out = {}
    with EmbeddedBroker() as broker:
        sink = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id="rss-sink", protocol=paho.MQTTv5
        )
        sink.connect("127.0.0.1", broker.port)
        sink.loop_start()
        sink.subscribe("gatewatch/v1/+/+/escalations", qos=1)
        time.sleep(0.3)
        for name, source, text in (
            ("zeek", f"zeek:{conn_log}", None),
            ("stdin", "-", lines),
        ):
            cmd = [
                str(Path(sys.executable).parent / "edge-agent"),
                "run",
                "--artifact",
                str(art),
                "--source",
                source,
                "--broker",
                broker.url,
                "--site",
                "bench",
                "--gateway",
                f"rss-{name}",
                "--outbox",
                str(tmp / f"rss-{name}.db"),
                "--alerts",
                "",
                "--no-wait-verdicts", "--max-awaiting", "0",
                "--drain-timeout",
                "60",
                "--thresholds",
                str(site),
            ]
            peak, code, last = _peak_rss(cmd, text)
            out[name] = {
                "peak_rss_mb": round(peak / 1024, 1),
                "exit_code": code,
                "summary": last,
            }
        sink.loop_stop()
        sink.disconnect()
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the four measurements and print / write them."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--data-dir",
        default=os.environ.get("GATEWATCH_DATA", str(REPO.parent / "shared/data")),
    )
    p.add_argument("--artifact")
    p.add_argument("--checkpoint")
    p.add_argument("--flows", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--live-rate", type=float, default=2000.0)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument(
        "--rates",
        type=lambda t: [float(x) for x in t.split(",")],
        default=[1000.0, 250.0],
        help="escalations/s, comma-separated",
    )
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument(
        "--target-fpr",
        type=float,
        default=0.01,
        help="calibrate site thresholds to this benign escalation rate",
    )
    p.add_argument("--core", type=int, default=0, help="core to pin to (-1: none)")
    p.add_argument("--out")
    args = p.parse_args(argv)

    conn_log = Path(args.data_dir) / CONN_LOG
    if not conn_log.is_file():
        print(f"error: {conn_log} is absent (set GATEWATCH_DATA)", file=sys.stderr)
        return 3
    if args.core >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.core})
    results: dict = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as name:
        tmp = Path(name)
        art = student(args, tmp, conn_log)
        records = conn_records(conn_log, args.flows)
        results["artifact"] = str(art)
        site = calibrated(art, conn_log, tmp, args.target_fpr)
        results["site_thresholds"] = site
        as_built = bench_throughput(art, records, tmp, args.batch)
        results["throughput_artifact_thresholds"] = as_built
        print("throughput (artifact thresholds)", as_built, flush=True)
        results["throughput"] = bench_throughput(art, records, tmp, args.batch, site)
        print("throughput (site thresholds)", results["throughput"], flush=True)
        benign = [r for r in records if r.get("label") == 0]
        benign = (benign * (len(records) // max(1, len(benign)) + 1))[: len(records)]
        results["throughput_benign_flows"] = bench_throughput(
            art, benign, tmp, args.batch, site
        )
        print(
            "throughput (benign flows)", results["throughput_benign_flows"], flush=True
        )
        results["latency"] = bench_latency(
            art,
            records,
            tmp,
            args.live_rate,
            min(args.seconds, 3.0),
            args.max_wait_ms,
            site,
        )
        print("latency", results["latency"], flush=True)
        from edge_agent.runtime import load_artifact

        ckpt = teacher_checkpoint(args, tmp, load_artifact(art))
        results["checkpoint"] = str(ckpt)
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        results["round_trip"] = []
        for rate in args.rates:
            rt = bench_round_trip(
                art, ckpt, records, tmp / f"rt{rate:g}", rate, args.seconds
            )
            results["round_trip"].append(rt)
            print("round_trip", rt, flush=True)
        results["rss"] = bench_rss(art, conn_log, tmp, site)
        print("rss", results["rss"], flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
