"""One ``proto`` rule for every reader and every agent source.

A protocol is a name (``tcp``, ``ipv6-icmp``, ``3pc``) or a number 0..255
(``flows.record.proto_problem``); text that reads as a number must be a whole
number 0..255. Found by a tester: the rule held for conn logs only (UNSW-NB15's
``proto``, NSL-KDD's ``protocol_type`` and CIC's ``Protocol`` passed anything),
Zeek's ``6.5`` passed as a "name", and the agent refused a Parquet file whose
``proto`` column is an integer that ``flows inspect`` and the agent's stdin read.
"""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from edge_agent.sources import open_source
from flows.errors import BadInputError, PartialInputError
from flows.readers import read
from flows.record import conn_schema, proto_problem
from tests.test_readers import (
    CIC_HEAD,
    CIC_ROW,
    FIELDS,
    KDD_ROW,
    ROW_A,
    ROW_B,
    UNSW_HEAD,
    UNSW_ROW,
    write,
    zeek_text,
)

NUMBER = "expected a protocol number, a whole number from 0 to 255, found "
OVER = "expected a protocol number from 0 to 255, found "
NAME = "expected a protocol name (letters, digits and - _ . + /, such as tcp or "


def _one_bad_row(path, line: int, column: str, problem: str) -> None:
    """The file stops at ``line`` (exit 4, the row before kept) and, skipping,
    loses that row only, named by line and column both ways."""
    with pytest.raises(PartialInputError) as info:
        read(path)
    err = info.value
    assert (err.line, err.column, err.exit_code) == (line, column, 4)
    assert str(err) == f"{path}, line {line}, column {column!r}: {problem}"
    assert err.result.table.num_rows == 1

    result = read(path, on_error="skip")
    assert result.skipped == 1 and result.stats["skipped_lines"] == [line]
    assert result.table.num_rows == 2


# -- the rule itself -------------------------------------------------------------------


@pytest.mark.parametrize("text", ["tcp", "ipv6-icmp", "3pc", "a/n", "tp++", "6", "255"])
def test_protocol_names_and_numbers_pass(text):
    assert proto_problem(text) is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("6.5", NUMBER + "'6.5'"),
        ("-4", NUMBER + "'-4'"),
        ("1e3", NUMBER + "'1e3'"),
        ("nan", NUMBER + "'nan'"),
        ("300", OVER + "'300'"),
    ],
)
def test_text_that_reads_as_a_number_must_be_a_whole_number_0_to_255(text, problem):
    assert proto_problem(text) == problem


# -- readers ---------------------------------------------------------------------------


def test_zeek_proto_6_5_is_a_bad_row_not_a_name(tmp_path):
    bad = list(ROW_B)
    bad[FIELDS.index("proto")] = "6.5"
    path = write(tmp_path, "conn.log", zeek_text([ROW_A, bad, ROW_A]))

    _one_bad_row(path, 10, "proto", NUMBER + "'6.5'")


@pytest.mark.parametrize(
    ("value", "problem"),
    [("300", OVER + "'300'"), ("bogus proto", NAME)],
    ids=["300", "bogus"],
)
def test_unsw_proto_that_names_no_protocol_is_a_bad_row(tmp_path, value, problem):
    bad = UNSW_ROW.split(",")
    bad[UNSW_HEAD.split(",").index("proto")] = value
    rows = [UNSW_ROW, ",".join(bad), UNSW_ROW]
    path = write(tmp_path, "u.csv", "\n".join([UNSW_HEAD, *rows]) + "\n")

    with pytest.raises(PartialInputError) as info:
        read(path)
    assert (info.value.line, info.value.column) == (3, "proto")
    assert problem in str(info.value)
    result = read(path, on_error="skip")
    assert result.skipped == 1 and result.table.column("proto").to_pylist() == [
        "tcp", "tcp"]


def test_nsl_kdd_protocol_type_that_names_no_protocol_is_a_bad_row(tmp_path):
    bad = KDD_ROW.replace(",tcp,", ",xyz!,", 1)
    text = f"{KDD_ROW},normal,21\n{bad},neptune,20\n{KDD_ROW},normal,21\n"
    path = write(tmp_path, "k.txt", text)

    _one_bad_row(path, 2, "protocol_type", NAME + "ipv6-icmp) or number 0..255, "
                 "found 'xyz!'")


@pytest.mark.parametrize(
    ("value", "found"), [("300", "300"), ("6.5", "6.5"), ("-4", "-4")]
)
def test_cic_protocol_outside_0_to_255_or_with_a_fraction_is_a_bad_row(
    tmp_path, value, found
):
    head = CIC_HEAD.replace("Flow IAT Mean", "Protocol")
    good = CIC_ROW.replace(",2.5,", ",6,")
    bad = good.replace(",6,", f",{value},")
    path = write(tmp_path, "cic.csv", "\n".join([head, good, bad, good]) + "\n")

    _one_bad_row(path, 3, "Protocol", NUMBER + found)
    assert read(path, on_error="skip").table.column("Protocol").to_pylist() == [
        6.0, 6.0]


# -- the agent's sources ---------------------------------------------------------------


def _conn_parquet(path, proto: pa.Array) -> None:
    """A canonical Parquet file whose ``proto`` column is ``proto`` (any type)."""
    n = len(proto)
    columns = {field.name: pa.nulls(n, field.type) for field in conn_schema()}
    columns.update(
        ts=pa.array([1.6e9 + i for i in range(n)]),
        src_ip=pa.array(["10.0.0.1"] * n),
        dst_ip=pa.array(["10.0.0.2"] * n),
        src_port=pa.array(range(40000, 40000 + n), pa.int64()),
        dst_port=pa.array([443] * n, pa.int64()),
        proto=proto,
    )
    pq.write_table(pa.table(columns), path)


def test_agent_parquet_source_reads_an_integer_proto_as_flows_does(tmp_path):
    path = tmp_path / "p.parquet"
    _conn_parquet(path, pa.array([6, 17, 1], pa.int32()))

    got = [rec["proto"] for rec in open_source(f"parquet:{path}")]

    assert got == ["6", "17", "1"]
    assert read(path).table.column("proto").to_pylist() == got


@pytest.mark.parametrize(
    ("proto", "problem"),
    [
        (pa.array([6, 300, 1]), OVER + "'300'"),
        (pa.array([6.0, 6.5, 1.0]), NUMBER + "'6.5'"),
    ],
    ids=["300", "6.5"],
)
def test_agent_parquet_source_refuses_a_number_that_is_no_protocol(
    tmp_path, proto, problem
):
    """As ``flows inspect`` does: row 2 is bad, row 1 was given before it."""
    path = tmp_path / "p.parquet"
    _conn_parquet(path, proto)
    got = []

    with pytest.raises(BadInputError) as info:
        got.extend(rec["proto"] for rec in open_source(f"parquet:{path}"))

    assert str(info.value) == f"{path}, row 2: field 'proto': {problem}"
    assert got == ["6"]
    with pytest.raises(PartialInputError, match="row 2, column 'proto'"):
        read(path)


@pytest.mark.parametrize("names", ["canonical", "zeek"])
def test_agent_stdin_reads_a_numeric_proto_in_either_naming(names):
    """``"proto": 6`` is protocol 6 with Zeek's JSON names and the canonical ones
    alike (the canonical ones refused it: "expected a string, found 6")."""
    def line(proto) -> str:
        if names == "zeek":
            rec = {"ts": 1.0, "id.orig_h": "10.0.0.1", "id.orig_p": 1,
                   "id.resp_h": "10.0.0.2", "id.resp_p": 2, "proto": proto}
        else:
            rec = {"ts": 1.0, "src_ip": "10.0.0.1", "src_port": 1,
                   "dst_ip": "10.0.0.2", "dst_port": 2, "proto": proto}
        return json.dumps(rec) + "\n"

    stdin = io.StringIO(line(6) + line(6.0) + line(300) + line(6.5))
    source = open_source("-", stdin=stdin)

    assert [rec["proto"] for rec in source] == ["6", "6"]
    assert source.rejected == {"bad_value": 2}
    assert "300" in source.first_rejected
