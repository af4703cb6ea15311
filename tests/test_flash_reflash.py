"""Re-flashing a gateway: what the model slots keep, and what a release must hold.

Flashing the bundle whose model already runs must leave the other slot's model, the
one a rollback goes back to, where it is. Bundles here carry only the agent's own
wheel and the venv install is replaced by an empty release, so the module runs in
seconds; the real offline install (with PYTHONPATH set) is in ``test_flash.py``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("onnxruntime")

from edge_agent import bundle  # noqa: E402
from edge_agent import flash as flash_mod  # noqa: E402
from edge_agent.cli import main  # noqa: E402
from tests import test_bundle_layout as layout_tests  # noqa: E402
from tests.test_bundle import CONFIG  # noqa: E402
from tests.test_flash import snapshot  # noqa: E402
from tests.test_ota_artifacts import make_artifact  # noqa: E402

# The bundle tests' fixtures: the agent's wheel (built once) and a fresh key pair.
agent_wheel = layout_tests.agent_wheel
keys = layout_tests.keys




@pytest.fixture
def empty_release(monkeypatch):
    """Install an empty release in place of the venv, and skip the health check
    that would run in it; everything else of flash runs as it is."""

    def install(layout, staged, manifest, python):
        release = layout.releases / "test-release"
        (release / "venv" / "bin").mkdir(parents=True, exist_ok=True)
        return release

    monkeypatch.setattr(flash_mod, "_install_release", install)
    monkeypatch.setattr(flash_mod, "_health_check_in", lambda *args: None)


def _bundle(tmp_path: Path, keys, agent_wheel, version: str, seed: int) -> Path:
    """A signed bundle of a fresh artifact of model ``version``."""
    artifact = make_artifact(tmp_path / f"art-{version}", version=version, seed=seed)
    config = tmp_path / "gateway.toml"
    config.write_text(CONFIG)
    out = tmp_path / f"{version}.tar.gz"
    bundle.build_bundle(artifact, config, keys[0], out, wheels=[agent_wheel])
    return out


def _slots(root: Path) -> tuple[str, dict]:
    """The active slot and slots.json under ``root``."""
    models = flash_mod.GatewayLayout(root).models
    return os.readlink(models / "current"), json.loads(
        (models / "slots.json").read_text()
    )


def test_reflashing_the_active_model_keeps_the_rollback_target(
    tmp_path, keys, agent_wheel, empty_release, capsys, caplog
):
    gw1 = _bundle(tmp_path, keys, agent_wheel, "gw1", seed=1)
    gw2 = _bundle(tmp_path, keys, agent_wheel, "gw2", seed=2)
    root = tmp_path / "root"
    root.mkdir()
    layout = flash_mod.GatewayLayout(root)
    args = ["--root", str(root), "--pubkey", str(keys[1])]
    assert main(["flash", str(gw1), *args]) == 0
    assert main(["flash", str(gw2), *args]) == 0
    capsys.readouterr()
    models = snapshot(layout.models)
    layout.config.unlink()  # the rest of the bundle is installed again

    with caplog.at_level(logging.INFO, logger="gatewatch.edge_agent"):
        assert main(["flash", str(gw2), *args]) == 0

    out = capsys.readouterr().out
    assert "model gw2 was already active in slot B" in out
    assert "model slots are unchanged" in out
    assert "model gw2 is already active in slot B" in caplog.text
    assert "slot A keeps model gw1 for rollback" in caplog.text
    assert snapshot(layout.models) == models
    assert layout.config.read_text() == CONFIG
    current, state = _slots(root)
    assert current == "B"
    assert (state["A"]["model_version"], state["B"]["model_version"]) == ("gw1", "gw2")

    # The rollback the downgrade refusal points at goes back to gw1.
    assert main(["rollback", *args[:2]]) == 0
    assert "model gw1" in capsys.readouterr().out
    assert _slots(root)[0] == "A"


def test_reflashing_the_model_of_the_inactive_slot_makes_it_active_again(
    tmp_path, keys, agent_wheel, empty_release
):
    gw1 = _bundle(tmp_path, keys, agent_wheel, "gw1", seed=1)
    gw2 = _bundle(tmp_path, keys, agent_wheel, "gw2", seed=2)
    root = tmp_path / "root"
    root.mkdir()
    flash_mod.flash(gw1, root, keys[1])
    flash_mod.flash(gw2, root, keys[1])
    assert main(["rollback", "--root", str(root)]) == 0
    assert _slots(root)[1]["rolled_back"][-1]["model_version"] == "gw2"

    result = flash_mod.flash(gw2, root, keys[1])

    assert (result.slot, result.model_kept) == ("B", False)
    current, state = _slots(root)
    assert current == "B"
    assert (state["A"]["model_version"], state["B"]["model_version"]) == ("gw1", "gw2")
    assert state["rolled_back"] == []  # flashed on purpose: no longer held back


class _Rebuilt(Exception):
    """Raised in place of the venv creation: the release was not reused."""


def _release_manifest() -> SimpleNamespace:
    """The fields of a bundle manifest that _install_release reads."""
    return SimpleNamespace(agent_version="1.0", wheels_digest="0" * 64,
                           requirement="gatewatch[edge]", digest="1" * 64)


def test_a_release_that_cannot_run_the_agent_is_rebuilt_not_reused(
    tmp_path, monkeypatch, caplog
):
    layout = flash_mod.GatewayLayout(tmp_path / "root")
    manifest = _release_manifest()
    release = layout.releases / "1.0-000000000000"
    (release / "venv" / "bin").mkdir(parents=True)  # no edge-agent: pip skipped it
    (release / flash_mod.COMPLETE).write_text("digest\n")

    def stop(*args, **kwargs):
        raise _Rebuilt

    monkeypatch.setattr(flash_mod, "_run", stop)
    with caplog.at_level(logging.WARNING, logger="gatewatch.edge_agent"):
        with pytest.raises(_Rebuilt):
            flash_mod._install_release(layout, tmp_path, manifest, "python3")
    assert "cannot run the agent" in caplog.text
    assert "venv/bin/edge-agent is missing); rebuilding it" in caplog.text


def test_a_release_without_the_agent_is_removed_and_named(tmp_path, monkeypatch):
    layout = flash_mod.GatewayLayout(tmp_path / "root")
    manifest = _release_manifest()
    # venv and pip "succeed" and install nothing, as pip does when it sees the agent
    # through an inherited PYTHONPATH.
    monkeypatch.setattr(flash_mod, "_run", lambda *args, **kwargs: None)

    with pytest.raises(flash_mod.FlashError) as caught:
        flash_mod._install_release(layout, tmp_path, manifest, "python3")

    release = layout.releases / "1.0-000000000000"
    assert str(caught.value) == (
        "the agent release installed from the bundled wheels cannot run: "
        f"{release.absolute() / 'venv' / 'bin' / 'edge-agent'} is missing; "
        f"removed {release}"
    )
    assert caught.value.exit_code == 1
    assert not release.exists()


LEAKS = {
    "PYTHONPATH": "/src/gatewatch",
    "PYTHONHOME": "/elsewhere",
    "PYTHONUSERBASE": "/home/me/.local",
    "PYTHONSTARTUP": "/home/me/.pythonrc",
    "PYTHONNOUSERSITE": "",
    "PYTHONSAFEPATH": "",
    "PYTHONPLATLIBDIR": "lib64",
    "PIP_INDEX_URL": "https://example.invalid/simple",
}


def test_flash_runs_python_without_the_callers_python_variables(tmp_path, monkeypatch):
    for name, value in LEAKS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PYTHONIOENCODING", "utf-8")
    seen: list[dict] = []

    def record(cmd, **kwargs):
        env = kwargs.get("env")
        seen.append(dict(os.environ if env is None else env))
        return subprocess.CompletedProcess(cmd, 0, stdout="3.11\n", stderr="")

    monkeypatch.setattr(flash_mod.subprocess, "run", record)
    flash_mod._run(["python", "-m", "venv", "v"], "creating the gateway venv")
    env = flash_mod._offline_pip_env()
    flash_mod._run(["python", "-m", "pip"], "installing", env=env)
    flash_mod._health_check_in(tmp_path / "python", tmp_path / "model", None)

    assert len(seen) == 3
    for env in seen:
        assert sorted(set(LEAKS) & set(env)) == []
        assert env["PYTHONIOENCODING"] == "utf-8" and env["PATH"] == os.environ["PATH"]
