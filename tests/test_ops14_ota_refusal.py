"""A refused model update stays reported while it stays retained.

Found: the status carried ``update_refused`` only in the message published at the
refusal (and on a reconnect); the next periodic status, one interval later, had
lost it. The updater now keeps the refusal in force (why, when, which model version
and message) in :attr:`ModelUpdater.last_refusal` until an update is installed or
the retained one is withdrawn, for the agent to put in every status.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from edge_agent import signing  # noqa: E402
from edge_agent.ota import ModelUpdater, pack_update  # noqa: E402
from tests.test_ota_artifacts import flashed_slots, make_artifact  # noqa: E402

# The gateway the updates here are signed for, and the updater's own ids.
TARGET = {"site": "plant-3", "gateways": ["gw-17"]}
HERE = {"site": "plant-3", "gateway": "gw-17"}


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return signing.generate_keypair(tmp_path / "keys")


@pytest.fixture
def updater(tmp_path: Path, keys) -> ModelUpdater:
    """Slots whose active slot A holds v1, trusting ``keys``."""
    v1 = make_artifact(tmp_path / "v1", version="v1", seed=1)
    slots = flashed_slots(tmp_path / "models", v1)
    return ModelUpdater(keys[1], slots.dir, tolerance=1e-5, **HERE)


def test_a_wrong_key_refusal_holds_until_withdrawn(tmp_path, updater) -> None:
    other = signing.generate_keypair(tmp_path / "other")
    v2 = make_artifact(tmp_path / "v2", version="v2", seed=2)
    message = pack_update(v2, other[0], **TARGET).message
    assert updater.last_refusal == {}

    before = time.time()
    first = updater.handle(message)
    refusal = updater.last_refusal

    assert not first.ok
    assert refusal["update_refused"] == first.reason
    assert before <= refusal["update_refused_at"] <= time.time()
    assert refusal["update_refused_model_version"] == "v2"
    assert refusal["update_refused_sha256"] == hashlib.sha256(message).hexdigest()
    # The retained update again (a reconnect), and any status after: unchanged.
    assert updater.handle(message).repeated
    assert updater.last_refusal == refusal
    assert updater.last_refusal == refusal

    assert updater.handle(b"").withdrawn
    assert updater.last_refusal == {}


def test_a_message_that_is_not_json_is_reported_too(updater) -> None:
    updater.handle(b"not json at all")

    refusal = updater.last_refusal
    assert refusal["update_refused"]
    assert refusal["update_refused_model_version"] is None
    assert refusal["update_refused_sha256"] == hashlib.sha256(
        b"not json at all"
    ).hexdigest()


def test_an_installed_update_clears_the_refusal(tmp_path, keys, updater) -> None:
    updater.handle(b"{\"kind\": \"model_update\"}")
    assert updater.last_refusal["update_refused"]

    v2 = make_artifact(tmp_path / "v2", version="v2", seed=2)
    result = updater.handle(pack_update(v2, keys[0], **TARGET).message)

    assert result.ok and result.changed
    assert updater.last_refusal == {}


@pytest.fixture(scope="module")
def tm(data_dir, tmp_path_factory):
    from tests.test_agent_fixtures import tiny

    return tiny(data_dir, tmp_path_factory)


def test_every_status_of_the_agent_carries_the_refusal(tmp_path, updater, tm) -> None:
    """The agent's periodic status (``status_payload``) names the refusal while
    the refused update stays retained, not only the status sent right after it."""
    import io

    from edge_agent.agent import Agent
    from edge_agent.outbox import Outbox
    from edge_agent.runtime import load_artifact

    other = signing.generate_keypair(tmp_path / "other")
    message = pack_update(make_artifact(tmp_path / "v2", version="v2", seed=2),
                          other[0], **TARGET).message
    agent = Agent(load_artifact(tm.artifact), site="s1", gateway="g1",
                  outbox=Outbox(tmp_path / "o.sqlite"), alerts=io.StringIO())
    agent.enable_model_updates(updater)
    updater.handle(message)

    for _ in range(3):  # later statuses too
        status = agent.status_payload("online")
        assert status["update_refused"] == updater.last_refusal["update_refused"]
        assert status["update_refused_model_version"] == "v2"

    updater.handle(b"")  # withdrawn: no longer reported
    assert "update_refused" not in agent.status_payload("online")
    agent.outbox.close()
