"""edge_agent.ota in-process: signed updates into A/B slots, and every refusal.

Each refused update must leave the active slot, its files and its scores exactly as
they were; the scores are checked against the numpy model of the seed that built it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from edge_agent import signing  # noqa: E402
from edge_agent.flash import ModelSlots  # noqa: E402
from edge_agent.ota import (  # noqa: E402
    ModelUpdater,
    pack_artifact,
    pack_update,
    sign_archive,
)
from edge_agent.runtime import load_artifact  # noqa: E402
from flows.errors import UsageError  # noqa: E402
from tests.test_ota_artifacts import (  # noqa: E402
    W,
    fit_conn_encoder,
    make_artifact,
    numpy_scores,
)

# The gateway the updates here are signed for, and the updater's own ids.
TARGET = {"site": "plant-3", "gateways": ["gw-17"]}
HERE = {"site": "plant-3", "gateway": "gw-17"}

# Windows of the default test artifact's shape (a conn-family encoder).
F = fit_conn_encoder().n_features
WINDOWS = np.random.default_rng(11).uniform(0, 1, (16, W, F)).astype(np.float32)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return signing.generate_keypair(tmp_path / "keys")


@pytest.fixture
def updater(tmp_path: Path, keys) -> ModelUpdater:
    """An updater whose slots already run model v1 (seed 1), installed over the air."""
    up = ModelUpdater(keys[1], tmp_path / "models", tolerance=1e-5, **HERE)
    v1 = pack_update(
        make_artifact(tmp_path / "v1", version="v1", seed=1), keys[0],
        **TARGET,
    )
    result = up.handle(v1.message)
    assert result.ok, result.reason
    return up


def _active_snapshot(slots: ModelSlots) -> tuple[str | None, dict[str, bytes]]:
    active = slots.active()
    files = {p.name: p.read_bytes() for p in sorted(slots.path(active).iterdir())}
    return active, files


def _assert_still_v1(up: ModelUpdater, before) -> None:
    assert _active_snapshot(up.slots) == before
    scorer = load_artifact(up.slots.current_path)
    assert scorer.model_version == "v1"
    np.testing.assert_allclose(
        scorer.score(WINDOWS), numpy_scores(WINDOWS, 1), atol=1e-6
    )


def test_update_installs_into_the_other_slot_and_switches(tmp_path, keys, updater):
    assert updater.slots.active() == "A"
    v2 = pack_update(
        make_artifact(tmp_path / "v2", version="v2", seed=2), keys[0],
        **TARGET,
    )

    result = updater.handle(v2.message)

    assert result.ok and result.changed, result.reason
    assert (result.version, result.slot) == ("v2", "B")
    assert os.readlink(updater.slots.current_path) == "B"
    np.testing.assert_allclose(
        result.scorer.score(WINDOWS), numpy_scores(WINDOWS, 2), atol=1e-6
    )
    # The previous model stays in slot A, intact, for a rollback.
    assert load_artifact(updater.slots.path("A")).model_version == "v1"
    assert updater.slots.info("B")["sha256"] == v2.sha256

    # The same (retained) message again changes nothing.
    again = updater.handle(v2.message)
    assert again.ok and not again.changed and again.version == "v2"
    assert updater.slots.active() == "B"


def test_update_by_reference(tmp_path, keys, updater):
    archive_path = tmp_path / "served" / "v2.tar.gz"
    archive_path.parent.mkdir()
    package = pack_update(
        make_artifact(tmp_path / "v2", version="v2", seed=2),
        keys[0],
        url=archive_path.as_uri(),
        **TARGET,
    )
    archive_path.write_bytes(package.archive)
    assert "payload" not in json.loads(package.message)

    result = updater.handle(package.message)

    assert result.ok and result.version == "v2", result.reason

    # A served archive that changed after signing is refused.
    archive_path.write_bytes(package.archive[:-1] + bytes([package.archive[-1] ^ 1]))
    v3 = pack_update(
        make_artifact(tmp_path / "v3", version="v3", seed=3),
        keys[0],
        url=archive_path.as_uri(),
        **TARGET,
    )
    archive_path.write_bytes(v3.archive[:-1] + bytes([v3.archive[-1] ^ 1]))
    refused = updater.handle(v3.message)
    assert not refused.ok and "sha256" in refused.reason
    assert updater.slots.active() == "B"


def _message(package) -> dict:
    return json.loads(package.message)


def _tampered_payload(tmp_path, keys):
    package = pack_update(
        make_artifact(tmp_path / "v2", version="v2", seed=2), keys[0],
        **TARGET,
    )
    msg = _message(package)
    archive = bytearray(base64.b64decode(msg["payload"]))
    archive[len(archive) // 2] ^= 0x40
    msg["payload"] = base64.b64encode(bytes(archive)).decode()
    return msg


def _truncated_payload(tmp_path, keys):
    package = pack_update(
        make_artifact(tmp_path / "v2", version="v2", seed=2), keys[0],
        **TARGET,
    )
    msg = _message(package)
    msg["payload"] = base64.b64encode(package.archive[:-100]).decode()
    return msg


def _edited_statement(tmp_path, keys):
    package = pack_update(
        make_artifact(tmp_path / "v2", version="v2", seed=2), keys[0],
        **TARGET,
    )
    msg = _message(package)
    statement = json.loads(base64.b64decode(msg["statement"]))
    statement["model_version"] = "v9"
    msg["statement"] = base64.b64encode(json.dumps(statement).encode()).decode()
    return msg


def _wrong_key(tmp_path, keys):
    other, _ = signing.generate_keypair(tmp_path / "other")
    package = pack_update(
        make_artifact(tmp_path / "v2", version="v2", seed=2), other,
        **TARGET,
    )
    return _message(package)


def _bad_probe(tmp_path, keys):
    folder = make_artifact(tmp_path / "v2", version="v2", seed=2, expected_shift=0.05)
    # Packed by hand: pack_update itself refuses an artifact that fails its check.
    return _message(sign_archive(*pack_artifact(folder), keys[0], **TARGET))


def _model_not_matching_encoder(tmp_path, keys):
    folder = make_artifact(tmp_path / "v2", version="v2", seed=2, model_window=W + 1)
    return _message(sign_archive(*pack_artifact(folder), keys[0], **TARGET))


def _modified_artifact_file(tmp_path, keys):
    folder = make_artifact(tmp_path / "v2", version="v2", seed=2)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for path in sorted(folder.iterdir()):
            data = path.read_bytes()
            if path.name == "thresholds.json":
                data = b'{"decision": 0.5, "escalate_low": 0.99, "alert": 1.0}'
            info = tarfile.TarInfo(path.name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    # Signed by the right key: the artifact's own sha256 list must still catch it.
    return _message(sign_archive(archive.getvalue(), "v2", keys[0], **TARGET))


def _signed_archive_with(member: tarfile.TarInfo, data: bytes, keys, tmp_path):
    folder = make_artifact(tmp_path / "v2", version="v2", seed=2)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for path in sorted(folder.iterdir()):
            info = tarfile.TarInfo(path.name)
            info.size = path.stat().st_size
            tar.addfile(info, io.BytesIO(path.read_bytes()))
        tar.addfile(member, io.BytesIO(data) if data else None)
    return _message(sign_archive(archive.getvalue(), "v2", keys[0], **TARGET))


def _path_traversal(tmp_path, keys):
    member = tarfile.TarInfo("../../escaped.txt")
    member.size = 3
    return _signed_archive_with(member, b"bad", keys, tmp_path)


def _symlink_member(tmp_path, keys):
    member = tarfile.TarInfo("encoder2.json")
    member.type = tarfile.SYMTYPE
    member.linkname = "/etc/passwd"
    return _signed_archive_with(member, b"", keys, tmp_path)


def _downgrade(tmp_path, keys):
    folder = make_artifact(tmp_path / "v0", version="v0", seed=2)
    return _message(pack_update(folder, keys[0], issued_at=1.0, **TARGET))


def _not_json(tmp_path, keys):
    return None


REFUSALS = {
    "tampered payload": (_tampered_payload, "sha256"),
    "truncated payload": (_truncated_payload, "truncated"),
    "edited statement": (_edited_statement, "does not match its signature"),
    "wrong key": (_wrong_key, "signed by key"),
    "bad probe": (_bad_probe, "probe scores differ"),
    "model vs encoder": (_model_not_matching_encoder, "does not match its encoder"),
    "modified artifact file": (_modified_artifact_file, "sha256 mismatch"),
    "path traversal": (_path_traversal, "outside the archive"),
    "symlink member": (_symlink_member, "link file"),
    "downgrade": (_downgrade, "downgrade"),
    "not json": (_not_json, "not JSON"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_update_is_refused_and_the_running_model_kept(
    case, tmp_path, keys, updater
):
    make, reason = REFUSALS[case]
    before = _active_snapshot(updater.slots)
    inactive_before = updater.slots.info("B")
    msg = make(tmp_path, keys)
    payload = b"{not json" if msg is None else json.dumps(msg).encode()

    result = updater.handle(payload)

    assert not result.ok
    assert reason in result.reason, result.reason
    assert result.scorer is None
    _assert_still_v1(updater, before)
    # Nothing was half-written: the other slot's record is as it was, no staging
    # folders are left, and nothing escaped the slots folder.
    assert updater.slots.info("B") == inactive_before
    leftovers = [p.name for p in updater.slots.dir.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert not (tmp_path / "escaped.txt").exists()
    assert not (updater.slots.dir.parent / "escaped.txt").exists()


@pytest.mark.parametrize("payload", [b"", b"  \n"])
def test_an_empty_message_withdraws_without_a_refusal(payload, updater, caplog):
    """Found: clearing the retained update (an empty message, the way MQTT
    withdraws one) was logged as a refused update that "is not JSON"."""
    before = _active_snapshot(updater.slots)

    with caplog.at_level("INFO", logger="gatewatch.edge_agent"):
        result = updater.handle(payload)

    assert result.withdrawn and not result.ok and result.reason == ""
    assert "withdrawn" in caplog.text and "refused" not in caplog.text
    _assert_still_v1(updater, before)


def test_binary_garbage_is_refused_as_not_utf8_text(updater):
    """Found: bytes that are not UTF-8 were refused with json's guess of another
    encoding ("'utf-16-le' codec can't decode ...")."""
    result = updater.handle(b"\xff\xfe\x00garbage")

    assert not result.ok
    assert result.reason == "model update is not JSON text: byte 0 is not UTF-8"


@pytest.mark.parametrize(
    ("field", "value"),
    [("size", "1e999"), ("size", "-1"), ("size", "3.5"), ("size", "true"),
     ("size", '"12"'), ("size", "NaN"), ("issued_at", "1e999"),
     ("issued_at", "-Infinity")],
)
def test_a_signed_statement_with_an_impossible_number_is_malformed(
    field, value, tmp_path, keys, updater
):
    """Found by the long fuzz run: a validly signed statement whose size was
    1e999 (infinity to Python's JSON) raised OverflowError, which the updater
    could only report as an internal error. Such numbers are malformed now."""
    package = pack_update(
        make_artifact(tmp_path / "v2", version="v2", seed=2), keys[0],
        **TARGET,
    )
    msg = _message(package)
    statement = json.loads(base64.b64decode(msg["statement"]))
    statement[field] = "@@"
    raw = json.dumps(statement).replace('"@@"', value).encode()
    msg["statement"] = base64.b64encode(raw).decode()
    key = signing.load_private_key(keys[0])
    msg["signature"] = base64.b64encode(signing.sign(key, raw)).decode()
    before = _active_snapshot(updater.slots)

    result = updater.handle(json.dumps(msg).encode())

    assert not result.ok
    assert "update statement is malformed" in result.reason, result.reason
    _assert_still_v1(updater, before)


def test_agent_style_construction_finds_the_slots(tmp_path, keys, updater):
    up = ModelUpdater(
        public_key=keys[1],
        artifact=updater.slots.current_path,
        current_version="v1",
        **HERE,
    )
    assert up.slots.dir == updater.slots.dir

    with pytest.raises(UsageError, match="'current' link of a model slots folder"):
        ModelUpdater(public_key=keys[1], artifact=tmp_path / "v1", **HERE)


def test_pack_update_cli_writes_a_message_the_updater_takes(tmp_path, keys, updater):
    from edge_agent.cli import main

    folder = make_artifact(tmp_path / "v2", version="v2", seed=2)
    out = tmp_path / "v2.json"
    assert (
        main(
            [
                "pack-update",
                "--site",
                "plant-3",
                "--gateway",
                "gw-17",
                "--artifact",
                str(folder),
                "--key",
                str(keys[0]),
                "-o",
                str(out),
            ]
        )
        == 0
    )

    result = updater.handle(out.read_bytes())

    assert result.ok and result.version == "v2", result.reason
    np.testing.assert_allclose(
        result.scorer.score(WINDOWS), numpy_scores(WINDOWS, 2), atol=1e-6
    )
