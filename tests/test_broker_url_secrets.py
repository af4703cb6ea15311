"""A password in a broker URL never reaches a log line, an error or a summary.

``--broker mqtt://user:password@host:port`` is a documented way to give the
credentials; everything that shows the URL shows ``user:***@host:port`` instead.
The brokers here are ports on 127.0.0.1 where nothing listens.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edge_agent.mqtt import BrokerAddress, MqttLink, redact_url
from flows.errors import EXIT_UNAVAILABLE, TransportError, UsageError
from tests.conftest import free_port

SECRET = "s3cret-Pw"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("mqtt://admin:s3cret@127.0.0.1:1", "mqtt://admin:***@127.0.0.1:1"),
        ("mqtts://a%20b:p%40ss@[::1]:8883", "mqtts://a%20b:***@[::1]:8883"),
        ("mqtt://admin:@host", "mqtt://admin:***@host"),
        ("mqtt://admin@host:1883", "mqtt://admin@host:1883"),
        ("mqtt://host:1883", "mqtt://host:1883"),
        # A password with an unquoted "/" or "@" still stays hidden.
        ("mqtt://u:pa/ss@host:1", "mqtt://u:***@host:1"),
        ("mqtt://u:p@ss@host:1", "mqtt://u:***@host:1"),
        ("u:secret@host:1", "u:***@host:1"),  # no scheme: a usage error shows it
        ("mqtt://[::1", "mqtt://[::1"),
    ],
)
def test_redact_url_hides_the_password_only(url, shown) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        f"mqtt://admin:{SECRET}@127.0.0.1:99999",  # bad port
        f"http://admin:{SECRET}@127.0.0.1:1",  # wrong scheme
        f"mqtt://admin:{SECRET}@[::1",  # IPv6 without its bracket
    ],
)
def test_parse_errors_do_not_repeat_the_password(url) -> None:
    with pytest.raises(UsageError) as caught:
        BrokerAddress.parse(url)
    assert SECRET not in str(caught.value)
    assert "admin:***@" in str(caught.value)


def test_the_link_shows_the_url_without_its_password(caplog) -> None:
    port = free_port()
    link = MqttLink(f"mqtt://admin:{SECRET}@127.0.0.1:{port}", "x")
    assert link.password == SECRET  # still used to connect
    with caplog.at_level(logging.DEBUG), pytest.raises(TransportError) as caught:
        link.connect(timeout=0.5)
    link.close()
    text = f"{caught.value}\n{caplog.text}"
    assert f"cannot reach broker mqtt://admin:***@127.0.0.1:{port}" in text
    assert SECRET not in text


def test_agent_run_keeps_the_password_out_of_its_output(
    data_dir, tmp_path_factory, tmp_path: Path, capsys, caplog
) -> None:
    from edge_agent.cli import main
    from tests.test_agent_fixtures import tiny

    tm = tiny(data_dir, tmp_path_factory)
    port = free_port()
    summary = tmp_path / "summary.json"
    with caplog.at_level(logging.DEBUG):
        rc = main([
            "run", "--artifact", str(tm.artifact), "--source", f"zeek:{tm.conn_log}",
            "--broker", f"mqtt://admin:{SECRET}@127.0.0.1:{port}",
            "--site", "s1", "--gateway", "g1", "--outbox", str(tmp_path / "o.db"),
            "--connect-timeout", "1", "--drain-timeout", "1", "--alerts", "",
            "--summary-json", str(summary),
        ])
    out, err = capsys.readouterr()
    assert rc == EXIT_UNAVAILABLE, err
    text = "\n".join([out, err, caplog.text, summary.read_text()])
    assert "cannot reach broker" in caplog.text
    assert f"the broker mqtt://admin:***@127.0.0.1:{port} did not answer" in err
    assert f"admin:***@127.0.0.1:{port}" in caplog.text
    assert SECRET not in text


def test_teacher_serve_keeps_the_password_out_of_its_output(
    tmp_path: Path, monkeypatch, capsys, caplog
) -> None:
    """The real re-scorer (a stand-in teacher) against a port where nothing
    listens: exit 6, and neither the error nor the log holds the password."""
    import teacher.checkpoint
    import teacher.serve
    from teacher.cli import main
    from tests.conftest import FixedTeacher

    monkeypatch.setattr(
        teacher.checkpoint, "load_teacher", lambda path, **kw: FixedTeacher()
    )
    monkeypatch.setattr(teacher.serve, "_set_threads", lambda *a: None)
    port = free_port()
    with caplog.at_level(logging.DEBUG):
        rc = main([
            "serve", "--checkpoint", "ck", "--store", str(tmp_path / "a.sqlite"),
            "--broker", f"mqtt://admin:{SECRET}@127.0.0.1:{port}",
            "--client-id", "rescorer-test", "--connect-timeout", "1",
        ])
    out, err = capsys.readouterr()
    assert rc == EXIT_UNAVAILABLE, err
    text = "\n".join([out, err, caplog.text])
    assert f"cannot reach broker mqtt://admin:***@127.0.0.1:{port}" in err
    assert SECRET not in text


# Credentials given twice: in the URL and by flags. Found: the two were mixed (a
# --username with the URL's password) or one silently won.


def test_the_link_refuses_credentials_in_the_url_and_as_arguments() -> None:
    url = f"mqtt://admin:{SECRET}@127.0.0.1:1"
    with pytest.raises(UsageError) as caught:
        MqttLink(url, "x", username="bob")
    assert str(caught.value) == (
        "broker 'mqtt://admin:***@127.0.0.1:1' holds a user name and a password, "
        "and username is given too; give the credentials one way: in the URL or "
        "by the flags, not both"
    )
    # Either way alone is fine.
    assert MqttLink(url, "x").username == "admin"
    assert MqttLink("mqtt://127.0.0.1:1", "x", username="bob").username == "bob"


@pytest.mark.parametrize(
    ("url", "flags", "said"),
    [
        (f"mqtt://admin:{SECRET}@127.0.0.1:1", ["--username", "bob"],
         "holds a user name and a password, and --username is given too"),
        ("mqtt://admin@127.0.0.1:1", ["--password-file", "PW"],
         "holds a user name, and --password-file is given too"),
        (f"mqtt://admin:{SECRET}@127.0.0.1:1",
         ["--username", "bob", "--password-file", "PW"],
         "holds a user name and a password, and --username and --password-file "
         "are given too"),
    ],
)
def test_teacher_serve_refuses_credentials_given_twice(
    url, flags, said, tmp_path: Path, capsys
) -> None:
    """A usage error before the checkpoint is loaded, naming the URL (without its
    password) and the flags."""
    from teacher.cli import main

    pw = tmp_path / "pw"
    pw.write_text("other\n")
    flags = [str(pw) if f == "PW" else f for f in flags]
    rc = main(["serve", "--checkpoint", "no-such-ckpt", "--broker", url,
               "--store", str(tmp_path / "a.sqlite"), *flags])
    out, err = capsys.readouterr()
    assert rc == 2, err
    shown = redact_url(url)
    assert err == (f"error: broker {shown!r} {said}; give the credentials one way: "
                   "in the URL or by the flags, not both\n")
    assert SECRET not in out + err and "no-such-ckpt" not in err


def test_agent_run_refuses_credentials_given_twice(
    data_dir, tmp_path_factory, tmp_path: Path, capsys
) -> None:
    from edge_agent.cli import main
    from tests.test_agent_fixtures import tiny

    tm = tiny(data_dir, tmp_path_factory)
    pw = tmp_path / "pw"
    pw.write_text("other\n")
    rc = main([
        "run", "--artifact", str(tm.artifact), "--source", f"zeek:{tm.conn_log}",
        "--broker", f"mqtt://admin:{SECRET}@127.0.0.1:1", "--password-file",
        str(pw), "--site", "s1", "--gateway", "g1", "--outbox",
        str(tmp_path / "o.db"), "--alerts", "",
    ])
    out, err = capsys.readouterr()
    assert rc == 2, err
    assert (
        "error: broker 'mqtt://admin:***@127.0.0.1:1' holds a user name and a "
        "password, and --password-file is given too; give the credentials one way"
    ) in err
    assert SECRET not in out + err and "Traceback" not in err
    assert not (tmp_path / "o.db").exists()  # refused before anything started
