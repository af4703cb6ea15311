"""A reload keeps the host windows when the encoder is the same (found by an
operator tester: SIGHUP of the same, unchanged model changed 4 of 361 decisions,
as the windows restarted empty)."""

from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")

from edge_agent.agent import Agent  # noqa: E402
from edge_agent.outbox import Outbox  # noqa: E402
from edge_agent.runtime import load_artifact  # noqa: E402
from tests.test_ota_artifacts import (  # noqa: E402
    conn_records,
    fit_conn_encoder,
    make_artifact,
)


def _run(tmp_path, name, folder, records, reload_with=None):
    agent = Agent(load_artifact(folder), site="s1", gateway="g1",
                  outbox=Outbox(tmp_path / f"{name}.sqlite"), max_batch=8)
    agent.run_file(records[:30])
    before = agent.windower
    if reload_with is not None:
        agent.swap_scorer(load_artifact(reload_with))
    kept = agent.windower is before
    agent.run_file(records[30:])
    c = agent.counters
    decisions = (c.flows, c.benign, c.escalate, c.alert)
    agent.outbox.close()
    return decisions, kept


def test_reloading_the_same_artifact_decides_as_if_it_had_not(tmp_path):
    enc = fit_conn_encoder()
    art = make_artifact(tmp_path / "a", encoder=enc, seed=1)
    records = conn_records(60, seed=5, hosts=3)

    plain, _ = _run(tmp_path, "plain", art, records)
    reloaded, kept = _run(tmp_path, "reloaded", art, records, reload_with=art)

    assert kept
    assert reloaded == plain and plain[0] == 60


def test_another_encoder_starts_its_windows_empty(tmp_path):
    art = make_artifact(tmp_path / "a", encoder=fit_conn_encoder(), seed=1)
    other = make_artifact(tmp_path / "b", encoder=fit_conn_encoder(window=2), seed=1)
    records = conn_records(60, seed=5, hosts=3)

    _, kept = _run(tmp_path, "other", art, records, reload_with=other)

    assert not kept
