"""The central re-scorer: the teacher answers every gateway's escalations.

``teacher serve`` subscribes to ``$share/<group>/gatewatch/v1/+/+/escalations`` (an
MQTT v5 shared subscription, so N processes in one group split the load; the broker
distributes), scores the escalated windows with the teacher in micro-batches (at most
``--max-batch`` windows, waiting at most ``--max-wait-ms`` for a batch to fill; on the
GPU when present), keeps each escalation and its verdict in the alert store and
publishes the verdict to the gateway's ``verdicts`` topic.

Nothing is lost and nothing is stored twice: an escalation is acknowledged to the
broker only after it is in the store (manual PUBACK), and the store is keyed by
(site, gateway, message id), so a copy (a replay by the agent, or a redelivery)
is not scored again: its stored verdict is published once more. The gateway is
part of the key: one gateway publishing another's message id first neither
suppresses the other's escalation nor gets its verdict sent to it. The MQTT
session outlives the process
(``--session-expiry``, one hour by default, under a client id that stays the same
across restarts), so escalations the broker had in flight or queued for a
re-scorer that was killed are delivered again when it comes back. Without
``--client-id``, each re-scorer takes the lowest of
``gatewatch-rescorer-<host>-<group>``, ``...-2``, ``...-3``... that no running
re-scorer of this user on this host holds (a lock file per id in
``$GATEWATCH_RUN_DIR``, by default ``/tmp/gatewatch-<uid>``): several re-scorers
on one host never share an id (the broker would keep only the newer connection
and the two would take turns kicking each other off), and one that was killed
and started again takes its id, and its session, back. With ``--session-expiry
0`` nothing waits for a restart, so each process takes a fresh
``...-clean-<hex>`` id. A clean stop (SIGTERM,
Ctrl-C, ``--duration``) is another matter: the re-scorer leaves the group first (it
unsubscribes), stores and answers what the broker had already sent it, then ends
its session, so the broker routes nothing more to a process that will not read it.
``--session-expiry 0`` asks for a clean session, which the broker drops at once
even when the process dies.

An alert store that cannot be written (disk full, I/O error) stops the re-scorer at
the first failed write: the escalations it holds unstored are not acknowledged, it
leaves the share group (MQTT v5) and disconnects keeping its session, so the broker
delivers them again when it comes back with the same client id; ``teacher serve``
then exits 1 with one ``error:`` line naming the store.

A teacher call that fails (a device error, memory run out on a large batch) is
retried one escalation at a time; an escalation the teacher cannot score even alone
is stored unscored (``teacher alerts --decision unscored``), logged by id and
acknowledged, and gets no verdict: kept, not lost, and no poison message that comes
back after every restart. A copy of it that comes again (an outbox replay, or the
flow read again after an agent restart) is scored from the window it carries and
fills in the row (the store keeps no windows, so without a copy the row stays); a
run that leaves escalations unscored exits 1. A teacher that scores plain windows
as NaN or outside 0..1 is refused before the re-scorer connects.

Bad messages are rejected, counted per kind, logged (the first of each kind as a
warning, the others at INFO with their topic and kind) and kept in the alert store's
table of rejected messages (the newest 10,000, payloads cut to 4 KB: see
:mod:`teacher.store`; ``teacher alerts --rejected`` lists them); the service goes
on. A rejected message is acknowledged once it is kept, as an escalation is once
stored: when that write fails, the store-failure rule above applies to it too.
A rejected escalation (one whose topic names a gateway and whose payload carries an
escalation id) is answered on the gateway's ``verdicts`` topic with a rejection
(reason and detail, no verdict; ``rejections_sent``), so its agent knows that no
verdict comes from here: an escalation of another window shape, from agents of
another model or meant for a re-scorer of another teacher on the same broker, is
taken from the share group all the same (a topic does not say its shape, and the
broker sends an escalation to one member only), and the agent exits 6 unless
another re-scorer answers it with a verdict.

An escalation delivered with the retain flag is rejected (kind ``retained``) before
it is read: agents never publish escalations retained, so a retained one is stale
or forged, and the broker would hand it to every re-scorer at every start (and,
scored, it would be stored again in every new store). It is kept in the table of
rejected messages like any other, but not answered: no agent awaits it (a rejection
of an id an agent did send, a forged retained copy, would only make it log a
misleading one), and an answer would be sent again at every start for as long as
the broker keeps the message. An empty retained message on its topic clears it.
The flag is what the broker sets: a retained message sent because of a (new)
subscription; one published retained while the re-scorer is subscribed reaches
it live, without the flag, and is read as any escalation.

A copy whose stored row is damaged (a verdict or score that is not what the store
writes) gets no verdict again; that is logged as one error naming the store and the
(site, gateway, id) key, and the rest of its batch is answered. An escalation whose
batch fails for another reason (a fault of the re-scorer itself, logged with its id)
is acknowledged and counted ``failed``; ``teacher serve`` then exits 1 at the end,
saying how many.

Against a broker that speaks only MQTT 3.1.1 (amqtt) there are no shared
subscriptions: run one re-scorer there.

``--checkpoint`` also takes a torch-int8 artifact folder (``compress run --target
torch-int8``), told from a checkpoint by the manifest.json it holds: the re-scorer
then scores with its int8 program, its encoder's window shape and its decision
threshold (:class:`compress.inc.Int8Teacher`), and its verdicts carry
``torch-int8:sha256:<manifest sha256, 16 digits>`` as ``teacher_version``. An
artifact of another target, a file missing or changed since the manifest was
written, or an encoder that does not fit is refused at start (exit 1).

``teacher alerts`` queries the store by time, gateway and decision; a damaged row is
listed with its damaged fields marked, and the command exits 4. It never writes the
store: one in a folder that cannot be written (a WAL-mode copy on a read-only mount)
is read from a private temporary copy of it and its -wal file when it has one (so
the rows the -wal holds are listed), else, or when the copy fails, as an unchanging
file; a note says which, and what that does not see.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import math
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent import protocol as proto
from edge_agent.locks import RUN_DIR_ENV, fcntl, own_folder, run_folder, try_lock
from edge_agent.mqtt import (
    BrokerAddress,
    MessageTooLargeError,
    MqttLink,
    Protocol,
    TlsOptions,
    check_credentials,
    redact_url,
)
from flows.argtypes import integer, real
from flows.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL_INPUT,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    BadInputError,
    GatewatchError,
    ModelError,
    PartialInputError,
    TransportError,
    UsageError,
)
from teacher import logger
from teacher.store import (
    FIRST_TIME,
    LAST_TIME,
    MAX_REJECTED,
    MAX_REJECTED_PAYLOAD,
    AlertStore,
    Listing,
    StoreError,
    _check_store,
    _text,
    key,
)

DEFAULT_STORE = "gatewatch-alerts.sqlite"
DEFAULT_GROUP = "gatewatch"
DEFAULT_SESSION_EXPIRY = 3600  # seconds the broker keeps a dead re-scorer's session
MAX_CLIENT_ID_BYTES = 65_535  # MQTT writes the client id with a 16-bit length
MAX_CLIENT_ID_SLOTS = 64  # default client ids per host and share group
MAX_DURATION = 366 * 86_400  # --duration: at most a year (and a day)
MAX_CONNECT_TIMEOUT = 3600  # --connect-timeout: at most an hour
MAX_LIMIT = 2**63 - 1  # --limit: SQLite's LIMIT is a signed 64-bit integer
# An escalation id as agents make them (proto checks the same on escalations).
_ESCALATION_ID = re.compile(r"[0-9a-f]{32}")


# Why a retained escalation is refused (kept with it in the rejected table).
RETAINED_REASON = (
    "escalations are never published retained; a retained one is stale or forged "
    "(an empty retained message on its topic clears it)"
)


def _unscored(row: dict[str, Any]) -> bool:
    """True for a stored row the teacher could not score (verdict NULL, and not
    because the store is damaged there)."""
    return row["verdict"] is None and "verdict" not in row.get("damaged", ())


def check_broker(url: str) -> str:
    """``url`` if it names a broker (``mqtt://HOST:PORT``...), else UsageError.

    Checked before the teacher is loaded, so a typo fails at once. Should the URL
    parser raise a bare ValueError (``urlsplit`` does on an IPv6 address without
    its closing bracket), it becomes a usage error naming the URL.
    """
    try:
        BrokerAddress.parse(url)
    except ValueError as exc:
        raise UsageError(
            f"--broker {redact_url(url)!r}: not a URL like mqtt://HOST:PORT or "
            f"mqtts://[IPv6]:PORT ({exc})"
        ) from exc
    return url


def check_client_id(client_id: str | None) -> str | None:
    """``client_id`` if MQTT can carry it, else UsageError (None passes).

    paho would fail deep inside CONNECT on an id it cannot encode (too long for
    the 16-bit length, or not valid UTF-8), so it is refused before connecting.
    A broker may allow fewer bytes still; it then refuses the connection.
    """
    if client_id is None:
        return None
    try:
        size = len(client_id.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise UsageError(
            f"--client-id {client_id[:20]!r}...: not valid UTF-8 ({exc.reason})"
        ) from exc
    if size > MAX_CLIENT_ID_BYTES:
        raise UsageError(
            f"--client-id {client_id[:20]!r}... is {size} bytes of UTF-8; MQTT "
            f"allows at most {MAX_CLIENT_ID_BYTES} (and a broker may allow fewer)"
        )
    problem = proto.text_problem(client_id)
    if problem is None and not client_id.isprintable():
        problem = "holds a character that is not printable"
    if problem is not None:
        raise UsageError(
            f"--client-id {client_id[:20]!r} {problem}; brokers drop a CONNECT "
            "whose client id holds control characters"
        )
    return client_id


def check_share_group(group: str | None) -> str | None:
    """``group`` if it can name an MQTT shared subscription, else UsageError.

    One topic level of letters, digits, ``.``, ``_`` and ``-`` (no ``/``, ``+``,
    ``#``); ``''`` and None mean no share group. Checked before the teacher is
    loaded and the broker connected.
    """
    if group:
        proto.validate_id(group, "--share-group")
    return group


def default_client_id(share_group: str | None) -> str:
    """The base of the default client ids: host and share group.

    The first re-scorer of a group on a host takes it as it is, the others add
    ``-2``, ``-3``... (:func:`claim_client_id`).
    """
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()) or "host"
    return f"gatewatch-rescorer-{host}-{share_group or 'single'}"[:128]


class ClientIdClaim:
    """A default client id held by this process: an exclusive lock (``flock``)
    on ``<run folder>/<client id>.lock``, which the kernel drops when the process
    ends however it ends, so a restarted re-scorer can take the id again."""

    def __init__(self, client_id: str, fd: int | None = None) -> None:
        self.client_id = client_id
        self._fd = fd

    @property
    def locked(self) -> bool:
        """True while this process holds the id's lock."""
        return self._fd is not None

    def release(self) -> None:
        """Let another re-scorer take this id (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the last descriptor drops the flock


def claim_client_id(share_group: str | None, session_expiry: int) -> ClientIdClaim:
    """The default client id of a re-scorer: unique per process on this host, and
    the same after a restart where a kept session makes that matter.

    With a kept session (``session_expiry`` > 0) it is the lowest of
    ``gatewatch-rescorer-<host>-<group>``, ``...-2``, ``...-3``... (up to
    ``MAX_CLIENT_ID_SLOTS``) that no running re-scorer of this user on this host
    holds: one re-scorer keeps the id it always had, several get one each, and
    one that was killed and is started again takes its id back (the others still
    hold theirs), so the broker delivers what waited in its session. With a clean
    session (0) nothing waits for a restart: a fresh ``...-clean-<8 hex>`` per
    process, so it never takes over (and wipes) a kept session of another.

    UsageError when the lock folder (:func:`run_folder`) cannot be used or all
    the ids are held.
    """
    base = default_client_id(share_group)
    if session_expiry <= 0:
        return ClientIdClaim(f"{base}-clean-{secrets.token_hex(4)}")
    if fcntl is None:  # no flock (Windows): one re-scorer per host and group
        return ClientIdClaim(base)
    folder = run_folder()
    own_folder(
        folder, "the default client id's lock",
        f"set {RUN_DIR_ENV} to a folder of your own, or give --client-id",
    )
    for slot in range(1, MAX_CLIENT_ID_SLOTS + 1):
        client_id = base if slot == 1 else f"{base}-{slot}"
        path = folder / f"{client_id}.lock"
        try:
            fd = try_lock(path)
        except OSError as exc:
            raise UsageError(
                f"cannot lock {path} for the default client id "
                f"({exc.strerror or exc}); set {RUN_DIR_ENV} to a folder of your "
                "own, or give --client-id"
            ) from exc
        if fd is not None:
            return ClientIdClaim(client_id, fd)
    raise UsageError(
        f"all {MAX_CLIENT_ID_SLOTS} default client ids of {base} are held by "
        f"running re-scorers on this host (locks in {folder}); give --client-id"
    )


def teacher_version(teacher: Any) -> str:
    """A short id of the teacher: its ``version``, else the sha256 of its weights."""
    version = getattr(teacher, "version", None)
    if version:
        return str(version)
    path = getattr(teacher, "path", None)
    weights = Path(path) / "model.safetensors" if path else None
    if weights is not None and weights.is_file():
        return "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    return "unknown"


def load_served_teacher(path: str | Path, allow_unverified: bool | None) -> Any:
    """What ``--checkpoint`` names, loaded: a torch-int8 artifact folder (one that
    holds manifest.json) as :class:`compress.inc.Int8Teacher`, else a teacher
    checkpoint folder (``allow_unverified`` applies to checkpoints only: an
    artifact is always checked against its manifest). ModelError when unusable."""
    folder = Path(path)
    manifest = folder / "manifest.json"
    if manifest.exists() or manifest.is_symlink():
        from compress.inc import load_int8_teacher

        return load_int8_teacher(folder)
    from teacher.checkpoint import load_teacher

    return load_teacher(path, allow_unverified=allow_unverified)


def _window_shape(teacher: Any) -> tuple[int, int]:
    """(window, n_features) of the windows ``teacher`` scores."""
    config = teacher.config
    if isinstance(config, dict):
        return int(config["window"]), int(config["n_features"])
    return int(config.window), int(config.n_features)


class ReScorer:
    """One re-scorer process: MQTT in, teacher, store, MQTT out.

    The session is kept ``session_expiry`` seconds (an hour by default) under
    ``client_id`` (by default one claimed at :meth:`start` with
    :func:`claim_client_id`: unique on this host, the same after a restart), so
    the escalations the broker had in flight to a process that died, or queued
    for it since, are delivered again when it reconnects; ``session_expiry=0`` asks
    for a clean session instead, whose messages the broker drops with the process.
    :meth:`stop` (a clean stop) ends the session after answering what came.

    An escalation is acknowledged to the broker only once it is in the store. When
    the store fails (:class:`~teacher.store.StoreError`), scoring stops at once:
    ``store_error`` holds the error, ``halt`` (the caller's event, when given) is
    set so the caller stops it, and nothing received after that is acknowledged;
    :meth:`stop` then keeps the session, so the broker delivers them again.
    """

    def __init__(
        self,
        teacher: Any,
        *,
        broker: str,
        store: AlertStore,
        share_group: str | None = DEFAULT_GROUP,
        max_batch: int = 64,
        max_wait_ms: float = 10.0,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        tls: TlsOptions | None = None,
        protocol: Protocol | str = Protocol.AUTO,
        version: str | None = None,
        session_expiry: int = DEFAULT_SESSION_EXPIRY,
        halt: threading.Event | None = None,
    ) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise UsageError("--max-batch must be >= 1 and --max-wait-ms >= 0")
        if session_expiry < 0:
            raise UsageError("--session-expiry must be >= 0 seconds")
        check_share_group(share_group)
        self.teacher = teacher
        self.threshold = float(teacher.threshold)
        self.window_shape = _window_shape(teacher)
        self.version = version or teacher_version(teacher)
        self.store = store
        self.share_group = share_group
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        # A default client id is claimed at start() (a kept session: the lowest
        # free one of this host and group, see claim_client_id) and given back
        # at stop(); until then client_id is the base it is chosen from.
        self._claim: ClientIdClaim | None = None
        self._default_id = client_id is None
        if client_id is not None:
            self.client_id: str = check_client_id(client_id)
        elif session_expiry <= 0:
            self._claim = claim_client_id(share_group, session_expiry)
            self.client_id = self._claim.client_id
        else:
            self.client_id = default_client_id(share_group)
        self.rejects = proto.RejectCounter("re-scorer", log=logger)
        self.counters = {
            "received": 0,
            "scored": 0,
            "duplicates": 0,
            "stored": 0,
            "verdicts_sent": 0,
            "batches": 0,
            "malicious": 0,
            "unscored": 0,
            "rescored": 0,
            "failed": 0,
            "damaged_rows": 0,
            "dropped_oversized": 0,
            "unacknowledged": 0,
            "rejections_sent": 0,
        }
        # The store's failure, once one happened: the re-scorer stops.
        self.store_error: StoreError | None = None
        self.halt = halt if halt is not None else threading.Event()
        self._seen: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._filter: str | None = None  # the subscription, once made
        # Escalations queued or being scored, not yet acknowledged to the broker.
        self._in_hand = 0
        self._in_hand_lock = threading.Lock()
        self._last_message = 0.0  # time.monotonic() when the last message came
        self.link = MqttLink(
            check_broker(broker),
            self.client_id,
            username=username,
            password=password,
            tls=tls,
            protocol=protocol,
            manual_ack=True,
            session_expiry=session_expiry,
            on_message=self._on_message,
        )

    # -- lifecycle --------------------------------------------------------------------

    def start(self, connect_timeout: float = 10.0) -> None:
        """Connect, subscribe and start the scoring thread.

        Returns once the broker acknowledged the subscription: an escalation
        published after that reaches this re-scorer (or its share group). With no
        ``client_id`` given and a kept session, the client id is claimed here
        (:func:`claim_client_id`; UsageError when none is free).
        """
        if self._default_id and self._claim is None:
            self._claim = claim_client_id(self.share_group, self.link.session_expiry)
            self.client_id = self.link.client_id = self._claim.client_id
        try:
            self.link.connect(connect_timeout)
        except BaseException:
            self._release_client_id()
            raise
        group = self.share_group
        if group and self.link.protocol is Protocol.V311:
            logger.warning(
                "broker %s speaks only MQTT 3.1.1: no shared subscription, so run a "
                "single re-scorer against it",
                self.link.url,
            )
            group = None
        self._filter = proto.subscription(proto.Channel.ESCALATIONS, group)
        try:
            self.link.subscribe(self._filter, qos=1, timeout=connect_timeout)
        except TransportError:
            self._abandon_start()
            raise
        self._worker = threading.Thread(target=self._work, name="rescorer", daemon=True)
        self._worker.start()
        logger.info(
            "re-scorer %s serving (teacher %s, threshold %.4g, group %s)",
            self.client_id,
            self.version,
            self.threshold,
            group,
        )

    def _abandon_start(self) -> None:
        """Undo a start that failed after SUBSCRIBE went out: leave the filter and
        end the session, so no session of a process that is exiting goes on taking
        a share of the group's escalations (with a kept session, the broker would
        queue them for a re-scorer that never comes back)."""
        try:
            self.link.unsubscribe(self._filter, timeout=2.0)
        except TransportError as exc:
            logger.debug("unsubscribe after a failed start: %s", exc)
        self.link.close(end_session=True)
        self._release_client_id()

    def _release_client_id(self) -> None:
        """Give back a claimed default client id (another re-scorer on this host
        may take it: the session, kept or ended, is no longer this process's)."""
        claim = self._claim
        if claim is not None and claim.locked:
            claim.release()
            self._claim = None  # a start() after stop() claims one again

    def stop(self, quiet: float = 1.0, timeout: float = 10.0) -> None:
        """Leave the share group, answer what already came, then end the session.

        First unsubscribe, so that the broker routes new escalations to the group's
        other members (with nobody left, an MQTT v5 broker answers the agent "no
        matching subscribers" and the agent publishes again later). Then store
        and answer all that was received, including what the broker still delivers
        right after the unsubscribe, until nothing is in hand and nothing came for
        ``quiet`` seconds (at most ``timeout`` seconds in all). Last, disconnect
        with session expiry 0: a session kept would go on collecting a share of the
        group's escalations that nobody reads. (A re-scorer that is killed skips
        all of this and keeps its session, and gets what waited there when it
        comes back.)

        Where ending the session could lose escalations, it is kept and the
        disconnect is a plain one: over MQTT 3.1.1 (no shared subscription, and the
        agent cannot tell an unrouted message from a delivered one, so the session
        at the broker holds the escalations until the re-scorer comes back), when
        the broker did not confirm the unsubscribe, when escalations are still
        unanswered at ``timeout``, or when the store failed (``store_error``): then
        nothing is drained, and the escalations received but not stored, never
        acknowledged, wait in the session for the next start under this client id
        (with ``session_expiry`` 0 the broker drops them with the session).
        ``counters["unacknowledged"]`` says how many were left so.
        """
        link = self.link
        deadline = time.monotonic() + timeout
        received = self.counters["received"]
        left = False
        if self._filter is not None and not link.connected:
            logger.info(
                "re-scorer %s stops while the broker is away; its session stays",
                self.client_id,
            )
        elif self._filter is not None and link.protocol is Protocol.V5:
            left = link.unsubscribe(self._filter, max(0.1, min(5.0, timeout)))
            if left and self.store_error is not None:
                logger.info(
                    "re-scorer %s unsubscribed from %s; its store failed, so it "
                    "answers nothing more",
                    self.client_id,
                    self._filter,
                )
            elif left:
                logger.info(
                    "re-scorer %s unsubscribed from %s; answering what it already "
                    "received",
                    self.client_id,
                    self._filter,
                )
            else:
                logger.warning(
                    "re-scorer %s: the broker did not confirm the unsubscribe from "
                    "%s; its session stays",
                    self.client_id,
                    self._filter,
                )
        if left and self.store_error is None:
            self._drain(quiet, deadline)
        self._stop.set()
        if self._worker is not None:
            self._worker.join(max(1.0, deadline - time.monotonic()))
        unanswered = self._in_hand
        self.counters["unacknowledged"] = unanswered
        end = left and unanswered == 0 and self.store_error is None
        if self.store_error is not None:
            self._log_store_stop(unanswered)
        elif end:
            logger.info(
                "re-scorer %s answered all it received (%d messages came while "
                "it stopped); ending its session, so the broker queues nothing "
                "more for it",
                self.client_id,
                self.counters["received"] - received,
            )
        elif unanswered and left:
            logger.warning(
                "re-scorer %s: %d escalations still unanswered after %g s; keeping "
                "its session, so they are delivered again when it comes back",
                self.client_id,
                unanswered,
                timeout,
            )
        elif link.protocol is Protocol.V311 and link.session_expiry > 0:
            logger.info(
                "re-scorer %s keeps its session (MQTT 3.1.1): escalations wait "
                "there until it comes back",
                self.client_id,
            )
        link.close(end_session=end)
        self._release_client_id()

    def _log_store_stop(self, unanswered: int) -> None:
        """Say where the escalations left unstored by a failed store are now."""
        if self.link.session_expiry > 0:
            logger.warning(
                "re-scorer %s stops on a failed alert store: %d escalations it "
                "received were not stored and not acknowledged; its session stays "
                "%d s, so the broker delivers them again when it comes back",
                self.client_id,
                unanswered,
                self.link.session_expiry,
            )
        else:
            logger.warning(
                "re-scorer %s stops on a failed alert store: %d escalations it "
                "received were not stored and not acknowledged; with session expiry "
                "0 the broker drops them with the session",
                self.client_id,
                unanswered,
            )

    def _drain(self, quiet: float, deadline: float) -> None:
        """Wait until nothing is in hand and no message came for ``quiet`` seconds,
        or until ``deadline`` (a ``time.monotonic()`` value); at once if the store
        failed (what is in hand then stays unacknowledged)."""
        while time.monotonic() < deadline and self.store_error is None:
            if self._in_hand == 0 and time.monotonic() - self._last_message >= quiet:
                return
            time.sleep(0.05)

    def _done_with(self, n: int) -> None:
        """Note that ``n`` escalations in hand were acknowledged."""
        with self._in_hand_lock:
            self._in_hand -= n

    def stats(self) -> dict[str, Any]:
        """Counters, rejections per kind, the teacher's version and the store's
        failure (None while it takes every write)."""
        return {
            **self.counters,
            "rejected": dict(self.rejects.counts),
            "teacher_version": self.version,
            "store_error": None if self.store_error is None else str(self.store_error),
        }

    # -- receiving (network thread) ---------------------------------------------------

    def _on_message(self, topic: str, payload: bytes, token) -> None:
        self._last_message = time.monotonic()
        self.counters["received"] += 1
        try:
            if self.link.retained:
                # Stale or forged whatever it holds: never scored or answered.
                raise proto.ProtocolError(proto.RejectKind.RETAINED, RETAINED_REASON)
            site, gateway, _ = proto.split_topic(topic)
            esc = proto.parse_escalation(payload, window_shape=self.window_shape)
            if (esc["site"], esc["gateway"]) != (site, gateway):
                raise proto.ProtocolError(
                    proto.RejectKind.BAD_TOPIC,
                    f"escalation of {esc['site']}/{esc['gateway']} arrived on {topic}",
                )
        except proto.ProtocolError as exc:
            self._reject(exc, topic, payload, token)
            return
        except Exception as exc:  # noqa: BLE001 - must not stop paho's thread
            # Unforeseen input: a rejection like the others, kept and acknowledged,
            # so a poison message is not redelivered after a restart.
            self._reject(
                proto.ProtocolError(
                    proto.RejectKind.BAD_VALUE, f"{type(exc).__name__}: {exc}"[:200]
                ),
                topic,
                payload,
                token,
            )
            return
        with self._in_hand_lock:
            self._in_hand += 1
        self._queue.put((esc, token))

    def _reject(
        self, exc: proto.ProtocolError, topic: str, payload: bytes, token: Any
    ) -> None:
        """Count and log one rejected message, keep it in the alert store's table
        of rejected messages, answer it with a rejection when it is an escalation
        (:meth:`_answer_rejection`), then acknowledge it.

        The first rejection of each kind is logged as a warning, the others at
        INFO, each with its topic (terminal-safe) and kind. Like an escalation, a
        rejected message is acknowledged only once kept: when the store refuses
        the write, or failed before, it stays unacknowledged (the broker delivers
        it again after a restart under the same client id) and the re-scorer
        stops (``store_error``, ``halt``).
        """
        where = _shown(topic, 200)
        first = exc.kind.value not in self.rejects.counts
        self.rejects.reject(exc, where)
        if not first:
            logger.info(
                "re-scorer rejected a message on %s (%s)",
                where,
                _shown(_unquoted(str(exc)), 200),
            )
        if self.store_error is None:
            reason = str(exc).removeprefix(f"{exc.kind.value}: ")
            try:
                self.store.add_rejected(
                    topic, exc.kind.value, reason, payload, worker=self.client_id
                )
            except StoreError as err:
                self._store_failed(err)
        if self.store_error is not None:
            with self._in_hand_lock:
                self._in_hand += 1  # never acknowledged: counted as such by stop()
            return
        if exc.kind is proto.RejectKind.WRONG_WINDOW_SHAPE and first:
            logger.warning(
                "escalations of another window shape reach this re-scorer (its "
                "teacher %s takes %d x %d): agents of another model, or a "
                "re-scorer of another teacher in share group %s, use this broker; "
                "each is answered with a rejection, and the gateway's agent "
                "exits 6 if no other re-scorer answers it with a verdict",
                self.version,
                *self.window_shape,
                self.share_group,
            )
        self._answer_rejection(topic, payload, exc)
        self.link.ack(token)

    def _answer_rejection(
        self, topic: str, payload: bytes, exc: proto.ProtocolError
    ) -> None:
        """Tell the gateway that one of its escalations was refused and gets no
        verdict from here: a rejection on its ``verdicts`` topic, when the topic
        names a gateway and the payload an escalation id (else nobody to tell).
        A retained escalation is not answered (see the module's docstring)."""
        if exc.kind is proto.RejectKind.RETAINED:
            return
        try:
            site, gateway, channel = proto.split_topic(topic)
            body = proto.decode(payload)
        except proto.ProtocolError:
            return
        esc_id = body["id"]
        if (
            channel is not proto.Channel.ESCALATIONS
            or body.get("kind") != proto.Kind.ESCALATION.value
            or not _ESCALATION_ID.fullmatch(esc_id)
        ):
            return
        rejection = proto.build_rejection(
            escalation_id=esc_id,
            reason=exc.kind,
            detail=_unquoted(str(exc).removeprefix(f"{exc.kind.value}: ")),
            teacher_version=self.version,
        )
        where = proto.topic(site, gateway, proto.Channel.VERDICTS)
        try:
            self.link.publish(where, proto.encode(rejection), qos=1)
            self.counters["rejections_sent"] += 1
        except (TransportError, proto.ProtocolError) as err:
            # Not sent: the rejection stays in the store; the gateway's agent
            # counts the escalation as unanswered at the end of its run.
            logger.warning("rejection of escalation %s not published: %s", esc_id, err)

    # -- scoring (worker thread) ------------------------------------------------------

    def _work(self) -> None:
        """Score, store and answer batches until stopped, or until the store fails."""
        while not self._stop.is_set() or not self._queue.empty():
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    batch.append(
                        self._queue.get(timeout=left)
                        if left > 0
                        else self._queue.get_nowait()
                    )
                except queue.Empty:
                    break
            try:
                self._handle(batch)
            except StoreError as exc:
                # Nothing of this batch is stored: none of it is acknowledged, and
                # nothing after it (the queue is left as it is), so the broker
                # delivers all of it again. Retrying here would only fill the
                # broker's in-flight window with messages that wait on a full disk.
                self._store_failed(exc)
                return
            except Exception:  # noqa: BLE001 - one bad batch must not stop the service
                # Not the teacher (_score keeps its failures, unscored) nor the
                # store: a fault of our own. Acknowledge anyway: unacknowledged
                # messages would stall delivery once the broker's in-flight window
                # is full. The ids are logged.
                self.counters["failed"] += len(batch)
                logger.exception(
                    "handling a batch of %d escalations failed; ids %s",
                    len(batch),
                    [e["id"] for e, _ in batch],
                )
                for _, token in batch:
                    self.link.ack(token)
            self._done_with(len(batch))

    def _store_failed(self, exc: StoreError) -> None:
        """Note the store's first failure once and ask the caller to stop (``halt``).

        Called from the scoring thread (escalations) and from paho's network
        thread (rejected messages); the first failure is the one kept.
        """
        with self._in_hand_lock:
            first = self.store_error is None
            if first:
                self.store_error = exc
        if first:
            logger.error(
                "re-scorer %s stops: %s; escalations not stored are not acknowledged",
                self.client_id,
                exc,
            )
        self.halt.set()

    def _handle(self, batch: list[tuple[dict, Any]]) -> None:
        # Copies: seen in this process, or stored by any re-scorer sharing the store.
        fresh, copies, tokens = [], [], []
        # Keyed by (site, gateway, id): an id is only unique within its gateway.
        batch_keys: set[tuple[str, str, str]] = set()
        stored = self.store.known(key(e) for e, _ in batch)
        # Copies of escalations stored unscored: the copy brings its window again,
        # so the teacher gets another try (it may have been broken then).
        retry: list[dict] = []
        for esc, token in batch:
            tokens.append(token)
            k = key(esc)
            if k in batch_keys:
                copies.append(esc)
            elif k in stored and _unscored(stored[k]):
                retry.append(esc)
                batch_keys.add(k)
            elif k in self._seen or k in stored:
                copies.append(esc)
            else:
                fresh.append(esc)
                batch_keys.add(k)
        self.counters["duplicates"] += len(copies) + len(retry)

        # Score the new ones in one teacher call, then store before answering. One
        # the teacher cannot score is stored unscored (no verdict is sent for it).
        scored: list[tuple[dict, dict | None]] = []
        if fresh:
            probs = self._score(fresh)
            for esc, p in zip(fresh, probs, strict=True):
                scored.append((esc, None if p is None else self._verdict(esc, p)))
            new = self.store.add_many(scored, worker=self.client_id)
            self.counters["stored"] += sum(new)
            self.counters["duplicates"] += len(new) - sum(new)
            self.counters["malicious"] += sum(
                v is not None and v["verdict"] == "malicious"
                for (_, v), n in zip(scored, new, strict=True)
                if n
            )
        for esc in fresh:
            self._remember(key(esc))
        pairs = [(esc, v) for esc, v in scored if v is not None]
        if retry:
            pairs += self._score_again(retry)

        # Copies get the verdict already stored, so the gateway hears once more
        # (none for a copy of one stored unscored).
        # A damaged stored row costs only its own copy's verdict.
        rows = self.store.known(key(e) for e in copies)
        for esc in copies:
            row = rows.get(key(esc))
            if row is None or (
                row["verdict"] is None and "verdict" not in row.get("damaged", ())
            ):
                continue
            try:
                pairs.append((esc, resent_verdict(esc, row)))
            except ValueError as exc:
                self.counters["damaged_rows"] += 1
                logger.error(
                    "alert store %s: the stored row of escalation %s/%s/%s is "
                    "damaged (%s); this copy gets no verdict",
                    self.store.path,
                    *(_shown(part) for part in key(esc)),
                    exc,
                )
        for esc, verdict in pairs:
            self._publish(esc, verdict)
        for token in tokens:
            self.link.ack(token)

    def _score_again(self, retry: list[dict]) -> list[tuple[dict, dict]]:
        """Score copies of escalations stored unscored and fill in their rows;
        the (escalation, verdict) pairs to answer. One the teacher still cannot
        score stays unscored (counted and logged again)."""
        found = []
        for esc, p in zip(retry, self._score(retry), strict=True):
            if p is not None:
                found.append((esc, self._verdict(esc, p)))
        if not found:
            return []
        done = self.store.score_unscored(found, worker=self.client_id)
        self.counters["rescored"] += sum(done)
        self.counters["malicious"] += sum(
            v["verdict"] == "malicious" for (_, v), d in zip(found, done, strict=True)
            if d
        )
        logger.info("%d escalations stored unscored got their verdicts", sum(done))
        return [pair for pair, d in zip(found, done, strict=True) if d]

    def _verdict(self, esc: dict, p: float) -> dict:
        """The verdict message for ``esc`` scored ``p``."""
        return proto.build_verdict(
            escalation_id=esc["id"],
            verdict="malicious" if p >= self.threshold else "benign",
            score=p,
            threshold=self.threshold,
            teacher_version=self.version,
        )

    def _score(self, fresh: list[dict]) -> list[float | None]:
        """The teacher's probability for each escalation; None where it failed.

        The batch is scored in one call. If that call fails (a device error, memory
        run out on a large batch, one window the model chokes on), each escalation
        is scored alone, so one bad window costs only its own verdict; those that
        fail alone too come back None, are logged by id and counted as ``unscored``.
        """
        windows = np.asarray([e["window"] for e in fresh], dtype=np.float32)
        try:
            probs = self._call_teacher(windows)
        except Exception as exc:  # noqa: BLE001 - any teacher failure is retried
            logger.warning(
                "re-scoring a batch of %d failed (%s: %s); scoring each alone",
                len(fresh),
                type(exc).__name__,
                exc,
            )
        else:
            self.counters["scored"] += len(fresh)
            self.counters["batches"] += 1
            return [float(p) for p in probs]

        out: list[float | None] = []
        for esc, window in zip(fresh, windows, strict=True):
            try:
                p = float(self._call_teacher(window[None])[0])
            except Exception as exc:  # noqa: BLE001
                self.counters["unscored"] += 1
                logger.error(
                    "the teacher could not score escalation %s of %s/%s (%s: %s); "
                    "it is stored unscored and no verdict is sent",
                    esc["id"],
                    esc["site"],
                    esc["gateway"],
                    type(exc).__name__,
                    exc,
                )
                out.append(None)
                continue
            self.counters["scored"] += 1
            self.counters["batches"] += 1
            out.append(p)
        return out

    def _call_teacher(self, windows: np.ndarray) -> np.ndarray:
        """The teacher's probabilities for ``windows``, checked: one finite value
        in 0..1 per window (anything else raises ValueError)."""
        probs = np.asarray(self.teacher.predict_proba(windows), dtype=np.float64)
        probs = probs.reshape(-1)
        if len(probs) != len(windows):
            raise ValueError(
                f"the teacher gave {len(probs)} probabilities for {len(windows)} "
                "windows"
            )
        if not np.all(np.isfinite(probs) & (probs >= 0.0) & (probs <= 1.0)):
            raise ValueError("the teacher gave a probability outside 0..1 or NaN")
        return probs

    def _remember(self, k: tuple[str, str, str]) -> None:
        self._seen[k] = None
        if len(self._seen) > 200_000:
            self._seen.popitem(last=False)

    def _publish(self, esc: dict, verdict: dict) -> None:
        where = proto.topic(esc["site"], esc["gateway"], proto.Channel.VERDICTS)
        try:
            self.link.publish(where, proto.encode(verdict), qos=1)
            self.counters["verdicts_sent"] += 1
        except MessageTooLargeError as exc:
            # Never sent, and it would fail the same way again: count it, log once.
            # The verdict stays in the alert store.
            self.counters["dropped_oversized"] += 1
            if self.counters["dropped_oversized"] == 1:
                logger.warning(
                    "verdict for %s dropped: %s; further ones only counted",
                    esc["id"],
                    exc,
                )
        except TransportError as exc:
            logger.warning("verdict for %s not published: %s", esc["id"], exc)


# The stored fields a verdict is built again from, for a copy.
_VERDICT_FIELDS = ("verdict", "teacher_score", "threshold", "teacher_version")


def resent_verdict(escalation: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """The verdict stored in ``row``, built again to answer ``escalation``, a copy.

    ValueError, saying which stored fields and why, when those fields are not what
    the store writes: damaged (:func:`teacher.store.damage`), a score or threshold
    that is not a number in 0..1, no teacher version, or a verdict that cannot be
    encoded. The gateway must not get such a verdict; the caller logs it.
    """
    damaged = [name for name in _VERDICT_FIELDS if name in row.get("damaged", ())]
    if damaged:
        shown = ", ".join(f"{name} {_shown(repr(row[name]), 40)}" for name in damaged)
        raise ValueError(f"{shown}: not what the store writes")
    for name in ("teacher_score", "threshold"):
        value = row[name]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not 0.0 <= value <= 1.0
        ):
            raise ValueError(f"{name} {_shown(repr(value), 40)}: not a number in 0..1")
    if not isinstance(row["teacher_version"], str):
        raise ValueError("teacher_version: none stored")
    verdict = proto.build_verdict(
        escalation_id=escalation["id"],
        verdict=row["verdict"],
        score=row["teacher_score"],
        threshold=row["threshold"],
        teacher_version=row["teacher_version"],
    )
    try:
        proto.encode(verdict)
    except (ValueError, BadInputError) as exc:
        raise ValueError(f"the verdict cannot be sent: {exc}") from exc
    return verdict


# ---------------------------------------------------------------------------------
# command line


def _since(text: str | None) -> float | None:
    """Unix seconds from ``1700000000``, ``2026-12-04T10:00`` or an age (``2h``)."""
    if text is None:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text)
    if m:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return time.time() - float(m.group(1)) * unit
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
            raise UsageError(
                f"--since {text!r}: give a finite Unix time, an ISO time or an age"
            )
        return value
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise UsageError(
            f"--since {text!r}: give Unix seconds, an ISO time or an age like 30m, 2h"
        ) from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _password(args: argparse.Namespace) -> str | None:
    """The broker password: the first line of ``--password-file``, or None.

    Read by ``edge-agent run``'s own reader (:meth:`edge_agent.config.AgentConfig.
    secret`), so the two commands take and refuse the same files: one that is not
    UTF-8, is empty or starts with an empty line, is a folder, FIFO or device, or
    cannot be read is bad input (BadInputError, exit 3), never an empty password
    sent. A file that is not there is a usage error (exit 2), as a missing TLS
    file is here.
    """
    if not args.password_file:
        return None
    from edge_agent.config import AgentConfig

    if not os.path.exists(args.password_file):  # a dangling link included
        raise UsageError(
            f"cannot read --password-file {args.password_file}: no such file"
        )
    return AgentConfig(password_file=args.password_file).secret()


def _check_stats_path(path: str | None) -> None:
    """UsageError unless ``--stats-json`` can be written: checked before serving, so
    the counters of a long run are not lost to a typo in the folder at exit."""
    if not path:
        return
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise UsageError(f"--stats-json {path}: is a folder; give a file name")
    if not folder.is_dir():
        raise UsageError(f"--stats-json {path}: no folder {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"--stats-json {path}: folder {folder} is not writable")


def _write_stats(path: str, stats: dict[str, Any]) -> bool:
    """Write the counters to ``path``; on failure print them to stderr instead."""
    text = json.dumps(stats, indent=2) + "\n"
    try:
        Path(path).write_text(text)
    except OSError as exc:
        print(
            f"error: --stats-json {path}: cannot write ({exc.strerror or exc}); "
            "the counters follow on stderr",
            file=sys.stderr,
        )
        print(text, file=sys.stderr, end="")
        return False
    return True


def _check_store_path(store: str) -> None:
    """UsageError unless ``--store`` names a file in a folder that exists;
    BadInputError (exit 3) when that file is there and is not an alert store.

    ``teacher serve`` makes no folders: a typo in the path would otherwise start
    a new, empty store somewhere nobody looks. Checked before the teacher is
    loaded; an existing store is opened read-only for the check (nothing written).
    """
    path = Path(store)
    if path.is_dir():
        raise UsageError(
            f"--store {store} is a folder; give the alert store's file name"
        )
    folder = path.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise UsageError(
            f"--store {store}: its folder {folder} {what}; make the folder first "
            "(teacher serve creates the store file, not folders)"
        )
    if path.is_file() and path.stat().st_size > 0 and os.access(path, os.R_OK):
        AlertStore(path, readonly=True).close()


def _check_tls(args: argparse.Namespace) -> TlsOptions | None:
    """The TLS files, each checked to be a file, or None for a plain connection.

    UsageError for a file that is not there, or a key without its certificate.
    """
    given = (
        ("--tls-ca", args.tls_ca),
        ("--tls-cert", args.tls_cert),
        ("--tls-key", args.tls_key),
    )
    for flag, value in given:
        if value is not None and not Path(value).is_file():
            raise UsageError(f"{flag} {value}: no such file")
    if args.tls_key and not args.tls_cert:
        raise UsageError("--tls-key needs --tls-cert (the certificate of that key)")
    if args.tls_ca or args.tls_cert:
        return TlsOptions(args.tls_ca, args.tls_cert, args.tls_key)
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    """``teacher serve``: run until SIGTERM / Ctrl-C (or ``--duration`` seconds).

    Every flag that can be checked without the broker (share group, client id,
    broker URL, store path, TLS and password files, ``--stats-json``) is checked
    before the teacher is loaded. Exit 0 after SIGTERM or ``--duration``, 130 after
    Ctrl-C (SIGINT), 1 when the alert store refused a write (the re-scorer stops
    at the first one, leaving what it did not store unacknowledged at the broker),
    when any escalation ended ``failed`` (a fault of the re-scorer; the ids are in
    the log), or when the counters could not be written to ``--stats-json``.
    ``--checkpoint`` is a checkpoint or a torch-int8 artifact folder
    (:func:`load_served_teacher`).
    """
    _check_stats_path(args.stats_json)
    check_client_id(args.client_id)
    check_broker(args.broker)
    check_credentials(args.broker, [
        flag for flag, value in (("--username", args.username),
                                 ("--password-file", args.password_file)) if value
    ])
    check_share_group(args.share_group)
    _check_store_path(args.store)
    tls = _check_tls(args)
    password = _password(args)
    _logging(args)
    teacher = load_served_teacher(args.checkpoint, args.allow_unverified)
    _set_threads(teacher, args.threads)
    _check_teacher_scores(teacher, args.checkpoint)
    store = AlertStore(args.store)
    # Set by SIGTERM, or by the re-scorer when its store fails.
    stop = threading.Event()
    server = ReScorer(
        teacher,
        broker=args.broker,
        store=store,
        share_group=None if args.share_group == "" else args.share_group,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        client_id=args.client_id,
        username=args.username,
        password=password,
        tls=tls,
        protocol=args.protocol,
        session_expiry=args.session_expiry,
        halt=stop,
    )
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server.start(args.connect_timeout)
    client_id = getattr(server, "client_id", None)  # None: a stand-in (tests)
    print(
        f"serving: teacher {server.version}, store {args.store}"
        + (f", client id {_shown(client_id, 200)}" if client_id else ""),
        file=sys.stderr,
        flush=True,
    )
    interrupted = False
    written = True
    try:
        stop.wait(args.duration)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        server.stop()
        stats = server.stats()
        if args.stats_json:
            written = _write_stats(args.stats_json, stats)
        store.close()
    rejected = sum(stats.get("rejected", {}).values())
    summary = (
        "re-scorer: received {received}, scored {scored}, stored {stored}, "
        "duplicates {duplicates}, verdicts sent {verdicts_sent}".format(**stats)
    )
    summary += f", rejected {rejected}"
    for name, shown in (
        ("unscored", "unscored"),
        ("rescored", "scored on a later copy"),
        ("damaged_rows", "copies unanswered (damaged rows)"),
        ("failed", "failed"),
        ("unacknowledged", "unacknowledged"),
        ("rejections_sent", "rejections sent to gateways"),
    ):
        if stats.get(name):
            summary += f", {shown} {stats[name]}"
    print(summary, file=sys.stderr)
    failed = stats.get("failed", 0)
    failure = server.store_error
    if failure is not None:
        reason = _store_stop_reason(failure, stats, args)
        if failed:
            reason += f"; besides, {_failed_reason(failed)}"
        print(f"error: {reason}", file=sys.stderr)
        return EXIT_FAILURE
    if failed:
        print(f"error: {_failed_reason(failed)}", file=sys.stderr)
        return EXIT_FAILURE
    if stats.get("unscored"):
        print(
            f"error: the teacher could not score {stats['unscored']} escalations "
            "(their ids are in the log); they are stored unscored (teacher alerts "
            "--decision unscored) and are scored when a copy comes again",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if written else EXIT_FAILURE


def _check_teacher_scores(teacher: Any, checkpoint: str) -> None:
    """ModelError (exit 1) unless the teacher gives finite probabilities in 0..1
    on plain windows (all 0, all 0.5, all 1): a checkpoint with NaN weights
    would otherwise serve for hours and score nothing. Run on a loaded checkpoint
    and on a loaded torch-int8 artifact alike."""
    width, features = _window_shape(teacher)
    windows = np.stack(
        [np.full((width, features), v, np.float32) for v in (0.0, 0.5, 1.0)]
    )
    probs = np.asarray(teacher.predict_proba(windows), dtype=np.float64).reshape(-1)
    if len(probs) != 3 or not np.all(np.isfinite(probs) & (probs >= 0) & (probs <= 1)):
        raise ModelError(
            f"teacher {checkpoint} scores plain windows as {probs.tolist()}; expected "
            "probabilities in 0..1 (NaN weights, or a damaged checkpoint?)"
        )


def _failed_reason(failed: int) -> str:
    """What ``failed`` escalations mean, in one clause."""
    return (
        f"{failed} escalations failed: their batch met a fault of the re-scorer "
        "itself, so they were acknowledged and may have no verdict and no row in "
        "the store; their ids are in the log (ERROR handling a batch ... failed)"
    )


def _store_stop_reason(
    failure: StoreError, stats: dict[str, Any], args: argparse.Namespace
) -> str:
    """One line: the store's error, and where the unstored escalations are now."""
    left = stats.get("unacknowledged", 0)
    if args.session_expiry > 0:
        fate = (
            "the broker delivers them again when this re-scorer restarts with the "
            f"same client id within {args.session_expiry} s (--session-expiry)"
        )
    else:
        fate = "with --session-expiry 0 the broker dropped them with the session"
    return (
        f"{failure}; stopped at the first failed write: {left} escalations received "
        f"and not stored were not acknowledged; {fate}"
    )


MAX_SHOWN = 64  # characters of one stored text field that ``teacher alerts`` prints


# The escapes ``repr`` writes in a string: \\ \' \" \n \r \t \xNN \uNNNN \UNNNNNNNN.
_REPR_ESCAPE = re.compile(
    r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|[\\'\"nrt])"
)
_REPR_SIMPLE = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "r": "\r", "t": "\t"}


def _unrepr(match: re.Match) -> str:
    code = match.group(1)
    if code in _REPR_SIMPLE:
        return _REPR_SIMPLE[code]
    try:
        return chr(int(code[1:], 16))
    except (ValueError, OverflowError):  # past U+10FFFF: no character
        return match.group()


def _unquoted(detail: str) -> str:
    """``detail`` with Python's quoting of a value (``'not-an-ip\\x1b[2J'``, as a
    repr writes it) undone, for what escapes control characters and backslashes
    itself (:func:`edge_agent.protocol.build_rejection`, :func:`_shown`): escaped
    once, not twice. Only the escapes a repr writes are read; any other backslash
    (a cut escape, JSON's ``invalid \\escape``) is left as it is."""
    if "\\" not in detail:
        return detail
    return _REPR_ESCAPE.sub(_unrepr, detail)


def _shown(value: Any, limit: int = MAX_SHOWN) -> str:
    """A stored field made safe for the operator's terminal.

    Control characters (ESC, CR, BEL, DEL, C1, line and paragraph separators...)
    are written as ``\\xNN`` / ``\\uNNNN`` escapes, so a flow field crafted with
    terminal escape sequences cannot clear the screen or rewrite earlier lines;
    text past ``limit`` characters is cut and marked with ``...``.
    """
    text = "?" if value is None else str(value)
    out = []
    for ch in text[: limit + 1]:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif code < 0x20 or 0x7F <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        elif not ch.isprintable():
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(ch)
    if len(text) > limit:
        return "".join(out[:limit]) + "..."
    return "".join(out)


def _score(value: Any) -> str:
    """A stored score as at most a few characters: ``0.731``, ``nan``, ``?``.

    Scores are probabilities; anything else (a huge number from a crafted
    escalation) is shown in short scientific notation, never as 300 digits.
    """
    if value is None:
        return "?"
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        return _shown(value, 12)
    if x != x or abs(x) == float("inf"):
        return str(x)
    if -1000 < x < 1000:
        return f"{x:.3f}"
    return f"{x:.3g}"


def _endpoint(ip: Any, port: Any) -> str:
    """``ip:port``, with an IPv6 address in brackets (``[2001:db8::1]:443``)."""
    host = _shown(ip)
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{_shown(port, 12)}"


def cmd_alerts(args: argparse.Namespace) -> int:
    """``teacher alerts``: list stored escalations with their verdicts, or with
    ``--rejected`` the rejected messages the store kept.

    A damaged row (see :func:`teacher.store.damage`) is listed with its damaged
    fields marked; after the listing one ``error:`` line names the store and
    counts them, and the exit code is 4 (partial input). So is a read that SQLite
    stopped part way (the rows before it are listed); one stopped before any row
    is exit 3, as is a ``--store`` with no file there (input that is missing, as
    a missing ``--data`` file is in every tool). Exit 0 when nothing was damaged.
    """
    if args.rejected and args.decision:
        raise UsageError(
            "--decision applies to escalations; rejected messages (--rejected) "
            "have no decision"
        )
    if args.gateway is not None and not args.rejected:
        # GATEWAY or SITE/GATEWAY, each an id as the agent's topics hold them:
        # anything else could never match a stored escalation (a rejected message
        # may name any gateway its topic held, so --rejected takes any text).
        parts = args.gateway.split("/")
        if len(parts) > 2:
            raise UsageError(
                f"--gateway {args.gateway!r}: expected GATEWAY or SITE/GATEWAY"
            )
        for part in parts:
            proto.validate_id(part, "--gateway")
    if Path(args.store).is_dir():
        raise UsageError(
            f"--store {args.store} is a folder; expected an alert store file "
            "(the one teacher serve --store writes)"
        )
    if not Path(args.store).exists():
        # Input that is not there, as a missing --data file is in every tool.
        raise BadInputError(
            f"--store {args.store}: no such file; expected an alert store (the "
            "file teacher serve --store writes)"
        )
    if not Path(args.store).is_file():
        raise BadInputError(
            f"--store {args.store}: not a regular file; expected an alert store "
            "(the file teacher serve --store writes)"
        )
    store = _open_for_reading(args.store)
    try:
        if args.rejected:
            got = store.rejected(
                since=_since(args.since),
                gateway=args.gateway,
                limit=args.limit,
                newest=args.newest,
            )
        else:
            got = store.listing(
                since=_since(args.since),
                gateway=args.gateway,
                decision=args.decision,
                limit=args.limit,
                newest=args.newest,
            )
    finally:
        store.close()
    what = "rejected messages" if args.rejected else "escalations"
    if got.stopped is not None and not got.rows:
        raise BadInputError(f"cannot read its {what}: {got.stopped}", path=args.store)
    try:
        if args.rejected:
            _print_rejected(got.rows, args.json)
        else:
            _print_alerts(got.rows, args.json)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader stopped reading (``| head -1``): stop quietly, as Unix tools
        # do. stdout now points at /dev/null, so the flush at exit cannot fail too.
        _silence_stdout()
        return EXIT_OK
    except OSError as exc:
        raise GatewatchError(
            f"cannot write the listing to stdout: {exc.strerror or exc}"
        ) from exc
    if not args.json:
        print(f"{len(got.rows)} {what}", file=sys.stderr)
    if got.missing:
        print(
            f"note: {args.store} has no table of rejected messages (a store written "
            "before teacher serve kept them; the next teacher serve on it adds one)",
            file=sys.stderr,
        )
    problem = _damage_report(got, what)
    if problem is not None:
        raise PartialInputError(problem, path=args.store)
    return EXIT_OK


class _UnchangingStore(AlertStore):
    """An alert store opened with SQLite's ``immutable`` flag: read as a file that
    nothing changes, with no locks and no -shm file, so that a WAL-mode store in a
    folder that cannot be written (a copy on a read-only mount) can be read.
    SQLite then reads the main file alone: rows another process adds meanwhile,
    and any -wal file beside it, are not seen. Never written."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.max_rejected = MAX_REJECTED
        self._lock = threading.Lock()
        uri = f"{self.path.resolve().as_uri()}?mode=ro&immutable=1"
        self._db = sqlite3.connect(
            uri, uri=True, check_same_thread=False, isolation_level=None
        )
        try:
            self._db.text_factory = _text
            _check_store(self._db, self.path, empty_ok=False)
        except BaseException:
            self._db.close()
            raise


def _read_only_refusal(exc: BaseException | None) -> bool:
    """Whether SQLite refused to open a file for reading because a file could not
    be written (SQLITE_READONLY, SQLITE_CANTOPEN): a WAL-mode database read the
    usual way needs a -shm file beside it, which a read-only folder cannot take."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN)
    text = str(exc)
    return "readonly database" in text or "unable to open database file" in text


class _CopiedStore(AlertStore):
    """An alert store read from a private copy (its folder removed on close)."""

    def __init__(self, copy: Path, folder: Path, original: str | Path) -> None:
        self._folder = folder
        super().__init__(copy, readonly=True)
        self.path = Path(original)  # what messages name

    def close(self) -> None:
        try:
            super().close()
        finally:
            shutil.rmtree(self._folder, ignore_errors=True)


# Attempts at a copy whose files did not change while they were copied.
_COPY_TRIES = 3


def _copy_with_wal(path: str) -> tuple[Path, Path]:
    """Copy the store at ``path`` with its -wal (and -shm, when there is one) into
    a new private temporary folder; (the copy, its folder). OSError when a copy
    fails (no space, say) or the files kept changing while they were copied (a
    re-scorer writing): a copy of files caught part way through a write is no
    store. The folder is removed on failure.

    The -shm is only an index of the -wal, which SQLite rebuilds when it is
    missing: one that cannot be read is left out, and its changes (readers
    mark it too) do not count."""
    ends = ("", "-wal")  # the store, then its -wal: "alerts.sqlite-wal"
    sources = [Path(f"{path}{end}") for end in ends]
    folder = Path(tempfile.mkdtemp(prefix="gatewatch-alerts-"))  # mode 0700
    copy = folder / Path(path).name
    try:
        for _ in range(_COPY_TRIES):
            # Size and time of each file before and after: a write (or a
            # checkpoint) in between makes a copy whose files do not agree.
            before = [_stamp(source) for source in sources]
            for end in ends:
                shutil.copyfile(f"{path}{end}", f"{copy}{end}")
            if [_stamp(source) for source in sources] == before:
                break
        else:
            raise OSError(f"{path} and its -wal file changed while they were copied")
        try:
            if Path(f"{path}-shm").is_file():
                shutil.copyfile(f"{path}-shm", f"{copy}-shm")
        except OSError:
            Path(f"{copy}-shm").unlink(missing_ok=True)
        return copy, folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _stamp(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_size, info.st_mtime_ns


def _open_a_copy(path: str) -> AlertStore | None:
    """A store whose folder cannot be written, read with the rows of its -wal.

    SQLite cannot open a WAL-mode store read-only where it cannot make its -shm
    file, and the unchanging-file open reads the main file alone. When a -wal
    file with rows lies beside it, the store, the -wal and any -shm are copied
    into a private temporary folder (:func:`_copy_with_wal`) and the copy is
    opened read-only there; the store itself is not touched. None when there is
    no such -wal, the folder can be written (then the copy would not be what
    failed), or the copy cannot be made or opened (no space, say): the caller
    then reads the store as an unchanging file.
    """
    wal = Path(f"{path}-wal")
    try:
        if not wal.is_file() or wal.stat().st_size == 0:
            return None
        if os.access(Path(path).absolute().parent, os.W_OK):
            return None
        copy, folder = _copy_with_wal(path)
    except OSError as exc:
        logger.debug("no private copy of %s to read its -wal: %s", path, exc)
        return None
    try:
        return _CopiedStore(copy, folder, path)
    except (BadInputError, sqlite3.Error) as exc:
        shutil.rmtree(folder, ignore_errors=True)
        logger.debug("the private copy of %s could not be opened: %s", path, exc)
        return None


def _open_for_reading(path: str) -> AlertStore:
    """The alert store at ``path``, opened to be read and never written.

    First read-only the usual way (SQLite's ``mode=ro``), which sees what a running
    re-scorer writes. A WAL-mode store on a read-only mount (the forensic case)
    cannot be opened so: SQLite needs a -shm file beside it. With a -wal file
    beside it, a private copy of both is read (:func:`_open_a_copy`), so the rows
    the -wal holds are listed too, and a note on stderr says so. Without one, or
    when the copy fails (no space), it is opened as an unchanging file
    (:class:`_UnchangingStore`) and a note on stderr says what that does not
    see. A store that cannot be opened either way is bad input (exit 3), the
    error saying both of SQLite's reasons.
    """
    try:
        return AlertStore(path, readonly=True)
    except BadInputError as exc:
        usual = exc.__cause__
        if not _read_only_refusal(usual):
            raise
    copied = _open_a_copy(path)
    if copied is not None:
        print(
            f"note: {path}: SQLite could not open this store read-only the usual "
            f"way ({usual}; its folder cannot take the -shm file a WAL-mode store "
            "needs), so a private copy of it and its -wal file, made now, is read: "
            "rows a running teacher serve adds meanwhile are not listed",
            file=sys.stderr,
        )
        return copied
    try:
        store = _UnchangingStore(path)
    except sqlite3.Error as exc:
        unreadable = "" if os.access(path, os.R_OK) else "; this user cannot read it"
        raise BadInputError(
            f"cannot open the alert store read-only: SQLite refused it ({usual}), and "
            f"as an unchanging file too ({exc}){unreadable}",
            path=path,
        ) from exc
    wal = Path(f"{path}-wal")
    try:
        wal_bytes = wal.stat().st_size if wal.is_file() else 0
    except OSError:
        wal_bytes = 0
    unseen = (
        f"; nor the rows in {wal} ({wal_bytes:,} bytes) beside it, not yet copied "
        "into the store (copy the store with its -wal file into a folder that can "
        "be written to list those)"
        if wal_bytes
        else ""
    )
    print(
        f"note: {path}: SQLite could not open this store read-only the usual way "
        f"({usual}; its folder cannot take the -shm file a WAL-mode store needs), so "
        "it is read as an unchanging file: rows a running teacher serve adds "
        f"meanwhile are not listed{unseen}",
        file=sys.stderr,
    )
    return store


def _damage_report(got: Listing, what: str) -> str | None:
    """One sentence on the damage a listing met (None when it met none): how many
    rows are damaged and in which fields, and where SQLite stopped the read."""
    parts = []
    if got.damaged:
        fields: dict[str, int] = {}
        for row in got.rows:
            for name in row.get("damaged", ()):
                fields[name] = fields.get(name, 0) + 1
        counts = ", ".join(f"{name} {n}" for name, n in fields.items())
        parts.append(
            f"{got.damaged} of the {len(got.rows)} {what} listed "
            f"{'is' if got.damaged == 1 else 'are'} damaged "
            f"(damaged fields: {counts}); they are listed with each damaged field's "
            'stored text, marked "damaged", and the others as stored'
        )
    if got.stopped is not None:
        parts.append(
            f"the read stopped part way ({got.stopped}): the {len(got.rows)} "
            f"{what} read before it are listed, any after it are not"
        )
    return "; ".join(parts) if parts else None


def _when(value: Any) -> str:
    """A stored ``received_at`` as the listing's first column: ``received``, then
    the time the re-scorer received the message, ``YYYY-MM-DD HH:MM:SS UTC``; a
    damaged one as its stored text, terminal-safe and cut to that width."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if FIRST_TIME <= value <= LAST_TIME:
            try:
                when = dt.datetime.fromtimestamp(value, dt.UTC)
            except (OverflowError, ValueError, OSError):
                pass
            else:
                return when.strftime("received %Y-%m-%d %H:%M:%S UTC")
    return f"received {_shown(value, 23)}"


def _marked(row: dict[str, Any]) -> str:
    """The end of a damaged row's line: ``  damaged: flow, received_at``."""
    damaged = row.get("damaged")
    return f"  damaged: {', '.join(damaged)}" if damaged else ""


def _print_alerts(rows: list[dict[str, Any]], as_json: bool) -> None:
    """Write the rows to stdout: one JSON list, or one terminal-safe line each."""
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    for r in rows:
        teacher = "unscored"
        if r["verdict"] is not None:
            teacher = f"{_shown(r['verdict'])} {_score(r['teacher_score'])}"
        print(
            f"{_when(r['received_at'])}  {_shown(r['site'])}/{_shown(r['gateway'])}  "
            f"{_endpoint(r['src_ip'], r['src_port'])} -> "
            f"{_endpoint(r['dst_ip'], r['dst_port'])}/{_shown(r['proto'])}  "
            f"agent {_shown(r['agent_decision'])} {_score(r['agent_score'])}  "
            f"teacher {teacher}{_marked(r)}"
        )


def _payload_text(payload: bytes | str) -> str:
    """A kept payload as text: UTF-8, each byte that is not written ``\\xNN``."""
    if isinstance(payload, str):
        return payload
    return payload.decode("utf-8", "backslashreplace")


def _print_rejected(rows: list[dict[str, Any]], as_json: bool) -> None:
    """Write rejected messages to stdout: one JSON list (each payload as text, see
    :func:`_payload_text`), or one terminal-safe line each (time, topic, kind,
    reason, payload length)."""
    if as_json:
        out = []
        for r in rows:
            item = {k: v for k, v in r.items() if k not in ("seq", "payload")}
            item["payload"] = _payload_text(r["payload"])
            item["payload_kept"] = len(r["payload"])
            out.append(item)
        print(json.dumps(out, indent=1))
        return
    for r in rows:
        print(
            f"{_when(r['received_at'])}  {_shown(r['topic'], 96)}  "
            f"{_shown(r['kind'], 24)}  {_reason(r['reason'])}  "
            f"{_shown(r['payload_length'], 12)} bytes{_marked(r)}"
        )


def _reason(value: Any) -> str:
    """A stored rejection reason as ``teacher alerts --rejected`` prints it: the
    values it quotes (``site 's\\u202ex'``, as a repr writes them) unquoted first,
    so that :func:`_shown` escapes them once, as it does the topic."""
    return _shown(_unquoted(value) if isinstance(value, str) else value, 120)


def _silence_stdout() -> None:
    """Point file descriptor 1 at /dev/null (when stdout has one)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # replaced by a test or an embedding program: nothing to redirect
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _set_threads(teacher: Any, threads: int | None) -> None:
    """Intra-op threads for torch: 1 on the CPU unless told (small batches gain
    little from more, and on a busy machine extra threads cost many times over)."""
    import torch

    device = getattr(teacher, "device", None)
    on_cpu = device is None or getattr(device, "type", "cpu") == "cpu"
    if threads is not None:
        torch.set_num_threads(int(threads))
    elif on_cpu:
        torch.set_num_threads(1)
    logger.info("teacher on %s, %d torch threads", device, torch.get_num_threads())


def _logging(args: argparse.Namespace) -> None:
    level = (
        logging.DEBUG
        if getattr(args, "verbose", 0)
        else logging.WARNING
        if getattr(args, "quiet", False)
        else logging.INFO
    )
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


SERVE_DESCRIPTION = """\
Re-score the gateways' escalations with the teacher: keep each in the alert
store and answer it with a verdict over MQTT. The teacher is a checkpoint
(teacher train) or its int8 version (compress run --target torch-int8)."""
ALERTS_DESCRIPTION = """\
List what an alert store holds: the escalations with their verdicts, oldest
first, or (--rejected) the messages the re-scorer rejected."""

SERVE_EPILOG = f"""\
teacher:
  --checkpoint DIR is a teacher checkpoint folder, or a torch-int8 artifact
  folder (compress run --target torch-int8), told apart by the manifest.json
  an artifact holds. An artifact is scored with its int8 program on the CPU,
  its encoder's window shape and its decision threshold (thresholds.json);
  its verdicts carry teacher_version torch-int8:sha256:HEX (the first 16 hex
  digits of the sha256 of its manifest.json), also on the "serving:" line.
  Every file is checked against the manifest's sha256 at start, and the
  program must score the manifest's probe windows as compress measured them.
  A file missing or changed, an artifact of another target (an edge one) or
  an encoder that does not fit the model: refused at start, exit 1.

client id:
  the broker keeps this re-scorer's MQTT session (its share of the
  escalations while it is away) under its client id, and lets only one
  connection hold an id. Without --client-id each re-scorer on a host takes
  the lowest of gatewatch-rescorer-HOST-GROUP, -2, -3... that no running
  re-scorer of this user holds (a lock file per id in ${RUN_DIR_ENV}, an
  absolute path, by default /tmp/gatewatch-UID whatever $TMPDIR or
  $XDG_RUNTIME_DIR say, released when the process ends however it ends).
  So a single re-scorer keeps the id it always had, several started with the
  same flags never kick each other off, and one that was killed and started
  again takes its id back and gets what waited in its session. With
  --session-expiry 0 nothing waits for a restart: each process takes a fresh
  id ending -clean-HEX. The id in use is
  on the "serving:" line. Re-scorers that do not share /tmp (systemd units with
  PrivateTmp=) need ${RUN_DIR_ENV} set to one folder they share.

alert store:
  an escalation is acknowledged to the broker only once it is in the store. When
  the store cannot be written (disk full, I/O error) the re-scorer stops at the
  first failed write with exit 1 and one error: line naming the store; what it
  received and did not store stays unacknowledged in its MQTT session, and the
  broker delivers it again when the re-scorer restarts with the same --client-id
  within --session-expiry seconds (with --session-expiry 0 it is dropped).
  Rejected messages (bad JSON, wrong schema, bad values...) are kept there
  too, under the same rule: the newest {MAX_REJECTED:,}, each with the first
  {MAX_REJECTED_PAYLOAD} bytes of its payload (teacher alerts --rejected). teacher serve
  makes the store file but no folder: the folder of --store must exist.

exit codes:
  {EXIT_OK}    ok: stopped by SIGTERM or --duration
  {EXIT_FAILURE}    failure: the alert store refused a write (the re-scorer stops
       at the first one); escalations ended "failed" (a fault of the
       re-scorer; the summary counts them, the log holds their ids); a
       checkpoint or torch-int8 artifact that cannot be loaded (a file
       missing or whose sha256 differs from checksums.json or the
       manifest, another target, an encoder that does not fit);
       --stats-json not written
  {EXIT_USAGE}    usage: bad flags, checked before the teacher is loaded (a share
       group, a client id or a broker URL MQTT cannot carry, a broker
       port outside 1..65535, credentials both in the URL and by
       --username/--password-file, a --store whose folder does not
       exist, a TLS or password file not there);
       no default client id free ({MAX_CLIENT_ID_SLOTS} re-scorers of the group
       on this host) or its lock folder not usable
  {EXIT_BAD_INPUT}    bad input: --store is not an alert store (an agent outbox,
       say); a checkpoint without checksums.json; a --password-file
       that is not UTF-8 text, is empty or starts with an empty line,
       is a folder, FIFO or device, or cannot be read (as edge-agent
       run refuses it)
  {EXIT_UNAVAILABLE}    broker: cannot reach the MQTT broker, or it refused us
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C), after storing and answering what came
"""

ALERTS_EPILOG = f"""\
listing:
  one line per escalation, oldest first: "received" and the time the
  re-scorer received it (UTC; "received_at" in --json, Unix seconds), not
  when the flow was seen; SITE/GATEWAY; the flow; the agent's decision and
  score; the teacher's verdict and score ("unscored" when it could not score).

damaged rows:
  a field the store never writes so (bytes that are not UTF-8, a flow that is
  not JSON, text in a number column, a time no calendar holds, a verdict other
  than malicious or benign) is listed as its stored text, bytes that are not
  UTF-8 written \\xNN; the line ends "damaged: FIELDS", and a JSON row holds
  "damaged": [FIELDS]. Every other row is listed as stored.

rejected messages (--rejected):
  the newest {MAX_REJECTED:,} messages the re-scorer rejected, oldest first:
  "received" and the time the re-scorer received it (UTC; "received_at" in
  --json), topic, kind, reason and payload length. With --json each also holds
  "payload", the first {MAX_REJECTED_PAYLOAD} bytes of its payload as text (bytes that
  are not UTF-8 written \\xNN), and "payload_kept", how many bytes were kept.

read-only stores:
  the store is only read, never written. A WAL-mode store in a folder that
  cannot be written (a copy on a read-only mount, without its -shm file) cannot
  be opened the usual way. With a -wal file beside it, the store and its -wal
  (and -shm) are copied into a private temporary folder and the copy is read,
  so the rows the -wal holds are listed; the copy is removed afterwards. Without
  one, or when the copy cannot be made (no space), the store is read as an
  unchanging file (SQLite's immutable=1), which does not list the rows in a
  -wal file (the note gives its size). Either way a note on stderr says so, and
  rows a running teacher serve adds meanwhile are not listed.

exit codes:
  {EXIT_OK}    ok (nothing listed included)
  {EXIT_FAILURE}    failure: the listing cannot be written to stdout (a reader that
       went away, as with | head, is no error)
  {EXIT_USAGE}    usage: bad flags, or a --store that is a folder
  {EXIT_BAD_INPUT}    bad input: no file at --store, --store is not an alert store,
       it cannot be opened even read-only (the error says SQLite's
       reasons), or none of it can be read
  {EXIT_PARTIAL_INPUT}    partial input: damaged rows, or a read SQLite stopped part
       way; every row read was listed, the damaged ones marked, and one
       error: line names the store and counts them
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)
"""


def register(subparsers) -> None:
    """Add the ``serve`` and ``alerts`` subcommands to the ``teacher`` parser."""
    from teacher.cli import _add_loudness

    p = subparsers.add_parser(
        "serve",
        help="re-score escalations from the gateways",
        description=SERVE_DESCRIPTION,
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        metavar="DIR",
        help="teacher checkpoint folder, or a torch-int8 artifact folder from "
        "compress run --target torch-int8 (one holding manifest.json; see "
        "teacher below) (required)",
    )
    from teacher.cli import add_allow_unverified

    add_allow_unverified(p)
    p.add_argument(
        "--broker", required=True, help="mqtt://HOST:PORT or mqtts://... (required)"
    )
    p.add_argument(
        "--share-group",
        default=DEFAULT_GROUP,
        help="shared subscription group: letters, digits, '.', '_', '-' ('' for "
        f"none; default {DEFAULT_GROUP})",
    )
    p.add_argument(
        "--store",
        default=DEFAULT_STORE,
        help="alert store (SQLite), made if absent; its folder must exist "
        f"(default {DEFAULT_STORE} in the current folder)",
    )
    p.add_argument(
        "--max-batch",
        type=integer(1),
        default=64,
        help="most escalated windows scored in one teacher call (default 64)",
    )
    p.add_argument(
        "--max-wait-ms",
        type=real(0),
        default=10.0,
        help="most milliseconds to wait for a batch to fill (default 10)",
    )
    p.add_argument(
        "--threads",
        type=integer(1),
        help="torch threads, >= 1 (default 1 on CPU, torch's own on a GPU)",
    )
    p.add_argument(
        "--client-id",
        help="MQTT client id; the broker keeps the session under it, so keep it "
        "the same across restarts and give each re-scorer its own (default: "
        "gatewatch-rescorer-HOST-GROUP, or -2, -3... for the 2nd, 3rd... "
        "re-scorer of the group running on this host: the lowest no running one "
        "holds, so a restarted re-scorer takes its session back and two never "
        "share an id; with --session-expiry 0 a fresh "
        "gatewatch-rescorer-HOST-GROUP-clean-HEX per process)",
    )
    p.add_argument(
        "--session-expiry",
        type=integer(0),
        default=DEFAULT_SESSION_EXPIRY,
        help="keep the MQTT session this many seconds, so escalations in flight "
        "when this process died are delivered again when it comes back "
        f"(default {DEFAULT_SESSION_EXPIRY}; 0 for a clean session)",
    )
    p.add_argument("--username", help="broker user name (default: none)")
    p.add_argument(
        "--password-file",
        help="file whose first line is the broker password, read as edge-agent "
        "run reads it: one that is not UTF-8, is empty or starts with an empty "
        "line is refused, exit 3; one not there, exit 2 (default: none)",
    )
    p.add_argument(
        "--tls-ca", help="CA certificate to verify the broker with (default: none)"
    )
    p.add_argument(
        "--tls-cert", help="client certificate for mutual TLS (default: none)"
    )
    p.add_argument("--tls-key", help="the client certificate's key (default: none)")
    p.add_argument(
        "--protocol",
        default="auto",
        choices=[p.value for p in Protocol],
        help="MQTT protocol version (default auto: 5, else 3.1.1)",
    )
    p.add_argument(
        "--connect-timeout",
        type=real(0, MAX_CONNECT_TIMEOUT, lo_open=True),
        default=10.0,
        help="seconds to wait for the broker at start, above 0 and at most "
        f"{MAX_CONNECT_TIMEOUT} (default 10)",
    )
    p.add_argument(
        "--duration",
        type=real(0, MAX_DURATION),
        help=f"stop after this many seconds, at most {MAX_DURATION} (a year) "
        "(default: until SIGTERM or Ctrl-C)",
    )
    p.add_argument(
        "--stats-json",
        help="write the counters to this file at exit; its folder must exist "
        "(default: none)",
    )
    _add_loudness(p, default=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser(
        "alerts",
        help="list escalations and verdicts",
        description=ALERTS_DESCRIPTION,
        epilog=ALERTS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--store",
        default=DEFAULT_STORE,
        help=f"alert store to read (default {DEFAULT_STORE} in the current folder)",
    )
    p.add_argument("--json", action="store_true", help="a JSON list (default: text)")
    p.add_argument(
        "--rejected",
        action="store_true",
        help="list the rejected messages kept instead (default: escalations)",
    )
    p.add_argument(
        "--since",
        help="Unix seconds, ISO time, or an age like 2h (default: all)",
    )
    p.add_argument(
        "--gateway",
        help="GATEWAY or SITE/GATEWAY; with --rejected, the one the topic names "
        "(default: every gateway)",
    )
    p.add_argument(
        "--decision",
        help="escalate, alert, malicious, benign, or unscored (those the teacher "
        "could not score); not with --rejected (default: every decision)",
    )
    p.add_argument(
        "--limit",
        type=integer(0, MAX_LIMIT),
        help=f"list at most this many, 0 to {MAX_LIMIT}: the oldest ones, or the "
        "newest with --newest (default: all)",
    )
    p.add_argument(
        "--newest",
        action="store_true",
        help="with --limit N, the newest N rather than the oldest (still listed "
        "oldest first) (default: the oldest)",
    )
    _add_loudness(p, default=argparse.SUPPRESS)
    p.set_defaults(func=cmd_alerts)
