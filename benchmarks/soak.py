"""Soak: the agent at a steady flow rate for minutes, watching its resources.

``edge-agent run`` (the real command, JSON lines on stdin) gets ``--rate`` flows per
second for ``--minutes`` minutes, cycling through a real conn.log with the times
shifted on each pass (so every pass makes new escalations). It talks to a broker on
127.0.0.1 (mosquitto, else the embedded one) and a re-scorer (``teacher serve``
with a small CNN-BiLSTM checkpoint, or ``--subscriber`` for a plain MQTT reader
that only acknowledges). Every ``--interval`` seconds the agent's RSS, open file
descriptors and threads, and the outbox's length, are sampled.

At the end stdin is closed; the agent drains its outbox and exits with its summary.
Verdict (the issue's bar): RSS growth under 10% (median of the last quarter of
samples against the median of the first quarter after ``--warmup`` seconds), no
growth in file descriptors or threads (last-quarter maximum against the
first-quarter maximum), and an empty outbox at exit. The flows the agent scored
against those fed tell whether the rate was really held.

    python -m benchmarks.soak --minutes 30
    python -m benchmarks.soak --minutes 2 --json runs/soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONN_LOG = "zeek-conn/ctu50-normal-40-day1.conn.log.labeled"


def _outbox_len(path: Path) -> int | None:
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)
        try:
            return db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return None


class Feeder(threading.Thread):
    """Writes records to a pipe at ``rate`` per second until told to stop."""

    def __init__(self, pipe, records: list[dict], rate: float, span: float) -> None:
        super().__init__(name="feeder", daemon=True)
        self.pipe, self.records, self.rate, self.span = pipe, records, rate, span
        self.sent = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        chunk = max(1, int(self.rate / 20))  # 20 writes per second
        start = time.monotonic()
        i, n = 0, len(self.records)
        try:
            while not self.stop.is_set():
                lines = []
                for _ in range(chunk):
                    rec = dict(self.records[i % n])
                    if rec.get("ts") is not None:
                        rec["ts"] += (i // n) * self.span
                    lines.append(json.dumps(rec))
                    i += 1
                self.pipe.write("\n".join(lines) + "\n")
                self.pipe.flush()
                self.sent += chunk
                ahead = start + self.sent / self.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
        except (BrokenPipeError, ValueError, OSError) as exc:
            self.error = exc


def _fixtures(data_dir: Path, work: Path, rescorer: bool):
    """The tiny artifact (and teacher checkpoint) the agent tests use, built here."""
    sys.path.insert(0, str(REPO))
    from tests.test_agent_fixtures import Tiny, make_teacher

    tm = Tiny(data_dir / CONN_LOG, work)
    ckpt = make_teacher(tm, work / "teacher")[0] if rescorer else None
    return tm, ckpt


def _subscriber(url: str, stop: threading.Event) -> threading.Thread:
    """A plain MQTT v5 reader of every escalation (so PUBACKs say 'routed')."""
    import paho.mqtt.client as paho

    from edge_agent.mqtt import BrokerAddress

    addr = BrokerAddress.parse(url)

    def run() -> None:
        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id="soak-reader",
            protocol=paho.MQTTv5,
        )
        client.on_connect = lambda c, *a: c.subscribe(
            "gatewatch/v1/+/+/escalations", qos=1
        )
        client.connect(addr.host, addr.port)
        client.loop_start()
        stop.wait()
        client.loop_stop()
        client.disconnect()

    t = threading.Thread(target=run, name="soak-reader", daemon=True)
    t.start()
    return t


def verdict(samples: list[dict], warmup: float, summary: dict | None) -> dict:
    """The pass/fail figures from the samples and the agent's summary."""
    steady = [s for s in samples if s["t"] >= warmup] or samples
    q = max(1, len(steady) // 4)
    first, last = steady[:q], steady[-q:]
    rss0 = statistics.median(s["rss_mb"] for s in first)
    rss1 = statistics.median(s["rss_mb"] for s in last)
    out = {
        "rss_first_mb": round(rss0, 1),
        "rss_last_mb": round(rss1, 1),
        "rss_growth_pct": round(100 * (rss1 - rss0) / rss0, 2),
        "fds_first": max(s["fds"] for s in first),
        "fds_last": max(s["fds"] for s in last),
        "threads_first": max(s["threads"] for s in first),
        "threads_last": max(s["threads"] for s in last),
        "outbox_pending_at_exit": None
        if summary is None
        else summary.get("outbox_pending"),
    }
    out["ok"] = bool(
        out["rss_growth_pct"] < 10.0
        and out["fds_last"] <= out["fds_first"]
        and out["threads_last"] <= out["threads_first"]
        and out["outbox_pending_at_exit"] == 0
    )
    return out


def _raise_interrupt(*_) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point; see the module docstring."""
    import psutil

    from benchmarks.broker import EmbeddedBroker

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--rate", type=float, default=5000.0, help="flows per second")
    p.add_argument("--interval", type=float, default=5.0, help="seconds per sample")
    p.add_argument(
        "--warmup",
        type=float,
        default=30.0,
        help="seconds left out of the growth figures",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=os.environ.get("GATEWATCH_DATA") or REPO.parent / "shared" / "data",
    )
    p.add_argument(
        "--subscriber",
        action="store_true",
        help="a plain MQTT reader instead of teacher serve",
    )
    p.add_argument("--drain-timeout", type=float, default=120.0)
    p.add_argument("--json", type=Path, help="write samples and verdict here")
    args = p.parse_args(argv)
    if not (args.data_dir / CONN_LOG).is_file():
        p.error(f"{CONN_LOG} is absent from {args.data_dir} (set --data-dir)")

    work = Path(tempfile.mkdtemp(prefix="gw-soak-"))
    # SIGTERM unwinds like Ctrl-C, so the broker, re-scorer and agent are stopped too.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    tm, ckpt = _fixtures(args.data_dir, work, rescorer=not args.subscriber)
    records = [dict(r) for r in tm.records]
    span = (max(r["ts"] for r in records) - min(r["ts"] for r in records)) + 60.0
    outbox = work / "outbox.sqlite"
    summary_path = work / "summary.json"
    samples: list[dict] = []
    summary = None
    with EmbeddedBroker() as broker:
        stop_reader = threading.Event()
        serve = None
        if args.subscriber:
            _subscriber(broker.url, stop_reader)
        else:
            serve_log = open(work / "serve.log", "w")
            serve = subprocess.Popen(
                [
                    str(BIN / "teacher"),
                    "serve",
                    "--checkpoint",
                    str(ckpt),
                    "--broker",
                    broker.url,
                    "--store",
                    str(work / "alerts.sqlite"),
                    "--stats-json",
                    str(work / "stats.json"),
                ],
                stdout=serve_log,
                stderr=subprocess.STDOUT,
            )
            deadline = time.monotonic() + 180
            while "serving" not in (work / "serve.log").read_text():
                if time.monotonic() > deadline or serve.poll() is not None:
                    print((work / "serve.log").read_text(), file=sys.stderr)
                    return 1
                time.sleep(0.2)
        agent_log = open(work / "agent.log", "w")
        agent = subprocess.Popen(
            [
                str(BIN / "edge-agent"),
                "run",
                "--artifact",
                str(tm.artifact),
                "--source",
                "-",
                "--broker",
                broker.url,
                "--site",
                "soak",
                "--gateway",
                "gw1",
                "--outbox",
                str(outbox),
                "--alerts",
                "",
                "--summary-json",
                str(summary_path),
                "--no-wait-verdicts", "--max-awaiting", "0",
                "--drain-timeout",
                str(args.drain_timeout),
            ],
            stdin=subprocess.PIPE,
            stdout=agent_log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        proc = psutil.Process(agent.pid)
        feeder = Feeder(agent.stdin, records, args.rate, span)
        started = time.monotonic()
        feeder.start()
        print(
            f"soak: {args.rate:g} flows/s for {args.minutes:g} min, sampling every "
            f"{args.interval:g} s (work folder {work})",
            flush=True,
        )
        print(
            f"{'t_s':>7} {'fed':>10} {'rate/s':>8} {'rss_MB':>8} {'fds':>5} "
            f"{'thr':>4} {'outbox':>7} {'cpu%':>6}",
            flush=True,
        )
        proc.cpu_percent()
        last_fed, last_t = 0, started
        try:
            while time.monotonic() - started < args.minutes * 60:
                time.sleep(args.interval)
                if agent.poll() is not None:
                    print("the agent exited early:", agent.returncode, file=sys.stderr)
                    break
                now = time.monotonic()
                mem = proc.memory_info().rss / 2**20
                row = {
                    "t": round(now - started, 1),
                    "fed": feeder.sent,
                    "rate": round((feeder.sent - last_fed) / (now - last_t), 1),
                    "rss_mb": round(mem, 1),
                    "fds": proc.num_fds(),
                    "threads": proc.num_threads(),
                    "outbox": _outbox_len(outbox),
                    "cpu": proc.cpu_percent(),
                }
                last_fed, last_t = feeder.sent, now
                samples.append(row)
                print(
                    f"{row['t']:>7.1f} {row['fed']:>10,d} {row['rate']:>8.0f} "
                    f"{row['rss_mb']:>8.1f} {row['fds']:>5d} {row['threads']:>4d} "
                    f"{row['outbox'] if row['outbox'] is not None else '-':>7} "
                    f"{row['cpu']:>6.0f}",
                    flush=True,
                )
        finally:
            feeder.stop.set()
            feeder.join(10)
            try:
                agent.stdin.close()
            except OSError:
                pass
            try:
                code = agent.wait(args.drain_timeout + 60)
            except subprocess.TimeoutExpired:
                agent.kill()
                code = agent.wait(10)
            if serve is not None:
                serve.terminate()
                serve.wait(30)
            stop_reader.set()
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
    elapsed = samples[-1]["t"] if samples else 0.0
    result = verdict(samples, args.warmup, summary) if samples else {"ok": False}
    result.update(
        exit_code=code,
        fed=feeder.sent,
        mean_rate=round(feeder.sent / elapsed, 1) if elapsed else None,
        scored=None if summary is None else summary.get("flows"),
        escalations_sent=None if summary is None else summary.get("escalations_sent"),
        dropped=None if summary is None else summary.get("outbox_dropped"),
    )
    if result.get("scored") is not None and result["scored"] < feeder.sent:
        result["ok"] = False  # flows fed but never scored
    if code != 0:
        result["ok"] = False
    print(json.dumps(result, indent=1))
    print("verdict:", "PASS" if result["ok"] else "FAIL")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "samples": samples,
                    "result": result,
                    "args": {k: str(v) for k, v in vars(args).items()},
                },
                indent=1,
            )
        )
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
