"""A disk-backed outbox: escalations stay on disk until the broker acknowledged it.

The outbox is one SQLite file in WAL mode with ``synchronous=FULL``, so a message that
:meth:`Outbox.add` returned for survives a broker outage, a power cut or ``kill -9``.
Messages come back from :meth:`Outbox.pending` in the order they were added, which is
the order the agent replays them on reconnect; :meth:`Outbox.ack` deletes one once its
PUBACK arrived. The same message may be published twice (once before a crash, once on
replay); the re-scorer de-duplicates by message id.

Drop policy, when the outbox holds ``max_messages`` and one more is added: the oldest
*uncertain* escalation (decision ``escalate``) is dropped first; only when none is left
is the oldest *alert* dropped, and a new uncertain escalation is itself dropped rather
than push an alert out. Alerts are therefore kept before uncertain escalations. Every
drop is counted per decision, and the counts persist in the file.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from edge_agent import logger
from flows.errors import BadInputError, UsageError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    alert INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class OutboxMessage:
    """One message waiting for its PUBACK."""

    seq: int
    id: str
    topic: str
    payload: bytes
    alert: bool


class Outbox:
    """SQLite-backed FIFO of unacknowledged messages, bounded by ``max_messages``."""

    def __init__(self, path: str | Path, max_messages: int = 100_000) -> None:
        if max_messages < 1:
            raise UsageError("outbox max_messages must be at least 1")
        self.path = Path(path)
        self.max_messages = max_messages
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                str(self.path), check_same_thread=False, isolation_level=None
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._size = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise BadInputError(
                f"cannot open the outbox: {exc}", path=str(path)
            ) from exc
        if self._size:
            logger.info("outbox %s holds %d unacknowledged messages", path, self._size)

    def __len__(self) -> int:
        return self._size

    def add(self, msg_id: str, topic: str, payload: bytes, alert: bool) -> bool:
        """Store one message durably; False when the drop policy refused it."""
        return self.add_many([(msg_id, topic, payload, alert)])[0]

    def add_many(self, messages: list[tuple[str, str, bytes, bool]]) -> list[bool]:
        """Store ``(id, topic, payload, alert)`` messages in one durable transaction.

        One fsync for the lot; when this returns, every kept message is on disk.
        The result says, per message, whether the drop policy kept it.
        """
        kept_flags = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for msg_id, topic, payload, alert in messages:
                    kept = True
                    if self._size >= self.max_messages:
                        kept = self._make_room(alert)
                    if kept:
                        cur = self._db.execute(
                            "INSERT OR IGNORE INTO outbox (id, topic, payload, alert) "
                            "VALUES (?, ?, ?, ?)",
                            (msg_id, topic, payload, int(alert)),
                        )
                        self._size += cur.rowcount
                    kept_flags.append(kept)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            finally:
                self._size = self._count()
        return kept_flags

    def _make_room(self, alert: bool) -> bool:
        """Apply the drop policy inside a transaction; False drops the new message."""
        row = self._db.execute(
            "SELECT seq FROM outbox WHERE alert = 0 ORDER BY seq LIMIT 1"
        ).fetchone()
        if row is None and not alert:
            self._bump("dropped_escalate")
            return False
        if row is None:
            row = self._db.execute(
                "SELECT seq FROM outbox ORDER BY seq LIMIT 1"
            ).fetchone()
            self._bump("dropped_alert")
        else:
            self._bump("dropped_escalate")
        self._db.execute("DELETE FROM outbox WHERE seq = ?", row)
        return True

    def _bump(self, name: str) -> None:
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES (?, 1) "
            "ON CONFLICT(name) DO UPDATE SET value = value + 1",
            (name,),
        )

    def _count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    def pending(
        self, limit: int | None = None, after_seq: int = 0
    ) -> list[OutboxMessage]:
        """Messages not yet acknowledged, oldest first (``seq`` greater than given)."""
        sql = (
            "SELECT seq, id, topic, payload, alert FROM outbox WHERE seq > ? "
            "ORDER BY seq"
        )
        args: tuple = (after_seq,)
        if limit is not None:
            sql += " LIMIT ?"
            args = (after_seq, limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [OutboxMessage(r[0], r[1], r[2], bytes(r[3]), bool(r[4])) for r in rows]

    def ack(self, msg_id: str) -> bool:
        """Forget one acknowledged message; False if it was not (or no longer) here."""
        return self.ack_many([msg_id]) == 1

    def ack_many(self, ids: list[str]) -> int:
        """Forget acknowledged messages in one transaction; how many were here."""
        if not ids:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                gone = 0
                for msg_id in ids:
                    gone += self._db.execute(
                        "DELETE FROM outbox WHERE id = ?", (msg_id,)
                    ).rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            finally:
                self._size = self._count()
        return gone

    @property
    def dropped(self) -> dict[str, int]:
        """Messages dropped by the size bound, per decision (alert, escalate)."""
        with self._lock:
            rows = self._db.execute("SELECT name, value FROM counters").fetchall()
        counts = {"alert": 0, "escalate": 0}
        for name, value in rows:
            if name.startswith("dropped_"):
                counts[name.removeprefix("dropped_")] = value
        return counts

    def close(self) -> None:
        """Close the file; what is pending stays on disk for the next start."""
        with self._lock:
            self._db.close()
