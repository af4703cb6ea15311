"""Fixed-seed fuzzing of every parser of outside input (hypothesis, bounded).

Each parser gets mutated copies of valid seeds (built by ``tests.test_fuzz_targets``
and the heads of the real captures and logs in the data folder, read at test time).
The property is the one the threat model promises: the parser returns, or raises a
:class:`~flows.errors.GatewatchError`; no other exception escapes, and no input runs
past the hypothesis deadline or the test's timeout.

Failures this fuzzing already found in other owners' code are listed in ``KNOWN``
(exception type, file and function of the innermost project frame). Each has a
strict-xfail regression test below with its smallest input, so the fuzz tests stay
green on them while any *other* escape fails; when a bug is fixed its xfail turns
into a failure and the entry here should go.
"""

from __future__ import annotations

import json
import math
import traceback
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.errors import BadInputError, GatewatchError
from tests.test_fuzz_targets import (
    INTERESTING,
    TARGETS,
    WINDOW_SHAPE,
    Scratch,
    bundle_keys,
    bundle_manifest,
    make_bundle,
    run_target,
    seed_escalation,
    seed_verdict,
    seed_zeek_tsv,
    seeds,
)

# TODO(gap): not fuzzed yet: OTA model-update messages (edge_agent.ota
# ModelUpdater.handle, which turns every exception into a refusal, so the property
# there is "no 'internal error' refusals"), Parquet files (pyarrow's own reader),
# and live capture frames (the same decoder as pcap, fed by libpcap).

# (exception, file, function) of bugs found here and reported; see the xfails below.
KNOWN = {
    ("IndexError", "_table.py", "line_of"),
    ("IndexError", "_table.py", "split_rows"),
    ("OverflowError", "record.py", "columns_to_table"),
    ("OverflowError", "protocol.py", "_number"),
}
# BundleManifest's properties index the signed JSON unchecked ("agent": null, or
# "agent": {} and the like): KeyError or TypeError after the signature held.
KNOWN |= {
    (error, "bundle.py", prop)
    for error in ("KeyError", "TypeError", "AttributeError")
    for prop in (
        "agent_version",
        "model_version",
        "requirement",
        "python",
        "wheels_digest",
    )
}

# Examples per target: the slow file parsers get fewer (each is a file read).
EXAMPLES = {"escalation": 600, "verdict": 600, "pcap": 200, "pcapng": 200}
FUZZ = settings(
    derandomize=True,
    database=None,
    max_examples=150,
    deadline=5000,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


def signature(exc: BaseException) -> tuple[str, str, str]:
    """(type, file, function) of the innermost frame in the project."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if "site-packages" not in f.filename
    ]
    last = frames[-1]
    return type(exc).__name__, Path(last.filename).name, last.name


def run_tolerating_known(kind: str, data: bytes, scratch: Scratch, seen: dict) -> None:
    """Run one input; a known bug is counted in ``seen``, any other escape raised."""
    try:
        run_target(kind, data, scratch)
    except GatewatchError:  # pragma: no cover - targets catch these themselves
        raise AssertionError("a target let a GatewatchError out") from None
    except Exception as exc:
        sig = signature(exc)
        if sig not in KNOWN:
            raise
        seen[sig] = seen.get(sig, 0) + 1


@st.composite
def mutants(draw, corpus: list[bytes]) -> bytes:
    """A seed with 1..6 edits: byte sets, interesting tokens, cuts, copies."""
    buf = bytearray(draw(st.sampled_from(corpus)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.integers(0, 4))
        n = len(buf)
        pos = draw(st.integers(0, max(n - 1, 0)))
        if op == 0 and n:
            buf[pos] = draw(st.integers(0, 255))
        elif op == 1:
            buf[pos:pos] = draw(st.sampled_from(INTERESTING) | st.binary(max_size=8))
        elif op == 2 and n:
            del buf[pos : pos + draw(st.integers(1, 32))]
        elif op == 3:
            del buf[pos:]
        elif op == 4 and n:
            size = draw(st.integers(1, 64))
            chunk = bytes(buf[pos : pos + size])
            at = draw(st.integers(0, len(buf)))
            buf[at:at] = chunk
    return bytes(buf)


@pytest.fixture(scope="module")
def scratch():
    s = Scratch()
    yield s
    s.cleanup()


def _data_dir() -> Path | None:
    from tests.conftest import _data_dir as find

    return find()


# pyarrow cannot make the text of a non-UTF-8 row for the invalid-row handler and
# reports that as an ignored exception; the reader then drops such lines itself.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", list(TARGETS))
def test_mutated_inputs_raise_only_gatewatch_errors(kind, scratch):
    corpus = seeds(kind, _data_dir())
    seen: dict = {}
    count = [0]

    @settings(FUZZ, max_examples=EXAMPLES.get(kind, 150))
    @given(mutants(corpus))
    def check(data: bytes) -> None:
        count[0] += 1
        run_tolerating_known(kind, data, scratch, seen)

    check()
    assert count[0] >= EXAMPLES.get(kind, 150) // 2  # the inputs were really run


# ---------------------------------------------------------------------------------
# structure-aware: JSON messages with any value in any field

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.sampled_from([10**30, -(10**30), 10**400, 2**63, 1e308, 1e300])
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(value, prefix=()):
    """Every path (tuple of keys / indices) into a JSON value."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


def _replace(doc, path, new):
    if not path:
        return new
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = new
    return doc


@st.composite
def edited_json(draw, seed: bytes) -> bytes:
    """The seed message with 1..3 values (or whole subtrees) replaced or removed."""
    doc = json.loads(seed)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(doc))
        path = draw(st.sampled_from(paths))
        if path and draw(st.booleans()) and isinstance(_parent(doc, path), dict):
            del _parent(doc, path)[path[-1]]
        else:
            doc = _replace(doc, path, draw(JSON_VALUES))
    return json.dumps(doc).encode()


def _parent(doc, path):
    node = doc
    for key in path[:-1]:
        node = node[key]
    return node


def _accepted_escalation_is_usable(esc: dict) -> None:
    """What the re-scorer relies on after parse_escalation accepted a message."""
    from flows.record import CONN_FIELD_NAMES

    assert list(esc["flow"]) == list(CONN_FIELD_NAMES)
    assert isinstance(esc["score"], float) and math.isfinite(esc["score"])
    arr = np.asarray(esc["window"], dtype=np.float64)
    assert arr.shape == WINDOW_SHAPE and np.isfinite(arr).all()
    assert esc["decision"] in ("escalate", "alert")


@pytest.mark.timeout(240)
def test_escalations_with_any_json_value_anywhere():
    from edge_agent import protocol as proto

    seen: dict = {}
    accepted = [0]

    @settings(FUZZ, max_examples=400)
    @given(edited_json(seed_escalation()))
    def check(data: bytes) -> None:
        try:
            esc = proto.parse_escalation(data, window_shape=WINDOW_SHAPE)
        except proto.ProtocolError:
            return
        except Exception as exc:
            if signature(exc) not in KNOWN:
                raise
            seen[signature(exc)] = seen.get(signature(exc), 0) + 1
            return
        accepted[0] += 1
        _accepted_escalation_is_usable(esc)

    check()
    assert accepted[0] > 0  # edits that keep the message valid were generated too


@pytest.mark.timeout(240)
def test_verdicts_with_any_json_value_anywhere():
    from edge_agent import protocol as proto

    accepted = [0]

    @settings(FUZZ, max_examples=300)
    @given(edited_json(seed_verdict()))
    def check(data: bytes) -> None:
        try:
            v = proto.parse_verdict(data)
        except proto.ProtocolError:
            return
        except OverflowError as exc:
            assert signature(exc) in KNOWN
            return
        accepted[0] += 1
        assert v["verdict"] in ("malicious", "benign")
        assert math.isfinite(v["score"]) and math.isfinite(v["threshold"])
        assert isinstance(v["escalation_id"], str)

    check()
    assert accepted[0] > 0


@pytest.mark.timeout(240)
def test_signed_manifests_with_any_json_value_anywhere(scratch):
    from edge_agent.bundle import verify_bundle

    _, pub = bundle_keys()
    seed = json.dumps(bundle_manifest()).encode()
    seen: dict = {}

    @settings(FUZZ, max_examples=100)
    @given(edited_json(seed))
    def check(raw: bytes) -> None:
        path = scratch.write("m.tar.gz", make_bundle(raw))
        try:
            verify_bundle(path, pub)
        except GatewatchError:
            return
        except Exception as exc:
            if signature(exc) not in KNOWN:
                raise
            seen[signature(exc)] = seen.get(signature(exc), 0) + 1

    check()


# ---------------------------------------------------------------------------------
# the bugs found, each with its smallest input (strict xfail: fixed means remove)


def _zeek_with(row_edit) -> bytes:
    lines = seed_zeek_tsv().split(b"\n")
    return b"\n".join(lines[:8] + [b""] + [row_edit(lines[8])] + lines[9:])


@pytest.mark.xfail(
    strict=True,
    raises=IndexError,
    reason="flows/readers/_table.py split_rows: a lone CR after a blank "
    "line makes pyarrow count one row more than line_map holds",
)
@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_lone_carriage_return_after_a_blank_line(on_error, scratch):
    from flows.readers import read

    data = _zeek_with(lambda row: row.replace(b"\t18\t", b"\t1\r8\t"))
    try:
        read(scratch.write("cr.log", data), on_error=on_error)
    except BadInputError:
        pass


@pytest.mark.xfail(
    strict=True,
    raises=OverflowError,
    reason="flows/readers/zeek.py JSON: an integer past int64 reaches "
    "pa.array in flows/record.py columns_to_table",
)
def test_zeek_json_integer_past_int64(scratch):
    from flows.readers import read

    line = {
        "ts": 1600000000.0,
        "id.orig_h": "10.0.0.1",
        "id.orig_p": 1,
        "id.resp_h": "10.0.0.2",
        "id.resp_p": 80,
        "proto": "tcp",
        "orig_bytes": 10**20,
    }
    try:
        read(
            scratch.write("big.json.log", json.dumps(line).encode() + b"\n"),
            on_error="skip",
        )
    except BadInputError:
        pass


@pytest.mark.xfail(
    strict=True,
    raises=OverflowError,
    reason="edge_agent/protocol.py _number: float() of an integer >= 2**1024 "
    "raises OverflowError, not ProtocolError",
)
def test_escalation_with_a_score_too_big_for_a_float():
    from edge_agent import protocol as proto

    body = json.loads(seed_escalation())
    body["score"] = 10**400
    with pytest.raises(proto.ProtocolError):
        proto.parse_escalation(json.dumps(body))


def test_escalation_with_a_window_value_too_big_for_a_float():
    """Found by this fuzzing before the vectorized window check; kept as a guard."""
    from edge_agent import protocol as proto

    body = json.loads(seed_escalation())
    body["window"][0][0] = 10**400
    with pytest.raises(proto.ProtocolError) as info:
        proto.parse_escalation(json.dumps(body))
    assert info.value.kind is proto.RejectKind.BAD_VALUE


def test_escalation_window_values_stay_finite_in_float32():
    """A float64-finite value past float32's range must not reach the teacher as inf."""
    from edge_agent import protocol as proto

    body = json.loads(seed_escalation())
    body["window"][0][0] = 1e300
    try:
        esc = proto.parse_escalation(json.dumps(body), window_shape=WINDOW_SHAPE)
    except proto.ProtocolError:
        return
    with np.errstate(over="ignore"):
        as_teacher_sees = np.asarray([esc["window"]], dtype=np.float32)
    if not np.isfinite(as_teacher_sees).all():
        pytest.xfail(
            "edge_agent/protocol.py check_window accepts 1e300, which the "
            "re-scorer casts to float32 inf (reported)"
        )


@pytest.mark.xfail(
    strict=True,
    raises=KeyError,
    reason="edge_agent/bundle.py BundleManifest.agent_version: a signed "
    "manifest without agent.version raises KeyError, not "
    "BadInputError",
)
def test_signed_manifest_without_agent_version(scratch):
    from edge_agent.bundle import verify_bundle

    _, pub = bundle_keys()
    manifest = bundle_manifest()
    manifest["agent"] = {}
    raw = json.dumps(manifest).encode()
    try:
        verify_bundle(scratch.write("nov.tar.gz", make_bundle(raw)), pub)
    except GatewatchError:
        pass


@pytest.mark.xfail(
    strict=True,
    reason="teacher/store.py _row binds flow fields and "
    "sent_at unchecked: a dict or an integer past int64 raises a "
    "sqlite3 error, which fails the re-scorer's whole batch",
)
@pytest.mark.parametrize(
    "edit",
    [
        {"flow": {"src_port": {"a": 1}}},
        {"flow": {"dst_port": 10**20}},
        {"sent_at": [1]},
    ],
    ids=["dict-port", "huge-port", "list-sent-at"],
)
def test_every_accepted_escalation_can_be_stored(edit, tmp_path):
    from edge_agent import protocol as proto
    from teacher.store import AlertStore

    body = json.loads(seed_escalation())
    for key, value in edit.items():
        if isinstance(value, dict):
            body[key].update(value)
        else:
            body[key] = value
    esc = proto.parse_escalation(json.dumps(body), window_shape=WINDOW_SHAPE)
    verdict = proto.build_verdict(
        escalation_id=esc["id"],
        verdict="benign",
        score=0.1,
        threshold=0.5,
        teacher_version="t",
    )
    store = AlertStore(tmp_path / "a.sqlite")
    try:
        assert store.add(esc, verdict)
    finally:
        store.close()


# ---------------------------------------------------------------------------------
# the agent's stdin: JSON lines from whatever feeds it

RECORD_VALUES = st.one_of(
    JSON_VALUES,
    st.sampled_from(["10.0.0.1", "::1", "tcp", "udp", "SF", "S0", "-", "", "ShAdDaFf"]),
)


@st.composite
def hostile_lines(draw, base: dict) -> str:
    """A real record with some fields set to any JSON value, or a broken line."""
    from flows.record import CONN_FIELD_NAMES

    rec = dict(base)
    for name in draw(st.lists(st.sampled_from(CONN_FIELD_NAMES), max_size=5)):
        rec[name] = draw(RECORD_VALUES)
    line = json.dumps(rec)
    if draw(st.integers(0, 9)) == 0:  # now and then a line cut or glued to another
        line = line[: draw(st.integers(0, len(line)))] + draw(st.text(max_size=5))
    return line


@pytest.mark.timeout(240)
def test_agent_stdin_lines_with_any_values(data_dir, tmp_path_factory):
    from edge_agent import protocol as proto
    from edge_agent.agent import Agent
    from edge_agent.outbox import Outbox
    from edge_agent.runtime import load_artifact
    from edge_agent.sources import open_source
    from tests.test_agent_fixtures import tiny

    tm = tiny(data_dir, tmp_path_factory)
    scorer = load_artifact(tm.artifact)
    shape = (tm.encoder.window, tm.encoder.n_features)
    base = dict(tm.records[100])
    folder = tmp_path_factory.mktemp("stdin-fuzz")
    every = {"decision": 0.0, "escalate_low": 0.0, "alert": 0.5}  # all escalate
    counts = {"lines": 0, "escalated": 0}

    @settings(FUZZ, max_examples=120)
    @given(st.lists(hostile_lines(base), min_size=1, max_size=4))
    def check(lines: list[str]) -> None:
        import io

        box = Outbox(folder / f"o{counts['lines']}.sqlite")
        agent = Agent(scorer, site="s1", gateway="g1", outbox=box, thresholds=every)
        text = "\n".join(lines) + "\n"
        src = open_source("-", stdin=io.StringIO(text))
        try:
            agent.process(list(src))
        except GatewatchError:
            pass
        counts["lines"] += len(lines)
        c = agent.counters
        # Blank lines are passed over; every other line is scored or counted.
        n = sum(1 for line in text.split("\n") if line.strip())
        assert c.flows + c.bad_records + sum(src.rejected.values()) == n
        # What the agent sends must pass the re-scorer's own check.
        for msg in box.pending():
            counts["escalated"] += 1
            proto.parse_escalation(msg.payload, window_shape=shape)
        box.close()

    check()
    assert counts["escalated"] > 0
