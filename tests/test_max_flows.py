"""The agent bounds the connections a capture source tracks (``--max-flows``).

Found: a capture of 400,000 SYNs from spoofed sources held every one open (the
meter's table allowed 1,000,000, about 1 KB each), so a SYN flood could take a
small gateway's memory. The agent's default is 100,000 now; a full table ends the
least recently active connections early, and says so once.
"""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest

from edge_agent.cli import main
from tests.test_agent_fixtures import tiny

dpkt = pytest.importorskip("dpkt")


@pytest.fixture
def tm(data_dir, tmp_path_factory):
    return tiny(data_dir, tmp_path_factory)


def _syn_flood(path: Path, count: int) -> Path:
    """``count`` SYNs from distinct spoofed sources to one port, 1 ms apart: every
    connection is still open (unanswered SYNs end after 5 s) when the file ends."""
    with path.open("wb") as handle:
        writer = dpkt.pcap.Writer(handle)
        for i in range(count):
            tcp = dpkt.tcp.TCP(sport=1024 + i, dport=80, flags=dpkt.tcp.TH_SYN)
            ip = dpkt.ip.IP(src=socket.inet_aton(f"10.9.{i // 250}.{i % 250 + 1}"),
                            dst=socket.inet_aton("192.168.1.1"), p=6, data=tcp)
            ip.len = len(ip)
            frame = dpkt.ethernet.Ethernet(src=b"\x02" * 6, dst=b"\x04" * 6,
                                           type=0x0800, data=ip)
            writer.writepkt(bytes(frame), ts=1_700_000_000 + i * 1e-3)
    return path


def test_a_full_connection_table_ends_connections_early_and_says_so(
    tm, tmp_path: Path, capsys, caplog
):
    pcap = _syn_flood(tmp_path / "flood.pcap", 600)
    argv = ["run", "--artifact", str(tm.artifact), "--source", f"pcap:{pcap}",
            "--site", "s1", "--gateway", "g1", "--outbox", str(tmp_path / "o.db"),
            "--alerts", "", "--summary-json", str(tmp_path / "s.json"),
            "--max-flows", "100"]
    with caplog.at_level(logging.WARNING, logger="gatewatch"):
        assert main(argv) == 0, capsys.readouterr().err

    # Every SYN is still one flow, scored; the table never held more than 100.
    assert json.loads((tmp_path / "s.json").read_text())["flows"] == 600
    warnings = [r.getMessage() for r in caplog.records
                if "connection table is full" in r.getMessage()]
    assert len(warnings) == 1
    assert "(100 open connections, max_flows)" in warnings[0]
    assert "ended early)" in warnings[0]

    # Under the bound, no warning.
    caplog.clear()
    argv[argv.index(str(tmp_path / "o.db"))] = str(tmp_path / "o2.db")
    argv[-1] = "1000"
    with caplog.at_level(logging.WARNING, logger="gatewatch"):
        assert main(argv) == 0
    assert "connection table is full" not in caplog.text


def test_the_default_bound_is_the_agents_not_the_meters():
    from edge_agent.config import AgentConfig
    from flows.meter.meter import FlowMeter

    assert AgentConfig().max_flows == 100_000
    assert FlowMeter().max_flows == 1_000_000  # flows inspect/convert on files


@pytest.mark.parametrize("value", ["0", "-5", "1e3"])
def test_max_flows_out_of_range_is_a_usage_error(tm, tmp_path: Path, capsys, value):
    argv = ["run", "--artifact", str(tm.artifact), "--source", "-", "--site", "s1",
            "--gateway", "g1", "--outbox", str(tmp_path / "o.db"),
            "--max-flows", value]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusal
        code = exc.code
    assert code == 2
    assert "--max-flows" in capsys.readouterr().err
