"""The alert store: every escalation the re-scorer received, with its verdict.

One SQLite file in WAL mode. An escalation is keyed by (site, gateway, message id),
so a message delivered twice (MQTT QoS 1 is at least once) or received by two
re-scorers sharing the file is stored once: :meth:`AlertStore.add` returns False for
a copy. The gateway is part of the key: one gateway reusing another's message id
must not suppress (or be answered with) the other's escalation. Stores written before
that (keyed by id alone, schema version 0) are migrated in place when opened for
writing; ``readonly`` opens read them as they are. Several
processes may write the same file; SQLite serializes them (``busy_timeout`` 10 s).

Messages the re-scorer rejected (bad JSON, wrong schema, bad values...) are kept in
a second table, ``rejected`` (the dead letters: when, topic, kind, reason, and the
payload's first :data:`MAX_REJECTED_PAYLOAD` bytes with its full length), capped at
the newest :data:`MAX_REJECTED` rows so that a hostile gateway cannot fill the disk
through it. Stores of schema version 0 or 1 have no such table: it is added by the
same in-place migration (schema version 2); a ``readonly`` open lists none there.

Reading never fails on one damaged row: a field that is not what the store writes
(bytes that are not UTF-8, a ``flow`` that is not a JSON object, text in a number
column, a receive time no calendar holds, a verdict other than malicious or benign)
is kept as its stored text, and its row lists the field under ``"damaged"``
(:func:`damage`); a read that SQLite stops part way (a damaged page) keeps the rows
read before it (:class:`Listing`).

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
import math
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.errors import EXIT_FAILURE, BadInputError, GatewatchError, UsageError
from flows.record import CONN_FIELD_KINDS, value_problem

# PRAGMA user_version; 0: keyed by id alone (before the fix); 1: keyed by (site,
# gateway, id), no table of rejected messages; 2: with it.
SCHEMA_VERSION = 2
MAX_REJECTED = 10_000  # rejected messages kept; the oldest go first
MAX_REJECTED_PAYLOAD = 4096  # bytes of a rejected message's payload kept
MAX_REJECTED_TEXT = 1000  # characters of a rejected message's topic or reason kept
# The receive times a calendar date can show: 0001-01-01 to 9999-12-31 (UTC).
FIRST_TIME, LAST_TIME = -62_135_596_800.0, 253_402_300_799.0


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

# The dead letters: one row per rejected message (see the module docstring).
_REJECTED = (
    """
CREATE TABLE IF NOT EXISTS rejected (
    seq INTEGER PRIMARY KEY,
    received_at REAL NOT NULL,
    topic TEXT NOT NULL,
    site TEXT,
    gateway TEXT,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    payload BLOB NOT NULL,
    payload_length INTEGER NOT NULL,
    worker TEXT
)""",
    "CREATE INDEX IF NOT EXISTS rejected_time ON rejected (received_at)",
    "CREATE INDEX IF NOT EXISTS rejected_gateway ON rejected (site, gateway)",
)

_SCHEMA = (
    _TABLE.format(name="escalations")
    + """
CREATE INDEX IF NOT EXISTS escalations_time ON escalations (received_at);
CREATE INDEX IF NOT EXISTS escalations_gateway ON escalations (site, gateway);
"""
    + "".join(f"{statement};\n" for statement in _REJECTED)
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

_REJECTED_COLUMNS = (
    "seq",
    "received_at",
    "topic",
    "site",
    "gateway",
    "kind",
    "reason",
    "payload",
    "payload_length",
    "worker",
)

# How each column is checked when read back (see :func:`damage`).
_NUMBER_COLUMNS = frozenset(
    (
        "received_at",
        "sent_at",
        "ts",
        "src_port",
        "dst_port",
        "agent_score",
        "teacher_score",
        "threshold",
        "decided_at",
        "seq",
        "payload_length",
    )
)
_REQUIRED_COLUMNS = frozenset(
    ("id", "site", "gateway", "received_at", "agent_score", "agent_decision")
    + ("model_version", "flow", "seq", "topic", "kind", "reason", "payload")
    + ("payload_length",)
)
VERDICTS = ("malicious", "benign")


def _text(raw: bytes) -> str | bytes:
    """A TEXT value read from SQLite: its UTF-8 text, or the bytes themselves when
    they are not UTF-8 (the connection's ``text_factory``; :func:`damage` then
    marks the field), so one bad row cannot fail the whole read."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return bytes(raw)


def _shown_bytes(raw: bytes) -> str:
    """Bytes as text: UTF-8, with each byte that is not written ``\\xNN``."""
    return raw.decode("utf-8", "backslashreplace")


# Scores and thresholds: the protocol takes none outside 0..1.
_UNIT_COLUMNS = frozenset({"agent_score", "teacher_score", "threshold"})


def damage(item: dict[str, Any]) -> list[str]:
    """Check one row read from the store in place; the names of its damaged fields.

    A damaged field is one the store never writes so: bytes that are not UTF-8 (or
    a BLOB) in a text column, text in a number column, a number that is not finite,
    a NULL where the column requires a value, a score or threshold outside 0..1,
    a ``flow`` that is not a JSON object,
    a ``received_at`` no calendar date can show, a ``verdict`` other than
    malicious, benign or NULL. Each damaged field is replaced by its stored text
    (undecodable bytes written ``\\xNN``), so the row can still be listed and
    written as JSON. A ``flow`` that is whole is parsed into its dict. The
    ``payload`` of a rejected message is kept as bytes: it is a BLOB.
    """
    bad = []
    for name, value in item.items():
        if name == "payload":
            if not isinstance(value, bytes | str):
                bad.append(name)
                item[name] = b"" if value is None else str(value).encode()
            continue
        if isinstance(value, bytes):
            bad.append(name)
            item[name] = _shown_bytes(value)
        elif value is None:
            if name in _REQUIRED_COLUMNS:
                bad.append(name)
        elif name == "flow":
            flow = _flow(value)
            if flow is None:
                bad.append(name)
                item[name] = str(value)
            else:
                item[name] = flow
        elif name in _NUMBER_COLUMNS:
            if isinstance(value, str) or not math.isfinite(value):
                bad.append(name)
                item[name] = str(value)
            elif name == "received_at" and not FIRST_TIME <= value <= LAST_TIME:
                bad.append(name)
            elif name in _UNIT_COLUMNS and not 0.0 <= value <= 1.0:
                bad.append(name)  # the protocol allows no score outside 0..1
        elif not isinstance(value, str):
            bad.append(name)  # a number in a text column (SQLite would convert it)
            item[name] = str(value)
        elif name == "verdict" and value not in VERDICTS:
            bad.append(name)
    return bad


def _flow(text: Any) -> dict | None:
    """The stored flow as a dict; None when it is not a JSON object."""
    if not isinstance(text, str):
        return None
    try:
        flow = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return flow if isinstance(flow, dict) else None


@dataclass
class Listing:
    """What one read of the store gave.

    ``rows``: the rows read, in order, each a dict by column; a damaged one holds
    ``"damaged"``, the names of its damaged fields (see :func:`damage`).
    ``damaged``: how many rows are damaged. ``stopped``: SQLite's reason when the
    read stopped part way (a damaged page, an I/O error), the rows before it kept;
    None when it read to the end. ``missing``: the table is absent (a store of an
    older schema, opened read-only), so nothing was read.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    damaged: int = 0
    stopped: str | None = None
    missing: bool = False


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
    for table, columns in (("escalations", _COLUMNS), ("rejected", _REJECTED_COLUMNS)):
        if table not in tables:
            continue  # rejected: absent from stores of schema version 0 and 1
        have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
        missing = [c for c in columns if c not in have]
        if missing:
            raise BadInputError(
                f"not an alert store: its {table} table lacks the columns "
                f"{', '.join(missing)}. Nothing was changed",
                path=str(path),
            )


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a store of an older schema version to :data:`SCHEMA_VERSION`.

    Version 0 to 1: re-key the id-keyed escalations table by (site, gateway, id).
    Version 1 to 2: add the table of rejected messages. One transaction: the rows
    are copied into a new table, which replaces the old one; an interrupted
    migration leaves the old store as it was.
    """
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version >= SCHEMA_VERSION:
        return
    cols = ",".join(_COLUMNS)
    db.execute("BEGIN IMMEDIATE")
    try:
        # Again under the write lock: another process may have migrated meanwhile.
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version >= SCHEMA_VERSION:
            db.execute("COMMIT")
            return
        exists = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'escalations'"
        ).fetchone()
        if exists and version < 1:
            db.execute(_TABLE.format(name="escalations_v1"))
            db.execute(
                f"INSERT OR IGNORE INTO escalations_v1 ({cols}) "
                f"SELECT {cols} FROM escalations"
            )
            db.execute("DROP TABLE escalations")
            db.execute("ALTER TABLE escalations_v1 RENAME TO escalations")
        for statement in _REJECTED:
            db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        _rollback(db)
        raise


def _storable(text: Any) -> str:
    """``text`` as SQLite can store it: at most :data:`MAX_REJECTED_TEXT`
    characters, a lone surrogate (no UTF-8 form) written ``\\udcNN``."""
    text = str(text)[:MAX_REJECTED_TEXT]
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def key(escalation: dict[str, Any]) -> tuple[str, str, str]:
    """The store key of an escalation (or a stored row): (site, gateway, id)."""
    return (escalation["site"], escalation["gateway"], escalation["id"])


def _time_and_gateway(
    since: float | None, gateway: str | None
) -> tuple[list[str], list[Any]]:
    """WHERE terms and their arguments for a receive-time floor and a gateway
    (``GATEWAY`` or ``SITE/GATEWAY``), shared by both listings."""
    where: list[str] = []
    args: list[Any] = []
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
    return where, args


class AlertStore:
    """Escalations and verdicts in SQLite; safe to share between threads.

    A new or empty file becomes a store; any other database must be one already.
    With ``readonly`` the file must exist and be a store, and is never written.
    ``max_rejected`` rejected messages are kept (:meth:`add_rejected`), the newest.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        readonly: bool = False,
        max_rejected: int = MAX_REJECTED,
    ) -> None:
        self.path = Path(path)
        self.max_rejected = max(1, int(max_rejected))
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
                self._db.text_factory = _text
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
            self._db.text_factory = _text
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
        with self._writing(f"{len(rows)} escalations") as db:
            return [db.execute(sql, row).rowcount == 1 for row in rows]

    @contextmanager
    def _writing(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock: committed whole, or rolled back
        whole and raised as :class:`StoreError` ("cannot write WHAT: reason")."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(self._db)
                raise StoreError(f"cannot write {what}: {exc}", path=self.path) from exc
            except BaseException:
                _rollback(self._db)
                raise

    def score_unscored(
        self, pairs: Iterable[tuple[dict, dict]], worker: str = ""
    ) -> list[bool]:
        """Give stored unscored escalations their verdicts, in one transaction;
        True where a row was unscored and now has one (a row scored meanwhile, by
        another re-scorer sharing the file, is left as it is).

        All or nothing, like :meth:`add_many`.
        """
        sql = (
            "UPDATE escalations SET verdict = ?, teacher_score = ?, threshold = ?, "
            "teacher_version = ?, verdict_id = ?, decided_at = ?, worker = ? "
            "WHERE site = ? AND gateway = ? AND id = ? AND verdict IS NULL"
        )
        rows = [(*_verdict_columns(v), worker, *key(esc)) for esc, v in pairs]
        with self._writing(f"{len(rows)} verdicts") as db:
            return [db.execute(sql, row).rowcount == 1 for row in rows]

    def known(
        self, keys: Iterable[tuple[str, str, str]]
    ) -> dict[tuple[str, str, str], dict[str, Any]]:
        """The stored rows of those (site, gateway, id) keys that are here already
        (for re-sent verdicts), by key; a damaged row holds ``"damaged"`` (see
        :func:`damage`)."""
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
                        bad = damage(row)
                        if bad:
                            row["damaged"] = bad
                        out[k] = row
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read: {exc}", path=self.path) from exc
        return out

    def count(self) -> int:
        """How many escalations are stored."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM escalations").fetchone()[0]

    def listing(
        self,
        *,
        since: float | None = None,
        gateway: str | None = None,
        decision: str | None = None,
        limit: int | None = None,
        newest: bool = False,
    ) -> Listing:
        """Escalations with their verdicts, oldest first; damaged rows marked.

        ``gateway`` is ``GATEWAY`` or ``SITE/GATEWAY``; ``decision`` matches the
        agent's decision (``escalate``, ``alert``) or the verdict (``malicious``,
        ``benign``, or ``unscored`` for those the teacher could not score);
        ``since`` is a Unix time compared with the receive time; ``limit`` keeps
        the oldest so many, or with ``newest`` the newest so many (still listed
        oldest first).
        """
        where, args = _time_and_gateway(since, gateway)
        if decision:
            if decision in ("escalate", "alert"):
                where.append("agent_decision = ?")
            elif decision in VERDICTS:
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
        order = "received_at, site, gateway, id"
        return self._read(sql, args, _COLUMNS, order, limit, newest)

    def query(self, **filters: Any) -> list[dict]:
        """The rows of :meth:`listing` (same filters); damaged ones marked.

        Raises :class:`StoreError` when SQLite stops the read part way.
        """
        got = self.listing(**filters)
        if got.stopped is not None:
            raise StoreError(f"cannot read: {got.stopped}", path=self.path)
        return got.rows

    def add_rejected(
        self,
        topic: str,
        kind: str,
        reason: str,
        payload: bytes,
        worker: str = "",
    ) -> None:
        """Keep one rejected message: its topic, the kind and reason of the
        rejection, the first :data:`MAX_REJECTED_PAYLOAD` bytes of its payload and
        its full length.

        Only the newest ``max_rejected`` rows stay (older ones are deleted in the
        same transaction), and topic and reason are cut to
        :data:`MAX_REJECTED_TEXT` characters: a flood of bad messages costs a
        bounded amount of disk. A failed write raises :class:`StoreError`.
        """
        payload = bytes(payload)
        parts = str(topic).split("/")
        site, gateway = (parts[2], parts[3]) if len(parts) == 5 else (None, None)
        row = (
            time.time(),
            _storable(topic),
            None if site is None else _storable(site),
            None if gateway is None else _storable(gateway),
            _storable(kind),
            _storable(reason),
            payload[:MAX_REJECTED_PAYLOAD],
            len(payload),
            _storable(worker),
        )
        columns = _REJECTED_COLUMNS[1:]
        sql = (
            f"INSERT INTO rejected ({','.join(columns)}) "
            f"VALUES ({','.join('?' * len(columns))})"
        )
        with self._writing("a rejected message") as db:
            seq = db.execute(sql, row).lastrowid
            last_dropped = seq - self.max_rejected
            db.execute("DELETE FROM rejected WHERE seq <= ?", (last_dropped,))

    def rejected(
        self,
        *,
        since: float | None = None,
        gateway: str | None = None,
        limit: int | None = None,
        newest: bool = False,
    ) -> Listing:
        """The rejected messages kept, oldest first (see :meth:`add_rejected`).

        ``since`` and ``limit`` as in :meth:`listing`; ``gateway`` (``GATEWAY`` or
        ``SITE/GATEWAY``) matches the gateway its topic names (a topic of five
        levels, ``gatewatch/v1/SITE/GATEWAY/escalations``). A store
        without the table (schema version 0 or 1, opened read-only) gives an
        empty listing with ``missing`` set.
        """
        with self._lock:
            present = self._db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'rejected'"
            ).fetchone()
        if not present:
            return Listing(missing=True)
        where, args = _time_and_gateway(since, gateway)
        sql = f"SELECT {','.join(_REJECTED_COLUMNS)} FROM rejected"
        if where:
            sql += " WHERE " + " AND ".join(where)
        order = "received_at, seq"
        return self._read(sql, args, _REJECTED_COLUMNS, order, limit, newest)

    def _read(
        self,
        sql: str,
        args: list,
        columns: tuple[str, ...],
        order: str,
        limit: int | None,
        newest: bool,
    ) -> Listing:
        """Run one listing query; keep what was read if SQLite stops part way."""
        if newest:
            descending = ", ".join(f"{c} DESC" for c in order.split(", "))
            sql += f" ORDER BY {descending}"
        else:
            sql += f" ORDER BY {order}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        got = Listing()
        raw = []
        with self._lock:
            try:
                for r in self._db.execute(sql, args):
                    raw.append(r)
            except sqlite3.Error as exc:
                got.stopped = str(exc)
        if newest:
            raw.reverse()
        for r in raw:
            item = dict(zip(columns, r, strict=True))
            bad = damage(item)
            if bad:
                item["damaged"] = bad
                got.damaged += 1
            got.rows.append(item)
        return got

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._db.close()
