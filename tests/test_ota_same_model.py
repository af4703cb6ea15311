"""Model updates a gateway should shrug off: JSON nested too deep to parse, and
an update of the very model it already runs.

The first is a refusal like any other malformed update (a warning, no traceback);
the second is no refusal at all: an INFO line, and nothing installed or swapped.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from edge_agent import signing  # noqa: E402
from edge_agent.agent import Agent  # noqa: E402
from edge_agent.ota import ModelUpdater, _parse_message, pack_update  # noqa: E402
from edge_agent.outbox import Outbox  # noqa: E402
from edge_agent.runtime import load_artifact  # noqa: E402
from flows.errors import BadInputError  # noqa: E402
from tests.test_ota_artifacts import flashed_slots, make_artifact  # noqa: E402

# The gateway the updates here are signed for, and the updater's own ids.
TARGET = {"site": "plant-3", "gateways": ["gw-17"]}
HERE = {"site": "plant-3", "gateway": "gw-17"}

DEEP = 100_000
LOGGER = "gatewatch.edge_agent"


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return signing.generate_keypair(tmp_path / "keys")


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    return make_artifact(tmp_path / "v1", version="v1", seed=1)


def _flashed(tmp_path: Path, artifact: Path, keys, issued_at: float) -> ModelUpdater:
    """Slots whose slot A holds ``artifact`` the way flash records a bundle: the
    bundle's digest (not an update archive's sha256) and its build time."""
    slots = flashed_slots(tmp_path / "models", artifact, issued_at)
    return ModelUpdater(keys[1], slots.dir, tolerance=1e-5, **HERE)


def _unchanged(up: ModelUpdater) -> None:
    assert up.slots.active() == "A"
    assert up.slots.info("B") == {}
    assert not up.slots.path("B").exists()


# ------------------------------------------------------------ nested too deeply


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * DEEP,
        b"[" * DEEP + b"]" * DEEP,
        b'{"schema": "x", "kind": ' + b"[" * DEEP,
        b'{"a": ' * DEEP + b"1" + b"}" * DEEP,
    ],
)
def test_json_nested_too_deep_is_malformed(payload) -> None:
    with pytest.raises(BadInputError) as caught:
        _parse_message(payload)
    assert str(caught.value).startswith("model update is not JSON: RecursionError: ")
    assert len(str(caught.value)) <= 200


def _nested_statement(keys) -> bytes:
    """A well-formed message whose (unsigned) statement is nested too deep."""
    message = json.loads(
        pack_update(make_artifact(Path(keys[0]).parent / "v9", version="v9"),
                    keys[0], **TARGET).message
    )
    message["statement"] = base64.b64encode(b"[" * DEEP).decode()
    return json.dumps(message).encode()


@pytest.mark.parametrize("make", ["message", "statement"])
def test_a_nesting_bomb_is_refused_without_a_traceback(
    make, tmp_path, keys, v1, caplog
) -> None:
    up = _flashed(tmp_path, v1, keys, issued_at=2000.0)
    payload = b"[" * DEEP if make == "message" else _nested_statement(keys)
    agent = Agent(load_artifact(up.slots.current_path), site="s1", gateway="g1",
                  outbox=Outbox(tmp_path / "o.db"))
    agent.enable_model_updates(up)
    try:
        with caplog.at_level(logging.DEBUG, logger=LOGGER):
            result = up.handle(payload)
            agent._model_message(payload)
    finally:
        agent.close()

    assert not result.ok and not result.reason.startswith("internal error")
    if make == "message":
        assert result.reason.startswith("model update is not JSON: RecursionError")
    refusals = [r for r in caplog.records if "model update" in r.getMessage()]
    assert refusals and all(r.levelno <= logging.WARNING for r in refusals)
    assert not any(r.exc_info for r in caplog.records)
    assert "unexpectedly" not in caplog.text and "Traceback" not in caplog.text
    assert agent.model_version == "v1"
    _unchanged(up)


# ------------------------------------------------------- the model already running


def test_the_update_of_a_flashed_model_is_already_running(
    tmp_path, keys, v1, caplog
) -> None:
    """Found: a gateway flashed with v1 (the bundle built after the update was
    signed) read the retained update of v1 as "issued before the running model
    v1; refusing a downgrade"."""
    up = _flashed(tmp_path, v1, keys, issued_at=2000.0)
    package = pack_update(v1, keys[0], issued_at=1000.0, **TARGET)

    with caplog.at_level(logging.INFO, logger=LOGGER):
        result = up.handle(package.message)

    assert result.ok and not result.changed, result.reason
    assert (result.version, result.slot) == ("v1", "A")
    assert "model v1 is already running (slot A); nothing to do" in caplog.text
    assert "downgrade" not in caplog.text and "refus" not in caplog.text
    assert all(r.levelno == logging.INFO for r in caplog.records)
    _unchanged(up)


def test_the_same_model_packed_again_is_not_installed_again(
    tmp_path, keys, v1, caplog
) -> None:
    """Packed twice, the same folder gives two archives (tar times differ): the
    later one installs nothing, and keeps a calibration made on the gateway."""
    up = _flashed(tmp_path, v1, keys, issued_at=2000.0)
    site = up.slots.path("A") / "site_thresholds.json"
    site.write_text('{"escalate_low": 0.3, "alert": 0.8, "model_version": "v1"}')
    package = pack_update(v1, keys[0], issued_at=3000.0, **TARGET)
    assert package.sha256 != up.slots.info("A")["sha256"]

    with caplog.at_level(logging.INFO, logger=LOGGER):
        result = up.handle(package.message)

    assert result.ok and not result.changed, result.reason
    assert "already running" in caplog.text
    _unchanged(up)
    assert site.is_file()


def test_an_older_build_under_the_running_version_is_still_a_downgrade(
    tmp_path, keys, v1
) -> None:
    up = _flashed(tmp_path, v1, keys, issued_at=2000.0)
    other = make_artifact(tmp_path / "v1-other", version="v1", seed=2)

    result = up.handle(pack_update(other, keys[0], issued_at=1000.0, **TARGET).message)

    assert not result.ok
    assert "issued before the running model v1 and holds other files" in result.reason
    assert "refusing a downgrade" in result.reason
    _unchanged(up)


def test_the_agent_keeps_its_model_and_windows_for_the_running_update(
    tmp_path, keys, v1, caplog
) -> None:
    """The retained update comes again after every reconnect: the agent neither
    swaps the model (which would empty its host windows) nor says it updated."""
    up = _flashed(tmp_path, v1, keys, issued_at=2000.0)
    agent = Agent(load_artifact(up.slots.current_path), site="s1", gateway="g1",
                  outbox=Outbox(tmp_path / "o.db"))
    swaps = []
    agent.swap_scorer = swaps.append
    agent.enable_model_updates(up)
    try:
        with caplog.at_level(logging.DEBUG, logger=LOGGER):
            agent._model_message(pack_update(
                v1, keys[0], issued_at=1000.0,
                **TARGET,
            ).message)
    finally:
        agent.close()

    assert swaps == []
    assert "already running" in caplog.text
    assert "model updated" not in caplog.text and "refus" not in caplog.text
    _unchanged(up)
