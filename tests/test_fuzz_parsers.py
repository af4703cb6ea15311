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

# TODO(gap): not fuzzed yet: Parquet files (pyarrow's own reader) and live capture
# frames (the same decoder as pcap, fed by libpcap).

# (exception, file, function) of bugs found here and reported, each with a
# strict-xfail test below; empty while none is open.
KNOWN: set[tuple[str, str, str]] = set()

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
# the bugs found, each with its smallest input (once fixed, a plain regression test)


def _zeek_with_cr(at: int) -> bytes:
    """The seed log with a blank line, then a CR inside the proto of data row ``at``.

    The three data rows are file lines 9..11 before the blank line goes in, so the
    damaged row is on line ``10 + at``.
    """
    lines = seed_zeek_tsv().split(b"\n")
    rows = lines[8:11]
    fields = rows[at].split(b"\t")
    fields[6] = fields[6][:1] + b"\r" + fields[6][1:]
    rows[at] = b"\t".join(fields)
    return b"\n".join(lines[:8] + rows[:at] + [b""] + rows[at:] + lines[11:])


@pytest.mark.parametrize("at", [0, 1, 2])
def test_lone_carriage_return_after_a_blank_line_is_a_bad_line(at, scratch):
    """Found: pyarrow ended the row at the CR, one row more than the line map held."""
    from flows.errors import PartialInputError
    from flows.readers import iter_records, read

    path = scratch.write(f"cr{at}.log", _zeek_with_cr(at))
    line = 10 + at

    # skip: the line is counted and named; the other two rows are kept as read.
    result = read(path, on_error="skip")
    assert result.skipped == 1 and result.stats["skipped_lines"] == [line]
    protos = ["tcp", "udp", "icmp"]
    assert result.table.column("proto").to_pylist() == protos[:at] + protos[at + 1 :]
    assert "carriage return" in result.warnings[0]

    # fail: an error naming the file and the line; the rows before it are kept.
    expected = PartialInputError if at else BadInputError
    with pytest.raises(expected) as info:
        read(path, on_error="fail")
    assert type(info.value) is expected
    assert info.value.path == str(path) and info.value.line == line
    assert len(info.value.result.table) == at

    # Streaming reads the same rows.
    rows = [r["proto"] for r in iter_records(path, on_error="skip")]
    assert rows == protos[:at] + protos[at + 1 :]


def test_carriage_returns_ending_lines_are_not_bad_lines(scratch):
    """CRLF (and CR CR LF) line ends read like LF ones, blank lines included."""
    from flows.readers import read

    lines = seed_zeek_tsv().split(b"\n")
    body = lines[:8] + [lines[8], b"", lines[9] + b"\r\r", lines[10]] + lines[11:]
    result = read(scratch.write("crlf.log", b"\r\n".join(body)), on_error="fail")
    assert result.table.column("proto").to_pylist() == ["tcp", "udp", "icmp"]
    assert result.skipped == 0


_BIG_JSON_ROW = {
    "ts": 1600000000.0,
    "id.orig_h": "10.0.0.1",
    "id.orig_p": 1,
    "id.resp_h": "10.0.0.2",
    "id.resp_p": 80,
    "proto": "tcp",
}


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("orig_bytes", 2**63),
        ("orig_bytes", 10**20),
        ("id.resp_p", -(2**63) - 1),
        ("duration", 10**400),
        ("ts", 10**400),
    ],
)
def test_zeek_json_number_out_of_range_is_a_bad_value(column, value, scratch):
    """Found: an integer past int64 reached pa.array and raised OverflowError."""
    from flows.readers import read

    good = json.dumps(_BIG_JSON_ROW).encode() + b"\n"
    bad = json.dumps({**_BIG_JSON_ROW, column: value}).encode() + b"\n"
    path = scratch.write("big.json.log", good + bad + good)

    result = read(path, on_error="skip")
    assert len(result.table) == 2 and result.stats["skipped_lines"] == [2]

    with pytest.raises(BadInputError) as info:
        read(path, on_error="fail")
    assert (info.value.path, info.value.line, info.value.column) == (
        str(path),
        2,
        column,
    )
    assert len(info.value.result.table) == 1


def test_zeek_json_int64_limits_are_read_exactly(scratch):
    """The range check is exact: the largest int64 is kept; the smallest is an
    int64 but not a count (counts are never negative)."""
    from flows.readers import read

    row = {**_BIG_JSON_ROW, "orig_bytes": 2**63 - 1, "missed_bytes": 0}
    path = scratch.write("edge.json.log", json.dumps(row).encode() + b"\n")
    table = read(path, on_error="fail").table
    assert table.column("orig_bytes").to_pylist() == [2**63 - 1]

    row["missed_bytes"] = -(2**63)
    path = scratch.write("edge.json.log", json.dumps(row).encode() + b"\n")
    with pytest.raises(BadInputError, match="expected a number >= 0"):
        read(path, on_error="fail")


def test_zeek_tsv_integer_past_int64_is_a_bad_value(scratch):
    """The TSV path had the check already; kept as a guard."""
    from flows.readers import read

    lines = seed_zeek_tsv().split(b"\n")
    fields = lines[9].split(b"\t")
    fields[9] = str(2**63).encode()  # orig_bytes
    lines[9] = b"\t".join(fields)
    path = scratch.write("big.log", b"\n".join(lines))
    with pytest.raises(BadInputError) as info:
        read(path, on_error="fail")
    assert (info.value.line, info.value.column) == (10, "orig_bytes")


@pytest.mark.parametrize("field", ["score", "sent_at"])
@pytest.mark.parametrize("value", [10**400, -(10**400)])
def test_escalation_with_a_number_too_big_for_a_float(field, value):
    """Found: float() of an integer >= 2**1024 raised OverflowError in _number."""
    from edge_agent import protocol as proto

    body = json.loads(seed_escalation())
    body[field] = value
    with pytest.raises(proto.ProtocolError) as info:
        proto.parse_escalation(json.dumps(body))
    assert info.value.kind is proto.RejectKind.BAD_VALUE
    assert repr(field) in str(info.value)


@pytest.mark.parametrize("field", ["score", "threshold", "sent_at"])
def test_verdict_with_a_number_too_big_for_a_float(field):
    from edge_agent import protocol as proto

    body = json.loads(seed_verdict())
    body[field] = 10**400
    with pytest.raises(proto.ProtocolError) as info:
        proto.parse_verdict(json.dumps(body))
    assert info.value.kind is proto.RejectKind.BAD_VALUE


def test_escalation_with_a_window_value_too_big_for_a_float():
    """Found by this fuzzing before the vectorized window check; kept as a guard."""
    from edge_agent import protocol as proto

    body = json.loads(seed_escalation())
    body["window"][0][0] = 10**400
    with pytest.raises(proto.ProtocolError) as info:
        proto.parse_escalation(json.dumps(body))
    assert info.value.kind is proto.RejectKind.BAD_VALUE


@pytest.mark.parametrize(
    "value", [1e300, -1e300, 3.5e38, 2**63, 1e7, 999999.0, -999999.0, 1.01, -0.01]
)
def test_escalation_window_values_outside_0_to_1_are_refused(value):
    """Found: 1e300 passed check_window and became inf in the teacher's float32;
    then a window of 999999s (any value far outside the encoder's 0..1) was scored
    and bought a confident benign verdict."""
    from edge_agent import protocol as proto

    body = json.loads(seed_escalation())
    body["window"][0][0] = value
    with pytest.raises(proto.ProtocolError) as info:
        proto.parse_escalation(json.dumps(body), window_shape=WINDOW_SHAPE)
    assert info.value.kind is proto.RejectKind.BAD_VALUE


@pytest.mark.parametrize("value", [True, False])
def test_escalation_window_booleans_are_refused(value):
    """Found: JSON true beside floats was read by numpy as 1.0 and scored."""
    from edge_agent import protocol as proto

    body = json.loads(seed_escalation())
    body["window"][1][2] = value
    with pytest.raises(proto.ProtocolError, match="true or false") as info:
        proto.parse_escalation(json.dumps(body), window_shape=WINDOW_SHAPE)
    assert info.value.kind is proto.RejectKind.BAD_VALUE


def test_verdict_teacher_version_with_control_characters_is_refused():
    """Found: a forged verdict's teacher_version with an escape sequence and a
    newline was accepted and written to the agent's alerts output."""
    from edge_agent import protocol as proto

    body = json.loads(seed_verdict())
    body["teacher_version"] = "x\u001b[31m\nfake"
    with pytest.raises(proto.ProtocolError, match="teacher_version") as info:
        proto.parse_verdict(json.dumps(body))
    assert info.value.kind is proto.RejectKind.BAD_VALUE


def test_escalation_window_values_at_the_ends_of_0_to_1_are_taken():
    from edge_agent import protocol as proto

    body = json.loads(seed_escalation())
    body["window"][0][0] = 0.0
    body["window"][0][1] = 1.0
    body["window"][1][0] = float(np.float32(1.0) + np.float32(1e-7))  # rounding
    esc = proto.parse_escalation(json.dumps(body), window_shape=WINDOW_SHAPE)
    assert esc["window"][0][:2] == [0.0, 1.0]


@pytest.mark.parametrize(
    ("agent", "missing"),
    [
        ({}, "agent.version"),
        (None, "agent"),
        ([], "agent"),
        ({"version": "1", "requirement": 3}, "agent.requirement"),
    ],
)
def test_signed_manifest_with_a_bad_agent_section(agent, missing, scratch):
    """Found: a signed manifest without agent.version raised KeyError."""
    from edge_agent.bundle import verify_bundle

    _, pub = bundle_keys()
    manifest = bundle_manifest()
    manifest["agent"] = agent
    raw = json.dumps(manifest).encode()
    with pytest.raises(BadInputError, match=repr(missing)):
        verify_bundle(scratch.write("nov.tar.gz", make_bundle(raw)), pub)


@pytest.mark.parametrize(
    "edit",
    [
        {"python": None},
        {"model": {"model_version": 3}},
        {"files": []},
        {"created_ts": 10**400},
        {"key_id": {"a": 1}},
    ],
    ids=["python-null", "model-version-int", "files-list", "created-huge", "key-dict"],
)
def test_signed_manifest_with_a_bad_field(edit, scratch):
    from edge_agent.bundle import verify_bundle

    _, pub = bundle_keys()
    manifest = {**bundle_manifest(), **edit}
    raw = json.dumps(manifest).encode()
    with pytest.raises(BadInputError, match="bundle manifest"):
        verify_bundle(scratch.write("bad.tar.gz", make_bundle(raw)), pub)


def test_signed_manifest_file_entry_must_hold_a_hash_and_a_size(scratch):
    from edge_agent.bundle import verify_bundle

    _, pub = bundle_keys()
    manifest = bundle_manifest()
    name = next(iter(manifest["files"]))
    manifest["files"][name] = {"sha256": {"x": 1}, "size": -1}
    raw = json.dumps(manifest).encode()
    with pytest.raises(BadInputError, match=repr(name)):
        verify_bundle(scratch.write("entry.tar.gz", make_bundle(raw)), pub)


_BAD_FLOWS = [
    {"flow": {"src_port": {"a": 1}}},
    {"flow": {"dst_port": 10**20}},
    {"flow": {"dst_port": 2**63}},
    {"flow": {"orig_bytes": 1.5}},
    {"flow": {"duration": 10**400}},
    {"flow": {"proto": 6}},
    {"flow": {"src_ip": ["10.0.0.1"]}},
    {"flow": {"label": 300}},
    {"flow": {"history": True}},
    {"sent_at": [1]},
    {"sent_at": "now"},
    {"sent_at": 10**400},
]
_BAD_FLOW_IDS = [
    "dict-port",
    "huge-port",
    "port-2**63",
    "fractional-bytes",
    "huge-duration",
    "int-proto",
    "list-ip",
    "label-past-int8",
    "bool-history",
    "list-sent-at",
    "text-sent-at",
    "huge-sent-at",
]


def _edited_escalation(edit: dict) -> dict:
    body = json.loads(seed_escalation())
    for key, value in edit.items():
        if isinstance(value, dict):
            body[key].update(value)
        else:
            body[key] = value
    return body


@pytest.mark.parametrize("edit", _BAD_FLOWS, ids=_BAD_FLOW_IDS)
def test_escalation_with_a_bad_flow_value_is_refused(edit):
    """Found: such values reached teacher/store.py and failed the whole batch."""
    from edge_agent import protocol as proto

    body = _edited_escalation(edit)
    with pytest.raises(proto.ProtocolError) as info:
        proto.parse_escalation(json.dumps(body), window_shape=WINDOW_SHAPE)
    assert info.value.kind is proto.RejectKind.BAD_VALUE
    ((key, value),) = edit.items()
    named = next(iter(value)) if isinstance(value, dict) else key
    assert repr(named) in str(info.value)


def test_escalation_flow_fields_null_missing_and_unknown():
    """Nulls and integral floats are allowed, missing fields read as null, and
    unknown keys are dropped."""
    from edge_agent import protocol as proto
    from flows.record import CONN_FIELD_NAMES

    body = _edited_escalation(
        {"flow": {"src_port": 40000.0, "service": None, "extra": {"a": 1}}}
    )
    del body["flow"]["history"]
    esc = proto.parse_escalation(json.dumps(body), window_shape=WINDOW_SHAPE)
    assert list(esc["flow"]) == list(CONN_FIELD_NAMES)
    assert esc["flow"]["src_port"] == 40000
    assert esc["flow"]["service"] is None and esc["flow"]["history"] is None


@pytest.mark.parametrize("edit", _BAD_FLOWS, ids=_BAD_FLOW_IDS)
def test_the_store_binds_odd_values_as_null(edit, tmp_path):
    """The store's own guard: a value SQLite cannot bind is stored as NULL (the
    whole flow stays in the JSON column), so one message cannot fail a batch."""
    from edge_agent import protocol as proto
    from teacher.store import AlertStore

    esc = json.loads(json.dumps(_edited_escalation(edit)))
    verdict = proto.build_verdict(
        escalation_id=esc["id"],
        verdict="benign",
        score=0.1,
        threshold=0.5,
        teacher_version="t",
    )
    good = json.loads(seed_escalation())
    good["id"] = "good"
    store = AlertStore(tmp_path / "a.sqlite")
    try:
        assert store.add_many([(esc, verdict), (good, verdict)]) == [True, True]
        rows = {r["id"]: r for r in store.query()}
    finally:
        store.close()
    ((key, value),) = edit.items()
    if key == "sent_at":
        assert rows[esc["id"]]["sent_at"] is None
    elif next(iter(value)) in ("src_port", "dst_port", "src_ip", "proto"):
        assert rows[esc["id"]][next(iter(value))] is None
    assert rows["good"]["src_port"] == good["flow"]["src_port"]


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


@settings(max_examples=30, deadline=None)
@given(
    opener=st.sampled_from(["[", '{"a":', '[{"a":', "[1,"]),
    depth=st.integers(2_000, 120_000),
)
def test_nesting_bombs_are_malformed_json_everywhere(opener, depth):
    """Found: deep nesting under the size limit raised RecursionError out of
    json.loads (the re-scorer's and the agent's MQTT threads died, and stdin's
    reader dropped every line after the bomb). Each parser now rejects it."""
    import io

    from edge_agent import protocol as proto
    from edge_agent.sources import open_source

    bomb = opener * depth
    for parse in (proto.parse_escalation, proto.parse_verdict):
        with pytest.raises(proto.ProtocolError) as info:
            parse(bomb.encode())
        kinds = (proto.RejectKind.MALFORMED_JSON, proto.RejectKind.OVERSIZED)
        assert info.value.kind in kinds
    src = open_source("-", stdin=io.StringIO(bomb + "\n{broken\n"))
    assert list(src) == []
    assert src.rejected == {"malformed_json": 2}
