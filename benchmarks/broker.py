"""An embedded default broker on 127.0.0.1, for the demo and benchmarks.

The choice, in order:

1. **mosquitto**, when it is on the PATH: the reference broker (Debian's 2.0.11 in CI),
   MQTT v5 with shared subscriptions, so several re-scorers can split the load. It is
   started with a config written to a temporary folder (one listener on 127.0.0.1,
   anonymous, no persistence) and stopped by its process id.
2. **amqtt** (a maintained pure-Python broker, pinned in the ``train`` extra), run
   in-process on its own thread when mosquitto is absent. It speaks MQTT 3.1.1 only:
   no MQTT v5 and so no shared subscriptions. The agent and the re-scorer fall back to
   3.1.1 by themselves; run a single re-scorer against it.

Usage::

    with EmbeddedBroker() as broker:
        print(broker.url, broker.kind)   # mqtt://127.0.0.1:PORT  mosquitto | amqtt
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from flows.errors import TransportError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_listening(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class EmbeddedBroker:
    """A broker this process started; ``kind`` is ``mosquitto`` or ``amqtt``."""

    def __init__(self, kind: str | None = None, port: int | None = None) -> None:
        if kind is None:
            kind = "mosquitto" if shutil.which("mosquitto") else "amqtt"
        if kind not in ("mosquitto", "amqtt"):
            raise ValueError("kind must be mosquitto or amqtt")
        self.kind = kind
        self.port = port or free_port()
        self.shared_subscriptions = kind == "mosquitto"
        self._proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker = None

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT``."""
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> EmbeddedBroker:
        """Start it and wait until it listens (TransportError if it does not)."""
        if self.kind == "mosquitto":
            self._start_mosquitto()
        else:
            self._start_amqtt()
        if not _wait_listening(self.port, 10.0):
            self.stop()
            raise TransportError(f"{self.kind} did not listen on 127.0.0.1:{self.port}")
        return self

    def _start_mosquitto(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="gatewatch-broker-")
        folder = Path(self._tmp.name)
        conf = folder / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "log_dest stdout\n"
            "max_queued_messages 100000\n"
            "max_inflight_messages 1000\n"
        )
        log = open(folder / "mosquitto.log", "wb")  # noqa: SIM115 - lives with the proc
        self._proc = subprocess.Popen(
            ["mosquitto", "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
        )

    def _start_amqtt(self) -> None:
        from amqtt.broker import Broker

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {
                    "allow_anonymous": True
                },
            },
        }
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                self._broker = Broker(config, loop=loop)
                loop.run_until_complete(self._broker.start())
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._broker.shutdown())
            loop.close()

        self._thread = threading.Thread(target=serve, name="amqtt", daemon=True)
        self._thread.start()
        ready.wait(15)
        if failure:
            raise TransportError(f"amqtt did not start: {failure[0]}") from failure[0]

    def stop(self) -> None:
        """Stop the broker (by process id for mosquitto)."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(5)
            self._proc = None
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_broker(kind: str | None = None) -> EmbeddedBroker:
    """Start the default embedded broker (mosquitto when on PATH, else amqtt)."""
    return EmbeddedBroker(kind).start()
