"""A damaged ``thresholds.json`` in an artifact (its sha256 in the manifest made to
match) is bad input, exit 3, naming the file, the key and what was expected.

Found: ``alert: NaN`` exited 1 with "escalate_low must not exceed alert",
``alert: "high"`` exited 1, and ``escalate_low: 3.0`` exited 3: three codes and
one misleading message for one kind of damage.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flows.errors import BadInputError
from tests.test_agent_fixtures import make_artifact, tiny

GOOD = {"decision": 0.5, "escalate_low": 0.3, "alert": 0.8}


@pytest.fixture
def tm(data_dir, tmp_path_factory):
    return tiny(data_dir, tmp_path_factory)


def _with(tm, folder: Path, thresholds) -> Path:
    """An artifact whose thresholds.json holds ``thresholds`` (a dict, or the file's
    text), its sha256 recorded as if compress had written it."""
    art = make_artifact(folder, tm.encoder, dict(GOOD))
    text = thresholds if isinstance(thresholds, str) else json.dumps(thresholds)
    (art / "thresholds.json").write_text(text)
    manifest = json.loads((art / "manifest.json").read_text())
    from edge_agent.runtime import sha256_file

    manifest["sha256"]["thresholds.json"] = sha256_file(art / "thresholds.json")
    (art / "manifest.json").write_text(json.dumps(manifest))
    return art


DAMAGE = [
    ({**GOOD, "alert": float("nan")}, "'alert' is nan, not a number in 0..1"),
    ({**GOOD, "alert": "high"}, "'alert' is \"high\" (a JSON string), not a number"),
    ({**GOOD, "escalate_low": 3.0}, "'escalate_low' is 3.0, not a number in 0..1"),
    ({**GOOD, "alert": float("inf")}, "'alert' is inf, not a number in 0..1"),
    ({**GOOD, "decision": -0.1}, "'decision' is -0.1, not a number in 0..1"),
    ({**GOOD, "alert": None}, "'alert' is null, not a number in 0..1"),
    ({**GOOD, "alert": True}, "'alert' is true (a JSON boolean), not a number"),
    ({**GOOD, "alert": 10**400}, "'alert' is 1000000000000000000000000000000000000..."),
    ({"decision": 0.5, "alert": 0.8}, "lacks 'escalate_low'"),
    ({**GOOD, "escalate_low": 0.6},
     "escalate_low 0.6, decision 0.5, alert 0.8: out of order"),
    ({**GOOD, "alert": 0.4},
     "escalate_low 0.3, decision 0.5, alert 0.4: out of order"),
    ([0.3, 0.5, 0.8], "holds a JSON array"),
    ("{not json", "is not valid JSON"),
]


@pytest.mark.parametrize(("thresholds", "says"), DAMAGE)
def test_load_artifact_names_the_file_the_key_and_the_contract(tm, tmp_path,
                                                               thresholds, says):
    from edge_agent.runtime import load_artifact

    art = _with(tm, tmp_path / "art", thresholds)

    with pytest.raises(BadInputError) as caught:
        load_artifact(art)

    message = str(caught.value)
    assert message.startswith(f"{art / 'thresholds.json'}: ")
    assert says in message
    assert 'expected a JSON object with numbers "escalate_low" <= "decision" <= ' \
           '"alert", each in 0..1' in message
    assert "\n" not in message


@pytest.mark.parametrize("thresholds", [
    {"decision": 0, "escalate_low": 0, "alert": 1},
    # compress writes alert one ulp past 1.0 for "never alert"
    {"decision": 0.9, "escalate_low": 0.2, "alert": float(np.nextafter(1.0, 2.0))},
    {**GOOD, "rule": "best F1", "chosen_on": "val"},
])
def test_thresholds_within_the_contract_load(tm, tmp_path, thresholds):
    from edge_agent.runtime import load_artifact

    scorer = load_artifact(_with(tm, tmp_path / "art", thresholds))

    assert scorer.thresholds == {k: float(thresholds[k])
                                 for k in ("decision", "escalate_low", "alert")}


@pytest.mark.parametrize(("thresholds", "says"), [DAMAGE[0], DAMAGE[1], DAMAGE[2]])
def test_edge_agent_run_exits_3_with_one_error_line(tm, tmp_path, capsys,
                                                    thresholds, says):
    from edge_agent.cli import main

    art = _with(tm, tmp_path / "art", thresholds)

    code = main(["run", "--artifact", str(art), "--source", f"zeek:{tm.conn_log}",
                 "--site", "s1", "--gateway", "g1", "--outbox",
                 str(tmp_path / "o.db"), "--alerts", ""])

    errors = [ln for ln in capsys.readouterr().err.splitlines()
              if ln.startswith("error:")]
    assert code == 3 and len(errors) == 1
    assert errors[0].startswith(f"error: {art / 'thresholds.json'}: ")
    assert says in errors[0]


@pytest.mark.parametrize(("thresholds", "says"), [DAMAGE[0], DAMAGE[1], DAMAGE[2]])
def test_compress_eval_exits_3_with_one_error_line(tm, tmp_path, capsys,
                                                   thresholds, says):
    from compress.cli import main

    art = _with(tm, tmp_path / "art", thresholds)

    code = main(["eval", "--artifact", str(art), "--data", str(tm.conn_log),
                 "--no-timing"])

    errors = [ln for ln in capsys.readouterr().err.splitlines()
              if ln.startswith("error:")]
    assert code == 3 and len(errors) == 1
    assert errors[0].startswith(f"error: {art / 'thresholds.json'}: ")
    assert says in errors[0]


def test_compress_eval_help_names_damaged_thresholds_as_bad_input(capsys):
    from compress.cli import main

    assert main(["eval", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    failure = help_text[help_text.index("1 failure"):help_text.index("2 usage")]
    bad_input = help_text[help_text.index("3 bad input"):help_text.index("4 partial")]
    assert "thresholds.json whose values break the contract" in bad_input
    # A manifest that is not JSON is bad input too (it always exited 3), not 1.
    assert "the manifest is not valid JSON or not a JSON object" in bad_input
    assert "not valid JSON" not in failure


def test_compress_eval_of_a_manifest_that_is_not_json_exits_3(tm, tmp_path,
                                                              capsys):
    from compress.cli import main

    art = make_artifact(tmp_path / "art", tm.encoder, dict(GOOD))
    (art / "manifest.json").write_text("{bad")

    code = main(["eval", "--artifact", str(art), "--data", str(tm.conn_log),
                 "--no-timing"])

    assert code == 3
    assert f"error: {art / 'manifest.json'}: the manifest is not valid JSON" in (
        capsys.readouterr().err)
