"""Rollback and flash as a gateway operator sees them (found by one).

A rollback refused because the other slot's model is damaged said only what was
wrong with that model, not that nothing changed; ``rollback --root`` of a folder
that does not exist said it had "no flashed model"; and an agent run by hand from
a flashed folder failed at once, as flash had not made ``var/lib/gatewatch`` (the
systemd unit's ``StateDirectory=`` makes it only under systemd).
"""

from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")

from edge_agent import flash as flash_mod  # noqa: E402
from edge_agent.cli import main  # noqa: E402
from tests import test_flash_reflash as reflash  # noqa: E402

# The re-flash tests' fixtures: the agent's wheel, a key pair, an empty release.
agent_wheel = reflash.agent_wheel
keys = reflash.keys
empty_release = reflash.empty_release
_bundle = reflash._bundle
_slots = reflash._slots


def test_a_refused_rollback_says_the_active_model_stays(
    tmp_path, keys, agent_wheel, empty_release, capsys
):
    root = tmp_path / "root"
    root.mkdir()
    args = ["--root", str(root), "--pubkey", str(keys[1])]
    assert main(["flash", str(_bundle(tmp_path, keys, agent_wheel, "gw1", 1)),
                 *args]) == 0
    assert main(["flash", str(_bundle(tmp_path, keys, agent_wheel, "gw2", 2)),
                 *args]) == 0
    layout = flash_mod.GatewayLayout(root)
    assert layout.state.is_dir()  # made by flash, for an agent run by hand
    model = layout.models / "A" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[100] ^= 0xFF
    model.write_bytes(bytes(data))
    capsys.readouterr()

    assert main(["rollback", "--root", str(root)]) == 1

    err = capsys.readouterr().err
    assert "rollback refused, slot B (gw2) stays active" in err
    assert "sha256" in err
    assert _slots(root)[0] == "B"


def test_rollback_of_a_root_that_does_not_exist_says_so(tmp_path, capsys):
    assert main(["rollback", "--root", str(tmp_path / "nosuchroot")]) == 2
    assert "does not exist" in capsys.readouterr().err
