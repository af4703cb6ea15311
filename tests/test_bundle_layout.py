"""What a bundle must agree on with the gateway it is flashed to.

The site's calibrated thresholds travel with the model; the bundled config points at
the flashed layout (``/opt/gatewatch/models/current``, ``/etc/gatewatch/update.pub``);
flash refuses a bundle older than the running model unless told otherwise. Bundles
here carry only the agent's own wheel, and every flash stops before the venv install,
so the module runs in seconds; the full install is in ``test_flash.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import pytest

from edge_agent import bundle, signing
from edge_agent import flash as flash_mod
from edge_agent.cli import main
from flows.errors import BadInputError, UsageError
from tests.test_bundle import CONFIG
from tests.test_flash import snapshot
from tests.test_ota_artifacts import make_artifact

REPO = Path(__file__).resolve().parent.parent

SITE = {
    "decision": 0.25,
    "escalate_low": 0.25,
    "alert": 0.95,
    "target_fpr": 0.01,
    "model_version": "b-0001",
}


@pytest.fixture(scope="module")
def agent_wheel(tmp_path_factory) -> Path:
    """The agent's wheel, built once for this module from the working tree."""
    return bundle.build_agent_wheel(REPO, tmp_path_factory.mktemp("wheel"))


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return signing.generate_keypair(tmp_path / "keys")


def _build(tmp_path, keys, agent_wheel, *, config=CONFIG, site=None, name="gw"):
    """A bundle of a fresh artifact (with ``site`` as its site_thresholds.json)."""
    artifact = make_artifact(tmp_path / f"artifact-{name}", version="b-0001")
    if site is not None:
        (artifact / "site_thresholds.json").write_text(json.dumps(site))
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(config)
    out = tmp_path / f"{name}.tar.gz"
    bundle.build_bundle(artifact, cfg, keys[0], out, wheels=[agent_wheel])
    return out, artifact


# ----------------------------------------------------------------- site thresholds


def test_the_bundle_packs_the_file_the_agent_reads():
    from edge_agent import agent

    assert bundle.SITE_THRESHOLDS == agent.SITE_THRESHOLDS == "site_thresholds.json"


def test_site_thresholds_travel_signed_in_the_bundle(
    tmp_path, keys, agent_wheel, monkeypatch, capsys
):
    artifact = make_artifact(tmp_path / "artifact", version="b-0001")
    site_file = artifact / "site_thresholds.json"
    site_file.write_text(json.dumps(SITE))
    config = tmp_path / "gateway.toml"
    config.write_text(CONFIG)
    out = tmp_path / "gw.tar.gz"
    # The CLI path, with the wheel build and download replaced by the built wheel.
    monkeypatch.setattr(bundle, "build_agent_wheel",
                        lambda src, outdir, **kw: agent_wheel)
    monkeypatch.setattr(bundle, "runtime_wheels", lambda *a, **k: [])

    rc = main(
        [
            "bundle",
            "--artifact",
            str(artifact),
            "--config",
            str(config),
            "--key",
            str(keys[0]),
            "-o",
            str(out),
        ]
    )

    assert rc == 0
    assert "site thresholds model/site_thresholds.json included" in (
        capsys.readouterr().out
    )
    unpacked = tmp_path / "unpacked"
    manifest = bundle.verify_bundle(out, keys[1], extract_to=unpacked)
    entry = manifest.files["model/site_thresholds.json"]
    assert entry.sha256 == hashlib.sha256(site_file.read_bytes()).hexdigest()
    assert entry.size == site_file.stat().st_size
    assert json.loads((unpacked / "model" / "site_thresholds.json").read_text()) == SITE


def test_a_bundle_without_site_thresholds_says_so(
    tmp_path, keys, agent_wheel, monkeypatch, capsys
):
    artifact = make_artifact(tmp_path / "artifact", version="b-0001")
    config = tmp_path / "gateway.toml"
    config.write_text(CONFIG)
    monkeypatch.setattr(bundle, "build_agent_wheel",
                        lambda src, outdir, **kw: agent_wheel)
    monkeypatch.setattr(bundle, "runtime_wheels", lambda *a, **k: [])
    args = ["--config", str(config), "--key", str(keys[0])]

    rc = main(["bundle", "--artifact", str(artifact), *args, "-o", str(tmp_path / "b")])

    assert rc == 0
    out = capsys.readouterr().out
    assert f"no site_thresholds.json in {artifact}: the model's own thresholds" in out


BAD_SITE = {
    "alert above 1": ({**SITE, "alert": 1.5}, "threshold 'alert' is 1.5"),
    "no escalate_low": (
        {k: v for k, v in SITE.items() if k != "escalate_low"},
        "lacks 'escalate_low'",
    ),
    "another model": (
        {**SITE, "model_version": "b-0000"},
        "was calibrated for model 'b-0000', but the artifact is model 'b-0001'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SITE))
def test_bad_site_thresholds_are_refused_before_signing(
    case, tmp_path, keys, agent_wheel
):
    site, message = BAD_SITE[case]

    with pytest.raises(BadInputError, match=message) as caught:
        _build(tmp_path, keys, agent_wheel, site=site)

    assert "site_thresholds.json" in str(caught.value)
    assert not (tmp_path / "gw.tar.gz").exists()


def test_linked_site_thresholds_are_refused(tmp_path, keys, agent_wheel):
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps(SITE))
    artifact = make_artifact(tmp_path / "artifact", version="b-0001")
    (artifact / "site_thresholds.json").symlink_to(elsewhere)
    config = tmp_path / "gateway.toml"
    config.write_text(CONFIG)

    with pytest.raises(BadInputError, match="is not a regular file"):
        bundle.build_bundle(
            artifact, config, keys[0], tmp_path / "gw.tar.gz", wheels=[agent_wheel]
        )


# ------------------------------------------------------------------- config paths


WRONG_PATHS = {
    "old example path": (
        CONFIG.replace("/opt/gatewatch/models/current", "/opt/gatewatch/artifact"),
        "artifact is '/opt/gatewatch/artifact', but flash installs it at "
        "'/opt/gatewatch/models/current'",
    ),
    "a slot, not the link": (
        CONFIG.replace("models/current", "models/A"),
        "artifact is '/opt/gatewatch/models/A'",
    ),
    "relative": (
        CONFIG.replace(
            '"/opt/gatewatch/models/current"', '"opt/gatewatch/models/current"'
        ),
        "artifact is 'opt/gatewatch/models/current'",
    ),
    "no artifact": (
        CONFIG.replace('artifact = "/opt/gatewatch/models/current"\n', ""),
        "artifact is not set; the flashed agent runs with --config only, so set "
        'artifact = "/opt/gatewatch/models/current"',
    ),
    "another key file": (
        CONFIG.replace("update.pub", "ota.pub"),
        "update_public_key is '/etc/gatewatch/ota.pub', but flash installs it at "
        "'/etc/gatewatch/update.pub'",
    ),
    "under [agent]": (
        "[agent]\n" + CONFIG.replace("models/current", "model"),
        "artifact is '/opt/gatewatch/model'",
    ),
    # Found: an outbox outside the unit's writable folders (ProtectHome/System).
    "outbox in a home": (
        CONFIG + 'outbox = "/home/pi/outbox.sqlite"\n',
        "outbox is '/home/pi/outbox.sqlite', but the flashed agent may write only "
        "under /var/lib/gatewatch",
    ),
    "alerts under /var/log": (
        CONFIG + 'alerts = "/var/log/gatewatch/alerts.jsonl"\n',
        "alerts is '/var/log/gatewatch/alerts.jsonl', but the flashed agent may "
        "write only under /var/lib/gatewatch",
    ),
    "the state folder itself": (
        CONFIG + 'summary_json = "/var/lib/gatewatch"\n',
        "summary_json is '/var/lib/gatewatch', but",
    ),
}


@pytest.mark.parametrize("case", list(WRONG_PATHS))
def test_bundle_refuses_a_config_that_misses_the_flashed_layout(
    case, tmp_path, keys, capsys
):
    text, message = WRONG_PATHS[case]
    artifact = make_artifact(tmp_path / "artifact", version="b-0001")
    config = tmp_path / "gateway.toml"
    config.write_text(text)
    out = tmp_path / "gw.tar.gz"

    with pytest.raises(UsageError, match=message.replace("[", r"\[")):
        bundle.build_bundle(artifact, config, keys[0], out, wheels=[])

    # The CLI refuses before any wheel is built: exit 2, one error line, no bundle.
    rc = main(
        [
            "bundle",
            "--artifact",
            str(artifact),
            "--config",
            str(config),
            "--key",
            str(keys[0]),
            "-o",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"error: config {config}: ")
    assert message in err
    assert "Traceback" not in err
    assert not out.exists()


def test_the_flashed_layout_and_the_config_without_key_pass(tmp_path, keys):
    artifact = make_artifact(tmp_path / "artifact", version="b-0001")
    config = tmp_path / "gateway.toml"
    wheel = tmp_path / "gatewatch-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"not really a wheel")  # only its name and hash are read
    for text in (
        CONFIG,
        CONFIG.replace('update_public_key = "/etc/gatewatch/update.pub"\n', ""),
        "[agent]\n" + CONFIG.replace("current", "current/"),
        CONFIG.replace('"/opt', f'"{tmp_path}/root/opt').replace(
            '"/etc', f'"{tmp_path}/root/etc'
        ),
        CONFIG + 'outbox = "/var/lib/gatewatch/outbox.sqlite"\nalerts = "-"\n',
        CONFIG + 'alerts = "/var/lib/gatewatch/alerts.jsonl"\n',
    ):
        config.write_text(text)
        manifest = bundle.build_bundle(
            artifact, config, keys[0], tmp_path / "gw.tar.gz", wheels=[wheel]
        )
        assert manifest.model_version == "b-0001"


# ----------------------------------------------------------------- flash checks


class _ReachedInstall(Exception):
    """Raised in place of the venv install: every check before it passed."""


@pytest.fixture
def no_install(monkeypatch):
    """Stop flash where it would start installing (after all its checks)."""

    def stop(*args, **kwargs):
        raise _ReachedInstall

    monkeypatch.setattr(flash_mod, "_install_release", stop)


def test_flash_refuses_a_config_for_another_root(tmp_path, keys, agent_wheel, capsys):
    other = tmp_path / "other-root"
    config = CONFIG.replace('"/opt', f'"{other}/opt')
    out, _ = _build(tmp_path, keys, agent_wheel, config=config)
    root = tmp_path / "root"
    root.mkdir()

    with pytest.raises(UsageError) as caught:
        flash_mod.flash(out, root, keys[1])

    assert str(caught.value) == (
        f"config config/gateway.toml of the bundle: artifact is "
        f"'{other}/opt/gatewatch/models/current', but flash installs it at "
        f"'/opt/gatewatch/models/current' (or {root}/opt/gatewatch/models/current "
        f"for an agent run from {root} itself); set artifact = "
        f'"/opt/gatewatch/models/current"'
    )
    assert list(root.iterdir()) == []
    rc = main(["flash", str(out), "--root", str(root), "--pubkey", str(keys[1])])
    assert rc == 2
    assert "error: config config/gateway.toml of the bundle" in capsys.readouterr().err


def test_flash_accepts_its_own_root_and_the_gateway_paths(
    tmp_path, keys, agent_wheel, no_install
):
    root = tmp_path / "root"
    root.mkdir()
    config = CONFIG.replace('"/opt', f'"{root}/opt').replace('"/etc', f'"{root}/etc')
    for name, text in (("prefixed", config), ("gateway", CONFIG)):
        out, _ = _build(tmp_path, keys, agent_wheel, config=text, name=name)
        with pytest.raises(_ReachedInstall):
            flash_mod.flash(out, root, keys[1])


def _flashed_root(root: Path, issued_at: float | None, version: str = "b-0009"):
    """A root whose slot A runs ``version``, issued at ``issued_at``."""
    models = root / "opt" / "gatewatch" / "models"
    (models / "A").mkdir(parents=True)
    os.symlink("A", models / "current")
    info = {"model_version": version, "issued_at": issued_at, "source": "test"}
    (models / "slots.json").write_text(json.dumps({"A": info, "B": None}))
    return models


def test_flash_refuses_a_downgrade_unless_allowed(
    tmp_path, keys, agent_wheel, no_install, capsys, caplog
):
    out, _ = _build(tmp_path, keys, agent_wheel)
    built = json.loads(bundle.verify_bundle(out, keys[1]).raw)["created_ts"]
    root = tmp_path / "root"
    _flashed_root(root, issued_at=built + 3600)
    before = snapshot(root)

    with pytest.raises(UsageError) as caught:
        flash_mod.flash(out, root, keys[1])

    message = str(caught.value)
    assert message.startswith(f"bundle {out} (model b-0001) was built ")
    assert "before the running model b-0009 was issued " in message
    assert message.endswith(
        "; refusing a downgrade (pass --allow-downgrade to install it anyway, or use "
        "rollback to go back to the previous slot)"
    )
    assert snapshot(root) == before
    args = ["flash", str(out), "--root", str(root), "--pubkey", str(keys[1])]
    assert main(args) == 2
    assert "refusing a downgrade" in capsys.readouterr().err
    assert snapshot(root) == before

    # --allow-downgrade gets past the check (to the install), with a warning.
    with caplog.at_level(logging.WARNING, logger="gatewatch.edge_agent"):
        with pytest.raises(_ReachedInstall):
            flash_mod.flash(out, root, keys[1], allow_downgrade=True)
    assert "installing it anyway (--allow-downgrade)" in caplog.text


def test_flash_after_a_rollback_refuses_a_bundle_older_than_the_newest_model(
    tmp_path, keys, agent_wheel, no_install
):
    # Found: flash compared a bundle with the running model only, so after a
    # rollback to an older model it installed a bundle that a model update issued
    # at the same time is refused as (the floor: the newest model ever active).
    out, _ = _build(tmp_path, keys, agent_wheel)
    built = json.loads(bundle.verify_bundle(out, keys[1]).raw)["created_ts"]
    root = tmp_path / "root"
    models = _flashed_root(root, issued_at=built - 3600, version="b-0005")
    (models / "B").mkdir()
    newer = {"model_version": "b-0009", "issued_at": built + 3600, "source": "test"}
    state = json.loads((models / "slots.json").read_text())
    state.update(B=newer, newest_active={"model_version": "b-0009",
                                         "issued_at": built + 3600})
    (models / "slots.json").write_text(json.dumps(state))
    before = snapshot(root)

    with pytest.raises(UsageError) as caught:
        flash_mod.flash(out, root, keys[1])

    message = str(caught.value)
    assert message.startswith(f"bundle {out} (model b-0001) was built ")
    assert ("before model b-0009, the newest ever active here (running b-0005 "
            "after a rollback), was issued ") in message
    assert message.endswith("refusing a downgrade (pass --allow-downgrade to "
                            "install it anyway, or use rollback to go back to the "
                            "previous slot)")
    assert snapshot(root) == before
    with pytest.raises(_ReachedInstall):
        flash_mod.flash(out, root, keys[1], allow_downgrade=True)


def test_flash_takes_a_newer_or_the_same_bundle(
    tmp_path, keys, agent_wheel, no_install
):
    out, _ = _build(tmp_path, keys, agent_wheel)
    built = json.loads(bundle.verify_bundle(out, keys[1]).raw)["created_ts"]
    for issued in (built - 3600, built, None):
        root = tmp_path / f"root-{issued}"
        _flashed_root(root, issued_at=issued)
        with pytest.raises(_ReachedInstall):
            flash_mod.flash(out, root, keys[1])


def test_flash_into_a_root_with_a_damaged_slot_record_is_refused(
    tmp_path, keys, agent_wheel, capsys
):
    out, _ = _build(tmp_path, keys, agent_wheel)
    root = tmp_path / "root"
    models = _flashed_root(root, issued_at=time.time())
    (models / "slots.json").write_text('{"A": 5, "B": [1]}')

    args = ["flash", str(out), "--root", str(root), "--pubkey", str(keys[1])]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert err.startswith(f"error: {models / 'slots.json'}: slot A is recorded as a ")
    assert "Traceback" not in err


@pytest.mark.parametrize("missing", ["root", "root/sub", "dangling-link"])
def test_flash_refuses_a_root_that_does_not_exist(
    tmp_path, keys, agent_wheel, capsys, missing
):
    """Found: a mistyped --root was made, and a whole gateway flashed into it."""
    out, _ = _build(tmp_path, keys, agent_wheel)
    if missing == "dangling-link":
        os.symlink(tmp_path / "gone", tmp_path / missing)
    root = tmp_path / missing
    before = sorted(p.name for p in tmp_path.iterdir())

    args = ["flash", str(out), "--root", str(root), "--pubkey", str(keys[1])]
    assert main(args) == 2

    errors = [
        line for line in capsys.readouterr().err.splitlines()
        if line.startswith("error:")
    ]
    assert errors == [
        f"error: --root {root} does not exist; flash installs into an existing "
        "gateway root (make the folder first if a new one is meant)"
    ]
    assert not root.exists() and not (tmp_path / "gone").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before



@pytest.mark.parametrize("command", ["flash", "rollback"])
def test_an_empty_root_is_refused_not_read_as_the_current_folder(
    tmp_path, keys, capsys, monkeypatch, command
):
    """Found: ``--root ""`` (an unset ``$GW_ROOT``) passed the missing-root check
    as ``.``, so a valid bundle would have flashed into the working folder."""
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [command, "--root", ""]
    if command == "flash":
        args = ["flash", str(tmp_path / "any.bundle"), "--root", "",
                "--pubkey", str(keys[1])]

    with pytest.raises(SystemExit) as exc:
        main(args)

    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --root: is empty (an unset shell variable?)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ------------------------------------------------------------- the rest of the config


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('source = "zeek:/var/log/zeek/current/conn.log"\n', ""),
         "--source is required"),
        (('site = "plant-3"', 'site = "plant 3"'), "site"),
        (('follow = true', 'follow = true\nmax_batch = 99999'),
         "max_batch must be 1..4096"),
        (('follow = true', 'follow = true\ncolour = "red"'),
         "unknown key 'colour'"),
    ],
    ids=["no-source", "bad-site", "max-batch", "unknown-key"],
)
def test_a_config_the_agent_would_refuse_is_refused_at_bundle_time(
    tmp_path, keys, agent_wheel, change, message
) -> None:
    """Found: only the paths were checked, so a bundle whose config lacked
    ``source`` (or held an unknown key) flashed and then failed on the gateway."""
    with pytest.raises(UsageError) as caught:
        _build(tmp_path, keys, agent_wheel, config=CONFIG.replace(*change))

    assert message in str(caught.value)
    assert "the flashed agent runs with this config alone" in str(caught.value)
    assert not (tmp_path / "gw.tar.gz").exists()


def test_the_unit_puts_the_default_outbox_in_its_state_folder(monkeypatch):
    """Found: the unit hid $HOME (ProtectHome) and set no XDG_STATE_HOME, so the
    default outbox (~/.local/state/gatewatch) could not be written."""
    from edge_agent.config import default_state_dir

    unit = bundle.systemd_unit().splitlines()
    env = [line for line in unit if line.startswith("Environment=XDG_STATE_HOME=")]
    assert len(env) == 1
    monkeypatch.setenv("XDG_STATE_HOME", env[0].split("=", 2)[2])
    state = default_state_dir()
    writable = next(line for line in unit if line.startswith("ReadWritePaths="))
    assert str(state) in writable.split("=", 1)[1].split()
    assert "StateDirectory=gatewatch" in unit and state == Path("/var/lib/gatewatch")


def test_flash_keeps_the_gateway_update_key_unless_told_to_replace_it(
    tmp_path, keys, agent_wheel, no_install, capsys
):
    out, _ = _build(tmp_path, keys, agent_wheel)
    root = tmp_path / "root"
    _flashed_root(root, issued_at=None)
    installed = root / bundle.UPDATE_KEY_FILE
    installed.parent.mkdir(parents=True, exist_ok=True)
    other = signing.generate_keypair(tmp_path / "other-keys")
    installed.write_bytes(Path(other[1]).read_bytes())
    before = snapshot(root)

    # Another key than the one the root trusts: refused before anything changes.
    args = ["flash", str(out), "--root", str(root), "--pubkey", str(keys[1])]
    assert main(args) == 2
    err = capsys.readouterr().err
    old_id = signing.key_id(signing.load_public_key(other[1]))
    new_id = signing.key_id(signing.load_public_key(keys[1]))
    assert err.startswith(f"error: {installed} holds update key {old_id} ")
    assert f"is another key ({new_id})" in err and "--replace-key" in err
    assert snapshot(root) == before

    # The same key, or --replace-key, gets past the check (to the install).
    with pytest.raises(_ReachedInstall):
        flash_mod.flash(out, root, keys[1], replace_key=True)
    installed.write_bytes(Path(keys[1]).read_bytes())
    with pytest.raises(_ReachedInstall):
        flash_mod.flash(out, root, keys[1])

    # A key file that is not a key is not replaced silently either.
    installed.write_text("not a key\n")
    with pytest.raises(UsageError, match="cannot be read as the gateway's update"):
        flash_mod.flash(out, root, keys[1])
