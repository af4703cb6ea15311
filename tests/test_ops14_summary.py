"""An operator's findings on the run's summary and exit 6 messages (ops14).

1. With ``--max-awaiting 0`` and no re-scorer, the exit 6 error said the outbox
   kept every unanswered escalation while its sent table held only the newest
   ``keep_sent``, and the next run called the verdicts for the others forged.
2. Escalations published again after a lost broker session were labelled as sent
   again "for flows read again".
3. The outbox cap's counts disagreed between the summary line, the error line and
   the JSON (the JSON and the line counted the drops that reached the broker).
4. A run without ``--broker`` said only "outbox pending N" and exited 0.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_agent import cli
from edge_agent import protocol as proto
from edge_agent.agent import Agent
from edge_agent.cli import EPILOG, _report, _unanswered, main
from edge_agent.outbox import Outbox
from edge_agent.runtime import load_artifact
from tests.test_agent_fixtures import tiny

TOPIC = "gatewatch/v1/s1/g1/escalations"


@pytest.fixture(scope="module")
def tm(data_dir, tmp_path_factory):
    return tiny(data_dir, tmp_path_factory)


def _ids(n: int, start: int = 0) -> list[str]:
    return [f"{k:032x}" for k in range(start, start + n)]


def _agent(tm, outbox: Outbox, max_awaiting: int | None = None) -> Agent:
    return Agent(load_artifact(tm.artifact), site="s1", gateway="g1", outbox=outbox,
                 alerts=io.StringIO(), max_awaiting=max_awaiting)


def _sent(agent: Agent, ids: list[str]) -> None:
    """Store ``ids`` and have the broker acknowledge them, as the sender would."""
    agent.outbox.add_many([(i, TOPIC, b"{}", False) for i in ids])
    agent.outbox.ack_many(ids)
    agent._note_sent(ids)


def _summary(**counts) -> dict:
    base = dict(flows=992, benign=0, escalate=900, alert=92, escalations_sent=200,
                verdicts_received=0, outbox_pending=0)
    base.update(counts)
    return base


def _verdict(esc_id: str) -> bytes:
    return proto.encode(proto.build_verdict(
        escalation_id=esc_id, verdict="benign", score=0.1, threshold=0.5,
        teacher_version="sha256:t1"))


# -- 1. what the outbox keeps of the unanswered --------------------------------------


def test_the_outbox_counts_the_sent_ones_it_lets_go(tmp_path):
    box = Outbox(tmp_path / "o.db", keep_sent=2)
    ids = _ids(5)
    box.add_many([(i, TOPIC, b"{}", False) for i in ids])

    assert box.ack_many(ids) == 5

    assert box.held_ids() == set(ids[3:])  # the newest two
    assert box.forgotten == 3
    box.close()
    assert Outbox(tmp_path / "o.db", keep_sent=2).forgotten == 3  # kept for good


def test_the_exit_6_error_says_how_many_the_outbox_keeps(tm, tmp_path, capsys):
    """Found: 4504 unanswered, 1000 kept, and the error said "The outbox keeps the
    unanswered ones"; the summary line said all were kept too."""
    agent = _agent(tm, Outbox(tmp_path / "o.db", keep_sent=3))
    _sent(agent, _ids(7))

    summary = agent.summary()
    text = _unanswered(summary, agent, 2.0)
    agent.outbox.close()

    assert (summary["verdicts_awaited"], summary["verdicts_awaited_kept"]) == (7, 3)
    assert text.startswith("7 escalations got no verdict within the 2 s drain: ")
    assert text.endswith(
        "The outbox keeps 3 of the 7: the next run with this outbox awaits them and "
        "publishes them again when no verdict comes (--resend-after). It could not "
        "keep the other 4 (it keeps only the newest 3 sent and unanswered "
        "escalations; --max-awaiting holds the rest back unsent, and 0 turns that "
        "off): they are lost unless the broker still delivers them to a re-scorer"
    )
    _report(summary, None)
    line = capsys.readouterr().err.splitlines()[0]
    assert ", sent and still awaiting a verdict 7 (kept in the outbox for the next " \
        "run 3, not kept 4)" in line


def test_all_kept_reads_as_before(tm, tmp_path):
    agent = _agent(tm, Outbox(tmp_path / "o.db", keep_sent=10))
    _sent(agent, _ids(4))
    summary = agent.summary()
    text = _unanswered(summary, agent, 2.0)
    agent.outbox.close()

    assert summary["verdicts_awaited_kept"] == 4
    assert text.endswith("The outbox keeps the unanswered ones: the next run with "
                         "this outbox awaits them and publishes them again when no "
                         "verdict comes (--resend-after)")


def test_a_verdict_past_the_kept_window_is_not_called_forged_only(
    tm, tmp_path, caplog
):
    """Found: the next run got verdicts for run 1's own escalations, past the 1000
    the outbox kept, and warned of forgery only ("is the broker's access control
    on?"). The two look alike: the warning names both."""
    box = Outbox(tmp_path / "o.db", keep_sent=2)
    ids = _ids(5)
    box.add_many([(i, TOPIC, b"{}", False) for i in ids])
    box.ack_many(ids)  # run 1: the oldest three let go
    box.close()
    agent = _agent(tm, Outbox(tmp_path / "o.db", keep_sent=2))
    topic = agent.topics[proto.Channel.VERDICTS]

    with caplog.at_level(logging.WARNING, logger="gatewatch.edge_agent"):
        agent._on_message(topic, _verdict(ids[0]))  # let go by run 1
        agent._on_message(topic, _verdict(ids[4]))  # still kept: an earlier run's
    agent.outbox.close()

    assert agent.counters.verdicts_unmatched == 1
    assert agent.counters.verdicts_unexpected == 1
    warned = [r.getMessage() for r in caplog.records
              if "unexpected verdict" in r.getMessage()]
    assert warned == [
        f"unexpected verdict benign (teacher sha256:t1) for escalation {ids[0]}: for "
        "no escalation this gateway keeps (not sent in this run, not in the outbox, "
        "which keeps the newest 2 sent and unanswered ones; this outbox has let 3 "
        "unanswered ones go so far): an answer to an earlier run's escalation past "
        "the outbox's kept window, or a forged verdict (is the broker's access "
        "control on?); not counted as the teacher's and no alert line written; "
        "further ones only counted (verdicts_unexpected)"
    ]


# -- 2. published again is not read again --------------------------------------------


def test_republished_escalations_are_not_flows_read_again(tm, tmp_path, capsys):
    """Found: after a lost session, 300 republished escalations were labelled
    "escalations sent again for flows read again (each answered once) 300"."""
    agent = _agent(tm, Outbox(tmp_path / "o.db", keep_sent=10), max_awaiting=10)
    ids = _ids(3)
    _sent(agent, ids)

    assert agent._requeue_sent() == 3  # as after a connect without the session
    agent.outbox.ack_many(ids)  # published again and acknowledged again
    agent._note_sent(ids)
    summary = agent.summary()

    assert (summary["escalations_requeued"], summary["escalations_resent"]) == (3, 0)
    # A flow really read again after its escalation was sent still counts.
    agent.outbox.add_many([(ids[0], TOPIC, b"{}", False)])
    agent.outbox.ack_many([ids[0]])
    agent._note_sent([ids[0]])
    assert agent.summary()["escalations_resent"] == 1
    agent.outbox.close()

    _report(_summary(escalations_requeued=300), None)
    line = capsys.readouterr().err.splitlines()[0]
    assert "read again" not in line
    assert line.endswith(", sent escalations published again from the outbox (no "
                         "verdict came in time, or the broker lost this gateway's "
                         "session) 300")


# -- 3. the outbox cap's counts add up -----------------------------------------------


@dataclass
class _Delivery:
    """A publish the broker acknowledged at once."""

    lost: bool = False
    unrouted: bool = False

    def acked(self) -> bool:
        return True

    def forget(self) -> None:
        pass


class _Link:
    def publish(self, topic, payload, qos=1):
        return _Delivery()


def test_drops_that_reached_the_broker_are_counted_by_decision(tm, tmp_path):
    """The agent tells which of those the cap took out of the file while in flight
    were alerts, so that ``outbox_dropped_now`` is the loss by decision."""
    agent = _agent(tm, Outbox(tmp_path / "o.db", max_messages=2))
    agent.outbox.add_many([("a" * 32, TOPIC, b"{}", True),
                           ("b" * 32, TOPIC, b"{}", False)])
    for msg in agent.outbox.pending():
        agent._publish_one(_Link(), msg)
    # Both dropped from the file while with the link (an alert pushes out the
    # uncertain one first, then the alert).
    agent.outbox.add_many([("c" * 32, TOPIC, b"{}", True),
                           ("d" * 32, TOPIC, b"{}", True)])
    before = {"alert": 0, "escalate": 0}
    agent._collect_acks()
    summary = agent.summary()
    agent.outbox.close()

    assert summary["outbox_dropped"] == {"alert": 1, "escalate": 1}
    assert summary["delivered_after_drop"] == 2
    assert agent.delivered_after_drop_alerts == 1
    assert cli._dropped_now(summary, before, 1) == {"alert": 0, "escalate": 0}


def test_the_summary_line_error_and_json_agree_on_the_cap(capsys, tmp_path):
    """Found: with --outbox-max 50 on 992 flows the line said "escalations sent
    200 ... dropped by the outbox cap 942", the error 792 lost and 150 more that
    reached the broker, and the JSON outbox_dropped_now 942."""
    summary = _summary(outbox_dropped={"alert": 0, "escalate": 992},
                       delivered_after_drop=150, outbox_pending=0)
    summary["outbox_dropped_now"] = cli._dropped_now(summary, {"escalate": 50}, 0)
    path = tmp_path / "s.json"

    _report(summary, str(path))
    error = cli._cap_loss(summary, 50, "o.db")

    assert summary["outbox_dropped_now"] == {"alert": 0, "escalate": 792}
    assert json.loads(path.read_text())["outbox_dropped_now"]["escalate"] == 792
    assert summary["escalations_sent"] + 792 == summary["flows"]
    err = capsys.readouterr().err
    assert ", dropped by the outbox cap 792 (and 150 more that reached the broker " \
        "first)" in err.splitlines()[0]
    assert "warning: the outbox was full (792 escalations dropped by its cap and " \
        "lost in this run, by kind: {'alert': 0, 'escalate': 792}, and 150 more " \
        "that reached the broker first)" in err
    assert error == (
        "792 escalations were dropped by the outbox cap (outbox_max 50) in this run "
        "and are lost (150 more were dropped from the file while already in flight "
        "and reached the broker); 0 stay in the outbox o.db"
    )


def test_the_readme_defines_outbox_dropped_now_as_the_loss():
    text = (Path(__file__).resolve().parent.parent / "edge_agent" / "README.md"
            ).read_text()
    row = next(ln for ln in text.splitlines()
               if ln.startswith("| `outbox_dropped_now`"))
    assert "less those already handed to the broker" in row


# -- 4. offline: no broker -----------------------------------------------------------


def test_a_run_without_a_broker_says_where_its_escalations_wait(tm, tmp_path, capsys):
    """Found: without --broker the line said "outbox pending 61" and the run
    exited 0, while --help's exit 6 names escalations left unacknowledged."""
    rc = main(["run", "--artifact", str(tm.artifact), "--source",
               f"zeek:{tm.conn_log}", "--site", "s1", "--gateway", "g1",
               "--outbox", str(tmp_path / "o.db"), "--alerts", ""])

    err = capsys.readouterr().err
    assert rc == 0, err
    pending = len(Outbox(tmp_path / "o.db"))
    assert pending > 0
    assert (f"outbox pending {pending}, no broker given: {pending} escalations kept "
            "in the outbox for a run with --broker") in err
    flat = " ".join(EPILOG.split())
    assert ("escalations left unacknowledged in the outbox with --broker given (a "
            "run without --broker is offline: it keeps its escalations in the "
            "outbox for a run with --broker and exits 0") in flat


def test_a_run_with_a_broker_does_not_say_offline(capsys):
    _report(_summary(outbox_pending=5), None, broker=True)
    assert "no broker given" not in capsys.readouterr().err
