"""Found 17, item 3: how the re-scorer words four rejections.

(a) a ``score`` of 5,000 digits was "malformed_json: expected one JSON object
    (exceeds the limit (4300 digits) for integer string conversion: ... use
    sys.set_int_max_str_digits() t)": Python's advice, cut mid-word, and no JSON
    syntax error; (b) a 65-character ``id`` was "missing_field: id missing or not
    a short string" though present; (c) a window of ``10**30`` integers was
    "window holds a non-number" though numbers out of range; (d) ``teacher alerts
    --rejected`` showed a bidi topic escaped once but its reason escaped twice.
"""

from __future__ import annotations

import json

import pytest

from edge_agent import protocol as proto
from flows.errors import EXIT_OK
from teacher.cli import main
from teacher.serve import ReScorer
from teacher.store import AlertStore
from tests.conftest import FixedTeacher

WINDOW = [[0.0, 0.25, 1.0], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0], [1.0, 0.1, 0.9]]


def body(**changes) -> dict:
    """A valid escalation of s1/g1, with ``changes`` made."""
    flow = {"ts": 1600000000.0, "src_ip": "10.0.0.1", "src_port": 40000,
            "dst_ip": "10.0.0.2", "dst_port": 80, "proto": "tcp"}
    out = proto.build_escalation(
        flow=flow, window=WINDOW, score=0.9, decision="alert", model_version="m1",
        site="s1", gateway="g1", msg_id="ab" * 16,
    )
    out.update(changes)
    return out


def rejected(data: bytes) -> proto.ProtocolError:
    with pytest.raises(proto.ProtocolError) as info:
        proto.parse_escalation(data, window_shape=(4, 3))
    return info.value


def test_a_score_of_5000_digits_is_a_bad_value_in_our_words():
    data = proto.encode(body()).replace(b'"score":0.9', b'"score":' + b"1" * 5000)
    assert b"1" * 5000 in data
    exc = rejected(data)
    assert exc.kind is proto.RejectKind.BAD_VALUE
    assert str(exc) == (
        "bad_value: field 'score' holds a number with 5000 digits, more than the "
        "4300 allowed"
    )
    assert "set_int_max_str_digits" not in str(exc)


def test_a_huge_number_inside_the_window_is_worded_without_a_field():
    data = proto.encode(body()).replace(b"0.25", b"2" * 5000)
    exc = rejected(data)
    assert exc.kind is proto.RejectKind.BAD_VALUE
    assert str(exc) == (
        "bad_value: payload holds a number with more than 4300 digits; no field "
        "takes one"
    )


@pytest.mark.parametrize(("changes", "kind", "wording"), [
    ({"id": "a" * 65}, proto.RejectKind.BAD_VALUE,
     "field 'id' is 65 characters long, more than the 64 allowed"),
    ({"id": 7}, proto.RejectKind.BAD_VALUE,
     "field 'id' is a number; expected the message id, a string of 1 to 64 "
     "characters"),
    ({"id": None}, proto.RejectKind.BAD_VALUE,
     "field 'id' is null; expected the message id, a string of 1 to 64 characters"),
    ({"id": ""}, proto.RejectKind.BAD_VALUE,
     "field 'id' is empty; expected the message id, a string of 1 to 64 "
     "characters"),
])
def test_an_id_says_what_is_wrong_with_it(changes, kind, wording):
    exc = rejected(json.dumps(body(**changes)).encode())
    assert exc.kind is kind
    assert str(exc) == f"{kind.value}: {wording}"


def test_a_missing_id_is_a_missing_field():
    data = body()
    del data["id"]
    exc = rejected(json.dumps(data).encode())
    assert exc.kind is proto.RejectKind.MISSING_FIELD
    assert str(exc) == (
        "missing_field: field 'id' is missing; expected the message id, a string of "
        "1 to 64 characters"
    )


def test_a_window_of_huge_integers_is_out_of_range_not_a_non_number():
    exc = rejected(json.dumps(body(window=[[10**30] * 3] * 4)).encode())
    assert exc.kind is proto.RejectKind.BAD_VALUE
    assert str(exc) == (
        "bad_value: window value at [0][0] is an integer of 31 digits, outside 0..1 "
        "(the encoder's features are in that range)"
    )


def test_a_window_with_text_names_where_and_what():
    window = [row[:] for row in WINDOW]
    window[2][1] = "x"
    exc = rejected(json.dumps(body(window=window)).encode())
    assert str(exc) == (
        "bad_value: window value at [2][1] is a string; expected a number in 0..1"
    )


def test_alerts_rejected_escapes_a_bidi_site_once(tmp_path, capsys):
    """Found: the topic showed ``s\\u202ex`` but its reason ``'s\\\\u202ex'``."""
    path = tmp_path / "a.sqlite"
    store = AlertStore(path)
    server = ReScorer(FixedTeacher(), broker="mqtt://127.0.0.1:1", store=store,
                      client_id="rs-test")
    server.link.ack = lambda token: None
    server.link.publish = lambda *a, **k: None
    topic = "gatewatch/v1/s\u202ex/g1/escalations"
    server._on_message(topic, json.dumps(body()).encode(), "t1")
    store.close()

    assert main(["alerts", "--store", str(path), "--rejected"]) == EXIT_OK
    [line] = capsys.readouterr().out.splitlines()
    assert "gatewatch/v1/s\\u202ex/g1/escalations  bad_topic  site 's\\u202ex' " in line
    assert "\\\\" not in line and "\u202e" not in line
