"""Re-flashing the active model keeps the site thresholds calibrated on the gateway.

Found: ``edge-agent calibrate`` on a flashed gateway writes ``site_thresholds.json``
into the active slot (``models/current``); flashing the same bundle again took
that file for other content of the model, installed the bundle's model into the
other slot without it, made that slot active and overwrote the rollback target.
Files the gateway writes into a slot itself no longer count as other content.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnxruntime")

from edge_agent import flash as flash_mod  # noqa: E402
from edge_agent.cli import main  # noqa: E402
from tests import test_agent_leftovers14_flash as leftovers  # noqa: E402
from tests.test_ota_artifacts import make_artifact  # noqa: E402

agent_wheel = leftovers.agent_wheel
keys = leftovers.keys
empty_release = leftovers.empty_release
_slots = leftovers._slots
_bundle_of = leftovers._bundle_of

SITE = {"decision": 0.55, "escalate_low": 0.45, "alert": 0.9}


def test_reflashing_after_calibrate_on_the_gateway_keeps_slots_and_thresholds(
    tmp_path, keys, agent_wheel, empty_release, capsys
):
    gw1 = make_artifact(tmp_path / "gw1", version="gw1", seed=1)
    gw2 = make_artifact(tmp_path / "gw2", version="gw2", seed=2)
    root = tmp_path / "root"
    root.mkdir()
    args = ["--root", str(root), "--pubkey", str(keys[1])]
    gw1_bundle = _bundle_of(gw1, keys, agent_wheel, tmp_path / "1.tar.gz")
    gw2_bundle = _bundle_of(gw2, keys, agent_wheel, tmp_path / "2.tar.gz")
    assert main(["flash", str(gw1_bundle), *args]) == 0
    assert main(["flash", str(gw2_bundle), *args]) == 0
    assert _slots(root)[0] == "B"

    # What calibrate on the gateway writes, and the part file of a cut write.
    current = flash_mod.GatewayLayout(root).models / "current"
    site = json.dumps({**SITE, "model_version": "gw2"}).encode()
    (current / "site_thresholds.json").write_bytes(site)
    (current / ".site_thresholds.json.4242.part").write_bytes(b"{")
    capsys.readouterr()

    assert main(["flash", str(gw2_bundle), *args]) == 0

    active, state = _slots(root)
    assert active == "B"
    assert (state["A"]["model_version"], state["B"]["model_version"]) == (
        "gw1", "gw2")
    assert (current / "site_thresholds.json").read_bytes() == site
    assert "model gw2 was already active in slot B" in capsys.readouterr().out


def test_a_stray_file_in_the_slot_still_counts_as_other_content(
    tmp_path, keys, agent_wheel, empty_release
):
    gw2 = make_artifact(tmp_path / "gw2", version="gw2", seed=2)
    bundle_path = _bundle_of(gw2, keys, agent_wheel, tmp_path / "2.tar.gz")
    root = tmp_path / "root"
    root.mkdir()
    flash_mod.flash(bundle_path, root, keys[1])
    slot = flash_mod.GatewayLayout(root).models / "current"
    (slot / "extra.onnx").write_bytes(b"not the bundle's")
    (slot / ".site_thresholds.json.x.part").write_bytes(b"{")

    result = flash_mod.flash(bundle_path, root, keys[1])

    assert result.model_kept is False
