"""The retained model update, delivered again after every reconnect, is not
unpacked and verified again.

Found: each reconnect made the broker hand the agent its retained update, and the
agent checked the signature, decoded, unpacked and health-checked it all over
again, although it had installed (or refused) that very message. Now a message
whose sha256 is the last one handled is skipped (a DEBUG line), while another
message is still worked through; an update by reference that could not be fetched
is tried again.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import edge_agent.ota as ota  # noqa: E402
from edge_agent import signing  # noqa: E402
from edge_agent.ota import ModelUpdater, pack_update  # noqa: E402
from tests.test_ota_artifacts import flashed_slots, make_artifact  # noqa: E402

# The gateway the updates here are signed for, and the updater's own ids.
TARGET = {"site": "plant-3", "gateways": ["gw-17"]}
HERE = {"site": "plant-3", "gateway": "gw-17"}

LOGGER = "gatewatch.edge_agent"


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return signing.generate_keypair(tmp_path / "keys")


@pytest.fixture
def unpacked(monkeypatch) -> list[Path]:
    """The folders :func:`edge_agent.ota._unpack` was called for, in order."""
    calls: list[Path] = []
    real = ota._unpack

    def counting(archive, dest):
        calls.append(Path(dest))
        return real(archive, dest)

    monkeypatch.setattr(ota, "_unpack", counting)
    return calls


@pytest.fixture
def verified(monkeypatch) -> list[bytes]:
    """The signed statements :func:`edge_agent.signing.verify` checked."""
    calls: list[bytes] = []
    real = ota.signing.verify

    def counting(key, data, *args, **kwargs):
        calls.append(data)
        return real(key, data, *args, **kwargs)

    monkeypatch.setattr(ota.signing, "verify", counting)
    return calls


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    return make_artifact(tmp_path / "v1", version="v1", seed=1)


@pytest.fixture
def flashed(tmp_path: Path, keys, v1) -> ModelUpdater:
    """Slots whose slot A holds v1 as flash installs a bundle: recorded with the
    bundle's digest, so the retained update of v1 is only known for the running
    model once unpacked and its files compared (the costly case)."""
    slots = flashed_slots(tmp_path / "models", v1)
    return ModelUpdater(keys[1], slots.dir, tolerance=1e-5, **HERE)


def _package(tmp_path: Path, keys, version: str, seed: int, **kwargs):
    art = make_artifact(tmp_path / version, version=version, seed=seed)
    return pack_update(art, keys[0], **kwargs, **TARGET)


def test_the_same_message_again_is_not_unpacked_again(
    tmp_path, keys, v1, flashed, unpacked, verified, caplog
):
    running = pack_update(v1, keys[0], issued_at=2000.0, **TARGET).message
    first = flashed.handle(running)
    assert first.ok and not first.changed and first.reason == (
        "already running this model")
    assert (len(unpacked), len(verified)) == (1, 1)

    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        again = flashed.handle(running)

    assert (len(unpacked), len(verified)) == (1, 1)
    assert again.ok and again.repeated and not again.changed
    assert (again.version, again.slot, again.scorer) == ("v1", "A", None)
    said = [r for r in caplog.records if "came again" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.DEBUG
    assert "not verified or unpacked again" in said[0].getMessage()
    assert all(r.levelno == logging.DEBUG for r in caplog.records)

    # Another message is still worked through, and then is the one remembered.
    v2 = _package(tmp_path, keys, "v2", 2)
    second = flashed.handle(v2.message)
    assert second.ok and second.changed and second.version == "v2"
    assert (len(unpacked), len(verified)) == (2, 2)
    assert flashed.slots.active() == "B"
    assert flashed.handle(v2.message).repeated
    assert (len(unpacked), len(verified)) == (2, 2)
    # v1 is not the last one handled any more: worked through again, and now
    # refused as a downgrade of v2 (found from its signed statement alone).
    older = flashed.handle(running)
    assert not older.repeated and not older.ok and "downgrade" in older.reason
    assert len(verified) == 3


def test_a_refused_message_again_is_refused_without_unpacking(
    tmp_path, keys, flashed, unpacked
):
    """An update whose model fails the health check: refused once by the work,
    then by its remembered result, with the same reason."""
    art = make_artifact(tmp_path / "bad", version="bad", seed=4)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["probe"]["expected"] = [x + 0.5 for x in manifest["probe"]["expected"]]
    (art / "manifest.json").write_text(json.dumps(manifest))
    archive, version = ota.pack_artifact(art)
    message = ota.sign_archive(archive, version, keys[0], **TARGET).message

    first = flashed.handle(message)
    again = flashed.handle(message)

    assert not first.ok and "probe" in first.reason
    assert len(unpacked) == 1
    assert not again.ok and again.repeated and again.reason == first.reason
    assert flashed.slots.active() == "A"


def test_a_withdrawal_forgets_the_last_message(keys, v1, flashed, unpacked):
    running = pack_update(v1, keys[0], issued_at=2000.0, **TARGET).message
    assert flashed.handle(running).ok and len(unpacked) == 1
    assert flashed.handle(b"").withdrawn

    again = flashed.handle(running)

    assert again.ok and not again.repeated and len(unpacked) == 2


def test_an_update_that_could_not_be_fetched_is_tried_again(
    tmp_path, keys, flashed, unpacked
):
    served = tmp_path / "served" / "v2.tar.gz"
    served.parent.mkdir()
    v2 = _package(tmp_path, keys, "v2", 2, url=served.as_uri())

    missing = flashed.handle(v2.message)
    assert not missing.ok and "cannot fetch the update" in missing.reason

    served.write_bytes(v2.archive)
    fetched = flashed.handle(v2.message)

    assert fetched.ok and fetched.changed and not fetched.repeated
    assert len(unpacked) == 1


# --------------------------------------------------------- over a broker, reconnecting


@pytest.mark.broker
def test_a_reconnect_brings_the_retained_update_without_unpacking_it_again(
    tmp_path, keys, v1, flashed, unpacked, mosquitto
):
    """The gateway runs the v1 it was flashed with, and the retained update on
    its topic is v1's: each delivery of it used to be unpacked to compare files."""
    from edge_agent.agent import Agent
    from edge_agent.mqtt import MqttLink
    from edge_agent.outbox import Outbox
    from edge_agent.protocol import Channel
    from edge_agent.runtime import load_artifact

    updater = flashed
    agent = Agent(load_artifact(updater.slots.current_path), site="s1",
                  gateway="g1", outbox=Outbox(tmp_path / "o.db"))
    agent.link = MqttLink(mosquitto.url, "gatewatch-s1-g1", will=agent.will(),
                          reconnect_min=0.2, reconnect_max=1.0)
    handled: list[bool] = []  # each update handed to the updater: repeated?
    done = threading.Condition()
    real_handle = updater.handle

    def counting(payload):
        result = real_handle(payload)
        with done:
            handled.append(getattr(result, "repeated", False))
            done.notify_all()
        return result

    updater.handle = counting
    operator = MqttLink(mosquitto.url, "operator")

    def wait_for(n: int) -> None:
        with done:
            assert done.wait_for(lambda: len(handled) >= n, timeout=30), handled

    def publish_retained(payload: bytes) -> None:
        delivery = operator.publish(agent.topics[Channel.MODEL], payload, retain=True)
        assert delivery.wait(10)

    try:
        operator.connect(10)
        publish_retained(pack_update(v1, keys[0], issued_at=2000.0, **TARGET).message)
        agent.start(10)
        agent.enable_model_updates(updater)
        wait_for(1)
        assert handled == [False] and len(unpacked) == 1
        assert updater.slots.active() == "A"

        # Cut the connection under the agent: it reconnects, subscribes again
        # and the broker hands it the retained update again.
        generation = agent.link.generation
        agent.link._client.socket().shutdown(socket.SHUT_RDWR)
        wait_for(2)
        assert agent.link.generation > generation
        assert len(unpacked) == 1 and handled == [False, True]

        # A different retained update is worked through.
        v2 = _package(tmp_path, keys, "v2", 2)
        publish_retained(v2.message)
        wait_for(3)
        assert handled == [False, True, False] and len(unpacked) == 2
        deadline = time.monotonic() + 10
        while agent.model_version != "v2" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agent.model_version == "v2" and updater.slots.active() == "B"
    finally:
        agent.close()
        operator.close()
