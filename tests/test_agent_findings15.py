"""Testers' findings on ``edge-agent run``: a live capture that fails part way
(the interface went down or was removed) and an outbox that cannot forget the
escalations the re-scorer answered (a full disk).

Found: when the interface of an ``iface:`` source went down, the agent threw away
the connections its flow meter held (``summary: flows 0``, where SIGTERM at the
same moment scored 16) and exited 3, bad input, for a source that had worked.
Found: a drain on a full disk said ``0 escalations were dropped because the
outbox could not store them`` when the failure was that answered ones could not
be removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from edge_agent.cli import _outbox_failed_text, main
from flows.errors import EXIT_PARTIAL_INPUT
from tests.test_agent_fixtures import tiny
from tests.test_meter_craft import A4, B4, eth, ip4, tcp, udp

REPO = Path(__file__).resolve().parent.parent


class PcapError(Exception):
    """Stands in for pcapy's error type: what a capture raises as it fails."""


class FailingCapture:
    """A stand-in for a pcapy capture: hands out ``frames`` on the first read,
    then fails as libpcap does when its interface goes down."""

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames
        self.reads = 0
        self.rfd, self.wfd = os.pipe()
        os.write(self.wfd, b"x")  # always readable: select() never waits

    def datalink(self) -> int:
        return 1  # Ethernet

    def setnonblock(self, _on: int) -> None:
        pass

    def getfd(self) -> int:
        return self.rfd

    def stats(self) -> tuple[int, int, int]:
        return len(self.frames), 0, 0

    def dispatch(self, _budget: int, callback) -> int:
        self.reads += 1
        if self.reads > 1:
            raise PcapError("The interface went down")
        now = time.time()
        for frame in self.frames:
            callback(Header(now, len(frame)), frame)
        return len(self.frames)

    def close(self) -> None:
        """Idempotent, as pcapy's is: the capture closes it, and so may a test."""
        for fd in (self.rfd, self.wfd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.rfd = self.wfd = -1


class Header:
    """A packet header as pcapy gives it: a time stamp and the wire length."""

    def __init__(self, t: float, length: int) -> None:
        self.t, self.length = t, length

    def getts(self) -> tuple[int, int]:
        return int(self.t), int((self.t % 1) * 1e6)

    def getlen(self) -> int:
        return self.length


def open_frames() -> list[bytes]:
    """Frames of 3 TCP connections still open (handshake and a request, no FIN)
    and 2 UDP datagrams to other ports: 5 connections the meter holds."""
    frames = []
    for k in range(3):
        sport = 40000 + k
        x, y = 1000, 5000
        for src, dst, sp, dp, seq, ack, flags, data in (
            (A4, B4, sport, 80, x, 0, "S", b""),
            (B4, A4, 80, sport, y, x + 1, "SA", b""),
            (A4, B4, sport, 80, x + 1, y + 1, "A", b""),
            (A4, B4, sport, 80, x + 1, y + 1, "PA", b"GET / HTTP/1.0\r\n\r\n"),
        ):
            frames.append(eth(ip4(src, dst, 6, tcp(src, dst, sp, dp, seq, ack,
                                                   flags, data))))
    for port in (5353, 5354):
        frames.append(eth(ip4(A4, B4, 17, udp(A4, B4, 41000, port, b"ping"))))
    return frames


def test_a_capture_that_fails_part_way_yields_its_open_connections_first(
    monkeypatch,
):
    from flows.meter import live

    cap = FailingCapture(open_frames())
    monkeypatch.setattr(live, "open_live", lambda *a, **k: cap)
    got = []
    try:
        with pytest.raises(live.CaptureFailedError) as info:
            for rec in live.iter_live("gwfake0", duration=10.0):
                got.append(rec)
    finally:
        cap.close()

    assert str(info.value) == (
        "live capture on 'gwfake0' failed: The interface went down")
    assert info.value.exit_code == EXIT_PARTIAL_INPUT
    assert cap.reads == 2
    assert sorted((r["proto"], r["dst_port"]) for r in got) == [
        ("tcp", 80), ("tcp", 80), ("tcp", 80), ("udp", 5353), ("udp", 5354)]


def test_an_error_of_the_meter_is_not_reported_as_the_capture_failing(monkeypatch):
    """Found in review: an exception inside the meter (a bug, not the interface)
    was wrapped as "live capture ... failed" (exit 4, read as a link down)."""
    import flows.meter
    from flows.meter import live

    class MeterBug(RuntimeError):
        pass

    def broken_feed(*_a, **_k):
        raise MeterBug("meter bug")

    cap = FailingCapture(open_frames())
    monkeypatch.setattr(live, "open_live", lambda *a, **k: cap)
    real_make = flows.meter.make_meter

    class BrokenMeter:
        """The real meter, whose feed fails as a bug in it would."""

        def __init__(self, meter) -> None:
            self._meter = meter

        def __getattr__(self, name):
            return getattr(self._meter, name)

        feed = staticmethod(broken_feed)

    def make(*a, **k):
        return BrokenMeter(real_make(*a, **k))

    monkeypatch.setattr(flows.meter, "make_meter", make)
    try:
        with pytest.raises(MeterBug, match="meter bug"):
            list(live.iter_live("gwfake0", duration=10.0))
    finally:
        cap.close()


def test_an_agent_whose_capture_fails_scores_and_keeps_what_it_metered(
    monkeypatch, data_dir, tmp_path_factory, tmp_path, capsys
):
    from flows.meter import live

    tm = tiny(data_dir, tmp_path_factory)
    every = tmp_path / "every.json"  # every flow escalated: the outbox holds 5
    every.write_text(json.dumps({"escalate_low": 0.0, "decision": 0.0,
                                 "alert": 1.0}))
    cap = FailingCapture(open_frames())
    monkeypatch.setattr(live, "open_live", lambda *a, **k: cap)
    summary = tmp_path / "summary.json"
    try:
        rc = main(["run", "--artifact", str(tm.artifact), "--source",
                   "iface:gwfake0", "--site", "s1", "--gateway", "g1",
                   "--outbox", str(tmp_path / "o.db"), "--alerts", "",
                   "--thresholds", str(every), "--summary-json", str(summary),
                   "--drain-timeout", "1"])
    finally:
        cap.close()
    err = capsys.readouterr().err

    assert rc == EXIT_PARTIAL_INPUT, err
    got = json.loads(summary.read_text())
    assert got["flows"] == 5
    assert got["outbox_pending"] == 5
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: live capture on 'gwfake0' failed: The interface went down; the 5 "
        "flows read before it were scored and kept"
    ]
    assert "Traceback" not in err


def test_a_capture_that_fails_before_any_flow_is_still_partial_input(
    monkeypatch, data_dir, tmp_path_factory, tmp_path, capsys
):
    """No connection was open when the interface went down: nothing to keep, but
    the source worked and then failed; exit 4 still, not 3."""
    from flows.meter import live

    tm = tiny(data_dir, tmp_path_factory)
    cap = FailingCapture([])
    monkeypatch.setattr(live, "open_live", lambda *a, **k: cap)
    try:
        rc = main(["run", "--artifact", str(tm.artifact), "--source",
                   "iface:gwfake0", "--site", "s1", "--gateway", "g1",
                   "--outbox", str(tmp_path / "o.db"), "--alerts", "",
                   "--drain-timeout", "1"])
    finally:
        cap.close()
    err = capsys.readouterr().err

    assert rc == EXIT_PARTIAL_INPUT, err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: live capture on 'gwfake0' failed: The interface went down; no "
        "flow was read before it"
    ]


def test_answered_escalations_that_cannot_be_forgotten_are_not_called_dropped():
    summary = {"outbox_failed": 0, "outbox_failed_alerts": 0,
               "outbox_unforgotten": 28, "outbox_unforgotten_answered": 28}
    error = OSError("cannot forget 28 messages: database or disk is full")
    text = _outbox_failed_text(summary, error, True)

    assert "dropped" not in text
    assert text == (
        "28 answered escalations could not be removed from the outbox (last "
        "error: cannot forget 28 messages: database or disk is full); they stay "
        "in it and are sent again by the next run, as duplicates the re-scorer "
        "answers again"
    )


_SEND = """
import socket, sys, time
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for port in range(7000, 7000 + int(sys.argv[1])):
    udp.sendto(b"ping", ("10.77.0.1", port))
print("sent", flush=True)
"""


@pytest.fixture
def veth_pair():
    """Two network namespaces made here, joined by a veth pair: the agent's end
    ``gwv0`` (10.77.0.1) in the first, the sender's in the second; both removed."""
    from tests.test_faults import netns_unavailable

    why = netns_unavailable()
    if why:
        pytest.skip(why)
    tag = uuid.uuid4().hex[:6]
    near, far = f"gwcap{tag}", f"gwsnd{tag}"

    def ip(*args):
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", near)
    try:
        ip("netns", "add", far)
        ip("-n", near, "link", "add", "gwv0", "type", "veth", "peer", "name",
           "gwv1", "netns", far)
        ip("-n", near, "addr", "add", "10.77.0.1/24", "dev", "gwv0")
        ip("-n", far, "addr", "add", "10.77.0.2/24", "dev", "gwv1")
        ip("-n", near, "link", "set", "gwv0", "up")
        ip("-n", far, "link", "set", "gwv1", "up")
        yield near, far
    finally:
        subprocess.run(["ip", "netns", "del", far], capture_output=True)
        subprocess.run(["ip", "netns", "del", near], capture_output=True)


@pytest.mark.skipif(sys.platform != "linux", reason="network namespaces: Linux")
def test_an_interface_that_goes_down_keeps_the_flows_metered_before(
    veth_pair, data_dir, tmp_path_factory, tmp_path
):
    pytest.importorskip("pcapy", reason="pcapy-ng is not installed")
    near, far = veth_pair
    tm = tiny(data_dir, tmp_path_factory)
    summary = tmp_path / "summary.json"
    agent = subprocess.Popen(
        ["ip", "netns", "exec", near, sys.executable, "-m", "edge_agent.cli",
         "run", "--artifact", str(tm.artifact), "--source", "iface:gwv0",
         "--capture-filter", "udp", "--site", "s1", "--gateway", "g1",
         "--outbox", str(tmp_path / "o.db"), "--alerts", "",
         "--summary-json", str(summary), "--drain-timeout", "1"],
        cwd=REPO, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(3.0)  # the capture is open
        sent = subprocess.run(
            ["ip", "netns", "exec", far, sys.executable, "-c", _SEND, "6"],
            capture_output=True, text=True, timeout=30)
        assert sent.stdout.strip() == "sent", sent.stderr
        time.sleep(1.0)
        subprocess.run(["ip", "-n", near, "link", "set", "gwv0", "down"],
                       check=True)
        _, err = agent.communicate(timeout=60)
    finally:
        agent.kill()
        agent.wait()

    assert agent.returncode == EXIT_PARTIAL_INPUT, err
    assert "Traceback" not in err
    got = json.loads(summary.read_text())
    assert got["flows"] == 6, err  # six UDP datagrams, six ports: six flows
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: live capture on 'gwv0' failed: "), err
    assert errors[0].endswith("; the 6 flows read before it were scored and kept")
