"""The outbox gives its space back once its escalations are answered.

An outage that fills the outbox leaves a large file; when the queue drains, the
free pages are cut off the file (incremental vacuum), and a file written before
this is converted with one VACUUM the first time it is empty.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from edge_agent.outbox import SMALL_QUEUE, Outbox

N = 2000
SIZE = 5000  # bytes per payload: ~10 MB in all


def _fill(box: Outbox, n: int = N) -> list[str]:
    """Add ``n`` escalations of SIZE random bytes; their ids."""
    ids = [f"m{i}" for i in range(n)]
    for start in range(0, n, 250):
        box.add_many(
            [(i, "t", os.urandom(SIZE), False) for i in ids[start : start + 250]]
        )
    return ids


def _on_disk(path: Path) -> int:
    """Bytes the outbox takes: its file and its write-ahead log."""
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def _empty_size(tmp_path: Path) -> int:
    """What a new, empty outbox takes on disk."""
    path = tmp_path / "empty.sqlite"
    Outbox(path).close()
    return _on_disk(path)


def test_a_drained_outbox_shrinks_to_near_its_empty_size(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    box = Outbox(path)
    ids = _fill(box)
    full = _on_disk(path)
    assert full > N * SIZE

    for start in range(0, N, 100):  # acknowledged in batches, as the agent does
        box.ack_many(ids[start : start + 100])

    assert len(box) == 0
    assert _on_disk(path) < _empty_size(tmp_path) + 256 * 1024
    box.close()
    assert path.stat().st_size < _empty_size(tmp_path) + 256 * 1024


def test_answered_sent_messages_give_their_space_back(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    box = Outbox(path, keep_sent=N)
    ids = _fill(box)
    box.ack_many(ids)  # moved to the sent table, still taking their space
    assert _on_disk(path) > N * SIZE

    box.answered_many(ids)

    assert box.sent_ids() == []
    assert _on_disk(path) < _empty_size(tmp_path) + 256 * 1024
    box.close()


def test_a_large_queue_is_not_vacuumed_while_escalations_flow(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    box = Outbox(path)
    ids = _fill(box, SMALL_QUEUE + 600)

    box.ack_many(ids[:500])  # more than SMALL_QUEUE still waiting: no work

    free = box._db.execute("PRAGMA freelist_count").fetchone()[0]
    assert free > 500
    box.close()


def test_an_old_outbox_is_converted_when_it_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    box = Outbox(path)
    box.close()
    # A file as the outbox made it before: auto_vacuum off, pages left free.
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA auto_vacuum=NONE")
    db.execute("VACUUM")
    db.execute("BEGIN")
    for i in range(N):
        db.execute(
            "INSERT INTO outbox (id, topic, payload, alert) VALUES (?, 't', ?, 0)",
            (f"m{i}", os.urandom(SIZE)),
        )
    db.execute("COMMIT")
    db.execute("DELETE FROM outbox")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    db.close()
    assert path.stat().st_size > N * SIZE

    box = Outbox(path)

    assert box._db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
    assert _on_disk(path) < _empty_size(tmp_path) + 256 * 1024
    box.close()


def test_an_old_outbox_holding_messages_is_converted_once_drained(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.sqlite"
    Outbox(path).close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA auto_vacuum=NONE")
    db.execute("VACUUM")
    ids = [f"m{i}" for i in range(N)]
    db.executemany(
        "INSERT INTO outbox (id, topic, payload, alert) VALUES (?, 't', ?, 0)",
        [(i, os.urandom(SIZE)) for i in ids],
    )
    db.close()
    box = Outbox(path)  # holds messages: not converted at open (no long VACUUM)
    assert box._db.execute("PRAGMA auto_vacuum").fetchone()[0] == 0

    box.ack_many(ids)

    assert box._db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
    assert _on_disk(path) < _empty_size(tmp_path) + 256 * 1024
    box.close()
