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
        agent.stdin.write("".join(json.dumps(r) + "\n" for r in conn_records(20)))
        agent.stdin.close()
        rc = agent.wait(60)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert rc == 0, agent.stderr.read()
    assert "summary: flows 20" in agent.stderr.read()
