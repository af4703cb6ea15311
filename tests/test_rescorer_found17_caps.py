"""Found 17, item 2: no length limit on an escalation's flow text fields.

A tester sent a ``flow.uid`` of 240,000 characters and a ``service`` of 100,000:
both were accepted and stored in full, so one gateway could write about 256 KB of
text per message into the central store. Each text field now has a cap
(``protocol.FLOW_TEXT_CAPS``), generous for real data; a longer one is a bad value
naming the field, its length and the cap. The agent never sends what its own
re-scorer refuses: ``sendable_flow`` (and ``resendable``, for an outbox written
before) cuts a longer text to its cap, as a Zeek history can be (a SYN flood on one
connection adds an ``S`` per SYN).
"""

from __future__ import annotations

import json

import pytest

from edge_agent import protocol as proto
from flows.record import CONN_FIELD_KINDS
from teacher.serve import ReScorer
from teacher.store import AlertStore
from tests.conftest import FixedTeacher, data_file

WINDOW = [[0.0, 0.25, 1.0], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0], [1.0, 0.1, 0.9]]
TOPIC = "gatewatch/v1/s1/g1/escalations"
FLOW = {"ts": 1600000000.0, "uid": "CHhAvVGS1DHFjwGM9", "src_ip": "10.0.0.1",
        "src_port": 40000, "dst_ip": "10.0.0.2", "dst_port": 80, "proto": "tcp",
        "service": "http", "conn_state": "SF", "history": "ShADadfF",
        "label_detail": "flow=Background-UDP-Attempt-NetBIOS"}


def payload(flow: dict) -> bytes:
    """An escalation of s1/g1 carrying ``flow`` exactly as given (not cleaned)."""
    body = proto.build_escalation(
        flow=FLOW, window=WINDOW, score=0.9, decision="alert", model_version="m1",
        site="s1", gateway="g1", msg_id="ab" * 16,
    )
    body["flow"] = flow
    return json.dumps(body).encode()


def test_every_text_field_has_a_cap():
    texts = {name for name, kind in CONN_FIELD_KINDS.items() if kind == "str"}
    assert texts == set(proto.FLOW_TEXT_CAPS)
    assert all(32 <= cap <= 256 for cap in proto.FLOW_TEXT_CAPS.values())


@pytest.mark.parametrize(("name", "length"), [("uid", 240_000),
                                              ("service", 100_000),
                                              ("history", 257),
                                              ("conn_state", 65),
                                              ("label_detail", 300),
                                              ("uid", 129)])
def test_a_too_long_flow_text_is_a_bad_value_naming_field_length_and_cap(
    name, length
):
    """Found: accepted and stored in full."""
    flow = {**FLOW, name: "x" * length}
    with pytest.raises(proto.ProtocolError) as info:
        proto.parse_escalation(payload(flow), window_shape=(4, 3))
    cap = proto.FLOW_TEXT_CAPS[name]
    assert info.value.kind is proto.RejectKind.BAD_VALUE
    assert str(info.value) == (
        f"bad_value: flow field {name!r}: {length} characters long, more than the "
        f"{cap} allowed"
    )


def test_a_long_proto_of_digits_is_refused_too():
    """``proto`` "000...06" reads as protocol 6 however long: the cap stops it."""
    flow = {**FLOW, "proto": "0" * 100_000 + "6"}
    with pytest.raises(proto.ProtocolError, match="'proto': 100001 characters"):
        proto.parse_escalation(payload(flow), window_shape=(4, 3))


def test_texts_at_their_caps_are_taken():
    flow = {**FLOW, **{name: "x" * cap for name, cap in proto.FLOW_TEXT_CAPS.items()
                       if name not in ("src_ip", "dst_ip", "proto")}}
    back = proto.parse_escalation(payload(flow), window_shape=(4, 3))
    assert back["flow"]["uid"] == "x" * 128


def test_the_rescorer_keeps_no_huge_flow(tmp_path):
    """End to end in the re-scorer: the 240,000-character uid is rejected, not
    stored as an escalation (only the first 4 KB of the payload is kept)."""
    store = AlertStore(tmp_path / "a.sqlite")
    server = ReScorer(FixedTeacher(), broker="mqtt://127.0.0.1:1", store=store,
                      client_id="rs-test")
    server.link.ack = lambda token: None
    sent: list = []
    server.link.publish = lambda topic, data, qos=1: sent.append(json.loads(data))
    try:
        server._on_message(TOPIC, payload({**FLOW, "uid": "u" * 240_000}), "t1")
        assert server._queue.empty() and store.count() == 0
        [row] = store.rejected().rows
    finally:
        store.close()
    assert row["kind"] == "bad_value" and "'uid': 240000 characters" in row["reason"]
    assert [m["reason"] for m in sent] == ["bad_value"]


def test_the_agent_cuts_a_long_history_it_would_otherwise_have_refused():
    """A Zeek history has no bound: a SYN sent again with a new sequence number
    adds an ``S`` each time. What the agent sends (sendable_flow) always passes
    the re-scorer's check; a cut text ends in "..." and keeps its cap."""
    flood = {**FLOW, "history": "S" * 5000, "conn_state": "S0",
             "label_detail": "\x1b" * 100}  # each escapes to 4 characters
    sent = proto.sendable_flow(flood)
    assert sent["history"] == "S" * 253 + "..."
    assert len(sent["label_detail"]) <= 256
    assert sent["label_detail"] == "\\x1b" * 63 + "..."  # cut between escapes
    assert sent["uid"] == FLOW["uid"]  # short fields unchanged
    body = proto.build_escalation(
        flow=sent, window=WINDOW, score=0.9, decision="alert", model_version="m1",
        site="s1", gateway="g1", msg_id="cd" * 16,
    )
    back = proto.parse_escalation(proto.encode(body), window_shape=(4, 3))
    assert back["flow"]["history"] == sent["history"]


def test_an_outbox_escalation_written_before_the_caps_is_cut_on_replay():
    """An older agent stored the whole history; replayed it would be refused for
    ever. resendable cuts it; a payload with nothing to cut stays byte for byte."""
    old = payload({**FLOW, "history": "S" * 5000, "uid": "a\\x01b"})
    replayed = proto.resendable(old)
    back = proto.parse_escalation(replayed, window_shape=(4, 3))
    assert back["flow"]["history"] == "S" * 253 + "..."
    assert back["flow"]["uid"] == "a\\x01b"  # already escaped: not escaped again
    fine = payload({**FLOW, "model_version": "m" * 200})  # a long text, no flow one
    assert proto.resendable(fine) is fine


@pytest.mark.data
@pytest.mark.parametrize("rel", [
    "zeek-conn/android-mischief-rat01-androidtester.conn.log",
    "zeek-conn/ctu-malware-botnet-230-1-njrat-first1000.conn.log.labeled",
    "zeek-conn/ctu50-normal-40-day1.conn.log.labeled",
    "zeek-conn/nmap-portscans.conn.json.log",
    "binetflow/test5-mixed.binetflow",
])
def test_real_flows_pass_the_caps_uncut(data_dir, rel):
    """The caps are generous for real data: every record of the real logs goes
    out unchanged (nothing cut) and passes the re-scorer's check."""
    from flows.readers import read

    rows = read(data_file(data_dir, rel)).table.to_pylist()
    assert rows
    for row in rows:
        clean, sent = proto.clean_flow(row), proto.sendable_flow(row)
        for name in proto.FLOW_TEXT_CAPS:
            if isinstance(clean[name], str):
                assert sent[name] == proto.escape_text(clean[name]), (rel, name)
        if sent["src_ip"] is not None and sent["dst_ip"] is not None:
            proto.check_flow(sent)
