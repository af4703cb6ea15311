"""Site thresholds in over-the-air updates: carried with the model, checked, used.

An artifact folder that holds the site's ``site_thresholds.json`` (``edge-agent
calibrate``) is packed with it; the updater installs it in the new slot, where the
agent takes it over the artifact's thresholds, and refuses an update whose site
thresholds are unusable or were calibrated for another model.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from edge_agent import signing  # noqa: E402
from edge_agent.agent import load_thresholds  # noqa: E402
from edge_agent.ota import ModelUpdater, pack_update, sign_archive  # noqa: E402
from flows.errors import BadInputError  # noqa: E402
from tests.test_ota_artifacts import make_artifact  # noqa: E402

# The gateway the updates here are signed for, and the updater's own ids.
TARGET = {"site": "plant-3", "gateways": ["gw-17"]}
HERE = {"site": "plant-3", "gateway": "gw-17"}

SITE = {"decision": 0.3, "escalate_low": 0.3, "alert": 0.97, "model_version": "v2"}


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return signing.generate_keypair(tmp_path / "keys")


@pytest.fixture
def updater(tmp_path: Path, keys) -> ModelUpdater:
    """An updater whose slot A runs model v1 (no site thresholds)."""
    up = ModelUpdater(keys[1], tmp_path / "models", tolerance=1e-5, **HERE)
    v1 = pack_update(
        make_artifact(tmp_path / "v1", version="v1", seed=1), keys[0],
        **TARGET,
    )
    assert up.handle(v1.message).ok
    return up


def _v2_with_site(tmp_path: Path, site: dict) -> Path:
    folder = make_artifact(tmp_path / "v2", version="v2", seed=2)
    (folder / "site_thresholds.json").write_text(json.dumps(site))
    return folder


def test_an_update_carries_the_site_thresholds_into_the_slot(tmp_path, keys, updater):
    folder = _v2_with_site(tmp_path, SITE)

    result = updater.handle(pack_update(folder, keys[0], **TARGET).message)

    assert result.ok and result.changed, result.reason
    assert (result.version, result.slot) == ("v2", "B")
    installed = updater.slots.path("B") / "site_thresholds.json"
    assert installed.read_bytes() == (folder / "site_thresholds.json").read_bytes()
    # The agent, loading the running model, uses the site's thresholds.
    thresholds, origin = load_thresholds(result.scorer)
    assert origin == "site"
    assert thresholds == {"decision": 0.3, "escalate_low": 0.3, "alert": 0.97}


BAD = {
    "another model": (
        {**SITE, "model_version": "v1"},
        "was calibrated for model 'v1', but the artifact is model 'v2'",
    ),
    "alert not a number": ({**SITE, "alert": "high"}, "threshold 'alert' is 'high'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_an_update_with_unusable_site_thresholds_is_refused(
    case, tmp_path, keys, updater
):
    site, reason = BAD[case]
    folder = _v2_with_site(tmp_path, site)
    # Packed by hand: pack_update itself refuses such a folder.
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for path in sorted(folder.iterdir()):
            info = tarfile.TarInfo(path.name)
            info.size = path.stat().st_size
            tar.addfile(info, io.BytesIO(path.read_bytes()))
    message = sign_archive(archive.getvalue(), "v2", keys[0], **TARGET).message

    result = updater.handle(message)

    assert not result.ok
    assert "site_thresholds.json" in result.reason
    assert reason in result.reason, result.reason
    assert os.readlink(updater.slots.current_path) == "A"
    assert updater.slots.info("B") == {}
    with pytest.raises(BadInputError, match=reason):
        pack_update(folder, keys[0], **TARGET)
