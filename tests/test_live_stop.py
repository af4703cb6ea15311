"""A stop ends a live capture without losing the connections still open.

Found: an agent on ``iface:NAME`` stopped by Ctrl-C or SIGTERM scored none of the
connections open at that moment (``summary: flows 0`` while a TCP connection was
up and UDP datagrams had been sent), though the capture's own docstring promised
to end and yield them. The agent runs in a network namespace made by the test, so
its loopback holds only the test's traffic.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.test_agent_fixtures import tiny
from tests.test_faults import netns_unavailable

REPO = Path(__file__).resolve().parent.parent
pcapy = pytest.importorskip("pcapy", reason="pcapy-ng is not installed")


@pytest.mark.skipif(os.geteuid() != 0, reason="capturing on lo needs root here")
def test_iter_live_yields_the_open_connections_once_told_to_end():
    from flows.meter.live import iter_live

    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    port = receiver.getsockname()[1]
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    end = threading.Event()

    def talk():
        time.sleep(0.5)
        for i in range(3):
            sender.sendto(b"x" * (20 + i), ("127.0.0.1", port))
            receiver.recvfrom(100)
        time.sleep(0.3)
        end.set()  # the UDP flow is still open (its idle timeout is far off)

    thread = threading.Thread(target=talk)
    thread.start()
    started = time.monotonic()
    # duration: a bound, so that a capture deaf to ``end`` fails the test below
    # instead of hanging it.
    records = list(iter_live("lo", bpf=f"udp and port {port}", end=end,
                             duration=15.0))
    thread.join()
    sender.close()
    receiver.close()

    assert time.monotonic() - started < 10
    assert len(records) == 1
    assert records[0]["orig_pkts"] == 3 and records[0]["dst_port"] == port
    assert records[0]["orig_bytes"] == 20 + 21 + 22


_TRAFFIC = """
import socket, sys, time
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
client = socket.create_connection(srv.getsockname()); peer, _ = srv.accept()
client.sendall(b"hello"); peer.recv(10)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(5):
    udp.sendto(b"ping", ("127.0.0.1", 5353))
print("sent", flush=True)
time.sleep(float(sys.argv[1]))  # the TCP connection stays open meanwhile
"""


@pytest.fixture
def namespace():
    why = netns_unavailable()
    if why:
        pytest.skip(why)
    name = f"gwls{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_agent_scores_the_connections_still_open(
    namespace, data_dir, tmp_path_factory, tmp_path, sig
):
    tm = tiny(data_dir, tmp_path_factory)
    summary = tmp_path / "summary.json"
    agent = subprocess.Popen(
        ["ip", "netns", "exec", namespace, sys.executable, "-m", "edge_agent.cli",
         "run", "--artifact", str(tm.artifact), "--source", "iface:lo",
         "--site", "s1", "--gateway", "g1", "--outbox", str(tmp_path / "o.db"),
         "--alerts", "", "--summary-json", str(summary)],
        cwd=REPO, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(3.0)  # the capture is open
        traffic = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, "-c", _TRAFFIC, "20"],
            stdout=subprocess.PIPE, text=True)
        assert traffic.stdout.readline().strip() == "sent"
        time.sleep(1.0)
        agent.send_signal(sig)
        _, err = agent.communicate(timeout=60)
    finally:
        agent.kill()
        traffic.kill()
        traffic.wait()

    assert agent.returncode in (0, 130), err
    assert "Traceback" not in err
    got = json.loads(summary.read_text())
    # The open TCP connection and the UDP datagrams: two flows, scored.
    assert got["flows"] >= 2, err


def test_a_capture_is_open_while_a_silent_broker_is_tried(
    namespace, data_dir, tmp_path_factory, tmp_path
):
    """Found: with the broker down at start, the capture opened only once the
    connect timeout ran out (10 s by default), and flows in that time were lost."""
    tm = tiny(data_dir, tmp_path_factory)
    summary = tmp_path / "summary.json"
    agent = subprocess.Popen(
        ["ip", "netns", "exec", namespace, sys.executable, "-m", "edge_agent.cli",
         "run", "--artifact", str(tm.artifact), "--source", "iface:lo",
         "--broker", "mqtt://127.0.0.1:1", "--connect-timeout", "30",
         "--site", "s1", "--gateway", "g1", "--outbox", str(tmp_path / "o.db"),
         "--alerts", "", "--summary-json", str(summary), "--drain-timeout", "1"],
        cwd=REPO, stderr=subprocess.PIPE, text=True,
    )
    traffic = None
    try:
        time.sleep(4.0)  # well inside the 30 s the broker is waited for
        traffic = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, "-c", _TRAFFIC, "20"],
            stdout=subprocess.PIPE, text=True)
        assert traffic.stdout.readline().strip() == "sent"
        time.sleep(1.0)
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=90)
    finally:
        agent.kill()
        if traffic is not None:
            traffic.kill()
            traffic.wait()

    assert "Traceback" not in err
    assert json.loads(summary.read_text())["flows"] >= 2, err


def test_the_capture_filter_leaves_out_the_agents_own_broker_connection(
    monkeypatch, caplog
):
    from edge_agent.cli import capture_filter

    own = "tcp and port 1883 and (host 127.0.0.1)"
    assert capture_filter(None, "mqtt://127.0.0.1:1883") == f"not ({own})"
    assert capture_filter("not port 22", "mqtt://127.0.0.1") == (
        f"(not port 22) and not ({own})")
    assert capture_filter("udp", None) == "udp"
    assert capture_filter(None, None) is None

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    assert capture_filter("udp", "mqtts://broker.example:8883") == "udp"
    assert "broker host broker.example does not resolve" in caplog.text


@pytest.mark.skipif(os.geteuid() != 0, reason="capturing on lo needs root here")
def test_a_capture_with_that_filter_sees_other_connections_only():
    """Found: the agent scored (and escalated) its own MQTT connection, and each
    failed reconnect to a broker that was down became a flow."""
    from edge_agent.cli import capture_filter
    from flows.meter.live import iter_live

    servers = [socket.socket() for _ in range(2)]
    for srv in servers:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
    broker_port, other_port = (srv.getsockname()[1] for srv in servers)
    bpf = capture_filter(f"tcp and (port {broker_port} or port {other_port})",
                         f"mqtt://127.0.0.1:{broker_port}")
    end = threading.Event()

    def talk():
        time.sleep(0.5)
        for srv in servers:
            client = socket.create_connection(srv.getsockname())
            peer, _ = srv.accept()
            client.sendall(b"hello")
            peer.recv(10)
            client.close()
            peer.close()
        time.sleep(0.3)
        end.set()

    thread = threading.Thread(target=talk)
    thread.start()
    records = list(iter_live("lo", bpf=bpf, end=end, duration=15.0))
    thread.join()
    for srv in servers:
        srv.close()

    assert [r["dst_port"] for r in records] == [other_port]


def test_packets_libpcap_dropped_are_warned_once_per_new_drop(caplog):
    """Found: packets the capture could not keep up with were never reported
    (libpcap's drop counters were not read), so flows went missing silently."""
    from flows.meter.live import _note_drops

    class Cap:
        counts = (100, 3, 1)

        def stats(self):
            return self.counts

    cap = Cap()
    with caplog.at_level(logging.WARNING, logger="gatewatch"):
        seen = _note_drops(cap, "eth0")
        assert seen == 4 and _note_drops(cap, "eth0", seen) == 4
        cap.counts = (200, 10, 1)
        assert _note_drops(cap, "eth0", seen) == 11
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith("eth0: 4 packets dropped before the flow meter")
    assert "(3 by libpcap, 1 by the interface)" in messages[0]
    assert messages[1].startswith("eth0: 11 packets dropped")


def test_a_capture_filter_for_a_file_source_is_a_usage_error(
    data_dir, tmp_path_factory, tmp_path, capsys
):
    from edge_agent.cli import main

    tm = tiny(data_dir, tmp_path_factory)
    code = main(["run", "--artifact", str(tm.artifact), "--source", "-",
                 "--site", "s1", "--gateway", "g1", "--outbox",
                 str(tmp_path / "o.db"), "--capture-filter", "udp"])
    assert code == 2
    assert "--capture-filter applies to iface:NAME sources only" in (
        capsys.readouterr().err)
