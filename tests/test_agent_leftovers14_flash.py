"""Flash tells "already active" by the model's content, not its name alone.

Found: a bundle whose model had the ``model_version`` of the active one (new
thresholds, another build of it) was taken for the running model and not
installed. Now the bundle's model files (their sha256 in the signed manifest) are
compared with the active slot's; a difference is installed, and named.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

from edge_agent import bundle  # noqa: E402
from edge_agent import flash as flash_mod  # noqa: E402
from edge_agent.cli import main  # noqa: E402
from tests import test_flash_reflash as reflash  # noqa: E402
from tests.test_bundle import CONFIG  # noqa: E402
from tests.test_ota_artifacts import make_artifact  # noqa: E402

# The re-flash tests' fixtures: the agent's wheel, a key pair, an empty release.
agent_wheel = reflash.agent_wheel
keys = reflash.keys
empty_release = reflash.empty_release
_slots = reflash._slots


def _bundle_of(artifact: Path, pair, wheel: Path, out: Path) -> Path:
    config = out.with_suffix(".toml")
    config.write_text(CONFIG)
    bundle.build_bundle(artifact, config, pair[0], out, wheels=[wheel])
    return out


def test_a_bundle_of_the_active_model_version_with_other_content_is_installed(
    tmp_path, keys, agent_wheel, empty_release, caplog
):
    gw1 = make_artifact(tmp_path / "gw1", version="gw1", seed=1)
    gw2 = make_artifact(tmp_path / "gw2", version="gw2", seed=2)
    # The same model, named the same, with new thresholds.
    gw2_new = make_artifact(tmp_path / "gw2-new", version="gw2", seed=2,
                            thresholds={"decision": 0.6, "escalate_low": 0.5,
                                        "alert": 0.95})
    root = tmp_path / "root"
    root.mkdir()
    flash_mod.flash(_bundle_of(gw1, keys, agent_wheel, tmp_path / "1.tar.gz"),
                    root, keys[1])
    flash_mod.flash(_bundle_of(gw2, keys, agent_wheel, tmp_path / "2.tar.gz"),
                    root, keys[1])
    assert _slots(root)[0] == "B"

    with caplog.at_level(logging.WARNING, logger="gatewatch"):
        result = flash_mod.flash(
            _bundle_of(gw2_new, keys, agent_wheel, tmp_path / "2new.tar.gz"),
            root, keys[1])

    assert (result.slot, result.model_kept) == ("A", False)
    current, state = _slots(root)
    assert current == "A"
    assert (state["A"]["model_version"], state["B"]["model_version"]) == ("gw2", "gw2")
    models = flash_mod.GatewayLayout(root).models
    assert (models / "A" / "thresholds.json").read_bytes() == (
        gw2_new / "thresholds.json").read_bytes()
    [note] = [r.getMessage() for r in caplog.records
              if "has the model_version of the model active" in r.getMessage()]
    assert "model gw2 of bundle 2new.tar.gz" in note
    # What differs, and only that: the manifest names its thresholds too.
    assert "but other content (manifest.json, thresholds.json differ)" in note
    assert "installed into slot A and made active; slot B keeps the earlier gw2" in note


def test_a_rebuilt_bundle_of_the_same_model_files_still_keeps_the_slots(
    tmp_path, keys, agent_wheel, empty_release, capsys
):
    gw1 = make_artifact(tmp_path / "gw1", version="gw1", seed=1)
    gw2 = make_artifact(tmp_path / "gw2", version="gw2", seed=2)
    root = tmp_path / "root"
    root.mkdir()
    args = ["--root", str(root), "--pubkey", str(keys[1])]
    for name, artifact in [("1", gw1), ("2", gw2)]:
        out = _bundle_of(artifact, keys, agent_wheel, tmp_path / f"{name}.tar.gz")
        assert main(["flash", str(out), *args]) == 0
    capsys.readouterr()

    # Another bundle (its own signed manifest) of the very same model files.
    again = _bundle_of(gw2, keys, agent_wheel, tmp_path / "2-again.tar.gz")
    assert main(["flash", str(again), *args]) == 0

    assert "model gw2 was already active in slot B" in capsys.readouterr().out
    assert _slots(root)[1]["A"]["model_version"] == "gw1"
