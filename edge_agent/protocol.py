"""The gatewatch MQTT protocol: topics, identifiers and JSON payloads (schema v1).

Topics are ``gatewatch/v1/<site>/<gateway>/{escalations,verdicts,status,model}``.
Every payload is a JSON object with ``schema`` (``"gatewatch/v1"``), ``kind``, ``id``
(32 lowercase hex; an escalation with any other id is BAD_VALUE) and ``sent_at``
(Unix seconds). Delivery is at least once, so consumers
de-duplicate by ``id``. Site and gateway ids are checked before they enter a topic.
A gateway's ``verdicts`` topic carries verdicts and rejections (``kind``
``"rejection"``: the re-scorer refused that escalation and sends no verdict for it,
with the :class:`RejectKind` and a detail; :func:`build_rejection`,
:func:`parse_answer`).

Parsing never trusts the wire: :func:`parse_escalation` and :func:`parse_verdict`
raise :class:`ProtocolError` whose ``kind`` is a :class:`RejectKind`, and a
:class:`RejectCounter` counts rejections per kind and logs each kind once. Every
number must be finite (an integer past float64 is BAD_VALUE too), an escalation's
flow must fit the canonical field kinds (:func:`check_flow`; unknown keys dropped,
text without control characters, which a sender escapes with :func:`sendable_flow`,
and no longer than :data:`FLOW_TEXT_CAPS`, which a sender cuts to) and its window
values must lie in :data:`WINDOW_RANGE` (the encoder's 0..1). Escalations are never
published retained: a re-scorer refuses a retained one (:attr:`RejectKind.RETAINED`).
"""

from __future__ import annotations

import enum
import json
import math
import re
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edge_agent import logger
from flows.errors import BadInputError, UsageError
from flows.record import CONN_FIELD_NAMES, field_problem

SCHEMA = "gatewatch/v1"
TOPIC_ROOT = "gatewatch/v1"
MAX_ID_LENGTH = 64
MAX_PAYLOAD_BYTES = 256 * 1024
# The longest model_version an escalation may carry (the runtime refuses longer
# names in a manifest; compress writes names of a few dozen characters).
MAX_MODEL_VERSION = 256
# The longest text each flow field of an escalation may hold, in characters. Real
# values are far shorter: a Zeek uid has 18 characters, an address at most 78 (IPv6
# text with a zone of up to 32, which :func:`flows.record.is_address` allows), a
# proto name 32 (its pattern), a service a few analyzer names joined by commas
# ("mysql,ssl"), a conn_state 11 (Argus's "FSRPA_FSRPA"), a history a few dozen
# letters and a label a few dozen ("flow=Background-UDP-Attempt-NetBIOS"). Without a
# cap one gateway could write nearly MAX_PAYLOAD_BYTES of text per message into the
# central store. Zeek's history has no bound of its own (a SYN, FIN or RST sent
# again with a new sequence number adds its letter each time, so a flood on one
# connection writes "SSSS..."), so a sender cuts what is longer (:func:`sendable_flow`)
# rather than lose the escalation.
FLOW_TEXT_CAPS: dict[str, int] = {
    "uid": 128,
    "src_ip": 80,
    "dst_ip": 80,
    "proto": 32,
    "service": 256,
    "conn_state": 64,
    "history": 256,
    "label_detail": 256,
}
# The cap of a text field not named above (none today: every "str" field is).
MAX_FLOW_TEXT = 256
# What ends a text a sender cut to its cap.
CUT_MARK = "..."
# The range of a window's values. Every feature the encoder writes is in 0..1
# (min-max clipped, quantile levels, flags, one-hot), so a value outside it is a
# buggy or hostile sender: scored, it would buy a confident verdict far from any
# training data. The slack covers float32 rounding on the way to JSON.
WINDOW_RANGE = (0.0, 1.0)
WINDOW_SLACK = 1e-6
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # whole value: fullmatch
# An escalation's id as the agent makes it (uuid4 or blake2b-16 hex); the re-scorer
# echoes it in the verdict and stores it, so nothing else is let through.
_ESCALATION_ID_RE = re.compile(r"[0-9a-f]{32}")
# C0 controls and DEL: no flow field written by Zeek, Argus or the meter holds one, and
# printed raw on an operator's terminal they are escape sequences.
# C0 and C1 controls (U+009B is an 8-bit CSI: a terminal escape on its own) and the
# line and paragraph separators, which split what a log line or a table shows.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# What :func:`escape_text` rewrites: the control characters above, the backslash
# that starts an escape (so that an escaped text reads back unambiguously), and lone
# surrogates (JSON lets "\udcff" through, but no UTF-8 text, so no store, holds it).
_ESCAPED_RE = re.compile(
    r"[\x00-\x1f\x7f-\x9f\\\ud800-\udfff\u061c\u200e\u200f\u2028\u2029"
    r"\u202a-\u202e\u2066-\u2069]"
)
_SURROGATE_RE = re.compile(r"[\ud800-\udfff]")
# Bidirectional embeddings, overrides and isolates: shown on a terminal or a web
# page they reorder the text around them (a uid or host name that reads as another).
_BIDI_RE = re.compile(r"[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_LATEST_SENT_AT = 1e10  # seconds: the year 2286; past it, not a Unix time in seconds
# The fields every flow in an escalation must have: what an operator acts on.
ENDPOINTS = ("src_ip", "dst_ip")


class Channel(enum.StrEnum):
    """The last topic segment: what a message on that topic is."""

    ESCALATIONS = "escalations"
    VERDICTS = "verdicts"
    STATUS = "status"
    MODEL = "model"


class Kind(enum.StrEnum):
    """The ``kind`` field of a payload."""

    ESCALATION = "escalation"
    VERDICT = "verdict"
    REJECTION = "rejection"
    STATUS = "status"


class Decision(enum.StrEnum):
    """What the agent decided for one flow from its student's score."""

    BENIGN = "benign"
    ESCALATE = "escalate"
    ALERT = "alert"


class Verdict(enum.StrEnum):
    """What the re-scorer's teacher decided for one escalation."""

    MALICIOUS = "malicious"
    BENIGN = "benign"


class RejectKind(enum.StrEnum):
    """Why an incoming message was rejected; rejections are counted per kind."""

    MALFORMED_JSON = "malformed_json"
    WRONG_SCHEMA = "wrong_schema"
    OVERSIZED = "oversized"
    WRONG_WINDOW_SHAPE = "wrong_window_shape"
    MISSING_FIELD = "missing_field"
    BAD_VALUE = "bad_value"
    BAD_TOPIC = "bad_topic"
    # A message delivered with the retain flag on an escalations topic. Agents never
    # publish escalations retained, so such a message is stale or forged; it is not
    # scored, stored as an escalation or answered (see teacher.serve).
    RETAINED = "retained"


class ProtocolError(BadInputError):
    """A message that does not follow the gatewatch/v1 protocol."""

    def __init__(self, kind: RejectKind, message: str) -> None:
        self.kind = kind
        super().__init__(f"{kind.value}: {message}")


# ---------------------------------------------------------------------------------
# identifiers and topics


def validate_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it can be one topic segment, else raise UsageError.

    Allowed: 1 to 64 characters of letters, digits, ``.``, ``_`` and ``-``, starting
    with a letter or digit. This excludes the MQTT wildcards ``+`` and ``#``, the level
    separator ``/``, the ``$`` prefix of broker topics and empty segments.
    """
    if not isinstance(value, str) or not value:
        raise UsageError(f"{what} must be a non-empty string")
    if len(value) > MAX_ID_LENGTH or not _ID_RE.fullmatch(value):
        # Imported here: edge_agent.mqtt imports this module.
        from edge_agent.mqtt import redact_value

        if len(value) > MAX_ID_LENGTH:
            shown = redact_value(value)[:22]
            raise UsageError(f"{what} {shown}... is longer than {MAX_ID_LENGTH}")
        raise UsageError(
            f"{what} {redact_value(value)} may only hold letters, digits, '.', '_' "
            "and '-' and must start with a letter or digit (no '+', '#', '/', '$')"
        )
    return value


def topic(site: str, gateway: str, channel: Channel | str) -> str:
    """The topic of one gateway's channel, after validating both ids."""
    channel = Channel(channel)
    validate_id(site, "site")
    validate_id(gateway, "gateway")
    return f"{TOPIC_ROOT}/{site}/{gateway}/{channel.value}"


def subscription(channel: Channel | str, share_group: str | None = None) -> str:
    """A filter for one channel of every gateway, shared when a group is given."""
    channel = Channel(channel)
    base = f"{TOPIC_ROOT}/+/+/{channel.value}"
    if share_group is None:
        return base
    validate_id(share_group, "share group")
    return f"$share/{share_group}/{base}"


def split_topic(name: str) -> tuple[str, str, Channel]:
    """``(site, gateway, channel)`` of a gatewatch topic, else ProtocolError."""
    parts = name.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != TOPIC_ROOT:
        raise ProtocolError(RejectKind.BAD_TOPIC, f"not a gatewatch/v1 topic: {name!r}")
    try:
        validate_id(parts[2], "site")
        validate_id(parts[3], "gateway")
        channel = Channel(parts[4])
    except (UsageError, ValueError) as exc:
        raise ProtocolError(RejectKind.BAD_TOPIC, str(exc)) from exc
    return parts[2], parts[3], channel


# ---------------------------------------------------------------------------------
# building


def new_id() -> str:
    """A fresh message id (uuid4 hex)."""
    return uuid.uuid4().hex


def _envelope(kind: Kind, msg_id: str | None) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "kind": kind.value,
        "id": msg_id or new_id(),
        "sent_at": time.time(),
    }


def _clean(value: Any) -> Any:
    """JSON-safe copy of a record value: NaN becomes null, numpy scalars plain."""
    if value is None:
        return None
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def clean_flow(flow: Mapping[str, Any]) -> dict[str, Any]:
    """The canonical fields of a flow record, JSON-safe (extra fields dropped)."""
    return {name: _clean(flow.get(name)) for name in CONN_FIELD_NAMES}


def text_problem(text: str) -> str | None:
    """Why a received text cannot be shown or stored as it is, or None.

    No control characters (shown on a terminal they are escape sequences), and no
    lone surrogate, which JSON lets through but which has no UTF-8 form: SQLite
    would refuse it, and with it the whole batch it came in.
    """
    if _CONTROL_RE.search(text):
        return "holds a control character"
    if _SURROGATE_RE.search(text):
        return "holds a lone surrogate (no UTF-8 form)"
    if _BIDI_RE.search(text):
        return "holds a bidirectional control character (it reorders shown text)"
    return None


def escape_text(text: str) -> str:
    """``text`` with each control character and backslash written as ``\\xNN``.

    The result holds no control character, so :func:`check_flow` accepts it, and it
    is Zeek's own notation: read by Zeek's rule it gives ``text`` back. A lone
    surrogate, which has no bytes, is written ``\\uDCFF``. Text with none of these,
    as in ordinary traffic, is returned unchanged.
    """
    if not _ESCAPED_RE.search(text):
        return text
    return _ESCAPED_RE.sub(_escape_one, text)


def _escape_one(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}"


def text_cap(name: str) -> int:
    """The most characters flow field ``name`` may hold in an escalation."""
    return FLOW_TEXT_CAPS.get(name, MAX_FLOW_TEXT)


def fitted_text(text: str, cap: int, escape: bool = True) -> str:
    """``text`` as a sender puts it in a flow field of at most ``cap`` characters.

    Escaped as :func:`escape_text` does (unless ``escape`` is false), then, only
    when longer than ``cap``, cut to ``cap`` characters that end in
    :data:`CUT_MARK`; the cut falls between escapes, never inside one.
    """
    out = escape_text(text) if escape else text
    if len(out) <= cap:
        return out
    room = cap - len(CUT_MARK)
    kept: list[str] = []
    size = 0
    for ch in text:
        piece = escape_text(ch) if escape else ch
        if size + len(piece) > room:
            break
        kept.append(piece)
        size += len(piece)
    return "".join(kept) + CUT_MARK


def sendable_flow(flow: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`clean_flow` with every text field passed through :func:`escape_text`
    and cut to its :data:`FLOW_TEXT_CAPS` (:func:`fitted_text`).

    What a sender puts in an escalation: a flow read from a log or stdin may hold
    control characters (a Zeek ``\\x01`` escape decoded by the reader), which the
    receiver refuses to protect operators' terminals, or a text longer than the
    receiver takes (a Zeek history of a SYN flood, a label from stdin), which is
    cut rather than have the whole escalation refused.
    """
    return {
        name: fitted_text(value, text_cap(name)) if isinstance(value, str) else value
        for name, value in clean_flow(flow).items()
    }


# A JSON string longer than the smallest cap, without escapes: a payload without one
# (and without a backslash) holds no flow text that :func:`resendable` must cut.
_LONG_TEXT_RE = re.compile(rb'"[^"\\]{%d,}"' % (min(FLOW_TEXT_CAPS.values()) + 1))


def resendable(payload: bytes) -> bytes:
    """An outbox escalation as it may be sent now: flow text escaped and cut where
    needed.

    Agents before :func:`sendable_flow` stored flows with their control characters,
    or with text longer than :data:`FLOW_TEXT_CAPS`, which the re-scorer refuses, so
    those escalations would never get a verdict. Replayed, such a flow's offending
    text fields are escaped and cut as :func:`sendable_flow` would have done (a
    field that is only too long is cut, not escaped again); every other payload
    (all those without a JSON escape or a long text, and all those written since)
    is returned unchanged, byte for byte.
    """
    if b"\\" not in payload and not _LONG_TEXT_RE.search(payload):
        return payload

    try:
        body = json.loads(payload)
    except (RecursionError, ValueError, UnicodeError):
        return payload  # the re-scorer names what is wrong with it
    flow = body.get("flow") if isinstance(body, dict) else None
    if not isinstance(flow, dict):
        return payload

    fixed = dict(flow)
    for name, value in flow.items():
        if not isinstance(value, str):
            continue
        unsafe = text_problem(value) is not None
        if unsafe or len(value) > text_cap(name):
            fixed[name] = fitted_text(value, text_cap(name), escape=unsafe)
    if fixed == flow:
        return payload
    return json.dumps(
        {**body, "flow": fixed}, separators=(",", ":"), allow_nan=False
    ).encode()


def build_escalation(
    *,
    flow: Mapping[str, Any],
    window: Any,
    score: float,
    decision: Decision | str,
    model_version: str,
    site: str,
    gateway: str,
    msg_id: str | None = None,
) -> dict[str, Any]:
    """An escalation payload (a dict; :func:`encode` turns it into bytes)."""
    decision = Decision(decision)
    if decision is Decision.BENIGN:
        raise UsageError("benign flows are not escalated")
    rows = window.tolist() if hasattr(window, "tolist") else [list(r) for r in window]
    body = _envelope(Kind.ESCALATION, msg_id)
    body.update(
        flow=clean_flow(flow),
        window=rows,
        score=float(score),
        decision=decision.value,
        model_version=str(model_version),
        site=validate_id(site, "site"),
        gateway=validate_id(gateway, "gateway"),
    )
    return body


def build_verdict(
    *,
    escalation_id: str,
    verdict: Verdict | str,
    score: float,
    threshold: float,
    teacher_version: str,
    msg_id: str | None = None,
) -> dict[str, Any]:
    """A verdict payload answering one escalation."""
    body = _envelope(Kind.VERDICT, msg_id)
    body.update(
        escalation_id=str(escalation_id),
        verdict=Verdict(verdict).value,
        score=float(score),
        threshold=float(threshold),
        teacher_version=str(teacher_version),
    )
    return body


MAX_DETAIL_CHARS = 300  # a rejection's ``detail``: one line for an operator


def build_rejection(
    *,
    escalation_id: str,
    reason: RejectKind | str,
    detail: str,
    teacher_version: str,
    msg_id: str | None = None,
) -> dict[str, Any]:
    """A rejection payload: the re-scorer refused one escalation, so no verdict
    comes from it. Sent on the gateway's ``verdicts`` topic; ``reason`` is the
    :class:`RejectKind`, ``detail`` what was wrong (escaped, cut to
    :data:`MAX_DETAIL_CHARS`)."""
    body = _envelope(Kind.REJECTION, msg_id)
    body.update(
        escalation_id=str(escalation_id),
        reason=RejectKind(reason).value,
        detail=escape_text(str(detail))[:MAX_DETAIL_CHARS],
        teacher_version=escape_text(str(teacher_version)),
    )
    return body


def build_status(
    *,
    state: str,
    model_version: str | None,
    counters: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A status payload (published retained; ``state`` is online or offline)."""
    if state not in ("online", "offline"):
        raise UsageError(f"status state must be online or offline, not {state!r}")
    body = _envelope(Kind.STATUS, None)
    body.update(state=state, model_version=model_version, counters=dict(counters or {}))
    body.update(extra)
    return body


def encode(payload: Mapping[str, Any]) -> bytes:
    """Serialize a payload to compact UTF-8 JSON; refuses payloads over the limit."""
    data = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(
            RejectKind.OVERSIZED, f"{len(data)} bytes > {MAX_PAYLOAD_BYTES} allowed"
        )
    return data


# ---------------------------------------------------------------------------------
# parsing


def _json_kind(value: Any) -> str:
    """What JSON value ``value`` is, in JSON's words (an array, a string, null)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    return "a number"


def payload_problem(data: bytes | str) -> str:
    """What is wrong with a payload that is not JSON, worded for an operator as
    both sides of the protocol word it (``payload is empty; expected one JSON
    object``, ``payload is not UTF-8 (byte 0xff at 6)``) rather than with the
    parser's exception. Called once a parse failed, on a payload within the size
    limit."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        if not raw.strip():
            return "payload is empty; expected one JSON object"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            return f"payload is not UTF-8 (byte 0x{raw[err.start]:02x} at {err.start})"
    elif isinstance(data, str):
        text = data
        if not text.strip():
            return "payload is empty; expected one JSON object"
    else:
        return f"expected one JSON object in bytes or text, got {type(data).__name__}"

    try:
        json.loads(text)
    except RecursionError:
        return "expected one JSON object (arrays or objects nested too deeply)"
    except json.JSONDecodeError as err:
        where = f"line {err.lineno} column {err.colno}"
        return f"expected one JSON object ({err.msg.lower()} at {where})"
    except ValueError as err:
        huge = huge_number_problem(text, err)
        if huge is not None:
            return huge
        return f"expected one JSON object ({str(err)[:120].lower()})"
    return "expected one JSON object"


# Python's json reads an integer through int(), which refuses more digits than
# sys.get_int_max_str_digits() (4300 by default) with advice for programmers.
_HUGE_INT_MESSAGE = "integer string conversion"


def huge_number_problem(text: str, err: ValueError) -> str | None:
    """What is wrong with a JSON text whose parse failed with ``err``, in an
    operator's words, when ``err`` is Python's refusal of an integer with too many
    digits (else None): the payload is JSON, but it holds a number no field takes.
    The field is named when the number is one member's value."""
    if _HUGE_INT_MESSAGE not in str(err):
        return None
    limit = sys.get_int_max_str_digits()
    found = re.search(rf'"([^"\\]{{1,64}})"\s*:\s*-?(\d{{{limit + 1},}})', text)
    if found is None:
        return (
            f"payload holds a number with more than {limit} digits; no field takes one"
        )
    return (
        f"field {found.group(1)!r} holds a number with {len(found.group(2))} digits, "
        f"more than the {limit} allowed"
    )


def decode(data: bytes | str, max_bytes: int = MAX_PAYLOAD_BYTES) -> dict[str, Any]:
    """Parse a payload's JSON and envelope; raise ProtocolError on any defect."""
    if len(data) > max_bytes:
        raise ProtocolError(RejectKind.OVERSIZED, f"{len(data)} bytes > {max_bytes}")
    try:
        body = json.loads(data)
    except (RecursionError, ValueError, TypeError, UnicodeError) as exc:
        # RecursionError: a nesting bomb (b"[" * 100000) fits in the size limit.
        problem = payload_problem(data)
        # JSON all right, but a number past what Python reads: a value, not syntax.
        kind = (RejectKind.BAD_VALUE if isinstance(exc, ValueError)
                and _HUGE_INT_MESSAGE in str(exc) else RejectKind.MALFORMED_JSON)
        raise ProtocolError(kind, problem) from exc
    if not isinstance(body, dict):
        raise ProtocolError(
            RejectKind.MALFORMED_JSON,
            f"expected one JSON object, got {_json_kind(body)}",
        )
    if body.get("schema") != SCHEMA:
        raise ProtocolError(
            RejectKind.WRONG_SCHEMA, f"schema {body.get('schema')!r}, expected {SCHEMA}"
        )
    _check_message_id(body)
    return body


def _check_message_id(body: Mapping[str, Any]) -> None:
    """``id`` must be a string of 1 to :data:`MAX_ID_LENGTH` characters: missing
    is MISSING_FIELD; another JSON value, empty or too long is BAD_VALUE."""
    expected = f"expected the message id, a string of 1 to {MAX_ID_LENGTH} characters"
    if "id" not in body:
        raise ProtocolError(
            RejectKind.MISSING_FIELD, f"field 'id' is missing; {expected}"
        )
    msg_id = body["id"]
    if not isinstance(msg_id, str):
        raise ProtocolError(
            RejectKind.BAD_VALUE, f"field 'id' is {_json_kind(msg_id)}; {expected}"
        )
    if not msg_id:
        raise ProtocolError(RejectKind.BAD_VALUE, f"field 'id' is empty; {expected}")
    if len(msg_id) > MAX_ID_LENGTH:
        raise ProtocolError(
            RejectKind.BAD_VALUE,
            f"field 'id' is {len(msg_id)} characters long, more than the "
            f"{MAX_ID_LENGTH} allowed",
        )


def _require(body: Mapping[str, Any], name: str, types: type | tuple) -> Any:
    if name not in body:
        raise ProtocolError(RejectKind.MISSING_FIELD, f"field {name!r} is missing")
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, types):
        raise ProtocolError(RejectKind.BAD_VALUE, f"field {name!r} has the wrong type")
    return value


def _number(body: Mapping[str, Any], name: str) -> float:
    """A required finite number, as a float; past float64 is BAD_VALUE too."""
    try:
        value = float(_require(body, name, (int, float)))
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise ProtocolError(RejectKind.BAD_VALUE, f"field {name!r} is not finite")
    return value


def _check_sent_at(body: dict[str, Any]) -> None:
    """``sent_at``, when present and not null, must be a finite number >= 0."""
    if body.get("sent_at") is not None:
        body["sent_at"] = _number(body, "sent_at")
        if body["sent_at"] < 0:
            raise ProtocolError(
                RejectKind.BAD_VALUE, f"sent_at {body['sent_at']!r} is before 1970"
            )
        if body["sent_at"] > _LATEST_SENT_AT:
            raise ProtocolError(
                RejectKind.BAD_VALUE,
                f"sent_at {body['sent_at']!r} is past the year 2286 (a Unix time "
                "in seconds was expected)",
            )


def check_flow(flow: Mapping[str, Any]) -> dict[str, Any]:
    """The canonical fields of a received flow record, each checked by its kind.

    Numbers must be finite and fit their kind (``i64`` fields: integers, or
    integral floats, within int64); ``str`` fields must be strings without control
    characters and at most their :data:`FLOW_TEXT_CAPS` long; addresses must
    be IPv4 or IPv6, ports lie in 0..65535 and ``proto`` name a protocol or be a
    number 0..255 (:func:`flows.record.field_problem`, the readers' rule); null is
    allowed everywhere and a missing field reads as
    null. Keys that are not canonical fields are dropped, as :func:`clean_flow`
    drops them on the sending side, so a newer agent's extra fields do not cost its
    escalations. A bad value is a ProtocolError (BAD_VALUE) naming the field.
    """
    out = {}
    for name in CONN_FIELD_NAMES:
        value = flow.get(name)
        problem = None
        if isinstance(value, str) and len(value) > text_cap(name):
            # Checked first: the other checks need not read a huge text.
            problem = (
                f"{len(value)} characters long, more than the {text_cap(name)} "
                "allowed"
            )
        if problem is None:
            problem = field_problem(name, value)
        if problem is None and isinstance(value, str):
            problem = text_problem(value)
        if problem is None and value is None and name in ENDPOINTS:
            problem = "is null; an escalated flow names both endpoint addresses"
        if problem is not None:
            raise ProtocolError(RejectKind.BAD_VALUE, f"flow field {name!r}: {problem}")
        out[name] = value
    return out


def check_window(window: Any, shape: Sequence[int] | None) -> list[list[float]]:
    """Check that ``window`` is a [W][F] list of finite numbers (of ``shape``).

    The check is vectorized: numpy builds the array once and its dtype tells numbers
    from anything else (strings, nulls, nested lists). A value outside
    :data:`WINDOW_RANGE` (give or take :data:`WINDOW_SLACK`) is BAD_VALUE: the
    encoder writes every feature in 0..1, so no honest agent sends one.
    """
    if not isinstance(window, list) or not window:
        raise ProtocolError(RejectKind.WRONG_WINDOW_SHAPE, "window is not a 2-D list")
    try:
        arr = np.asarray(window)
    except ValueError as exc:
        raise ProtocolError(
            RejectKind.WRONG_WINDOW_SHAPE, "window rows differ"
        ) from exc
    if arr.ndim != 2:
        raise ProtocolError(
            RejectKind.WRONG_WINDOW_SHAPE, f"window has {arr.ndim} dimensions, not 2"
        )
    if arr.dtype.kind not in "fiu":
        raise ProtocolError(RejectKind.BAD_VALUE, _window_value_problem(window))
    if any(isinstance(v, bool) for row in window for v in row):
        # numpy reads JSON true as 1.0 beside floats; it is not a feature value.
        raise ProtocolError(RejectKind.BAD_VALUE, "window holds true or false")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ProtocolError(RejectKind.BAD_VALUE, "window holds NaN or inf")
    low, high = WINDOW_RANGE[0] - WINDOW_SLACK, WINDOW_RANGE[1] + WINDOW_SLACK
    outside = (arr < low) | (arr > high)
    if arr.size and outside.any():
        row, col = (int(i) for i in np.argwhere(outside)[0])
        raise ProtocolError(
            RejectKind.BAD_VALUE,
            f"window value {float(arr[row, col]):g} at [{row}][{col}] is outside "
            f"{WINDOW_RANGE[0]:g}..{WINDOW_RANGE[1]:g} (the encoder's features are "
            "in that range)",
        )
    if shape is not None and arr.shape != tuple(shape):
        raise ProtocolError(
            RejectKind.WRONG_WINDOW_SHAPE,
            f"window shape {arr.shape}, expected {tuple(shape)}",
        )
    return window


def _window_value_problem(window: list) -> str:
    """Why a 2-D ``window`` that numpy could not read as numbers is refused: the
    first value that is not a number (its position and JSON kind), or, when all
    are numbers, the first integer too large for numpy (out of range)."""
    low, high = WINDOW_RANGE
    for r, row in enumerate(window):
        for c, value in enumerate(row):
            if isinstance(value, bool) or not isinstance(value, int | float):
                return (
                    f"window value at [{r}][{c}] is {_json_kind(value)}; expected a "
                    f"number in {low:g}..{high:g}"
                )
    for r, row in enumerate(window):
        for c, value in enumerate(row):
            if isinstance(value, int) and not low <= value <= high:
                digits = len(str(abs(value)))
                return (
                    f"window value at [{r}][{c}] is an integer of {digits} digits, "
                    f"outside {low:g}..{high:g} (the encoder's features are in "
                    "that range)"
                )
    return "window holds a value that is not a number"


def parse_escalation(
    data: bytes | str,
    *,
    window_shape: Sequence[int] | None = None,
    max_bytes: int = MAX_PAYLOAD_BYTES,
) -> dict[str, Any]:
    """Validate an escalation payload and return it as a dict."""
    body = decode(data, max_bytes)
    if body.get("kind") != Kind.ESCALATION.value:
        raise ProtocolError(RejectKind.WRONG_SCHEMA, f"kind {body.get('kind')!r}")
    if not _ESCALATION_ID_RE.fullmatch(body["id"]):
        raise ProtocolError(
            RejectKind.BAD_VALUE, "escalation id is not 32 lowercase hex digits"
        )
    flow = check_flow(_require(body, "flow", dict))
    check_window(_require(body, "window", list), window_shape)
    body["score"] = _number(body, "score")
    if not 0.0 <= body["score"] <= 1.0:
        raise ProtocolError(RejectKind.BAD_VALUE, "field 'score' is not in [0, 1]")
    _check_sent_at(body)
    try:
        Decision(_require(body, "decision", str))
        validate_id(_require(body, "site", str), "site")
        validate_id(_require(body, "gateway", str), "gateway")
    except (ValueError, UsageError) as exc:
        raise ProtocolError(RejectKind.BAD_VALUE, str(exc)) from exc
    if body["decision"] == Decision.BENIGN.value:
        raise ProtocolError(RejectKind.BAD_VALUE, "a benign flow is not an escalation")
    version = _require(body, "model_version", str)
    problem = (f"is {len(version)} characters long, more than {MAX_MODEL_VERSION}"
               if len(version) > MAX_MODEL_VERSION else text_problem(version))
    if problem is not None:
        raise ProtocolError(RejectKind.BAD_VALUE, f"field 'model_version' {problem}")
    body["flow"] = flow
    return body


_ESCALATION_ID = re.compile(r"[0-9a-f]{32}")


def _unit_score(body: Mapping[str, Any], name: str) -> float:
    """A required finite number in [0, 1] (a verdict's score or threshold)."""
    value = _number(body, name)
    if not 0.0 <= value <= 1.0:
        raise ProtocolError(
            RejectKind.BAD_VALUE, f"field {name!r} is {value!r}, not in [0, 1]"
        )
    return value


def parse_verdict(data: bytes | str, max_bytes: int = MAX_PAYLOAD_BYTES) -> dict:
    """Validate a verdict payload and return it as a dict.

    ``escalation_id`` must be an id the agent makes (32 lowercase hex digits, see
    ``edge_agent.agent.flow_id``), ``score`` and ``threshold`` finite numbers in
    [0, 1]; anything else is a ProtocolError (BAD_VALUE) for the caller to count.
    """
    body = decode(data, max_bytes)
    if body.get("kind") != Kind.VERDICT.value:
        raise ProtocolError(RejectKind.WRONG_SCHEMA, f"kind {body.get('kind')!r}")
    return _check_verdict(body)


def parse_answer(data: bytes | str, max_bytes: int = MAX_PAYLOAD_BYTES) -> dict:
    """A message of a gateway's ``verdicts`` topic: a verdict (as
    :func:`parse_verdict` checks it) or a rejection (``kind`` says which).

    A rejection needs ``escalation_id`` (32 lowercase hex), ``reason`` (a
    :class:`RejectKind` value), ``detail`` (text without control characters, at
    most :data:`MAX_DETAIL_CHARS`) and ``teacher_version``.
    """
    body = decode(data, max_bytes)
    kind = body.get("kind")
    if kind == Kind.VERDICT.value:
        return _check_verdict(body)
    if kind != Kind.REJECTION.value:
        raise ProtocolError(RejectKind.WRONG_SCHEMA, f"kind {kind!r}")
    _check_escalation_id(body)
    try:
        RejectKind(_require(body, "reason", str))
    except ValueError as exc:
        raise ProtocolError(RejectKind.BAD_VALUE, str(exc)[:200]) from exc
    detail = _require(body, "detail", str)
    if len(detail) > MAX_DETAIL_CHARS:
        raise ProtocolError(
            RejectKind.BAD_VALUE, f"detail is over {MAX_DETAIL_CHARS} characters"
        )
    _check_sent_at(body)
    for name, text in (("detail", detail), ("teacher_version",
                                            _require(body, "teacher_version", str))):
        problem = text_problem(text)
        if problem is not None:
            # Both are printed on the operator's terminal: no escape sequences.
            raise ProtocolError(RejectKind.BAD_VALUE, f"{name} {problem}")
    return body


def _check_escalation_id(body: Mapping[str, Any]) -> str:
    escalation_id = _require(body, "escalation_id", str)
    if not _ESCALATION_ID.fullmatch(escalation_id):
        raise ProtocolError(
            RejectKind.BAD_VALUE,
            f"escalation_id {escalation_id[:40]!r} is not 32 lowercase hex digits",
        )
    return escalation_id


def _check_verdict(body: dict[str, Any]) -> dict[str, Any]:
    _check_escalation_id(body)
    try:
        Verdict(_require(body, "verdict", str))
    except ValueError as exc:
        raise ProtocolError(RejectKind.BAD_VALUE, str(exc)) from exc
    body["score"] = _unit_score(body, "score")
    body["threshold"] = _unit_score(body, "threshold")
    _check_sent_at(body)
    problem = text_problem(_require(body, "teacher_version", str))
    if problem is not None:
        # It is written to the agent's alerts output: no escape sequences there.
        raise ProtocolError(RejectKind.BAD_VALUE, f"teacher_version {problem}")
    return body


class RejectCounter:
    """Counts rejected messages per :class:`RejectKind`; logs the first of each kind."""

    def __init__(self, who: str = "agent", log=None) -> None:
        self.who = who
        self.counts: dict[str, int] = {}
        self._log = log or logger
        self._lock = threading.Lock()

    def reject(self, exc: ProtocolError, where: str = "") -> None:
        """Count one rejection; the first of its kind is logged as a warning."""
        with self._lock:
            n = self.counts.get(exc.kind.value, 0) + 1
            self.counts[exc.kind.value] = n
        if n == 1:
            self._log.warning(
                "%s rejected a message%s (%s); further ones of this kind are only "
                "counted",
                self.who,
                f" on {where}" if where else "",
                exc,
            )

    @property
    def total(self) -> int:
        """All rejections, of every kind."""
        return sum(self.counts.values())
