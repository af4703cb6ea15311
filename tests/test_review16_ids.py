"""Ids and digests are checked as whole values: a pattern ending in ``$`` also
matches before one trailing newline, so ``"gw-17\\n"`` passed as a gateway id."""

from __future__ import annotations

import pytest

from flows.errors import BadInputError, UsageError


@pytest.mark.parametrize("value", ["gw-17\n", "plant-3\n", "a\n"])
def test_an_id_with_a_trailing_newline_is_refused(value: str) -> None:
    from edge_agent.protocol import validate_id

    with pytest.raises(UsageError, match="may only hold letters"):
        validate_id(value, "gateway")

    assert validate_id(value.rstrip("\n"), "gateway") == value.rstrip("\n")


def test_a_bundle_file_digest_with_a_trailing_newline_is_refused() -> None:
    from edge_agent.bundle import _file_entry

    digest = "ab" * 32

    with pytest.raises(BadInputError, match="sha256 of 64 hex digits"):
        _file_entry("agent.whl", {"sha256": digest + "\n", "size": 1}, "bundle.tar.gz")

    assert _file_entry("agent.whl", {"sha256": digest, "size": 1}, "b").sha256 == digest



def test_the_summary_line_counts_rejected_messages(capsys) -> None:
    """Found by a tester: malformed or oversized verdicts were counted only in
    --summary-json; the summary line now gives their number and kinds."""
    from edge_agent.cli import _report

    summary = dict(flows=3, benign=3, escalate=0, alert=0, escalations_sent=0,
                   verdicts_received=0, outbox_pending=0,
                   rejected={"oversized": 1, "malformed_json": 8})
    capsys.readouterr()

    _report(summary, None)

    line = capsys.readouterr().err.splitlines()[0]
    assert line.endswith(
        ", messages rejected as malformed (answers from the broker this agent could "
        "not read, or an escalation it could not encode; the log names the first "
        "of each kind: malformed_json 8, oversized 1) 9")
    summary["rejected"] = {}
    _report(summary, None)
    assert "rejected" not in capsys.readouterr().err


def test_a_unsw_header_that_names_a_column_twice_is_refused(tmp_path) -> None:
    """Found by a tester: ``id`` twice and ``dur`` missing was read with only a
    warning about ``dur``; which copy held the values was a guess."""
    from flows.readers import read

    head = "id,id,proto,service,state,spkts,dpkts,sbytes,dbytes,rate,attack_cat,label"
    row = "1,0.5,tcp,-,FIN,2,2,100,200,4.0,Normal,0"
    path = tmp_path / "u.csv"
    path.write_text(f"{head}\n{row}\n")

    with pytest.raises(BadInputError) as info:
        read(str(path))

    assert str(info.value) == (
        f"{path}, line 1, column 'id': header names 'id' more than once; a "
        "UNSW-NB15 header names each column once")
    assert info.value.exit_code == 3
    path.write_text(f"{head.replace('id,id', 'id,dur')}\n{row}\n")
    assert read(str(path)).table.column("dur").to_pylist() == [0.5]


@pytest.mark.parametrize("bad", [b"a\rb,c\n", b"x" * 2_000_000 + b",c\n"],
                         ids=["cr-inside", "too-long"])
def test_a_piece_whose_every_line_is_bad_splits_to_no_rows(bad: bytes) -> None:
    """Found by a helper: a piece of a file whose every line was dropped as bad
    (a CR inside it, or too long), after an earlier piece had an empty line,
    raised IndexError instead of naming its bad line."""
    from flows.readers._table import split_rows

    table, lines, problems, cut = split_rows(
        bad, ["x", "y"], ",", path="p", first_line=5, blank={"drop": True})

    assert table.num_rows == 0 and lines.size == 0 and cut is None
    assert [problem.line for problem in problems] == [5]
