"""Pipeline measurements: flow meter vs tshark, the agent, the MQTT round trip.

* **Meter**: :mod:`benchmarks.bench_meter` builds one large capture from the shared
  pcaps; its meter child (one core) and tshark read it in turn, ``repeats`` times,
  and NFStream once where it imports.
* **Agent**: ``benchmarks/bench_agent.py`` (run as a child) measures flows/s with
  its split into encode / window / score, the decision latency of a paced live
  source, the escalation -> verdict round trip through mosquitto and ``teacher
  serve``, and peak RSS. Here, with the product's API, the agent's flows/s is
  repeated (median and spread) on the log as it is and on its benign flows, and
  :func:`round_trip` is the fallback when bench_agent.py cannot run.
* **Agent process**: ``edge-agent run`` as a child process: time from start to its
  retained "online" status on the broker, and its peak RSS (``wait4``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report_timing import ratio_stats, spread

__all__ = [
    "bench_agent_cli",
    "agent_process",
    "agent_throughput",
    "meter_vs_tshark",
    "round_trip",
]

BIN = Path(sys.executable).parent


def _pct(values: Any, q: float) -> float | None:
    arr = np.asarray(list(values), dtype=np.float64)
    return float(np.percentile(arr, q)) if arr.size else None


# ------------------------------------------------------------------ meter


def meter_vs_tshark(data_dir: Path, packets: int, repeats: int) -> dict[str, Any]:
    """Packets/s of the flow meter and of tshark on one capture, repeats in turn."""
    from benchmarks import bench_meter as bm

    sources = bm.shared_captures(data_dir)
    with tempfile.TemporaryDirectory(prefix="gw-bench-") as tmp:
        path = Path(tmp) / "big.pcap"
        built = bm.build_capture(sources, path, packets)
        n = built["packets"]
        out: dict[str, Any] = {
            "capture": {k: built[k] for k in ("packets", "repetitions", "bytes",
                                              "sources")},
            "via": "benchmarks.bench_meter (run_meter, run_tshark, run_nfstream)",
        }
        runs: dict[str, list[dict]] = {"meter": [], "tshark": []}
        for _ in range(repeats):
            runs["meter"].append(bm.run_meter(path))
            tshark = bm.run_tshark(path)
            if tshark is not None:
                runs["tshark"].append(tshark)
        nfstream = bm.run_nfstream(path, os.environ.get("NFSTREAM_PYTHON"))

    for tool, results in runs.items():
        if not results:
            out[tool] = None
            continue
        out[tool] = {
            "packets_s": spread([n / r["wall_s"] for r in results]),
            "packets_per_cpu_s": spread([n / r["cpu_s"] for r in results]),
            "flows": results[-1].get("flows"),
            "peak_rss_mib": spread([r["peak_rss_bytes"] / 2**20 for r in results]),
            "note": results[-1].get("note"),
        }
    if runs["tshark"]:
        meter_pps = [n / r["wall_s"] for r in runs["meter"]]
        tshark_pps = [n / r["wall_s"] for r in runs["tshark"]]
        out["meter_over_tshark"] = ratio_stats(meter_pps, tshark_pps)
        out["meter_over_tshark_cpu"] = ratio_stats(
            [n / r["cpu_s"] for r in runs["meter"]],
            [n / r["cpu_s"] for r in runs["tshark"]])
    if isinstance(nfstream, dict):
        out["nfstream"] = {"packets_s": spread([n / nfstream["wall_s"]]),
                           "flows": nfstream.get("flows")}
        out["meter_over_nfstream"] = ratio_stats(
            [n / runs["meter"][-1]["wall_s"]], [n / nfstream["wall_s"]])
    else:
        out["nfstream_note"] = str(nfstream)[:200]
    return out


# ------------------------------------------------------------------ agent


def _records(
    conn_log: Path, copies: int, limit: int | None = None
) -> list[dict[str, Any]]:
    from flows.readers import iter_records

    base = list(iter_records(conn_log))[:limit]
    return [dict(r) for _ in range(copies) for r in base]


def _run_agent(artifact: Path, records: list[dict], folder: Path, name: str) -> Any:
    """One agent without a broker over ``records``; returns (flows/s, agent)."""
    from edge_agent.agent import Agent
    from edge_agent.outbox import Outbox
    from edge_agent.runtime import load_artifact

    scorer = load_artifact(artifact)
    outbox = Outbox(folder / f"{name}.sqlite", max_messages=10_000_000)
    agent = Agent(scorer, site="bench", gateway=name, outbox=outbox)
    start = time.perf_counter()
    agent.run_file(iter(records))
    rate = len(records) / (time.perf_counter() - start)
    outbox.close()
    return rate, agent


def agent_throughput(
    artifact: Path,
    conn_log: Path,
    copies: int,
    repeats: int,
    paced_rate: float,
    paced_seconds: float,
    limit: int | None = None,
) -> dict[str, Any]:
    """Agent flows/s on pre-read records, and decision latency when paced.

    Flows/s is measured on the log as it is (mostly attacks: most flows escalate or
    alert, and each one is stored in the outbox) and on its benign flows only (the
    scoring path alone). The paced run feeds benign flows at ``paced_rate``.
    """
    from edge_agent.agent import Agent
    from edge_agent.outbox import Outbox
    from edge_agent.runtime import load_artifact

    records = _records(conn_log, copies, limit)
    benign = [r for r in records if r.get("label") == 0]
    out: dict[str, Any] = {"artifact": str(artifact), "input": conn_log.name,
                           "flows": len(records), "benign_flows": len(benign)}
    rates: list[float] = []
    benign_rates: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for r in range(repeats):
            rate, agent = _run_agent(artifact, records, folder, f"all{r}")
            rates.append(rate)
            if benign:
                benign_rates.append(_run_agent(artifact, benign, folder, f"b{r}")[0])
        counters = agent.counters.as_dict()
        out["flows_s"] = spread(rates)
        out["benign_flows_s"] = spread(benign_rates)
        out["decisions"] = {k: counters[k] for k in ("benign", "escalate", "alert")}

        # Paced arrivals: how long a flow waits for its decision.
        feed = benign or records
        scorer = load_artifact(artifact)
        outbox = Outbox(folder / "paced.sqlite", max_messages=10_000_000)
        agent = Agent(scorer, site="bench", gateway="paced", outbox=outbox,
                      track_latency=True)
        n = int(paced_rate * paced_seconds)

        def paced():
            t0 = time.perf_counter()
            for i in range(n):
                delay = t0 + i / paced_rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                yield feed[i % len(feed)]

        agent.run_live(paced())
        lat = [v * 1e3 for v in agent.latencies]
        outbox.close()
    out["paced"] = {
        "rate_flows_s": paced_rate,
        "flows": len(lat),
        "input": "benign flows" if benign else "all flows",
        "max_batch": agent.max_batch,
        "max_wait_ms": agent.max_wait * 1e3,
        "decision_ms_p50": _pct(lat, 50),
        "decision_ms_p99": _pct(lat, 99),
        "decision_ms_max": max(lat) if lat else None,
    }
    return out


def bench_agent_cli(
    artifact: Path, teacher: Path, data_dir: Path, work: Path, *, flows: int,
    live_rate: float, seconds: float, rates: tuple[float, ...],
    timeout: float = 900,
) -> dict[str, Any]:
    """``benchmarks/bench_agent.py`` as a child on our artifact and teacher.

    Its JSON (throughput with its parts, paced decision latency, escalation ->
    verdict round trips through mosquitto and ``teacher serve``, peak RSS of
    ``edge-agent run``) is returned as it wrote it.
    """
    script = Path(__file__).resolve().parent / "bench_agent.py"
    if not script.exists():
        raise FileNotFoundError(f"{script} is absent")
    work.mkdir(parents=True, exist_ok=True)
    out = work / "bench_agent.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(script), "--data-dir", str(data_dir),
           "--artifact", str(artifact), "--checkpoint", str(teacher),
           "--flows", str(flows), "--live-rate", str(live_rate),
           "--seconds", str(seconds), "--rates", ",".join(f"{r:g}" for r in rates),
           "--core", "-1", "--out", str(out)]
    with open(work / "bench_agent.log", "wb") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                              timeout=timeout, check=False)
    if done.returncode != 0 or not out.exists():
        tail = (work / "bench_agent.log").read_text(errors="replace")[-400:]
        raise RuntimeError(f"bench_agent.py exited {done.returncode}: {tail}")
    return json.loads(out.read_text())


# ------------------------------------------------------------------ broker


class _Children:
    """Child processes this module started; stopped by their own ids."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def spawn(self, args: list[str], log: Path) -> subprocess.Popen:
        handle = open(log, "wb")
        proc = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
        handle.close()
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()


def _escalations(artifact: Path, conn_log: Path, n: int) -> list[dict[str, Any]]:
    """``n`` escalation payloads for real flows, windows as the agent builds them."""
    from edge_agent import protocol as proto
    from edge_agent.runtime import load_artifact
    from flows.windows import StreamWindower, record_key

    scorer = load_artifact(artifact)
    enc = scorer.encoder
    windower = StreamWindower(enc.window, enc.n_features)
    out = []
    for rec in _records(conn_log, 1 + n // 5000):
        window = windower.push(record_key(rec, enc), enc.transform_record(rec))
        score = float(scorer.score(window[None])[0])
        out.append(proto.build_escalation(
            flow=rec, window=window, score=score, decision="escalate",
            model_version=scorer.model_version, site="bench", gateway="rtt",
        ))
        if len(out) >= n:
            break
    return out


def round_trip(
    teacher: Path, artifact: Path, conn_log: Path, n: int, work: Path,
    agent_runs: int,
) -> dict[str, Any]:
    """Escalation -> verdict round trips through mosquitto, and the agent process."""
    from benchmarks.broker import EmbeddedBroker
    from edge_agent import protocol as proto
    from edge_agent.mqtt import MqttLink

    work.mkdir(parents=True, exist_ok=True)
    children = _Children()
    broker = EmbeddedBroker().start()
    out: dict[str, Any] = {"broker": broker.kind}
    try:
        children.spawn(
            [str(BIN / "teacher"), "serve", "--checkpoint", str(teacher),
             "--broker", broker.url, "--store", str(work / "alerts.sqlite"),
             "--share-group", "rescorers" if broker.kind == "mosquitto" else ""],
            work / "rescorer.log",
        )
        got: dict[str, float] = {}
        arrived = threading.Event()

        def on_message(topic: str, payload: bytes) -> None:
            try:
                body = json.loads(payload)
            except ValueError:
                return
            got[str(body.get("escalation_id"))] = time.perf_counter()
            arrived.set()

        link = MqttLink(broker.url, "bench-rtt", on_message=on_message)
        link.connect(30)
        link.subscribe(proto.topic("bench", "rtt", proto.Channel.VERDICTS), qos=1)
        esc_topic = proto.topic("bench", "rtt", proto.Channel.ESCALATIONS)
        payloads = _escalations(artifact, conn_log, n + 1)

        # The first escalation waits for the re-scorer to come up (cold start).
        first = payloads[0]
        start = time.perf_counter()
        deadline = start + 120
        while first["id"] not in got and time.perf_counter() < deadline:
            link.publish(esc_topic, proto.encode(first))
            arrived.wait(2.0)
            arrived.clear()
        if first["id"] not in got:
            raise RuntimeError("the re-scorer sent no verdict within 120 s")
        out["first_verdict_s"] = got[first["id"]] - start

        # One escalation at a time: publish, wait for its verdict.
        rtts = []
        for body in payloads[1:]:
            arrived.clear()
            t0 = time.perf_counter()
            link.publish(esc_topic, proto.encode(body))
            end = t0 + 10
            while body["id"] not in got and time.perf_counter() < end:
                arrived.wait(0.5)
                arrived.clear()
            if body["id"] in got:
                rtts.append((got[body["id"]] - t0) * 1e3)
        out["round_trip_ms"] = {
            "n": len(rtts), "lost": n - len(rtts), "p50": _pct(rtts, 50),
            "p99": _pct(rtts, 99), "min": min(rtts) if rtts else None,
            "max": max(rtts) if rtts else None,
        }
        out["round_trip_samples_ms"] = [round(v, 3) for v in rtts]
        link.close()
        out["agent_process"] = agent_process(
            artifact, conn_log, broker.url, agent_runs, work
        )
    finally:
        children.stop()
        broker.stop()
    return out


def _peak_rss_kib(proc: subprocess.Popen) -> int:
    """Poll a child's VmHWM (KiB) until it exits; the last value read is its peak."""
    peak = 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    return peak


def _short_log(conn_log: Path, rows: int, dest: Path) -> Path:
    """The header and first ``rows`` data rows of a Zeek TSV log, at ``dest``."""
    lines = conn_log.read_bytes().split(b"\n")
    head = [ln for ln in lines if ln.startswith(b"#") and not ln.startswith(b"#close")]
    body = [ln for ln in lines if ln and not ln.startswith(b"#")][:rows]
    dest.write_bytes(b"\n".join(head + body) + b"\n")
    return dest


def agent_process(
    artifact: Path, conn_log: Path, url: str, runs: int, work: Path,
    rows: int = 500,
) -> dict[str, Any]:
    """``edge-agent run`` as a child: start-up to retained online status, peak RSS.

    Each run reads the first ``rows`` flows of ``conn_log`` (a copy in ``work``), so
    the runs stay short; peak RSS (VmHWM, polled) covers start-up, scoring and the
    drain. A subscriber here takes the escalations (the broker acknowledges a
    message only when someone subscribes), so the agent drains without a re-scorer.
    """
    from edge_agent import protocol as proto
    from edge_agent.mqtt import MqttLink

    work.mkdir(parents=True, exist_ok=True)
    conn_log = _short_log(conn_log, rows, work / f"first{rows}.conn.log")

    online: dict[str, float] = {}
    seen = threading.Event()

    def on_status(topic: str, payload: bytes) -> None:
        try:
            body = json.loads(payload)
        except ValueError:
            return
        if body.get("state") == "online":
            online.setdefault(topic, time.perf_counter())
            seen.set()

    link = MqttLink(url, "bench-status", on_message=on_status)
    link.connect(30)
    link.subscribe(proto.subscription(proto.Channel.STATUS), qos=1)
    link.subscribe(proto.subscription(proto.Channel.ESCALATIONS), qos=1)
    startup, rss, wall, flows = [], [], [], None
    for r in range(runs):
        gateway = f"proc{r}"
        summary = work / f"agent{r}.json"
        args = [str(BIN / "edge-agent"), "run", "--artifact", str(artifact),
                "--source", f"zeek:{conn_log}", "--broker", url, "--site", "bench",
                "--gateway", gateway, "--outbox", str(work / f"outbox{r}.sqlite"),
                "--alerts", os.devnull, "--summary-json", str(summary),
                "--no-wait-verdicts", "--max-awaiting", "0",
                "--drain-timeout", "20"]
        log = open(work / f"agent{r}.log", "wb")
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        peak = _peak_rss_kib(proc)
        wall.append(time.perf_counter() - t0)
        key = proto.topic("bench", gateway, proto.Channel.STATUS)
        if key in online:
            startup.append(online[key] - t0)
        rss.append(peak / 1024.0)
        if summary.exists():
            flows = json.loads(summary.read_text()).get("flows")
        if proc.returncode != 0:
            print(f"  edge-agent run exited {proc.returncode}; see "
                  f"{work / f'agent{r}.log'}", flush=True)
    link.close()
    return {
        "runs": runs, "input": conn_log.name, "flows_per_run": flows,
        "startup_to_online_s": spread(startup),
        "peak_rss_mib": spread(rss),
        "rss_method": "VmHWM of the child, polled every 20 ms",
        "wall_s": spread(wall),
    }
