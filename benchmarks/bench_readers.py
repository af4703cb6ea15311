"""How fast the readers turn conn.log text into canonical records, on one core.

A large conn.log is built in a temporary folder by repeating the data rows of the
real ``zeek-conn/ctu50-normal-40-day1.conn.log.labeled`` under its own header, then
read with :func:`flows.readers.read` (Arrow held to one CPU thread) and, for the
edge agent's path, with :func:`flows.readers.iter_records`. Prints rows/s.

    python benchmarks/bench_readers.py [--data-dir DIR] [--copies 200] [--json OUT]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

CTU50 = "zeek-conn/ctu50-normal-40-day1.conn.log.labeled"


def build_log(source: Path, copies: int, dest: Path) -> int:
    """Write ``copies`` repeats of ``source``'s rows under its header; return rows."""
    lines = source.read_bytes().split(b"\n")
    header = [
        ln for ln in lines if ln.startswith(b"#") and not ln.startswith(b"#close")
    ]
    rows = [ln for ln in lines if ln and not ln.startswith(b"#")]
    body = b"\n".join(rows) + b"\n"
    with open(dest, "wb") as out:
        out.write(b"\n".join(header) + b"\n")
        for _ in range(copies):
            out.write(body)
        out.write(b"#close\t2022-06-18-00-00-00\n")
    return len(rows) * copies


def timed(fn, repeat: int) -> tuple[float, float]:
    """Best wall time and best CPU time of ``repeat`` runs of ``fn``.

    On a shared machine the wall time also counts waiting for a core; the CPU time
    of this process (one Arrow thread) is what one core spends.
    """
    wall = cpu = float("inf")
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print rows/s for each path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="data folder (GATEWATCH_DATA)")
    parser.add_argument(
        "--copies", type=int, default=200, help="repeats of the ctu50 rows (5,663 each)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs; the best counts")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)

    from flows.datasets import data_dir
    from flows.readers import iter_records, read

    source = data_dir(args.data_dir) / CTU50
    if not source.exists():
        print(f"error: {source} is absent", file=sys.stderr)
        return 3
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)

    results: dict = {
        "cpu": platform.processor() or platform.machine(),
        "arrow_threads": 1,
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.conn.log"
        rows = build_log(source, args.copies, path)
        size = os.path.getsize(path)
        results.update(rows=rows, mbytes=round(size / 1e6, 1))

        wall, cpu = timed(lambda: read(path), args.repeat)
        results["read_tsv_rows_s"] = round(rows / wall)
        results["read_tsv_rows_per_cpu_s"] = round(rows / cpu)

        gz = Path(tmp) / "big.conn.log.gz"
        gz.write_bytes(gzip.compress(path.read_bytes(), compresslevel=6))
        wall, cpu = timed(lambda: read(gz), args.repeat)
        results["read_tsv_gz_rows_s"] = round(rows / wall)
        results["read_tsv_gz_rows_per_cpu_s"] = round(rows / cpu)

        small = Path(tmp) / "small.conn.log"
        small_rows = build_log(source, max(1, args.copies // 20), small)
        wall, cpu = timed(lambda: sum(1 for _ in iter_records(small)), 1)
        results["iter_records_rows_s"] = round(small_rows / wall)
        results["iter_records_rows_per_cpu_s"] = round(small_rows / cpu)

    print(
        f"conn.log: {results['rows']:,} rows, {results['mbytes']} MB, one Arrow thread"
    )
    print(f"{'':22}{'rows/s (wall)':>16}{'rows per CPU s':>16}")
    for label, key in (
        ("read() TSV", "read_tsv"),
        ("read() TSV.gz", "read_tsv_gz"),
        ("iter_records() TSV", "iter_records"),
    ):
        print(
            f"  {label:<20}{results[key + '_rows_s']:>16,}"
            f"{results[key + '_rows_per_cpu_s']:>16,}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
