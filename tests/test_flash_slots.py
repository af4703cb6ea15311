"""The model slot record (``models/slots.json``) read back from a flashed root.

A damaged record is a clear ``error:`` line naming the file and what it should hold,
with exit 3, for ``rollback`` as for anything else that reads it; never a traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edge_agent.cli import main
from edge_agent.flash import ModelSlots
from flows.errors import BadInputError


def _models(root: Path) -> Path:
    """A flashed root's models folder: slots A and B, ``current`` -> A."""
    models = root / "opt" / "gatewatch" / "models"
    (models / "A").mkdir(parents=True)
    (models / "B").mkdir()
    os.symlink("A", models / "current")
    return models


DAMAGED = {
    "slots of the wrong kind": (
        '{"A": 5, "B": [1]}',
        "slot A is recorded as a JSON int",
    ),
    "second slot a list": (
        '{"A": null, "B": [1]}',
        "slot B is recorded as a JSON list",
    ),
    "a list": ("[1, 2]", "slot state is a JSON list"),
    "issued_at a word": (
        '{"A": {"model_version": "v1", "issued_at": "soon"}, "B": null}',
        "slot A has issued_at 'soon', not a time in seconds",
    ),
    "issued_at a bool": (
        '{"A": {"issued_at": true}, "B": null}',
        "slot A has issued_at 'True', not a time in seconds",
    ),
    "not json": ('{"A": ', "slot state is unreadable"),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_rollback_with_a_damaged_slot_record_exits_3(case, tmp_path, capsys):
    text, message = DAMAGED[case]
    models = _models(tmp_path / "root")
    state = models / "slots.json"
    state.write_text(text)

    rc = main(["rollback", "--root", str(tmp_path / "root")])

    err = capsys.readouterr().err
    assert rc == 3
    assert err.startswith(f"error: {state}: {message}")
    assert "expected a JSON object like" in err
    assert "Traceback" not in err
    # Nothing was switched.
    assert os.readlink(models / "current") == "A"
    assert state.read_text() == text


def test_a_good_slot_record_reads_back(tmp_path):
    models = _models(tmp_path / "root")
    record = {
        "A": {"model_version": "v1", "issued_at": 1.5e9, "sha256": "ab"},
        "B": None,
    }
    (models / "slots.json").write_text(json.dumps(record))

    slots = ModelSlots(models)

    assert slots.state() == record
    assert slots.info("A") == record["A"]
    assert slots.info("B") == {}


def test_the_slot_record_names_itself_in_the_error(tmp_path):
    models = _models(tmp_path / "root")
    (models / "slots.json").write_text('{"A": "v1"}')

    with pytest.raises(BadInputError) as caught:
        ModelSlots(models).info("A")

    assert caught.value.path == str(models / "slots.json")
    assert caught.value.exit_code == 3
