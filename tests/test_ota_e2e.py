"""End to end: flash a gateway root, run its agent against mosquitto, update over MQTT.

The installed agent runs from the flashed root's own venv (no torch, no tensorflow),
reads flows as JSON lines on stdin and escalates every one of them (thresholds
``escalate_low = 0``), so each escalation shows which model scored it and with what
score; the test recomputes that score with numpy from the window the agent sent.
It pushes a signed model (the status topic reports the new version, the escalations
carry the new scores), then a tampered one (refused, reported, the old model still
scoring).

The ``netns`` variant runs mosquitto in one network namespace and the gateway in
another, joined by a veth pair; it needs root and ``ip netns`` and skips otherwise.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import random
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
mqtt = pytest.importorskip("paho.mqtt.client")

from edge_agent import bundle, signing  # noqa: E402
from edge_agent.flash import GatewayLayout, flash  # noqa: E402
from edge_agent.ota import pack_update  # noqa: E402
from tests.test_flash import all_wheels, gateway_config  # noqa: E402
from tests.test_ota_artifacts import (  # noqa: E402
    conn_records,
    fit_conn_encoder,
    make_artifact,
    numpy_scores,
)

# The gateway the updates here are signed for, and the updater's own ids.
TARGET = {"site": "plant-3", "gateways": ["gw-17"]}
HERE = {"site": "plant-3", "gateway": "gw-17"}

SITE, GATEWAY = "plant-3", "gw-17"
TOPIC = f"gatewatch/v1/{SITE}/{GATEWAY}"
ALL_ESCALATE = {"decision": 0.5, "escalate_low": 0.0, "alert": 1.0}
CLONE_NEWNET = 0x40000000


# ------------------------------------------------------------------ network namespaces


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class NetnsPair:
    """Two network namespaces made by this test, joined by one veth pair."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.broker_ns, self.gateway_ns = f"gw7b{tag}", f"gw7g{tag}"
        self.veth_b, self.veth_g = f"vb{tag}", f"vg{tag}"
        octet = random.randint(1, 250)
        self.broker_ip, self.gateway_ip = f"10.201.{octet}.1", f"10.201.{octet}.2"

    def up(self) -> None:
        _ip("netns", "add", self.broker_ns)
        _ip("netns", "add", self.gateway_ns)
        _ip("link", "add", self.veth_b, "type", "veth", "peer", "name", self.veth_g)
        _ip("link", "set", self.veth_b, "netns", self.broker_ns)
        _ip("link", "set", self.veth_g, "netns", self.gateway_ns)
        for ns, dev, addr in (
            (self.broker_ns, self.veth_b, self.broker_ip),
            (self.gateway_ns, self.veth_g, self.gateway_ip),
        ):
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")

    def down(self) -> None:
        for ns in (self.broker_ns, self.gateway_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def in_netns(name: str, fn):
    """Run ``fn`` on a thread moved into network namespace ``name``.

    ``setns`` moves only the calling thread, and a socket stays in the namespace it
    was made in, so a client connected here keeps talking into that namespace.
    """
    box: dict = {}

    def target() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                box["error"] = OSError(ctypes.get_errno(), "setns failed")
                return
            box["value"] = fn()
        except Exception as exc:  # handed to the caller
            box["error"] = exc
        finally:
            os.close(fd)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def netns_unavailable() -> str | None:
    """Why the netns variant cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root for ip netns"
    if shutil.which("ip") is None:
        return "the ip command is absent"
    probe = f"gw7probe{uuid.uuid4().hex[:4]}"
    proc = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"ip netns add failed: {proc.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


# ------------------------------------------------------------------------ MQTT watcher


class Watcher:
    """A test client on the status and escalations topics that can also publish."""

    def __init__(self, host: str, port: int, netns: str | None = None) -> None:
        self.cond = threading.Condition()
        self.status: list[dict] = []
        self.escalations: list[dict] = []
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex[:8]}"
        )
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect

        def connect() -> None:
            self.client.connect(host, port, keepalive=30)

        in_netns(netns, connect) if netns else connect()
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        client.subscribe([(f"{TOPIC}/status", 1), (f"{TOPIC}/escalations", 1)])

    def _on_message(self, client, userdata, msg) -> None:
        body = json.loads(msg.payload)
        with self.cond:
            if msg.topic.endswith("/status"):
                self.status.append(body)
            else:
                self.escalations.append(body)
            self.cond.notify_all()

    def wait(self, pred, timeout: float = 60.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"timed out waiting for {what}; status {self.status[-3:]}"
                    )
                self.cond.wait(left)

    def publish_model(self, payload: bytes) -> None:
        info = self.client.publish(f"{TOPIC}/model", payload, qos=1, retain=True)
        info.wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# ------------------------------------------------------------------------------- test


def _start_broker_in(ns: NetnsPair, workdir: Path) -> subprocess.Popen:
    conf = workdir / "mosquitto-netns.conf"
    conf.write_text(
        f"listener 1883 {ns.broker_ip}\nallow_anonymous true\npersistence false\n"
        "log_dest stdout\n"
    )
    log = open(workdir / "mosquitto-netns.log", "ab")
    return subprocess.Popen(
        ["ip", "netns", "exec", ns.broker_ns, "mosquitto", "-c", str(conf)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


@pytest.mark.broker
@pytest.mark.parametrize(
    "where", ["loopback", pytest.param("netns", marks=pytest.mark.netns)]
)
def test_flashed_agent_takes_a_signed_update_and_refuses_a_tampered_one(
    where: str, tmp_path: Path, request
) -> None:
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not on PATH")
    ns = None
    broker_proc = None
    if where == "netns":
        reason = netns_unavailable()
        if reason:
            pytest.skip(f"network namespaces unavailable: {reason}")
        ns = NetnsPair()
        request.addfinalizer(ns.down)
        ns.up()
        broker_proc = _start_broker_in(ns, tmp_path)
        request.addfinalizer(broker_proc.terminate)
        host, port = ns.broker_ip, 1883
    else:
        broker = request.getfixturevalue("mosquitto")
        host, port = "127.0.0.1", broker.port

    # 1. A bundle whose config names this broker, flashed into a temporary root.
    wheels = all_wheels(tmp_path)
    private, public = signing.generate_keypair(tmp_path / "keys")
    root = tmp_path / "root"
    root.mkdir()
    config = tmp_path / "gateway.toml"
    config.write_text(
        gateway_config(root, broker=f"mqtt://{host}:{port}", alerts="")
        + "wait_verdicts = false\ndrain_timeout = 10.0\nmax_wait_ms = 5.0\n"
    )
    enc = fit_conn_encoder()

    def artifact(version: str, seed: int) -> Path:
        return make_artifact(
            tmp_path / version,
            version=version,
            seed=seed,
            encoder=enc,
            thresholds=ALL_ESCALATE,
        )

    v1 = tmp_path / "v1.tar.gz"
    bundle.build_bundle(artifact("v1", 1), config, private, v1, wheels=wheels)
    flash(v1, root, public)
    layout = GatewayLayout(root)
    venv_bin = layout.venv / "bin"
    proc = subprocess.run(
        [
            str(venv_bin / "python"),
            "-c",
            "import importlib.util as u; print(u.find_spec('torch'), "
            "u.find_spec('tensorflow'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.split() == ["None", "None"]

    # 2. Watch the gateway's topics, then start its agent from the flashed venv.
    for _ in range(50):
        try:
            watcher = Watcher(host, port, ns.broker_ns if ns else None)
            break
        except OSError:
            time.sleep(0.1)
    else:
        raise AssertionError("the broker never accepted a connection")
    request.addfinalizer(watcher.close)
    prefix = ["ip", "netns", "exec", ns.gateway_ns] if ns else []
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
    }
    agent = subprocess.Popen(
        prefix + [str(venv_bin / "edge-agent"), "run", "--config", str(layout.config)],
        stdin=subprocess.PIPE,
        stdout=open(tmp_path / "agent.out", "wb"),
        stderr=open(tmp_path / "agent.err", "wb"),
        env=env,
        text=True,
    )
    request.addfinalizer(lambda: agent.poll() is None and agent.kill())

    def latest_status() -> dict:
        return watcher.status[-1] if watcher.status else {}

    watcher.wait(
        lambda: (
            latest_status().get("model_version") == "v1"
            and latest_status().get("state") == "online"
        ),
        what="status online with v1",
    )

    def feed_and_check(seed: int, version: str, model_seed: int) -> None:
        records = conn_records(6, seed=seed)
        start = len(watcher.escalations)
        for rec in records:
            agent.stdin.write(json.dumps(rec) + "\n")
        agent.stdin.flush()
        watcher.wait(
            lambda: len(watcher.escalations) >= start + len(records),
            what=f"escalations scored by {version}",
        )
        for esc in watcher.escalations[start:]:
            assert esc["model_version"] == version
            window = np.asarray(esc["window"], dtype=np.float32)[None]
            expected = numpy_scores(window, model_seed)[0]
            assert esc["score"] == pytest.approx(expected, abs=1e-5)

    feed_and_check(seed=10, version="v1", model_seed=1)

    # 3. A signed update: the status reports v2 and the flows are scored by it.
    watcher.publish_model(pack_update(artifact("v2", 2), private, **TARGET).message)
    watcher.wait(
        lambda: latest_status().get("model_version") == "v2", what="status with v2"
    )
    assert os.readlink(layout.models / "current") == "B"
    feed_and_check(seed=11, version="v2", model_seed=2)

    # 4. A tampered update: refused and reported; v2 keeps scoring.
    message = json.loads(pack_update(artifact("v3", 3), private, **TARGET).message)
    archive = bytearray(base64.b64decode(message["payload"]))
    archive[len(archive) // 2] ^= 0x01
    message["payload"] = base64.b64encode(bytes(archive)).decode()
    watcher.publish_model(json.dumps(message).encode())
    watcher.wait(
        lambda: "sha256" in str(latest_status().get("update_refused", "")),
        what="status with the refusal",
    )
    assert latest_status()["model_version"] == "v2"
    assert os.readlink(layout.models / "current") == "B"
    feed_and_check(seed=12, version="v2", model_seed=2)

    # 5. End of input: the agent drains and exits cleanly, reporting offline.
    agent.stdin.close()
    assert agent.wait(60) == 0, (tmp_path / "agent.err").read_text()[-2000:]
    watcher.wait(
        lambda: latest_status().get("state") == "offline", what="status offline"
    )
