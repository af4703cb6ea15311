"""Found by a tester: outputs of ``edge-agent run`` and ``calibrate`` that cannot be
opened or written, and error lines that said less than what happened.

- An --outbox under a regular file gave a traceback (exit 1); one that is a folder
  said "unable to open database file". Both now say what the path is (exit 1, as
  for any output that cannot be opened).
- An --outbox on a read-only or full file system exited 3 ("a damaged outbox");
  now a read-only one is exit 1 naming it, a full disk exit 6 saying so.
- A manifest that is not valid JSON exited 1; it is bad input (3) as a manifest
  that is a JSON list is. A --summary-json that cannot be written only warned and
  exited 0; it is exit 1 as other outputs.
- The disk-full error said every dropped escalation had an alert line; it now
  counts alerts and uncertain escalations apart, and with --alerts "" (no alert
  log) it no longer sends the reader to an alert log.
- A broker that died mid-run was reported as "not delivered to a subscriber".
- calibrate --out under a regular file said the folder "does not exist".
- Flows read again (repeated uids, or a copy with a fresh uid) merged with their
  waiting escalation without a word; the summary now counts them.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.cli import main
from tests.test_agent import REPO, _error_lines, _run_argv, _wait_for_stderr
from tests.test_agent_fixtures import tiny


@pytest.fixture
def tm(data_dir, tmp_path_factory):
    return tiny(data_dir, tmp_path_factory)


def _zeek_run(tm, tmp_path: Path, *extra: str) -> list[str]:
    return _run_argv(tm, tmp_path, f"zeek:{tm.conn_log}", *extra)


def _argv_with_outbox(tm, tmp_path: Path, outbox: Path) -> list[str]:
    argv = _zeek_run(tm, tmp_path, "--alerts", "")
    argv[argv.index("--outbox") + 1] = str(outbox)
    return argv


def test_an_outbox_under_a_file_is_named_so_with_exit_1(tm, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    outbox = tmp_path / "afile" / "ob.sqlite"
    rc = main(_argv_with_outbox(tm, tmp_path, outbox))
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "Traceback" not in err
    assert _error_lines(err) == [
        f"error: cannot create the outbox {outbox}: {tmp_path / 'afile'} is a file, "
        "not a folder"
    ]


def test_an_outbox_that_is_a_folder_is_named_so_with_exit_1(tm, tmp_path, capsys):
    folder = tmp_path / "box"
    folder.mkdir()
    rc = main(_argv_with_outbox(tm, tmp_path, folder))
    err = capsys.readouterr().err
    assert rc == 1, err
    assert _error_lines(err) == [
        f"error: cannot open the outbox {folder}: it is a folder, not a file; give "
        "--outbox a file path (a new file is created)"
    ]


def _refusing_connect(name: str, text: str):
    """sqlite3.connect as it fails for ``name`` (SQLITE_FULL, ...)."""
    def connect(*args, **kwargs):
        exc = sqlite3.OperationalError(text)
        exc.sqlite_errorname = name
        raise exc
    return connect


def test_an_outbox_on_a_read_only_file_system_is_exit_1_saying_so(
    tm, tmp_path, capsys, monkeypatch
):
    import edge_agent.outbox as ob

    class ReadOnly:
        f_flag = ob.os.ST_RDONLY

    monkeypatch.setattr(ob.sqlite3, "connect", _refusing_connect(
        "SQLITE_CANTOPEN", "unable to open database file"))
    monkeypatch.setattr(ob.os, "statvfs", lambda path: ReadOnly())
    outbox = tmp_path / "ob.sqlite"
    rc = main(_argv_with_outbox(tm, tmp_path, outbox))
    err = capsys.readouterr().err
    assert rc == 1, err
    assert _error_lines(err) == [
        f"error: cannot open the outbox {outbox}: the folder {tmp_path} is on a "
        "read-only file system (unable to open database file)"
    ]


def test_an_outbox_on_a_full_disk_is_exit_6_saying_so(
    tm, tmp_path, capsys, monkeypatch
):
    import edge_agent.outbox as ob

    monkeypatch.setattr(ob.sqlite3, "connect", _refusing_connect(
        "SQLITE_FULL", "database or disk is full"))
    outbox = tmp_path / "ob.sqlite"
    rc = main(_argv_with_outbox(tm, tmp_path, outbox))
    err = capsys.readouterr().err
    assert rc == 6, err
    assert _error_lines(err) == [
        f"error: {outbox}: cannot open the outbox: the disk is full (database or "
        "disk is full)"
    ]


def test_a_manifest_that_is_not_valid_json_is_bad_input(tm, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(tm.artifact, art)
    (art / "manifest.json").write_text("{broken")
    argv = _zeek_run(tm, tmp_path, "--alerts", "")
    argv[argv.index("--artifact") + 1] = str(art)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 3, err
    [line] = _error_lines(err)
    assert line.startswith(
        f"error: {art / 'manifest.json'}: the manifest is not valid JSON (Expecting "
    )
    assert line.endswith("; expected a JSON object with target, model_file, input, "
                         "output and sha256 (input and output objects with shape "
                         "and dtype)")


def test_a_summary_json_that_cannot_be_written_is_exit_1(tm, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" / "s.json"
    rc = main(_zeek_run(tm, tmp_path, "--alerts", "", "--summary-json", str(target)))
    err = capsys.readouterr().err
    assert rc == 1, err
    assert _error_lines(err) == [
        f"error: cannot write the summary to {target}: {tmp_path / 'afile'} is a "
        "file, not a folder"
    ]
    assert "warning:" not in err


@pytest.mark.parametrize("alert_log", [True, False])
def test_the_disk_full_error_counts_alerts_and_uncertain_ones_apart(
    tm, tmp_path, capsys, monkeypatch, alert_log
):
    """Found: with --alerts "" (no alert log) the error still said the alerts'
    lines were "in the alert log"."""
    from edge_agent.outbox import Outbox
    from flows.errors import OutboxError

    def full(self, messages):
        raise OutboxError("cannot store 1 messages in the outbox: database or disk "
                          "is full", path="o.db")

    monkeypatch.setattr(Outbox, "add_many", full)
    summary = tmp_path / "s.json"
    log = tmp_path / "alerts.jsonl"
    rc = main(_zeek_run(tm, tmp_path, "--alerts", str(log) if alert_log else "",
                        "--summary-json", str(summary)))
    err = capsys.readouterr().err
    assert rc == 6, err
    expected = tm.expected()
    alerts = sum(d == "alert" for d in expected.values())
    uncertain = len(expected) - alerts
    assert alerts and uncertain
    kinds = (
        f"{alerts} alerts, whose alert lines are in the alert log, and {uncertain} "
        "uncertain escalations, of which no record is left"
        if alert_log
        else f"{alerts} alerts and {uncertain} uncertain escalations; no record of "
        "them is left: with --alerts empty no alert lines are written"
    )
    assert _error_lines(err) == [
        f"error: {len(expected)} escalations were dropped because the outbox could "
        f"not store them ({kinds}); last error: o.db: cannot store 1 messages in "
        "the outbox: database or disk is full"
    ]
    assert log.exists() == alert_log
    if alert_log:
        assert len(log.read_text().splitlines()) == alerts
    data = json.loads(summary.read_text())
    assert (data["outbox_failed"], data["outbox_failed_alerts"]) == (
        len(expected), alerts)


@pytest.mark.broker
def test_a_broker_lost_mid_run_is_named_in_the_drain_error(
    tm, mosquitto, tmp_path
):
    """The broker dies after the agent connected; the flows that come after are
    kept in the outbox, and the error line says the connection was lost."""
    err_path = tmp_path / "err"
    agent = subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "-v",
         *_run_argv(tm, tmp_path, "-", "--alerts", "", "--broker", mosquitto.url,
                    "--drain-timeout", "2")],
        cwd=REPO, stdin=subprocess.PIPE, stderr=open(err_path, "w"), text=True,
    )
    try:
        _wait_for_stderr(agent, err_path, "connected to")
        mosquitto.stop()
        _wait_for_stderr(agent, err_path, "lost broker")
        agent.stdin.write("".join(json.dumps(r) + "\n" for r in tm.records))
        agent.stdin.close()
        agent.wait(60)
    finally:
        if agent.poll() is None:
            agent.kill()
    err = err_path.read_text()
    assert agent.returncode == 6, err
    n = len(tm.expected(tm.records))
    assert _error_lines(err) == [
        f"error: {n} escalations were not sent (the connection to the broker "
        f"{mosquitto.url} was lost during the run and was not back within the 2 s "
        f"drain); they stay in the outbox {tmp_path / 'o.db'} and are sent by the "
        "next run"
    ]


def test_calibrate_out_under_a_file_says_it_is_a_file(tm, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "t.json"
    rc = main(["calibrate", "--artifact", str(tm.artifact), "--source",
               f"zeek:{tm.conn_log}", "--target-fpr", "0.01", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err  # refused before the artifact is loaded
    assert _error_lines(err) == [
        f"error: --out {out}: {tmp_path / 'afile'} is a file, not a folder"
    ]


def _escalate_everything(tmp_path: Path) -> Path:
    """A --thresholds file under which every flow is escalated, none alerted."""
    path = tmp_path / "every.json"
    path.write_text(json.dumps({"escalate_low": 0.0, "alert": 1.0}))
    return path


def test_flows_read_again_are_merged_and_counted_in_the_summary(
    tm, tmp_path, capsys, monkeypatch
):
    """A flow read twice (the same uid, or a fresh uid as the flow meter draws)
    is one escalation with one verdict, counted as merged; a flow that only
    shares an earlier one's uid is escalated apart (the uid is no part of the
    id)."""
    import io
    import sys

    from edge_agent.agent import flow_id
    from edge_agent.outbox import Outbox

    base = [dict(r) for r in tm.records[:20]]
    assert len({r["uid"] for r in base}) == 20
    same = dict(base[3])  # the same line again
    fresh_uid = dict(base[5], uid="Crepeated1")
    source = next(r for r in base if r["orig_bytes"] is not None)
    shares_uid = dict(source, orig_bytes=source["orig_bytes"] + 1)
    records = [*base, same, fresh_uid, shares_uid]
    text = "".join(json.dumps(r) + "\n" for r in records)
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    summary = tmp_path / "s.json"

    rc = main(_run_argv(tm, tmp_path, "-", "--alerts", "", "--thresholds",
                        str(_escalate_everything(tmp_path)), "--summary-json",
                        str(summary)))

    err = capsys.readouterr().err
    assert rc == 0, err
    data = json.loads(summary.read_text())
    assert data["escalate"] == len(records) == 23
    assert data["escalations_merged"] == 2
    assert data["escalations_queued"] == data["outbox_pending"] == 21
    [line] = [x for x in err.splitlines() if x.startswith("summary:")]
    assert line.endswith(
        ", flows read again while their escalation waited in the outbox (merged "
        "with it) 2"
    )
    pending = {m.id for m in Outbox(tmp_path / "o.db").pending()}
    assert pending == {flow_id("s1", "g1", r) for r in [*base, shares_uid]}
