"""Stops that came at the wrong moment (tester's findings, round 16).

- A Ctrl-C during ``edge-agent run`` lost a batch: its flows were counted in the
  summary, then the KeyboardInterrupt landed between the outbox commit and the
  alert lines (or before the commit). A batch is now counted, stored and written
  as one step; a second Ctrl-C still stops at once.
- ``teacher serve --password-file`` read the file its own way (a traceback for
  one that is not UTF-8, an odd message for an empty one, an empty password
  sent for an empty first line); it now uses ``edge-agent run``'s reader.
- ``flows convert`` said "interrupted" (exit 130) for a Ctrl-C that came as the
  finished output was renamed into place, and died silently under SIGTERM.

Signals are sent from inside patched steps (the outbox commit, the alert
writer, the rename), so each lands where the finding says, not by timing.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_agent.agent import Agent
from edge_agent.outbox import Outbox
from tests.test_agent_fixtures import tiny

REPO = Path(__file__).resolve().parent.parent
THRESHOLDS = {"escalate_low": 0.5, "decision": 0.5, "alert": 0.9}


@pytest.fixture
def tm(data_dir, tmp_path_factory):
    return tiny(data_dir, tmp_path_factory)


@pytest.fixture
def default_sigint():
    """Ctrl-C raises KeyboardInterrupt, as in a plain ``python`` process."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


class MixedScorer:
    """Scores that cycle alert, escalate, benign: every batch has all three."""

    model_version = "mixed-1"

    def __init__(self, encoder) -> None:
        self.encoder = encoder
        self.thresholds = dict(THRESHOLDS)

    def score(self, windows):
        cycle = np.array([0.95, 0.6, 0.1], dtype=np.float32)
        return np.resize(cycle, len(windows))


def _agent(tm, tmp_path: Path) -> tuple[Agent, io.StringIO]:
    alerts = io.StringIO()
    agent = Agent(
        MixedScorer(tm.encoder),
        site="s1",
        gateway="g1",
        outbox=Outbox(tmp_path / "ob.sqlite"),
        alerts=alerts,
        max_batch=64,
        thresholds=dict(THRESHOLDS),
    )
    return agent, alerts


def _kept_as_counted(agent: Agent, alerts: io.StringIO) -> None:
    """Every flow counted is in the outbox, and every alert has its line."""
    c = agent.counters
    lines = [json.loads(x) for x in alerts.getvalue().splitlines()]
    stored = agent.outbox.pending()
    assert c.benign + c.escalate + c.alert == c.flows
    assert len(lines) == c.alert
    assert len(stored) + c.escalations_merged == c.alert + c.escalate
    assert sum(m.alert for m in stored) == len({x["escalation_id"] for x in lines})


def _ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_ctrl_c_at_the_outbox_commit_keeps_the_batch_whole(
    tm, tmp_path, default_sigint, when
):
    agent, alerts = _agent(tm, tmp_path)
    real = agent.outbox.add_many
    calls = []

    def add_many(items):
        calls.append(len(items))
        if len(calls) == 3 and when == "before":
            _ctrl_c()
        kept = real(items)
        if len(calls) == 3 and when == "after":
            _ctrl_c()
        return kept

    agent.outbox.add_many = add_many
    with pytest.raises(KeyboardInterrupt):
        agent.run_file(tm.records[:2000])

    # Raised once the third batch was whole: three batches counted and kept.
    assert len(calls) == 3
    assert agent.counters.flows == 3 * 64
    _kept_as_counted(agent, alerts)
    assert agent.counters.alert > 0
    agent.outbox.close()


def test_a_ctrl_c_between_two_alert_lines_keeps_the_batch_whole(
    tm, tmp_path, default_sigint
):
    agent, alerts = _agent(tm, tmp_path)
    real = alerts.write
    written = []

    def write(text):
        written.append(text)
        if len(written) == 30:  # in the second batch (22 alerts in each)
            _ctrl_c()
        return real(text)

    alerts.write = write
    with pytest.raises(KeyboardInterrupt):
        agent.run_file(tm.records[:2000])

    assert agent.counters.flows == 2 * 64
    _kept_as_counted(agent, alerts)
    agent.outbox.close()


def test_a_second_ctrl_c_in_the_step_stops_at_once(tm, tmp_path, default_sigint):
    agent, alerts = _agent(tm, tmp_path)
    real = agent.outbox.add_many
    reached = []

    def add_many(items):
        _ctrl_c()
        _ctrl_c()
        reached.append(True)  # not reached: the second Ctrl-C raised
        return real(items)

    agent.outbox.add_many = add_many
    with pytest.raises(KeyboardInterrupt):
        agent.run_file(tm.records[:200])
    assert reached == []
    # The handler is put back: the next Ctrl-C raises where it lands.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    agent.outbox.close()


def test_a_live_sources_ctrl_c_handler_is_called_after_the_step(tm, tmp_path):
    """edge-agent run's own handler (a live source: it sets the stop flags) is
    called once, after the batch is stored and its alert lines written."""
    agent, alerts = _agent(tm, tmp_path)
    seen = []

    def on_sigint(*_):
        seen.append((len(agent.outbox), alerts.getvalue().count("\n")))

    before = signal.signal(signal.SIGINT, on_sigint)
    try:
        real = agent.outbox.add_many

        def add_many(items):
            _ctrl_c()
            return real(items)

        agent.outbox.add_many = add_many
        agent.process(list(tm.records[:64]))
    finally:
        signal.signal(signal.SIGINT, before)
    assert seen == [(len(agent.outbox), agent.counters.alert)]
    assert agent.counters.alert > 0
    agent.outbox.close()


# ---------------------------------------------------------------------------------
# teacher serve --password-file: edge-agent run's reader

SERVE = ["serve", "--checkpoint", "no-such-ckpt", "--broker", "mqtt://127.0.0.1:1"]


@pytest.mark.parametrize("content", [b"\xff\xfe\n", b"", b"\nsecret\n"],
                         ids=["not-utf8", "empty", "empty-first-line"])
def test_serve_refuses_a_password_file_as_edge_agent_run_does(
    content, tmp_path, capsys
):
    from edge_agent.config import AgentConfig
    from flows.errors import EXIT_BAD_INPUT, BadInputError
    from teacher.cli import main

    pw = tmp_path / "pw"
    pw.write_bytes(content)
    with pytest.raises(BadInputError) as agent_said:
        AgentConfig(password_file=str(pw)).secret()

    code = main([*SERVE, "--store", str(tmp_path / "a.sqlite"),
                 "--password-file", str(pw)])

    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert err == f"error: {agent_said.value}\n"
    assert err.startswith(f"error: {pw}")
    assert "password_file must" in err and "Traceback" not in err


def test_serve_takes_a_good_password_file_and_goes_on(tmp_path, capsys):
    """Read, then the checkpoint is loaded (and here found missing)."""
    from teacher.cli import main

    pw = tmp_path / "pw"
    pw.write_text("s3cret\nignored\n")
    main([*SERVE, "--store", str(tmp_path / "a.sqlite"), "--password-file", str(pw)])
    err = capsys.readouterr().err
    assert "no-such-ckpt" in err and "password" not in err


def test_serve_help_gives_the_password_files_exit_code():
    from tests.test_alert_store_damage import _commands

    tail = _commands()["serve"].format_help().split("exit codes:")[1]
    flat = " ".join(tail.split())
    assert "3 bad input:" in flat
    assert "a --password-file that is not UTF-8 text, is empty or starts with an " \
        "empty line" in flat


# ---------------------------------------------------------------------------------
# flows convert: a stop at the rename, and SIGTERM


def _conn_log(tmp_path: Path) -> Path:
    from tests.test_readers import ROW_A, ROW_B, zeek_text

    path = tmp_path / "c.log"
    path.write_text(zeek_text([ROW_A, ROW_B]))
    return path


def _convert(capsys, tmp_path: Path) -> tuple[int, str, Path]:
    from flows.cli import main

    out = tmp_path / "keep.parquet"
    out.write_bytes(b"the old output")
    code = main(["convert", str(_conn_log(tmp_path)), "-o", str(out), "--force"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err, out


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _unhandled_sigterm(*_):
    raise AssertionError("flows let the SIGTERM through")


@pytest.fixture
def stops(default_sigint):
    """Ctrl-C raises; a SIGTERM that flows does not handle fails the test
    (instead of ending pytest)."""
    before = signal.signal(signal.SIGTERM, _unhandled_sigterm)
    yield
    signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_stop_as_the_output_is_renamed_in_ends_as_finished(
    tmp_path, capsys, monkeypatch, stops, signum, when
):
    import flows.cli

    real = flows.cli.put_in_place

    def put_in_place(tmp, path, force):
        if when == "before":
            os.kill(os.getpid(), signum)
        real(tmp, path, force)
        if when == "after":
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(flows.cli, "put_in_place", put_in_place)
    code, err, out = _convert(capsys, tmp_path)

    assert code == 0
    assert err == f"wrote 2 rows (zeek-tsv -> parquet) to {out}\n"
    from flows.readers import read

    assert read(out).table.num_rows == 2
    assert _names(tmp_path) == ["c.log", "keep.parquet"]
    # The handlers are back as they were.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is _unhandled_sigterm


@pytest.mark.parametrize("signum, code, said", [
    (signal.SIGINT, 130, "error: interrupted\n"),
    (signal.SIGTERM, 143, "error: stopped by SIGTERM\n"),
])
def test_a_stop_while_the_output_is_written_keeps_the_old_one(
    tmp_path, capsys, monkeypatch, stops, signum, code, said
):
    import flows.readers as readers

    def half_then_stop(table, path, family="conn", *, name=None):
        Path(path).write_bytes(b"PAR1 half a file")
        os.kill(os.getpid(), signum)
        raise AssertionError("the stop did not land")

    monkeypatch.setattr(readers, "write_parquet", half_then_stop)
    got, err, out = _convert(capsys, tmp_path)

    assert (got, err) == (code, said)
    assert out.read_bytes() == b"the old output"
    assert _names(tmp_path) == ["c.log", "keep.parquet"]
    assert signal.getsignal(signal.SIGTERM) is _unhandled_sigterm


def test_inspect_json_says_it_was_stopped_by_sigterm(
    tmp_path, capsys, monkeypatch, stops
):
    import flows.readers as readers
    from flows.cli import main

    def stopped(*_args, **_kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the stop did not land")

    monkeypatch.setattr(readers, "read", stopped)
    code = main(["inspect", "--json", str(_conn_log(tmp_path))])
    out, err = capsys.readouterr()
    assert code == 143
    assert json.loads(out) == {"error": "stopped by SIGTERM", "exit_code": 143}
    assert err == "error: stopped by SIGTERM\n"


def test_flows_under_a_real_sigterm_exits_143_with_one_line(tmp_path):
    """The process's own status, not only main's return value."""
    out = tmp_path / "keep.parquet"
    out.write_bytes(b"the old output")
    script = (
        "import os, signal, sys\n"
        "import flows.readers as r\n"
        "real = r.write_parquet\n"
        "def write(*a, **k):\n"
        "    real(*a, **k)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "r.write_parquet = write\n"
        "from flows.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, "convert", str(_conn_log(tmp_path)),
         "-o", str(out), "--force"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert (done.returncode, done.stderr) == (143, "error: stopped by SIGTERM\n")
    assert out.read_bytes() == b"the old output"
    assert _names(tmp_path) == ["c.log", "keep.parquet"]


def test_flows_help_documents_sigterm(capsys):
    from flows.cli import main

    assert main(["convert", "--help"]) == 0
    flat = " ".join(capsys.readouterr().out.split())
    assert "130 interrupted (Ctrl-C, SIGINT)" in flat
    assert "143 stopped by SIGTERM" in flat
    assert "one that comes as the finished output is renamed into place changes " \
        "nothing" in flat
