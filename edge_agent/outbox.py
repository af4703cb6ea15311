"""A disk-backed outbox: escalations stay on disk until the broker acknowledged it.

The outbox is one SQLite file in WAL mode with ``synchronous=FULL``, so a message that
:meth:`Outbox.add` returned for survives a broker outage, a power cut or ``kill -9``.
Messages come back from :meth:`Outbox.pending` in the order they were added, which is
the order the agent replays them on reconnect; :meth:`Outbox.ack` deletes one once its
PUBACK arrived. The same message may be published twice (once before a crash, once on
replay); the re-scorer de-duplicates by message id.

With ``keep_sent`` an acknowledged message moves to a ``sent`` table instead (its
newest ``keep_sent`` kept) until :meth:`Outbox.answered_many` says its verdict came;
older unanswered ones are let go and counted for good (:attr:`Outbox.forgotten`).
A broker that dies without its saved state forgets what it had acknowledged; the
agent then puts the unanswered ones back with :meth:`Outbox.requeue_sent`.

Drop policy, when the outbox holds ``max_messages`` and one more is added: the oldest
*uncertain* escalation (decision ``escalate``) is dropped first; only when none is left
is the oldest *alert* dropped, and a new uncertain escalation is itself dropped rather
than push an alert out. Alerts are therefore kept before uncertain escalations. Every
drop is counted per decision, and the counts persist in the file.

A message whose id is already waiting (the same flow read again: the agent's ids
are made from the flow) is merged with it: stored once, so it makes no room and
drops nothing; an alert marks the waiting copy an alert. :attr:`Outbox.merged`
counts them.

A path the outbox cannot be made at (a folder, a path under a file, a read-only
file system, no permission) is refused at open as an output that cannot be opened
(:class:`~flows.errors.GatewatchError`, exit 1); a full disk or an I/O error at open
is :class:`~flows.errors.OutboxError` (exit 6), as later.

One run at a time: :class:`Outbox` opened with ``lock=True`` (``edge-agent run``)
holds an exclusive ``flock`` on ``<outbox>.lock`` beside the file until it is
closed (or the process ends, however it ends: the kernel drops the lock), with
the holder's pid written in it. A second run on the same outbox is refused at
open with :class:`OutboxInUseError` (exit 2) naming the file and that pid: two
agents on one outbox share its messages and, with the same site and gateway,
take the same MQTT client id, so the broker keeps disconnecting one for the
other. The lock file is left in place (removing it would let a third run lock a
new file while the second still holds the old one).

Damage and a failing disk: at open the file is checked (``PRAGMA quick_check``, which
reads every page, so a large outbox takes a moment); a damaged file is refused with
:class:`~flows.errors.BadInputError` naming it, and left as it is for the operator.
A read or a write that SQLite refuses later (database or disk full, an I/O error,
damage that appeared since) is rolled back and raised as
:class:`~flows.errors.OutboxError`; what the outbox held before is unchanged.

Space goes back to the disk: a new file is made with ``auto_vacuum = INCREMENTAL``,
and whenever the queue (waiting and sent rows together) is down to
:data:`SMALL_QUEUE` rows or fewer after an acknowledgement or an answer, at most
:data:`RECLAIM_PAGES` free pages are cut off the end of the file (tens of
milliseconds); when it is empty, the write-ahead log is checkpointed and truncated
too, so an outage that filled the outbox leaves a file near its empty size once
its escalations are answered (plus the ids of the newest :data:`ANSWERED_KEPT`
answered ones, about 1.3 MB: a late copy of an answer is known for one by them).
The write-ahead log is kept to :data:`WAL_LIMIT` bytes
after each checkpoint. A file written before this (``auto_vacuum`` off: SQLite
turns it on only with a ``VACUUM``) is converted with one ``VACUUM`` the first
time it is empty, at open or later, which copies an empty database only. An
empty queue gets further steps for :data:`EMPTY_BUDGET_S` (each then only cuts the
file); :meth:`Outbox.reclaim` (and :meth:`Outbox.close`) does the same work on
request. A failure to give space back (a full disk) is logged and changes nothing
else.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edge_agent import logger
from edge_agent.locks import NO_FLOCK, fcntl, holder, own_folder, run_folder, try_lock
from flows.argtypes import nearest_existing
from flows.errors import BadInputError, GatewatchError, OutboxError, UsageError

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
CREATE TABLE IF NOT EXISTS sent (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    alert INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS answered (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE
);
"""
# Made by the first set_aside only (two more pages in every file otherwise).
_DAMAGED_SCHEMA = """
CREATE TABLE IF NOT EXISTS damaged (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    alert INTEGER NOT NULL,
    reason TEXT NOT NULL
)
"""


# The columns of each table in _SCHEMA and _DAMAGED_SCHEMA, in order.
_COLUMNS = {
    "outbox": ("seq", "id", "topic", "payload", "alert"),
    "counters": ("name", "value"),
    "sent": ("seq", "id", "topic", "payload", "alert"),
    "answered": ("seq", "id"),
    "damaged": ("seq", "id", "topic", "payload", "alert", "reason"),
}
# Tables an outbox written before they existed may lack (created at open).
_ADDED_LATER = {"sent", "answered", "damaged"}
# Seconds a write waits for another program's lock on the file (sqlite3 busy
# timeout; its default of 5 s dropped escalations during a 12 s backup's lock).
BUSY_TIMEOUT_S = 60.0
# Ids of answered escalations remembered (the newest), so that a late copy of an
# answer (a re-scorer working through copies queued while it was away) is known
# for one, not taken for a verdict on an escalation this gateway never sent.
ANSWERED_KEPT = 10_000

# Giving space back (see the module doc): at most this many rows waiting and sent
# together, at least MIN_FREE_PAGES free pages, at most RECLAIM_PAGES cut per call.
SMALL_QUEUE = 1000
MIN_FREE_PAGES = 64
RECLAIM_PAGES = 2048
WAL_LIMIT = 4 << 20
# Seconds of further steps when the queue is empty (each step then only truncates).
EMPTY_BUDGET_S = 0.25
# PRAGMA auto_vacuum: 2 is INCREMENTAL.
_INCREMENTAL = 2


class OutboxInUseError(UsageError):
    """Another process (an ``edge-agent run``) holds the outbox's lock: exit 2, a
    setting that clashes with a running agent, as a client id another re-scorer
    holds is for ``teacher serve``."""


def lock_path(path: str | Path) -> Path:
    """The lock file of the outbox at ``path``: ``<outbox>.lock`` beside the file
    itself, symbolic links followed, so that two names of one outbox share a
    lock (a link to a running agent's outbox mixed two gateways' escalations)."""
    path = Path(os.path.realpath(path))
    return path.with_name(path.name + ".lock")


def claim(path: str | Path) -> int | None:
    """Lock the outbox at ``path`` for this process: an open descriptor holding an
    exclusive ``flock`` on :func:`lock_path` (this pid written in it); None where
    there is no ``flock``. Closing it releases the lock. Once
    the file exists, :func:`claim_file` adds a lock named by its device and inode
    in the run folder (``$GATEWATCH_RUN_DIR``), so that a hard link is refused too.

    :class:`OutboxInUseError` (exit 2) when another process holds it; a lock
    file beside the outbox that cannot be made fails as the outbox itself would
    (exit 1, or 6 for a full disk or an I/O error).
    """
    if fcntl is None:
        return None
    path = Path(path)
    lock = lock_path(path)
    try:
        fd = try_lock(lock)
    except OSError as exc:
        if exc.errno in NO_FLOCK:  # a file system without flock: not refused
            logger.debug("outbox %s not locked: %s", path, exc)
            return None
        reason = f"its lock file {lock}: {exc.strerror or exc}"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
            raise OutboxError(
                f"cannot open the outbox: {reason}", path=str(path)
            ) from None
        raise GatewatchError(f"cannot open the outbox {path}: {reason}") from None
    if fd is None:
        raise _in_use(path, lock)
    return fd


def claim_file(path: str | Path) -> int | None:
    """The second lock of :func:`claim`, taken once the outbox file exists: a
    descriptor holding the run folder's lock named by the file's device and
    inode, or None (no ``flock``, no run folder of this user's own).
    :class:`OutboxInUseError` when another process holds it."""
    if fcntl is None:
        return None
    path = Path(path)
    by_inode = _inode_lock(path)
    if by_inode is None:
        return None
    try:
        fd = try_lock(by_inode)
    except OSError as exc:
        logger.debug("outbox %s not locked by inode: %s", path, exc)
        return None
    if fd is None:
        raise _in_use(path, by_inode)
    return fd


def _inode_lock(path: Path) -> Path | None:
    """The run folder's lock of the outbox file at ``path`` by device and inode
    (the same for every name of the file), or None: no such file yet, or no run
    folder of this user's own to put it in."""
    try:
        info = os.stat(path)
        folder = run_folder()
        own_folder(folder, "the locks of outboxes", "")
    except (OSError, UsageError) as exc:
        logger.debug("no inode lock for the outbox %s: %s", path, exc)
        return None
    return folder / f"outbox-{info.st_dev}-{info.st_ino}.lock"


def _in_use(path: Path, lock: Path) -> OutboxInUseError:
    """The error for an outbox whose lock ``lock`` another process holds."""
    return OutboxInUseError(
        f"the outbox {path} is in use by another edge-agent run ({holder(lock)} "
        f"holds {lock}); stop that run, or give this one its own --outbox "
        "(and --site/--gateway: the MQTT client id is made from them)"
    )


def _link_loop(path: Path) -> Path | None:
    """The symbolic link at or above ``path`` that never leads anywhere (a loop,
    or a chain longer than the system follows), or None.

    Such a name exists only as a link, so the usual checks take it for a file
    that cannot be written (or one in the way of a folder); it is named as
    what it is instead."""
    for name in (path, *path.parents):
        if not name.is_symlink():
            continue
        try:
            os.stat(name)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return name
    return None


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

    def __init__(
        self,
        path: str | Path,
        max_messages: int = 100_000,
        keep_sent: int = 0,
        lock: bool = False,
    ) -> None:
        """Open (or create) the outbox at ``path``; with ``lock``, hold its lock
        file (:func:`claim`) until :meth:`close`, refusing a second holder."""
        if max_messages < 1:
            raise UsageError("outbox max_messages must be at least 1")
        if keep_sent < 0:
            raise UsageError("outbox keep_sent must be at least 0")
        self.path = Path(path)
        self.max_messages = max_messages
        self.keep_sent = keep_sent
        # Messages added since open whose id was already waiting: stored once.
        self.merged = 0
        self._closed = False
        self._lock = threading.Lock()
        self._check_place()
        # A lock file made only for an outbox then refused (damaged, another
        # program's) is taken away again: a refused open leaves nothing behind.
        made_lock = lock and not lock_path(self.path).exists()
        fd = claim(self.path) if lock else None
        self._lock_fds = [] if fd is None else [fd]
        existed = self.path.is_file() and self.path.stat().st_size > 0
        try:
            # The file itself, links followed: SQLite names its -wal file after
            # the path it is given, and two names must share one.
            self._db = sqlite3.connect(
                os.path.realpath(self.path), check_same_thread=False,
                isolation_level=None, timeout=BUSY_TIMEOUT_S,
            )
            if lock:  # the file exists now: its other names are held too
                try:
                    fd = claim_file(self.path)
                except OutboxInUseError:
                    self._db_close_quietly()
                    raise
                if fd is not None:
                    self._lock_fds.append(fd)
            if existed:  # before anything could write to the file
                self._check_pages()
                self._check_columns()
            else:  # only before the first table: an existing file needs a VACUUM
                self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
            self._db.executescript(_SCHEMA)
            self._size = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
            self._incremental = (
                self._db.execute("PRAGMA auto_vacuum").fetchone()[0] == _INCREMENTAL
            )
            self._reclaim(at_open=True)
        except sqlite3.DatabaseError as exc:
            self._db_close_quietly()
            raise self._open_failure(exc) from exc
        except BadInputError:
            self._db_close_quietly()
            raise
        finally:
            if getattr(self, "_size", None) is None:  # not opened: let go of the lock
                if made_lock and self._lock_fds:
                    with contextlib.suppress(OSError):
                        lock_path(self.path).unlink()
                self._release()
        if self._size:
            logger.info("outbox %s holds %d unacknowledged messages", path, self._size)

    def _check_place(self) -> None:
        """Make the outbox's folder; refuse a path that is a folder, or under a
        file, or a symbolic link loop (or under one), or a folder that cannot be
        made, with one error naming the path (exit 1, as for any output that
        cannot be opened)."""
        loop = _link_loop(self.path)
        if loop is not None:
            what = "a file" if loop == self.path else "a folder"
            raise GatewatchError(
                f"cannot open the outbox {self.path}: {loop} is a symbolic link "
                "loop (its links lead back to themselves, or run longer than the "
                f"system follows); point it at {what}, or remove it"
            )
        if self.path.is_dir():
            raise GatewatchError(
                f"cannot open the outbox {self.path}: it is a folder, not a file; "
                "give --outbox a file path (a new file is created)"
            )
        above = nearest_existing(self.path.parent)
        if not above.is_dir():
            raise GatewatchError(
                f"cannot create the outbox {self.path}: {above} is a file, not a "
                "folder"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GatewatchError(
                f"cannot create the folder of the outbox {self.path}: "
                f"{exc.strerror or exc}"
            ) from exc

    def _open_failure(self, exc: sqlite3.DatabaseError) -> GatewatchError:
        """What SQLite refusing to open the outbox means, as the error to raise.

        A full disk or an I/O error is :class:`~flows.errors.OutboxError` (exit 6,
        as when a write fails later); a file or folder that cannot be opened or
        written (a read-only file system, no permission) is a failure to open an
        output (exit 1); anything else is a damaged file (exit 3, left as it is).
        """
        name = getattr(exc, "sqlite_errorname", "") or ""
        where = str(self.path)
        full = name.startswith("SQLITE_FULL") or "disk is full" in str(exc)
        if full or name.startswith("SQLITE_IOERR"):
            what = "the disk is full" if full else "the disk reported an I/O error"
            return OutboxError(f"cannot open the outbox: {what} ({exc})", path=where)
        if name.startswith(("SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_PERM",
                            "SQLITE_AUTH")):
            return GatewatchError(
                f"cannot open the outbox {where}: {self._why_unwritable()} ({exc})"
            )
        return BadInputError(f"cannot open the outbox: {exc}", path=where)

    def _why_unwritable(self) -> str:
        """Why the outbox file or its folder cannot be written, as far as known."""
        target = self.path if self.path.exists() else self.path.parent
        kind = "file" if target == self.path else "folder"
        try:
            if os.statvfs(target).f_flag & os.ST_RDONLY:
                return f"the {kind} {target} is on a read-only file system"
        except OSError:
            pass
        if not os.access(target, os.W_OK):
            return f"no permission to write the {kind} {target}"
        return f"the {kind} {target} cannot be opened for writing"

    def _check_pages(self) -> None:
        """Refuse a file whose pages SQLite finds damaged (reads the whole file)."""
        rows = self._db.execute("PRAGMA quick_check(3)").fetchall()
        problems = [
            line
            for row in rows
            for line in str(row[0]).splitlines()
            if line and not line.startswith("***")
        ]
        if problems != ["ok"]:
            raise BadInputError(
                "the outbox is damaged (" + "; ".join(problems[:3]) + "); move it "
                "aside to start with an empty one",
                path=str(self.path),
            )

    def _check_columns(self) -> None:
        """Refuse an SQLite file of another program: its tables are not ours.

        ``CREATE TABLE IF NOT EXISTS`` would keep a foreign ``outbox`` table as it
        is (every write then failing mid-run) or add ours to another program's
        file; an existing file must hold both our tables, column for column.
        """
        for table, want in _COLUMNS.items():
            have = [r[1] for r in self._db.execute(f"PRAGMA table_info({table})")]
            if not have and table in _ADDED_LATER:
                continue
            if not have:
                raise BadInputError(
                    f"is an SQLite file with no {table!r} table, not an outbox; "
                    "give another --outbox path (this file is left untouched)",
                    path=str(self.path),
                )
            if have != list(want):
                raise BadInputError(
                    f"is an SQLite file whose {table!r} table has the columns "
                    f"{have}, not an outbox's {list(want)}; give another --outbox "
                    "path (this file is left untouched)",
                    path=str(self.path),
                )

    def _db_close_quietly(self) -> None:
        db = getattr(self, "_db", None)
        if db is not None:
            try:
                db.close()
            except sqlite3.Error:
                pass

    def _rollback(self) -> None:
        """Undo the open transaction, if SQLite has not already done so itself."""
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                logger.debug("outbox rollback failed: %s", exc)

    def _failure(self, what: str, exc: sqlite3.Error) -> OutboxError:
        """A refused read or write as one OutboxError naming the file."""
        return OutboxError(f"cannot {what} the outbox: {exc}", path=str(self.path))

    def __len__(self) -> int:
        return self._size

    def add(self, msg_id: str, topic: str, payload: bytes, alert: bool) -> bool:
        """Store one message durably; False when the drop policy refused it."""
        return self.add_many([(msg_id, topic, payload, alert)])[0]

    def add_many(self, messages: list[tuple[str, str, bytes, bool]]) -> list[bool]:
        """Store ``(id, topic, payload, alert)`` messages in one durable transaction.

        One fsync for the lot; when this returns, every kept message is on disk.
        The result says, per message, whether the drop policy kept it; one whose id
        is already waiting is kept as that copy (counted in :attr:`merged`). When
        SQLite refuses the write (disk full, I/O error), nothing of the lot is
        stored and :class:`~flows.errors.OutboxError` is raised.
        """
        kept_flags: list[bool] = []
        with self._lock:
            try:
                self._write_many(messages, kept_flags)
            except sqlite3.Error as exc:
                raise self._failure(f"store {len(messages)} messages in", exc) from exc
        return kept_flags

    def _write_many(self, messages, kept_flags: list[bool]) -> None:
        """The transaction of :meth:`add_many` (the lock held)."""
        merged = 0
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for msg_id, topic, payload, alert in messages:
                if self._merge(msg_id, alert):
                    merged += 1
                    kept_flags.append(True)
                    continue
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
            self.merged += merged
        except BaseException:
            kept_flags.clear()
            self._rollback()
            raise
        finally:
            self._size = self._count()

    def _merge(self, msg_id: str, alert: bool) -> bool:
        """True when a message with this id is already waiting (inside the
        transaction); an alert then marks it an alert, for the drop policy."""
        row = self._db.execute(
            "SELECT alert FROM outbox WHERE id = ?", (msg_id,)
        ).fetchone()
        if row is None:
            return False
        if alert and not row[0]:
            self._db.execute("UPDATE outbox SET alert = 1 WHERE id = ?", (msg_id,))
        return True

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

    def _bump(self, name: str, by: int = 1) -> None:
        """Add ``by`` to the file's counter ``name`` (inside a transaction)."""
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, by),
        )

    def _count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    def _reclaim(self, at_open: bool = False) -> None:
        """Give free pages back to the disk when the queue is small (the lock
        held, no transaction open); bounded, see the module doc.

        A file without incremental vacuum is converted by one ``VACUUM`` when
        the queue is empty (at open whatever it holds free, later once the free
        pages are worth it). A failure is logged and otherwise ignored: the
        messages are safe, only the space stays taken.
        """
        if self._size > SMALL_QUEUE:
            return

        try:
            rows = self._size + self._db.execute(
                "SELECT COUNT(*) FROM sent"
            ).fetchone()[0]
            if rows > SMALL_QUEUE:
                return
            free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
            if not self._incremental:
                if rows == 0 and (at_open or free >= MIN_FREE_PAGES):
                    self._convert()
                return
            if free < MIN_FREE_PAGES:
                return

            # executescript steps the pragma to its end (execute frees one page).
            # An empty queue relocates nothing: further steps, for EMPTY_BUDGET_S.
            deadline = time.monotonic() + EMPTY_BUDGET_S
            while True:
                self._db.executescript(f"PRAGMA incremental_vacuum({RECLAIM_PAGES});")
                free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
                if rows or free < MIN_FREE_PAGES or time.monotonic() > deadline:
                    break
            if rows == 0:  # the file shrinks when the log is copied back
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as exc:
            self._rollback()
            logger.warning(
                "outbox %s: free space not given back to the disk (%s); the "
                "messages are unaffected",
                self.path,
                exc,
            )

    def reclaim(self) -> None:
        """Give free pages back to the disk now if the queue is small (bounded as
        after an acknowledgement): for an agent with nothing to do, and at close."""
        with self._lock:
            self._reclaim()

    def _convert(self) -> None:
        """Turn on incremental vacuum in an empty outbox written before it was
        used: SQLite takes the setting only with a ``VACUUM``."""
        before = self.path.stat().st_size
        self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        self._db.execute("VACUUM")
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        self._incremental = (
            self._db.execute("PRAGMA auto_vacuum").fetchone()[0] == _INCREMENTAL
        )
        logger.info(
            "outbox %s: converted to give free space back (%d bytes before, %d now)",
            self.path,
            before,
            self.path.stat().st_size,
        )

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
        rows = self._read([(sql, args)])
        return [OutboxMessage(r[0], r[1], r[2], bytes(r[3]), bool(r[4])) for r in rows]

    def _read(self, queries: list[tuple[str, tuple | list]],
              what: str = "read") -> list[tuple]:
        """The rows of each query in turn, read under the lock; a failure raised
        as :class:`OutboxError` (``what`` the outbox failed to do)."""
        rows: list[tuple] = []
        with self._lock:
            try:
                for sql, args in queries:
                    rows += self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise self._failure(what, exc) from exc
        return rows

    def pending_of(self, ids: list[str]) -> list[OutboxMessage]:
        """The messages among ``ids`` still waiting in the outbox, oldest first
        (an agent publishing again the ones it awaits answers for)."""
        parts = [ids[i : i + 500] for i in range(0, len(ids), 500)]
        rows = self._read([
            ("SELECT seq, id, topic, payload, alert FROM outbox WHERE id "
             f"IN ({', '.join('?' * len(part))})", part)
            for part in parts
        ])
        rows.sort(key=lambda r: r[0])
        return [OutboxMessage(r[0], r[1], r[2], bytes(r[3]), bool(r[4])) for r in rows]

    def ack(self, msg_id: str) -> bool:
        """Forget one acknowledged message; False if it was not (or no longer) here."""
        return self.ack_many([msg_id]) == 1

    def ack_many(self, ids: list[str], missing: list[str] | None = None) -> int:
        """Forget acknowledged messages in one transaction; how many were here.
        ``missing``, when given, gets the ids the file did not hold (dropped by
        the cap while in flight, say)."""
        if not ids:
            return 0
        with self._lock:
            try:
                gone = self._delete_many(ids, missing)
            except sqlite3.Error as exc:
                raise self._failure(f"forget {len(ids)} messages in", exc) from exc
            self._reclaim()
        return gone

    def _delete_many(self, ids: list[str], missing: list[str] | None = None) -> int:
        """The transaction of :meth:`ack_many` (the lock held). With ``keep_sent``
        the messages move to the ``sent`` table (its newest ``keep_sent`` kept)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            gone = 0
            for msg_id in ids:
                if self.keep_sent:
                    self._db.execute(
                        "INSERT OR REPLACE INTO sent (id, topic, payload, alert) "
                        "SELECT id, topic, payload, alert FROM outbox WHERE id = ?",
                        (msg_id,),
                    )
                here = self._db.execute(
                    "DELETE FROM outbox WHERE id = ?", (msg_id,)
                ).rowcount
                gone += here
                if not here and missing is not None:
                    missing.append(msg_id)
            if self.keep_sent and gone:
                # The newest keep_sent rows stay, however far apart their seqs
                # (answered ones left gaps: trimming by seq distance dropped old
                # unanswered ones while few rows were held).
                trimmed = self._keep_newest("sent", self.keep_sent)
                if trimmed > 0:
                    # Counted for good: a verdict for one of them later looks
                    # like one for an id this gateway never escalated.
                    self._bump("sent_forgotten", trimmed)
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        finally:
            self._size = self._count()
        return gone

    def _keep_newest(self, table: str, kept: int) -> int:
        """Delete all but the newest ``kept`` rows of ``table`` (by ``seq``,
        however far apart: answered rows leave gaps), inside the caller's
        transaction; how many went."""
        return self._db.execute(
            f"DELETE FROM {table} WHERE seq IN (SELECT seq FROM {table} ORDER BY "
            "seq DESC LIMIT -1 OFFSET ?)", (kept,)).rowcount

    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[None]:
        """One write transaction with the lock held: committed, or rolled back and
        raised as OutboxError ("cannot ``what`` the outbox")."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield
                    self._db.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise
            except sqlite3.Error as exc:
                raise self._failure(what, exc) from exc

    def set_aside(self, msg_id: str, reason: str) -> bool:
        """Move a message that cannot be sent as stored (its payload damaged in
        the file) out of the queue into the ``damaged`` table, with ``reason``:
        kept for a look (``sqlite3 OUTBOX 'SELECT id, reason FROM damaged'``),
        never published again. False if it was no longer queued."""
        with self._transaction(f"set escalation {msg_id} aside in"):
            self._db.execute(_DAMAGED_SCHEMA)
            self._db.execute(
                "INSERT OR REPLACE INTO damaged (id, topic, payload, alert, reason) "
                "SELECT id, topic, payload, alert, ? FROM outbox WHERE id = ?",
                (reason, msg_id),
            )
            here = self._db.execute(
                "DELETE FROM outbox WHERE id = ?", (msg_id,)).rowcount
            self._db.execute("DELETE FROM sent WHERE id = ?", (msg_id,))
            self._size = self._count()
        return bool(here)

    def topics(self) -> dict[str, int]:
        """How many messages, queued or sent and kept, each topic has (the site
        and gateway that wrote them are in it)."""
        rows = self._read([(
            "SELECT topic, COUNT(*) FROM (SELECT topic FROM outbox UNION ALL "
            "SELECT topic FROM sent) GROUP BY topic", ())])
        return {str(t): int(n) for t, n in rows}

    def last_seq(self) -> int:
        """The newest queued message's ``seq`` (0 when none is queued)."""
        rows = self._read([("SELECT COALESCE(MAX(seq), 0) FROM outbox", ())])
        return int(rows[0][0])

    def answered_many(self, ids: list[str]) -> int:
        """Forget messages whose answer (a verdict) came; how many were held.

        Sent ones, and copies waiting to be published (again): one put back in the
        queue after a quiet spell or a lost session, or left there by an earlier
        run, needs no publish once its verdict is here. The caller leaves out ids
        still in flight (handed to the link, not yet acknowledged)."""
        if not ids:
            return 0
        with self._transaction(f"forget {len(ids)} answered messages in"):
            gone = 0
            for i in ids:
                for table in ("sent", "outbox"):
                    gone += self._db.execute(
                        f"DELETE FROM {table} WHERE id = ?", (i,)).rowcount
                self._db.execute("INSERT OR REPLACE INTO answered (id) VALUES (?)",
                                 (i,))
            self._keep_newest("answered", ANSWERED_KEPT)
        with self._lock:
            self._size = self._count()
            self._reclaim()
        return gone

    def requeue_sent(self) -> int:
        """Put every sent, unanswered message back in the outbox, oldest first, to
        be published again (the broker lost them with its session); how many."""
        try:
            with self._transaction("requeue the sent messages of"):
                moved = self._db.execute(
                    "INSERT OR IGNORE INTO outbox (id, topic, payload, alert) "
                    "SELECT id, topic, payload, alert FROM sent ORDER BY seq"
                ).rowcount
                self._db.execute("DELETE FROM sent")
        finally:
            with self._lock, contextlib.suppress(sqlite3.Error):
                self._size = self._count()
        return moved

    def find(self, msg_id: str) -> OutboxMessage | None:
        """One message by id, waiting or sent and kept for a re-send; None if
        the file no longer holds it (acknowledged, answered or dropped)."""
        rows = self._read([
            (f"SELECT seq, id, topic, payload, alert FROM {table} WHERE id = ?",
             (msg_id,))
            for table in ("outbox", "sent")
        ])
        if not rows:
            return None
        row = rows[0]  # a message is in one table at a time; "outbox" is read first
        return OutboxMessage(row[0], row[1], row[2], bytes(row[3]), bool(row[4]))

    def was_answered(self, msg_id: str) -> bool:
        """Whether an escalation of this id was answered (one of the newest
        :data:`ANSWERED_KEPT` answered through :meth:`answered_many`)."""
        rows = self._read([("SELECT 1 FROM answered WHERE id = ?", (msg_id,))])
        return bool(rows)

    def sent_ids(self) -> list[str]:
        """Ids of sent messages kept for a re-send, oldest first."""
        rows = self._read([("SELECT id FROM sent ORDER BY seq", ())])
        return [r[0] for r in rows]

    def held_ids(self) -> set[str]:
        """Ids of every message the file holds, waiting or sent and kept for a
        re-send: the escalations a later run can still send or await."""
        rows = self._read([("SELECT id FROM outbox UNION SELECT id FROM sent", ())])
        return {r[0] for r in rows}

    @property
    def forgotten(self) -> int:
        """Sent, unanswered messages let go over the file's whole life because the
        ``sent`` table keeps only its newest ``keep_sent``: a verdict for one of
        them can no longer be matched to its escalation."""
        rows = self._read(
            [("SELECT value FROM counters WHERE name = 'sent_forgotten'", ())],
            "read the counters of")
        return rows[0][0] if rows else 0

    @property
    def dropped(self) -> dict[str, int]:
        """Messages dropped by the size bound, per decision (alert, escalate)."""
        rows = self._read([("SELECT name, value FROM counters", ())],
                          "read the counters of")
        counts = {"alert": 0, "escalate": 0}
        for name, value in rows:
            if name.startswith("dropped_"):
                counts[name.removeprefix("dropped_")] = value
        return counts

    def _release(self) -> None:
        """Let another run take the outbox (idempotent)."""
        fds, self._lock_fds = self._lock_fds, []
        for fd in fds:
            os.close(fd)  # closing the last descriptor drops the flock

    def close(self) -> None:
        """Close the file and release its lock; what is pending stays on disk for
        the next start."""
        with self._lock:
            if not self._closed:
                self._reclaim()
            self._closed = True
            self._db.close()
            self._release()
