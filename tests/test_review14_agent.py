"""Review 14: verdicts for no escalation of this gateway, escalations an earlier
run left awaiting, and payloads and config values worded for an operator."""

from __future__ import annotations

import io
import json
import logging
import shutil
import time
from pathlib import Path

import pytest

from edge_agent import protocol as proto
from edge_agent.cli import _report
from edge_agent.config import AgentConfig
from flows.errors import UsageError
from tests.conftest import Mosquitto

FLOW = {"ts": 1600000000.0, "src_ip": "10.0.0.1", "src_port": 40000,
        "dst_ip": "10.0.0.2", "dst_port": 80, "proto": "tcp"}
WINDOW = [[0.0, 0.25, 1.0], [0.5, 0.5, 0.5]]


@pytest.fixture(scope="module")
def tm(data_dir, tmp_path_factory):
    from tests.test_agent_fixtures import tiny

    return tiny(data_dir, tmp_path_factory)


def _verdict(esc_id: str, verdict: str, teacher: str = "sha256:t1") -> bytes:
    return proto.encode(proto.build_verdict(
        escalation_id=esc_id, verdict=verdict, score=0.9, threshold=0.5,
        teacher_version=teacher))


# -- 2. a verdict for no escalation of this gateway ------------------------------------


def test_a_verdict_for_no_escalation_is_unexpected_only(tm, tmp_path, caplog):
    """Found: a forged malicious verdict for an unknown id was counted as the
    teacher's (``teacher verdicts malicious 1``) and wrote an alerts line with no
    flow. An earlier run's escalation kept in the outbox is still answered."""
    from edge_agent.agent import Agent
    from edge_agent.outbox import Outbox
    from edge_agent.runtime import load_artifact

    outbox = Outbox(tmp_path / "o.sqlite")
    earlier = "e" * 32
    payload = proto.encode(proto.build_escalation(
        flow=FLOW, window=WINDOW, score=0.9, decision="alert", model_version="m1",
        site="s1", gateway="g1", msg_id=earlier))
    outbox.add(earlier, "gatewatch/v1/s1/g1/escalations", payload, True)
    alerts = io.StringIO()
    agent = Agent(load_artifact(tm.artifact), site="s1", gateway="g1",
                  outbox=outbox, alerts=alerts)
    topic = agent.topics[proto.Channel.VERDICTS]
    forged = "c" * 32

    with caplog.at_level(logging.WARNING, logger="gatewatch.edge_agent"):
        agent._on_message(topic, _verdict(forged, "malicious", "x"))
        agent._on_message(topic, _verdict(forged, "malicious", "x"))  # a copy
        agent._on_message(topic, _verdict(forged, "benign", "x"))
        agent._on_message(topic, _verdict(earlier, "malicious"))

    c = agent.counters
    assert (c.verdicts_received, c.verdicts_unmatched) == (0, 1)
    assert (c.verdicts_malicious, c.verdicts_benign) == (1, 0)
    assert c.verdicts_unexpected == 3
    lines = [json.loads(ln) for ln in alerts.getvalue().splitlines()]
    assert [(ln["escalation_id"], ln["src_ip"]) for ln in lines] == [
        (earlier, "10.0.0.1")]
    warned = [r.getMessage() for r in caplog.records
              if "unexpected verdict" in r.getMessage()]
    assert len(warned) == 1 and forged in warned[0]
    assert "for no escalation this gateway keeps" in warned[0]
    agent.outbox.close()


# -- 3. escalations an earlier run left awaiting -------------------------------------


def _summary(**counts) -> dict:
    base = dict(flows=34, benign=0, escalate=22, alert=12, escalations_sent=34,
                verdicts_received=0, outbox_pending=0)
    base.update(counts)
    return base


def test_the_summary_line_names_escalations_still_awaiting_a_verdict(capsys):
    _report(_summary(verdicts_awaited=962), None)
    line = capsys.readouterr().err.splitlines()[0]
    assert line.endswith("outbox pending 0, sent and still awaiting a verdict (kept "
                         "in the outbox for the next run) 962")

    _report(_summary(verdicts_awaited=0), None)
    assert "awaiting" not in capsys.readouterr().err

    _report(_summary(verdicts_unmatched=2, verdicts_malicious=2), None)
    assert ", verdicts for escalations an earlier run sent 2" in (
        capsys.readouterr().err)


@pytest.mark.broker
@pytest.mark.timeout(300)
def test_the_next_run_says_its_hold_back_comes_from_an_earlier_run(tm, tmp_path):
    """Found: after a --max-awaiting 0 --no-wait-verdicts run with no re-scorer
    (which ended "outbox pending 0"), the next run sent nothing new, "held back
    while 962 sent ones waited for verdicts", without saying whose they were."""
    from tests.test_agent_findings14 import _agent, _shifted

    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not on PATH (apt-get install mosquitto)")
    broker = Mosquitto(tmp_path)
    broker.start()
    runs = []
    try:
        for k, flags in enumerate([["--max-awaiting", "0", "--drain-timeout", "5"],
                                   ["--max-awaiting", "5", "--drain-timeout", "2"]]):
            agent = _agent(tm, tmp_path, broker.url, *flags)
            records = _shifted(tm.records, k + 1)[len(tm.records) * k:]
            agent.stdin.write("".join(json.dumps(r) + "\n" for r in records))
            agent.stdin.close()
            try:
                rc = agent.wait(120)
            finally:
                if agent.poll() is None:
                    agent.kill()
                    agent.wait(10)
            summary = json.loads((tmp_path / "s.json").read_text())
            runs.append((rc, summary, (tmp_path / "err").read_text()))
            time.sleep(0.2)
    finally:
        broker.stop()

    (rc1, first, err1), (rc2, second, err2) = runs
    assert rc1 == 0, err1[-2000:]
    sent = first["escalations_sent"]
    assert sent > 5 and first["outbox_pending"] == 0
    assert first["verdicts_awaited"] == sent
    assert (f"sent and still awaiting a verdict (kept in the outbox for the next "
            f"run) {sent}") in err1

    assert rc2 == 6, err2[-2000:]
    assert second["verdicts_awaited_earlier"] == sent
    [error] = [ln for ln in err2.splitlines() if ln.startswith("error:")]
    assert (f"held back while {sent} sent ones waited for verdicts, {sent} of them "
            "sent by an earlier run and kept in the outbox until their verdicts "
            "arrive (the re-scorer answers them; unanswered ones are published "
            "again after 3600 s without an answer, --resend-after) (at most "
            "--max-awaiting 5 are out at once)") in error, error


# -- 4. payloads worded, not Python exceptions --------------------------------------


@pytest.mark.parametrize(("payload", "said"), [
    (b"", "payload is empty; expected one JSON object"),
    (b" \n", "payload is empty; expected one JSON object"),
    (b'{"id":\xff}', "payload is not UTF-8 (byte 0xff at 6)"),
    (b"[" * 100_000, "expected one JSON object (arrays or objects nested too deeply)"),
    (b'{"id": 1', "expected one JSON object (expecting ',' delimiter at line 1 "
                 "column 9)"),
    (b"[1]", "expected one JSON object, got an array"),
    (b"null", "expected one JSON object, got null"),
])
def test_the_agent_words_a_bad_verdict_payload(payload, said):
    with pytest.raises(proto.ProtocolError) as info:
        proto.parse_answer(payload)
    assert info.value.kind is proto.RejectKind.MALFORMED_JSON
    assert str(info.value) == f"malformed_json: {said}"


def test_the_rescorer_uses_the_protocols_wording():
    import teacher.serve as serve

    assert not hasattr(serve, "payload_problem")  # one wording, in the protocol


# -- 5. config values spelt as TOML --------------------------------------------------


@pytest.mark.parametrize(("line", "said"), [
    ("max_awaiting = true", "max_awaiting must be an integer, got true"),
    ("resend_after = false", "resend_after must be a number, got false"),
    ("max_batch = {a = 1, 'b c' = [1, 2.5]}",
     'max_batch must be an integer, got { a = 1, "b c" = [1, 2.5] }'),
    ("site = [true, 'x']", "site must be a string, got [true, 'x']"),
    ("site = 1979-05-27", "site must be a string, got 1979-05-27"),
    ("drain_timeout = -inf", "drain_timeout must be a number from 0 to "
                             "31,622,400, got -inf"),
])
def test_config_type_errors_spell_values_as_toml(tmp_path: Path, line, said):
    conf = tmp_path / "agent.toml"
    conf.write_text(line + "\n")
    with pytest.raises(UsageError) as info:
        AgentConfig.load(conf, {"artifact": "a", "source": "-", "site": "s",
                                "gateway": "g"})
    assert str(info.value) == f"config {conf}: {said}"


def test_a_late_copy_for_an_escalation_this_run_had_answered_is_ignored(
    tm, tmp_path
):
    """An answer long forgotten (past the ids remembered) is neither credited
    to the teacher again nor taken for a forged verdict."""
    import edge_agent.agent as agent_mod
    from edge_agent.outbox import Outbox
    from edge_agent.runtime import load_artifact

    alerts = io.StringIO()
    agent = agent_mod.Agent(load_artifact(tm.artifact), site="s1", gateway="g1",
                            outbox=Outbox(tmp_path / "o.sqlite"), alerts=alerts)
    topic = agent.topics[proto.Channel.VERDICTS]
    answered = "a" * 32
    agent._sent_ids[answered] = None  # sent in this run; its answer forgotten

    agent._on_message(topic, _verdict(answered, "malicious"))

    c = agent.counters
    assert (c.verdicts_unmatched, c.verdicts_malicious, c.verdicts_unexpected) == (
        0, 0, 0)
    assert alerts.getvalue() == ""
    agent.outbox.close()
