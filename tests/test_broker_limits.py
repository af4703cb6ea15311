"""The MQTT link against a broker's limits: a bad certificate and a packet too large.

Both run on real mosquitto brokers on 127.0.0.1. A certificate the client cannot
verify must end ``edge-agent run`` at once with exit 6 and a sentence naming the
problem, not after retrying until the connect timeout. A message over the broker's
maximum packet size must be refused before it is sent: the agent drops that one
escalation from its outbox and counts it, stays connected (one connect in all) and
goes on delivering the others.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from edge_agent import protocol as proto
from edge_agent.agent import Agent
from edge_agent.broker_config import Deployment, make_ca
from edge_agent.cli import main
from edge_agent.mqtt import MessageTooLargeError, MqttLink, TlsOptions
from edge_agent.outbox import Outbox
from edge_agent.runtime import load_artifact
from flows.errors import EXIT_UNAVAILABLE, TransportError
from tests.conftest import Mosquitto, label_cap_raised
from tests.secure_broker import HOST, SecureBroker, need_mosquitto, wait_until
from tests.test_agent_fixtures import tiny

pytestmark = pytest.mark.broker
G1 = "gw-s1-g1"
# Escalations of the tiny model are about 4-4.5 KB; this bound lets those through.
PACKET_LIMIT = 8192


# The huge label of these tests must still make an oversized escalation.
_label_cap_raised = pytest.fixture(autouse=True)(label_cap_raised)


@pytest.fixture
def tm(data_dir, tmp_path_factory):
    return tiny(data_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def secure():
    """One locked-down TLS broker with the gateway s1/g1."""
    need_mosquitto()
    running = SecureBroker(Deployment(gateways=(("s1", "g1"),))).start()
    yield running
    running.stop()


@pytest.fixture
def small_broker(tmp_path: Path):
    """A plain mosquitto with max_packet_size PACKET_LIMIT (announced in CONNACK)."""
    need_mosquitto()
    broker = Mosquitto(tmp_path, extra=f"max_packet_size {PACKET_LIMIT}\n")
    broker.start()
    yield broker
    broker.stop()


class Watcher:
    """A paho subscriber recording the JSON payloads on one topic filter."""

    def __init__(self, port: int, topic_filter: str) -> None:
        self.got: list[dict] = []
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=f"watch-{port}",
            protocol=paho.MQTTv5,
        )
        self.client.on_message = lambda c, u, m: self.got.append(json.loads(m.payload))
        self.client.connect(HOST, port)
        self.client.loop_start()
        info = self.client.subscribe(topic_filter, qos=1)
        assert info[0] == paho.MQTT_ERR_SUCCESS

    def ids(self) -> set[str]:
        return {p["id"] for p in list(self.got)}

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# --- certificates: permanent, so reported at once -----------------------------------


def test_wrong_ca_makes_edge_agent_run_exit_6_at_once(tm, secure, tmp_path, capsys):
    """A CA that did not sign the broker's certificate: exit 6 in about a second."""
    other = tmp_path / "other-ca.crt"
    other.write_bytes(make_ca("someone else").cert_pem)
    password = tmp_path / "password"
    password.write_text(secure.password(G1) + "\n")

    start = time.monotonic()
    rc = main(
        [
            "run",
            "--artifact", str(tm.artifact),
            "--source", f"zeek:{tm.conn_log}",
            "--broker", f"mqtts://{HOST}:{secure.port}",
            "--tls-ca", str(other),
            "--username", G1,
            "--password-file", str(password),
            "--site", "s1",
            "--gateway", "g1",
            "--outbox", str(tmp_path / "o.db"),
            "--connect-timeout", "30",
            "--alerts", "",
        ]
    )  # fmt: skip
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err

    assert rc == EXIT_UNAVAILABLE
    assert elapsed < 5, f"took {elapsed:.1f} s: the bad certificate was retried"
    assert err.startswith("error: broker 127.0.0.1:")
    assert "TLS certificate verification failed" in err
    assert f"not signed by the CA in {other}" in err
    assert "Traceback" not in err


def test_wrong_host_name_fails_the_link_at_once_naming_the_certificate(tmp_path):
    """A certificate that does not name the address used: one error with its names."""
    need_mosquitto()
    named = SecureBroker(
        Deployment(
            gateways=(("s1", "g1"),),
            host_names=("mq.gatewatch.test",),
            ip_addresses=(),
        )
    ).start()
    try:
        link = MqttLink(
            f"mqtts://{HOST}:{named.port}",
            G1,
            username=G1,
            password=named.password(G1),
            tls=TlsOptions(ca_certs=str(named.ca)),
        )
        start = time.monotonic()
        with pytest.raises(TransportError, match="not valid for '127.0.0.1'") as err:
            link.connect(timeout=30)
        assert time.monotonic() - start < 5
        assert "it names: mq.gatewatch.test" in str(err.value)
        assert not link.connected
    finally:
        named.stop()


def test_right_ca_still_connects(secure):
    """The check does not get in the way of a good certificate."""
    link = MqttLink(
        f"mqtts://{HOST}:{secure.port}",
        G1,
        username=G1,
        password=secure.password(G1),
        tls=TlsOptions(ca_certs=str(secure.ca)),
    )
    link.connect(timeout=5)
    try:
        assert link.connected and link.packet_limit is not None
    finally:
        link.close()


# --- packet size: refused before sending, dropped, counted ----------------------------


def test_link_refuses_a_message_over_the_connack_limit(small_broker):
    """The bound comes from CONNACK; an oversized publish sends nothing."""
    link = MqttLink(small_broker.url, "sizer", protocol="5")
    link.connect(timeout=5)
    try:
        assert link.packet_limit == PACKET_LIMIT
        name = proto.topic("s1", "g1", proto.Channel.ESCALATIONS)
        with pytest.raises(MessageTooLargeError, match="over the broker's limit"):
            link.publish(name, b"x" * PACKET_LIMIT)
        assert link.publish(name, b"small").wait(5)
        time.sleep(0.3)
        assert link.connected and link.generation == 1
    finally:
        link.close()


def test_oversized_escalation_is_dropped_counted_and_the_agent_stays(
    tm, small_broker, tmp_path, caplog
):
    """One escalation over the bound is dropped once; the others, earlier and later,
    all arrive over the same single connection."""
    expected = tm.expected()
    escalated = [i for i, r in enumerate(tm.records) if _id(r) in expected]
    assert len(escalated) > 20
    cut = escalated[10] + 1
    first, later = tm.records[:cut], tm.records[cut:]

    # A hostile log line with a huge text field: its escalation is ~14 KB.
    big = escalated[5]
    first = list(first)
    first[big] = dict(first[big], label_detail="x" * 10_000)
    big_id = _id(first[big])

    watcher = Watcher(small_broker.port, "gatewatch/v1/s1/g1/escalations")
    link = MqttLink(small_broker.url, G1, protocol="5")
    agent = Agent(
        load_artifact(tm.artifact),
        site="s1",
        gateway="g1",
        outbox=Outbox(tmp_path / "o.db"),
        link=link,
    )
    agent.start(connect_timeout=5)
    try:
        with caplog.at_level("WARNING", logger="edge_agent"):
            agent.run_file(first)
            assert agent.drain(20, wait_verdicts=False)
            want_first = {_id(r) for r in first} & set(expected) - {big_id}
            assert wait_until(lambda: watcher.ids() >= want_first, 10)

            agent.run_file(later)
            assert agent.drain(20, wait_verdicts=False)
            assert wait_until(lambda: watcher.ids() == set(expected) - {big_id}, 10)
        summary = agent.summary()
        assert link.connected and link.generation == 1
    finally:
        agent.close()
        watcher.close()

    assert summary["dropped_oversized"] == 1
    assert summary["outbox_pending"] == 0
    assert summary["escalations_sent"] == len(expected) - 1
    assert big_id not in watcher.ids()
    drops = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(drops) == 1 and big_id in drops[0].getMessage()


def test_max_packet_size_guards_a_3_1_1_link(
    tm, small_broker, tmp_path, monkeypatch, capsys
):
    """MQTT 3.1.1 has no CONNACK bound to learn from: ``--max-packet-size`` gives the
    agent the broker's, so the one oversized escalation is dropped and counted and
    every other one arrives (none is sent into a disconnect and resent for ever)."""
    import io
    import sys

    records = [dict(r) for r in tm.records[:2400]]
    expected = tm.expected(records)
    escalated = [i for i, r in enumerate(records) if _id(r) in expected]
    big = escalated[len(escalated) // 2]
    records[big]["label_detail"] = "x" * 10_000
    big_id = _id(records[big])

    watcher = Watcher(small_broker.port, "gatewatch/v1/s1/g1/escalations")
    lines = "".join(json.dumps(r) + "\n" for r in records)
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    summary = tmp_path / "s.json"
    try:
        rc = main(
            [
                "run",
                "--artifact", str(tm.artifact),
                "--source", "-",
                "--broker", small_broker.url,
                "--protocol", "3.1.1",
                "--max-packet-size", str(PACKET_LIMIT),
                "--site", "s1",
                "--gateway", "g1",
                "--outbox", str(tmp_path / "o.db"),
                "--alerts", "",
                "--no-wait-verdicts",
                "--drain-timeout", "20",
                "--summary-json", str(summary),
            ]
        )  # fmt: skip
        assert wait_until(lambda: watcher.ids() == set(expected) - {big_id}, 10)
    finally:
        watcher.close()
    out = json.loads(summary.read_text())

    # The one dropped escalation is lost to the re-scorer: not a clean exit.
    assert rc == 6
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        "error: 1 escalations were larger than the protocol's 262144-byte cap or "
        f"the broker's packet limit ({PACKET_LIMIT} bytes) and were dropped, not "
        "sent; no alert line records them, as --alerts is empty (a record with a "
        "huge text field, or a --max-packet-size set too low)"
    ]
    assert out["dropped_oversized"] == 1
    assert out["outbox_pending"] == 0
    assert out["escalations_sent"] == len(expected) - 1


@pytest.mark.parametrize("value", ["1", "127", "268435461", "-1"])
def test_max_packet_size_out_of_range_is_a_usage_error(tm, tmp_path, value, capsys):
    rc = main(
        [
            "run", "--artifact", str(tm.artifact), "--source", f"zeek:{tm.conn_log}",
            "--site", "s1", "--gateway", "g1", "--max-packet-size", value,
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: --max-packet-size must be"), err


def _id(record: dict) -> str:
    from edge_agent.agent import flow_id

    return flow_id("s1", "g1", record)


def test_rescorer_counts_a_verdict_it_cannot_send(tm, small_broker, tmp_path):
    """``teacher serve`` refuses an oversized verdict the same way, counts it, goes on.

    Verdicts are far smaller than any bound the broker may set, so the link's bound
    is lowered after CONNACK to one a verdict exceeds.
    """
    from teacher.serve import ReScorer
    from teacher.store import AlertStore
    from tests.test_agent_fixtures import make_teacher

    _, teacher = make_teacher(tm, tm.artifact.parent / "teacher")
    store = AlertStore(tmp_path / "alerts.sqlite")
    server = ReScorer(teacher, broker=small_broker.url, store=store, max_wait_ms=0)
    server.start(connect_timeout=5)
    server.link.packet_limit = 120
    sender = MqttLink(small_broker.url, "sender", protocol="5")
    sender.connect(timeout=5)
    try:
        for i in range(3):
            body = proto.build_escalation(
                flow=tm.records[i],
                window=tm.windows[i],
                score=0.9,
                decision="alert",
                model_version="x",
                site="s1",
                gateway="g1",
            )
            topic = proto.topic("s1", "g1", proto.Channel.ESCALATIONS)
            assert sender.publish(topic, proto.encode(body)).wait(5)
        assert wait_until(lambda: server.counters["dropped_oversized"] == 3, 20)
        assert store.count() == 3
        assert server.counters["verdicts_sent"] == 0
        assert server.link.connected and server.link.generation == 1
    finally:
        sender.close()
        server.stop()
