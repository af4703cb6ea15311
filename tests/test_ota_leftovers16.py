"""OTA and flash leftovers of round 16.

1. A signed model update named no site or gateway: any gateway it reached installed
   it. The signed statement now names its targets (``pack-update --site``, with
   ``--gateway`` or ``--all-gateways``); a gateway refuses an update for another
   site or gateway, or one that names no targets.
2. After a rollback the downgrade floor was the older model's, so updates issued
   between the two installed again. The floor is now the newest model ever active.
3. The flash lock repeated the open-and-flock of ``locks.try_lock``, which writes a
   pid; ``try_lock(write_pid=False)`` now takes it, leaving the file unwritten.
4. Bundles built within one second: the build time is kept with its fraction
   (``build_bundle(created_ts=...)`` sets it) and the older one is refused after
   the newer; a refusal within one second gives both times to the millisecond.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from edge_agent import bundle, locks, signing  # noqa: E402
from edge_agent import flash as flash_mod  # noqa: E402
from edge_agent.cli import main  # noqa: E402
from edge_agent.flash import GatewayLayout, ModelSlots  # noqa: E402
from edge_agent.ota import (  # noqa: E402
    STATEMENT_SCHEMA,
    ModelUpdater,
    pack_artifact,
    pack_update,
)
from flows.errors import UsageError  # noqa: E402
from tests import test_bundle_layout as layout_tests  # noqa: E402
from tests import test_flash_reflash as reflash_tests  # noqa: E402
from tests.test_bundle import CONFIG  # noqa: E402
from tests.test_ota_artifacts import make_artifact  # noqa: E402

SITE, GATEWAY = "plant-3", "gw-17"
HERE = {"site": SITE, "gateway": GATEWAY}
TARGET = {"site": SITE, "gateways": [GATEWAY]}

agent_wheel = layout_tests.agent_wheel
empty_release = reflash_tests.empty_release


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return signing.generate_keypair(tmp_path / "keys")


@pytest.fixture
def updater(tmp_path: Path, keys) -> ModelUpdater:
    """An updater of gateway gw-17 of plant-3 running model v1 (slot A)."""
    up = ModelUpdater(keys[1], tmp_path / "models", tolerance=1e-5, **HERE)
    v1 = make_artifact(tmp_path / "v1", version="v1", seed=1)
    result = up.handle(pack_update(v1, keys[0], issued_at=1000.0, **TARGET).message)
    assert result.ok, result.reason
    return up


def _v2(tmp_path: Path) -> Path:
    return make_artifact(tmp_path / "v2", version="v2", seed=2)


def _statement(message: bytes) -> dict:
    return json.loads(base64.b64decode(json.loads(message)["statement"]))


def _assert_refused(up: ModelUpdater, message: bytes, reason: str) -> None:
    """Refused as every refused update is: not installed, recorded, v1 runs on."""
    result = up.handle(message)

    assert (result.ok, result.reason) == (False, reason)
    assert up.last_refusal["update_refused"] == reason
    assert up.last_refusal["update_refused_model_version"] == "v2"
    assert up.slots.active() == "A"
    assert up.slots.info("A")["model_version"] == "v1"
    assert up.slots.info("B") == {}


# ------------------------------------------------------------- 1. signed targets


@pytest.mark.parametrize(
    "targets",
    [
        {"site": SITE, "gateways": ["gw-01", GATEWAY, "gw-99"]},
        {"site": SITE, "all_gateways": True},
    ],
    ids=["listed", "all-gateways"],
)
def test_an_update_for_this_site_and_gateway_installs(
    tmp_path, keys, updater, targets
):
    package = pack_update(_v2(tmp_path), keys[0], **targets)

    result = updater.handle(package.message)

    assert (result.ok, result.changed, result.version) == (True, True, "v2")
    assert updater.slots.active() == "B"
    statement = _statement(package.message)
    expected = dict(targets)
    if "gateways" in expected:
        expected["gateways"] = sorted(expected["gateways"])
    assert statement["targets"] == expected


def test_an_update_for_another_site_is_refused(tmp_path, keys, updater):
    package = pack_update(_v2(tmp_path), keys[0], site="plant-4", all_gateways=True)

    _assert_refused(
        updater,
        package.message,
        "update v2 is for site plant-4, not this gateway's site plant-3",
    )


def test_an_update_for_other_gateways_is_refused(tmp_path, keys, updater):
    package = pack_update(
        _v2(tmp_path), keys[0], site=SITE, gateways=["gw-18", "gw-16"]
    )

    _assert_refused(
        updater,
        package.message,
        "update v2 is for gateways gw-16, gw-18 of site plant-3, not gw-17",
    )


def test_an_update_that_names_no_targets_is_refused(
    tmp_path, keys, updater, caplog
):
    """Signed as pack-update signed before targets existed; logged."""
    private = signing.load_private_key(keys[0])
    archive, version = pack_artifact(_v2(tmp_path))
    raw = json.dumps(
        {
            "schema": STATEMENT_SCHEMA,
            "kind": "model_update",
            "model_version": version,
            "sha256": bundle.sha256_bytes(archive),
            "size": len(archive),
            "issued_at": 2000.0,
            "key_id": signing.key_id(private.public_key()),
        },
        sort_keys=True,
    ).encode()
    message = json.dumps(
        {
            "schema": "gatewatch/v1",
            "kind": "model_update",
            "id": "old",
            "model_version": version,
            "statement": base64.b64encode(raw).decode(),
            "signature": base64.b64encode(signing.sign(private, raw)).decode(),
            "payload": base64.b64encode(archive).decode(),
        }
    ).encode()

    reason = (
        "update v2 names no site or gateway: signed before updates named their "
        "targets; sign it again with --site"
    )
    with caplog.at_level("WARNING", logger="gatewatch.edge_agent"):
        _assert_refused(updater, message, reason)
    assert f"model update refused: {reason}" in caplog.text


def test_targets_edited_after_signing_fail_the_signature(tmp_path, keys, updater):
    package = pack_update(_v2(tmp_path), keys[0], site=SITE, gateways=["gw-18"])
    message = json.loads(package.message)
    statement = _statement(package.message)
    statement["targets"] = TARGET
    edited = json.dumps(statement, sort_keys=True).encode()
    message["statement"] = base64.b64encode(edited).decode()

    _assert_refused(
        updater,
        json.dumps(message).encode(),
        f"model update does not match its signature under key "
        f"{signing.key_id(signing.load_public_key(keys[1]))}: it was changed "
        "after signing, or signed by another key",
    )


@pytest.mark.parametrize(
    "targets",
    [
        {"site": SITE, "gateways": "gw-17"},
        {"site": SITE, "gateways": []},
        {"site": SITE, "gateways": [GATEWAY], "all_gateways": True},
        {"site": 3, "all_gateways": True},
        {"site": "plant-3\n", "all_gateways": True},
        {"site": SITE, "gateways": [GATEWAY, "gw/18"]},
        ["plant-3", "gw-17"],
    ],
    ids=["text", "empty", "both", "site-number", "site-newline", "bad-gateway",
         "list"],
)
def test_signed_targets_of_the_wrong_shape_are_malformed(
    tmp_path, keys, updater, targets
):
    private = signing.load_private_key(keys[0])
    package = pack_update(_v2(tmp_path), keys[0], **TARGET)
    message = json.loads(package.message)
    statement = {**_statement(package.message), "targets": targets}
    raw = json.dumps(statement, sort_keys=True).encode()
    message["statement"] = base64.b64encode(raw).decode()
    message["signature"] = base64.b64encode(signing.sign(private, raw)).decode()

    result = updater.handle(json.dumps(message).encode())

    assert not result.ok
    assert result.reason.startswith("update statement is malformed: targets ")
    assert updater.slots.active() == "A"


def test_an_updater_needs_its_site_and_gateway(tmp_path, keys):
    with pytest.raises(UsageError, match="site and gateway id"):
        ModelUpdater(keys[1], tmp_path / "models", site=SITE)
    with pytest.raises(UsageError, match="may only hold letters"):
        ModelUpdater(keys[1], tmp_path / "models", site=SITE, gateway="gw/17")


def test_pack_update_signs_the_targets_it_is_given(tmp_path, keys, capsys):
    art = _v2(tmp_path)
    out = tmp_path / "update.json"
    base = ["pack-update", "--artifact", str(art), "--key", str(keys[0])]

    code = main([*base, "-o", str(out), "--site", SITE, "--gateway", "gw-18",
                 "--gateway", GATEWAY])

    assert code == 0, capsys.readouterr().err
    assert _statement(out.read_bytes())["targets"] == {
        "site": SITE, "gateways": [GATEWAY, "gw-18"]
    }
    capsys.readouterr()

    refusals = {
        "no gateways": (["--site", SITE], "must name its gateways"),
        "both": (["--site", SITE, "--gateway", "g", "--all-gateways"],
                 "give --gateway or --all-gateways, not both"),
        "bad site": (["--site", "plant/3", "--all-gateways"],
                     "--site 'plant/3' may only hold letters"),
        "newline": (["--site", "plant-3\n", "--all-gateways"],
                    "--site 'plant-3\\n' may only hold letters"),
        "bad gateway": (["--site", SITE, "--gateway", "+"],
                        "--gateway '+' may only hold letters"),
    }
    for case, (flags, error) in refusals.items():
        again = tmp_path / f"{case}.json"
        assert main([*base, "-o", str(again), *flags]) == 2, case
        err = capsys.readouterr().err
        assert err.startswith("error: ") and error in err, (case, err)
        assert len(err.splitlines()) == 1 and not again.exists()

    with pytest.raises(SystemExit) as exc:  # argparse: --site is required
        main([*base, "-o", str(tmp_path / "none.json"), "--all-gateways"])
    assert exc.value.code == 2
    assert "--site" in capsys.readouterr().err


# -------------------------------------------------------- 2. the downgrade floor


def test_a_rollback_does_not_reopen_the_updates_it_skipped(tmp_path, keys):
    root = tmp_path / "root"
    slots = ModelSlots(GatewayLayout(root).models)
    up = ModelUpdater(keys[1], slots.dir, tolerance=1e-5, **HERE)

    def update(version: str, seed: int, issued: float) -> bytes:
        art = make_artifact(tmp_path / version, version=version, seed=seed)
        return pack_update(art, keys[0], issued_at=issued, **TARGET).message

    v2 = update("v2", 2, 2000.0)  # published, then superseded by v3
    assert up.handle(update("v1", 1, 1000.0)).ok
    assert up.handle(update("v3", 3, 3000.0)).ok
    assert flash_mod.rollback(root, tolerance=1e-5) == ("A", "v1")
    assert slots.floor() == {"model_version": "v3", "issued_at": 3000.0}

    refused = up.handle(v2)

    assert (refused.ok, refused.reason) == (
        False,
        "update v2 was issued before model v3, the newest this gateway has run "
        "(it now runs the older v1); refusing a downgrade: publish a newer update",
    )
    assert (slots.active(), slots.info("B")["model_version"]) == ("A", "v3")

    # A slots.json written before the record kept it: the slots still tell.
    state = json.loads((slots.dir / "slots.json").read_text())
    del state[flash_mod.NEWEST]
    (slots.dir / "slots.json").write_text(json.dumps(state))
    up._last = None  # handled anew, as after a restart
    assert up.handle(v2).reason == refused.reason

    # A newer update still installs, and raises the floor.
    result = up.handle(update("v4", 4, 4000.0))
    assert (result.ok, result.version, slots.active()) == (True, "v4", "B")
    assert slots.floor() == {"model_version": "v4", "issued_at": 4000.0}


def test_a_model_never_made_active_is_no_floor(tmp_path, keys):
    """An install that failed before its switch does not hold updates back."""
    slots = ModelSlots(tmp_path / "models")
    up = ModelUpdater(keys[1], slots.dir, tolerance=1e-5, **HERE)
    v1 = make_artifact(tmp_path / "v1", version="v1", seed=1)
    assert up.handle(pack_update(v1, keys[0], issued_at=1000.0, **TARGET).message).ok
    staged = slots.staging()
    (staged / "x").write_text("half an update")
    slots.install("B", staged, {"model_version": "v9", "issued_at": 9000.0})

    assert slots.floor() == {"model_version": "v1", "issued_at": 1000.0}


# ---------------------------------------------------------------- 3. the flash lock


def test_try_lock_without_a_pid_leaves_the_file_unwritten(tmp_path):
    path = tmp_path / "held.lock"
    path.write_text("as made\n")

    fd = locks.try_lock(path, write_pid=False)
    try:
        assert fd is not None
        assert path.read_text() == "as made\n"
        assert locks.try_lock(path, write_pid=False) is None  # held
    finally:
        os.close(fd)

    with pytest.raises(FileNotFoundError):
        locks.try_lock(tmp_path / "absent.lock", write_pid=False, create=False)
    assert not (tmp_path / "absent.lock").exists()
    fd = locks.try_lock(tmp_path / "pid.lock")  # the default still notes the pid
    os.close(fd)
    assert (tmp_path / "pid.lock").read_text() == f"{os.getpid()}\n"


def test_the_flash_lock_is_taken_through_try_lock_and_stays_empty(
    tmp_path, monkeypatch
):
    calls = []
    real = locks.try_lock

    def spy(path, **options):
        calls.append((Path(path).name, options))
        return real(path, **options)

    monkeypatch.setattr(locks, "try_lock", spy)
    layout = GatewayLayout(tmp_path / "root")
    lock = layout.opt / flash_mod.LOCK_FILE

    assert flash_mod.hold_flash_lock(layout.models) is None  # no file: none made
    assert not lock.exists()
    held = flash_mod._take_flash_lock(layout)
    try:
        with pytest.raises(BlockingIOError):
            flash_mod.hold_flash_lock(layout.models)
    finally:
        os.close(held)
    held = flash_mod.hold_flash_lock(layout.models)
    try:
        with pytest.raises(UsageError, match="another flash of"):
            flash_mod._take_flash_lock(layout)
    finally:
        os.close(held)

    assert lock.read_bytes() == b""
    assert calls == [
        (".flash.lock", {"write_pid": False, "create": False}),
        (".flash.lock", {"write_pid": False}),
        (".flash.lock", {"write_pid": False, "create": False}),
        (".flash.lock", {"write_pid": False, "create": False}),
        (".flash.lock", {"write_pid": False}),
    ]


# ------------------------------------------------- 4. build times within a second


def _bundle(tmp_path, keys, wheel, name: str, built: float) -> Path:
    art = make_artifact(tmp_path / f"art-{name}", version="m1", seed=1)
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(CONFIG + ("tls_insecure = false\n" if name == "new" else ""))
    out = tmp_path / f"{name}.tar.gz"
    bundle.build_bundle(art, cfg, keys[0], out, wheels=[wheel], created_ts=built)
    return out


def test_of_two_bundles_built_in_one_second_the_older_is_refused(
    tmp_path, keys, agent_wheel, empty_release, capsys
):
    second = 1_800_000_000
    old = _bundle(tmp_path, keys, agent_wheel, "old", second + 0.25)
    new = _bundle(tmp_path, keys, agent_wheel, "new", second + 0.75)
    built = json.loads(bundle.verify_bundle(new, keys[1]).raw)["created_ts"]
    assert built == second + 0.75
    root = tmp_path / "root"
    root.mkdir()
    args = ["--root", str(root), "--pubkey", str(keys[1])]
    assert main(["flash", str(new), *args]) == 0
    capsys.readouterr()

    assert main(["flash", str(old), *args]) == 2

    assert capsys.readouterr().err == (
        f"error: bundle {old} (model m1) was built 2027-01-15T08:00:00.250Z, "
        "before the running model m1 was issued 2027-01-15T08:00:00.750Z; "
        "refusing a downgrade (pass --allow-downgrade "
        "to install it anyway, or use rollback to go back to the previous slot)\n"
    )


def test_a_record_in_whole_seconds_still_orders_bundles(
    tmp_path, keys, agent_wheel, empty_release, capsys
):
    """A flashed.json of an older flash (a whole second) against a bundle built
    later in that very second: the bundle is newer, and installs."""
    second = 1_800_000_000
    new = _bundle(tmp_path, keys, agent_wheel, "new", second + 0.5)
    root = tmp_path / "root"
    layout = GatewayLayout(root)
    layout.opt.mkdir(parents=True)
    (layout.opt / "flashed.json").write_text(json.dumps(
        {"created_ts": second, "bundle": "old.tar.gz", "model_version": "m1"}
    ))

    assert main(["flash", str(new), "--root", str(root), "--pubkey",
                 str(keys[1])]) == 0
    record = json.loads((layout.opt / "flashed.json").read_text())
    assert (record["bundle"], record["created_ts"]) == ("new.tar.gz", second + 0.5)
