"""Found by a tester: an escalation over the protocol's size cap, and flows with no
address from a zeek: source.

1. An escalation over ``MAX_PAYLOAD_BYTES`` (262,144) lost both its alert line and
   its escalation, was counted only in ``rejected.oversized`` and the run exited 0.
   It is now handled as one over the broker's packet limit: the alert line is
   written, the drop is counted in ``dropped_oversized`` and the run exits 6.
2. A flow with no address (``-`` in a Zeek TSV log, a binetflow row that is no IP
   flow) read through ``zeek:`` was escalated and then refused by the re-scorer,
   exit 0. The zeek: sources (read once or followed) now refuse it as stdin does:
   a rejected input counted in ``source_rejected`` (exit 4).
"""

from __future__ import annotations

import io
import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from edge_agent import protocol as proto
from edge_agent.agent import Agent, flow_id
from edge_agent.cli import main
from edge_agent.outbox import Outbox
from edge_agent.runtime import load_artifact
from edge_agent.sources import open_source
from tests.conftest import data_file, label_cap_raised
from tests.test_agent_fixtures import tiny

HUGE = "x" * 300_000  # its escalation is > proto.MAX_PAYLOAD_BYTES


# The huge label of these tests must still make an oversized escalation.
_label_cap_raised = pytest.fixture(autouse=True)(label_cap_raised)


@pytest.fixture
def tm(data_dir, tmp_path_factory):
    return tiny(data_dir, tmp_path_factory)


def _up_to_first_alert(tm) -> list[dict]:
    first = int(np.flatnonzero(tm.scores >= tm.thresholds["alert"])[0])
    return [dict(r) for r in tm.records[: first + 1]]


def _with_a_huge_alert(tm) -> tuple[list[dict], str]:
    """The records up to the first alert, the alert with a huge text field."""
    records = _up_to_first_alert(tm)
    records[-1]["label_detail"] = HUGE  # not scored, not in the id
    return records, flow_id("s1", "g1", records[-1])


def _argv(tm, tmp_path: Path, source: str, *extra: str) -> list[str]:
    return [
        "run", "--artifact", str(tm.artifact), "--source", source,
        "--site", "s1", "--gateway", "g1", "--outbox", str(tmp_path / "o.db"),
        "--summary-json", str(tmp_path / "s.json"), *extra,
    ]  # fmt: skip


# --- 1. over the protocol's size cap --------------------------------------------------


def test_an_escalation_over_the_protocol_cap_keeps_its_alert_line(tm, tmp_path):
    records, big_id = _with_a_huge_alert(tm)
    expected = tm.expected(records)
    assert expected[big_id] == "alert"
    alerts = io.StringIO()
    agent = Agent(
        load_artifact(tm.artifact),
        site="s1",
        gateway="g1",
        outbox=Outbox(tmp_path / "o.db"),
        alerts=alerts,
    )
    agent.run_file(records)
    summary = agent.summary()
    pending = {m.id for m in agent.outbox.pending()}
    agent.close()
    lines = [json.loads(x) for x in alerts.getvalue().splitlines()]
    assert [x["escalation_id"] for x in lines if x["kind"] == "alert"] == [big_id]
    assert summary["dropped_oversized"] == 1
    assert summary["rejected"] == {}
    assert pending == set(expected) - {big_id}  # the others are kept to send


def _stdin_run(tm, tmp_path, monkeypatch, records, *extra: str) -> int:
    text = "".join(json.dumps(r) + "\n" for r in records)
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    alerts = tmp_path / "alerts.jsonl"
    return main(_argv(tm, tmp_path, "-", "--alerts", str(alerts), *extra))


def test_over_the_cap_without_a_broker_exits_6_with_the_alert_line(
    tm, tmp_path, monkeypatch, capsys
):
    records, big_id = _with_a_huge_alert(tm)
    rc = _stdin_run(tm, tmp_path, monkeypatch, records)
    err = capsys.readouterr().err
    assert rc == 6, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith("error: 1 escalations were larger than the")
    assert "their alert lines are in the alerts output" in errors[0]
    text = (tmp_path / "alerts.jsonl").read_text()
    lines = [json.loads(x) for x in text.splitlines()]
    assert [x["escalation_id"] for x in lines] == [big_id]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["dropped_oversized"] == 1 and summary["rejected"] == {}
    assert big_id not in {m.id for m in Outbox(tmp_path / "o.db").pending()}


def test_over_the_cap_without_an_alert_log_says_no_line_records_it(
    tm, tmp_path, monkeypatch, capsys
):
    """Found: with --alerts "" the error line still sent the reader to the
    alert lines in "the alerts output", which this run did not have."""
    records, _ = _with_a_huge_alert(tm)
    text = "".join(json.dumps(r) + "\n" for r in records)
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    rc = main(_argv(tm, tmp_path, "-", "--alerts", ""))
    err = capsys.readouterr().err
    assert rc == 6, err
    [error] = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert error.startswith("error: 1 escalations were larger than the")
    assert "and were dropped, not sent; no alert line records them, as --alerts " \
        "is empty (a record with a huge text field" in error
    assert "alerts output" not in error


def test_over_the_cap_with_a_broker_exits_6_and_sends_the_others(
    tm, tmp_path, monkeypatch, capsys, mosquitto
):
    records, big_id = _with_a_huge_alert(tm)
    expected = tm.expected(records)
    assert len(expected) > 1
    rc = _stdin_run(
        tm, tmp_path, monkeypatch, records,
        "--broker", mosquitto.url, "--protocol", "3.1.1", "--no-wait-verdicts",
        "--drain-timeout", "20",
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 6, err
    assert "error: 1 escalations were larger than the" in err
    text = (tmp_path / "alerts.jsonl").read_text()
    lines = [json.loads(x) for x in text.splitlines()]
    assert [x["escalation_id"] for x in lines] == [big_id]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["dropped_oversized"] == 1
    assert summary["outbox_pending"] == 0
    assert summary["escalations_sent"] == len(expected) - 1


def test_the_cap_itself_is_unchanged() -> None:
    assert proto.MAX_PAYLOAD_BYTES == 262_144


# --- 2. flows with no address from zeek: ----------------------------------------------


def _log_with_a_null_address(tm, tmp_path: Path) -> tuple[Path, list[dict], int]:
    """A TSV conn.log of the records up to the first alert; the alert's line has
    ``-`` as id.orig_h. Returns the log, the records and that line's number."""
    records = _up_to_first_alert(tm)
    lines = tm.conn_log.read_text().splitlines()
    header = [x for x in lines if x.startswith("#") and not x.startswith("#close")]
    fields = next(x for x in header if x.startswith("#fields")).split("\t")[1:]
    col = fields.index("id.orig_h")
    data = [x for x in lines if not x.startswith("#")][: len(records)]
    cells = data[-1].split("\t")
    cells[col] = "-"
    data[-1] = "\t".join(cells)
    log = tmp_path / "conn.log"
    log.write_text("\n".join(header + data) + "\n")
    return log, records, len(header) + len(data)


def test_a_zeek_file_source_rejects_a_flow_without_address(tm, tmp_path) -> None:
    log, records, line_no = _log_with_a_null_address(tm, tmp_path)
    src = open_source(f"zeek:{log}")
    got = list(src)
    assert len(got) == len(records) - 1
    assert all(r["src_ip"] is not None for r in got)
    assert src.rejected == {"bad_value": 1}
    assert src.first_rejected == (
        f"line {line_no}: bad_value: field 'src_ip': is null; a flow needs "
        "both endpoint addresses"
    )


def test_a_followed_source_rejects_a_flow_without_address(tm, tmp_path) -> None:
    log, records, line_no = _log_with_a_null_address(tm, tmp_path)
    src = open_source(f"zeek:{log}", follow=True, poll=0.05)
    got: list[dict] = []

    def read() -> None:
        for rec in src:
            got.append(rec)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    src.end.set()  # ends once it yielded what the file holds
    thread.join(60)
    assert not thread.is_alive()
    assert len(got) == len(records) - 1
    assert src.rejected == {"bad_value": 1}
    assert src.first_rejected.startswith(f"line {line_no}: bad_value: field 'src_ip'")


def test_run_on_a_conn_log_with_a_null_address_exits_4(tm, tmp_path, capsys) -> None:
    log, records, line_no = _log_with_a_null_address(tm, tmp_path)
    rc = main(_argv(tm, tmp_path, f"zeek:{log}", "--alerts", ""))
    err = capsys.readouterr().err
    assert rc == 4, err
    assert f"1 input line(s) of zeek:{log} were rejected (bad_value 1)" in err
    assert f"line {line_no}: bad_value: field 'src_ip': is null" in err
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["flows"] == len(records) - 1
    assert summary["source_rejected"] == {"bad_value": 1}
    pending = {m.id for m in Outbox(tmp_path / "o.db").pending()}
    assert pending == set(tm.expected(records[:-1]))


def test_run_on_a_binetflow_with_non_ip_rows_skips_them(tm, data_dir, tmp_path, capsys):
    """test5-mixed.binetflow holds two Argus management records with no addresses:
    not damage (Argus writes them in every file), skipped and counted, exit 0."""
    path = data_file(data_dir, "binetflow/test5-mixed.binetflow")
    rc = main(_argv(tm, tmp_path, f"zeek:{path}", "--alerts", ""))
    err = capsys.readouterr().err
    assert rc == 0, err
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["source_rejected"] == {}
    assert summary["source_non_ip"] == 2
    assert summary["flows"] == 298
    for msg in Outbox(tmp_path / "o.db").pending():
        flow = json.loads(msg.payload)["flow"]
        assert flow["src_ip"] is not None and flow["dst_ip"] is not None
