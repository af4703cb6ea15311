"""Found 17, item 1: a retained escalation was scored at every re-scorer start.

A tester published one valid escalation with retain=True, then started ``teacher
serve`` several times on new stores: the broker handed the retained message to
every new subscription, so the same escalation was stored and scored in every
store (and answered again as a copy against an old one). Agents never publish
escalations retained, so a retained one is stale or forged: the re-scorer now
rejects it (kind ``retained``), keeps it in the table of rejected messages, and
does not answer it (see ``teacher.serve``'s docstring for why).

The broker is a real mosquitto on 127.0.0.1; the teacher is a stand-in (every
window scores 0.7), as the delivery is what is under test.
"""

from __future__ import annotations

import json
import time

import pytest

from edge_agent import protocol as proto
from edge_agent.mqtt import MqttLink
from teacher.serve import ReScorer
from teacher.store import AlertStore
from tests.conftest import FixedTeacher, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

WINDOW = [[0.0, 0.25, 1.0], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0], [1.0, 0.1, 0.9]]


def escalation(i: int, gateway: str = "ret") -> dict:
    """A valid escalation of gateway s1/``gateway`` with id ``i`` as 32 hex digits."""
    flow = {"ts": 1600000000.0 + i, "src_ip": "10.0.0.1", "src_port": 40000 + i,
            "dst_ip": "10.0.0.2", "dst_port": 80, "proto": "tcp"}
    return proto.build_escalation(
        flow=flow, window=WINDOW, score=0.9, decision="alert", model_version="m1",
        site="s1", gateway=gateway, msg_id=f"{i:032x}",
    )


def publish(url: str, body: dict, retain: bool) -> None:
    """Publish one escalation on its gateway's topic at QoS 1 and wait for PUBACK."""
    sender = MqttLink(url, f"gw-sender-{time.monotonic_ns()}", protocol="5")
    sender.connect(timeout=5)
    try:
        where = proto.topic(body["site"], body["gateway"], proto.Channel.ESCALATIONS)
        assert sender.publish(where, proto.encode(body), qos=1,
                              retain=retain).wait(10)
    finally:
        sender.close()


class Watcher:
    """Everything published on the verdicts topic of s1/ret, as parsed answers."""

    def __init__(self, url: str) -> None:
        self.got: list[dict] = []
        self.link = MqttLink(url, f"watcher-{time.monotonic_ns()}", protocol="5",
                             on_message=self._on_message)
        self.link.connect(timeout=5)
        self.link.subscribe("gatewatch/v1/s1/+/verdicts", qos=1, timeout=5)

    def _on_message(self, topic: str, payload: bytes) -> None:
        self.got.append(json.loads(payload))

    def close(self) -> None:
        self.link.close()


def run_once(url: str, path, protocol: str, share_group: str | None,
             settle: float = 1.0) -> ReScorer:
    """Start a re-scorer on the store at ``path``, let the broker deliver what it
    holds for a new subscription, and stop it."""
    store = AlertStore(path)
    server = ReScorer(FixedTeacher(), broker=url, store=store, client_id="rs-ret",
                      protocol=protocol, share_group=share_group, max_wait_ms=5)
    server.start(connect_timeout=5)
    try:
        wait_for(lambda: server.counters["received"] >= 1, 10, "the retained message")
        time.sleep(settle)  # anything more the broker had would come now
    finally:
        server.stop(timeout=5)
        store.close()
    return server


@pytest.mark.parametrize(("protocol", "share_group"),
                         [("5", "gatewatch"), ("5", None), ("3.1.1", None)])
def test_a_retained_escalation_is_rejected_at_every_start_never_scored(
    mosquitto, tmp_path, protocol, share_group
):
    """Found: each start on a new store stored and scored the retained message
    again. Now each start rejects it as retained: nothing stored as an
    escalation, nothing scored, no answer on the verdicts topic."""
    body = escalation(1)
    publish(mosquitto.url, body, retain=True)
    watcher = Watcher(mosquitto.url)
    try:
        for n in range(3):
            path = tmp_path / f"alerts-{n}.sqlite"
            server = run_once(mosquitto.url, path, protocol, share_group)
            assert server.counters["received"] == 1
            assert server.counters["scored"] == server.counters["stored"] == 0
            assert server.counters["duplicates"] == 0
            assert server.counters["rejections_sent"] == 0
            assert server.rejects.counts == {"retained": 1}
            store = AlertStore(path, readonly=True)
            try:
                assert store.count() == 0
                [row] = store.rejected().rows
            finally:
                store.close()
            assert row["kind"] == "retained"
            assert row["reason"].startswith("escalations are never published retained")
            assert row["topic"] == "gatewatch/v1/s1/ret/escalations"
            assert row["payload"] == proto.encode(body)
        time.sleep(0.5)  # an answer, had one been sent, has reached the watcher
    finally:
        watcher.close()
    assert watcher.got == []


def test_a_retained_copy_is_not_answered_against_an_old_store(mosquitto, tmp_path):
    """Found: against a store that already held the escalation, the retained copy
    was answered again as a duplicate. The store's row stays, the copy is only
    rejected, and the live escalation of the same id is still answered."""
    body = escalation(2)
    path = tmp_path / "alerts.sqlite"
    store = AlertStore(path)
    server = ReScorer(FixedTeacher(), broker=mosquitto.url, store=store,
                      client_id="rs-old", max_wait_ms=5)
    server.start(connect_timeout=5)
    try:
        publish(mosquitto.url, body, retain=False)
        wait_for(lambda: server.counters["verdicts_sent"] == 1, 10, "the verdict")
    finally:
        server.stop(timeout=5)
        store.close()

    publish(mosquitto.url, body, retain=True)  # the same message, now retained
    watcher = Watcher(mosquitto.url)
    try:
        again = run_once(mosquitto.url, path, "5", "gatewatch")
        time.sleep(0.5)
    finally:
        watcher.close()
    assert again.counters["duplicates"] == again.counters["verdicts_sent"] == 0
    assert again.rejects.counts == {"retained": 1}
    assert watcher.got == []
    store = AlertStore(path, readonly=True)
    try:
        assert [r["id"] for r in store.query()] == [body["id"]]
        assert [r["kind"] for r in store.rejected().rows] == ["retained"]
    finally:
        store.close()


def test_a_live_escalation_beside_a_retained_one_is_scored(mosquitto, tmp_path):
    """The retained flag, not the topic or the id, is what is refused: a live
    escalation on the same topic is scored and answered as always."""
    publish(mosquitto.url, escalation(3), retain=True)
    path = tmp_path / "alerts.sqlite"
    store = AlertStore(path)
    server = ReScorer(FixedTeacher(), broker=mosquitto.url, store=store,
                      client_id="rs-live", max_wait_ms=5)
    watcher = Watcher(mosquitto.url)
    server.start(connect_timeout=5)
    try:
        wait_for(lambda: server.rejects.counts.get("retained") == 1, 10,
                 "the retained message")
        publish(mosquitto.url, escalation(4), retain=False)
        wait_for(lambda: server.counters["verdicts_sent"] == 1, 10, "the verdict")
        wait_for(lambda: len(watcher.got) == 1, 10, "the watcher")
    finally:
        server.stop(timeout=5)
        watcher.close()
        store.close()
    assert watcher.got[0]["kind"] == "verdict"
    assert watcher.got[0]["escalation_id"] == f"{4:032x}"
    assert server.counters["stored"] == 1


def test_the_handler_sees_the_flag_without_a_broker(tmp_path):
    """The same rule without a broker: a message handled while the link says it
    came retained is rejected (and acknowledged), even an otherwise valid one."""
    store = AlertStore(tmp_path / "a.sqlite")
    server = ReScorer(FixedTeacher(), broker="mqtt://127.0.0.1:1", store=store,
                      client_id="rs-test")
    acked: list = []
    sent: list = []
    server.link.ack = acked.append
    server.link.publish = lambda topic, payload, qos=1: sent.append(topic)
    topic = "gatewatch/v1/s1/ret/escalations"
    try:
        server.link.retained = True
        server._on_message(topic, proto.encode(escalation(5)), "t1")
        server.link.retained = False
        server._on_message(topic, proto.encode(escalation(6)), "t2")
        assert acked == ["t1"] and sent == []
        assert server.rejects.counts == {"retained": 1}
        assert server._queue.qsize() == 1  # the second, live one, waits to be scored
    finally:
        store.close()
