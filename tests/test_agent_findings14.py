"""Testers' findings on ``edge-agent run``: flow control with --no-wait-verdicts,
the teacher's verdicts in the summary line, forged or stale verdicts, config-file
range errors that name the file and key, and the wording of summary and errors."""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_agent import protocol as proto
from edge_agent.agent import Agent
from edge_agent.cli import _input_problem, _report, main
from edge_agent.outbox import Outbox
from edge_agent.runtime import load_artifact
from tests.conftest import Mosquitto, wait_for
from tests.test_agent_fixtures import tiny

REPO = Path(__file__).resolve().parent.parent

# The broker's queue for a subscriber that is away, and its in-flight window: a
# burst of a few hundred escalations overflows it (tests/test_broker_queue_overflow).
SMALL_QUEUE = "max_queued_messages 20\nmax_inflight_messages 20\n"


@pytest.fixture(scope="module")
def tm(data_dir, tmp_path_factory):
    return tiny(data_dir, tmp_path_factory)


def _shifted(records: list[dict], copies: int) -> list[dict]:
    """``copies`` copies of the records, each 100,000 s later (new escalation ids)."""
    out = []
    for k in range(copies):
        for rec in records:
            r = dict(rec)
            if r.get("ts") is not None:
                r["ts"] = r["ts"] + k * 100_000.0
            out.append(r)
    return out


def _is_malicious(esc_id: str) -> bool:
    """The stub re-scorer's verdict: a fixed rule of the id, known to the test."""
    return int(esc_id, 16) % 3 == 0


class StubRescorer:
    """A re-scorer stand-in: a persistent MQTT session on the escalations topic
    that answers each escalation with a verdict (``_is_malicious``) while it is
    connected, and whose queue the broker keeps (up to its cap) while it is away."""

    def __init__(self, port: int, site: str, gateway: str) -> None:
        import paho.mqtt.client as paho

        self.port = port
        self.topic = proto.topic(site, gateway, proto.Channel.ESCALATIONS)
        self.verdicts = proto.topic(site, gateway, proto.Channel.VERDICTS)
        self.ids: set[str] = set()
        self.answer = False
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id="stub-rescorer-14",
            clean_session=False, protocol=paho.MQTTv311,
        )
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self._subscribed.set()

    def _on_message(self, client, userdata, message) -> None:
        esc_id = json.loads(message.payload)["id"]
        with self._lock:
            self.ids.add(esc_id)
        if not self.answer:
            return
        verdict = "malicious" if _is_malicious(esc_id) else "benign"
        client.publish(self.verdicts, proto.encode(proto.build_verdict(
            escalation_id=esc_id, verdict=verdict, score=0.9 if verdict ==
            "malicious" else 0.1, threshold=0.5, teacher_version="sha256:stub",
        )), qos=1)

    def subscribe_and_leave(self) -> None:
        """Subscribe, then disconnect: the broker keeps the session and queues."""
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        self.client.subscribe(self.topic, qos=1)
        assert self._subscribed.wait(10), "the stub's subscription was not acknowledged"
        self.client.disconnect()
        self.client.loop_stop()

    def come_back(self) -> None:
        """Reconnect to the kept session and answer what comes."""
        self.answer = True
        self.client.reconnect()
        self.client.loop_start()

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _agent(tm, tmp_path: Path, broker: str, *extra: str) -> subprocess.Popen:
    """``edge-agent run`` on stdin, its summary JSON and stderr beside the outbox."""
    return subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "run", "--artifact",
         str(tm.artifact), "--source", "-", "--site", "s14", "--gateway", "g14",
         "--outbox", str(tmp_path / "o.sqlite"), "--alerts", "",
         "--summary-json", str(tmp_path / "s.json"), "--broker", broker,
         "--protocol", "3.1.1", "--max-wait-ms", "5", "--no-wait-verdicts",
         "--resend-after", "3600", *extra],
        cwd=REPO, stdin=subprocess.PIPE, stderr=open(tmp_path / "err", "w"),
        text=True,
    )


def _burst(tm, tmp_path: Path, *extra: str, comes_back: bool = True,
           copies: int = 3) -> tuple[int, list[str], StubRescorer, dict, str]:
    """A burst of escalations from one agent with --no-wait-verdicts through a
    broker whose queue for the away re-scorer is 20; the re-scorer comes back
    3 s after the input ended (or never). (exit code, expected ids, the stub,
    the summary, stderr.)"""
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not on PATH (apt-get install mosquitto)")
    broker = Mosquitto(tmp_path, extra=SMALL_QUEUE)
    broker.start()
    stub = StubRescorer(broker.port, "s14", "g14")
    records = _shifted(tm.records, copies)
    expected = sorted(tm.expected(records, site="s14", gateway="g14"))
    agent = None
    try:
        stub.subscribe_and_leave()
        agent = _agent(tm, tmp_path, broker.url, *extra)
        agent.stdin.write("".join(json.dumps(r) + "\n" for r in records))
        agent.stdin.close()
        time.sleep(3)
        if comes_back:
            stub.come_back()
        rc = agent.wait(120)
        if comes_back:
            wait_for(lambda: len(stub.ids) >= len(expected), 10, "every escalation")
    except Exception:
        pass  # the assertions below say what is missing
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
            agent.wait(10)
            rc = None
        stub.stop()
        broker.stop()
    err = (tmp_path / "err").read_text()
    path = tmp_path / "s.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    return rc, expected, stub, summary, err


# -- 1. --max-awaiting holds with --no-wait-verdicts -----------------------------------


@pytest.mark.broker
@pytest.mark.timeout(300)
def test_no_wait_verdicts_keeps_flow_control_so_a_burst_is_not_lost(tm, tmp_path):
    """Found: --no-wait-verdicts turned --max-awaiting off; a 50,000-SYN flood
    went out at once, the broker dropped about 20,800 escalations past its queue
    for the re-scorer after acknowledging them, and the agent exited 0."""
    rc, expected, stub, summary, err = _burst(
        tm, tmp_path, "--max-awaiting", "10", "--drain-timeout", "90")

    assert len(expected) > 100  # far over the broker's queue of 20 (+20 in flight)
    assert rc == 0, err[-3000:]
    assert sorted(stub.ids) == expected  # none dropped by the broker
    assert summary["outbox_pending"] == 0
    assert summary["escalations_sent"] == len(expected)

    # 2. the summary line says what the teacher decided. The last verdicts are
    # not waited for, so the counts are of those that came, at most the stub's.
    received = summary["verdicts_received"]
    assert 0 < received <= len(expected)
    assert summary["verdicts_malicious"] + summary["verdicts_benign"] == received
    assert summary["verdicts_malicious"] <= sum(_is_malicious(i) for i in expected)
    [line] = [ln for ln in err.splitlines() if ln.startswith("summary:")]
    assert (f"teacher verdicts malicious {summary['verdicts_malicious']}, benign "
            f"{summary['verdicts_benign']}") in line


@pytest.mark.broker
@pytest.mark.timeout(300)
def test_no_wait_verdicts_without_a_rescorer_keeps_the_held_back_in_the_outbox(
    tm, tmp_path
):
    """With nobody answering, only --max-awaiting escalations go out; the others
    stay in the outbox for the next run (exit 6, as any left unsent)."""
    rc, expected, stub, summary, err = _burst(
        tm, tmp_path, "--max-awaiting", "10", "--drain-timeout", "3",
        comes_back=False, copies=1)

    assert rc == 6, err[-3000:]
    assert summary["escalations_sent"] == 10
    assert summary["outbox_pending"] == len(expected) - 10
    kept = Outbox(tmp_path / "o.sqlite")
    assert len(kept) == len(expected) - 10  # kept on disk for the next run
    kept.close()
    [error] = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert error.startswith(f"error: {len(expected) - 10} escalations were not sent "
                            "(held back while 10 sent ones waited for verdicts (at "
                            "most --max-awaiting 10 are out at once)")
    assert "stay in the outbox" in error


@pytest.mark.broker
@pytest.mark.timeout(300)
def test_max_awaiting_0_turns_flow_control_off(tm, tmp_path):
    """The old behaviour, now asked for by name: every escalation at once."""
    rc, expected, stub, summary, err = _burst(
        tm, tmp_path, "--max-awaiting", "0", "--drain-timeout", "10",
        comes_back=False, copies=1)

    assert rc == 0, err[-3000:]
    assert summary["escalations_sent"] == len(expected) > 40
    assert summary["outbox_pending"] == 0


# -- 2. the teacher's verdicts in the summary line ------------------------------------


def _summary(**counts) -> dict:
    base = dict(flows=34, benign=0, escalate=22, alert=12, escalations_sent=34,
                verdicts_received=0, outbox_pending=0)
    base.update(counts)
    return base


def test_the_summary_line_gives_the_teachers_verdicts(capsys):
    _report(_summary(verdicts_received=34, verdicts_malicious=14,
                     verdicts_benign=20), None)
    line = capsys.readouterr().err.splitlines()[0]
    assert line == (
        "summary: flows 34, benign 0, escalate 22, alert 12, escalations sent 34, "
        "verdicts received 34, outbox pending 0, teacher verdicts malicious 14, "
        "benign 20"
    )

    _report(_summary(), None)  # no verdict came: nothing to say about the teacher
    assert "teacher" not in capsys.readouterr().err


# -- 3. forged or stale verdicts -------------------------------------------------------


def _verdict(esc_id: str, verdict: str = "benign", teacher: str = "sha256:t1") -> bytes:
    return proto.encode(proto.build_verdict(
        escalation_id=esc_id, verdict=verdict, score=0.1, threshold=0.5,
        teacher_version=teacher))


def test_forged_and_unknown_verdicts_are_counted_and_the_first_warned(
    tm, tmp_path, caplog
):
    """Found: a well-formed benign verdict with teacher_version "sha256:evil" for
    an escalation already answered was dropped without a trace."""
    outbox = Outbox(tmp_path / "o.sqlite")
    earlier = "e" * 32  # an earlier run's escalation, still in the outbox
    outbox.add(earlier, "gatewatch/v1/s1/g1/escalations", b"{}", False)
    agent = Agent(load_artifact(tm.artifact), site="s1", gateway="g1",
                  outbox=outbox, alerts=io.StringIO())
    topic = agent.topics[proto.Channel.VERDICTS]
    ours = "a" * 32
    agent._awaiting[ours] = None  # acknowledged by the broker in this run

    with caplog.at_level(logging.WARNING, logger="gatewatch.edge_agent"):
        agent._on_message(topic, _verdict(ours, "malicious"))
        agent._on_message(topic, _verdict(ours, "malicious"))  # a redelivered copy
        agent._on_message(topic, _verdict(ours, "benign", "sha256:evil"))  # forged
        agent._on_message(topic, _verdict(earlier))  # an earlier run's: expected
        agent._on_message(topic, _verdict("c" * 32))  # no escalation of ours
        agent._on_message(topic, _verdict(ours, "benign", "sha256:evil"))

    c = agent.counters
    assert (c.verdicts_received, c.verdicts_unmatched) == (1, 1)
    assert c.verdicts_unexpected == 3
    # The forged benign verdict did not overrule the first answer, and the one for
    # no escalation of ours is not credited to the teacher.
    assert (c.verdicts_malicious, c.verdicts_benign) == (1, 1)
    warned = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING
              and "unexpected verdict" in r.getMessage()]
    assert warned == [
        f"unexpected verdict benign (teacher sha256:evil) for escalation {ours}: "
        "already answered malicious by teacher sha256:t1; ignored: a forged "
        "verdict, or another publisher on the verdicts topic (is the broker's "
        "access control on?); further ones only counted (verdicts_unexpected)"
    ]
    summary = agent.summary()
    assert summary["verdicts_unexpected"] == 3
    agent.outbox.close()


def test_unexpected_verdicts_are_named_in_the_summary_line(capsys):
    _report(_summary(verdicts_received=3, verdicts_malicious=1, verdicts_benign=2,
                     verdicts_unexpected=2), None)
    line = capsys.readouterr().err.splitlines()[0]
    assert line.endswith(", unexpected verdicts (for an earlier run's escalation "
                         "past the outbox's kept window, forged, or contradicting a "
                         "first answer; the log names the first) 2")


# -- 4. config-file range errors name the file and the key ----------------------------


def _config_run(tmp_path: Path, capsys, text: str, *flags: str) -> tuple[int, str]:
    config = tmp_path / "agent.toml"
    config.write_text(text)
    rc = main(["run", "--config", str(config), "--artifact", str(tmp_path / "no-art"),
               "--source", "-", "--site", "s", "--gateway", "g", *flags])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("max_batch = -5\n", "max_batch must be 1..4096, got -5"),
        ("drain_timeout = nan\n", "drain_timeout must be a number from 0 to "
         f"31,622,400, got {math.nan!r}"),
        ("drain_timeout = inf\n", "drain_timeout must be a number from 0 to "
         f"31,622,400, got {math.inf!r}"),
        ("drain_timeout = 1e308\n", "drain_timeout must be a number from 0 to "
         "31,622,400, got 1e+308"),
        ("resend_after = 0.0\n", "resend_after must be above 0 s, got 0.0"),
        ("max_packet_size = 5\n", "max_packet_size must be 0 (none assumed) or at "
         "least 128 bytes, got 5"),
    ],
    ids=["max-batch", "nan", "inf", "1e308", "resend-0", "packet"],
)
def test_a_config_value_out_of_range_names_the_file_and_key(
    tmp_path, capsys, text, said
):
    """Found: ``max_batch = -5`` in a --config file said "--max-batch must be
    1..4096, got -5", naming a flag that was never given."""
    rc, err = _config_run(tmp_path, capsys, text)

    assert rc == 2
    assert err == f"error: config {tmp_path / 'agent.toml'}: {said}\n"


def test_a_flag_out_of_range_is_still_named_as_the_flag(tmp_path, capsys):
    rc, err = _config_run(tmp_path, capsys, "max_batch = 8\n", "--max-batch", "0")

    assert rc == 2
    assert err == "error: --max-batch must be 1..4096, got 0\n"


def test_an_unknown_config_key_names_the_near_one_plainly(tmp_path, capsys):
    rc, err = _config_run(tmp_path, capsys, "max_batchh = 8\nzzz = 1\n")

    assert rc == 2
    assert err == (f"error: config {tmp_path / 'agent.toml'}: unknown keys "
                   "'max_batchh' (did you mean 'max_batch'?), 'zzz'\n")


# -- 5. wording ------------------------------------------------------------------------


def test_one_flow_read_is_singular():
    from types import SimpleNamespace

    source = SimpleNamespace(kind="zeek", rejected={"bad_port": 1}, damage=None,
                             lines=2, first_rejected="line 2: port 70000")

    problem = _input_problem("zeek:c.log", source, 1)

    assert str(problem).endswith("; the 1 flow read was scored and kept")


def test_resent_and_merged_escalations_read_plainly(capsys):
    _report(_summary(escalations_resent=4, escalations_merged=1), None)
    line = capsys.readouterr().err.splitlines()[0]
    assert line.endswith(
        ", escalations sent again for flows read again (each answered once) 4, "
        "flows read again while their escalation waited in the outbox (merged with "
        "it) 1"
    )
    assert "one verdict per id" not in line


# -- 6. the summary keys are documented ------------------------------------------------


def test_the_readme_explains_both_outbox_dropped_keys():
    text = (REPO / "edge_agent" / "README.md").read_text()
    section = text.split("## The summary", 1)[1].split("\n## ", 1)[0]
    for key in ("outbox_dropped", "outbox_dropped_now", "verdicts_unexpected",
                "verdicts_malicious", "verdicts_benign"):
        assert f"`{key}`" in section, key
