"""edge_agent.outbox: durable order, acknowledgements, drop policy, kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from edge_agent.outbox import Outbox


def test_pending_in_order_and_ack_removes(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    for i in range(5):
        assert box.add(f"id{i}", "t", f"p{i}".encode(), alert=i % 2 == 0)
    assert [m.id for m in box.pending()] == [f"id{i}" for i in range(5)]
    assert box.ack("id1") and not box.ack("id1")
    assert [m.id for m in box.pending()] == ["id0", "id2", "id3", "id4"]
    first = box.pending(limit=2)
    assert [m.id for m in box.pending(after_seq=first[-1].seq)] == ["id3", "id4"]
    assert len(box) == 4
    box.close()


def test_same_id_is_kept_once(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    box.add("a", "t", b"1", alert=False)
    box.add("a", "t", b"1", alert=False)
    assert len(box) == 1


def test_a_waiting_id_added_again_is_merged_counted_and_drops_nothing(
    tmp_path: Path,
) -> None:
    """Found: a flow read again (same id) while its escalation waited was stored
    once without a word, and a full outbox first dropped another escalation (the
    oldest uncertain one, counted as lost) to make room for the copy it then did
    not store."""
    box = Outbox(tmp_path / "o.sqlite", max_messages=2)
    box.add_many([("e1", "t", b"1", False), ("e2", "t", b"2", False)])
    assert box.merged == 0
    assert box.add_many([("e2", "t", b"2", False), ("e1", "t", b"1 again", True)]) \
        == [True, True]
    assert box.dropped == {"alert": 0, "escalate": 0}
    assert box.merged == 2
    # One copy each, the first payload kept; an alert read marks it an alert.
    assert [(m.id, m.payload, m.alert) for m in box.pending()] == [
        ("e1", b"1", True), ("e2", b"2", False)]
    box.ack("e1")  # sent: a later copy is a new message, published again
    assert box.add("e1", "t", b"1", False) and box.merged == 2 and len(box) == 2
    box.close()


def test_survives_reopen(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    box.add("a", "t", b"x", alert=True)
    box.close()
    again = Outbox(tmp_path / "o.sqlite")
    [msg] = again.pending()
    assert (msg.id, msg.payload, msg.alert) == ("a", b"x", True)


def test_drop_policy_keeps_alerts_before_uncertain(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_messages=3)
    box.add("e1", "t", b"", alert=False)
    box.add("a1", "t", b"", alert=True)
    box.add("e2", "t", b"", alert=False)
    assert box.add("a2", "t", b"", alert=True)  # pushes out the oldest uncertain, e1
    assert [m.id for m in box.pending()] == ["a1", "e2", "a2"]
    assert box.add("a3", "t", b"", alert=True)  # then e2
    assert [m.id for m in box.pending()] == ["a1", "a2", "a3"]
    assert not box.add("e3", "t", b"", alert=False)  # uncertain never evicts alerts
    assert box.add("a4", "t", b"", alert=True)  # all alerts: oldest alert goes
    assert [m.id for m in box.pending()] == ["a2", "a3", "a4"]
    assert box.dropped == {"alert": 1, "escalate": 3}
    box.close()
    assert Outbox(tmp_path / "o.sqlite", max_messages=3).dropped["escalate"] == 3


def test_nothing_returned_from_add_is_lost_to_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    script = textwrap.dedent(f"""
        import os, signal, sys
        from edge_agent.outbox import Outbox
        box = Outbox({str(path)!r})
        for i in range(300):
            box.add(f"m{{i:04d}}", "t", b"payload", alert=False)
            if i == 149:
                box.ack("m0000")
        print("added", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )
    assert proc.returncode == -signal.SIGKILL and "added" in proc.stdout
    box = Outbox(path)
    ids = [m.id for m in box.pending()]
    assert ids == [f"m{i:04d}" for i in range(1, 300)]
    assert os.path.getsize(path) > 0


def test_a_refused_write_rolls_back_and_raises_a_gatewatch_error(
    tmp_path: Path,
) -> None:
    import sqlite3

    import pytest

    from flows.errors import OutboxError

    box = Outbox(tmp_path / "o.sqlite")
    box.add("a", "t", b"x", alert=True)

    class FullDisk:
        """Stands in for the connection: COMMIT fails as on a full disk."""

        def __init__(self, db) -> None:
            self.db = db

        @property
        def in_transaction(self) -> bool:
            return self.db.in_transaction

        def execute(self, sql, *args):
            if sql == "COMMIT":
                raise sqlite3.OperationalError("database or disk is full")
            return self.db.execute(sql, *args)

    real = box._db
    box._db = FullDisk(real)
    with pytest.raises(OutboxError, match="full") as err:
        box.add_many([("b", "t", b"y", False), ("c", "t", b"z", True)])
    assert str(tmp_path / "o.sqlite") in str(err.value) and err.value.exit_code == 6
    with pytest.raises(OutboxError):
        box.ack_many(["a"])
    box._db = real
    assert [m.id for m in box.pending()] == ["a"] and len(box) == 1
    assert box.add("b", "t", b"y", alert=False)  # usable once the disk has room
    box.close()


def test_a_damaged_file_is_refused_at_open_and_left_alone(tmp_path: Path) -> None:
    import pytest

    from flows.errors import BadInputError

    path = tmp_path / "o.sqlite"
    box = Outbox(path)
    for i in range(40):
        box.add(f"id{i:03d}", "t", bytes(range(256)) * 20, alert=False)
    box.close()
    data = bytearray(path.read_bytes())
    for off in range(len(data) - 4096 * 10, len(data), 4096):
        data[off + 8 : off + 4000] = b"\x5a" * 3992
    path.write_bytes(bytes(data))
    with pytest.raises(BadInputError, match="damaged") as err:
        Outbox(path)
    assert str(path) in str(err.value) and err.value.exit_code == 3
    assert path.read_bytes() == bytes(data)


def test_sent_messages_are_kept_until_answered_and_can_be_requeued(
    tmp_path: Path,
) -> None:
    box = Outbox(tmp_path / "o.sqlite", keep_sent=3)
    for i in range(5):
        box.add(f"id{i}", f"t{i}", f"p{i}".encode(), alert=i == 0)
    assert box.ack_many(["id0", "id1", "id2", "id3"]) == 4
    # Acknowledged: out of the queue; the newest three kept for a re-send.
    assert [m.id for m in box.pending()] == ["id4"]
    assert box.sent_ids() == ["id1", "id2", "id3"]
    assert box.answered_many(["id2", "nope"]) == 1
    assert box.sent_ids() == ["id1", "id3"]

    # The broker lost them: back in the queue, after what was pending, intact.
    assert box.requeue_sent() == 2
    assert box.sent_ids() == []
    again = box.pending()
    assert [(m.id, m.topic, m.payload, m.alert) for m in again] == [
        ("id4", "t4", b"p4", False),
        ("id1", "t1", b"p1", False),
        ("id3", "t3", b"p3", False),
    ]
    assert len(box) == 3
    # An answer for one queued again takes it out of the queue (no publish).
    assert box.answered_many(["id1"]) == 1
    assert [m.id for m in box.pending()] == ["id4", "id3"] and len(box) == 2
    box.close()

    # Found: the trim went by seq distance, so once keep_sent later messages were
    # acknowledged (and answered) an old unanswered one was dropped, with only a
    # few rows held. It keeps the newest keep_sent rows, whatever their seqs.
    many = Outbox(tmp_path / "m.sqlite", keep_sent=3)
    for i in range(10):
        many.add(f"m{i}", "t", b"p", alert=False)
    many.ack_many(["m0"])
    for i in range(1, 10):
        many.ack_many([f"m{i}"])
        many.answered_many([f"m{i}"])
    assert many.sent_ids() == ["m0"]
    many.ack_many([])
    for i in range(10, 14):
        many.add(f"m{i}", "t", b"p", alert=False)
        many.ack_many([f"m{i}"])
    assert many.sent_ids() == ["m11", "m12", "m13"]
    many.close()

    # Without keep_sent an acknowledged message is gone, as before.
    plain = Outbox(tmp_path / "p.sqlite")
    plain.add("x", "t", b"1", alert=False)
    assert plain.ack("x") and plain.sent_ids() == [] and plain.requeue_sent() == 0
    plain.close()


def test_an_outbox_from_before_the_sent_table_opens_and_gains_it(
    tmp_path: Path,
) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT "
        "NULL UNIQUE, topic TEXT NOT NULL, payload BLOB NOT NULL, alert INTEGER NOT "
        "NULL); CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT "
        "NULL); INSERT INTO outbox (id, topic, payload, alert) VALUES "
        "('old', 't', x'01', 1);"
    )
    db.commit()
    db.close()
    box = Outbox(path, keep_sent=10)
    assert [m.id for m in box.pending()] == ["old"]
    assert box.ack("old") and box.sent_ids() == ["old"]
    box.close()
