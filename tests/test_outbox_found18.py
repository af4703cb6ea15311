"""What a fresh tester found in the outbox an edge agent replays.

A payload damaged at rest was published as it was, refused by the re-scorer
(which could not read its id, so it answered nothing) and published again on every
run, each ending exit 6 blaming the re-scorer. An outbox written under another
--site/--gateway was replayed on that gateway's topic, its verdicts never heard.
A short lock by another program (a backup) dropped escalations after sqlite3's
default 5 s.
"""

from __future__ import annotations

import io
import json
import logging
import sqlite3
import sys
from pathlib import Path

import pytest

from edge_agent import outbox as outbox_mod
from edge_agent.cli import main
from edge_agent.outbox import Outbox
from tests.test_agent import _run_argv, _stub_rescorer
from tests.test_agent_fixtures import tiny


@pytest.fixture(scope="module")
def tm(data_dir, tmp_path_factory):
    return tiny(data_dir, tmp_path_factory)


def _fill_offline(tm, tmp_path: Path) -> dict[str, bytes]:
    """Run 1 without a broker: its escalations wait in o.db; their payloads."""
    assert main(_run_argv(tm, tmp_path, f"zeek:{tm.conn_log}", "--alerts", "")) == 0
    stored = {m.id: m.payload for m in Outbox(tmp_path / "o.db").pending()}
    assert len(stored) >= 5
    return stored


def test_a_payload_damaged_in_the_outbox_is_set_aside_not_sent_forever(
    tm, mosquitto, tmp_path: Path, monkeypatch, capsys, caplog
) -> None:
    from edge_agent import protocol as proto

    stored = _fill_offline(tm, tmp_path)
    damaged = sorted(stored)[:3]
    db = sqlite3.connect(tmp_path / "o.db")
    with db:
        for msg_id in damaged:  # cut to 100 bytes, as a bad sector might
            db.execute("UPDATE outbox SET payload = substr(payload, 1, 100) "
                       "WHERE id = ?", (msg_id,))
    db.close()

    def answer(body: dict) -> bytes:
        return proto.encode(proto.build_verdict(
            escalation_id=body["id"], verdict="benign", score=0.1,
            threshold=0.5, teacher_version="t1"))

    client, got = _stub_rescorer(mosquitto.port, answer)
    argv = _run_argv(tm, tmp_path, "-", "--alerts", "", "--broker", mosquitto.url,
                     "--drain-timeout", "20")
    try:
        monkeypatch.setattr(sys, "stdin", io.StringIO(""))
        with caplog.at_level(logging.WARNING, logger="gatewatch.edge_agent"):
            first = main(argv)
        err = capsys.readouterr().err
        monkeypatch.setattr(sys, "stdin", io.StringIO(""))
        second = main(argv)
    finally:
        client.loop_stop()
        client.disconnect()

    # Run 2: exit 6 naming the damage (not the re-scorer), every good one answered.
    assert first == 6
    assert ("3 escalations of an earlier run were damaged in the outbox "
            f"{tmp_path / 'o.db'} and were not sent") in err
    assert "is teacher serve running" not in err
    assert sorted(got) == sorted(set(stored) - set(damaged))
    warned = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warned) == 1 and "set aside in its 'damaged' table" in warned[0]
    # Kept for a look, out of the queue; run 3 meets nothing and ends clean.
    db = sqlite3.connect(tmp_path / "o.db")
    aside = dict(db.execute("SELECT id, reason FROM damaged").fetchall())
    db.close()
    assert sorted(aside) == damaged and all(aside.values())
    assert len(Outbox(tmp_path / "o.db")) == 0
    assert second == 0
    assert sorted(got) == sorted(set(stored) - set(damaged))  # nothing sent again


def test_an_outbox_of_another_gateway_is_refused_before_anything_runs(
    tm, tmp_path: Path, capsys
) -> None:
    stored = _fill_offline(tm, tmp_path)  # written as s1/g1
    before = (tmp_path / "o.db").read_bytes()

    argv = _run_argv(tm, tmp_path, f"zeek:{tm.conn_log}", "--alerts", "")
    argv[argv.index("--gateway") + 1] = "g9"
    rc = main(argv)

    err = capsys.readouterr().err
    assert rc == 2
    assert (f"outbox {tmp_path / 'o.db'} holds {len(stored)} escalations of site s1 "
            "gateway g1, not of this agent's --site s1 --gateway g9") in err
    assert "run once with --site s1 --gateway g1 to send them" in err
    assert "Traceback" not in err
    assert (tmp_path / "o.db").read_bytes() == before  # nothing was added or sent
    assert len(Outbox(tmp_path / "o.db")) == len(stored)


def test_a_write_waits_out_another_programs_lock_instead_of_dropping(
    tmp_path: Path
) -> None:
    """The outbox waits BUSY_TIMEOUT_S (60 s) for another program's lock, not
    sqlite3's 5 s; a lock held a moment is waited out and the write lands."""
    import threading

    path = tmp_path / "o.db"
    box = Outbox(path)
    (busy_ms,) = box._db.execute("PRAGMA busy_timeout").fetchone()
    assert busy_ms == 60_000 == outbox_mod.BUSY_TIMEOUT_S * 1000

    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    released = threading.Timer(1.0, holder.execute, ("COMMIT",))
    released.start()
    try:
        kept = box.add_many([("a" * 32, "t", json.dumps({"x": 1}).encode(), False)])
    finally:
        released.join()
        holder.close()
    assert kept == [True]
    assert [m.id for m in box.pending()] == ["a" * 32]
    box.close()
