"""Agent and re-scorer through a real mosquitto: nothing lost, nothing stored twice.

The agent runs as the ``edge-agent`` command on the real conn.log and a real capture;
the expected escalations (ids and decisions) and the teacher's verdicts are computed
here independently (own windowing and arithmetic for the student, a direct teacher
call for the verdicts).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest

from edge_agent import protocol as proto
from edge_agent.agent import Agent
from edge_agent.mqtt import MqttLink, Protocol
from edge_agent.outbox import Outbox
from edge_agent.runtime import load_artifact
from edge_agent.sources import canonical
from flows.errors import UsageError
from teacher.serve import ReScorer
from teacher.store import AlertStore
from tests.conftest import data_file, wait_for
from tests.test_agent_fixtures import make_teacher, tiny

pytestmark = pytest.mark.broker
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
# A capture on which the tiny test model escalates some flows (3): test7-malicious
# gave 18 while the meter left `service` null, none since it names services.
PCAP = "pcap/test12-icmp-portscan.pcap"


@pytest.fixture
def tm(data_dir, tmp_path_factory):
    return tiny(data_dir, tmp_path_factory)


@pytest.fixture
def teacher(tm, tmp_path_factory):
    folder = tm.artifact.parent / "teacher"
    return make_teacher(tm, folder)


def teacher_verdicts(tm, teacher_obj, records, gateway="g1") -> dict[str, tuple]:
    """{id: (verdict, teacher score)} computed directly from the windows."""
    from edge_agent.agent import flow_id
    from tests.test_agent_fixtures import numpy_scores

    windows, scores = numpy_scores(records, tm.encoder)
    keep = np.flatnonzero(scores >= tm.thresholds["escalate_low"])
    probs = teacher_obj.predict_proba(windows[keep]) if len(keep) else []
    out = {}
    for i, p in zip(keep, probs, strict=True):
        verdict = "malicious" if p >= teacher_obj.threshold else "benign"
        out[flow_id("s1", gateway, records[i])] = (verdict, float(p))
    return out


def agent_cmd(tm, broker, source, outbox, gateway="g1", *extra) -> list[str]:
    return [
        str(BIN / "edge-agent"),
        "run",
        "--artifact",
        str(tm.artifact),
        "--source",
        source,
        "--broker",
        broker,
        "--site",
        "s1",
        "--gateway",
        gateway,
        "--outbox",
        str(outbox),
        "--drain-timeout",
        "30",
        *extra,
    ]


def test_agent_and_rescorer_commands_agree(tm, teacher, mosquitto, tmp_path, data_dir):
    ckpt, teacher_obj = teacher
    store_path = tmp_path / "alerts.sqlite"
    serve_log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen(
        [
            str(BIN / "teacher"),
            "serve",
            "--checkpoint",
            str(ckpt),
            "--broker",
            mosquitto.url,
            "--store",
            str(store_path),
            "--stats-json",
            str(tmp_path / "stats.json"),
            "--max-batch",
            "32",
        ],
        stdout=serve_log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(
            lambda: "serving" in (tmp_path / "serve.log").read_text(),
            60,
            "teacher serve to start",
        )
        pcap = data_file(data_dir, PCAP)
        runs = {"g1": f"zeek:{tm.conn_log}", "g2": f"pcap:{pcap}"}
        summaries = {}
        for gw, source in runs.items():
            out = subprocess.run(
                agent_cmd(
                    tm,
                    mosquitto.url,
                    source,
                    tmp_path / f"{gw}.db",
                    gw,
                    "--summary-json",
                    str(tmp_path / f"{gw}.json"),
                    "--alerts",
                    str(tmp_path / f"{gw}.alerts"),
                ),
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert out.returncode == 0, out.stderr
            summaries[gw] = json.loads((tmp_path / f"{gw}.json").read_text())
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(30)
    assert serve.returncode == 0

    from flows.meter import iter_flows

    pcap_records = [canonical(r) for r in iter_flows(str(pcap))]
    expected = {"g1": tm.expected(), "g2": tm.expected(pcap_records, gateway="g2")}
    verdicts = {
        "g1": teacher_verdicts(tm, teacher_obj, tm.records),
        "g2": teacher_verdicts(tm, teacher_obj, pcap_records, "g2"),
    }
    store = AlertStore(store_path)
    for gw, summary in summaries.items():
        rows = store.query(gateway=f"s1/{gw}")
        assert len(expected[gw]) > 0
        assert summary["escalations_sent"] == len(rows) == len(expected[gw])
        assert summary["verdicts_received"] == len(expected[gw])
        assert {r["id"]: r["agent_decision"] for r in rows} == expected[gw]
        for r in rows:
            verdict, score = verdicts[gw][r["id"]]
            assert r["verdict"] == verdict
            assert r["teacher_score"] == pytest.approx(score, abs=1e-5)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["stored"] == sum(len(e) for e in expected.values())
    assert stats["duplicates"] == 0 and stats["rejected"] == {}

    # teacher alerts --json answers by gateway and decision.
    out = subprocess.run(
        [
            str(BIN / "teacher"),
            "alerts",
            "--store",
            str(store_path),
            "--json",
            "--gateway",
            "g1",
            "--decision",
            "alert",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    listed = json.loads(out.stdout)
    assert {r["id"] for r in listed} == {
        k for k, d in expected["g1"].items() if d == "alert"
    }


def _outbox_ids(path: Path) -> set[str]:
    if not path.exists():
        return set()
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return {r[0] for r in db.execute("SELECT id FROM outbox")}
    except sqlite3.OperationalError:
        return set()
    finally:
        db.close()


def _start_agent(tm, broker, outbox, log):
    return subprocess.Popen(
        agent_cmd(
            tm,
            broker,
            "-",
            outbox,
            "g1",
            "--alerts",
            "",
            "--summary-json",
            str(outbox) + ".json",
            "--max-wait-ms",
            "5",
        ),
        stdin=subprocess.PIPE,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _feed(proc, records) -> None:
    proc.stdin.write("".join(json.dumps(r) + "\n" for r in records))
    proc.stdin.flush()


def test_broker_outage_and_kill_9_lose_nothing(tm, teacher, mosquitto, tmp_path):
    _, teacher_obj = teacher
    store = AlertStore(tmp_path / "alerts.sqlite")
    server = ReScorer(teacher_obj, broker=mosquitto.url, store=store, max_batch=16)
    server.start()
    recs = tm.records[2800:]  # the busy part of the log: escalations in every step
    a, b, c = 700, 1500, 2100
    outbox = tmp_path / "outbox.sqlite"
    log = open(tmp_path / "agent.log", "w")
    agent = _start_agent(tm, mosquitto.url, outbox, log)
    try:
        # 1. Connected: the first part arrives.
        first = tm.expected(recs[:a])
        assert len(first) > 0
        _feed(agent, recs[:a])
        wait_for(lambda: store.count() == len(first), 60, "first part stored")

        # 2. Broker down while flows keep coming; they wait in the outbox.
        upto_b = tm.expected(recs[:b])
        assert len(upto_b) > len(first)
        mosquitto.stop()
        _feed(agent, recs[a:b])
        wait_for(
            lambda: _outbox_ids(outbox) == set(upto_b) - set(first),
            60,
            "second part in the outbox",
        )
        mosquitto.start()
        wait_for(lambda: store.count() == len(upto_b), 60, "replay after outage")

        # 3. Broker down again, agent killed with escalations still in its outbox.
        upto_c = tm.expected(recs[:c])
        assert len(upto_c) > len(upto_b)
        mosquitto.stop()
        _feed(agent, recs[b:c])
        wait_for(
            lambda: _outbox_ids(outbox) == set(upto_c) - set(upto_b),
            60,
            "third part in the outbox",
        )
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        mosquitto.start()

        # 4. Restarted agent re-reads from well before the kill: flows it had sent
        # and the broker had acknowledged come again and must be dropped as copies.
        start = next(
            i
            for i in range(b - 200, -1, -200)
            if set(tm.expected(recs[i:])) & set(upto_b)
        )
        again = recs[start:]
        agent = _start_agent(tm, mosquitto.url, outbox, log)
        _feed(agent, again)
        agent.stdin.close()
        assert agent.wait(120) == 0, (tmp_path / "agent.log").read_text()
    finally:
        if agent.poll() is None:
            agent.kill()
        server.stop()
    expected = {**tm.expected(again), **upto_c}
    stored = {r["id"] for r in store.query()}
    assert stored == set(expected)
    assert store.count() == len(expected)
    overlap = set(tm.expected(again)) & set(upto_b)
    assert len(overlap) > 0
    assert server.counters["duplicates"] >= len(overlap)
    assert server.counters["stored"] == len(expected)
    summary = json.loads(Path(str(outbox) + ".json").read_text())
    assert summary["outbox_pending"] == 0


def _share_group(teacher_obj, url: str, tmp_path: Path, max_batch: int):
    """Two re-scorers (ids rs0, rs1) in share group "grp", each with its own store."""
    stores = [AlertStore(tmp_path / f"s{i}.sqlite") for i in range(2)]
    servers = [
        ReScorer(teacher_obj, broker=url, store=store, share_group="grp",
                 client_id=f"rs{i}", max_batch=max_batch)
        for i, store in enumerate(stores)
    ]
    return stores, servers


def test_two_rescorers_in_one_share_group_split_without_copies(
    tm, teacher, mosquitto, tmp_path
):
    _, teacher_obj = teacher
    stores, servers = _share_group(teacher_obj, mosquitto.url, tmp_path, max_batch=8)
    for s in servers:
        s.start()
    time.sleep(0.3)
    agent = Agent(
        load_artifact(tm.artifact),
        site="s1",
        gateway="g1",
        outbox=Outbox(tmp_path / "o.db"),
        link=MqttLink(mosquitto.url, "gw-test"),
    )
    agent.start()
    try:
        agent.run_file(tm.records)
        assert agent.drain(60)
    finally:
        agent.close()
        for s in servers:
            s.stop()
    expected = tm.expected()
    ids = [{r["id"] for r in s.query()} for s in stores]
    assert all(len(x) > 0 for x in ids)
    assert not ids[0] & ids[1]
    assert ids[0] | ids[1] == set(expected)
    assert sum(s.counters["received"] for s in servers) == len(expected)
    assert agent.counters.verdicts_received == len(expected)


def test_bad_escalations_are_rejected_counted_and_the_service_goes_on(
    tm, teacher, mosquitto, tmp_path, caplog
):
    # The warnings are asserted below: capture them whatever level an earlier
    # in-process CLI call left on the root logger (compress's CLI sets ERROR).
    caplog.set_level(logging.WARNING, logger="gatewatch")
    _, teacher_obj = teacher
    store = AlertStore(tmp_path / "alerts.sqlite")
    server = ReScorer(teacher_obj, broker=mosquitto.url, store=store)
    server.start()
    got = []
    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2, client_id="tester", protocol=paho.MQTTv5
    )
    client.on_message = lambda c, u, m: got.append(json.loads(m.payload))
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()
    client.subscribe("gatewatch/v1/s1/g1/verdicts", qos=1)
    topic = "gatewatch/v1/s1/g1/escalations"
    W, F = tm.encoder.window, tm.encoder.n_features

    def esc(**over):
        body = proto.build_escalation(
            flow=tm.records[0],
            window=tm.windows[0],
            score=0.95,
            decision="alert",
            model_version="x",
            site="s1",
            gateway="g1",
        )
        body.update(over)
        return json.dumps(body).encode()

    bad = [
        b"{oops",
        b"{oops",
        esc(schema="other/v9"),
        b"x" * 300_000,
        esc(window=[[0.0] * F] * (W - 1)),
        esc(window=[[0.0] * (F + 1)] * W),
        esc(gateway="g2"),
        b"[" * 100_000,  # found: RecursionError killed paho's network thread
        esc(id="../../etc/passwd"),  # found: echoed back in the verdict
    ]
    # Those with an escalation id (a well-formed one) get a rejection back.
    answered = {json.loads(bad[i])["id"]: bad[i] for i in (4, 5, 6)}
    try:
        time.sleep(0.3)
        for data in bad:
            client.publish(topic, data, qos=1).wait_for_publish(5)
        good = esc()
        client.publish(topic, good, qos=1).wait_for_publish(5)
        wait_for(lambda: len(got) == 4, 30, "the verdict and the rejections")
        time.sleep(0.5)  # nothing more comes
    finally:
        client.loop_stop()
        client.disconnect()
        server.stop()
    assert server.rejects.counts == {
        "malformed_json": 3,
        "wrong_schema": 1,
        "oversized": 1,
        "wrong_window_shape": 2,
        "bad_topic": 1,
        "bad_value": 1,
    }
    verdicts = [m for m in got if m["kind"] == "verdict"]
    assert [v["escalation_id"] for v in verdicts] == [json.loads(good)["id"]]
    rejections = {m["escalation_id"]: m for m in got if m["kind"] == "rejection"}
    assert len(got) == 4 and set(rejections) == set(answered)
    assert sorted((m["reason"], m["detail"]) for m in rejections.values()) == sorted([
        ("wrong_window_shape", f"window shape ({W - 1}, {F}), expected ({W}, {F})"),
        ("wrong_window_shape", f"window shape ({W}, {F + 1}), expected ({W}, {F})"),
        ("bad_topic", f"escalation of s1/g2 arrived on {topic}"),
    ])
    assert all(m["teacher_version"] == server.version for m in rejections.values())
    assert server.counters["rejections_sent"] == 3
    assert store.count() == 1
    warned = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert len(warned) == 6  # once per kind
    assert os.path.exists(tmp_path / "alerts.sqlite")


def test_a_nesting_bomb_is_acknowledged_so_it_is_not_redelivered(
    teacher, mosquitto, tmp_path
):
    """Found: the bomb was never acknowledged, so a persistent session got it again
    after every restart (a poison message); now it is rejected and acknowledged."""
    _, teacher_obj = teacher
    store = AlertStore(tmp_path / "alerts.sqlite")
    server = ReScorer(teacher_obj, broker=mosquitto.url, store=store)
    acked = []
    server.link.ack = acked.append
    topic = "gatewatch/v1/s/g/escalations"
    server._on_message(topic, b"[" * 100_000, (1, 1))
    server._on_message(topic, b"{}", (2, 1))
    assert acked == [(1, 1), (2, 1)]
    assert server.rejects.counts == {"malformed_json": 1, "wrong_schema": 1}
    assert server._queue.empty()
    store.close()


def test_start_returns_once_the_subscription_is_in_place(
    tm, teacher, mosquitto, tmp_path
):
    """An escalation published the moment start() returns is routed, never lost.

    (Before, start() returned with the SUBSCRIBE still unsent on a busy machine,
    and the first escalations found no subscriber.)
    """
    _, teacher_obj = teacher
    store = AlertStore(tmp_path / "alerts.sqlite")
    sender = MqttLink(mosquitto.url, "sender", protocol="5")
    sender.connect(timeout=5)
    for round_ in range(3):
        server = ReScorer(
            teacher_obj, broker=mosquitto.url, store=store, session_expiry=0
        )
        try:
            server.start(connect_timeout=5)
            topic = proto.topic("s1", "g1", proto.Channel.ESCALATIONS)
            delivery = sender.publish(topic, b"{oops", qos=1)
            assert delivery.wait(5)
            assert not delivery.unrouted, f"round {round_}: no subscriber yet"
        finally:
            server.stop()
    sender.close()
    store.close()


class FlakyTeacher:
    """The real teacher, failing its first call (a CUDA hiccup, say)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.threshold = inner.threshold
        self.config = inner.config
        self.version = "flaky"
        self.calls = 0

    def predict_proba(self, windows):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("device lost")
        return self.inner.predict_proba(windows)


class PoisonTeacher:
    """The real teacher, failing (or answering NaN) on any batch that holds the
    one window it chokes on: whichever escalation carries ``poison``."""

    def __init__(self, inner, poison: np.ndarray, how: str) -> None:
        self.inner = inner
        self.threshold = inner.threshold
        self.config = inner.config
        self.version = "poisoned"
        self.poison = np.asarray(poison, dtype=np.float32)
        self.how = how
        self.calls = 0

    def predict_proba(self, windows):
        self.calls += 1
        windows = np.asarray(windows, dtype=np.float32)
        probs = np.asarray(self.inner.predict_proba(windows), dtype=np.float64)
        hit = [np.array_equal(w, self.poison) for w in windows]
        if any(hit) and self.how == "raise":
            raise RuntimeError("CUDA error: an illegal memory access")
        probs[np.asarray(hit, dtype=bool)] = np.nan
        return probs


def _serve_until_stored(server, store, bodies, mosquitto, want: int):
    """Start ``server``, publish ``bodies`` as s1/g1's escalations, wait until the
    store holds ``want`` rows; returns the verdicts the gateway received."""
    verdicts: list[dict] = []
    gateway = MqttLink(
        mosquitto.url,
        "g1-listener",
        protocol="5",
        on_message=lambda topic, payload: verdicts.append(json.loads(payload)),
    )
    gateway.connect(timeout=5)
    gateway.subscribe(
        proto.topic("s1", "g1", proto.Channel.VERDICTS), qos=1, timeout=5
    )
    server.start()
    sender = MqttLink(mosquitto.url, "sender", protocol="5")
    sender.connect(timeout=5)
    topic = proto.topic("s1", "g1", proto.Channel.ESCALATIONS)
    try:
        sent = [sender.publish(topic, proto.encode(b), qos=1) for b in bodies]
        assert all(d.wait(10) and not d.unrouted for d in sent)
        wait_for(lambda: store.count() == want, 30, f"{want} stored escalations")
        wait_for(
            lambda: server.counters["verdicts_sent"] == len(verdicts), 10, "verdicts"
        )
    finally:
        sender.close()
        server.stop()
        gateway.close()
    return verdicts


def test_a_failed_teacher_call_is_retried_and_nothing_is_lost(
    tm, teacher, mosquitto, tmp_path
):
    """The first teacher call fails (a device hiccup): its escalation is scored
    again alone, so all three are stored with the verdict a direct call gives."""
    _, teacher_obj = teacher
    store = AlertStore(tmp_path / "alerts.sqlite")
    server = ReScorer(
        FlakyTeacher(teacher_obj),
        broker=mosquitto.url,
        store=store,
        max_batch=1,
        max_wait_ms=0,
    )
    bodies = [_escalation(tm, i) for i in range(3)]
    verdicts = _serve_until_stored(server, store, bodies, mosquitto, want=3)

    expect = teacher_obj.predict_proba(np.asarray(tm.windows[:3], dtype=np.float32))
    rows = {r["id"]: r for r in store.query()}
    for body, p in zip(bodies, expect, strict=True):
        assert rows[body["id"]]["teacher_score"] == pytest.approx(float(p), abs=1e-6)
    assert server.counters["unscored"] == server.counters["failed"] == 0
    assert server.counters["scored"] == 3
    assert sorted(v["escalation_id"] for v in verdicts) == sorted(
        b["id"] for b in bodies
    )
    store.close()


@pytest.mark.parametrize("how", ["raise", "nan"])
def test_one_window_the_teacher_chokes_on_is_stored_unscored(
    tm, teacher, mosquitto, tmp_path, how
):
    """A batch holding one window the teacher fails on (or answers NaN for): the
    others get their verdicts, the bad one is stored unscored, acknowledged, and
    gets no verdict; ``teacher alerts --decision unscored`` lists it."""
    _, teacher_obj = teacher
    bodies = [_escalation(tm, i) for i in range(6)]
    poison = bodies[2]
    store_path = tmp_path / "alerts.sqlite"
    store = AlertStore(store_path)
    server = ReScorer(
        PoisonTeacher(teacher_obj, poison["window"], how),
        broker=mosquitto.url,
        store=store,
        max_batch=16,
        max_wait_ms=500,
    )
    verdicts = _serve_until_stored(server, store, bodies, mosquitto, want=6)

    others = [b["id"] for b in bodies if b is not poison]
    assert sorted(v["escalation_id"] for v in verdicts) == sorted(others)
    assert [r["id"] for r in store.query(decision="unscored")] == [poison["id"]]
    scored = {r["id"] for r in store.query() if r["verdict"] is not None}
    assert scored == set(others)
    assert server.counters["unscored"] == 1
    assert server.counters["scored"] == 5
    assert server.counters["unacknowledged"] == 0
    store.close()

    listed = subprocess.run(
        [
            str(BIN / "teacher"),
            "alerts",
            "--store",
            str(store_path),
            "--decision",
            "unscored",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 1 and lines[0].endswith("teacher unscored"), lines

    # A copy that comes again later, to a re-scorer whose teacher works, is scored
    # from the window it carries: the row gets its verdict, the gateway hears it.
    store = AlertStore(store_path)
    healthy = ReScorer(
        teacher_obj, broker=mosquitto.url, store=store, max_wait_ms=0,
        client_id="rs-healthy",
    )
    verdicts = _serve_until_stored(healthy, store, [poison], mosquitto, want=6)
    want = float(teacher_obj.predict_proba(
        np.asarray([poison["window"]], dtype=np.float32))[0])
    row = {r["id"]: r for r in store.query()}[poison["id"]]
    assert row["teacher_score"] == pytest.approx(want, abs=1e-6)
    assert store.query(decision="unscored") == []
    assert [v["escalation_id"] for v in verdicts] == [poison["id"]]
    assert healthy.counters["rescored"] == 1 and healthy.counters["stored"] == 0
    store.close()


def test_killed_rescorer_with_a_session_gets_its_escalations_again(
    tm, teacher, mosquitto, tmp_path
):
    ckpt, _ = teacher
    store_path = tmp_path / "alerts.sqlite"
    cmd = [
        str(BIN / "teacher"),
        "serve",
        "--checkpoint",
        str(ckpt),
        "--broker",
        mosquitto.url,
        "--store",
        str(store_path),
        "--client-id",
        "rs-fixed",
        "--session-expiry",
        "300",
        "--max-batch",
        "4",
    ]
    log = tmp_path / "serve.log"
    serve = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    wait_for(lambda: "serving" in log.read_text(), 60, "teacher serve")
    agent = Agent(
        load_artifact(tm.artifact),
        site="s1",
        gateway="g1",
        outbox=Outbox(tmp_path / "o.db"),
        link=MqttLink(mosquitto.url, "gw-kill"),
    )
    agent.start()
    store = AlertStore(store_path)
    try:
        first = tm.expected(tm.records[:4000])
        agent.run_file(tm.records[:4000])
        wait_for(lambda: store.count() == len(first), 60, "the first part")
        serve.send_signal(signal.SIGKILL)
        serve.wait(10)

        # Escalations made while it is dead wait in its session at the broker.
        agent.run_file(tm.records[4000:])
        assert agent.drain(30, wait_verdicts=False)
        assert store.count() == len(first) < len(tm.expected())
        log2 = tmp_path / "serve2.log"
        serve = subprocess.Popen(cmd, stdout=open(log2, "w"), stderr=subprocess.STDOUT)
        wait_for(lambda: store.count() == len(tm.expected()), 90, "all escalations")
    finally:
        agent.close()
        serve.send_signal(signal.SIGTERM)
        serve.wait(30)
    assert {r["id"] for r in store.query()} == set(tm.expected())


def test_a_rescorer_of_another_teacher_in_the_group_makes_the_agent_exit_6(
    tm, teacher, mosquitto, tmp_path
):
    """Found: a second re-scorer serving a teacher of another window shape took
    its share of the group's escalations and rejected them; the agent warned
    that verdicts did not arrive but exited 0. Now that re-scorer answers each
    with a rejection, and the agent exits 6 saying how many and why."""
    from tests.conftest import FixedTeacher

    _, teacher_obj = teacher
    stores = [AlertStore(tmp_path / f"{name}.sqlite") for name in ("good", "other")]
    good, other = (
        ReScorer(t, broker=mosquitto.url, store=store, share_group="grp",
                 client_id=f"rs-{name}", max_wait_ms=0)
        for t, store, name in zip((teacher_obj, FixedTeacher()), stores,
                                  ("good", "other"), strict=True)
    )
    good.start()
    other.start()
    outbox = tmp_path / "o.db"
    try:
        done = subprocess.run(
            agent_cmd(tm, mosquitto.url, f"zeek:{tm.conn_log}", outbox, "g1",
                      "--alerts", "", "--summary-json", str(tmp_path / "s.json"),
                      "--drain-timeout", "3"),
            capture_output=True, text=True, timeout=120,
        )
    finally:
        good.stop()
        other.stop()
    expected = set(tm.expected())
    k = other.counters["rejections_sent"]
    shape = (tm.encoder.window, tm.encoder.n_features)
    assert 0 < k < len(expected)
    assert other.stats()["rejected"] == {"wrong_window_shape": k}
    assert len(stores[1].rejected().rows) == k
    assert good.counters["stored"] == len(expected) - k
    assert done.returncode == 6, done.stderr
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [
        f"error: {k} escalations got no verdict within the 3 s drain; a re-scorer "
        f"rejected {k} escalations and sent no verdict for them ({k} "
        f"wrong_window_shape; the first: wrong_window_shape: window shape {shape}, "
        "expected (4, 3), teacher fixed); a re-scorer serving a teacher of another "
        "window shape takes a share of this broker's escalations (teacher alerts "
        "--rejected on its store lists them)"
    ]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["verdicts_received"] == len(expected) - k
    assert summary["escalations_rejected"] == summary["verdicts_awaited"] == k
    for store in stores:
        store.close()


def _serving_id(log: Path) -> str:
    """The client id on the ``serving:`` line of a ``teacher serve`` log."""
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("serving:")]
    assert len(lines) == 1, lines
    return lines[0].rsplit(", client id ", 1)[1]


def test_rescorers_with_default_options_get_their_own_client_ids(
    teacher, mosquitto, tmp_path
):
    """Found: two ``teacher serve`` with default options on one host used one
    client id, so the broker kept dropping one connection for the other. Each
    now takes the lowest free id of its host and group; one killed and started
    again takes its own id (and so its kept session) back."""
    from teacher.serve import default_client_id

    ckpt, _ = teacher
    env = {**os.environ, "GATEWATCH_RUN_DIR": str(tmp_path / "run")}
    base = default_client_id("gatewatch")
    procs: list[subprocess.Popen] = []

    def serve(name: str) -> Path:
        log = tmp_path / f"{name}.log"
        cmd = [str(BIN / "teacher"), "serve", "--checkpoint", str(ckpt),
               "--broker", mosquitto.url, "--store", str(tmp_path / f"{name}.db")]
        with open(log, "w") as out:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                          env=env))
        wait_for(lambda: "serving:" in log.read_text(), 90, f"{name} to serve")
        return log

    try:
        first, second = serve("first"), serve("second")
        assert (_serving_id(first), _serving_id(second)) == (base, f"{base}-2")
        # Neither is kicked off: each connected once, and stays so.
        time.sleep(3)
        for log in (first, second):
            assert log.read_text().count("connected to ") == 1, log.read_text()
        assert all(p.poll() is None for p in procs)

        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(10)
        third = serve("third")
        assert _serving_id(third) == base
        time.sleep(2)
        assert second.read_text().count("connected to ") == 1
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    assert [p.returncode for p in procs] == [-signal.SIGKILL, 0, 0]


def _escalation(tm, i: int, model_version: str = "m1") -> dict:
    """An escalation of flow ``i`` of the tiny log, from gateway s1/g1."""
    return proto.build_escalation(
        flow=tm.records[i],
        window=tm.windows[i],
        score=0.9,
        decision="alert",
        model_version=model_version,
        site="s1",
        gateway="g1",
    )


def _session_left(broker_port: int, client_id: str) -> bool:
    """True if the broker still holds a session for ``client_id``.

    Connects under that id without a clean start and reads CONNACK's session-present
    flag; the probe then disconnects, ending whatever session it opened.
    """
    got = {}
    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
    )
    client.on_connect = lambda c, u, flags, rc, p: got.setdefault(
        "present", flags.session_present
    )
    client.connect("127.0.0.1", broker_port, clean_start=False)
    client.loop_start()
    try:
        wait_for(lambda: "present" in got, 10, f"CONNACK for {client_id}")
    finally:
        client.disconnect()
        client.loop_stop()
    return got["present"]


def test_a_start_that_fails_after_subscribe_leaves_no_session(
    tm, teacher, mosquitto, tmp_path, monkeypatch
):
    """Found: a re-scorer whose start failed after SUBSCRIBE went out (no SUBACK
    in time) exited keeping its session, which went on taking half of the share
    group's escalations for nobody. Now the failed start unsubscribes and ends it.
    """
    from flows.errors import TransportError

    _, teacher_obj = teacher
    store = AlertStore(tmp_path / "alerts.sqlite")
    server = ReScorer(
        teacher_obj, broker=mosquitto.url, store=store, client_id="rs-failed",
        session_expiry=3600,
    )
    real_subscribe = MqttLink.subscribe

    def late_suback(self, topic_filter, qos=1, timeout=None):
        real_subscribe(self, topic_filter, qos)  # goes out; the answer "is late"
        raise TransportError("no SUBACK in time (simulated)")

    monkeypatch.setattr(MqttLink, "subscribe", late_suback)
    with pytest.raises(TransportError, match="simulated"):
        server.start(connect_timeout=5)
    monkeypatch.undo()
    assert not server.link.connected
    assert not _session_left(mosquitto.port, "rs-failed")
    store.close()


def test_a_cleanly_stopped_rescorer_leaves_its_share_group(
    tm, teacher, mosquitto, tmp_path
):
    """Found: a ``teacher serve`` stopped with SIGTERM kept its session, and the
    broker went on routing a share of the group's escalations to it, so the live
    re-scorer stored only some of them. Now a clean stop unsubscribes and ends the
    session: every escalation published afterwards reaches the live one."""
    ckpt, teacher_obj = teacher
    store = AlertStore(tmp_path / "live.sqlite")
    live = ReScorer(
        teacher_obj,
        broker=mosquitto.url,
        store=store,
        share_group="grp",
        client_id="x1",
        max_batch=8,
    )
    live.start()
    log = tmp_path / "y1.log"
    stopped = subprocess.Popen(
        [
            str(BIN / "teacher"),
            "serve",
            "--checkpoint",
            str(ckpt),
            "--broker",
            mosquitto.url,
            "--share-group",
            "grp",
            "--client-id",
            "y1",
            "--store",
            str(tmp_path / "g.sqlite"),
        ],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )
    sender = MqttLink(mosquitto.url, "sender", protocol="5")
    try:
        wait_for(lambda: "serving" in log.read_text(), 60, "the second re-scorer")
        stopped.send_signal(signal.SIGTERM)
        assert stopped.wait(30) == 0, log.read_text()
        sender.connect(timeout=5)
        topic = proto.topic("s1", "g1", proto.Channel.ESCALATIONS)
        ids = []
        for i in range(30):
            body = _escalation(tm, i)
            ids.append(body["id"])
            delivery = sender.publish(topic, proto.encode(body), qos=1)
            assert delivery.wait(5) and not delivery.unrouted
        wait_for(lambda: store.count() == len(ids), 20, "every escalation stored")
    finally:
        sender.close()
        live.stop()
        if stopped.poll() is None:
            stopped.kill()
    assert {r["id"] for r in store.query()} == set(ids)
    assert not _session_left(mosquitto.port, "y1")
    assert "ending its session" in log.read_text()


def test_escalations_in_flight_when_a_rescorer_stops_are_all_stored(
    tm, teacher, mosquitto, tmp_path
):
    """A clean stop in the middle of a burst: what the broker had already sent the
    stopping re-scorer is stored by it, the rest by the other member; none lost."""
    _, teacher_obj = teacher
    stores, (stopping, staying) = _share_group(
        teacher_obj, mosquitto.url, tmp_path, max_batch=4)
    stopping.start()
    staying.start()
    sender = MqttLink(mosquitto.url, "sender", protocol="5")
    sender.connect(timeout=5)
    topic = proto.topic("s1", "g1", proto.Channel.ESCALATIONS)
    bodies = [_escalation(tm, i) for i in range(120)]
    try:
        sent = [sender.publish(topic, proto.encode(b), qos=1) for b in bodies[:60]]
        wait_for(lambda: stopping.counters["received"] > 0, 10, "a first delivery")
        stopping.stop()  # with a backlog in hand and more on the way
        sent += [sender.publish(topic, proto.encode(b), qos=1) for b in bodies[60:]]
        assert all(d.wait(10) and not d.unrouted for d in sent)
        wait_for(
            lambda: sum(s.count() for s in stores) == len(bodies), 30, "all stored"
        )
    finally:
        sender.close()
        staying.stop()
    ids = [{r["id"] for r in s.query()} for s in stores]
    assert ids[0] | ids[1] == {b["id"] for b in bodies}
    assert not ids[0] & ids[1]
    assert stopping.counters["stored"] == stopping.counters["received"] > 0
    assert not _session_left(mosquitto.port, "rs0")


def test_a_3_1_1_rescorer_stopped_cleanly_keeps_its_session(
    tm, teacher, mosquitto, tmp_path
):
    """Over MQTT 3.1.1 an agent cannot tell an unrouted escalation from a delivered
    one, so a clean stop keeps the session: what comes while the re-scorer is away
    waits at the broker and is stored when it returns with the same client id."""
    _, teacher_obj = teacher
    store = AlertStore(tmp_path / "alerts.sqlite")

    def rescorer():
        return ReScorer(
            teacher_obj,
            broker=mosquitto.url,
            store=store,
            client_id="rs-311",
            protocol="3.1.1",
        )

    server = rescorer()
    server.start(connect_timeout=5)
    server.stop()
    sender = MqttLink(mosquitto.url, "sender", protocol="5")
    sender.connect(timeout=5)
    topic = proto.topic("s1", "g1", proto.Channel.ESCALATIONS)
    bodies = [_escalation(tm, i) for i in range(5)]
    try:
        for body in bodies:
            delivery = sender.publish(topic, proto.encode(body), qos=1)
            assert delivery.wait(5) and not delivery.unrouted
        assert store.count() == 0
        server = rescorer()
        server.start(connect_timeout=5)
        wait_for(lambda: store.count() == len(bodies), 30, "the queued escalations")
    finally:
        sender.close()
        server.stop()
    assert {r["id"] for r in store.query()} == {b["id"] for b in bodies}


class _StubLink:
    """Stands in for the re-scorer's MqttLink: records unsubscribe and close."""

    protocol = Protocol.V5
    connected = True
    session_expiry = 3600

    def __init__(self, unsubscribed: bool) -> None:
        self.unsubscribed = unsubscribed
        self.calls: list = []

    def unsubscribe(self, topic_filter, timeout):
        self.calls.append(("unsubscribe", topic_filter))
        return self.unsubscribed

    def close(self, **kwargs):
        self.calls.append(("close", kwargs))


@pytest.mark.parametrize("unsubscribed", [True, False])
def test_the_session_ends_only_after_a_confirmed_unsubscribe(
    teacher, tmp_path, unsubscribed
):
    """Without the broker's UNSUBACK it may still route escalations to us: the
    session is then kept, so they are delivered again after a restart."""
    _, teacher_obj = teacher
    store = AlertStore(tmp_path / "alerts.sqlite")
    server = ReScorer(teacher_obj, broker="mqtt://127.0.0.1:1", store=store)
    server._filter = proto.subscription(proto.Channel.ESCALATIONS, "grp")
    server.link = link = _StubLink(unsubscribed)
    server.stop(quiet=0.1, timeout=2)
    assert link.calls == [
        ("unsubscribe", "$share/grp/gatewatch/v1/+/+/escalations"),
        ("close", {"end_session": unsubscribed}),
    ]
    store.close()


def test_a_model_version_with_control_characters_is_rejected(tm, teacher, tmp_path):
    """Found: flow fields with control characters were rejected, yet such a
    ``model_version`` was stored; the two now follow one rule."""
    _, teacher_obj = teacher
    store = AlertStore(tmp_path / "alerts.sqlite")
    server = ReScorer(teacher_obj, broker="mqtt://127.0.0.1:1", store=store)
    acked = []
    server.link.ack = acked.append
    topic = "gatewatch/v1/s1/g1/escalations"
    # A lone surrogate has no UTF-8 form: stored, it failed its whole batch.
    bad = ["m1\x1b[2J", "m1\r", "m1\x7f", "m1\udcff"]
    for n, version in enumerate(bad):
        server._on_message(topic, proto.encode(_escalation(tm, n, version)), (n, 1))
    assert acked == [(n, 1) for n in range(len(bad))]
    assert server.rejects.counts == {"bad_value": len(bad)}
    assert server._queue.empty()
    server._on_message(topic, proto.encode(_escalation(tm, 9, "m1 é")), (9, 1))
    assert server._queue.qsize() == 1 and len(acked) == len(bad)
    store.close()


def test_a_model_version_longer_than_an_artifact_may_carry_is_rejected(
    tm, teacher, tmp_path
):
    """Found: a 100,000-character model_version was answered and stored whole (the
    runtime refuses names over 256 characters in a manifest; a hostile gateway
    inflated the store 250-fold). 256 characters pass, 257 are bad_value."""
    from edge_agent.protocol import MAX_MODEL_VERSION

    _, teacher_obj = teacher
    store = AlertStore(tmp_path / "alerts.sqlite")
    server = ReScorer(teacher_obj, broker="mqtt://127.0.0.1:1", store=store)
    server.link.ack = lambda token: None
    topic = "gatewatch/v1/s1/g1/escalations"
    for n, version in enumerate(["m" * 100_000, "m" * (MAX_MODEL_VERSION + 1)]):
        server._on_message(topic, proto.encode(_escalation(tm, n, version)), (n, 1))
    assert server.rejects.counts == {"bad_value": 2}
    assert server._queue.empty()
    longest = "m" * MAX_MODEL_VERSION
    server._on_message(topic, proto.encode(_escalation(tm, 9, longest)), (9, 1))
    assert server._queue.qsize() == 1 and server.rejects.counts == {"bad_value": 2}
    store.close()


def test_a_client_id_mqtt_cannot_carry_is_refused_before_connecting(teacher, tmp_path):
    """Found: a 70,000-character id reached paho and failed there (struct.error)."""
    _, teacher_obj = teacher
    store = AlertStore(tmp_path / "alerts.sqlite")
    with pytest.raises(UsageError, match="--client-id .* 70000 bytes"):
        ReScorer(
            teacher_obj,
            broker="mqtt://127.0.0.1:1",
            store=store,
            client_id="x" * 70_000,
        )
    store.close()
