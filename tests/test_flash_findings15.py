"""Flash findings of round 15: replayed old bundles, failed writes, killed flashes.

A bundle built before the last one flashed on a root is a downgrade even when it
carries the running model; a full disk or a read-only root is one ``error:`` line
that keeps the previous install; a flash killed after the model install leaves a
slot that rollback refuses; leftovers of killed flashes are removed by the next;
a bundle with bytes appended says so. The venv install is replaced by an empty
release (as in ``test_flash_reflash.py``), so the module runs in seconds.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

from edge_agent import bundle  # noqa: E402
from edge_agent import flash as flash_mod  # noqa: E402
from edge_agent.cli import main  # noqa: E402
from edge_agent.ota import ModelUpdater, pack_update  # noqa: E402
from tests import test_bundle_layout as layout_tests  # noqa: E402
from tests import test_flash_reflash as reflash_tests  # noqa: E402
from tests.test_bundle import CONFIG  # noqa: E402
from tests.test_flash import snapshot  # noqa: E402
from tests.test_ota_artifacts import flashed_slots, make_artifact  # noqa: E402

# The gateway the updates here are signed for, and the updater's own ids.
TARGET = {"site": "plant-3", "gateways": ["gw-17"]}
HERE = {"site": "plant-3", "gateway": "gw-17"}

agent_wheel = layout_tests.agent_wheel
keys = layout_tests.keys
empty_release = reflash_tests.empty_release


def _bundle(tmp_path: Path, keys, agent_wheel, name: str, version: str,
            config: str = CONFIG) -> Path:
    """A signed bundle ``name`` of model ``version`` (seed 1: the same files for
    the same version) with ``config``."""
    artifact = make_artifact(tmp_path / f"art-{name}", version=version, seed=1)
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(config)
    out = tmp_path / f"{name}.tar.gz"
    bundle.build_bundle(artifact, cfg, keys[0], out, wheels=[agent_wheel])
    return out


def _built(out: Path, keys) -> float:
    """The build time the bundle's signed manifest gives."""
    return float(json.loads(bundle.verify_bundle(out, keys[1]).raw)["created_ts"])


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    return root


def _files(root: Path) -> dict[str, tuple]:
    """:func:`snapshot` of the files and links under ``root``, but the flash lock
    (made empty by the first flash and never written; left out all the same, so
    that a test need not care which flash made it) and folders (whose times a
    staging folder made and removed again changes)."""
    return {
        name: entry
        for name, entry in snapshot(root).items()
        if not stat.S_ISDIR(entry[0]) and not name.endswith(".flash.lock")
    }


def _flash_args(out: Path, root: Path, keys) -> list[str]:
    return ["flash", str(out), "--root", str(root), "--pubkey", str(keys[1])]


# ------------------------------------------------------ 1. replay of an older bundle


def test_an_older_bundle_with_the_running_model_is_refused_as_a_downgrade(
    tmp_path, keys, agent_wheel, empty_release, capsys
):
    old = _bundle(tmp_path, keys, agent_wheel, "old", "m1")
    time.sleep(1.1)  # created_ts is in seconds
    newer = CONFIG + "tls_insecure = false\n"
    new = _bundle(tmp_path, keys, agent_wheel, "new", "m1", config=newer)
    root = _root(tmp_path)
    layout = flash_mod.GatewayLayout(root)
    assert main(_flash_args(old, root, keys)) == 0
    # The same model: its slot (and its issue time, old's build) stays as it is.
    assert main(_flash_args(new, root, keys)) == 0
    assert "model m1 was already active in slot A" in capsys.readouterr().out
    record = json.loads((layout.opt / "flashed.json").read_text())
    assert (record["bundle"], record["created_ts"]) == ("new.tar.gz", _built(new, keys))
    capsys.readouterr()
    before = snapshot(root)

    assert main(_flash_args(old, root, keys)) == 2

    err = capsys.readouterr().err
    assert err == (
        f"error: bundle {old} (model m1) was built "
        f"{flash_mod._utc(_built(old, keys))}, before bundle new.tar.gz (model m1), "
        f"flashed on this root, was built {flash_mod._utc(_built(new, keys))}; "
        "refusing a downgrade (pass --allow-downgrade to install it anyway, or use "
        "rollback to go back to the previous slot)\n"
    )
    assert snapshot(root) == before
    assert layout.config.read_text() == newer

    # Asked for, it goes through, and the record names it from then on.
    assert main([*_flash_args(old, root, keys), "--allow-downgrade"]) == 0
    assert layout.config.read_text() == CONFIG
    record = json.loads((layout.opt / "flashed.json").read_text())
    assert (record["bundle"], record["created_ts"]) == ("old.tar.gz", _built(old, keys))


def test_a_root_without_a_flash_record_keeps_the_model_rule_only(
    tmp_path, keys, agent_wheel, empty_release
):
    old = _bundle(tmp_path, keys, agent_wheel, "old", "m1")
    time.sleep(1.1)
    new = _bundle(tmp_path, keys, agent_wheel, "new", "m1")
    root = _root(tmp_path)
    layout = flash_mod.GatewayLayout(root)
    flash_mod.flash(old, root, keys[1])
    flash_mod.flash(new, root, keys[1])
    (layout.opt / "flashed.json").unlink()  # flashed before the record existed

    # Only the running model's issue time (old's build) is there to compare with.
    result = flash_mod.flash(old, root, keys[1])

    assert result.model_kept is True
    assert json.loads((layout.opt / "flashed.json").read_text())["bundle"] == (
        "old.tar.gz"
    )


def _flashed_v1_v2(tmp_path, keys, agent_wheel, capsys):
    """A root flashed with bundle v1, then v2 (slot A: v1, kept for rollback; slot
    B: v2, active), what that printed read away; with bundle v3 built to flash."""
    v1 = _bundle(tmp_path, keys, agent_wheel, "v1", "v1")
    v2 = _bundle(tmp_path, keys, agent_wheel, "v2", "v2")
    v3 = _bundle(tmp_path, keys, agent_wheel, "v3", "v3")
    root = _root(tmp_path)
    assert main(_flash_args(v1, root, keys)) == 0
    assert main(_flash_args(v2, root, keys)) == 0
    capsys.readouterr()
    return root, flash_mod.GatewayLayout(root), v3


# ------------------------------------------- 2. a full disk, a read-only root, order


def test_a_full_disk_at_the_config_is_one_error_line_and_keeps_the_install(
    tmp_path, keys, agent_wheel, empty_release, monkeypatch, capsys
):
    root, layout, v3 = _flashed_v1_v2(tmp_path, keys, agent_wheel, capsys)
    before = _files(root)
    real = flash_mod._write_beside

    def full(path, data, mode=0o644):
        if path == layout.config:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, data, mode)

    monkeypatch.setattr(flash_mod, "_write_beside", full)

    assert main(_flash_args(v3, root, keys)) == 1

    err = capsys.readouterr().err
    assert err == (
        f"error: cannot write {layout.config}: No space left on device; nothing "
        "was switched, the previous install is kept\n"
    )
    # Slot A still holds v1, the rollback target; nothing else changed either.
    assert _files(root) == before
    state = json.loads((layout.models / "slots.json").read_text())
    assert (state["A"]["model_version"], state["B"]["model_version"]) == ("v1", "v2")


def test_a_read_only_root_is_one_error_line(
    tmp_path, keys, agent_wheel, monkeypatch, capsys
):
    v1 = _bundle(tmp_path, keys, agent_wheel, "v1", "v1")
    root = _root(tmp_path)
    layout = flash_mod.GatewayLayout(root)
    release = layout.releases / "x"

    def read_only(*args):
        # What release.mkdir raises on a root mounted read-only.
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(release))

    monkeypatch.setattr(flash_mod, "_install_release", read_only)

    assert main(_flash_args(v1, root, keys)) == 1

    assert capsys.readouterr().err == (
        f"error: cannot write {release}: Read-only file system; nothing was "
        "switched, the previous install is kept\n"
    )


def test_a_lock_that_cannot_be_made_is_one_error_line(
    tmp_path, keys, agent_wheel, monkeypatch, capsys
):
    v1 = _bundle(tmp_path, keys, agent_wheel, "v1", "v1")
    root = _root(tmp_path)
    lock = flash_mod.GatewayLayout(root).opt / ".flash.lock"

    real = os.open

    def read_only(path, *args, **kwargs):
        if str(path) == str(lock):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(flash_mod.os, "open", read_only)

    assert main(_flash_args(v1, root, keys)) == 1

    assert capsys.readouterr().err == (
        f"error: cannot write {lock}: Read-only file system; nothing was "
        "switched, the previous install is kept\n"
    )


# --------------------------------------------- 3. a flash killed after the install


class _Killed(BaseException):
    """Stands for the SIGKILL that ends a flash after its model install."""


def flash_killed_before_its_switch(monkeypatch, bundle: Path, root: Path, key) -> None:
    """Flash ``bundle`` into ``root`` and kill it between its model install and
    the switch of the ``current`` link (the model slot written, never active)."""

    def killed(*args, **kwargs):
        raise _Killed

    with monkeypatch.context() as patch:
        patch.setattr(flash_mod, "_symlink_atomic", killed)
        with pytest.raises(_Killed):
            flash_mod.flash(bundle, root, key)


def test_rollback_refuses_the_model_of_a_flash_killed_after_its_install(
    tmp_path, keys, agent_wheel, empty_release, monkeypatch, capsys
):
    v1 = _bundle(tmp_path, keys, agent_wheel, "v1", "v1")
    v2 = _bundle(tmp_path, keys, agent_wheel, "v2", "v2")
    root = _root(tmp_path)
    layout = flash_mod.GatewayLayout(root)
    assert main(_flash_args(v1, root, keys)) == 0
    capsys.readouterr()

    flash_killed_before_its_switch(monkeypatch, v2, root, keys[1])
    state = json.loads((layout.models / "slots.json").read_text())
    assert state["B"]["model_version"] == "v2" and state["B"]["never_active"] is True
    before = snapshot(layout.models)

    capsys.readouterr()  # what the steps above logged, if a handler is set
    assert main(["rollback", "--root", str(root)]) == 2

    assert capsys.readouterr().err == (
        "error: rollback refused, slot A (v1) stays active: slot B holds model v2, "
        "which was never active (installed by a flash or model update that did "
        "not finish); flash the bundle to install it\n"
    )
    assert os.readlink(layout.models / "current") == "A"
    assert snapshot(layout.models) == before

    # A flash that ends makes its slot an ordinary one again.
    assert main(_flash_args(v2, root, keys)) == 0
    state = json.loads((layout.models / "slots.json").read_text())
    assert "never_active" not in state["A"] and "never_active" not in state["B"]
    assert main(["rollback", "--root", str(root)]) == 0
    assert os.readlink(layout.models / "current") == "A"


# ------------------------------------------------- 4. leftovers of killed flashes


def _dead_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True, timeout=60)
    return int(proc.stdout)


def test_a_later_flash_removes_what_killed_flashes_left(
    tmp_path, keys, agent_wheel, empty_release, monkeypatch
):
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(flash_mod.tempfile, "tempdir", str(temp))
    v1 = _bundle(tmp_path, keys, agent_wheel, "v1", "v1")
    root = _root(tmp_path)
    models = flash_mod.GatewayLayout(root).models
    dead = _dead_pid()
    left = [
        models / f".incoming-{dead}-abcd",
        models / ".incoming-k3j2h1g0",  # unnamed: from before the pid was in it
        temp / f"gatewatch-flash-{dead}-abcd",
    ]
    alive = [
        models / f".incoming-{os.getppid()}-efgh",
        temp / f"gatewatch-flash-{os.getppid()}-efgh",
        # Unnamed and young: an agent of an earlier version may be filling it.
        models / ".incoming-y0ung123",
    ]
    for folder in left + alive:
        (folder / "model").mkdir(parents=True)
        (folder / "model" / "x").write_bytes(b"x" * 64)
    hour_and_more = time.time() - flash_mod.UNNAMED_STAGING_AGE - 60
    os.utime(left[1], (hour_and_more, hour_and_more))

    flash_mod.flash(v1, root, keys[1])

    assert [p.exists() for p in left] == [False, False, False]
    assert [p.exists() for p in alive] == [True, True, True]
    assert sorted(p.name for p in temp.iterdir()) == [alive[1].name]
    assert flash_mod.UNNAMED_STAGING_AGE == 3600.0


# ---------------------------------------------------------- 5. appended bytes


def test_a_bundle_with_bytes_appended_says_so(tmp_path, keys, agent_wheel, capsys):
    v1 = _bundle(tmp_path, keys, agent_wheel, "v1", "v1")
    longer = tmp_path / "longer.tar.gz"
    longer.write_bytes(v1.read_bytes() + b"garbage")
    root = _root(tmp_path)

    assert main(_flash_args(longer, root, keys)) == 3

    assert capsys.readouterr().err == (
        f"error: {longer}: not a single gzip tar (damaged, or with bytes after its "
        "end): Not a gzipped file (b'ga')\n"
    )
    assert list(root.iterdir()) == []


# ------------------------------------------------- 6. review of round 15's changes


def test_a_damaged_flash_record_says_what_to_do_and_allow_downgrade_repairs_it(
    tmp_path, keys, agent_wheel, empty_release, capsys, caplog
):
    v1 = _bundle(tmp_path, keys, agent_wheel, "v1", "v1")
    root = _root(tmp_path)
    layout = flash_mod.GatewayLayout(root)
    assert main(_flash_args(v1, root, keys)) == 0
    record = layout.opt / "flashed.json"
    record.write_text("{not json")
    capsys.readouterr()
    before = _files(root)

    assert main(_flash_args(v1, root, keys)) == 3

    damaged = (
        f"{record}: the record of the last flash is unreadable (Expecting property "
        "name enclosed in double quotes: line 1 column 2 (char 1))"
    )
    assert capsys.readouterr().err == (
        f"error: {damaged}; pass --allow-downgrade to flash anyway (the flash "
        "writes a new record), or remove the file\n"
    )
    assert _files(root) == before

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gatewatch.edge_agent"):
        assert main([*_flash_args(v1, root, keys), "--allow-downgrade"]) == 0

    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"{damaged}; ignoring it (--allow-downgrade): this flash writes a new one"
    ]
    written = json.loads(record.read_text())
    assert (written["bundle"], written["created_ts"]) == ("v1.tar.gz", _built(v1, keys))
    assert main(_flash_args(v1, root, keys)) == 0


def test_a_model_update_and_a_flash_do_not_run_at_once(
    tmp_path, keys, agent_wheel, empty_release, capsys
):
    root = _root(tmp_path)
    layout = flash_mod.GatewayLayout(root)
    v1 = make_artifact(tmp_path / "art-v1", version="v1", seed=1)
    slots = flashed_slots(layout.models, v1, issued_at=1000.0)
    updater = ModelUpdater(keys[1], slots.dir, tolerance=1e-5, **HERE)
    v2 = make_artifact(tmp_path / "art-v2", version="v2", seed=2)
    package = pack_update(v2, keys[0], issued_at=2000.0, **TARGET)
    lock = layout.opt / ".flash.lock"

    held = flash_mod._take_flash_lock(layout)  # a flash installing
    try:
        refused = updater.handle(package.message)
    finally:
        os.close(held)

    assert (refused.ok, refused.reason) == (
        False,
        f"model update v2 not installed: a flash of this gateway is running (it "
        f"holds {lock}); the update is tried again when it comes again",
    )
    assert (slots.active(), slots.info("B")) == ("A", {})
    assert sorted(p.name for p in layout.models.iterdir()) == [
        "A", "current", "slots.json"
    ]

    # An update holds the lock from its install to its switch: a flash waits.
    bundle_v3 = _bundle(tmp_path, keys, agent_wheel, "v3", "v3")
    held = flash_mod.hold_flash_lock(layout.models)
    capsys.readouterr()  # the refusal above may be logged there (a handler set)
    try:
        assert main(_flash_args(bundle_v3, root, keys)) == 2
    finally:
        os.close(held)
    assert capsys.readouterr().err == (
        f"error: another flash of {root} (or a model update of its agent) is "
        f"running (it holds {lock}); wait for it to end\n"
    )

    # Not remembered as handled: the same message, once the flash is over, installs.
    installed = updater.handle(package.message)
    assert (installed.ok, installed.repeated, installed.slot) == (True, False, "B")
    assert slots.active() == "B"


def test_a_later_flash_removes_the_temporary_files_of_killed_flashes(
    tmp_path, keys, agent_wheel, empty_release
):
    v1 = _bundle(tmp_path, keys, agent_wheel, "v1", "v1")
    root = _root(tmp_path)
    layout = flash_mod.GatewayLayout(root)
    dead = _dead_pid()
    left = [
        layout.config.with_name(f".gateway.toml-{dead}-a1"),
        layout.pubkey.with_name(f".update.pub-{dead}-a2"),
        layout.unit.with_name(f".gatewatch-agent.service-{dead}-a3"),
        layout.models / f".slots.json-{dead}-a4",
        layout.opt / f".flashed.json-{dead}-a5",
    ]
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    kept = [
        layout.config.with_name(f".gateway.toml-{os.getppid()}-b1"),  # runs
        layout.config.with_name(".gateway.toml-k3j2h1g0"),  # no pid: whose?
        layout.pubkey.with_name(f".update.pub-{dead}-b2"),  # a link
        layout.unit.with_name(f".gatewatch-agent.service-{dead}-b3"),  # a folder
    ]
    for path in left + kept[:2]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 64)
    kept[2].symlink_to(outside)
    kept[3].mkdir()

    flash_mod.flash(v1, root, keys[1])

    assert [p.exists() for p in left] == [False] * 5
    assert [p.is_symlink() or p.exists() for p in kept] == [True] * 4
    assert outside.read_text() == "keep"

    # The names that flash and model updates write now carry the pid.
    made = flash_mod._write_beside(tmp_path / "x.json", b"{}")
    assert made.name.startswith(f".x.json-{os.getpid()}-")
    calls = []
    real = flash_mod._write_beside

    def spy(path, data, mode=0o644):
        calls.append(path)
        return real(path, data, mode)

    flash_mod_write = flash_mod._write_atomic
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(flash_mod, "_write_beside", spy)
        flash_mod_write(tmp_path / "y.json", b"{}")
    assert calls == [tmp_path / "y.json"]
    assert (tmp_path / "y.json").read_bytes() == b"{}"


def test_a_slot_install_cut_short_leaves_a_slot_rollback_refuses(
    tmp_path, keys, agent_wheel, empty_release, monkeypatch, capsys
):
    root, layout, v3 = _flashed_v1_v2(tmp_path, keys, agent_wheel, capsys)
    before = _files(layout.models)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    real_record = flash_mod.ModelSlots._record

    def record_fails(self, slot, info):
        if info is not None and info.get("never_active"):
            raise full
        real_record(self, slot, info)

    # The record cannot be written: the slot and its record stay as they were.
    with monkeypatch.context() as patch:
        patch.setattr(flash_mod.ModelSlots, "_record", record_fails)
        assert main(_flash_args(v3, root, keys)) == 1
    assert capsys.readouterr().err == (
        f"error: cannot write {layout.models}: No space left on device; nothing "
        "was switched, the previous install is kept\n"
    )
    assert _files(layout.models) == before

    # Killed right after the model is renamed into its slot: the slot is already
    # recorded as the new model, never active, which rollback refuses.
    real_replace = os.replace

    def killed_after(src, dst):
        real_replace(src, dst)
        if Path(dst) == layout.models / "A":
            raise _Killed

    with monkeypatch.context() as patch:
        patch.setattr(flash_mod.os, "replace", killed_after)
        with pytest.raises(_Killed):
            flash_mod.flash(v3, root, keys[1])
    state = json.loads((layout.models / "slots.json").read_text())
    assert (state["A"]["model_version"], state["A"]["never_active"]) == ("v3", True)

    capsys.readouterr()  # what the steps above logged, if a handler is set
    assert main(["rollback", "--root", str(root)]) == 2

    assert capsys.readouterr().err == (
        "error: rollback refused, slot B (v2) stays active: slot A holds model v3, "
        "which was never active (installed by a flash or model update that did "
        "not finish); flash the bundle to install it\n"
    )
    assert os.readlink(layout.models / "current") == "B"
