"""Config-value errors never print a broker password or a URL's query.

A broker URL put in a list, or under a setting that wants a number, was echoed in
full by the type check; a URL with ``?password=...`` was refused with its query
shown. Now any string shown goes through ``redact_url`` and a query or fragment is
only said to be there.
"""

from __future__ import annotations

import pytest

from edge_agent.config import AgentConfig
from edge_agent.mqtt import BrokerAddress, redact_value
from edge_agent.protocol import validate_id
from flows.errors import EXIT_USAGE, UsageError

URL = "mqtt://bob:secret@127.0.0.1:18883"


@pytest.mark.parametrize(
    "line",
    [
        f'broker = ["{URL}"]',
        f'max_batch = "{URL}"',
        f'follow = ["x", ["{URL}"]]',
        f'max_wait_ms = {{ u = "{URL}" }}',
    ],
)
def test_a_mistyped_value_is_shown_without_its_password(tmp_path, line) -> None:
    config = tmp_path / "c.toml"
    config.write_text(line + "\n")
    with pytest.raises(UsageError) as caught:
        AgentConfig.load(config, {})
    text = str(caught.value)
    assert "secret" not in text
    assert "bob:***@127.0.0.1:18883" in text


def test_agent_run_prints_no_password_for_a_list_broker(tmp_path, capsys) -> None:
    from edge_agent.cli import main

    config = tmp_path / "c.toml"
    config.write_text(f'broker = ["{URL}"]\n')
    rc = main(["run", "--config", str(config)])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE, err
    assert "broker must be a string" in err and "secret" not in err


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("mqtt://127.0.0.1:18883?password=qsecret", "a query"),
        ("mqtt://127.0.0.1:18883/#qsecret", "a fragment"),
        ("mqtt://u:pw@127.0.0.1:18883?x=qsecret#qsecret", "a query and a fragment"),
    ],
)
def test_a_query_or_fragment_is_named_not_shown(url, said) -> None:
    with pytest.raises(UsageError) as caught:
        BrokerAddress.parse(url)
    text = str(caught.value)
    assert f"has {said} after HOST:PORT" in text
    assert "qsecret" not in text and "pw" not in text


def test_a_site_holding_a_url_is_shown_redacted() -> None:
    with pytest.raises(UsageError) as caught:
        validate_id("mqtt://bob:secret@h", "site")
    assert "secret" not in str(caught.value)


def test_redact_value_cuts_the_query_of_any_string() -> None:
    shown = redact_value({"a": ("mqtt://h:1?password=qsecret", 3)})
    assert "qsecret" not in shown and "mqtt://h:1" in shown
