"""The agent wheel a bundle carries is the same for the same source tree (found by
an operator tester: bundles built seconds apart named two releases, so every
re-flash of an unchanged agent built its venv again)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from edge_agent.bundle import build_agent_wheel

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_the_agent_wheel_is_built_byte_for_byte_alike(tmp_path, monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    first = build_agent_wheel(REPO, tmp_path / "one")
    time.sleep(2.1)  # zip entry times have a 2 s step: a later build differs
    second = build_agent_wheel(REPO, tmp_path / "two")

    assert first.name == second.name
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (first, second)]
    assert digest[0] == digest[1]
