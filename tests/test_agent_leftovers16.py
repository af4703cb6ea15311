"""Round 16 leftovers of ``edge-agent run``.

- A SIGTERM (or Ctrl-C) in the agent's first half second, while it imports and
  loads its model, or just after its summary line, ended it by the signal (-15,
  -2), a code no table documents. A SIGTERM while it starts is now a clean stop
  (exit 0, one ``stopped:`` line), one while it opens its outbox is held until
  the outbox is whole, and one after the drain is ignored.
- An ``iface:`` source whose interface is not there yet at boot can be waited for
  (``--wait-interface SECONDS``).
- An outbox path that is a symbolic link loop was called an unwritable folder.
- A followed log rotated by rename in two steps warned that it was removed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

from edge_agent import entry  # noqa: E402
from edge_agent.cli import main  # noqa: E402
from edge_agent.outbox import Outbox  # noqa: E402
from edge_agent.sources import open_source  # noqa: E402
from flows.errors import GatewatchError  # noqa: E402
from tests.conftest import signal_state, wait_for  # noqa: E402
from tests.test_agent_imports import _HEADER  # noqa: E402
from tests.test_ota_artifacts import (  # noqa: E402
    conn_records,
    fit_conn_encoder,
    make_artifact,
)

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """A small artifact the agent loads (no data folder needed)."""
    folder = tmp_path_factory.mktemp("leftovers16")
    return make_artifact(folder / "a", encoder=fit_conn_encoder())


def _row(i: int) -> str:
    """A Zeek TSV row under ``_HEADER`` whose uid is ``C{i}``."""
    return (
        f"{1655071198 + i}.5\tC{i}\t10.0.0.5\t{10000 + i}\t10.0.0.1\t53\tudp"
        f"\tdns\t0.01\t40\t80\tSF\tDd\t1\t1\tBenign"
    )


def _log_text(first: int, last: int) -> str:
    """A conn.log with its header and the rows ``first``..``last``."""
    return "\n".join([*_HEADER, *map(_row, range(first, last + 1))]) + "\n"


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler of its own for ``signum`` (Linux)."""
    return signal_state(pid, signum, "SigCgt")


def _run_args(art: Path, outbox: Path, *more: str) -> list[str]:
    """``edge-agent run`` on stdin with its own outbox and no alerts output."""
    return [
        str(BIN / "edge-agent"), "run", "--artifact", str(art), "--source", "-",
        "--site", "s16", "--gateway", "g16", "--outbox", str(outbox),
        "--alerts", "", *more,
    ]


# ---------------------------------------------------------------------------------
# 1. SIGTERM at any moment


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
@pytest.mark.parametrize("after", [0.0, 0.15, 0.4, 0.8])
def test_a_sigterm_while_the_agent_starts_is_a_clean_stop(artifact, tmp_path, after):
    """SIGTERM ``after`` seconds past the entry point's first line: exit 0 with one
    line, never an end by the signal, and an outbox the next run opens. Right
    at the start (the imports) it is the ``stopped:`` line; later it may be the
    run's own orderly stop (its summary line)."""
    outbox = tmp_path / "o.db"
    agent = subprocess.Popen(
        _run_args(artifact, outbox), stdin=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(lambda: _catches(agent.pid, signal.SIGTERM), 30, "the handler",
                 poll=0.005)
        time.sleep(after)
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=60)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()

    assert agent.returncode == 0, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    if after == 0.0:
        assert lines[0] == entry.STOPPED_WHILE_STARTING
    else:
        assert lines[0] == entry.STOPPED_WHILE_STARTING or lines[0].startswith(
            "summary: flows 0, "), err
    if outbox.exists():  # whole, and let go of
        box = Outbox(outbox, lock=True)
        assert len(box) == 0
        box.close()


class _StopAfterWal(sqlite3.Connection):
    """An SQLite connection that signals this process right after the outbox
    turned on its write-ahead log, before its tables exist: the moment a stop
    used to leave a file the next run refused as damaged."""

    signum = signal.SIGTERM

    def execute(self, sql, *args):
        cursor = super().execute(sql, *args)
        if sql.startswith("PRAGMA journal_mode"):
            os.kill(os.getpid(), self.signum)
        return cursor


@pytest.mark.parametrize(
    ("signum", "code", "said"),
    [
        (signal.SIGTERM, 0, entry.STOPPED_WHILE_STARTING),
        (signal.SIGINT, 130, "error: interrupted"),
    ],
)
def test_a_stop_while_the_outbox_is_made_waits_until_it_is_whole(
    artifact, tmp_path, monkeypatch, capsys, signum, code, said
):
    """A SIGTERM or Ctrl-C between two steps of making a new outbox is held until
    the outbox is whole, then acted on: the run ends before reading (0 with the
    ``stopped:`` line, or 130) and the file is an empty outbox, not one that
    the next run refuses as damaged (exit 3)."""
    log = tmp_path / "conn.log"
    log.write_text(_log_text(1, 20))
    outbox = tmp_path / "o.db"
    real_connect = sqlite3.connect
    stopping = type("Stopping", (_StopAfterWal,), {"signum": signum})
    monkeypatch.setattr(
        sqlite3, "connect", lambda *a, **k: real_connect(*a, factory=stopping, **k)
    )
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    entry.release_stops()  # as edge_agent.entry.main leaves it for run
    for s in before:
        signal.signal(s, entry._on_stop)
    try:
        rc = main(["run", "--artifact", str(artifact), "--source", f"zeek:{log}",
                   "--site", "s16", "--gateway", "g16", "--outbox", str(outbox),
                   "--alerts", ""])
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        monkeypatch.undo()

    err = capsys.readouterr().err
    assert rc == code, err
    assert err.splitlines() == [said]
    box = Outbox(outbox, lock=True)  # whole, empty, and its lock let go
    assert len(box) == 0
    box.close()


def _records_and_a_bad_line() -> str:
    """Stdin for a run that ends with exit 4: 20 flows and one rejected line."""
    lines = [json.dumps(r) for r in conn_records(20)]
    return "\n".join([*lines, "this is no record"]) + "\n"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_after_the_summary_line_keeps_the_runs_exit_code(
    artifact, tmp_path, signum, interactive_sigint
):
    """SIGTERM or SIGINT sent over and over from the summary line on: the run
    still ends with its own code (4: a rejected line) and error line, not by
    the signal."""
    agent = subprocess.Popen(
        _run_args(artifact, tmp_path / "o.db"), stdin=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    sent = 0
    try:
        agent.stdin.write(_records_and_a_bad_line())
        agent.stdin.close()
        seen = []
        for line in agent.stderr:
            seen.append(line)
            if line.startswith("summary:"):
                break
        deadline = time.monotonic() + 30
        while agent.poll() is None and time.monotonic() < deadline:
            try:
                agent.send_signal(signum)
            except ProcessLookupError:
                break
            sent += 1
            time.sleep(0.0005)
        err = "".join(seen) + agent.stderr.read()
        agent.wait(30)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()

    assert sent > 0
    assert agent.returncode == 4, err
    assert "summary: flows 20," in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "1 input line(s) of stdin were rejected" in errors[0]
    assert "Traceback" not in err and "interrupted" not in err


# ---------------------------------------------------------------------------------
# 2. --wait-interface

_SEND = """
import socket, sys
out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for port in range(7100, 7100 + int(sys.argv[1])):
    out.sendto(b"hello", ("10.78.0.1", port))
print("sent", flush=True)
"""

_WAITING = "gwv0: no such interface yet; waiting up to"


@pytest.fixture
def namespaces():
    """Two network namespaces made here (the agent's, the sender's), with no
    link yet; the test adds one. Both removed at the end."""
    from tests.test_faults import netns_unavailable

    if sys.platform != "linux":
        pytest.skip("network namespaces: Linux")
    why = netns_unavailable()
    if why:
        pytest.skip(why)
    pytest.importorskip("pcapy", reason="pcapy-ng is not installed")
    tag = uuid.uuid4().hex[:6]
    near, far = f"gw16a{tag}", f"gw16b{tag}"
    subprocess.run(["ip", "netns", "add", near], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "netns", "add", far], check=True, capture_output=True)
        yield near, far
    finally:
        subprocess.run(["ip", "netns", "del", far], capture_output=True)
        subprocess.run(["ip", "netns", "del", near], capture_output=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class _Agent:
    """``edge-agent -v run`` on ``iface:gwv0`` in namespace ``near``, its stderr
    gathered line by line in a thread."""

    def __init__(self, near: str, art: Path, folder: Path, *more: str) -> None:
        self.summary = folder / "summary.json"
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", near, str(BIN / "edge-agent"), "-v", "run",
             "--artifact", str(art), "--source", "iface:gwv0",
             "--capture-filter", "udp", "--site", "s16", "--gateway", "g16",
             "--outbox", str(folder / "o.db"), "--alerts", "",
             "--summary-json", str(self.summary), "--drain-timeout", "1", *more],
            stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._gather, daemon=True)
        self.thread.start()

    def _gather(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def said(self, text: str) -> int:
        """How many lines so far hold ``text``."""
        return sum(text in line for line in list(self.lines))

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        rc = self.proc.wait(timeout)
        self.thread.join(10)
        return rc, "\n".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_wait_interface_captures_on_an_interface_made_after_the_start(
    namespaces, artifact, tmp_path
):
    """Started before its interface exists (a boot), the agent says once that it
    waits; the interface made a second later is captured on: six datagrams sent
    over it are six flows, and a SIGTERM then ends the run with exit 0."""
    near, far = namespaces
    agent = _Agent(near, artifact, tmp_path, "--wait-interface", "30")
    try:
        wait_for(lambda: agent.said(_WAITING), 30, "the waiting line")
        time.sleep(1.0)
        _ip("-n", near, "link", "add", "gwv0", "type", "veth", "peer", "name",
            "gwv1", "netns", far)
        _ip("-n", near, "addr", "add", "10.78.0.1/24", "dev", "gwv0")
        _ip("-n", far, "addr", "add", "10.78.0.2/24", "dev", "gwv1")
        _ip("-n", near, "link", "set", "gwv0", "up")
        _ip("-n", far, "link", "set", "gwv1", "up")
        wait_for(lambda: agent.said("capturing on gwv0"), 30, "the capture")
        sent = subprocess.run(
            ["ip", "netns", "exec", far, sys.executable, "-c", _SEND, "6"],
            capture_output=True, text=True, timeout=30)
        assert sent.stdout.strip() == "sent", sent.stderr
        time.sleep(1.0)
        agent.proc.send_signal(signal.SIGTERM)
        rc, err = agent.finish()
    finally:
        agent.kill()

    assert rc == 0, err
    assert agent.said(_WAITING) == 1, err
    assert agent.said("waiting up to 30 s for it") == 1
    assert json.loads(agent.summary.read_text())["flows"] == 6, err
    assert "error:" not in err and "Traceback" not in err


def test_wait_interface_ends_with_exit_3_when_it_never_comes(
    namespaces, artifact, tmp_path
):
    """An interface that never appears: exit 3 once the wait is over (about 1.5 s
    after the waiting line), one error line naming the interface and the wait."""
    near, _ = namespaces
    agent = _Agent(near, artifact, tmp_path, "--wait-interface", "1.5")
    try:
        wait_for(lambda: agent.said(_WAITING), 30, "the waiting line")
        began = time.monotonic()
        rc, err = agent.finish()
        waited = time.monotonic() - began
    finally:
        agent.kill()

    assert rc == 3, err
    assert 1.0 <= waited <= 15.0, waited
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert errors[0].startswith("error: no interface named 'gwv0' (interfaces: ")
    assert errors[0].endswith("; waited 1.5 s for it (--wait-interface)")
    assert agent.said(_WAITING) == 1


def test_a_sigterm_while_it_waits_for_the_interface_is_a_clean_stop(
    namespaces, artifact, tmp_path
):
    """SIGTERM during the wait: the run stops at once with no flow read, exit 0."""
    near, _ = namespaces
    agent = _Agent(near, artifact, tmp_path, "--wait-interface", "120")
    try:
        wait_for(lambda: agent.said(_WAITING), 30, "the waiting line")
        agent.proc.send_signal(signal.SIGTERM)
        rc, err = agent.finish(timeout=20)
    finally:
        agent.kill()

    assert rc == 0, err
    assert json.loads(agent.summary.read_text())["flows"] == 0
    assert "error:" not in err


class _FakePcapy:
    """A stand-in for pcapy whose ``open_live`` fails with the given messages,
    one per try, then opens."""

    class PcapError(Exception):
        pass

    def __init__(self, failures: list[str]) -> None:
        self.failures = list(failures)
        self.tries = 0
        self.closed = 0

    def open_live(self, *_args):
        self.tries += 1
        if self.failures:
            raise self.PcapError(self.failures.pop(0))
        return self

    def close(self) -> None:
        self.closed += 1


def test_an_interface_that_is_there_but_not_up_is_waited_for(monkeypatch, caplog):
    """Down is waited for as missing is (libpcap cannot capture on it), said once;
    the handle opened to find it up is closed again."""
    from flows.meter.live import wait_for_interface

    fake = _FakePcapy(["eth9: That device is not up"] * 3)
    monkeypatch.setitem(sys.modules, "pcapy", fake)
    with caplog.at_level(logging.WARNING, logger="gatewatch"):
        assert wait_for_interface("eth9", 10, poll=0.01) is True
    assert (fake.tries, fake.closed) == (4, 1)
    assert caplog.text.count("eth9: it is not up; waiting up to 10 s for it") == 1


def test_another_capture_error_ends_the_wait_at_once(monkeypatch):
    """No privilege will not change by waiting: the wait ends at the first try,
    and the capture opened next reports it as without a wait."""
    from flows.meter.live import wait_for_interface

    fake = _FakePcapy(["eth9: You don't have permission to capture on that device"])
    monkeypatch.setitem(sys.modules, "pcapy", fake)
    began = time.monotonic()
    assert wait_for_interface("eth9", 30, poll=0.01) is True
    assert fake.tries == 1 and time.monotonic() - began < 5


def test_wait_interface_is_for_iface_sources_only(artifact, tmp_path, capsys):
    log = tmp_path / "conn.log"
    log.write_text(_log_text(1, 3))
    rc = main(["run", "--artifact", str(artifact), "--source", f"zeek:{log}",
               "--site", "s16", "--gateway", "g16", "--outbox",
               str(tmp_path / "o.db"), "--wait-interface", "5"])
    assert rc == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --wait-interface applies to iface:NAME sources only"]


# ---------------------------------------------------------------------------------
# 3. An outbox path that is a symbolic link loop


def _loop(folder: Path) -> tuple[Path, Path]:
    """Two links in ``folder`` that name each other."""
    one, two = folder / "one", folder / "two"
    one.symlink_to(two)
    two.symlink_to(one)
    return one, two


def test_an_outbox_that_is_a_link_loop_is_named_as_one(tmp_path):
    one, _ = _loop(tmp_path)
    with pytest.raises(GatewatchError) as info:
        Outbox(one, lock=True)
    assert info.value.exit_code == 1
    assert str(info.value) == (
        f"cannot open the outbox {one}: {one} is a symbolic link loop (its links "
        "lead back to themselves, or run longer than the system follows); point "
        "it at a file, or remove it"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]


def test_an_outbox_under_a_link_loop_names_the_loop(artifact, tmp_path, capsys):
    one, _ = _loop(tmp_path)
    outbox = one / "deeper" / "o.db"
    rc = main(["run", "--artifact", str(artifact), "--source", "-", "--site",
               "s16", "--gateway", "g16", "--outbox", str(outbox)])
    assert rc == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: cannot open the outbox {outbox}: {one} is a symbolic link loop "
        "(its links lead back to themselves, or run longer than the system "
        "follows); point it at a folder, or remove it"
    ]


# ---------------------------------------------------------------------------------
# 4. A rename rotation of a followed log, in two steps

_GONE = "the file was removed; waiting for a new one"


def _follower(log: Path, poll: float):
    """``log`` followed (polled every ``poll`` s) by a source whose records a
    started thread gathers into the list."""
    src = open_source(f"zeek:{log}", follow=True, poll=poll)
    got: list[dict] = []
    thread = threading.Thread(target=lambda: got.extend(src), daemon=True)
    thread.start()
    return src, got, thread


def test_a_rename_rotation_in_two_steps_is_read_across_without_a_warning(
    tmp_path, caplog
):
    """``mv conn.log conn.log.1``, then a new ``conn.log`` 1.2 s later (more than
    a poll, less than two): no "removed" warning, and every row of both files."""
    log = tmp_path / "conn.log"
    log.write_text(_log_text(1, 5))
    with caplog.at_level(logging.WARNING, logger="gatewatch"):
        src, got, thread = _follower(log, poll=1.0)
        wait_for(lambda: len(got) == 5, 20, "the first 5 records")
        log.rename(tmp_path / "conn.log.1")
        time.sleep(1.2)
        log.write_text(_log_text(6, 9))
        wait_for(lambda: len(got) == 9, 20, "the rows of the new file")
        src.end.set()
        thread.join(10)

    assert not thread.is_alive()
    assert [r["uid"] for r in got] == [f"C{i}" for i in range(1, 10)]
    assert _GONE not in caplog.text
    assert src.rejected == {} and src.error is None


def test_a_followed_log_that_stays_gone_is_still_warned_once(tmp_path, caplog):
    """Removed and not made again: warned once, after the grace of two polls."""
    log = tmp_path / "conn.log"
    log.write_text(_log_text(1, 3))
    poll = 0.1
    with caplog.at_level(logging.WARNING, logger="gatewatch"):
        src, got, thread = _follower(log, poll=poll)
        wait_for(lambda: len(got) == 3, 20, "the records")
        log.unlink()
        gone = time.monotonic()
        wait_for(lambda: _GONE in caplog.text, 20, "the warning")
        warned = time.monotonic()
        time.sleep(5 * poll)
        src.end.set()
        thread.join(10)

    assert not thread.is_alive()
    assert warned - gone >= 2 * poll
    assert caplog.text.count(_GONE) == 1
    assert [r["uid"] for r in got] == ["C1", "C2", "C3"]


def test_wait_interface_is_read_from_the_config_file(artifact, tmp_path, capsys):
    """A flashed unit runs from its config: ``wait_interface`` there is the flag's
    setting (checked as the flag is), and a negative one is refused by name."""
    log = tmp_path / "conn.log"
    log.write_text(_log_text(1, 3))
    config = tmp_path / "gateway.toml"
    base = ["run", "--artifact", str(artifact), "--source", f"zeek:{log}",
            "--site", "s16", "--gateway", "g16", "--outbox", str(tmp_path / "o.db"),
            "--config", str(config)]

    config.write_text("wait_interface = 5\n")
    capsys.readouterr()
    assert main(base) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --wait-interface applies to iface:NAME sources only"]

    config.write_text("wait_interface = -1\n")
    assert main(base) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "wait_interface" in err, err
