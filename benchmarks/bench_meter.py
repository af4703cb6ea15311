"""Speed of the flow meter next to tshark (and NFStream), on one large capture.

Builds a capture of at least ``--packets`` packets (default 2,000,000) in a temp
folder from the shared Ethernet captures, each repetition with shifted IPv4/IPv6
addresses and times so that it forms new flows, then runs, one after the other on
the same file:

- the gatewatch meter (``flows.meter.iter_flows``, records counted and dropped),
  twice: its compiled packet path (``GATEWATCH_METER=fast``) and its pure-Python one
  (``GATEWATCH_METER=python``), each in a child process pinned to one core, so its
  peak RSS is its own;
- ``tshark -r FILE -q -z conv,tcp``;
- NFStream, where it imports (in this Python, or the one named by
  ``--nfstream-python``).

It prints packets/s, flows/s, wall time and peak RSS of each (and, for the Python
tools, packets/s of the read loop alone, without the interpreter's start), and the
ratios, and writes them as JSON with ``--out``. ``--engines fast`` skips the slow
Python run.
Usage::

    nice -n 10 python benchmarks/bench_meter.py --packets 2000000 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def shared_captures(data_dir: Path) -> list[Path]:
    """The Ethernet pcaps of the shared data (linktype 1, classic pcap)."""
    out = []
    for path in sorted(
        list((data_dir / "pcap").glob("*.pcap"))
        + list((data_dir / "zeek-reference").glob("*.pcap"))
    ):
        head = path.read_bytes()[:24]
        if len(head) == 24 and head[:4] == b"\xd4\xc3\xb2\xa1" and head[20] == 1:
            out.append(path)
    return out


def build_capture(sources: list[Path], target: Path, n_packets: int) -> dict:
    """Write ``target`` with at least ``n_packets`` packets; return what it holds."""
    from flows.meter.capture import CaptureReader

    # Every source starts at time 0 of a repetition; sources spanning more than an
    # hour (one trace joins captures years apart) are left out.
    base = []
    used = []
    for src in sources:
        pkts = [(ts, data, wire) for ts, _, data, wire, _ in CaptureReader(str(src))]
        if not pkts or pkts[-1][0] - pkts[0][0] > 3600 or pkts[-1][0] < pkts[0][0]:
            continue
        first = pkts[0][0]
        base.extend((ts - first, data, wire) for ts, data, wire in pkts)
        used.append(src)
    base.sort(key=lambda p: p[0])
    t0 = 0.0
    span = base[-1][0] + 10.0
    rec = struct.Struct("<IIII")
    written = reps = 0
    with open(target, "wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        while written < n_packets:
            shift_t = reps * span
            a, b = (reps >> 8) & 0xFF, reps & 0xFF
            chunk = []
            for ts, data, wire in base:
                d = bytearray(data)
                et = d[12:14] if len(d) >= 14 else b""
                if et == b"\x08\x00" and len(d) >= 34:
                    d[26 + 1], d[26 + 2] = a, b  # source address, bytes 2 and 3
                    d[30 + 1], d[30 + 2] = a, b  # destination address
                elif et == b"\x86\xdd" and len(d) >= 54:
                    d[22 + 12], d[22 + 13] = a, b
                    d[38 + 12], d[38 + 13] = a, b
                t = ts - t0 + 1_600_000_000 + shift_t
                sec = int(t)
                chunk.append(rec.pack(sec, int((t - sec) * 1e6), len(d), wire))
                chunk.append(bytes(d))
                written += 1
                if written >= n_packets:
                    break
            out.write(b"".join(chunk))
            reps += 1
    return {
        "packets": written,
        "repetitions": reps,
        "bytes": target.stat().st_size,
        "sources": [p.name for p in used],
    }


def _measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd`` under a small wrapper that reports its wall time and peak RSS."""
    wrapper = (
        "import json, resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True)\n"
        "w = time.perf_counter() - t\n"
        "ru = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print(json.dumps({'rc': p.returncode, 'wall_s': w, 'cpu_s': ru.ru_utime + "
        "ru.ru_stime, 'peak_rss_bytes': ru.ru_maxrss * 1024, "
        "'conversations': p.stdout.count(b'<->'), 'stdout': "
        "p.stdout.decode(errors='replace')[-4000:], 'stderr': "
        "p.stderr.decode(errors='replace')[-2000:]}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", wrapper, *cmd], capture_output=True, check=True, env=env
    )
    return json.loads(out.stdout)


METER_CHILD = (
    "import json, sys, time\n"
    "sys.path.insert(0, {repo!r})\n"
    "from flows.meter import iter_flows, make_meter\n"
    "engine = type(make_meter()).__name__\n"
    "t = time.perf_counter(); n = 0\n"
    "for _ in iter_flows(sys.argv[1], on_error='skip'):\n    n += 1\n"
    "print(json.dumps({{'flows': n, 'inner_s': time.perf_counter() - t, "
    "'meter_class': engine}}))\n"
)
ENGINES = ("fast", "python")

NFSTREAM_CHILD = (
    "import json, sys, time\n"
    "from nfstream import NFStreamer\n"
    "t = time.perf_counter(); n = 0\n"
    "for _ in NFStreamer(source=sys.argv[1], n_dissections=0, statistical_analysis="
    "False, n_meters=1, idle_timeout=60, active_timeout=1800):\n    n += 1\n"
    "print(json.dumps({'flows': n, 'inner_s': time.perf_counter() - t}))\n"
)


def run_meter(path: Path, engine: str = "fast") -> dict:
    """The gatewatch meter's ``engine`` path on one core (taskset when there is one).

    ``fast`` needs the compiled module: GATEWATCH_METER=fast makes the child fail
    by name instead of falling back when it is not built.
    """
    cmd = [sys.executable, "-c", METER_CHILD.format(repo=str(REPO)), str(path)]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", "0"] + cmd
    res = _measured(cmd, env=dict(os.environ, GATEWATCH_METER=engine))
    if res["rc"] != 0:
        raise RuntimeError(f"meter ({engine}) failed: {res['stderr']}")
    res.update(json.loads(res["stdout"].strip().splitlines()[-1]))
    return res


def run_tshark(path: Path) -> dict | None:
    """``tshark -r FILE -q -z conv,tcp``; conversations counted from its table."""
    exe = shutil.which("tshark")
    if exe is None:
        return None
    res = _measured([exe, "-r", str(path), "-q", "-z", "conv,tcp"])
    res["flows"] = res["conversations"]
    res["note"] = "TCP conversations only (tshark's conv,tcp table rows)"
    return res


def run_nfstream(path: Path, python: str | None) -> dict | str:
    """NFStream with one meter and no dissection, or why it could not run."""
    exe = python or sys.executable
    probe = subprocess.run([exe, "-c", "import nfstream"], capture_output=True)
    if probe.returncode != 0:
        return "nfstream does not import here (" + probe.stderr.decode()[-200:] + ")"
    cmd = [exe, "-c", NFSTREAM_CHILD, str(path)]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", "0"] + cmd
    res = _measured(cmd)
    if res["rc"] != 0:
        return "nfstream failed: " + res["stderr"][-500:]
    res.update(json.loads(res["stdout"].strip().splitlines()[-1]))
    return res


def main(argv: list[str] | None = None) -> int:
    """Build the capture, run each tool, print the comparison."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=2_000_000)
    ap.add_argument(
        "--data",
        default=os.environ.get("GATEWATCH_DATA", str(REPO.parent / "shared" / "data")),
    )
    ap.add_argument("--nfstream-python", default=os.environ.get("NFSTREAM_PYTHON"))
    ap.add_argument("--skip-tshark", action="store_true")
    ap.add_argument(
        "--engines",
        default=",".join(ENGINES),
        help="meter paths to run, comma-separated (default: fast,python)",
    )
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not engines or any(e not in ENGINES for e in engines):
        print(
            f"--engines takes names from {ENGINES}, got {args.engines!r}",
            file=sys.stderr,
        )
        return 2
    sources = shared_captures(Path(args.data))
    if not sources:
        print(f"no Ethernet pcaps under {args.data}", file=sys.stderr)
        return 3
    with tempfile.TemporaryDirectory(prefix="gw-bench-") as tmp:
        path = Path(tmp) / "big.pcap"
        t = time.perf_counter()
        built = build_capture(sources, path, args.packets)
        built["build_s"] = time.perf_counter() - t
        print(
            f"capture: {built['packets']} packets, {built['bytes'] / 1e6:.1f} MB, "
            f"{built['repetitions']} repetitions of {len(built['sources'])} captures"
        )
        results = {"capture": built}
        for engine in engines:
            results[f"meter_{engine}"] = run_meter(path, engine)
        if not args.skip_tshark:
            results["tshark"] = run_tshark(path)
        results["nfstream"] = run_nfstream(path, args.nfstream_python)

    n = built["packets"]
    meters = [f"meter_{e}" for e in engines]
    lines = [
        f"{'tool':13} {'wall s':>8} {'cpu s':>8} {'pkts/s':>12} {'pkts/cpu-s':>12} "
        f"{'flows':>9} {'flows/s':>10} {'peak RSS MB':>12} {'loop pkts/s':>12}"
    ]
    for name in (*meters, "tshark", "nfstream"):
        r = results.get(name)
        if not isinstance(r, dict):
            lines.append(f"{name:13} {r or 'skipped'}")
            continue
        lines.append(
            f"{name:13} {r['wall_s']:>8.2f} {r['cpu_s']:>8.2f} "
            f"{n / r['wall_s']:>12,.0f} {n / r['cpu_s']:>12,.0f} "
            f"{r['flows']:>9} {r['flows'] / r['wall_s']:>10,.0f} "
            f"{r['peak_rss_bytes'] / 2**20:>12.1f} "
            + (f"{n / r['inner_s']:>12,.0f}" if r.get("inner_s") else f"{'-':>12}")
        )
        r["pkts_per_s"] = n / r["wall_s"]
        r["pkts_per_cpu_s"] = n / r["cpu_s"]
        r["flows_per_s"] = r["flows"] / r["wall_s"]
        r.pop("stdout", None)
    for mine in meters:
        m = results[mine]
        for name in ("meter_python", "tshark", "nfstream"):
            r = results.get(name)
            if isinstance(r, dict) and name != mine:
                lines.append(
                    f"{mine} faster than {name} by: wall "
                    f"{r['wall_s'] / m['wall_s']:.2f}x, "
                    f"cpu {r['cpu_s'] / m['cpu_s']:.2f}x"
                )
        lines.append(
            f"{mine} vs the target (500,000 pkts/s on one core, RSS < 200 MB): "
            f"{m['pkts_per_s']:,.0f} pkts/s wall, {m['pkts_per_cpu_s']:,.0f} "
            f"pkts/cpu-s, {m['peak_rss_bytes'] / 2**20:.0f} MB"
        )
    if len({results[k]["flows"] for k in meters}) > 1:
        lines.append("WARNING: the meter paths gave different flow counts")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
