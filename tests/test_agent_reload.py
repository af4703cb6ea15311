"""SIGHUP makes a running ``edge-agent run`` load its artifact again.

The operator's path after ``edge-agent rollback`` (or any switch of the model
slots' ``current`` link): ``systemctl reload`` sends SIGHUP, the agent loads the
link's model, health-checks it and swaps it in between two batches, without a
restart. A model that fails its health check is refused and the running one stays.
The model in use is read back from the agent's own alert lines and summary.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

from tests.conftest import signal_state, wait_for  # noqa: E402
from tests.test_ota_artifacts import (  # noqa: E402
    conn_records,
    fit_conn_encoder,
    make_artifact,
)

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.timeout(120)


def _lines(path: Path) -> list[dict]:
    """The complete alert lines written so far (not one being written)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line]


def _wait(cond, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _point(current: Path, slot: str) -> None:
    """Switch the ``current`` link to ``slot`` in one rename, as the slots do."""
    tmp = current.with_name(".current.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(slot)
    os.replace(tmp, current)


def test_sighup_reloads_the_current_link_and_refuses_a_failing_model(tmp_path):
    enc = fit_conn_encoder()
    slots = tmp_path / "models"
    make_artifact(slots / "A", version="va", seed=1, encoder=enc)
    make_artifact(slots / "B", version="vb", seed=2, encoder=enc)
    # Its probe's expected scores are off: the health check fails.
    make_artifact(slots / "C", version="vc", seed=3, encoder=enc, expected_shift=0.3)
    current = slots / "current"
    current.symlink_to("A")
    alerts, log = tmp_path / "alerts.jsonl", tmp_path / "agent.log"
    records = conn_records(600, seed=4)
    agent = subprocess.Popen(
        [
            str(BIN / "edge-agent"), "run", "-v",
            "--artifact", str(current), "--source", "-",
            "--site", "s1", "--gateway", "g1",
            "--outbox", str(tmp_path / "o.db"),
            "--alerts", str(alerts), "--summary-json", str(tmp_path / "s.json"),
        ],
        stdin=subprocess.PIPE, stderr=open(log, "w"), text=True,
    )  # fmt: skip

    def feed(part: list[dict]) -> None:
        agent.stdin.write("".join(json.dumps(r) + "\n" for r in part))
        agent.stdin.flush()

    try:
        # Model A scores the first flows (an alert line shows the agent runs).
        feed(records[:200])
        _wait(lambda: len(_lines(alerts)) > 0, "the first alerts")
        seen = len(_lines(alerts))

        # Rolled back to B: SIGHUP, and the later flows are B's.
        _point(current, "B")
        agent.send_signal(signal.SIGHUP)
        _wait(lambda: "model reloaded" in log.read_text(), "the reload")
        feed(records[200:400])
        _wait(
            lambda: any(a["model_version"] == "vb" for a in _lines(alerts)),
            "model B's alerts",
        )

        # A failing model: refused, B goes on.
        _point(current, "C")
        agent.send_signal(signal.SIGHUP)
        _wait(lambda: "refused" in log.read_text(), "the refusal")
        feed(records[400:])
        agent.stdin.close()
        rc = agent.wait(60)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()

    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert f"model reloaded from {current}: vb (was va)" in text
    assert f"reload of {current} refused, model vb keeps running" in text
    assert "Traceback" not in text
    versions = [a["model_version"] for a in _lines(alerts)]
    assert set(versions[:seen]) == {"va"}
    # Once B ran, A never came back, and C never ran.
    first_b = versions.index("vb")
    assert set(versions[first_b:]) == {"vb"}
    assert json.loads((tmp_path / "s.json").read_text())["model_version"] == "vb"


def _ignores(pid: int, signum: int) -> bool:
    """Whether process ``pid`` ignores ``signum`` (Linux: /proc/PID/status)."""
    return signal_state(pid, signum, "SigIgn")


def _end_input(agent: subprocess.Popen, records: list[dict]) -> int | None:
    """Write ``records`` to the agent's stdin, end it and wait for the agent's exit
    code (one that has not ended in 60 s is killed: None)."""
    try:
        if agent.poll() is None:
            agent.stdin.write("".join(json.dumps(r) + "\n" for r in records))
            agent.stdin.close()
        return agent.wait(60)
    except BrokenPipeError:  # it had ended already: its own exit code
        return agent.wait(60)
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.wait()
        return None


def test_a_sighup_while_the_agent_starts_does_not_end_it(tmp_path):
    """Found by an operator tester: SIGHUP in the agent's first half second (while
    it imports numpy and loads its model) ended it, and systemd counts an end by
    SIGHUP as clean, so Restart=on-failure would not start it again."""
    enc = fit_conn_encoder()
    art = make_artifact(tmp_path / "a", version="va", seed=1, encoder=enc)
    agent = subprocess.Popen(
        [str(BIN / "edge-agent"), "run", "--artifact", str(art), "--source", "-",
         "--site", "s1", "--gateway", "g1", "--outbox", str(tmp_path / "o.db"),
         "--alerts", ""],
        stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        # Python's own start (before the entry point's first line) cannot be
        # guarded: the signals begin once the process ignores SIGHUP.
        wait_for(lambda: _ignores(agent.pid, signal.SIGHUP), 30, "SIGHUP ignored",
                 poll=0.005)
        for _ in range(5):  # over the start, before the reload handler exists
            time.sleep(0.05)
            agent.send_signal(signal.SIGHUP)
    finally:
        rc = _end_input(agent, conn_records(20))
    assert rc == 0, agent.stderr.read()
    assert "summary: flows 20" in agent.stderr.read()


def test_an_agent_that_ends_during_a_reload_exits_cleanly(tmp_path):
    """Found by CI: a SIGHUP just before the input ended left the reload's thread
    loading the model while the agent exited, and the runtime's threads were torn
    down under it ("terminate called without an active exception", exit -6). The
    run waits for a reload in flight before it ends."""
    enc = fit_conn_encoder()
    art = make_artifact(tmp_path / "a", version="va", seed=1, encoder=enc)
    for attempt in range(8):
        agent = subprocess.Popen(
            [str(BIN / "edge-agent"), "run", "--artifact", str(art), "--source", "-",
             "--site", "s1", "--gateway", "g1",
             "--outbox", str(tmp_path / f"o{attempt}.db"), "--alerts", ""],
            stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            wait_for(lambda a=agent: signal_state(a.pid, signal.SIGHUP, "SigCgt"), 30,
                     "the reload handler", poll=0.002)
            for _ in range(3):
                agent.send_signal(signal.SIGHUP)
        finally:
            rc = _end_input(agent, conn_records(5))
        err = agent.stderr.read()
        assert rc == 0, err
        assert "summary: flows 5" in err
        assert "terminate called" not in err


class _SlowReloads:
    """An agent stand-in whose reload takes ``seconds`` and counts its loads."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = threading.Event()
        self.loads = 0
        self.finished = 0

    def reload_model(self, artifact) -> bool:
        self.loads += 1
        self.started.set()
        time.sleep(self.seconds)
        self.finished += 1
        return True


def test_sighups_during_a_load_ask_for_one_more_and_the_end_waits_for_it():
    from edge_agent.cli import _Reloads

    agent = _SlowReloads(0.3)
    before = signal.getsignal(signal.SIGHUP)
    reloads = _Reloads(agent, "models/current")
    reloads.install()
    try:
        assert signal.getsignal(signal.SIGHUP) == reloads.request
        reloads.request()
        assert agent.started.wait(5)
        for _ in range(4):  # while the first load runs: one more load, not four
            reloads.request()
        wait_for(lambda: agent.loads == 2, 5, "the second load")
    finally:
        reloads.finish()
    # finish() returned only once the load in flight had ended.
    assert (agent.loads, agent.finished) == (2, 2)
    assert signal.getsignal(signal.SIGHUP) == before


def test_the_end_of_a_run_waits_only_so_long_for_a_reload(caplog):
    from edge_agent.cli import _Reloads

    agent = _SlowReloads(1.5)
    reloads = _Reloads(agent, "models/current")
    reloads.install()
    reloads.request()
    assert agent.started.wait(5)
    began = time.monotonic()
    with caplog.at_level("WARNING", logger="edge_agent"):
        reloads.finish(wait_s=0.2)
    assert time.monotonic() - began < 1.2
    assert agent.finished == 0
    assert "a model reload of models/current still runs after 0.2 s" in caplog.text
    reloads.worker.join(5)


class _SlowUpdater:
    """A model updater stand-in whose handling takes ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = threading.Event()
        self.done = False

    def handle(self, payload: bytes):
        self.started.set()
        time.sleep(self.seconds)
        self.done = True
        return type("Refused", (), {"ok": False, "reason": "test"})()


def test_closing_the_agent_waits_for_a_model_update_being_handled(
    tmp_path, caplog, monkeypatch
):
    """As for SIGHUP: a model update still loading its model when the run ended
    was cut off by the exit."""
    from edge_agent import agent as agent_mod
    from edge_agent import protocol as proto
    from edge_agent.agent import Agent
    from edge_agent.outbox import Outbox
    from edge_agent.runtime import load_artifact

    art = make_artifact(tmp_path / "a", version="va", seed=1,
                        encoder=fit_conn_encoder())
    for seconds, wait_s in ((0.4, 30.0), (1.5, 0.2)):
        agent = Agent(load_artifact(art), site="s1", gateway="g1",
                      outbox=Outbox(tmp_path / f"o{seconds}.db"))
        updater = _SlowUpdater(seconds)
        agent.enable_model_updates(updater)
        monkeypatch.setattr(agent_mod, "MODEL_UPDATE_WAIT_S", wait_s)
        agent._on_message(agent.topics[proto.Channel.MODEL], b"{}")
        assert updater.started.wait(5)
        began = time.monotonic()
        with caplog.at_level("WARNING", logger="edge_agent"):
            agent.close()
        if wait_s > seconds:
            assert updater.done
            assert "still being handled" not in caplog.text
        else:
            assert not updater.done
            assert time.monotonic() - began < 1.2
            assert "a model update is still being handled after 0.2 s" in caplog.text
