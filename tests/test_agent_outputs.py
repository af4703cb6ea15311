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
  counts alerts and uncertain escalations apart.
- A broker that died mid-run was reported as "not delivered to a subscriber".
- calibrate --out under a regular file said the folder "does not exist".
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


def test_the_disk_full_error_counts_alerts_and_uncertain_ones_apart(
    tm, tmp_path, capsys, monkeypatch
):
    from edge_agent.outbox import Outbox
    from flows.errors import OutboxError

    def full(self, messages):
        raise OutboxError("cannot store 1 messages in the outbox: database or disk "
                          "is full", path="o.db")

    monkeypatch.setattr(Outbox, "add_many", full)
    summary = tmp_path / "s.json"
    rc = main(_zeek_run(tm, tmp_path, "--alerts", "", "--summary-json",
                        str(summary)))
    err = capsys.readouterr().err
    assert rc == 6, err
    expected = tm.expected()
    alerts = sum(d == "alert" for d in expected.values())
    uncertain = len(expected) - alerts
    assert alerts and uncertain
    assert _error_lines(err) == [
        f"error: {len(expected)} escalations were dropped because the outbox could "
        f"not store them ({alerts} alerts, whose alert lines are in the alert log, "
        f"and {uncertain} uncertain escalations, of which no record is left); last "
        "error: o.db: cannot store 1 messages in the outbox: database or disk is full"
    ]
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
    assert rc == 1, err
    assert _error_lines(err) == [
        f"error: cannot write {out}: {tmp_path / 'afile'} is a file, not a folder"
    ]
