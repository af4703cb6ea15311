"""Test helpers for the locked-down broker: run it on 127.0.0.1, connect clients to it.

:class:`SecureBroker` writes a deployment with :mod:`edge_agent.broker_config` and
starts mosquitto on it; :class:`Probe` is a paho-mqtt 2.x (VERSION2, MQTT v5) client
that records what happens to it (connects, disconnects, SUBACKs, PUBACKs, messages) so
tests can count and wait with a timeout instead of sleeping blindly.
"""

from __future__ import annotations

import grp
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edge_agent.broker_config import BrokerFiles, Deployment, write_broker_config
from tests.conftest import free_port

HOST = "127.0.0.1"


def need_mosquitto() -> None:
    """Skip the calling test where mosquitto or mosquitto_passwd is missing."""
    for tool in ("mosquitto", "mosquitto_passwd"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not on PATH (apt-get install mosquitto)")


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll ``predicate`` every 20 ms until it holds or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def _broker_group() -> str | None:
    """The group mosquitto drops to when started as root, so it can read its files."""
    if os.geteuid() != 0:
        return None
    try:
        grp.getgrnam("mosquitto")
    except KeyError:
        return None
    return "mosquitto"


class SecureBroker:
    """mosquitto on 127.0.0.1 running the configuration broker_config writes.

    ``edit`` may rewrite the generated ``mosquitto.conf`` text before the start (to
    compare another setting). The files live in a fresh folder under the system temp
    directory, not pytest's: mosquitto started as root reads them as its own user,
    and pytest's folders are closed to other users.
    """

    def __init__(
        self, dep: Deployment, edit: Callable[[str], str] | None = None
    ) -> None:
        port = free_port()
        service_port = free_port()
        while service_port == port:
            service_port = free_port()
        self.dep = replace(
            dep, port=port, service_port=service_port, bind_address=HOST
        )
        self.edit = edit
        self.workdir: Path | None = None
        self.files: BrokerFiles | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def port(self) -> int:
        """The TCP port of the gateways' TLS listener."""
        return self.dep.port

    @property
    def service_port(self) -> int:
        """The TCP port of the re-scorer's and operator's TLS listener."""
        return self.dep.service_port

    def port_of(self, user: str | None) -> int:
        """The listener ``user`` logs in on (anonymous: the gateways')."""
        return self.dep.port if user is None else self.dep.port_of(user)

    @property
    def ca(self) -> Path:
        """The deployment's CA certificate, as handed to clients."""
        assert self.files is not None
        return self.files.ca_cert

    def password(self, user: str) -> str:
        """The password the deployment gave ``user``."""
        assert self.files is not None
        return self.files.passwords[user]

    def start(self) -> SecureBroker:
        """Write the deployment, start mosquitto and wait until it listens."""
        need_mosquitto()
        self.workdir = Path(tempfile.mkdtemp(prefix="gatewatch-secure-broker-"))
        os.chmod(self.workdir, 0o711)
        self.files = write_broker_config(
            self.dep, self.workdir / "deploy", group=_broker_group()
        )
        os.chmod(self.files.root, 0o711)
        if self.edit is not None:
            self.files.conf.write_text(self.edit(self.files.conf.read_text()))
        return self._run()

    def restart(self) -> SecureBroker:
        """Stop mosquitto and start it again on the same files and ports."""
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(5)
        return self._run()

    def reload(self) -> None:
        """Send mosquitto SIGHUP: it re-reads its password, ACL and CRL files."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def _run(self) -> SecureBroker:
        assert self.files is not None and self.workdir is not None
        log = open(self.workdir / "mosquitto.log", "ab")
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.files.conf)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log_text()[-2000:]}")
            try:
                for port in (self.port, self.service_port):
                    with socket.create_connection((HOST, port), timeout=0.2):
                        pass
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on port {self.port}")

    def log_text(self) -> str:
        """What mosquitto logged so far."""
        assert self.workdir is not None
        return (self.workdir / "mosquitto.log").read_text(errors="replace")

    def stop(self) -> None:
        """Stop mosquitto (by its pid) and remove the folder."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


class Probe:
    """A paho VERSION2 MQTT v5 client over TLS that records its events.

    ``password`` defaults to the user's deployment password, ``ca`` to the
    deployment's CA; ``username=None`` connects anonymously. ``port`` defaults to
    the listener of the user (gateways, or re-scorer and operator).
    """

    def __init__(
        self,
        broker: SecureBroker,
        username: str | None,
        *,
        password: str | None = None,
        client_id: str | None = None,
        ca: Path | None = None,
        certfile: Path | None = None,
        keyfile: Path | None = None,
        reconnect_delay: float = 0.2,
        port: int | None = None,
    ) -> None:
        self.broker = broker
        self.port = port if port is not None else broker.port_of(username)
        self.client_id = client_id or f"{username or 'anon'}-{secrets.token_hex(3)}"
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5,
        )
        ctx = ssl.create_default_context(cafile=str(ca or broker.ca))
        if certfile is not None:
            ctx.load_cert_chain(str(certfile), str(keyfile))
        self.client.tls_set_context(ctx)
        if username is not None:
            pw = password if password is not None else broker.password(username)
            self.client.username_pw_set(username, pw)
        self.client.reconnect_delay_set(reconnect_delay, max(1.0, reconnect_delay))
        self.client.connect_timeout = 5.0

        self.lock = threading.Lock()
        self.connects: list[str] = []
        self.connect_fails = 0
        self.disconnects: list[str] = []
        self.connack_properties = None
        self.messages: list[tuple[str, bytes]] = []
        self.subacks: dict[int, list[str]] = {}
        self.pubacks: dict[int, str] = {}
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish

    # paho callbacks, on its network thread
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        with self.lock:
            self.connects.append(str(reason_code))
            self.connack_properties = properties

    def _on_connect_fail(self, client, userdata) -> None:
        with self.lock:
            self.connect_fails += 1

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self.lock:
            self.disconnects.append(str(reason_code))

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self.lock:
            self.subacks[mid] = [str(rc) for rc in reason_codes]

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self.lock:
            self.pubacks[mid] = str(reason_code)

    # operations
    def start(self, timeout: float = 5.0) -> Probe:
        """Connect (raises at once on a TLS or socket error) and run the loop."""
        self.client.connect(HOST, self.port, keepalive=30)
        self.client.loop_start()
        if not wait_until(lambda: bool(self.connects), timeout):
            raise AssertionError(f"{self.client_id}: no CONNACK in {timeout} s")
        return self

    def start_async(self) -> Probe:
        """Connect in the background, as a long-running agent would; no waiting."""
        self.client.connect_async(HOST, self.port, keepalive=30)
        self.client.loop_start()
        return self

    @property
    def connected(self) -> bool:
        """Whether paho considers the session up."""
        return self.client.is_connected()

    def subscribe(self, topic_filter: str, qos: int = 1) -> list[str]:
        """Subscribe and return the SUBACK reason codes (waits up to 5 s)."""
        rc, mid = self.client.subscribe(topic_filter, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS, rc
        assert wait_until(lambda: mid in self.subacks, 5), "no SUBACK"
        return self.subacks[mid]

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False):
        """Publish and, for QoS 1, return the PUBACK reason (waits up to 5 s)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos == 0:
            return None
        assert wait_until(lambda: info.mid in self.pubacks, 5), "no PUBACK"
        return self.pubacks[info.mid]

    def received(self, topic: str | None = None) -> list[bytes]:
        """Payloads received so far, on ``topic`` or on any."""
        with self.lock:
            return [p for t, p in self.messages if topic is None or t == topic]

    def stop(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()
