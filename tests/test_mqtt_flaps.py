"""A run of quickly lost connections is named once as a likely client-id clash.

Found by a fresh tester: two agents with the same --site/--gateway on two hosts
(each lock file on its own host) knocked each other off mosquitto every 1.5 s,
each logging "lost broker ... (Unspecified error); reconnecting" every time, with
no word of the clash (mosquitto sends no reason). The callbacks are driven here
by hand, with a clock of the test's own.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from edge_agent import mqtt
from edge_agent.mqtt import MqttLink


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def link(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(mqtt.time, "monotonic", clock)
    link = MqttLink("mqtt://127.0.0.1:1883", "gatewatch-s1-g1")
    link.clock = clock
    return link


def _connect(link: MqttLink) -> None:
    link._handle_connect(link._client, None, SimpleNamespace(session_present=True),
                         0, None)


def _lose(link: MqttLink, after: float) -> None:
    link.clock.now += after
    link._handle_disconnect(link._client, None, SimpleNamespace(), 128, None)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_quick_losses_are_named_once_then_counted(link, caplog):
    with caplog.at_level(logging.DEBUG, logger="gatewatch.edge_agent"):
        for _ in range(11):  # the tester's 11 losses in 8 s
            _connect(link)
            _lose(link, 0.7)
            link.clock.now += 0.8  # paho's reconnect delay

    warned = _warnings(caplog)
    lost = [w for w in warned if w.startswith("lost broker")]
    clash = [w for w in warned if "another client is likely using" in w]
    assert len(lost) == 2 and len(clash) == 1
    assert "the client id gatewatch-s1-g1" in clash[0]
    assert "ended 3 times in 3 s, each within 10 s of being made" in clash[0]
    assert link.flapping and link.losses_unlogged == 9


def test_a_connection_that_holds_ends_the_quiet_and_slow_losses_stay_logged(
    link, caplog
):
    with caplog.at_level(logging.WARNING, logger="gatewatch.edge_agent"):
        for _ in range(4):
            _connect(link)
            _lose(link, 1.0)
        assert link.flapping
        _connect(link)
        _lose(link, mqtt.FLAP_WINDOW_S + 1)  # held two minutes: logged again
        for _ in range(2):  # a broker restarting now and then, not a clash
            _connect(link)
            _lose(link, 30.0)

    warned = _warnings(caplog)
    assert not link.flapping
    assert sum(w.startswith("lost broker") for w in warned) == 2 + 1 + 2
    assert sum("another client is likely using" in w for w in warned) == 1
