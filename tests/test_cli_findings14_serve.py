"""Finding 5 of round 14: the re-scorer words rejected messages as the rest of
the product does, and escapes a rejection's detail once."""

from __future__ import annotations

import json

from edge_agent import protocol as proto
from teacher.serve import ReScorer
from teacher.store import AlertStore
from tests.conftest import FixedTeacher

TOPIC = "gatewatch/v1/s1/g1/escalations"
WINDOW = [[0.0, 0.25, 1.0], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0], [1.0, 0.1, 0.9]]


def _server(store: AlertStore) -> tuple[ReScorer, list, list]:
    """A re-scorer on ``store`` with no broker: its acks and publishes recorded."""
    server = ReScorer(FixedTeacher(), broker="mqtt://127.0.0.1:1", store=store,
                      client_id="rs-test")
    acked: list = []
    sent: list = []
    server.link.ack = acked.append
    server.link.publish = lambda topic, payload, qos=1: sent.append((topic, payload))
    return server, acked, sent


def test_malformed_payloads_are_worded_not_python_exceptions(tmp_path):
    """Found: "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position
    6..." and "JSONDecodeError: Expecting value..." in the log and the store."""
    store = AlertStore(tmp_path / "a.sqlite")
    server, acked, _ = _server(store)
    bodies = [b'{"id":\xff}', b"", b"  \n", b"[" * 100_000, b'{"id": 1']

    for n, body in enumerate(bodies):
        server._on_message(TOPIC, body, n)

    reasons = [r["reason"] for r in store.rejected().rows]
    store.close()
    assert acked == list(range(len(bodies)))
    assert reasons == [
        "payload is not UTF-8 (byte 0xff at 6)",
        "payload is empty; expected one JSON object",
        "payload is empty; expected one JSON object",
        "expected one JSON object (arrays or objects nested too deeply)",
        "expected one JSON object (expecting ',' delimiter at line 1 column 9)",
    ]


def test_a_rejection_detail_is_escaped_once(tmp_path):
    """Found: a src_ip of "not-an-ip\\x1b[2J" came back in the rejection's detail
    as found 'not-an-ip\\x5cx1b[2J': the repr's backslash escaped again."""
    store = AlertStore(tmp_path / "a.sqlite")
    server, acked, sent = _server(store)
    flow = {"ts": 1600000000.0, "src_ip": "10.0.0.1", "src_port": 40000,
            "dst_ip": "10.0.0.2", "dst_port": 80, "proto": "tcp"}
    body = proto.build_escalation(
        flow=flow, window=WINDOW, score=0.9, decision="alert", model_version="m1",
        site="s1", gateway="g1", msg_id=f"{7:032x}",
    )
    body["flow"]["src_ip"] = "not-an-ip\x1b[2J"

    server._on_message(TOPIC, json.dumps(body).encode(), "t1")

    store.close()
    assert acked == ["t1"] and len(sent) == 1
    topic, payload = sent[0]
    assert topic == "gatewatch/v1/s1/g1/verdicts"
    detail = json.loads(payload)["detail"]
    assert detail.endswith("found 'not-an-ip\\x1b[2J'"), detail
    assert "\\x5c" not in detail
