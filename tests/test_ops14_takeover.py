"""A client-id takeover is named as one, not logged as a lost broker.

An MQTT v5 broker that closes a session because another client connected with
the same client id says so (DISCONNECT, reason 0x8E "Session taken over"); the
agent's link names the takeover and what causes it. A fake broker on 127.0.0.1
sends exactly that (mosquitto 2.0.11 sends no DISCONNECT for a takeover).
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from edge_agent.mqtt import MqttLink

# CONNACK v5: session not present, success, no properties.
CONNACK_V5 = bytes([0x20, 0x03, 0x00, 0x00, 0x00])


def _disconnect(reason: int) -> bytes:
    """A v5 DISCONNECT packet with ``reason`` and no properties."""
    return bytes([0xE0, 0x02, reason, 0x00])


class OneShotBroker:
    """Accepts one client on 127.0.0.1, answers its CONNECT, sends ``farewell``
    and closes; later connections are closed at once (bounded: 10 s)."""

    def __init__(self, farewell: bytes) -> None:
        self.farewell = farewell
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.1)
        self.stop = threading.Event()
        self.port = self.server.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        deadline = time.monotonic() + 10
        first = True
        while time.monotonic() < deadline and not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                if not first:
                    continue
                first = False
                conn.settimeout(5)
                conn.recv(4096)  # the CONNECT
                conn.sendall(CONNACK_V5)
                time.sleep(0.3)
                conn.sendall(self.farewell)
                time.sleep(0.2)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.server.close()


def _log_after_loss(farewell: bytes, caplog) -> str:
    """What the link logs when the broker ends its session with ``farewell``."""
    broker = OneShotBroker(farewell)
    link = MqttLink(
        f"mqtt://127.0.0.1:{broker.port}",
        "gatewatch-plant-3-gw-17",
        protocol="5",
        reconnect_min=1,
        reconnect_max=1,
    )
    with caplog.at_level(logging.WARNING, logger="gatewatch.edge_agent"):
        try:
            link.connect(timeout=5)
            deadline = time.monotonic() + 5
            while link.connected and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.1)
        finally:
            link.close()
            broker.close()
    return caplog.text


def test_a_session_taken_over_names_the_client_id(caplog) -> None:
    text = _log_after_loss(_disconnect(0x8E), caplog)

    assert (
        "closed this session: another client connected with the client id "
        "gatewatch-plant-3-gw-17 (a second agent with the same --site/--gateway "
        "on another host, or in a unit with PrivateTmp=)"
    ) in text
    assert "lost broker" not in text


def test_another_reason_from_the_broker_is_given(caplog) -> None:
    text = _log_after_loss(_disconnect(0x8B), caplog)  # Server shutting down

    assert "it closed this session: Server shutting down (139)" in text
    assert "another client" not in text


def test_a_closed_socket_is_still_a_lost_broker(caplog) -> None:
    text = _log_after_loss(b"", caplog)

    assert "lost broker mqtt://127.0.0.1:" in text
    assert "another client" not in text
