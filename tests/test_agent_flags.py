"""``edge-agent`` on bad flags and bad files: the documented exit code and a clear
error naming the flag or file, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from edge_agent.cli import main
from edge_agent.runtime import load_artifact
from flows.errors import BadInputError
from tests.conftest import free_port
from tests.test_agent_fixtures import tiny


@pytest.fixture(scope="module")
def tm(data_dir, tmp_path_factory):
    return tiny(data_dir, tmp_path_factory)


def _run(tm, tmp_path: Path, *extra: str, artifact: Path | None = None) -> list[str]:
    return [
        "run", "--artifact", str(artifact or tm.artifact), "--source",
        f"zeek:{tm.conn_log}", "--site", "s1", "--gateway", "g1",
        "--outbox", str(tmp_path / "o.db"), "--alerts", "", *extra,
    ]


def _main(argv: list[str], capsys) -> tuple[int, str]:
    rc = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


UP_TO_A_YEAR = "must be a number from 0 to 31,622,400"  # seconds


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--keepalive", "-5", "--keepalive must be 0..65535, got -5"),
        ("--keepalive", "100000", "--keepalive must be 0..65535, got 100000"),
        ("--connect-timeout", "nan", "--connect-timeout " + UP_TO_A_YEAR),
        ("--drain-timeout", "nan", "--drain-timeout " + UP_TO_A_YEAR),
        ("--drain-timeout", "inf", "--drain-timeout " + UP_TO_A_YEAR),
        ("--connect-timeout", "-1", "--connect-timeout must be a number from 0"),
        # Found: 1e308 passed as finite and overflowed the clock (a traceback).
        ("--connect-timeout", "1e308", "--connect-timeout must be a number from 0"),
        ("--drain-timeout", "4e7", "--drain-timeout " + UP_TO_A_YEAR),
        ("--max-wait-ms", "nan", "--max-wait-ms must be a number from 0 to 3,600,000"),
        ("--status-interval", "nan", "--status-interval must be a number from 0"),
        ("--status-interval", "0", "--status-interval must be above 0 s"),
        ("--max-batch", "0", "--max-batch must be 1.."),
        ("--max-batch", "99999", "--max-batch must be 1..4096, got 99999"),
        ("--broker", "mqtt://[::1", "broker 'mqtt://[::1' is not a URL like"),
        # Found: port 0 was taken as no port (1883); past 65535 said only "bad".
        ("--broker", "mqtt://127.0.0.1:0",
         "broker 'mqtt://127.0.0.1:0' has port 0; expected a number 1..65535"),
        ("--broker", "mqtt://u:s3cret@127.0.0.1:65536",
         "broker 'mqtt://u:***@127.0.0.1:65536' has a bad port; expected a number "
         "1..65535"),
        ("--outbox-max", "0", "--outbox-max must be 1.."),
    ],
)
def test_out_of_range_numbers_are_usage_errors(
    tm, tmp_path, capsys, flag, value, message
) -> None:
    broker = f"mqtt://127.0.0.1:{free_port()}"
    rc, err = _main(_run(tm, tmp_path, "--broker", broker, flag, value), capsys)
    assert rc == 2, err
    assert f"error: {message}" in err
    assert not (tmp_path / "o.db").exists()  # refused before anything started


@pytest.mark.parametrize("command", [
    ["write", "--gateway", "s1/g1", "--port", "0"],
    ["write", "--gateway", "s1/g1", "--service-port", "65536"],
    ["check", "--host", "127.0.0.1", "--ca", "ca.pem", "--port", "0"],
])
def test_broker_config_ports_are_1_to_65535(command, tmp_path, capsys):
    """Found: ``broker_config check --port 0`` (or 70000) went on to connect; a
    listener's port is 1..65535, a usage error before anything is written or
    dialled, as the broker URL's port is."""
    from edge_agent.broker_config import main as broker_config

    out = tmp_path / "deploy"
    argv = [command[0], *(["--out", str(out)] if command[0] == "write" else []),
            *command[1:]]
    with pytest.raises(SystemExit) as info:
        broker_config(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    flag, value = command[-2:]
    assert err.rstrip().endswith(
        f"error: argument {flag}: must be a number in [1, 65535], got {value!r}")
    assert not out.exists()


def test_a_non_utf8_password_file_is_bad_input_naming_it(tm, tmp_path, capsys):
    secret = tmp_path / "mqtt.pass"
    secret.write_bytes(b"pa\xffss\n")
    broker = f"mqtt://127.0.0.1:{free_port()}"
    argv = _run(tm, tmp_path, "--broker", broker, "--username", "u",
                "--password-file", str(secret))
    rc, err = _main(argv, capsys)
    assert rc == 3, err
    assert f"error: {secret}, byte offset 2: is not UTF-8 text" in err


def test_a_missing_password_file_is_bad_input_naming_it(tm, tmp_path, capsys):
    """Found: exit 2 with a raw ``[Errno 2] No such file or directory``, where a
    folder or an empty file is bad input (3) named by its path; a missing input
    file is bad input too (README's exit codes). Refused before the outbox or
    the alerts file is opened."""
    secret = tmp_path / "nonexistent" / "mqtt.pass"
    broker = f"mqtt://127.0.0.1:{free_port()}"
    argv = _run(tm, tmp_path, "--broker", broker, "--username", "u",
                "--password-file", str(secret))

    rc, err = _main(argv, capsys)

    assert rc == 3, err
    assert f"error: {secret}: no such file; password_file must be a UTF-8 text " in err
    assert "Errno" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.db").exists()


@pytest.mark.parametrize("where", ["flag", "url"])
def test_a_password_without_a_user_name_is_a_usage_error(tm, tmp_path, capsys, where):
    """Found: a --password-file without --username (or a user in the URL) was
    sent, and the broker refused it (135, exit 6); a broker password needs a
    user name, so it is a usage error up front, before the outbox is opened."""
    secret = tmp_path / "mqtt.pass"
    secret.write_text("s3cret\n")
    port = free_port()
    given = (
        ["--broker", f"mqtt://127.0.0.1:{port}", "--password-file", str(secret)]
        if where == "flag" else ["--broker", f"mqtt://:s3cret@127.0.0.1:{port}"]
    )

    rc, err = _main(_run(tm, tmp_path, *given), capsys)

    assert rc == 2, err
    what = "--password-file" if where == "flag" else "a password in the broker URL"
    assert err.strip() == (
        f"error: {what} gives a broker password but no user name is given; "
        "give the user name with --username (or username in the config file), or "
        "in the broker URL (mqtt://USER:PASSWORD@HOST:PORT)"
    )
    assert "s3cret" not in err
    assert not (tmp_path / "o.db").exists()


def test_credentials_given_twice_name_the_config_key_not_a_flag(tmp_path):
    """Found: with credentials in the broker URL and ``username`` in a --config
    file, the error said "--username is given too" though no flag was given."""
    from edge_agent.config import AgentConfig
    from flows.errors import UsageError

    conf = tmp_path / "agent.toml"
    conf.write_text('username = "gw-1"\n')
    flags = {"artifact": "a", "source": "-", "site": "s1", "gateway": "g1",
             "broker": "mqtt://admin:pw@127.0.0.1:1"}

    with pytest.raises(UsageError) as info:
        AgentConfig.load(conf, flags)
    assert f"and username in config {conf} is given too" in str(info.value)
    assert "--username" not in str(info.value)

    # A flag given over the file's key is named as the flag.
    with pytest.raises(UsageError, match="and --username is given too"):
        AgentConfig.load(conf, {**flags, "username": "gw-2"})


def _thresholds(**values) -> str:
    return json.dumps({"escalate_low": 0.2, "alert": 0.9, **values})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_thresholds(decision="abc"), "threshold 'decision' is 'abc', not a number"),
        (_thresholds(decision=None), "threshold 'decision' is 'None', not a number"),
        (_thresholds(alert=10**400), "threshold 'alert' is '1000"),
        ("[0.2, 0.9]", "holds a JSON list"),
        ('{"escalate_low": 0.2}', "lacks 'alert'"),
        ("{broken", "is not valid JSON"),
        (b"\xff\xfe{}", "is not valid JSON"),
    ],
)
def test_bad_thresholds_files_exit_3_by_flag_and_in_the_artifact(
    tm, tmp_path, capsys, text, message
) -> None:
    data = text if isinstance(text, bytes) else text.encode()
    flag_file = tmp_path / "t.json"
    flag_file.write_bytes(data)
    rc, err = _main(_run(tm, tmp_path, "--thresholds", str(flag_file)), capsys)
    assert rc == 3, err
    assert f"error: {flag_file}: {message}" in err
    artifact = tmp_path / "artifact"
    shutil.copytree(tm.artifact, artifact)
    site = artifact / "site_thresholds.json"
    site.write_bytes(data)
    rc, err = _main(_run(tm, tmp_path, artifact=artifact), capsys)
    assert rc == 3, err
    assert f"error: {site}: {message}" in err


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ('"a string"', "the manifest is a JSON str"),
        ("[1, 2]", "the manifest is a JSON list"),
        (None, "manifest 'input' is 'x'"),
    ],
)
def test_a_manifest_of_the_wrong_shape_is_bad_input_naming_it(
    tm, tmp_path, capsys, manifest, message
) -> None:
    artifact = tmp_path / "artifact"
    shutil.copytree(tm.artifact, artifact)
    path = artifact / "manifest.json"
    if manifest is None:
        manifest = json.dumps(dict(json.loads(path.read_text()), input="x"))
    path.write_text(manifest)
    with pytest.raises(BadInputError, match="expected a JSON object with target"):
        load_artifact(artifact)
    rc, err = _main(_run(tm, tmp_path, artifact=artifact), capsys)
    assert rc == 3, err
    assert f"error: {path}: {message}" in err


def test_an_alerts_folder_exits_1_as_the_epilog_says(tm, tmp_path, capsys) -> None:
    from edge_agent.cli import EPILOG

    assert "1    failure (an alerts file" in EPILOG
    argv = _run(tm, tmp_path)
    argv[argv.index("--alerts") + 1] = str(tmp_path)
    rc, err = _main(argv, capsys)
    assert rc == 1, err
    assert f"error: cannot open alerts file {tmp_path}: Is a directory" in err


def test_calibrate_out_in_a_missing_folder_says_so(tm, tmp_path, capsys) -> None:
    out = tmp_path / "no-such-dir" / "x.json"
    argv = [
        "calibrate", "--artifact", str(tm.artifact), "--source",
        f"zeek:{tm.conn_log}", "--target-fpr", "0.05", "--out", str(out),
    ]
    rc, err = _main(argv, capsys)
    assert rc == 2, err  # refused before the artifact is loaded
    assert f"error: --out {out}: the folder {out.parent} does not exist" in err
    assert "use --out" not in err


def test_rejected_verdicts_are_counted_and_never_written(tm, tmp_path) -> None:
    """Found: a 1000-character escalation id with escape characters, and a score
    of -1e300, were written to the local alerts file."""
    import io

    from edge_agent import protocol as proto
    from edge_agent.agent import Agent
    from edge_agent.outbox import Outbox

    alerts = io.StringIO()
    agent = Agent(
        load_artifact(tm.artifact),
        site="s1",
        gateway="g1",
        outbox=Outbox(tmp_path / "o.db"),
        alerts=alerts,
    )
    topic = agent.topics[proto.Channel.VERDICTS]

    def verdict(**changes) -> bytes:
        body = proto.build_verdict(
            escalation_id="cd" * 16,
            verdict="malicious",
            score=0.9,
            threshold=0.5,
            teacher_version="t",
        )
        body.update(changes)
        return json.dumps(body).encode()

    agent._on_message(topic, verdict(escalation_id="\x1b]0;x\x07" + "f" * 993))
    agent._on_message(topic, verdict(score=-1e300))
    agent._on_message(topic, verdict(threshold=7))
    assert agent.counters.rejected == {"bad_value": 3}
    assert agent.counters.verdicts_received == 0
    assert alerts.getvalue() == ""
    agent._awaiting["cd" * 16] = None  # as if acknowledged by the broker
    agent._on_message(topic, verdict())
    assert agent.counters.verdicts_received == 1
    assert "cd" * 16 in alerts.getvalue()
    agent.outbox.close()


def _agent_with_a_link(tm, tmp_path):
    """An agent of site s1, gateway g1 with a stand-in link (drain() only asks
    whether there is one), for feeding it verdict-topic messages by hand."""
    from edge_agent.agent import Agent
    from edge_agent.outbox import Outbox

    agent = Agent(
        load_artifact(tm.artifact),
        site="s1",
        gateway="g1",
        outbox=Outbox(tmp_path / "o.db"),
    )
    agent.link = object()
    return agent


def test_a_rejection_is_noted_once_and_a_later_verdict_still_answers(
    tm, tmp_path, caplog
) -> None:
    """A re-scorer's rejection of an awaited escalation is counted once (copies
    and rejections of ids this run did not send change nothing); the id stays
    awaited, and a verdict another re-scorer sends later answers it."""
    import logging

    from edge_agent import protocol as proto

    agent = _agent_with_a_link(tm, tmp_path)
    topic = agent.topics[proto.Channel.VERDICTS]
    a, b, stranger = "a" * 32, "b" * 32, "c" * 32

    def rejection(esc_id: str) -> bytes:
        return proto.encode(proto.build_rejection(
            escalation_id=esc_id, reason="wrong_window_shape",
            detail="window shape (8, 93), expected (4, 3)", teacher_version="t2"))

    def verdict(esc_id: str) -> bytes:
        return proto.encode(proto.build_verdict(
            escalation_id=esc_id, verdict="benign", score=0.1, threshold=0.5,
            teacher_version="t1"))

    agent._note_sent([a, b])
    with caplog.at_level(logging.WARNING, logger="gatewatch.edge_agent"):
        for payload in (rejection(a), rejection(a), rejection(b), rejection(stranger)):
            agent._on_message(topic, payload)
    assert agent.counters.rejected == {}
    assert agent.counters.rejections_received == 2
    assert agent.unanswered_rejections() == [
        ("wrong_window_shape", "window shape (8, 93), expected (4, 3)", "t2")] * 2
    summary = agent.summary()
    assert (summary["verdicts_awaited"], summary["escalations_rejected"]) == (2, 2)
    assert caplog.text.count("rejected escalation") == 1
    assert agent.drain(0.2) is False  # rejected ones are still awaited

    agent._on_message(topic, verdict(a))  # another re-scorer answers one
    summary = agent.summary()
    assert summary["verdicts_received"] == 1 and summary["verdicts_unmatched"] == 0
    assert (summary["verdicts_awaited"], summary["escalations_rejected"]) == (1, 1)
    agent._on_message(topic, verdict(b))
    assert agent.unanswered_rejections() == []
    assert agent.drain(5.0) is True
    agent.outbox.close()


def test_an_escalation_sent_twice_awaits_one_verdict(tm, tmp_path) -> None:
    """Found: re-using an outbox sent 28 escalations for 22 ids; the agent waited
    for 28 verdicts, drained the full timeout and warned that 6 did not arrive."""
    from edge_agent import protocol as proto

    agent = _agent_with_a_link(tm, tmp_path)
    topic = agent.topics[proto.Channel.VERDICTS]
    a, b, c = "a" * 32, "b" * 32, "c" * 32

    def verdict(esc_id: str) -> bytes:
        return proto.encode(
            proto.build_verdict(
                escalation_id=esc_id,
                verdict="benign",
                score=0.1,
                threshold=0.5,
                teacher_version="t",
            )
        )

    agent._tracked[c] = None  # published; its PUBACK not collected yet
    agent._on_message(topic, verdict(c))  # before its PUBACK was collected
    del agent._tracked[c]
    agent._note_sent([a, b, c])
    agent._note_sent([a])  # the same flow sent again
    agent.counters.escalations_sent = 4  # as _collect_acks counts them
    assert agent.summary()["verdicts_awaited"] == 2
    assert agent.drain(0.2) is False
    agent._on_message(topic, verdict(a))
    agent._on_message(topic, verdict(a))  # the re-scorer answers each copy
    agent._on_message(topic, verdict(b))
    summary = agent.summary()
    assert summary["verdicts_received"] == 3
    assert summary["escalations_resent"] == 1
    assert summary["verdicts_awaited"] == 0
    assert agent.drain(5.0) is True
    agent.outbox.close()


# -------------------------------------------------- files that are not what they seem


def test_a_fifo_config_is_refused_not_read_for_ever(tm, tmp_path, capsys) -> None:
    """Found: ``--config FIFO`` blocked on the read with no end."""
    fifo = tmp_path / "gw.toml"
    os.mkfifo(fifo)

    rc, err = _main([*_run(tm, tmp_path), "--config", str(fifo)], capsys)

    assert rc == 2  # the config is settings: every problem with it is usage
    assert f"error: config {fifo}: is not a regular file (a FIFO or device); " in err


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_site_thresholds_that_are_not_a_file_are_refused(
    tm, tmp_path, capsys, kind
) -> None:
    """Found: a site_thresholds.json that was a FIFO or a folder was silently
    ignored, and the artifact's own thresholds used instead."""
    art = tmp_path / "art"
    shutil.copytree(tm.artifact, art)
    site = art / "site_thresholds.json"
    os.mkfifo(site) if kind == "fifo" else site.mkdir()

    rc, err = _main(_run(tm, tmp_path, artifact=art), capsys)

    assert rc == 3, err
    assert f"error: {site}: is " in err and "site_thresholds.json" in err


@pytest.mark.parametrize("text", ["", "\nsecret\n"])
def test_an_empty_password_file_is_named(tm, tmp_path, capsys, text) -> None:
    """Found: an empty password file said "list index out of range"."""
    secret = tmp_path / "pw"
    secret.write_text(text)

    rc, err = _main(_run(tm, tmp_path, "--broker", f"mqtt://127.0.0.1:{free_port()}",
                         "--username", "u", "--password-file", str(secret)), capsys)

    assert rc == 3
    assert f"error: {secret}: is empty or starts with an empty line" in err


def test_an_artifact_given_as_a_file_is_named_as_such(tm, tmp_path, capsys) -> None:
    rc, err = _main(_run(tm, tmp_path, artifact=tm.artifact / "manifest.json"), capsys)

    assert rc == 1  # an artifact that cannot be loaded, as a missing one
    assert "manifest.json: is a file, not an artifact folder" in err


def test_an_sqlite_file_of_another_program_is_not_an_outbox(
    tm, tmp_path, capsys
) -> None:
    """Found: a foreign SQLite file as --outbox was accepted (and switched to WAL)
    at open, then every write failed (exit 6, "no column named id")."""
    import hashlib
    import sqlite3

    other = tmp_path / "o.db"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE outbox (a, b)")
    db.commit()
    db.close()
    before = hashlib.sha256(other.read_bytes()).hexdigest()

    rc, err = _main(_run(tm, tmp_path), capsys)

    assert rc == 3
    assert f"error: {other}: is an SQLite file whose 'outbox' table has the " \
        "columns ['a', 'b']" in err
    assert hashlib.sha256(other.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.db"]
