"""Testers' findings on ``edge-agent``: a second run on one outbox, calibrating on
an unlabeled capture, thresholds that switch detection off, unknown labels, the
exit code of an artifact of another feature family, and the outbox's disk cost."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_agent.cli import main
from edge_agent.outbox import Outbox, OutboxInUseError, lock_path
from tests.test_agent_fixtures import make_artifact, tiny

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tm(data_dir, tmp_path_factory):
    return tiny(data_dir, tmp_path_factory)


def _run_argv(tm, outbox: Path, source: str = "-", *extra: str) -> list[str]:
    return [
        "run", "--artifact", str(tm.artifact), "--source", source, "--site", "home",
        "--gateway", "gw3", "--outbox", str(outbox), "--alerts", "", *extra,
    ]


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


# -- 1. one run per outbox -----------------------------------------------------------


def test_an_outbox_is_locked_until_closed(tmp_path: Path) -> None:
    """Found: nothing stopped two agents opening one outbox."""
    first = Outbox(tmp_path / "ob3.sqlite", lock=True)
    with pytest.raises(OutboxInUseError) as info:
        Outbox(tmp_path / "ob3.sqlite", lock=True)
    assert info.value.exit_code == 2
    assert f"pid {os.getpid()}" in str(info.value)
    first.close()
    Outbox(tmp_path / "ob3.sqlite", lock=True).close()  # free again once closed
    Outbox(tmp_path / "ob3.sqlite").close()  # read-only use takes no lock


def test_a_second_run_on_the_same_outbox_is_refused_naming_the_first(
    tm, tmp_path: Path
) -> None:
    """Found: ``edge-agent run ... --outbox ob3.sqlite`` started twice ran both,
    sharing the outbox and knocking each other off the broker (one client id)."""
    outbox = tmp_path / "ob3.sqlite"
    argv = [sys.executable, "-m", "edge_agent.cli", *_run_argv(tm, outbox)]
    first = subprocess.Popen(
        argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        lock = lock_path(outbox)
        deadline = time.monotonic() + 30
        while not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first run took no lock"
            time.sleep(0.05)
        second = subprocess.run(
            argv, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=60,
        )
        assert second.returncode == 2, second.stderr
        assert "Traceback" not in second.stderr
        [line] = _errors(second.stderr)
        assert line.startswith(
            f"error: the outbox {outbox} is in use by another edge-agent run (pid "
            f"{first.pid} holds {lock})"
        )
        first.stdin.write(json.dumps(tm.records[0]) + "\n")
        first.stdin.close()
        assert first.wait(60) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


# -- 2. calibrating on an unlabeled capture, thresholds that switch detection off ---


def _unlabeled_parquet(tm, path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [dict(r, label=None, label_detail=None) for r in tm.records]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_calibrate_on_an_unlabeled_source_warns_that_all_is_taken_as_benign(
    tm, tmp_path: Path, caplog
) -> None:
    """Found: an unlabeled RAT capture took every flow as benign, silently, and
    set thresholds that no longer flagged its own attack flows."""
    art = make_artifact(tmp_path / "art", tm.encoder, tm.thresholds)
    source = f"parquet:{_unlabeled_parquet(tm, tmp_path / 'u.parquet')}"
    with caplog.at_level(logging.WARNING, logger="gatewatch.edge_agent"):
        rc = main(["calibrate", "--artifact", str(art), "--source", source,
                   "--target-fpr", "0.001"])
    assert rc == 0
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [m for m in said if "holds no labels" in m] == [
        f"{source} holds no labels: every one of its {len(tm.records)} flows is "
        "taken as benign, so the thresholds will pass whatever the capture holds, "
        "attacks included (calibrate on traffic known to be clean, or on a "
        "labeled log)"
    ]
    site = json.loads((art / "site_thresholds.json").read_text())
    assert site["benign_flows"] == len(tm.records) and not site["labeled"]


def test_calibrate_on_a_labeled_log_uses_its_benign_flows_without_a_warning(
    tm, tmp_path: Path, caplog
) -> None:
    art = make_artifact(tmp_path / "art", tm.encoder, tm.thresholds)
    with caplog.at_level(logging.WARNING, logger="gatewatch.edge_agent"):
        rc = main(["calibrate", "--artifact", str(art), "--source",
                   f"zeek:{tm.conn_log}", "--target-fpr", "0.01"])
    assert rc == 0
    assert not [r for r in caplog.records if "benign" in r.getMessage()]
    site = json.loads((art / "site_thresholds.json").read_text())
    assert site["benign_flows"] == sum(r["label"] == 0 for r in tm.records)


def test_calibrate_whose_benign_flows_score_1_writes_thresholds_run_takes(
    tm, tmp_path: Path, monkeypatch, caplog
) -> None:
    """Found: benign flows scoring 1.0 (float32) gave thresholds one float32 step
    past 1, which run then refused (exit 3); now "never" (the largest threshold
    run takes), with a warning that detection is switched off."""
    import numpy as np

    import edge_agent.runtime as runtime
    from edge_agent.agent import load_thresholds

    real = runtime.load_artifact

    def saturated(path):
        scorer = real(path)
        scorer.score = lambda windows: np.ones(len(windows), dtype=np.float32)
        return scorer

    art = make_artifact(tmp_path / "art", tm.encoder, tm.thresholds)
    monkeypatch.setattr(runtime, "load_artifact", saturated)
    with caplog.at_level(logging.WARNING, logger="gatewatch.edge_agent"):
        rc = main(["calibrate", "--artifact", str(art), "--source",
                   f"zeek:{tm.conn_log}", "--target-fpr", "0.01"])
    assert rc == 0
    assert any("switch detection off" in r.getMessage() for r in caplog.records)
    # Every flow ties at 1.0 right below the decision: the doubt floor takes the
    # group whole, so the teacher decides them all, and says so.
    assert any("send 100.0% of the benign flows" in r.getMessage()
               for r in caplog.records)
    thresholds, origin = load_thresholds(real(art))
    assert origin == "site" and thresholds["alert"] > 1.0
    assert thresholds["escalate_low"] == 1.0


def _site(art: Path, **values) -> Path:
    path = art / "site_thresholds.json"
    path.write_text(json.dumps(values))
    return path


def test_run_says_by_default_that_site_thresholds_are_used_and_when_they_are_off(
    tm, tmp_path: Path
) -> None:
    """Found: run used an artifact's site_thresholds.json instead of its own
    thresholds.json saying so at info level only (not shown without -v), and
    thresholds of 1.0 that switch detection off were taken without a word."""
    art = make_artifact(tmp_path / "art", tm.encoder, tm.thresholds)
    site = _site(art, escalate_low=1.0, decision=1.0, alert=1.0)
    argv = _run_argv(tm, tmp_path / "o.db", "-")  # an empty stdin: exit 0
    argv[argv.index(str(tm.artifact))] = str(art)
    done = subprocess.run(  # a process of its own: the log as a person sees it
        [sys.executable, "-m", "edge_agent.cli", *argv], cwd=REPO,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
    )
    err = done.stderr
    assert done.returncode == 0, err
    assert (
        f"WARNING gatewatch.edge_agent: thresholds from {site} (edge-agent "
        "calibrate), not the artifact's thresholds.json: escalate_low 1, alert 1"
    ) in err
    assert (
        f"thresholds of {site}: escalate_low 1.0 is at or above 1, so no flow "
        "scored below 1 is escalated or alerted: detection is switched off"
    ) in err


# -- 3. an unknown label costs the label, not the flow --------------------------------


def test_an_unknown_label_on_stdin_is_scored_as_unlabeled_and_noted_once(
    tm, tmp_path: Path, monkeypatch, capsys, caplog
) -> None:
    """Found: a flow with an unknown ``label`` on stdin was dropped (exit 4),
    though labels are not used for scoring."""
    import io

    records = [dict(r) for r in tm.records[:300]]
    records[5]["label"] = "evil"
    records[9]["label"] = "weird"
    text = "".join(json.dumps(r) + "\n" for r in records)
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    summary = tmp_path / "s.json"
    with caplog.at_level(logging.WARNING, logger="gatewatch.edge_agent"):
        rc = main(_run_argv(tm, tmp_path / "o.db", "-", "--summary-json",
                            str(summary)))
    err = capsys.readouterr().err
    assert rc == 0, err
    said = json.loads(summary.read_text())
    assert said["flows"] == 300 and said["source_rejected"] == {}
    assert said["source_unknown_labels"] == 2
    [note] = [r.getMessage() for r in caplog.records
              if "unknown label" in r.getMessage()]
    assert "line 6: unknown label 'evil' taken as no label" in note


def test_an_escalation_of_a_flow_with_an_unknown_label_passes_the_rescorers_check(
) -> None:
    """The re-scorer checks an escalated flow field by field: the unknown label
    goes as no label, its text as label_detail."""
    import io

    from edge_agent import protocol as proto
    from edge_agent.sources import open_source

    line = json.dumps({"ts": 1.5, "src_ip": "10.0.0.1", "src_port": 1, "dst_ip":
                       "10.0.0.2", "dst_port": 80, "proto": "tcp", "label": "evil"})
    [rec] = open_source("-", stdin=io.StringIO(line + "\n"))
    flow = proto.check_flow(proto.sendable_flow(rec))
    assert (flow["label"], flow["label_detail"]) == (None, "evil")


# -- 5. the disk cost of --outbox-max --------------------------------------------------


def test_run_help_states_the_disk_cost_of_the_outbox_cap(capsys) -> None:
    """Found: --outbox-max gave a count with no idea of the disk it takes."""
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "takes about 5 KB" in text and "about 500 MB" in text
