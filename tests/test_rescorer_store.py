"""teacher.store and the ``teacher alerts`` filters, without a broker."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from edge_agent import protocol as proto
from flows.errors import UsageError
from teacher.serve import _since, register
from teacher.store import AlertStore


def _pair(i: int, gateway: str, decision: str, verdict: str):
    esc = proto.build_escalation(
        flow={
            "src_ip": f"10.0.0.{i}",
            "src_port": 1000 + i,
            "dst_ip": "10.0.1.1",
            "dst_port": 80,
            "proto": "tcp",
            "ts": 100.0 + i,
        },
        window=[[0.5, 0.25]],
        score=0.6 + i / 100,
        decision=decision,
        model_version="m1",
        site="s1",
        gateway=gateway,
        msg_id=f"id{i}",
    )
    ver = proto.build_verdict(
        escalation_id=esc["id"],
        verdict=verdict,
        score=0.9,
        threshold=0.5,
        teacher_version="t1",
    )
    return esc, ver


def test_store_keeps_one_row_per_id_and_filters(tmp_path: Path) -> None:
    store = AlertStore(tmp_path / "a.sqlite")
    pairs = [
        _pair(0, "g1", "escalate", "benign"),
        _pair(1, "g1", "alert", "malicious"),
        _pair(2, "g2", "escalate", "malicious"),
    ]
    assert store.add_many(pairs) == [True, True, True]
    assert store.add_many(pairs[:2]) == [False, False]
    other = AlertStore(tmp_path / "a.sqlite")  # a second process's view
    assert not other.add(*pairs[2])
    assert store.count() == 3
    assert [r["id"] for r in store.query(gateway="g1")] == ["id0", "id1"]
    assert [r["id"] for r in store.query(gateway="s1/g2")] == ["id2"]
    assert [r["id"] for r in store.query(gateway="s9/g2")] == []
    assert [r["id"] for r in store.query(decision="alert")] == ["id1"]
    assert [r["id"] for r in store.query(decision="malicious")] == ["id1", "id2"]
    assert store.query(since=time.time() + 60) == []
    row = store.query(gateway="g1", decision="escalate")[0]
    assert row["flow"]["src_port"] == 1000 and row["verdict"] == "benign"
    assert row["agent_score"] == pytest.approx(0.6)
    with pytest.raises(UsageError):
        store.query(decision="maybe")


def test_since_accepts_ages_iso_and_unix() -> None:
    now = time.time()
    assert _since("2h") == pytest.approx(now - 7200, abs=5)
    assert _since("1700000000") == 1700000000.0
    assert _since("2023-11-14T22:13:20") == pytest.approx(1700000000.0)
    with pytest.raises(UsageError):
        _since("yesterday")


def test_alerts_command_prints_a_json_list(tmp_path: Path, capsys) -> None:
    import argparse

    store = AlertStore(tmp_path / "a.sqlite")
    store.add_many(
        [_pair(0, "g1", "escalate", "benign"), _pair(1, "g2", "alert", "malicious")]
    )
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["alerts", "--store", str(tmp_path / "a.sqlite"), "--json", "--gateway", "g2"]
    )
    assert args.func(args) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in listed] == ["id1"] and listed[0]["verdict"] == "malicious"
    args = parser.parse_args(["alerts", "--store", str(tmp_path / "none.sqlite")])
    with pytest.raises(UsageError):
        args.func(args)
