"""The alert store: every escalation the re-scorer received, with its verdict.

One SQLite file in WAL mode. An escalation is keyed by (site, gateway, message id),
so a message delivered twice (MQTT QoS 1 is at least once) or received by two
re-scorers sharing the file is stored once: :meth:`AlertStore.add` returns False for
a copy. The gateway is part of the key: one gateway reusing another's message id
must not suppress (or be answered with) the other's escalation. Stores written before
that (keyed by id alone, schema version 0) are migrated in place when opened for
writing; ``readonly`` opens read them as they are. Several
processes may write the same file; SQLite serializes them (``busy_timeout`` 10 s).

A file that is a SQLite database but not an alert store (an agent's outbox, say) is
refused with :class:`~flows.errors.BadInputError` before anything is written to it;
``readonly=True`` (``teacher alerts``) opens the file without writing at all.

A store that cannot be opened for writing (a full disk, a folder that cannot be
made), and a write or read that fails once it is open (disk full, I/O error, a lock
held past ``busy_timeout``), raise :class:`StoreError` (exit 1) naming the file and
SQLite's own reason; a failed write is rolled back whole (or was already, by
SQLite), so none of its rows is stored.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flows.errors import EXIT_FAILURE, BadInputError, GatewatchError, UsageError
from flows.record import CONN_FIELD_KINDS, value_problem

SCHEMA_VERSION = 1  # PRAGMA user_version; 0: keyed by id alone (before the fix)


class StoreError(GatewatchError):
    """The alert store refused a write or a read after it was opened (exit 1).

    The message names the file and SQLite's reason (``database or disk is full``).
    """

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, *, path: str | Path) -> None:
        self.path = str(path)
        super().__init__(f"alert store {path}: {message}")


def _rollback(db: sqlite3.Connection) -> None:
    """Roll back the open transaction, if SQLite has not done so already.

    On some errors (SQLITE_FULL, SQLITE_IOERR, ...) SQLite rolls the transaction
    back itself, and a ROLLBACK then fails with "no transaction is active"; that
    second error must not hide the first, which the caller raises.
    """
    if not db.in_transaction:
        return
    try:
        db.execute("ROLLBACK")
    except sqlite3.Error:
        pass


_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    id TEXT NOT NULL,
    site TEXT NOT NULL,
    gateway TEXT NOT NULL,
    received_at REAL NOT NULL,
    sent_at REAL,
    ts REAL,
    src_ip TEXT, src_port INTEGER, dst_ip TEXT, dst_port INTEGER, proto TEXT,
    agent_score REAL NOT NULL,
    agent_decision TEXT NOT NULL,
    model_version TEXT NOT NULL,
    flow TEXT NOT NULL,
    verdict TEXT,
    teacher_score REAL,
    threshold REAL,
    teacher_version TEXT,
    verdict_id TEXT,
    decided_at REAL,
    worker TEXT,
    PRIMARY KEY (site, gateway, id)
);
"""

_SCHEMA = (
    _TABLE.format(name="escalations")
    + """
CREATE INDEX IF NOT EXISTS escalations_time ON escalations (received_at);
CREATE INDEX IF NOT EXISTS escalations_gateway ON escalations (site, gateway);
"""
)

_COLUMNS = (
    "id",
    "site",
    "gateway",
    "received_at",
    "sent_at",
    "ts",
    "src_ip",
    "src_port",
    "dst_ip",
    "dst_port",
    "proto",
    "agent_score",
    "agent_decision",
    "model_version",
    "flow",
    "verdict",
    "teacher_score",
    "threshold",
    "teacher_version",
    "verdict_id",
    "decided_at",
    "worker",
)


def _bindable(kind: str, value: Any) -> Any:
    """``value`` if SQLite can store it as a field of ``kind``, else None.

    parse_escalation checks these already; this keeps one odd value (a dict, an
    integer past int64) from failing the whole batch's transaction.
    """
    return value if value_problem(kind, value) is None else None


def _row(
    escalation: dict[str, Any], verdict: dict[str, Any] | None, worker: str
) -> tuple:
    """The column values of one (escalation, verdict) pair, in ``_COLUMNS`` order.

    ``verdict`` None stores the escalation unscored (its verdict columns NULL): the
    teacher could not score it, and it is kept rather than lost.
    """
    flow = escalation.get("flow")
    flow = flow if isinstance(flow, dict) else {}

    def field(name: str) -> Any:
        return _bindable(CONN_FIELD_KINDS[name], flow.get(name))

    return (
        escalation["id"],
        escalation["site"],
        escalation["gateway"],
        time.time(),
        _bindable("f64", escalation.get("sent_at")),
        field("ts"),
        field("src_ip"),
        field("src_port"),
        field("dst_ip"),
        field("dst_port"),
        field("proto"),
        escalation["score"],
        escalation["decision"],
        escalation["model_version"],
        json.dumps(flow, default=repr),
        *_verdict_columns(verdict),
        worker,
    )


def _verdict_columns(verdict: dict[str, Any] | None) -> tuple:
    """The six verdict columns of a row; all NULL for an unscored escalation."""
    if verdict is None:
        return (None,) * 6
    return (
        verdict["verdict"],
        verdict["score"],
        verdict["threshold"],
        verdict["teacher_version"],
        verdict["id"],
        _bindable("f64", verdict.get("sent_at")),
    )


def _check_store(db: sqlite3.Connection, path: Path, *, empty_ok: bool) -> None:
    """Raise BadInputError unless ``db`` is an alert store (or, if allowed, empty)."""
    tables = [
        r[0]
        for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
        )
    ]
    if not tables:
        if empty_ok:
            return
        raise BadInputError(
            "not an alert store: the database holds no tables (teacher serve "
            "--store writes one)",
            path=str(path),
        )
    if "escalations" not in tables:
        shown = ", ".join(tables[:8]) + (", ..." if len(tables) > 8 else "")
        raise BadInputError(
            f"not an alert store: it holds the tables {shown} and no escalations "
            "table (an agent outbox?); give the file that teacher serve --store "
            "writes. Nothing was changed",
            path=str(path),
        )
    have = {r[1] for r in db.execute("PRAGMA table_info(escalations)")}
    missing = [c for c in _COLUMNS if c not in have]
    if missing:
        raise BadInputError(
            f"not an alert store: its escalations table lacks the columns "
            f"{', '.join(missing)}. Nothing was changed",
            path=str(path),
        )


def _migrate(db: sqlite3.Connection) -> None:
    """Re-key an id-keyed (version 0) escalations table by (site, gateway, id).

    One transaction: the rows are copied into a new table, which replaces the old
    one; an interrupted migration leaves the old store as it was.
    """
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version >= SCHEMA_VERSION:
        return
    cols = ",".join(_COLUMNS)
    db.execute("BEGIN IMMEDIATE")
    try:
        # Again under the write lock: another process may have migrated meanwhile.
        if db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
            db.execute("COMMIT")
            return
        exists = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'escalations'"
        ).fetchone()
        if exists:
            db.execute(_TABLE.format(name="escalations_v1"))
            db.execute(
                f"INSERT OR IGNORE INTO escalations_v1 ({cols}) "
                f"SELECT {cols} FROM escalations"
            )
            db.execute("DROP TABLE escalations")
            db.execute("ALTER TABLE escalations_v1 RENAME TO escalations")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        _rollback(db)
        raise


def key(escalation: dict[str, Any]) -> tuple[str, str, str]:
    """The store key of an escalation (or a stored row): (site, gateway, id)."""
    return (escalation["site"], escalation["gateway"], escalation["id"])


class AlertStore:
    """Escalations and verdicts in SQLite; safe to share between threads.

    A new or empty file becomes a store; any other database must be one already.
    With ``readonly`` the file must exist and be a store, and is never written.
    """

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            if readonly:
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                self._db = sqlite3.connect(
                    uri,
                    uri=True,
                    timeout=10.0,
                    check_same_thread=False,
                    isolation_level=None,
                )
                self._db.execute("PRAGMA busy_timeout=10000")
                _check_store(self._db, self.path, empty_ok=False)
                return
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"cannot make its folder {self.path.parent}: "
                    f"{exc.strerror or exc}",
                    path=path,
                ) from exc
            self._db = sqlite3.connect(
                str(self.path),
                timeout=10.0,
                check_same_thread=False,
                isolation_level=None,
            )
            # Checked before the first write: WAL mode and the schema change a file.
            _check_store(self._db, self.path, empty_ok=True)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=10000")
            _migrate(self._db)
            self._db.executescript(_SCHEMA)
        except (sqlite3.DatabaseError, BadInputError) as exc:
            db = getattr(self, "_db", None)
            if db is not None:
                db.close()
            if isinstance(exc, BadInputError):
                raise
            if not readonly and isinstance(exc, sqlite3.OperationalError):
                # The file may be a good store on a full disk: an output that
                # cannot be written, not bad input.
                raise StoreError(f"cannot open for writing: {exc}", path=path) from exc
            raise BadInputError(
                f"cannot open the alert store: {exc}", path=str(path)
            ) from exc

    def add(
        self, escalation: dict[str, Any], verdict: dict[str, Any], worker: str = ""
    ) -> bool:
        """Store one escalation with its verdict; False when its key is here already.

        The key is (site, gateway, id): see :func:`key`.
        """
        return self.add_many([(escalation, verdict)], worker)[0]

    def add_many(
        self, pairs: Iterable[tuple[dict, dict | None]], worker: str = ""
    ) -> list[bool]:
        """Store (escalation, verdict) pairs in one transaction; True where new.

        A pair whose verdict is None is stored unscored (see :func:`_row`).

        All or nothing: on :class:`StoreError` (disk full, say) none of the pairs
        is stored.
        """
        rows = [_row(esc, ver, worker) for esc, ver in pairs]
        sql = (
            f"INSERT OR IGNORE INTO escalations ({','.join(_COLUMNS)}) "
            f"VALUES ({','.join('?' * len(_COLUMNS))})"
        )
        out = []
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for row in rows:
                    out.append(self._db.execute(sql, row).rowcount == 1)
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(self._db)
                raise StoreError(
                    f"cannot write {len(rows)} escalations: {exc}", path=self.path
                ) from exc
            except BaseException:
                _rollback(self._db)
                raise
        return out

    def known(
        self, keys: Iterable[tuple[str, str, str]]
    ) -> dict[tuple[str, str, str], dict[str, Any]]:
        """The stored rows of those (site, gateway, id) keys that are here already
        (for re-sent verdicts), by key."""
        keys = list(dict.fromkeys(tuple(k) for k in keys))
        out: dict[tuple[str, str, str], dict[str, Any]] = {}
        sql = (
            f"SELECT {','.join(_COLUMNS)} FROM escalations "
            "WHERE site = ? AND gateway = ? AND id = ?"
        )
        with self._lock:
            try:
                for k in keys:
                    r = self._db.execute(sql, k).fetchone()
                    if r is not None:
                        row = dict(zip(_COLUMNS, r, strict=True))
                        out[key(row)] = row
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read: {exc}", path=self.path) from exc
        return out

    def count(self) -> int:
        """How many escalations are stored."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM escalations").fetchone()[0]

    def query(
        self,
        *,
        since: float | None = None,
        gateway: str | None = None,
        decision: str | None = None,
        limit: int | None = None,
    ) -> list[dict]:
        """Escalations with their verdicts, oldest first.

        ``gateway`` is ``GATEWAY`` or ``SITE/GATEWAY``; ``decision`` matches the
        agent's decision (``escalate``, ``alert``) or the verdict (``malicious``,
        ``benign``, or ``unscored`` for those the teacher could not score);
        ``since`` is a Unix time compared with the receive time.
        """
        where, args = [], []
        if since is not None:
            where.append("received_at >= ?")
            args.append(float(since))
        if gateway:
            site, _, gw = gateway.rpartition("/")
            where.append("gateway = ?")
            args.append(gw)
            if site:
                where.append("site = ?")
                args.append(site)
        if decision:
            if decision in ("escalate", "alert"):
                where.append("agent_decision = ?")
            elif decision in ("malicious", "benign"):
                where.append("verdict = ?")
            elif decision == "unscored":
                where.append("verdict IS NULL")
            else:
                raise UsageError(
                    "--decision must be escalate, alert, malicious, benign or "
                    "unscored"
                )
            if decision != "unscored":
                args.append(decision)
        sql = f"SELECT {','.join(_COLUMNS)} FROM escalations"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY received_at, site, gateway, id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        out = []
        for r in rows:
            item = dict(zip(_COLUMNS, r, strict=True))
            item["flow"] = json.loads(item["flow"])
            out.append(item)
        return out

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._db.close()
