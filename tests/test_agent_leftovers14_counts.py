"""What a capture source could not keep whole is counted in the run's summary.

Found: a full connection table (``--max-flows``) and packets libpcap dropped were
only warned once in the log; the summary (its JSON and its line) said nothing, so
a gateway's report did not show how many flows were cut short or went missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from pathlib import Path

import pytest

from edge_agent.cli import main
from tests.test_agent_fixtures import tiny
from tests.test_max_flows import _syn_flood

dpkt = pytest.importorskip("dpkt")


@pytest.fixture
def tm(data_dir, tmp_path_factory):
    return tiny(data_dir, tmp_path_factory)


def _evictions(connections: int, max_flows: int) -> int:
    """Evictions of a table of ``max_flows`` fed ``connections`` new connections
    that stay open, by the meter's documented rule: a new connection that finds
    the table full first ends the least recently active 1 % (at least one)."""
    open_now = evicted = 0
    for _ in range(connections):
        if open_now >= max_flows:
            ended = max(1, open_now // 100)
            evicted += ended
            open_now -= ended
        open_now += 1
    return evicted


@pytest.mark.parametrize(("syns", "max_flows"), [(600, 100), (700, 250)])
def test_connections_ended_by_a_full_table_are_counted_in_the_summary(
    tm, tmp_path: Path, capsys, syns: int, max_flows: int
):
    pcap = _syn_flood(tmp_path / "flood.pcap", syns)  # every SYN still open at the end
    summary = tmp_path / "s.json"
    argv = ["run", "--artifact", str(tm.artifact), "--source", f"pcap:{pcap}",
            "--site", "s1", "--gateway", "g1", "--outbox", str(tmp_path / "o.db"),
            "--alerts", "", "--summary-json", str(summary),
            "--max-flows", str(max_flows)]

    assert main(argv) == 0, capsys.readouterr().err

    expected = _evictions(syns, max_flows)
    assert expected == (500 if max_flows == 100 else 450)  # the rule, by hand
    report = json.loads(summary.read_text())
    assert report["flows"] == syns  # each connection ended early is still a flow
    assert report["flows_evicted"] == expected
    assert report["packets_dropped"] == 0
    line = [x for x in capsys.readouterr().err.splitlines()
            if x.startswith("summary:")]
    assert len(line) == 1
    assert ("connections ended early as the connection table was full "
            f"(--max-flows) {expected}") in line[0]
    assert "packets dropped" not in line[0]


def test_under_the_bound_nothing_is_counted_or_said(tm, tmp_path: Path, capsys):
    pcap = _syn_flood(tmp_path / "flood.pcap", 50)
    summary = tmp_path / "s.json"
    argv = ["run", "--artifact", str(tm.artifact), "--source", f"pcap:{pcap}",
            "--site", "s1", "--gateway", "g1", "--outbox", str(tmp_path / "o.db"),
            "--alerts", "", "--summary-json", str(summary), "--max-flows", "100"]

    assert main(argv) == 0

    report = json.loads(summary.read_text())
    assert (report["flows"], report["flows_evicted"]) == (50, 0)
    assert "ended early" not in capsys.readouterr().err


class _Header:
    def __init__(self, ts: float, size: int) -> None:
        self.ts, self.size = ts, size

    def getts(self) -> tuple[int, int]:
        return int(self.ts), int(round((self.ts % 1) * 1e6))

    def getlen(self) -> int:
        return self.size


class _Capture:
    """A stand-in for a pcapy capture: one UDP packet, then libpcap reports 7
    packets dropped and the interface 2; the second read asks the run to stop
    (SIGTERM, as systemd does), so the capture ends by itself."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.write(self._w, b"x")  # always readable: select() never waits
        self.reads = 0
        udp = dpkt.udp.UDP(sport=40000, dport=53, data=b"q" * 12)
        udp.ulen = len(udp)
        ip = dpkt.ip.IP(src=socket.inet_aton("10.0.0.2"),
                        dst=socket.inet_aton("10.0.0.1"), p=17, data=udp)
        ip.len = len(ip)
        self.frame = bytes(dpkt.ethernet.Ethernet(
            src=b"\x02" * 6, dst=b"\x04" * 6, type=0x0800, data=ip))

    def datalink(self) -> int:
        return 1  # Ethernet

    def setnonblock(self, _on: int) -> None:
        pass

    def getfd(self) -> int:
        return self._r

    def dispatch(self, _budget: int, on_packet) -> int:
        self.reads += 1
        if self.reads == 1:
            on_packet(_Header(1_700_000_000.0, len(self.frame)), self.frame)
            return 1
        if self.reads == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return 0

    def stats(self) -> tuple[int, int, int]:
        return (100, 7, 2)

    def close(self) -> None:
        """Idempotent, as pcapy's is: the capture closes it, and so may a test."""
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._r = self._w = -1


def test_packets_a_live_capture_dropped_are_counted_in_the_summary(
    tm, tmp_path: Path, capsys, monkeypatch
):
    import flows.meter.live as live

    cap = _Capture()
    monkeypatch.setattr(live, "open_live", lambda *args, **kwargs: cap)
    previous = signal.getsignal(signal.SIGTERM)
    summary = tmp_path / "s.json"
    argv = ["run", "--artifact", str(tm.artifact), "--source", "iface:fake0",
            "--site", "s1", "--gateway", "g1", "--outbox", str(tmp_path / "o.db"),
            "--alerts", "", "--summary-json", str(summary)]
    try:
        code = main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)
        cap.close()

    err = capsys.readouterr().err
    assert code == 0, err
    report = json.loads(summary.read_text())
    assert report["flows"] == 1  # the open flow, ended by the stop and scored
    assert (report["packets_dropped"], report["flows_evicted"]) == (9, 0)
    line = [x for x in err.splitlines() if x.startswith("summary:")][0]
    assert "packets dropped by the capture before the flow meter 9" in line
