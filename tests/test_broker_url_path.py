"""A broker URL with anything after HOST:PORT is refused, not half read.

``mqtt://host:1883/foo`` used to connect to host:1883 and drop ``/foo`` without a
word; the MQTT link has no use for a path (no WebSocket transport), a query or a
fragment, so the agent and the re-scorer now stop with a usage error naming it.
"""

from __future__ import annotations

import pytest

from edge_agent.mqtt import BrokerAddress
from flows.errors import EXIT_USAGE, UsageError
from tests.conftest import free_port


@pytest.mark.parametrize(
    ("url", "tail"),
    [
        ("mqtt://127.0.0.1:1883/foo", "/foo"),
        ("mqtt://127.0.0.1/foo/bar", "/foo/bar"),
        ("mqtts://broker.example:8883/mqtt", "/mqtt"),
        ("mqtt://admin:pw@127.0.0.1:1883//", "//"),
    ],
)
def test_a_path_query_or_fragment_is_a_usage_error_naming_it(url, tail) -> None:
    with pytest.raises(UsageError) as caught:
        BrokerAddress.parse(url)
    text = str(caught.value)
    assert f"has {tail!r} after HOST:PORT" in text
    assert "pw" not in text


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("mqtt://127.0.0.1:1883?clean=1", "a query"),
        ("mqtt://127.0.0.1:1883#x", "a fragment"),
    ],
)
def test_a_query_or_fragment_is_named_without_its_text(url, said) -> None:
    with pytest.raises(UsageError) as caught:
        BrokerAddress.parse(url)
    text = str(caught.value)
    assert f"has {said} after HOST:PORT (not shown)" in text
    assert "clean" not in text and "'#x'" not in text


@pytest.mark.parametrize(
    "url", ["mqtt://127.0.0.1:1883", "mqtt://127.0.0.1:1883/", "mqtts://h"]
)
def test_a_bare_host_and_port_still_parse(url) -> None:
    assert BrokerAddress.parse(url).host in ("127.0.0.1", "h")


def test_a_password_with_a_bare_slash_is_explained_not_shown() -> None:
    with pytest.raises(UsageError) as caught:
        BrokerAddress.parse("mqtt://admin:pq/secret@127.0.0.1:1883")
    text = str(caught.value)
    assert "must be written %2F, %3F or %23" in text
    assert "secret" not in text and "pq" not in text


def test_agent_run_refuses_a_broker_url_with_a_path(data_dir, tmp_path_factory,
                                                    tmp_path, capsys) -> None:
    from edge_agent.cli import main
    from tests.test_agent_fixtures import tiny

    tm = tiny(data_dir, tmp_path_factory)
    url = f"mqtt://127.0.0.1:{free_port()}/foo"
    rc = main([
        "run", "--artifact", str(tm.artifact), "--source", f"zeek:{tm.conn_log}",
        "--broker", url, "--site", "s1", "--gateway", "g1",
        "--outbox", str(tmp_path / "o.db"), "--alerts", "",
    ])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE, err
    assert f"error: broker {url!r} has '/foo' after HOST:PORT" in err
    assert not (tmp_path / "o.db").exists()  # refused before anything started


def test_teacher_serve_refuses_a_broker_url_with_a_path(capsys) -> None:
    from teacher.cli import main

    url = f"mqtt://127.0.0.1:{free_port()}/foo"
    rc = main(["serve", "--checkpoint", "no-such-ckpt", "--broker", url])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE, err
    assert f"broker {url!r} has '/foo' after HOST:PORT" in err
    assert "no-such-ckpt" not in err and "Traceback" not in err
