"""``edge-agent rollback`` on a damaged install (found by a tester, round 18).

With ``models/slots.json`` deleted, rollback said the other slot held no model;
with the ``models/current`` link deleted, that the root had no flashed model; both
exit 2, although ``rollback --help`` gives exit 3 for a damaged install. Each
damage here is now one ``error:`` line with exit 3 that names the damaged file
and says how to repair it, and every file under the root stays as it was; the
repair it names works. A root never flashed, or whose first flash did not finish,
keeps exit 2. The venv install is replaced by an empty release (as in
``test_flash_reflash.py``), so the module runs in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

from edge_agent import flash as flash_mod  # noqa: E402
from edge_agent.cli import main  # noqa: E402
from tests import test_flash_reflash as reflash  # noqa: E402
from tests.test_flash import snapshot  # noqa: E402
from tests.test_flash_findings15 import (  # noqa: E402
    flash_killed_before_its_switch,
)

agent_wheel = reflash.agent_wheel
keys = reflash.keys
empty_release = reflash.empty_release


@pytest.fixture
def flashed(tmp_path, keys, agent_wheel, empty_release, capsys):
    """A root flashed with model gw1, then gw2 (slot A: gw1, slot B: gw2 active),
    its models folder and the gw2 bundle."""
    root = tmp_path / "root"
    root.mkdir()
    gw1 = reflash._bundle(tmp_path, keys, agent_wheel, "gw1", 1)
    gw2 = reflash._bundle(tmp_path, keys, agent_wheel, "gw2", 2)  # built after
    for out in (gw1, gw2):
        assert main(_flash_args(out, root, keys)) == 0
    assert os.readlink(flash_mod.GatewayLayout(root).models / "current") == "B"
    capsys.readouterr()
    return root, flash_mod.GatewayLayout(root).models, gw2


def _flash_args(out: Path, root: Path, keys) -> list[str]:
    return ["flash", str(out), "--root", str(root), "--pubkey", str(keys[1])]


def _relink(link: Path, target: str) -> None:
    link.unlink()
    os.symlink(target, link)


def _into_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


# name: (what damages the models folder, the path the error names, the repair)
DAMAGE = {
    "slots.json deleted": (
        lambda m: (m / "slots.json").unlink(), "slots.json", "flash again"
    ),
    "current deleted": (lambda m: (m / "current").unlink(), "current", "flash again"),
    "current and slots.json deleted": (
        lambda m: ((m / "current").unlink(), (m / "slots.json").unlink()),
        "current",
        "flash again",
    ),
    "current points at a deleted slot": (
        lambda m: shutil.rmtree(m / "B"), "current", "flash again"
    ),
    "current points outside the slots": (
        lambda m: _relink(m / "current", "../B"), "current", "move aside"
    ),
    "current a folder": (
        lambda m: _into_folder(m / "current"), "current", "move aside"
    ),
    "slots.json not JSON": (
        lambda m: (m / "slots.json").write_text('{"A": '), "slots.json", "move aside"
    ),
    "slots.json a folder": (
        lambda m: _into_folder(m / "slots.json"), "slots.json", "move aside"
    ),
}

REPAIR = {
    "flash again": "flash the bundle again",
    "move aside": "move it aside and flash the bundle again",
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_rollback_of_a_damaged_install_exits_3_naming_the_file(
    case, flashed, capsys
):
    root, models, _ = flashed
    damage, named, repair = DAMAGE[case]
    damage(models)
    before = snapshot(root)
    state = (models / "slots.json").read_bytes() if (
        models / "slots.json").is_file() else None

    rc = main(["rollback", "--root", str(root)])

    err = capsys.readouterr().err
    assert rc == 3, err
    assert err.startswith(f"error: {models / named}: ")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "damaged install" in err and "nothing was switched" in err
    assert err.rstrip("\n").endswith(REPAIR[repair])
    # Rollback did not make it worse: nothing under the root changed.
    assert snapshot(root) == before
    if state is not None:
        assert (models / "slots.json").read_bytes() == state


@pytest.mark.parametrize("case", list(DAMAGE))
def test_the_repair_the_error_names_works(case, flashed, keys, capsys):
    root, models, gw2 = flashed
    damage, named, repair = DAMAGE[case]
    damage(models)
    assert main(["rollback", "--root", str(root)]) == 3
    if repair == "move aside":
        (models / named).rename(models / f"{named}.damaged")

    assert main(_flash_args(gw2, root, keys)) == 0

    assert os.readlink(models / "current") in ("A", "B")
    assert (models / os.readlink(models / "current") / "model.onnx").is_file()
    state = json.loads((models / "slots.json").read_text())
    assert state[os.readlink(models / "current")]["model_version"] == "gw2"


def test_slots_json_deleted_does_not_say_the_other_slot_is_empty(flashed, capsys):
    """The tester's first report, word for word."""
    root, models, _ = flashed
    (models / "slots.json").unlink()

    assert main(["rollback", "--root", str(root)]) == 3

    err = capsys.readouterr().err
    assert "holds no model" not in err
    assert "slot B" in err  # where current points


def test_current_deleted_does_not_say_the_root_was_never_flashed(flashed, capsys):
    """The tester's second report: slots.json still records both models."""
    root, models, _ = flashed
    (models / "current").unlink()

    assert main(["rollback", "--root", str(root)]) == 3

    err = capsys.readouterr().err
    assert "no flashed model" not in err
    assert "gw1" in err and "gw2" in err


@pytest.mark.parametrize("models", [False, True], ids=["no models", "empty models"])
def test_a_root_never_flashed_keeps_exit_2(tmp_path, models, capsys):
    root = tmp_path / "root"
    root.mkdir()
    if models:
        flash_mod.GatewayLayout(root).models.mkdir(parents=True)
    before = snapshot(root)

    assert main(["rollback", "--root", str(root)]) == 2

    assert capsys.readouterr().err == (
        f"error: {root} has no flashed model to roll back from\n"
    )
    assert snapshot(root) == before


def test_a_first_flash_killed_before_its_switch_keeps_exit_2(
    tmp_path, keys, agent_wheel, empty_release, monkeypatch, capsys
):
    """No current link, and slots.json records only a model that never ran: not
    a damaged install but one never finished."""
    root = tmp_path / "root"
    root.mkdir()
    gw1 = reflash._bundle(tmp_path, keys, agent_wheel, "gw1", 1)

    flash_killed_before_its_switch(monkeypatch, gw1, root, keys[1])
    models = flash_mod.GatewayLayout(root).models
    assert json.loads((models / "slots.json").read_text())["A"]["never_active"]
    assert not (models / "current").is_symlink()
    before = snapshot(root)
    capsys.readouterr()

    assert main(["rollback", "--root", str(root)]) == 2

    assert capsys.readouterr().err == (
        f"error: {root} has no flashed model to roll back from\n"
    )
    assert snapshot(root) == before


def test_a_deleted_slot_to_go_back_to_is_nothing_to_roll_back_to(flashed, capsys):
    """The other slot's folder gone is the other slot empty (exit 2, as the help
    says), and the line says which folder is missing."""
    root, models, _ = flashed
    shutil.rmtree(models / "A")
    before = snapshot(root)

    assert main(["rollback", "--root", str(root)]) == 2

    err = capsys.readouterr().err
    assert err.startswith("error: model slot A holds no model to roll back to")
    assert str(models / "A") in err
    assert snapshot(root) == before


def test_the_help_gives_the_exit_codes_rollback_uses(capsys):
    with pytest.raises(SystemExit):
        main(["rollback", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "2 nothing to roll back to" in text
    assert "3 a damaged install (models/slots.json or the models/current link)" in text
