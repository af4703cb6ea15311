"""The re-scorer's alert store failing under it: no escalation is lost.

Found: with its store on a full disk, ``teacher serve`` acknowledged every
escalation of a failed batch to the broker (the agent then deletes it from its
outbox), logged a misleading "cannot rollback" traceback and exited 0; after a
restart nothing came back. Now the first failed write stops the re-scorer, nothing
it did not store is acknowledged, its session stays at the broker, and a restart
with the same client id stores every escalation exactly once.

A full disk is made without root: SQLite's ``max_page_count`` caps the store's file
at the pages it has, so the next write fails with SQLite's own "database or disk is
full" (SQLITE_FULL, which rolls the transaction back by itself, as a real full disk
does). The broker is a real mosquitto on 127.0.0.1; the teacher is a stand-in
(every window scores 0.7), as the store is what is under test.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent import protocol as proto
from edge_agent.mqtt import MqttLink
from flows.errors import EXIT_FAILURE
from teacher.cli import main
from teacher.serve import ReScorer
from teacher.store import AlertStore, StoreError
from tests.conftest import FixedTeacher, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(300)]

WINDOW = [[0.0, 0.25, 1.0], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0], [1.0, 0.1, 0.9]]


def escalation(i: int) -> dict:
    """Escalation ``i`` of gateway s1/g1, with id ``i`` as 32 hex digits."""
    flow = {
        "ts": 1600000000.0 + i,
        "src_ip": "10.0.0.1",
        "src_port": 40000 + i,
        "dst_ip": "10.0.0.2",
        "dst_port": 80,
        "proto": "tcp",
    }
    return proto.build_escalation(
        flow=flow,
        window=WINDOW,
        score=0.9,
        decision="alert",
        model_version="m1",
        site="s1",
        gateway="g1",
        msg_id=f"{i:032x}",
    )


def fill(store: AlertStore) -> None:
    """Make ``store`` full: its file may not grow by one more page."""
    with store._lock:  # the re-scorer's thread may be using the connection
        db = store._db
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")


def publish(url: str, bodies: list[dict]) -> None:
    """Publish escalations at QoS 1; each must be acknowledged and routed."""
    sender = MqttLink(url, "gw-sender", protocol="5")
    sender.connect(timeout=5)
    topic = proto.topic("s1", "g1", proto.Channel.ESCALATIONS)
    try:
        for body in bodies:
            delivery = sender.publish(topic, proto.encode(body), qos=1)
            assert delivery.wait(10) and not delivery.unrouted, body["id"]
    finally:
        sender.close()


def stored_ids(path: Path) -> list[str]:
    """Every stored escalation id, one per row (copies would show twice)."""
    store = AlertStore(path, readonly=True)
    try:
        return [r["id"] for r in store.query()]
    finally:
        store.close()


def test_a_full_store_raises_its_own_error_and_keeps_nothing_of_the_batch(tmp_path):
    """Found: the ROLLBACK after SQLITE_FULL failed ("no transaction is active")
    and that error replaced the real one."""
    path = tmp_path / "alerts.sqlite"
    store = AlertStore(path)
    verdict = proto.build_verdict(
        escalation_id="x", verdict="benign", score=0.1, threshold=0.5,
        teacher_version="t",
    )
    assert store.add(escalation(0), verdict)
    fill(store)
    pairs = [(escalation(i), verdict) for i in range(1, 200)]
    with pytest.raises(StoreError) as caught:
        store.add_many(pairs)
    message = str(caught.value)
    assert message.startswith(f"alert store {path}: cannot write 199 escalations")
    assert "database or disk is full" in message
    assert "rollback" not in message
    assert caught.value.exit_code == EXIT_FAILURE
    assert store.count() == 1  # none of the failed batch

    # The same connection writes again once there is room.
    store._db.execute("PRAGMA max_page_count = 1073741823")
    assert store.add_many(pairs) == [True] * 199
    assert store.count() == 200
    store.close()


def test_a_store_that_cannot_be_made_is_an_error_naming_it(tmp_path):
    """Found while testing the above: a store under a path that cannot be a
    folder ended in a NotADirectoryError traceback; it is a StoreError (exit 1)."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder\n")
    path = blocker / "alerts.sqlite"
    with pytest.raises(StoreError) as caught:
        AlertStore(path)
    assert str(caught.value).startswith(
        f"alert store {path}: cannot make its folder {blocker}: "
    )
    assert caught.value.exit_code == EXIT_FAILURE
    assert blocker.read_text() == "not a folder\n"


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_escalations_a_full_store_did_not_take_are_delivered_again(
    mosquitto, tmp_path, protocol
):
    """The store fills after the first escalation; the re-scorer stops without
    acknowledging the rest, keeps its session, and a restart with the same client
    id on a store with room stores all of them, each once."""
    path = tmp_path / "alerts.sqlite"
    bodies = [escalation(i) for i in range(100)]
    store = AlertStore(path)
    server = ReScorer(
        FixedTeacher(), broker=mosquitto.url, store=store, client_id="rs-full",
        protocol=protocol, max_batch=16, max_wait_ms=50,
    )
    server.start(connect_timeout=5)
    try:
        publish(mosquitto.url, bodies[:1])
        wait_for(lambda: store.count() == 1, 20, "the first escalation")
        fill(store)
        publish(mosquitto.url, bodies[1:])
        assert server.halt.wait(20), "the re-scorer did not stop on the full store"
    finally:
        server.stop(timeout=5)
        store.close()
    assert "database or disk is full" in str(server.store_error)
    assert str(path) in str(server.store_error)
    counters = server.counters
    assert counters["stored"] == 1
    assert counters["unacknowledged"] >= 1
    assert counters["unacknowledged"] == counters["received"] - 1
    assert stored_ids(path) == [bodies[0]["id"]]

    # Room again (the cap lives only in that connection): restart, same client id.
    store = AlertStore(path)
    again = ReScorer(
        FixedTeacher(), broker=mosquitto.url, store=store, client_id="rs-full",
        protocol=protocol, max_batch=16, max_wait_ms=50,
    )
    again.start(connect_timeout=5)
    try:
        wait_for(lambda: store.count() == len(bodies), 60, "every escalation")
        time.sleep(0.5)  # a copy, were one acknowledged twice, would come now
    finally:
        again.stop(timeout=5)
        store.close()
    ids = stored_ids(path)
    assert sorted(ids) == sorted(b["id"] for b in bodies)
    assert len(ids) == len(set(ids)) == 100
    assert again.store_error is None and again.counters["unacknowledged"] == 0


def _queue_for(port: int, client_id: str, topic_filter: str) -> None:
    """Open a kept session for ``client_id`` subscribed to ``topic_filter`` and
    leave: what is published next waits there for the re-scorer."""
    done = threading.Event()
    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
    )
    client.on_subscribe = lambda *a: done.set()
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 300
    client.connect("127.0.0.1", port, clean_start=True, properties=props)
    client.loop_start()
    try:
        client.subscribe(topic_filter, qos=1)
        assert done.wait(10), "no SUBACK"
    finally:
        client.disconnect()
        client.loop_stop()


def test_serve_on_a_full_store_exits_1_with_one_error_line(
    mosquitto, tmp_path, monkeypatch, capsys
):
    """The command stops at the first failed write, exit 1, one ``error:`` line
    naming the store and SQLite's reason, no traceback; the summary says how many
    escalations it left unacknowledged, and they all come to the next run."""
    import teacher.checkpoint
    import teacher.serve

    class FullStore(AlertStore):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            fill(self)

    path = tmp_path / "alerts.sqlite"
    topic_filter = proto.subscription(proto.Channel.ESCALATIONS, "gatewatch")
    _queue_for(mosquitto.port, "rs-cli", topic_filter)
    bodies = [escalation(i) for i in range(30)]
    publish(mosquitto.url, bodies)

    monkeypatch.setattr(
        teacher.checkpoint, "load_teacher", lambda path, **kw: FixedTeacher()
    )
    monkeypatch.setattr(teacher.serve, "_set_threads", lambda *a: None)
    monkeypatch.setattr(teacher.serve, "AlertStore", FullStore)
    started = time.monotonic()
    code = main([
        "serve", "--checkpoint", "ckpt", "--broker", mosquitto.url,
        "--store", str(path), "--client-id", "rs-cli", "--duration", "120",
    ])
    took = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == EXIT_FAILURE, err
    assert took < 60, f"it served on for {took:.0f} s after the store failed"
    assert "Traceback" not in err and "rollback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert errors[0].startswith(f"error: alert store {path}: cannot write ")
    assert "database or disk is full" in errors[0]
    assert "not acknowledged" in errors[0]
    summary = re.search(
        r"re-scorer: received (\d+), scored \d+, stored (\d+), .*"
        r"unacknowledged (\d+)",
        err,
    )
    assert summary, err
    received, stored, left = map(int, summary.groups())
    assert stored == 0 and left == received >= 1

    # The next run, on a store with room, gets all 30.
    monkeypatch.undo()
    store = AlertStore(path)
    server = ReScorer(
        FixedTeacher(), broker=mosquitto.url, store=store, client_id="rs-cli"
    )
    server.start(connect_timeout=5)
    try:
        wait_for(lambda: store.count() == len(bodies), 60, "every escalation")
    finally:
        server.stop(timeout=5)
        store.close()
    ids = stored_ids(path)
    assert sorted(ids) == sorted(b["id"] for b in bodies)
