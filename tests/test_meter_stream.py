"""Streaming: the meter's memory follows the open connections, not the file size."""

from __future__ import annotations

import struct
import tracemalloc

from flows.meter import iter_flows
from tests.test_meter_craft import A4, B4, eth, ip4, udp


def _long_capture(path, n_packets: int, size: int) -> int:
    """A pcap of ``n_packets`` UDP packets of one flow pair, ``size`` bytes each."""
    body = b"z" * size
    frames = [
        eth(ip4(A4, B4, 17, udp(A4, B4, 4000, 4001, body))),
        eth(ip4(B4, A4, 17, udp(B4, A4, 4001, 4000, body))),
    ]
    with open(path, "wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for i in range(n_packets):
            f = frames[i & 1]
            out.write(
                struct.pack("<IIII", 100 + i // 1000, (i % 1000) * 1000, len(f), len(f))
            )
            out.write(f)
    return path.stat().st_size


def test_memory_stays_flat_while_reading_a_large_capture(tmp_path):
    path = tmp_path / "long.pcap"
    size = _long_capture(path, 10_000, 1200)
    assert size > 12_000_000
    tracemalloc.start()
    try:
        recs = list(iter_flows(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    (rec,) = recs
    assert rec["orig_pkts"] == rec["resp_pkts"] == 5_000
    assert rec["orig_bytes"] == 5_000 * 1200
    assert rec["duration"] > 9.9
    # One read buffer (1 MiB, at most two while refilling) and one connection.
    assert peak < 4_000_000, peak
