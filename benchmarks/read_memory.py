"""Peak memory of reading a large Zeek conn.log whole versus in pieces.

A synthetic conn.log of the size asked for (Zeek's TSV, or with ``--format json``
its JSON writer's one object per line) is written to a temporary folder, then
read twice, each time in a fresh Python process: once the old way (the whole file
loaded, ``_read_source(load(path))``) and once through :func:`flows.readers.read`,
which reads a regular Zeek TSV or JSON file in pieces of ``CHUNK_BYTES``. Each process
reports the growth of its peak resident memory over what it held after imports
(Arrow's buffers included) and the peak of Python's own allocations (tracemalloc:
the file's text, not Arrow's). Prints both side by side, with old/new ratios.

    python benchmarks/read_memory.py [--mb 200] [--gzip] [--chunk-mb 16]
                                     [--format tsv|json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
from pathlib import Path

FIELDS = (
    "ts uid id.orig_h id.orig_p id.resp_h id.resp_p proto service duration "
    "orig_bytes resp_bytes conn_state local_orig local_resp missed_bytes history "
    "orig_pkts orig_ip_bytes resp_pkts resp_ip_bytes tunnel_parents label "
    "detailed-label"
).split()

# One process's read: prints {"rss": bytes, "py": bytes, "rows": n} as JSON.
_PROBE = r"""
import json, resource, sys, tracemalloc
from flows.readers import _read_source, load, read
from flows.readers import _source
path, how, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3])
_source.CHUNK_BYTES = chunk
def kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
import pyarrow, pyarrow.csv, pyarrow.compute, numpy  # noqa: imports first
before = kib()
tracemalloc.start()
if how == "whole":
    result = _read_source(load(path), "fail", "UTC")
else:
    result = read(path)
py = tracemalloc.get_traced_memory()[1]
print(json.dumps({"rss": (kib() - before) * 1024, "py": py, "rows": len(result.table)}))
"""


def _row(i: int) -> list:
    """The values of connection ``i``, in the order of :data:`FIELDS`."""
    return [
        round(1_600_000_000 + i * 0.013, 6),
        f"C{i:017d}",
        f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
        1024 + i % 60000,
        f"192.168.{i % 7}.{i % 250 + 1}",
        (80, 443, 53)[i % 3],
        ("tcp", "udp")[i % 2],
        ("http", "ssl", "dns", "-")[i % 4],
        round(i % 997 / 31, 6),
        i % 5000,
        i % 70000,
        "SF",
        True,
        False,
        0,
        "ShADadfF",
        i % 40 + 1,
        i % 5000 + 400,
        i % 50 + 1,
        i % 70000 + 600,
        "-",
        ("Benign", "Malicious")[i % 9 == 0],
        "-",
    ]


def _tsv_line(i: int) -> str:
    values = _row(i)
    values[0], values[8] = f"{values[0]:.6f}", f"{values[8]:.6f}"
    values[12], values[13] = "T", "F"
    return "\t".join(map(str, values)) + "\n"


def _json_line(i: int) -> str:
    obj = dict(zip(FIELDS, _row(i), strict=True))
    del obj["tunnel_parents"]  # a set Zeek leaves out when empty
    return json.dumps(obj, separators=(",", ":")) + "\n"


def write_log(path: Path, size: int, packed: bool, fmt: str = "tsv") -> int:
    """Write a conn.log of about ``size`` bytes of text; return its rows."""
    head = (
        "#separator \\x09\n#set_separator\t,\n#empty_field\t(empty)\n"
        "#unset_field\t-\n#path\tconn\n#open\t2024-01-01-00-00-00\n"
        f"#fields\t{chr(9).join(FIELDS)}\n"
        f"#types\t{chr(9).join('string' for _ in FIELDS)}\n"
    )
    line = _tsv_line
    if fmt == "json":
        head, line = "", _json_line
    opener = gzip.open if packed else open
    rows = 0
    with opener(path, "wt", **({"compresslevel": 1} if packed else {})) as out:
        out.write(head)
        written = len(head)
        while written < size:
            block = "".join(line(i) for i in range(rows, rows + 10_000))
            out.write(block)
            written += len(block)
            rows += 10_000
        if fmt == "tsv":
            out.write("#close\t2024-01-02-00-00-00\n")
    return rows


def probe(path: Path, how: str, chunk: int) -> dict:
    """Run one read in a fresh process and return what it measured."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(path), how, str(chunk)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=200, help="text size in MB")
    parser.add_argument("--gzip", action="store_true", help="write it gzipped")
    parser.add_argument(
        "--chunk-mb", type=float, default=16, help="piece size of the new read"
    )
    parser.add_argument(
        "--format", choices=("tsv", "json"), default="tsv", help="Zeek log format"
    )
    args = parser.parse_args(argv)
    size = int(args.mb * 1e6)
    chunk = max(1, int(args.chunk_mb * (1 << 20)))
    with tempfile.TemporaryDirectory(prefix="read-memory-") as folder:
        name = "conn.log" if args.format == "tsv" else "conn.json.log"
        path = Path(folder) / (name + (".gz" if args.gzip else ""))
        rows = write_log(path, size, args.gzip, args.format)
        old = probe(path, "whole", chunk)
        new = probe(path, "pieces", chunk)
    assert old["rows"] == new["rows"] == rows, (old, new, rows)
    mib = 1 << 20
    print(
        f"{path.name} of {size / 1e6:.0f} MB text{' (gzip)' if args.gzip else ''}, "
        f"{rows} rows; pieces of {chunk / mib:.1f} MiB"
    )
    print(f"{'':24}{'whole (old)':>14}{'pieces (new)':>14}{'old/new':>10}")
    for key, what in (("rss", "peak RSS growth"), ("py", "peak Python allocs")):
        ratio = old[key] / new[key] if new[key] else float("inf")
        print(
            f"{what:24}{old[key] / mib:>11.1f} MiB{new[key] / mib:>10.1f} MiB"
            f"{ratio:>10.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
