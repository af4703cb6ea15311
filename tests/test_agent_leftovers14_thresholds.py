"""The agent names where its thresholds come from, whichever replaces the artifact's.

Found: at the default log level a run with the artifact's ``site_thresholds.json``
said so (a warning naming the file), but one with ``--thresholds FILE`` said
nothing, so the log did not show which thresholds decided.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_agent_fixtures import tiny

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def tm(data_dir, tmp_path_factory):
    return tiny(data_dir, tmp_path_factory)


def test_thresholds_given_by_flag_are_named_as_site_ones_are(tm, tmp_path: Path):
    given = tmp_path / "mine.json"
    given.write_text(json.dumps({"escalate_low": 0.25, "decision": 0.5,
                                 "alert": 0.875}))
    argv = ["run", "--artifact", str(tm.artifact), "--source", "-", "--site", "s1",
            "--gateway", "g1", "--outbox", str(tmp_path / "o.db"), "--alerts", "",
            "--thresholds", str(given)]
    done = subprocess.run(  # a process of its own: the log as a person sees it
        [sys.executable, "-m", "edge_agent.cli", *argv], cwd=REPO,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
    )

    assert done.returncode == 0, done.stderr
    assert (
        f"WARNING gatewatch.edge_agent: thresholds from {given} (--thresholds), not "
        "the artifact's thresholds.json: escalate_low 0.25, alert 0.875"
    ) in done.stderr
