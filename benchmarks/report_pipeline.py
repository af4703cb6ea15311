"""Pipeline measurements: flow meter vs tshark, the agent, the MQTT round trip.

* **Meter**: a larger capture is built by repeating the packets of a real pcap with
  shifted timestamps; :func:`flows.meter.read_capture` and ``tshark -q -z conv,...``
  (its conversation table, tshark's nearest flow view) read the same file in turn.
* **Agent**: :class:`edge_agent.agent.Agent` (no broker: escalations go to its
  outbox) scores real conn.log records as fast as they come (flows/s) and paced at a
  fixed rate (decision latency, arrival to decision).
* **Round trip**: escalations built the way the agent builds them are published to a
  broker this module starts on 127.0.0.1; ``teacher serve`` answers; the time from
  publish to the verdict's arrival is one sample.
* **Agent process**: ``edge-agent run`` as a child process: time from start to its
  retained "online" status on the broker, and its peak RSS (``wait4``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
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
    "agent_process",
    "agent_throughput",
    "build_pcap",
    "meter_vs_tshark",
    "round_trip",
]

BIN = Path(sys.executable).parent
PCAP_MAGIC = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
    b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
    b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}


def _pct(values: Any, q: float) -> float | None:
    arr = np.asarray(list(values), dtype=np.float64)
    return float(np.percentile(arr, q)) if arr.size else None


# ------------------------------------------------------------------ meter


def build_pcap(source: Path, copies: int, dest: Path) -> int:
    """Write ``copies`` repeats of a classic pcap's packets, each later in time.

    Each copy is shifted by the capture's span plus 10 minutes, so connections of
    one copy have ended before the next starts. Returns the packet count.
    """
    data = source.read_bytes()
    if data[:4] not in PCAP_MAGIC:
        raise ValueError(f"{source}: not a classic pcap file")
    order = PCAP_MAGIC[data[:4]][0]
    rec = struct.Struct(order + "IIII")
    packets = []
    pos = 24
    while pos + 16 <= len(data):
        sec, frac, incl, orig = rec.unpack_from(data, pos)
        packets.append((sec, frac, incl, orig, data[pos + 16 : pos + 16 + incl]))
        pos += 16 + incl
    span = packets[-1][0] - packets[0][0] + 600 if packets else 600
    with open(dest, "wb") as out:
        out.write(data[:24])
        for k in range(copies):
            for sec, frac, incl, orig, body in packets:
                out.write(rec.pack(sec + k * span, frac, incl, orig))
                out.write(body)
    return len(packets) * copies


def meter_vs_tshark(source: Path, copies: int, repeats: int) -> dict[str, Any]:
    """Packets/s of the flow meter and of tshark on one built capture, in turn."""
    from flows.meter import read_capture

    tshark = shutil.which("tshark")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.pcap"
        packets = build_pcap(source, copies, path)
        out: dict[str, Any] = {
            "source": source.name,
            "copies": copies,
            "packets": packets,
            "mbytes": round(path.stat().st_size / 1e6, 2),
            "tools": {"gatewatch": "flows.meter.read_capture"},
        }
        meter_pps: list[float] = []
        tshark_pps: list[float] = []
        flows = None
        for _ in range(repeats):
            start = time.perf_counter()
            result = read_capture(path)
            meter_pps.append(packets / (time.perf_counter() - start))
            flows = result.table.num_rows
            if tshark:
                start = time.perf_counter()
                subprocess.run(
                    [tshark, "-r", str(path), "-n", "-q", "-z", "conv,tcp",
                     "-z", "conv,udp"],
                    check=True, capture_output=True, timeout=600,
                )
                tshark_pps.append(packets / (time.perf_counter() - start))
        out["flows"] = flows
        out["meter_packets_s"] = spread(meter_pps)
        if tshark:
            version = subprocess.run(
                [tshark, "--version"], capture_output=True, text=True, check=False
            ).stdout.splitlines()[:1]
            first = (version or ["tshark"])[0]
            out["tools"]["tshark"] = first.split(" (Git")[0]
            out["tshark_packets_s"] = spread(tshark_pps)
            out["meter_over_tshark"] = ratio_stats(meter_pps, tshark_pps)
        else:
            out["tshark_packets_s"] = None
            out["tshark_note"] = "tshark is not on PATH"
        try:
            import nfstream  # noqa: F401
        except ImportError:
            out["nfstream_note"] = "NFStream is not installed; not compared"
        else:  # pragma: no cover - not installed here
            out["nfstream_note"] = "NFStream installed but not wired in yet"
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


def agent_process(
    artifact: Path, conn_log: Path, url: str, runs: int, work: Path
) -> dict[str, Any]:
    """``edge-agent run`` as a child: start-up to retained online status, peak RSS."""
    from edge_agent import protocol as proto
    from edge_agent.mqtt import MqttLink

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
    startup, rss, wall, flows = [], [], [], None
    for r in range(runs):
        gateway = f"proc{r}"
        summary = work / f"agent{r}.json"
        args = [str(BIN / "edge-agent"), "run", "--artifact", str(artifact),
                "--source", f"zeek:{conn_log}", "--broker", url, "--site", "bench",
                "--gateway", gateway, "--outbox", str(work / f"outbox{r}.sqlite"),
                "--alerts", os.devnull, "--summary-json", str(summary),
                "--no-wait-verdicts", "--drain-timeout", "20"]
        log = open(work / f"agent{r}.log", "wb")
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall.append(time.perf_counter() - t0)
        key = proto.topic("bench", gateway, proto.Channel.STATUS)
        if key in online:
            startup.append(online[key] - t0)
        rss.append(usage.ru_maxrss / 1024.0)  # KiB on Linux -> MiB
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
        "wall_s": spread(wall),
    }
