"""JSON nested thousands deep in an input file is bad input (exit 3, the file
named), not a RecursionError traceback with exit 1.

Found in an artifact's ``thresholds.json`` (its sha256 made to match) and
``manifest.json``, in ``site_thresholds.json`` and in a ``--thresholds`` file,
through ``edge-agent run`` and ``compress eval``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.errors import BadInputError
from tests.test_agent_fixtures import make_artifact, tiny

GOOD = {"decision": 0.5, "escalate_low": 0.3, "alert": 0.8}
DEEP = "[" * 5000 + "]" * 5000


@pytest.fixture
def tm(data_dir, tmp_path_factory):
    return tiny(data_dir, tmp_path_factory)


def _deep_thresholds(tm, folder: Path) -> Path:
    """An artifact whose thresholds.json is DEEP, its sha256 recorded to match."""
    from edge_agent.runtime import sha256_file

    art = make_artifact(folder, tm.encoder, dict(GOOD))
    (art / "thresholds.json").write_text(DEEP)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["sha256"]["thresholds.json"] = sha256_file(art / "thresholds.json")
    (art / "manifest.json").write_text(json.dumps(manifest))
    return art


def _deep_manifest(tm, folder: Path) -> Path:
    art = make_artifact(folder, tm.encoder, dict(GOOD))
    (art / "manifest.json").write_text(DEEP)
    return art


def _run(tm, tmp_path, art, *extra) -> list:
    from edge_agent.cli import main

    return main(["run", "--artifact", str(art), "--source", f"zeek:{tm.conn_log}",
                 "--site", "s1", "--gateway", "g1", "--outbox",
                 str(tmp_path / "o.db"), "--alerts", "", *extra])


def _errors(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "RecursionError" not in err, err
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


@pytest.mark.parametrize(("make", "name"), [(_deep_thresholds, "thresholds.json"),
                                            (_deep_manifest, "manifest.json")])
def test_edge_agent_run_exits_3_naming_the_file(tm, tmp_path, capsys, make, name):
    art = make(tm, tmp_path / "art")
    code = _run(tm, tmp_path, art)
    errors = _errors(capsys)
    assert code == 3 and len(errors) == 1, errors
    assert errors[0].startswith(f"error: {art / name}: ")
    assert "nested too deep" in errors[0]


@pytest.mark.parametrize(("make", "name"), [(_deep_thresholds, "thresholds.json"),
                                            (_deep_manifest, "manifest.json")])
def test_compress_eval_exits_3_naming_the_file(tm, tmp_path, capsys, make, name):
    from compress.cli import main

    art = make(tm, tmp_path / "art")
    code = main(["eval", "--artifact", str(art), "--data", str(tm.conn_log),
                 "--no-timing"])
    errors = _errors(capsys)
    assert code == 3 and len(errors) == 1, errors
    assert errors[0].startswith(f"error: {art / name}: ")


def test_deep_site_thresholds_are_bad_input(tm, tmp_path):
    from edge_agent.agent import load_thresholds
    from edge_agent.runtime import load_artifact

    art = make_artifact(tmp_path / "art", tm.encoder, dict(GOOD))
    (art / "site_thresholds.json").write_text(DEEP)
    with pytest.raises(BadInputError) as caught:
        load_thresholds(load_artifact(art))
    assert "site_thresholds.json" in str(caught.value)
    assert caught.value.exit_code == 3


def test_a_deep_thresholds_flag_file_exits_3(tm, tmp_path, capsys):
    given = tmp_path / "t.json"
    given.write_text(DEEP)
    code = _run(tm, tmp_path, tm.artifact, "--thresholds", str(given))
    errors = _errors(capsys)
    assert code == 3 and len(errors) == 1, errors
    assert str(given) in errors[0]


def test_a_deep_bundle_manifest_is_bad_input():
    from edge_agent.bundle import _parse_manifest

    with pytest.raises(BadInputError, match="nested too deep"):
        _parse_manifest(DEEP.encode(), "b.tar")


def test_a_deep_artifact_manifest_has_no_files_listed(tmp_path):
    from compress.pipeline import artifact_files_in

    (tmp_path / "manifest.json").write_text(DEEP)
    assert artifact_files_in(tmp_path) is None
