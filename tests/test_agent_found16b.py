"""``edge-agent run``'s end, and by-reference model updates (tester's findings,
round 16, second batch).

- A SIGTERM during the drain at the end of a file read once was ignored: the run
  waited its whole ``--drain-timeout``. It now cuts the drain to 2 s from the
  SIGTERM and ends as the help says (verdicts still awaited are a warning; the
  escalations the broker did not take stay in the outbox, exit 6). A Ctrl-C
  during the drain of a followed log (after the first one) stops it at once.
- The summary counted sent escalations put back in the outbox to be published
  again twice (``outbox pending`` and ``awaiting a verdict``), the error called
  them not sent, and blamed ``--max-awaiting`` with its window far from full.
- A by-reference update whose file at the URL was not the signed archive was
  refused for good: the same message, once the right file was there, did
  nothing until the agent restarted.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import redirect_stderr
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("onnxruntime")

from edge_agent import entry  # noqa: E402
from edge_agent import protocol as proto  # noqa: E402
from edge_agent.agent import Agent  # noqa: E402
from edge_agent.cli import _not_sent, _report, main  # noqa: E402
from edge_agent.outbox import Outbox  # noqa: E402
from edge_agent.runtime import load_artifact  # noqa: E402
from tests.conftest import wait_for  # noqa: E402
from tests.test_agent_imports import _HEADER  # noqa: E402
from tests.test_ota_artifacts import (  # noqa: E402
    fit_conn_encoder,
    flashed_slots,
    make_artifact,
)

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.timeout(120)

FLOWS = 200
# Every flow escalated: the tiny model's scores all lie between these.
ESCALATE_ALL = {"decision": 0.001, "escalate_low": 0.001, "alert": 0.999}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """A small artifact that escalates every flow (no data folder needed)."""
    folder = tmp_path_factory.mktemp("found16b")
    return make_artifact(folder / "a", encoder=fit_conn_encoder(),
                         thresholds=ESCALATE_ALL)


@pytest.fixture
def conn_log(tmp_path: Path) -> Path:
    """A conn.log of FLOWS distinct flows."""
    rows = [
        f"{1655071198 + i}.5\tC{i}\t10.0.0.5\t{10000 + i}\t10.0.0.1\t53\tudp"
        f"\tdns\t0.01\t40\t80\tSF\tDd\t1\t1\tBenign"
        for i in range(FLOWS)
    ]
    path = tmp_path / "conn.log"
    path.write_text("\n".join([*_HEADER, *rows]) + "\n")
    return path


def _rows(outbox: Path, table: str) -> int:
    """Rows of one table of an outbox another process holds open (0 before it
    exists)."""
    if not outbox.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{outbox}?mode=ro", uri=True, timeout=1) as db:
            return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    except sqlite3.Error:
        return 0


def _run(artifact: Path, log: Path, outbox: Path, broker: str, *more: str):
    """``edge-agent run`` on a conn.log read once, in the background."""
    return subprocess.Popen(
        [str(BIN / "edge-agent"), "run", "--artifact", str(artifact),
         "--source", f"zeek:{log}", "--broker", broker, "--site", "s",
         "--gateway", "g", "--outbox", str(outbox), "--alerts", "", *more],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def _end(proc: subprocess.Popen, timeout: float) -> tuple[str, float]:
    """Wait for ``proc`` (killed past ``timeout``): its stderr and how long the
    wait took."""
    began = time.monotonic()
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(
            f"still running {timeout} s after the stop: {err}") from None
    return err, time.monotonic() - began


def _silent_subscriber(port: int):
    """An MQTT client subscribed to every escalation that never answers: the
    broker takes them (no "no matching subscribers"), and no verdict comes."""
    mqtt = pytest.importorskip("paho.mqtt.client")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="silent",
                         protocol=mqtt.MQTTv5)
    subscribed = threading.Event()
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.subscribe("gatewatch/v1/+/+/escalations", qos=1)
    assert subscribed.wait(10), "the silent subscriber was not subscribed"
    return client


# ---------------------------------------------------------------------------------
# 1. A SIGTERM during the drain


@pytest.mark.broker
def test_a_sigterm_during_the_drain_of_unsent_ones_ends_it_in_2_s(
    artifact, conn_log, tmp_path, mosquitto
):
    """No re-scorer subscribed: every escalation stays in the outbox, and the
    20 s drain waits for them. The SIGTERM cuts it to 2 s; they stay for the
    next run (exit 6, as at the end of the input)."""
    outbox = tmp_path / "o.sqlite"
    proc = _run(artifact, conn_log, outbox, mosquitto.url, "--drain-timeout", "20")
    try:
        # The whole file read and stored: the drain has begun.
        wait_for(lambda: _rows(outbox, "outbox") == FLOWS, 60, "the file read")
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        err, took = _end(proc, 12)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert proc.returncode == 6, err
    assert took < 6, err
    lines = err.splitlines()
    assert lines[-2].startswith(f"summary: flows {FLOWS}, "), err
    assert lines[-2].endswith(f"outbox pending {FLOWS}"), err
    assert lines[-1].startswith(
        f"error: {FLOWS} escalations were not sent (not delivered to a subscriber "
        "within the "), err
    assert lines[-1].endswith(
        f"they stay in the outbox {outbox} and are sent by the next run"), err
    assert _rows(outbox, "outbox") == FLOWS


@pytest.mark.broker
def test_a_sigterm_while_verdicts_are_awaited_ends_the_drain_with_a_warning(
    artifact, conn_log, tmp_path, mosquitto
):
    """Every escalation taken by a subscriber that never answers: the drain
    waits for verdicts. A SIGTERM ends it within 2 s, exit 0, with the warning."""
    outbox = tmp_path / "o.sqlite"
    client = _silent_subscriber(mosquitto.port)
    proc = _run(artifact, conn_log, outbox, mosquitto.url, "--drain-timeout", "20")
    try:
        wait_for(lambda: _rows(outbox, "sent") == FLOWS, 60, "every one sent")
        proc.send_signal(signal.SIGTERM)
        err, took = _end(proc, 12)
    finally:
        client.loop_stop()
        client.disconnect()
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert proc.returncode == 0, err
    assert took < 6, err
    assert err.splitlines()[-1] == (
        f"warning: stopped with {FLOWS} escalations still without a verdict; "
        "verdicts sent later wait in this gateway's MQTT session for the next run"
    )


def test_the_drain_is_cut_once_stop_is_set(artifact, tmp_path):
    """Agent.drain: a stop set part way leaves at most ``stop_within`` seconds."""
    agent = Agent(load_artifact(artifact), site="s", gateway="g",
                  outbox=Outbox(tmp_path / "o.db"))
    agent.outbox.add("m1", "t", b"{}", False)
    agent.link = object()  # a broker given (drain does not use it otherwise)
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()

    began = time.monotonic()
    drained = agent.drain(30.0, stop=stop, stop_within=0.2)
    took = time.monotonic() - began

    assert not drained
    assert 0.4 <= took < 2.0
    agent.outbox.close()


@pytest.fixture
def run_handlers():
    """Ctrl-C raises KeyboardInterrupt as in a terminal; the SIGTERM, SIGINT
    and SIGHUP handlers the run changes are put back afterwards."""
    names = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
    before = {s: signal.getsignal(s) for s in names}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    entry.release_stops()
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


@pytest.mark.broker
def test_a_ctrl_c_during_the_drain_of_a_followed_log_stops_it_at_once(
    artifact, conn_log, tmp_path, mosquitto, monkeypatch, run_handlers, capsys
):
    """A followed log stopped by SIGTERM drains for 2 s (nothing can be sent:
    no subscriber); a Ctrl-C as the drain begins ends it at once (130)."""
    real = Agent.drain
    took: list[float] = []

    def ctrl_c_in_drain(self, *args, **kwargs):
        began = time.monotonic()
        try:
            os.kill(os.getpid(), signal.SIGINT)
            return real(self, *args, **kwargs)
        finally:
            took.append(time.monotonic() - began)

    monkeypatch.setattr(Agent, "drain", ctrl_c_in_drain)
    outbox = tmp_path / "o.sqlite"

    def stop_once_read():
        wait_for(lambda: _rows(outbox, "outbox") == FLOWS, 60, "the log read")
        os.kill(os.getpid(), signal.SIGTERM)

    stopper = threading.Thread(target=stop_once_read, daemon=True)
    stopper.start()
    rc = main(["run", "--artifact", str(artifact), "--source", f"zeek:{conn_log}",
               "--follow", "--broker", mosquitto.url, "--site", "s", "--gateway",
               "g", "--outbox", str(outbox), "--alerts", "",
               "--drain-timeout", "20"])
    stopper.join(5)

    err = capsys.readouterr().err
    assert rc == 130, err
    assert len(took) == 1 and took[0] < 1.0, (took, err)
    assert err.splitlines()[-1] == (
        f"error: interrupted; {FLOWS} escalations kept in the outbox {outbox}")


# ---------------------------------------------------------------------------------
# 2. Unsent, and sent but unanswered: each escalation counted once

_CFG = SimpleNamespace(max_awaiting=500, resend_after=10.0,
                       outbox_path=lambda: "o.sqlite")


def _summary(**counts) -> dict:
    """A summary as Agent.summary gives it, with ``counts`` on top."""
    base = {
        "flows": 300, "benign": 138, "escalate": 162, "alert": 0,
        "escalations_sent": 162, "verdicts_received": 0, "outbox_pending": 0,
        "outbox_unsent": 0, "outbox_requeued": 0, "verdicts_awaited": 0,
        "verdicts_awaited_kept": 0, "awaiting_window": 500, "awaiting_out": 0,
    }
    return {**base, **counts}


def _line(summary: dict) -> str:
    out = io.StringIO()
    with redirect_stderr(out):
        assert _report(summary, None) is None
    return out.getvalue()


def test_the_summary_splits_sent_ones_queued_again_from_unsent_ones():
    """The tester's run: 162 sent, 100 of them put back to be published again."""
    summary = _summary(outbox_pending=100, outbox_requeued=100,
                       verdicts_awaited=162, verdicts_awaited_kept=162,
                       awaiting_out=162)

    assert _line(summary) == (
        "summary: flows 300, benign 138, escalate 162, alert 0, escalations sent "
        "162, verdicts received 0, outbox pending 100 (not sent yet 0, sent and "
        "queued to be published again 100), sent and still awaiting a verdict "
        "(kept in the outbox for the next run; the 100 queued again among them) "
        "162\n"
    )


def test_the_summary_of_unsent_ones_alone_is_as_before():
    summary = _summary(outbox_pending=37, outbox_unsent=37, verdicts_awaited=5,
                       verdicts_awaited_kept=3)

    assert _line(summary) == (
        "summary: flows 300, benign 138, escalate 162, alert 0, escalations sent "
        "162, verdicts received 0, outbox pending 37, sent and still awaiting a "
        "verdict 5 (kept in the outbox for the next run 3, not kept 2)\n"
    )


def _error(summary: dict, drain_for: float = 30.0) -> str:
    return _not_sent(summary, _CFG, drain_for, shown="mqtt://127.0.0.1:1883",
                     link_up=True, never_up=False)


def test_unsent_ones_with_room_in_the_window_are_not_blamed_on_max_awaiting():
    summary = _summary(outbox_pending=137, outbox_unsent=37, outbox_requeued=100,
                       verdicts_awaited=162, awaiting_out=162)

    assert _error(summary) == (
        "37 escalations were not sent (not delivered to a subscriber within the "
        "30 s drain); they stay in the outbox o.sqlite and are sent by the next "
        "run; apart from them, 162 sent ones still await a verdict"
    )


def test_unsent_ones_behind_a_full_window_are_blamed_on_max_awaiting():
    summary = _summary(outbox_pending=40, outbox_unsent=40, verdicts_awaited=500,
                       awaiting_out=500)

    assert _error(summary) == (
        "40 escalations were not sent (held back while 500 sent ones waited for "
        "verdicts (at most --max-awaiting 500 are out at once), and the 30 s "
        "drain ended first); they stay in the outbox o.sqlite and are sent by "
        "the next run; apart from them, 500 sent ones still await a verdict"
    )


def test_a_window_halved_by_re_sends_is_named_as_it_is():
    summary = _summary(outbox_pending=40, outbox_unsent=40, verdicts_awaited=300,
                       awaiting_window=250, awaiting_out=300)

    assert _error(summary, 4.2) == (
        "40 escalations were not sent (held back while 300 sent ones waited for "
        "verdicts (at most 250 are out at once now: --max-awaiting 500, halved "
        "as sent ones were published again for want of an answer), and the 4.2 s "
        "drain ended first); they stay in the outbox o.sqlite and are sent by "
        "the next run; apart from them, 300 sent ones still await a verdict"
    )


def test_the_agent_counts_a_requeued_escalation_once(artifact, tmp_path):
    """Agent.summary and Agent.drain: sent ones put back in the queue are
    awaited, not unsent; --no-wait-verdicts ends the drain once the rest are
    sent."""
    box = Outbox(tmp_path / "o.db", keep_sent=100)
    agent = Agent(load_artifact(artifact), site="s", gateway="g", outbox=box,
                  max_awaiting=50)
    agent.link = object()
    ids = [f"m{i}" for i in range(10)]
    for i in ids:
        box.add(i, "t", b"{}", False)
    box.ack_many(ids[:6])  # the broker took six
    agent._note_sent(ids[:6])
    assert box.requeue_sent() == 6  # no verdict came: put back to go out again

    summary = agent.summary()
    assert (summary["outbox_pending"], summary["outbox_unsent"],
            summary["outbox_requeued"], summary["verdicts_awaited"]) == (10, 4, 6, 6)
    assert (summary["awaiting_window"], summary["awaiting_out"]) == (50, 6)
    assert not agent.drain(0.2, wait_verdicts=False)

    box.ack_many(ids[6:])  # the four unsent ones taken
    agent._note_sent(ids[6:])
    assert agent.drain(0.2, wait_verdicts=False)
    assert agent.summary()["outbox_unsent"] == 0
    box.close()


@pytest.mark.broker
def test_a_real_run_counts_each_escalation_once(
    artifact, conn_log, tmp_path, mosquitto
):
    """A subscriber that never answers, a window of 16 and quick re-sends:
    unsent plus awaited is every escalation, and the error names the unsent
    ones as held back by the window, which is full."""
    outbox = tmp_path / "o.sqlite"
    summary_json = tmp_path / "summary.json"
    client = _silent_subscriber(mosquitto.port)
    try:
        proc = _run(artifact, conn_log, outbox, mosquitto.url,
                    "--drain-timeout", "3", "--max-awaiting", "16",
                    "--resend-after", "0.3", "--summary-json", str(summary_json))
        err, _ = _end(proc, 60)
    finally:
        client.loop_stop()
        client.disconnect()

    assert proc.returncode == 6, err
    s = json.loads(summary_json.read_text())
    unsent, awaited = s["outbox_unsent"], s["verdicts_awaited"]
    assert unsent + awaited == FLOWS, s
    assert s["outbox_unsent"] + s["outbox_requeued"] == s["outbox_pending"]
    assert _rows(outbox, "outbox") + _rows(outbox, "sent") == FLOWS
    assert s["escalations_requeued"] > 0 and s["awaiting_out"] >= s[
        "awaiting_window"]

    summary_line, error_line = err.splitlines()[-2:]
    split = (
        f" (not sent yet {unsent}, sent and queued to be published again "
        f"{s['outbox_requeued']})" if s["outbox_requeued"] else ""
    )
    among = (f"; the {s['outbox_requeued']} queued again among them"
             if s["outbox_requeued"] else "")
    assert (
        f"outbox pending {s['outbox_pending']}{split}, sent and still awaiting a "
        f"verdict (kept in the outbox for the next run{among}) {awaited}, "
    ) in summary_line
    assert error_line.startswith(
        f"error: {unsent} escalations were not sent (held back while "
        f"{s['awaiting_out']} sent ones waited for verdicts ("), err
    assert error_line.endswith(
        f"apart from them, {awaited} sent ones still await a verdict"), err


# ---------------------------------------------------------------------------------
# 3. A by-reference update whose file was not the signed archive yet

TARGET = {"site": "plant-3", "gateways": ["gw-17"]}


@pytest.fixture
def updater(tmp_path: Path):
    from edge_agent import signing
    from edge_agent.ota import ModelUpdater

    keys = signing.generate_keypair(tmp_path / "keys")
    v1 = make_artifact(tmp_path / "v1", version="v1", seed=1)
    slots = flashed_slots(tmp_path / "models", v1)
    return ModelUpdater(keys[1], slots.dir, tolerance=1e-5, site="plant-3",
                        gateway="gw-17"), keys[0], v1


@pytest.mark.parametrize("stale", ["same size", "older archive"])
def test_a_by_reference_update_fetched_before_its_file_was_right_installs_later(
    tmp_path, updater, caplog, stale
):
    from edge_agent.ota import pack_artifact, pack_update

    flashed, key, v1 = updater
    served = tmp_path / "served" / "v2.tar.gz"
    served.parent.mkdir()
    v2 = pack_update(make_artifact(tmp_path / "v2", version="v2", seed=2), key,
                     url=served.as_uri(), **TARGET)
    if stale == "same size":  # the upload not done yet: the tail still zeros
        wrong = v2.archive[: len(v2.archive) // 2]
        wrong += bytes(len(v2.archive) - len(wrong))
    else:  # the file of the model before
        wrong = pack_artifact(v1)[0]
    served.write_bytes(wrong)

    with caplog.at_level("WARNING", logger="gatewatch.edge_agent"):
        first = flashed.handle(v2.message)

    assert not first.ok and not first.repeated
    assert first.reason.startswith(
        f"the archive fetched from {served.as_uri()} is not the signed one (")
    assert first.reason.endswith(
        "the file there is stale or not uploaded yet; the running model stays, "
        "and the update is tried again when it comes again")
    assert f"model update not installed: {first.reason}" in caplog.text
    assert flashed.slots.active() == "A"

    served.write_bytes(v2.archive)
    second = flashed.handle(v2.message)

    assert second.ok and second.changed and not second.repeated
    assert second.version == "v2" and flashed.slots.active() == "B"


def test_a_tampered_inline_archive_stays_refused_and_remembered(tmp_path, updater):
    from edge_agent.ota import pack_update

    flashed, key, _ = updater
    v2 = pack_update(make_artifact(tmp_path / "v2", version="v2", seed=2), key,
                     **TARGET)
    message = json.loads(v2.message)
    archive = bytearray(base64.b64decode(message["payload"]))
    archive[-1] ^= 0xFF
    message["payload"] = base64.b64encode(bytes(archive)).decode()
    tampered = json.dumps(message).encode()

    first = flashed.handle(tampered)
    again = flashed.handle(tampered)

    assert not first.ok and first.reason.endswith("it was modified")
    assert again.repeated and again.reason == first.reason


# ---------------------------------------------------------------------------------
# 4. Session 17 tester: answered escalations kept as "not sent"


def _hex(name: str) -> str:
    """An escalation id (32 lowercase hex digits) made from ``name``."""
    import hashlib

    return hashlib.sha256(name.encode()).hexdigest()[:32]


def _verdict(agent, esc_id: str) -> tuple[str, bytes]:
    """A re-scorer's verdict for ``esc_id`` on the agent's verdicts topic."""
    body = proto.build_verdict(escalation_id=esc_id, verdict="benign", score=0.1,
                               threshold=0.5, teacher_version="sha256:test")
    return agent.topics[proto.Channel.VERDICTS], proto.encode(body)


def test_a_verdict_for_a_requeued_escalation_takes_it_out_of_the_queue(
        artifact, tmp_path):
    """Found: sent escalations put back in the queue (a quiet spell) were answered
    by the re-scorer's first copies, yet stayed queued: the run exited 6 calling
    them not sent, and the next run sent them again (answers it then took for
    forged)."""
    box = Outbox(tmp_path / "o.db", keep_sent=100)
    agent = Agent(load_artifact(artifact), site="s", gateway="g", outbox=box,
                  max_awaiting=50)
    agent.link = object()
    ids = [_hex(f"m{i}") for i in range(6)]
    for i in ids:
        box.add(i, "t", b"{}", False)
    box.ack_many(ids)
    agent._note_sent(ids)
    assert agent._requeue_sent() == 6  # a quiet spell: all six back in the queue
    agent._tracked[ids[5]] = _Flying()  # m5's copy is handed to the link again

    for i in (0, 1, 2, 5):
        agent._on_message(*_verdict(agent, ids[i]))
    agent._collect_acks()

    # m0-m2 answered: gone; m3, m4 await theirs; m5 stays until its ack.
    assert [m.id for m in box.pending()] == ids[3:]
    summary = agent.summary()
    assert (summary["verdicts_received"], summary["outbox_pending"]) == (4, 3)
    # Put back six, three taken out unpublished: three are published again.
    assert summary["escalations_requeued"] == 3
    box.close()


class _Flying:
    """A delivery handed to the link and not yet acknowledged."""

    lost = unrouted = False

    def acked(self) -> bool:
        return False


def test_an_earlier_runs_queued_escalation_answered_now_is_not_sent_again(
        artifact, tmp_path):
    box = Outbox(tmp_path / "o.db", keep_sent=100)
    e0, e1 = _hex("e0"), _hex("e1")
    for i in (e0, e1):
        box.add(i, "t", proto.encode({"flow": {"uid": i}}), False)
    agent = Agent(load_artifact(artifact), site="s", gateway="g", outbox=box)
    agent.link = object()

    agent._on_message(*_verdict(agent, e0))
    agent._collect_acks()

    assert [m.id for m in box.pending()] == [e1]
    assert agent.counters.verdicts_unmatched == 1
    assert agent.counters.verdicts_unexpected == 0
    box.close()


def test_a_late_copy_of_an_answer_from_an_earlier_run_is_no_forgery_warning(
        artifact, tmp_path, caplog):
    """Found with the two tests above: a re-scorer working through copies queued
    while it was away answered escalations an earlier run had seen answered; the
    next run warned of a forged verdict. The outbox remembers answered ids."""
    path = tmp_path / "o.db"
    e0 = _hex("e0")
    box = Outbox(path, keep_sent=100)
    box.add(e0, "t", b"{}", False)
    box.ack_many([e0])
    box.answered_many([e0])  # answered in the first run: gone from the file
    assert box.find(e0) is None and box.was_answered(e0)
    box.close()

    box = Outbox(path, keep_sent=100)  # the next run
    agent = Agent(load_artifact(artifact), site="s", gateway="g", outbox=box)
    agent.link = object()
    with caplog.at_level("WARNING", logger="gatewatch.edge_agent"):
        agent._on_message(*_verdict(agent, e0))
        agent._on_message(*_verdict(agent, _hex("never sent")))

    assert agent.counters.verdicts_unexpected == 1  # only the unknown one
    assert caplog.text.count("unexpected verdict") == 1
    assert _hex("never sent") in caplog.text and e0 not in caplog.text
    box.close()
