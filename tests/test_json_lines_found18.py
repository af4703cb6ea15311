"""Flow records in JSON lines: a tester's findings, round 18.

- A UTF-8 byte-order mark before the first line was read past by ``flows
  inspect`` and a ``zeek:`` source, but on the agent's stdin line 1 was rejected
  as ``malformed_json ... Unexpected UTF-8 BOM`` (exit 4, or 3 when it was the
  only line).
- A list or an object in a single-value field was kept as text: ``"proto":
  ["a"]`` became the protocol ``a``, ``[6]`` protocol 6, ``"service": {...}`` its
  JSON text. Such a row is now a bad row naming the key and what was expected.
- A stdin record naming its endpoints both ways (``src_ip`` with ``id.resp_h``)
  was rejected as ``field 'dst_ip': is null`` though the address was there, and
  one with Zeek-named ports only was kept with null ports. The record is now
  refused as mixing the two namings, naming the key that breaks its naming.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from edge_agent.sources import open_source
from flows.cli import main as flows_main
from flows.errors import BadInputError, PartialInputError
from flows.readers import iter_records, read
from flows.readers.stream import check_one_naming, parse_json_line

BOM = b"\xef\xbb\xbf"

ZEEK = {
    "ts": 1.5, "uid": "C1", "id.orig_h": "10.0.0.1", "id.orig_p": 40000,
    "id.resp_h": "10.0.0.2", "id.resp_p": 80, "proto": "tcp",
}
CANONICAL = {
    "ts": 1.5, "uid": "C1", "src_ip": "10.0.0.1", "src_port": 40000,
    "dst_ip": "10.0.0.2", "dst_port": 80, "proto": "tcp",
}


def _lines(*objects: dict) -> str:
    return "".join(json.dumps(o) + "\n" for o in objects)


def _byte_stdin(data: bytes) -> io.TextIOWrapper:
    """Bytes as the agent's stdin decodes them (``_text_stdin``'s wrapper)."""
    return io.TextIOWrapper(
        io.BytesIO(data), encoding="utf-8", errors="surrogateescape", newline=None
    )


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """A small conn artifact the agent loads (no data folder needed)."""
    pytest.importorskip("onnxruntime")
    from tests.test_ota_artifacts import fit_conn_encoder, make_artifact

    folder = tmp_path_factory.mktemp("found18")
    return make_artifact(folder / "a", encoder=fit_conn_encoder())


def _agent_on_stdin(artifact: Path, tmp_path: Path, monkeypatch, capsys,
                    data: bytes) -> tuple[int, list[str]]:
    """``edge-agent run --source -`` on ``data`` (bytes): its exit code and its
    ``error:`` lines."""
    from edge_agent.cli import main

    monkeypatch.setattr(sys, "stdin", _byte_stdin(data))
    rc = main(["run", "--artifact", str(artifact), "--source", "-", "--site", "s18",
               "--gateway", "g18", "--outbox", str(tmp_path / "o.db"),
               "--alerts", ""])
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------------------------
# 1. A byte-order mark before the first line


@pytest.mark.parametrize("first", [ZEEK, CANONICAL], ids=["zeek", "canonical"])
def test_a_byte_order_mark_on_stdin_is_read_past_as_in_a_file(tmp_path, first):
    data = BOM + _lines(first, dict(ZEEK, uid="C2")).encode()
    path = tmp_path / "bom.json"
    path.write_bytes(data)

    src = open_source("-", stdin=_byte_stdin(data))
    assert [r["uid"] for r in src] == ["C1", "C2"]
    assert src.rejected == {} and src.first_rejected is None
    # As the file readers read the same bytes (Zeek's names only in a file).
    if first is ZEEK:
        assert read(path).table.column("uid").to_pylist() == ["C1", "C2"]
        assert [r["uid"] for r in open_source(f"zeek:{path}")] == ["C1", "C2"]


def test_a_byte_order_mark_counts_on_the_first_line_only():
    """Past line 1 it is no mark but a bad line, as the file readers take it."""
    data = _lines(ZEEK).encode() + BOM + _lines(dict(ZEEK, uid="C2")).encode()
    src = open_source("-", stdin=_byte_stdin(data))
    assert [r["uid"] for r in src] == ["C1"]
    assert src.rejected == {"malformed_json": 1}
    assert src.first_rejected.startswith("line 2: malformed_json: expected one JSON "
                                         "object (Unexpected UTF-8 BOM")


@pytest.mark.parametrize("lines", [1, 2])
def test_the_agent_scores_a_stdin_that_starts_with_a_byte_order_mark(
    artifact, tmp_path, monkeypatch, capsys, lines
):
    """Found: exit 4 with two lines, 3 with only the marked one."""
    data = BOM + _lines(*[dict(ZEEK, uid=f"C{i}") for i in range(lines)]).encode()
    rc, errors = _agent_on_stdin(artifact, tmp_path, monkeypatch, capsys, data)
    assert (rc, errors) == (0, [])


# ---------------------------------------------------------------------------------
# 2. A list or an object in a single-value field

TEXT = "expected a string"
PROTO = "expected a string or a number"


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("proto", ["a"], f'{PROTO}, found ["a"]'),
        ("proto", [6], f"{PROTO}, found [6]"),
        ("proto", ["tcp", "udp"], f'{PROTO}, found ["tcp", "udp"]'),
        ("proto", {"name": "tcp"}, f'{PROTO}, found {{"name": "tcp"}}'),
        ("proto", True, f"{PROTO}, found true"),  # no protocol named "true"
        ("service", ["dns"], f'{TEXT}, found ["dns"]'),
        ("service", {"a": 1}, f'{TEXT}, found {{"a": 1}}'),
        ("history", ["ShADad"], f'{TEXT}, found ["ShADad"]'),
        ("uid", ["C9"], f'{TEXT}, found ["C9"]'),
        ("conn_state", [], f"{TEXT}, found []"),
        ("uid", {}, f"{TEXT}, found {{}}"),
    ],
)
def test_a_list_or_an_object_in_a_single_value_field_is_a_bad_row(
    tmp_path, capsys, key, value, problem
):
    rows = [ZEEK, {**ZEEK, "uid": "C2", key: value}, dict(ZEEK, uid="C3")]
    path = tmp_path / "conn.json"
    path.write_text(_lines(*rows))
    said = f"{path}, line 2, column {key!r}: {problem}"

    # --on-error fail: the read stops at the row, the rows before it kept.
    with pytest.raises(PartialInputError) as info:
        read(path)
    assert str(info.value) == said
    got = []
    with pytest.raises(PartialInputError) as info:
        got.extend(r["uid"] for r in iter_records(path))
    assert str(info.value) == said and got == ["C1"]
    assert flows_main(["inspect", str(path)]) == 4
    err = capsys.readouterr().err
    assert f"error: {said}" in err.splitlines()

    # --on-error skip: the row dropped and counted.
    result = read(path, on_error="skip")
    assert result.table.column("uid").to_pylist() == ["C1", "C3"]
    assert result.skipped == 1 and result.stats["skipped_lines"] == [2]
    assert flows_main(["inspect", "--on-error", "skip", str(path)]) == 0

    # One line at a time (a followed log) and on the agent's stdin.
    with pytest.raises(BadInputError) as info:
        parse_json_line(json.dumps(rows[1]), "<stdin>", 2)
    assert str(info.value) == f"<stdin>, line 2, column {key!r}: {problem}"
    src = open_source("-", stdin=io.StringIO(_lines(*rows)))
    assert [r["uid"] for r in src] == ["C1", "C3"]
    assert src.rejected == {"bad_value": 1}
    assert src.first_rejected == f"line 2: bad_value: field {key!r}: {problem}"


def test_one_value_of_a_text_field_other_than_a_string_is_kept_as_before():
    """Numbers and booleans in text fields are still read (``"proto": 6`` is
    protocol 6); only lists and objects are refused (and a boolean protocol)."""
    record = parse_json_line(json.dumps(dict(ZEEK, proto=6, uid=True, service=53)))
    assert (record["proto"], record["uid"], record["service"]) == ("6", "true", "53")


# ---------------------------------------------------------------------------------
# 3. A record naming its endpoints both ways

_MIX = "expected one naming in a record, not a mix"


def _without(obj: dict, *keys: str) -> dict:
    return {k: v for k, v in obj.items() if k not in keys}


MIXED = [
    (
        {**_without(CANONICAL, "dst_ip", "dst_port"), "id.resp_h": "10.0.0.2",
         "id.resp_p": 80},
        "field 'id.resp_h': Zeek's name for dst_ip, in a record whose endpoints "
        f"have canonical names (src_ip, src_port); {_MIX}",
    ),
    (
        {**_without(ZEEK, "id.resp_h", "id.resp_p"), "dst_ip": "10.0.0.2",
         "dst_port": 80},
        "field 'dst_ip': the canonical name of id.resp_h, in a record whose "
        f"endpoints have Zeek's names (id.orig_h, id.orig_p); {_MIX}",
    ),
    (
        # Was kept with null ports: the Zeek-named ports were dropped unsaid.
        {**_without(CANONICAL, "src_port", "dst_port"), "id.orig_p": 40000,
         "id.resp_p": 80},
        "field 'id.orig_p': Zeek's name for src_port, in a record whose endpoints "
        f"have canonical names (src_ip, dst_ip); {_MIX}",
    ),
    (
        {**_without(CANONICAL, "dst_ip", "dst_port"),
         "id": {"resp_h": "10.0.0.2", "resp_p": 80}},
        "field 'id': Zeek's nested endpoints (id.orig_h, ...), in a record whose "
        f"endpoints have canonical names (src_ip, src_port); {_MIX}",
    ),
]


@pytest.mark.parametrize(("mixed", "problem"), MIXED,
                         ids=["canonical-first", "zeek-first", "ports", "nested"])
def test_a_stdin_record_mixing_the_two_namings_is_refused_as_such(mixed, problem):
    text = _lines(dict(CANONICAL, uid="A"), dict(mixed, uid="B"), dict(ZEEK, uid="C"))
    src = open_source("-", stdin=io.StringIO(text))
    assert [r["uid"] for r in src] == ["A", "C"]
    assert src.rejected == {"not_a_record": 1}
    assert src.first_rejected == f"line 2: not_a_record: {problem}"


def test_the_agent_names_the_mix_when_it_was_the_only_line(
    artifact, tmp_path, monkeypatch, capsys
):
    """Found: exit 3 with ``field 'dst_ip': is null; a flow needs both endpoint
    addresses``."""
    mixed, problem = MIXED[0]
    rc, errors = _agent_on_stdin(artifact, tmp_path, monkeypatch, capsys,
                                 _lines(mixed).encode())
    assert rc == 3
    [error] = errors
    assert error.startswith(
        "error: no usable flow record was read from stdin: 1 line(s) rejected "
        f"(not_a_record 1); the first: line 1: not_a_record: {problem}; expected "
        "one JSON object per line")


@pytest.mark.parametrize(
    "obj",
    [
        CANONICAL,
        ZEEK,
        {**_without(ZEEK, *[k for k in ZEEK if k.startswith("id.")]),
         "id": {"orig_h": "10.0.0.1", "orig_p": 1, "resp_h": "10.0.0.2",
                "resp_p": 2}},
        dict(CANONICAL, id="an id of the sender's own"),
        dict(CANONICAL, id={"sender": 7}),
        {"ts": 1.5, "proto": "tcp"},
    ],
    ids=["canonical", "zeek", "nested", "own-id-text", "own-id-object", "none"],
)
def test_a_record_of_one_naming_passes_the_check(obj):
    check_one_naming(obj, "<stdin>", 1)
