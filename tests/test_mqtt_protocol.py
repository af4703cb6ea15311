"""edge_agent.protocol: topics, ids, payloads and counted rejections."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from edge_agent import protocol as proto
from flows.errors import UsageError

FLOW = {
    "ts": 1.5,
    "uid": "C1",
    "src_ip": "10.0.0.1",
    "src_port": 40000,
    "dst_ip": "10.0.0.2",
    "dst_port": 80,
    "proto": "tcp",
    "duration": float("nan"),
}


def _escalation(**over):
    body = proto.build_escalation(
        flow=FLOW,
        window=np.full((4, 3), 0.25, np.float32),
        score=0.7,
        decision="escalate",
        model_version="m1",
        site="site-1",
        gateway="gw.2",
    )
    body.update(over)
    return body


def test_topics_are_versioned_per_gateway() -> None:
    assert proto.topic("s1", "g1", "escalations") == "gatewatch/v1/s1/g1/escalations"
    assert proto.topic("s1", "g1", proto.Channel.MODEL) == "gatewatch/v1/s1/g1/model"
    assert proto.subscription("escalations", "grp") == (
        "$share/grp/gatewatch/v1/+/+/escalations"
    )
    assert proto.split_topic("gatewatch/v1/a/b/verdicts") == ("a", "b", "verdicts")


@pytest.mark.parametrize("bad", ["", "a+b", "a#", "a/b", "$SYS", "-x", "x" * 65, "é"])
def test_bad_ids_never_enter_a_topic(bad: str) -> None:
    with pytest.raises(UsageError):
        proto.topic(bad, "g1", "status")
    with pytest.raises(UsageError):
        proto.topic("s1", bad, "status")


def test_escalation_round_trip_keeps_values_and_nulls_nan() -> None:
    data = proto.encode(_escalation())
    body = proto.parse_escalation(data, window_shape=(4, 3))
    assert body["schema"] == "gatewatch/v1" and len(body["id"]) == 32
    assert body["window"] == [[0.25] * 3] * 4
    assert body["flow"]["duration"] is None and body["flow"]["src_port"] == 40000
    assert body["flow"]["label"] is None  # canonical fields all present
    assert body["score"] == pytest.approx(0.7)


def test_verdict_round_trip() -> None:
    v = proto.build_verdict(
        escalation_id="0123456789abcdef" * 2,
        verdict="malicious",
        score=0.9,
        threshold=0.5,
        teacher_version="t1",
    )
    back = proto.parse_verdict(proto.encode(v))
    assert back["verdict"] == "malicious"
    assert back["escalation_id"] == "0123456789abcdef" * 2


def _verdict(**changes) -> bytes:
    body = proto.build_verdict(
        escalation_id="ab" * 16,
        verdict="benign",
        score=0.25,
        threshold=0.5,
        teacher_version="t1",
    )
    body.update(changes)
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    "changes",
    [
        {"escalation_id": "e1"},
        {"escalation_id": "AB" * 16},  # the agent's ids are lowercase
        {"escalation_id": "ab" * 16 + "0"},
        {"escalation_id": "\x1b[2J" + "a" * 994},
        {"score": -1e300},
        {"score": 1.0000001},
        {"threshold": -0.5},
        {"threshold": 2},
    ],
)
def test_verdicts_outside_what_the_agent_makes_are_bad_values(changes) -> None:
    with pytest.raises(proto.ProtocolError) as info:
        proto.parse_verdict(_verdict(**changes))
    assert info.value.kind is proto.RejectKind.BAD_VALUE


def _rejection(**changes) -> bytes:
    body = proto.build_rejection(
        escalation_id="ab" * 16,
        reason="wrong_window_shape",
        detail="window shape (8, 93), expected (4, 3)",
        teacher_version="t1",
    )
    body.update(changes)
    return json.dumps(body).encode()


def test_a_rejection_reads_back_from_a_verdicts_topic() -> None:
    back = proto.parse_answer(_rejection())
    assert (back["kind"], back["escalation_id"], back["reason"], back["detail"]) == (
        "rejection", "ab" * 16, "wrong_window_shape",
        "window shape (8, 93), expected (4, 3)")
    assert proto.parse_answer(_verdict())["verdict"] == "benign"
    # What the re-scorer builds is escaped and cut to fit what the agent takes.
    built = proto.build_rejection(escalation_id="ab" * 16, reason="bad_value",
                                  detail="\x1b[2J" + "x" * 1000,
                                  teacher_version="v\u202e1")
    back = proto.parse_answer(proto.encode(built))
    assert back["detail"] == ("\\x1b[2J" + "x" * 1000)[:proto.MAX_DETAIL_CHARS]
    assert back["teacher_version"] == "v\\u202e1"
    # A verdict parser still takes verdicts only.
    with pytest.raises(proto.ProtocolError) as info:
        proto.parse_verdict(_rejection())
    assert info.value.kind is proto.RejectKind.WRONG_SCHEMA


@pytest.mark.parametrize(
    ("changes", "kind"),
    [
        ({"escalation_id": "AB" * 16}, proto.RejectKind.BAD_VALUE),
        ({"reason": "tired"}, proto.RejectKind.BAD_VALUE),
        ({"reason": None}, proto.RejectKind.BAD_VALUE),
        ({"detail": "x" * 301}, proto.RejectKind.BAD_VALUE),
        ({"detail": "\x1b[2J"}, proto.RejectKind.BAD_VALUE),
        ({"teacher_version": "t\u202e1"}, proto.RejectKind.BAD_VALUE),
        ({"sent_at": -5.0}, proto.RejectKind.BAD_VALUE),
        ({"detail": None}, proto.RejectKind.BAD_VALUE),
        ({"kind": "status"}, proto.RejectKind.WRONG_SCHEMA),
    ],
)
def test_rejections_outside_what_the_rescorer_makes_are_refused(changes, kind) -> None:
    body = json.loads(_rejection())
    body.update(changes)
    with pytest.raises(proto.ProtocolError) as info:
        proto.parse_answer(json.dumps(body).encode())
    assert info.value.kind is kind


@pytest.mark.parametrize("name", ["escalation_id", "reason", "detail",
                                  "teacher_version"])
def test_a_rejection_without_a_field_is_refused(name) -> None:
    body = json.loads(_rejection())
    del body[name]
    with pytest.raises(proto.ProtocolError) as info:
        proto.parse_answer(json.dumps(body).encode())
    assert info.value.kind is proto.RejectKind.MISSING_FIELD


def test_verdict_bounds_are_inclusive() -> None:
    back = proto.parse_verdict(_verdict(score=0, threshold=1))
    assert (back["score"], back["threshold"]) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"{not json", proto.RejectKind.MALFORMED_JSON),
        (b"[1, 2]", proto.RejectKind.MALFORMED_JSON),
        (
            json.dumps(_escalation(schema="gatewatch/v0")).encode(),
            proto.RejectKind.WRONG_SCHEMA,
        ),
        (b" " * (proto.MAX_PAYLOAD_BYTES + 1), proto.RejectKind.OVERSIZED),
        (
            json.dumps(_escalation(window=[[0.1] * 3] * 5)).encode(),
            proto.RejectKind.WRONG_WINDOW_SHAPE,
        ),
        (
            json.dumps(_escalation(window=[[0.1, 0.2], [0.1]])).encode(),
            proto.RejectKind.WRONG_WINDOW_SHAPE,
        ),
        (json.dumps(_escalation(score="high")).encode(), proto.RejectKind.BAD_VALUE),
        (
            json.dumps(
                {k: v for k, v in _escalation().items() if k != "flow"}
            ).encode(),
            proto.RejectKind.MISSING_FIELD,
        ),
        (json.dumps(_escalation(site="a/b")).encode(), proto.RejectKind.BAD_VALUE),
    ],
)
def test_bad_escalations_are_rejected_by_kind(data: bytes, kind) -> None:
    with pytest.raises(proto.ProtocolError) as info:
        proto.parse_escalation(data, window_shape=(4, 3))
    assert info.value.kind is kind


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("src_ip", "999.1.1.1", "IP"),
        ("dst_ip", "not-an-address", "IP"),
        ("src_port", 70000, "65535"),
        ("dst_port", -1, "65535"),
        # A proto names a protocol (a name or a number 0..255), as the readers
        # take it; a control character or a blank in it names none.
        ("proto", "\x1b[5mtcp", "expected a protocol name"),
        ("proto", "tcp udp", "expected a protocol name"),
        ("proto", "", "expected a protocol name"),
        ("proto", "256", "expected a protocol number from 0 to 255"),
        ("history", "Sh\x07", "control character"),
        ("service", "dns\udcff", "lone surrogate"),
        ("orig_bytes", -3, ">= 0"),
        # Found: a flow of {} was stored and shown as "?:? -> ?:?/?", and U+202E
        # in a uid reordered what the operator's terminal showed after it.
        ("src_ip", None, "is null"),
        ("dst_ip", None, "is null"),
        ("uid", "C1\u202eexe.txt", "bidirectional control"),
        ("service", "\u2066dns", "bidirectional control"),
        # Second tester: an 8-bit CSI, NEL, line separators and the bidi marks.
        ("service", "dns\x9b2J", "control character"),
        ("history", "Sh\x85", "control character"),
        ("uid", "C1\u2028x", "control character"),
        ("service", "\u200fdns", "bidirectional control"),
        ("service", "\u061cdns", "bidirectional control"),
    ],
)
def test_escalation_flow_addresses_and_ports_follow_the_readers_rule(
    field, value, why
) -> None:
    body = _escalation()
    body["flow"] = {**body["flow"], field: value}
    with pytest.raises(proto.ProtocolError, match=why) as info:
        proto.parse_escalation(json.dumps(body).encode(), window_shape=(4, 3))
    assert info.value.kind is proto.RejectKind.BAD_VALUE
    assert field in str(info.value)


@pytest.mark.parametrize("score", [-5.0, 1.0000001, 1e308])
def test_escalation_score_outside_0_1_is_rejected(score) -> None:
    with pytest.raises(proto.ProtocolError, match="score") as info:
        proto.parse_escalation(
            json.dumps(_escalation(score=score)).encode(), window_shape=(4, 3)
        )
    assert info.value.kind is proto.RejectKind.BAD_VALUE


def test_escalation_scores_at_the_ends_are_accepted() -> None:
    for score in (0.0, 1.0):
        body = proto.parse_escalation(
            json.dumps(_escalation(score=score)).encode(), window_shape=(4, 3)
        )
        assert body["score"] == score


def test_reject_counter_counts_every_kind_and_logs_each_once(caplog) -> None:
    counter = proto.RejectCounter("test")
    caplog.set_level(logging.WARNING, logger="gatewatch.edge_agent")
    for data in [b"{", b"{", b"{", json.dumps({"schema": "x", "id": "1"}).encode()]:
        try:
            proto.parse_verdict(data)
        except proto.ProtocolError as exc:
            counter.reject(exc)
    assert counter.counts == {"malformed_json": 3, "wrong_schema": 1}
    assert counter.total == 4
    assert len([r for r in caplog.records if "rejected" in r.getMessage()]) == 2


def test_oversized_outgoing_payload_is_refused() -> None:
    big = _escalation(window=[[0.123456] * 200] * 400)
    with pytest.raises(proto.ProtocolError) as info:
        proto.encode(big)
    assert info.value.kind is proto.RejectKind.OVERSIZED


@pytest.mark.parametrize(
    ("window", "kind"),
    [
        ([[0.1, "0.2"]], proto.RejectKind.BAD_VALUE),
        ([[0.1, None]], proto.RejectKind.BAD_VALUE),
        ([[0.1, [0.2]]], proto.RejectKind.WRONG_WINDOW_SHAPE),
        ([0.1, 0.2], proto.RejectKind.WRONG_WINDOW_SHAPE),
        ([[[0.1]]], proto.RejectKind.WRONG_WINDOW_SHAPE),
        ([[True, False]], proto.RejectKind.BAD_VALUE),
        ([[1e308 * 10, 0.0]], proto.RejectKind.BAD_VALUE),
        ([], proto.RejectKind.WRONG_WINDOW_SHAPE),
    ],
)
def test_window_values_are_checked(window, kind) -> None:
    with pytest.raises(proto.ProtocolError) as info:
        proto.check_window(window, None)
    assert info.value.kind is kind


def test_nan_in_json_window_is_rejected() -> None:
    data = json.dumps(_escalation(window=[[0.1, float("nan"), 0.2]] * 4)).encode()
    with pytest.raises(proto.ProtocolError) as info:
        proto.parse_escalation(data, window_shape=(4, 3))
    assert info.value.kind is proto.RejectKind.BAD_VALUE


@pytest.mark.parametrize(
    "data",
    [b"[" * 100_000, b'{"a":' * 50_000, "[" * 100_000, b"\xff\xfe{}", b"{}\x00"],
)
def test_nesting_bombs_and_bad_bytes_are_malformed_json(data) -> None:
    """Found: ``b"[" * 100000`` (under the size limit) raised RecursionError out of
    json.loads, which killed the re-scorer's MQTT network thread."""
    for parse in (proto.parse_escalation, proto.parse_verdict):
        with pytest.raises(proto.ProtocolError) as info:
            parse(data)
        assert info.value.kind is proto.RejectKind.MALFORMED_JSON


@pytest.mark.parametrize(
    "msg_id",
    ["../../etc/passwd", "A" * 32, "0" * 31, "0" * 33, "0" * 32 + "\n", "g" * 32],
)
def test_escalation_ids_other_than_32_lowercase_hex_are_bad_values(msg_id) -> None:
    """The re-scorer echoes and stores the id; only what the agent sends passes."""
    with pytest.raises(proto.ProtocolError) as info:
        proto.parse_escalation(json.dumps(_escalation(id=msg_id)).encode())
    assert info.value.kind is proto.RejectKind.BAD_VALUE


def test_an_agent_escalation_id_passes() -> None:
    body = _escalation(id="0123456789abcdef" * 2)
    assert proto.parse_escalation(json.dumps(body).encode())["id"] == body["id"]


def test_a_raising_message_handler_is_counted_acked_and_does_not_escape(
    caplog,
) -> None:
    """The link's last guard: an exception in on_message must not reach paho (it
    would stop the network thread); the message is acknowledged and counted."""
    from types import SimpleNamespace

    from edge_agent.mqtt import MqttLink

    def boom(topic, payload, token):
        raise RuntimeError("handler bug")

    acked = []
    client = SimpleNamespace(ack=lambda mid, qos: acked.append((mid, qos)))
    link = MqttLink("mqtt://127.0.0.1:1", "t", on_message=boom, manual_ack=True)
    caplog.set_level(logging.ERROR, logger="gatewatch")
    msg = SimpleNamespace(topic="t/x", payload=b"{}", mid=7, qos=1)
    link._handle_message(client, None, msg)
    link._handle_message(client, None, msg)
    assert link.callback_errors == 2 and acked == [(7, 1), (7, 1)]
    assert len([r for r in caplog.records if "handler failed" in r.getMessage()]) == 1


@pytest.mark.parametrize(
    ("field", "value", "sent"),
    [
        ("history", "S\x01A", "S\\x01A"),
        ("conn_state", "\x1b[5mSF", "\\x1b[5mSF"),
        ("uid", "C\x00\x7f", "C\\x00\\x7f"),
        ("label_detail", "a\\x01\n", "a\\x5cx01\\x0a"),
        ("service", "dns\udcff", "dns\\udcff"),
        ("service", "ShADad é", "ShADad é"),
        ("uid", "C1\u202eexe.txt", "C1\\u202eexe.txt"),
        ("service", "dns\x9b", "dns\\u009b"),
    ],
)
def test_a_sendable_flow_is_accepted_and_reads_back_by_zeeks_rule(
    field, value, sent
) -> None:
    """What the agent sends (sendable_flow) passes the receiver's check: text fields
    lose their control characters to \\xNN escapes, which read back to the text
    (bar those written \\uNNNN: lone surrogates and bidirectional controls);
    ordinary text goes out unchanged."""
    from flows.readers.stream import _unescape

    flow = {**FLOW, field: value}
    body = proto.build_escalation(
        flow=proto.sendable_flow(flow),
        window=np.full((4, 3), 0.25, np.float32),
        score=0.7,
        decision="alert",
        model_version="m1",
        site="s1",
        gateway="g1",
        msg_id="0123456789abcdef0123456789abcdef",
    )
    got = proto.parse_escalation(proto.encode(body), window_shape=(4, 3))
    assert got["flow"][field] == sent
    assert got["flow"]["src_ip"] == FLOW["src_ip"] and got["flow"]["duration"] is None
    if "\\u" not in sent:  # Zeek's rule reads \xNN only (a surrogate has no bytes)
        assert _unescape(sent) == value
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        # Sent as read, the flow would be refused (the bug: a lost escalation).
        with pytest.raises(proto.ProtocolError, match="control character"):
            proto.check_flow({**FLOW, "duration": None, field: value})


def test_an_old_outbox_escalation_is_escaped_when_resent() -> None:
    """Agents before sendable_flow stored flows with control characters; replayed,
    they are escaped as a new agent would have sent them, and nothing else is."""
    window = np.full((4, 3), 0.25, np.float32)
    common = dict(window=window, score=0.7, decision="alert", model_version="m1",
                  site="s1", gateway="g1", msg_id="0123456789abcdef0123456789abcdef")
    raw = {**FLOW, "history": "S\x01A", "uid": "C1\x1b[2J", "service": "a\\b"}
    old = json.dumps(proto.build_escalation(flow=raw, **common),
                     separators=(",", ":")).encode()
    with pytest.raises(proto.ProtocolError, match="control character"):
        proto.parse_escalation(old, window_shape=(4, 3))

    fixed = proto.parse_escalation(proto.resendable(old), window_shape=(4, 3))
    sent = proto.parse_escalation(
        proto.encode(proto.build_escalation(flow=proto.sendable_flow(raw), **common)),
        window_shape=(4, 3),
    )

    assert fixed["flow"]["history"] == "S\\x01A"
    assert fixed["flow"]["uid"] == "C1\\x1b[2J"
    assert fixed["flow"]["service"] == "a\\b"  # clean text is left as it was stored
    assert fixed["id"] == sent["id"] and fixed["window"] == sent["window"]
    assert {k: v for k, v in fixed["flow"].items() if k != "service"} == {
        k: v for k, v in sent["flow"].items() if k != "service"
    }


@pytest.mark.parametrize(
    "payload",
    [
        b'{"v":1,"flow":{"history":"S\\\\x01A"}}',  # escaped already: left alone
        b'{"v":1,"flow":{"history":"ShAD"}}',
        b'{"v":1,"flow":"\\u0001"}',
        b'{"v":1,"flow":{"h":"\\u0001"',  # not JSON: the re-scorer names it
        b"[" * 50_000 + b'"\\u0001"',
    ],
)
def test_resendable_leaves_every_other_payload_byte_for_byte(payload: bytes) -> None:
    assert proto.resendable(payload) is payload


@pytest.mark.parametrize(
    ("sent_at", "why"),
    [(-1, "sent_at -1.0 is before 1970"), (1e300, "past the year 2286"),
     (1.7e12, "a Unix time in seconds was expected")],
)
def test_an_escalation_sent_at_no_plausible_time_is_refused(sent_at, why) -> None:
    with pytest.raises(proto.ProtocolError, match=why):
        proto.parse_escalation(
            json.dumps(_escalation(sent_at=sent_at)).encode(), window_shape=(4, 3)
        )
