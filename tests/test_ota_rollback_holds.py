"""An operator's ``edge-agent rollback`` holds while the update it undid stays
retained on the model topic.

Found: after update B (retained) was applied, ``rollback`` made slot A active and
the running agent took it on SIGHUP; a reconnect did not reinstall B (the agent
remembered the message in memory), but an agent restart handled the retained B as
new and, B being issued after A, installed it again without a word. Now rollback
marks the model it left in ``slots.json``; an update of that model version (or that
very archive) is refused with the reason in the status and the log, a newer model's
update is still installed, and flashing the rolled-back model clears the mark.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from edge_agent import signing  # noqa: E402
from edge_agent.cli import main  # noqa: E402
from edge_agent.flash import GatewayLayout, ModelSlots  # noqa: E402
from edge_agent.ota import ModelUpdater, pack_update, sign_archive  # noqa: E402
from tests.test_ota_artifacts import flashed_slots, make_artifact  # noqa: E402

# The gateway the updates here are signed for, and the updater's own ids.
TARGET = {"site": "plant-3", "gateways": ["gw-17"]}
HERE = {"site": "plant-3", "gateway": "gw-17"}

LOGGER = "gatewatch.edge_agent"
HELD = "was rolled back by the operator"
ADVICE = "publish a newer update or flash to install it again"


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return signing.generate_keypair(tmp_path / "keys")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A gateway root whose slot A holds v1 as flash installs a bundle."""
    root = tmp_path / "root"
    v1 = make_artifact(tmp_path / "v1", version="v1", seed=1)
    flashed_slots(GatewayLayout(root).models, v1)
    return root


def _slots(root: Path) -> ModelSlots:
    return ModelSlots(GatewayLayout(root).models)


def _updater(root: Path, keys) -> ModelUpdater:
    """A fresh updater, as an agent (re)start makes one: it remembers nothing."""
    return ModelUpdater(keys[1], _slots(root).dir, tolerance=1e-5, **HERE)


def _package(tmp_path: Path, keys, version: str, seed: int, **kwargs):
    art = make_artifact(tmp_path / f"art-{version}", version=version, seed=seed)
    return pack_update(art, keys[0], **kwargs, **TARGET)


def test_a_rolled_back_update_is_refused_after_a_restart(
    tmp_path, keys, root, caplog, capsys
):
    slots = _slots(root)
    v2 = _package(tmp_path, keys, "v2", 2)
    installed = _updater(root, keys).handle(v2.message)
    assert installed.ok and installed.changed and slots.active() == "B"

    assert main(["rollback", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "slot A is active again (model v1)" in out
    assert "model updates of the model left are refused" in out
    assert slots.active() == "A"
    [mark] = slots.rolled_back()
    assert (mark["model_version"], mark["sha256"], mark["slot"]) == (
        "v2", v2.sha256, "B")
    assert abs(mark["rolled_back_at"] - time.time()) < 60

    # The agent starts again; the broker hands it the retained v2 as new.
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        again = _updater(root, keys).handle(v2.message)
    assert not again.ok and not again.repeated
    assert again.reason.startswith(f"model v2 {HELD} (edge-agent rollback at ")
    assert again.reason.endswith(f"; {ADVICE}")
    assert slots.active() == "A"
    assert any(HELD in r.getMessage() for r in caplog.records)

    # The same model version in another archive, and the very archive under
    # another name, are held back too.
    resigned = _package(tmp_path / "again", keys, "v2", 5)
    assert resigned.sha256 != v2.sha256
    refused = _updater(root, keys).handle(resigned.message)
    assert not refused.ok and f"model v2 {HELD}" in refused.reason
    renamed = sign_archive(v2.archive, "v2-hotfix", keys[0], **TARGET)
    refused = _updater(root, keys).handle(renamed.message)
    assert not refused.ok and f"model v2 {HELD}" in refused.reason
    assert "update v2-hotfix is its very archive" in refused.reason
    assert slots.active() == "A"

    # A newer model is installed as ever, into the slot v2 held.
    v3 = _package(tmp_path, keys, "v3", 3)
    newer = _updater(root, keys).handle(v3.message)
    assert newer.ok and newer.changed and newer.version == "v3"
    assert slots.active() == "B" and slots.info("B")["model_version"] == "v3"
    assert [m["model_version"] for m in slots.rolled_back()] == ["v2"]


def test_rolling_back_to_a_rolled_back_model_clears_its_mark(
    tmp_path, keys, root
):
    slots = _slots(root)
    v2 = _package(tmp_path, keys, "v2", 2)
    assert _updater(root, keys).handle(v2.message).ok
    assert main(["rollback", "--root", str(root)]) == 0
    assert [m["model_version"] for m in slots.rolled_back()] == ["v2"]

    # The operator goes back to v2 on purpose: v2 is no longer held back, v1 is.
    assert main(["rollback", "--root", str(root)]) == 0
    assert slots.active() == "B"
    assert [m["model_version"] for m in slots.rolled_back()] == ["v1"]
    running = _updater(root, keys).handle(v2.message)
    assert running.ok and running.reason == "already running this model"


def test_clearing_a_mark_as_flash_does_lets_the_update_in(tmp_path, keys, root):
    slots = _slots(root)
    v2 = _package(tmp_path, keys, "v2", 2)
    assert _updater(root, keys).handle(v2.message).ok
    assert main(["rollback", "--root", str(root)]) == 0
    assert not _updater(root, keys).handle(v2.message).ok

    assert slots.clear_rolled_back("v2") is True
    assert slots.clear_rolled_back("v2") is False
    assert slots.rolled_back() == []
    assert _updater(root, keys).handle(v2.message).ok
    assert slots.active() == "B"


def test_a_slot_record_without_marks_holds_nothing_back(tmp_path, keys, root):
    """slots.json as flash and updates wrote it before rollback marks existed."""
    slots = _slots(root)
    state = slots.dir / "slots.json"
    old = {"A": {"model_version": "v1", "sha256": "b" * 64, "issued_at": 1000.0,
                 "source": "bundle gw.tar.gz", "installed_at": 1001.0}, "B": None}
    state.write_text(json.dumps(old, indent=1))
    assert slots.state() == old and slots.rolled_back() == []
    assert slots.held_back("v1", "b" * 64) is None

    v2 = _package(tmp_path, keys, "v2", 2)
    assert _updater(root, keys).handle(v2.message).ok
    assert slots.active() == "B"
    assert "rolled_back" not in json.loads(state.read_text())


DAMAGED = {
    "not a list": ('{"v": "v2"}', "rolled_back is a JSON dict"),
    "an entry not an object": ('["v2"]', "rolled_back entry 1 is a JSON str"),
    "no model_version": (
        '[{"sha256": "ab"}]', "rolled_back entry 1 has model_version 'None'"),
    "sha256 a number": (
        '[{"model_version": "v2", "sha256": 5}]',
        "rolled_back entry 1 has sha256 '5', not a string"),
    "time a word": (
        '[{"model_version": "v2", "rolled_back_at": "now"}]',
        "rolled_back entry 1 has rolled_back_at 'now', not a time"),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_marks_are_a_damaged_install(case, tmp_path, keys, root, capsys):
    text, message = DAMAGED[case]
    slots = _slots(root)
    state = slots.dir / "slots.json"
    record = json.loads(state.read_text())
    state.write_text(json.dumps(record)[:-1] + f', "rolled_back": {text}}}')

    assert main(["rollback", "--root", str(root)]) == 3
    err = capsys.readouterr().err
    assert err.startswith(f"error: {state}: {message}"), err
    assert "Traceback" not in err

    v2 = _package(tmp_path, keys, "v2", 2)
    refused = _updater(root, keys).handle(v2.message)
    assert not refused.ok and message in refused.reason
    assert slots.active() == "A"


# ------------------------------------------ end to end: flashed agent, real broker


@pytest.mark.broker
def test_a_flashed_agent_keeps_the_rollback_across_a_restart(
    tmp_path: Path, request
) -> None:
    """Flash v1; the agent installs the retained v2; rollback and SIGHUP; the
    agent restarts with v2 still retained and keeps v1, saying why in its status;
    a newer v3 is installed. Rolled back from v3 and v3 flashed again, the mark
    is gone: the retained v3 is the running model, no refusal."""
    from edge_agent import bundle
    from edge_agent.flash import flash
    from tests.test_flash import all_wheels, gateway_config
    from tests.test_ota_e2e import GATEWAY, SITE, Watcher

    broker = request.getfixturevalue("mosquitto")
    wheels = all_wheels(tmp_path)
    private, public = signing.generate_keypair(tmp_path / "keys")
    root = tmp_path / "root"
    root.mkdir()
    config = tmp_path / "gateway.toml"
    config.write_text(
        gateway_config(root, broker=broker.url, alerts="", site=SITE,
                       gateway=GATEWAY)
        + "wait_verdicts = false\ndrain_timeout = 5.0\n"
    )

    def artifact(version: str, seed: int) -> Path:
        return make_artifact(tmp_path / f"art-{version}", version=version, seed=seed)

    def bundled(version: str, seed: int) -> Path:
        out = tmp_path / f"{version}.tar.gz"
        bundle.build_bundle(artifact(version, seed), config, private, out,
                            wheels=wheels)
        return out

    flash(bundled("v1", 1), root, public)
    layout = GatewayLayout(root)
    slots = ModelSlots(layout.models)
    watcher = Watcher("127.0.0.1", broker.port)
    request.addfinalizer(watcher.close)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "LANG": "C.UTF-8"}
    agents: list[subprocess.Popen] = []
    request.addfinalizer(lambda: [a.kill() for a in agents if a.poll() is None])

    def start_agent(n: int) -> subprocess.Popen:
        watcher.status.clear()
        proc = subprocess.Popen(
            [str(layout.venv / "bin" / "edge-agent"), "run", "--config",
             str(layout.config), "-v"],
            stdin=subprocess.PIPE,
            stdout=open(tmp_path / f"agent{n}.out", "wb"),
            stderr=open(tmp_path / f"agent{n}.err", "wb"),
            env=env,
        )
        agents.append(proc)
        return proc

    def stop_agent(proc: subprocess.Popen, n: int) -> str:
        proc.stdin.close()
        err = tmp_path / f"agent{n}.err"
        assert proc.wait(60) == 0, err.read_text()[-2000:]
        return err.read_text()

    def status() -> dict:
        return watcher.status[-1] if watcher.status else {}

    def wait_status(what: str, **want) -> None:
        watcher.wait(lambda: all(status().get(k) == v for k, v in want.items()),
                     what=what)

    # 1. The agent installs the retained v2 update.
    v2 = pack_update(artifact("v2", 2), private, **TARGET)
    watcher.publish_model(v2.message)
    agent = start_agent(1)
    wait_status("v2 installed", state="online", model_version="v2")
    assert slots.active() == "B"

    # 2. The operator rolls back; the running agent takes v1 on SIGHUP.
    assert main(["rollback", "--root", str(root)]) == 0
    assert slots.active() == "A"
    agent.send_signal(signal.SIGHUP)
    wait_status("v1 after SIGHUP", state="online", model_version="v1")
    stop_agent(agent, 1)

    # 3. A restart with v2 still retained: v1 stays, and the status says why.
    agent = start_agent(2)
    watcher.wait(lambda: HELD in str(status().get("update_refused", "")),
                 what="status with the rollback refusal")
    refusal = status()
    assert refusal["model_version"] == "v1"
    assert refusal["update_refused"].startswith(f"model v2 {HELD}")
    assert refusal["update_refused"].endswith(ADVICE)
    assert slots.active() == "A" and os.readlink(layout.models / "current") == "A"

    # 4. A newer model is installed.
    watcher.publish_model(pack_update(artifact("v3", 3), private, **TARGET).message)
    wait_status("v3 installed", state="online", model_version="v3")
    assert slots.active() == "B" and slots.info("B")["model_version"] == "v3"
    log = stop_agent(agent, 2)
    assert f"model v2 {HELD}" in log and "Traceback" not in log

    # 5. Rolled back from v3, then v3 flashed by the operator: the mark goes, and
    # the retained v3 update is the running model at the next start.
    assert main(["rollback", "--root", str(root)]) == 0
    assert [m["model_version"] for m in slots.rolled_back()] == ["v2", "v3"]
    flash(bundled("v3", 3), root, public)
    assert [m["model_version"] for m in slots.rolled_back()] == ["v2"]
    assert slots.active() == "B"
    agent = start_agent(3)
    wait_status("v3 running", state="online", model_version="v3")
    deadline = time.monotonic() + 30
    err = tmp_path / "agent3.err"
    while "already running" not in err.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = stop_agent(agent, 3)
    assert "model v3 is already running" in log
    assert HELD not in log
    assert all("update_refused" not in s for s in watcher.status)
