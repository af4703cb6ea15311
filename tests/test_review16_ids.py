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
                   rejected={"oversized": 1, "bad_json": 8})
    capsys.readouterr()

    _report(summary, None)

    line = capsys.readouterr().err.splitlines()[0]
    assert line.endswith(
        ", messages rejected as malformed (answers from the broker this agent could "
        "not read, or an escalation it could not encode; the log names the first "
        "of each kind: bad_json 8, oversized 1) 9")
    summary["rejected"] = {}
    _report(summary, None)
    assert "rejected" not in capsys.readouterr().err
