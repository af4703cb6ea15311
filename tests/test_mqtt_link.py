"""The MQTT link and the agent's status/will/model topics against real brokers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from benchmarks.broker import EmbeddedBroker
from edge_agent import protocol as proto
from edge_agent.agent import Agent
from edge_agent.mqtt import BrokerAddress, MqttLink, Protocol
from edge_agent.outbox import Outbox
from edge_agent.runtime import load_artifact
from flows.errors import TransportError, UsageError
from tests.conftest import free_port, wait_for
from tests.test_agent_fixtures import make_artifact, tiny

pytestmark = pytest.mark.broker
BIN = Path(sys.executable).parent


@pytest.fixture
def tm(data_dir, tmp_path_factory):
    return tiny(data_dir, tmp_path_factory)


class Watcher:
    """A plain paho subscriber that records (topic, JSON payload, retain)."""

    def __init__(self, port: int, topic_filter: str) -> None:
        self.got: list[tuple[str, dict, bool]] = []
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=f"watch-{port}",
            protocol=paho.MQTTv5,
        )
        self.client.on_message = lambda c, u, m: self.got.append(
            (m.topic, json.loads(m.payload), bool(m.retain))
        )
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(topic_filter, qos=1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.mark.parametrize(
    "url,expected",
    [
        ("mqtt://h:1884", BrokerAddress("h", 1884)),
        ("mqtts://u:p%40ss@h", BrokerAddress("h", 8883, True, "u", "p@ss")),
        ("mqtt://h", BrokerAddress("h", 1883)),
    ],
)
def test_broker_urls(url, expected) -> None:
    assert BrokerAddress.parse(url) == expected


@pytest.mark.parametrize("url", ["http://h:1", "mqtt://", "h:1883", "mqtt://h:99999"])
def test_bad_broker_urls_are_usage_errors(url) -> None:
    with pytest.raises(UsageError):
        BrokerAddress.parse(url)


def test_unreachable_broker_is_a_transport_error() -> None:
    link = MqttLink(f"mqtt://127.0.0.1:{free_port()}", "x")
    with pytest.raises(TransportError, match="cannot reach broker"):
        link.connect(timeout=0.5)


def test_refused_login_is_a_transport_error(tmp_path: Path) -> None:
    import shutil

    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not on PATH")
    port = free_port()
    conf = tmp_path / "closed.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous false\n"
        "persistence false\nlog_dest stdout\n"
    )
    proc = subprocess.Popen(
        ["mosquitto", "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: _listening(port), 10, "mosquitto")
        link = MqttLink(
            f"mqtt://127.0.0.1:{port}", "x", username="nobody", password="wrong"
        )
        with pytest.raises(TransportError) as caught:
            link.connect(timeout=5)
        # The reason in words with its code, not the bare code ("135").
        assert str(caught.value) == (
            f"broker mqtt://127.0.0.1:{port} refused the connection: "
            "Not authorized (135)"
        )
    finally:
        proc.terminate()
        proc.wait(5)


@pytest.mark.parametrize(
    ("code", "words"),
    [(135, "Not authorized (135)"), (134, "Bad user name or password (134)"),
     (138, "Banned (138)")],
)
def test_a_refused_connect_says_the_reason_in_words(code, words, monkeypatch):
    """Found: a refused login ended in "refused the connection: 135"; the reason
    code's name says what it means (paho's ReasonCode holds it)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    link = MqttLink("mqtt://127.0.0.1:1", "x", protocol="5")

    def refused(version, deadline):  # the broker's CONNACK, as paho hands it on
        link._handle_connect(None, None, None, ReasonCode(PacketTypes.CONNACK,
                                                          identifier=code), None)
        return link._connack_rc

    monkeypatch.setattr(link, "_attempt", refused)
    with pytest.raises(TransportError) as caught:
        link.connect(timeout=1)
    assert str(caught.value) == (
        f"broker mqtt://127.0.0.1:1 refused the connection: {words}")


def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def test_status_is_retained_and_the_will_reports_a_killed_agent(
    tm, mosquitto, tmp_path: Path
):
    status = "gatewatch/v1/s1/g1/status"
    cmd = [
        str(BIN / "edge-agent"),
        "run",
        "--artifact",
        str(tm.artifact),
        "--source",
        "-",
        "--broker",
        mosquitto.url,
        "--site",
        "s1",
        "--gateway",
        "g1",
        "--outbox",
        str(tmp_path / "o.db"),
        "--keepalive",
        "2",
        "--alerts",
        "",
    ]
    agent = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    watcher = Watcher(mosquitto.port, status)
    try:
        wait_for(
            lambda: any(p["state"] == "online" for _, p, _ in watcher.got),
            30,
            "online status",
        )
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        wait_for(lambda: watcher.got[-1][1]["state"] == "offline", 30, "the last will")
    finally:
        if agent.poll() is None:
            agent.kill()
        watcher.close()
    assert watcher.got[-1][1]["model_version"] == "tiny-0001"

    # A new subscriber sees the retained offline status at once.
    late = Watcher(mosquitto.port, status)
    try:
        wait_for(lambda: late.got, 10, "retained status")
        topic, payload, retained = late.got[0]
        assert retained and payload["state"] == "offline"
        assert payload["schema"] == "gatewatch/v1"
    finally:
        late.close()


def test_amqtt_fallback_to_3_1_1_carries_escalations(tm, tmp_path: Path) -> None:
    pytest.importorskip("amqtt")
    got: list[bytes] = []
    with EmbeddedBroker("amqtt") as broker:
        reader = MqttLink(broker.url, "reader", on_message=lambda t, p: got.append(p))
        reader.connect(10)
        assert reader.protocol is Protocol.V311
        with pytest.raises(TransportError, match="MQTT v5"):
            reader.subscribe(proto.subscription("escalations", "grp"))
        reader.subscribe(proto.subscription("escalations"))
        agent = Agent(
            load_artifact(tm.artifact),
            site="s1",
            gateway="g1",
            outbox=Outbox(tmp_path / "o.db"),
            link=MqttLink(broker.url, "gw"),
        )
        agent.start()
        try:
            agent.run_file(tm.records)
            assert agent.drain(60, wait_verdicts=False)
            wait_for(lambda: len(got) == len(tm.expected()), 30, "all escalations")
        finally:
            agent.close()
            reader.close()
    assert agent.link.protocol is Protocol.V311
    ids = {json.loads(p)["id"] for p in got}
    assert ids == set(tm.expected())


@dataclass
class _Result:
    ok: bool
    scorer: object = None
    version: str = ""
    reason: str = ""


class FolderUpdater:
    """A real update handler for the seam: the payload names an artifact folder."""

    def handle(self, payload: bytes) -> _Result:
        body = json.loads(payload)
        try:
            scorer = load_artifact(body["artifact"])
        except Exception as exc:  # noqa: BLE001 - the reason goes back in status
            return _Result(False, reason=str(exc))
        return _Result(True, scorer, scorer.model_version)


def test_status_is_refreshed_with_counters(tm, mosquitto, tmp_path):
    agent = Agent(
        load_artifact(tm.artifact),
        site="s1",
        gateway="g1",
        outbox=Outbox(tmp_path / "o.db"),
        link=MqttLink(mosquitto.url, "gw"),
        status_interval=0.3,
    )
    watcher = Watcher(mosquitto.port, "gatewatch/v1/s1/g1/status")
    agent.start()
    try:
        agent.run_file(tm.records[:500])
        wait_for(
            lambda: any(p["counters"].get("flows") == 500 for _, p, _ in watcher.got),
            20,
            "counters in status",
        )
    finally:
        agent.close()
        watcher.close()
    assert watcher.got[-1][1]["state"] == "offline"


def test_model_topic_swaps_the_scorer_or_reports_why_not(tm, mosquitto, tmp_path):
    agent = Agent(
        load_artifact(tm.artifact),
        site="s1",
        gateway="g1",
        outbox=Outbox(tmp_path / "o.db"),
        link=MqttLink(mosquitto.url, "gw"),
    )
    agent.start()
    agent.enable_model_updates(FolderUpdater())
    watcher = Watcher(mosquitto.port, "gatewatch/v1/s1/g1/status")
    new = make_artifact(tmp_path / "v2", tm.encoder, tm.thresholds, version="tiny-0002")
    try:
        pub = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id="op", protocol=paho.MQTTv5
        )
        pub.connect("127.0.0.1", mosquitto.port)
        pub.loop_start()
        topic = "gatewatch/v1/s1/g1/model"
        pub.publish(
            topic, json.dumps({"artifact": str(tmp_path / "nope")}), qos=1
        ).wait_for_publish(5)
        wait_for(
            lambda: any("update_refused" in p for _, p, _ in watcher.got),
            20,
            "refusal in status",
        )
        assert agent.model_version == "tiny-0001"
        pub.publish(topic, json.dumps({"artifact": str(new)}), qos=1).wait_for_publish(
            5
        )
        wait_for(lambda: agent.model_version == "tiny-0002", 20, "the swap")
        wait_for(
            lambda: watcher.got[-1][1].get("model_version") == "tiny-0002",
            20,
            "status with the new model",
        )
        pub.loop_stop()
        pub.disconnect()
    finally:
        watcher.close()
        agent.close()
