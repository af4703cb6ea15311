"""The agent: score each flow with the student, decide, escalate over MQTT.

Per flow the agent encodes the record with the artifact's encoder, appends it to its
host's window (:class:`flows.windows.StreamWindower`), scores the window with the
student and decides with the thresholds: *benign* below ``escalate_low``, *escalate*
in ``[escalate_low, alert)`` (the re-scorer decides), *alert* at or above ``alert``
(alerted locally and escalated). Flows are scored in micro-batches: a file source is
read ``max_batch`` flows at a time; a live source scores whatever has arrived as soon
as the first flow of a batch has waited ``max_wait_ms``, or at once when nothing else
is queued, so slow traffic is scored one flow at a time. Between a live source's
reader thread and the scorer at most ``max_queue`` parsed flows wait (4,096 by default,
a few MB): when the scorer falls behind, the reader blocks and the flows stay where
they came from (the pipe, the followed file, the capture buffer) instead of in memory.

Local alerts are JSON lines, one object per line::

    {"kind": "alert", "ts": 1655071231.7, "src_ip": "193.201.9.232",
     "src_port": 46563, "dst_ip": "147.32.81.167", "dst_port": 3933,
     "proto": "tcp", "score": 0.97, "decision": "alert",
     "model_version": "...", "escalation_id": "..."}

and a verdict line for each verdict that confirms an escalation as malicious, or
that answers a local alert as benign: the same 5-tuple fields with ``"kind":
"verdict"``, the ``escalation_id`` that names the alert, ``"verdict": "malicious"``
or ``"verdict": "benign", "overrules_alert": true``, the teacher's ``score`` and
``teacher_version``::

    {"kind": "verdict", "ts": 1655071231.7, "src_ip": "193.201.9.232", ...,
     "verdict": "benign", "overrules_alert": true, "score": 0.12,
     "escalation_id": "...", "teacher_version": "..."}

So every local alert whose verdict came has a verdict line, and a reader of the
alerts output sees which alerts the teacher rejected (``alerts_overruled`` in the
summary counts them). A benign verdict on an uncertain escalation (never alerted)
writes nothing. Escalations replayed from the outbox after a restart (stored by an
earlier run: alerts and uncertain ones alike) are matched as they are sent again,
and a verdict for one this run did not send is looked up in the outbox file, so
its verdict line carries the flow's ts and 5-tuple from the stored escalation; the
agent keeps the last ``_MAX_RECENT`` (10 000) escalations for this, far more than
are in flight.

Escalation ids are derived from the site, gateway and flow record (32 hex digits; see
:func:`flow_id`), so a flow read again after a crash carries the same id and the
re-scorer drops the copy. The uid is no part of the id (the flow meter draws a fresh
one on each read): flows that share a uid but differ in a field are escalated apart,
and a flow read again (whatever its uid) while its escalation still waits in the
outbox is merged with it, stored and answered once, and counted
(``escalations_merged``); one read again after this run sent its escalation goes
out again and is counted in ``escalations_resent``. The flow's text fields go out with
their control characters escaped (:func:`edge_agent.protocol.sendable_flow`), as the
re-scorer refuses them; the id is taken from the flow as read. Escalations an older
agent stored unescaped are escaped as they are replayed (:func:`~edge_agent.protocol.
resendable`). A verdict delivered twice
(at-least-once) is handled once: the agent remembers the last ``_MAX_VERDICT_IDS``
(10 000) escalation ids answered, far more than the messages it keeps in flight
(``_TRACKED_PER_INFLIGHT`` times the link's in-flight window). A verdict that
answers an id already answered otherwise (another verdict or teacher version) is
ignored, and one for an id this gateway has no escalation of (not sent in this run,
not kept in the outbox) is ignored too: neither counted as the teacher's verdict nor
written as an alert line. Both are counted in ``verdicts_unexpected`` only and the
first is logged at WARNING. The second may be forged (a broker without access
control) or answer an earlier run's escalation that the outbox let go (its ``sent``
table keeps the newest ``keep_sent``; :attr:`~edge_agent.outbox.Outbox.forgotten`
counts the others): the two look alike, and the warning names both.

When the outbox cannot store a batch (disk full, I/O error) the agent goes on: the
batch's escalations are dropped and counted (``outbox_failed``, the first
failure logged as an error), their local alert lines (if any) are still written,
and the run ends with :class:`~flows.errors.OutboxError` (exit 6). A read or
acknowledgement the outbox refuses is counted the same way and retried a second
later by the sender.

A re-scorer that refuses an escalation (its teacher takes another window shape,
say) answers it with a rejection instead of a verdict (:func:`edge_agent.protocol.
parse_answer`): the agent counts it (``rejections_received``; those still without a
verdict at the end, ``escalations_rejected``), logs the first, and keeps waiting
for a verdict, which another re-scorer may still send; ``edge-agent run`` exits 6
when verdicts are missing at the end of its drain and says why.

A batch's counting, outbox commit and alert lines are one step: a Ctrl-C
(SIGINT) that comes inside it is acted on once the batch is in the outbox with its
alert lines (a second Ctrl-C there stops at once), so every flow the summary counts
is kept in the outbox, with its alert line when it is an alert.

An escalation too large to send, over the protocol's cap
(:data:`~edge_agent.protocol.MAX_PAYLOAD_BYTES`, when it is built) or over the
broker's packet limit (when it is published), is dropped and counted
(``dropped_oversized``, the first logged); its local alert line is still written,
and the run ends with exit 6.
"""

from __future__ import annotations

import hashlib
import json
import math
import queue
import signal
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from edge_agent import logger
from edge_agent import protocol as proto
from edge_agent.locks import (
    NO_FLOCK,
    RUN_DIR_ENV,
    fcntl,
    holder,
    own_folder,
    run_folder,
    try_lock,
)
from edge_agent.mqtt import BrokerUnreachable, MessageTooLargeError, MqttLink
from edge_agent.outbox import Outbox
from flows.errors import (
    BadInputError,
    GatewatchError,
    OutboxError,
    TransportError,
    UsageError,
    json_problem,
)
from flows.windows import StreamWindower, record_key

SITE_THRESHOLDS = "site_thresholds.json"
_FIVE_TUPLE = ("ts", "src_ip", "src_port", "dst_ip", "dst_port", "proto")
# Messages handed to paho and not yet acknowledged: this many times the link's
# in-flight window (200 by default, so 400), so the broker never waits on us while at
# most ~6 MB of payloads (about 15 KB each) sit in memory during a backlog (1000
# showed as +6 MB of RSS in the 30-min soak).
_TRACKED_PER_INFLIGHT = 2
_MAX_VERDICT_IDS = 10_000  # verdict ids remembered to drop a redelivered copy
MODEL_UPDATE_WAIT_S = 30.0  # how long close() waits for model updates being handled
# Escalations whose verdict may still come, remembered for the verdict line (their
# 5-tuple, and whether they were written as local alerts).
_MAX_RECENT = 10_000
# After a stop, how long a live interface may take to hand over its open
# connections (a unit's stop timeout is larger: systemd's default is 90 s).
_REST_MAX_S = 30.0


@dataclass
class Counters:
    """What the agent did in this run (the summary and the status payload)."""

    flows: int = 0
    benign: int = 0
    escalate: int = 0
    alert: int = 0
    escalations_queued: int = 0
    # Escalations whose id was already waiting in the outbox: the same flow read
    # again (the id is made from its fields, not its uid), merged with that copy:
    # stored and answered once. Not in escalations_queued.
    escalations_merged: int = 0
    escalations_sent: int = 0
    verdicts_received: int = 0
    # For an escalation an earlier run sent that the outbox still keeps (answered
    # through the persistent session); not for ids this gateway has no
    # escalation of, which are verdicts_unexpected only.
    verdicts_unmatched: int = 0
    # What the teacher decided, over every verdict handled (received and
    # unmatched alike): the verdict lines of the alerts output.
    verdicts_malicious: int = 0
    verdicts_benign: int = 0
    # Verdicts ignored or taken with doubt, as a forged or stale one would be: one
    # for an id already answered whose verdict or teacher version differs from
    # the first answer (ignored), and one for an id this gateway has no
    # escalation of (neither sent in this run nor kept in the outbox). A copy
    # that repeats the first answer (QoS 1 redelivery, the re-scorer answering a
    # copy sent again) is no surprise and is not counted.
    verdicts_unexpected: int = 0
    # Escalations of this run a re-scorer refused (a rejection on the verdicts
    # topic: another teacher's window shape, say); no verdict comes from it.
    rejections_received: int = 0
    alerts_overruled: int = 0  # local alerts the re-scorer answered as benign
    delivered_after_drop: int = 0  # dropped by the outbox cap while in flight
    bad_records: int = 0
    unrouted: int = 0
    dropped_oversized: int = 0
    # Escalations of earlier runs whose stored payload could not be read back
    # (damaged at rest): moved to the outbox's damaged table, never sent.
    outbox_damaged: int = 0
    outbox_failed: int = 0
    # Of outbox_failed, the alerts (their alert lines are written); the rest are
    # uncertain escalations, of which no record is left.
    outbox_failed_alerts: int = 0
    # Escalations the broker took (or a re-scorer answered) that the outbox could
    # not remove (a full disk): none is lost, they stay in it and go out again.
    outbox_unforgotten: int = 0
    # Of outbox_unforgotten, those a re-scorer answered in this run.
    outbox_unforgotten_answered: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict copy."""
        return {
            k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(self).items()
        }


# One ulp of slack above 1: the artifact's rule may set ``alert`` just past the top
# score (``nextafter(1.0, inf)`` when a score is 1.0), which means "never alert".
_MAX_THRESHOLD = float(np.nextafter(1.0, np.inf))


def check_thresholds(values: dict[str, float], where: str) -> dict[str, float]:
    """Return ``values`` if every threshold is a finite score and they are ordered.

    Each of ``escalate_low``, ``decision`` and ``alert`` must lie in [0, 1] and
    ``escalate_low <= decision <= alert``; otherwise detection would be switched off
    silently (NaN compares false, a value above 1 is never reached). A bad value is
    a BadInputError naming ``where`` (the file) and the key.
    """
    for key in ("escalate_low", "decision", "alert"):
        value = values[key]
        if not (math.isfinite(value) and 0.0 <= value <= _MAX_THRESHOLD):
            raise BadInputError(
                f"threshold {key!r} is {value!r}, not a score in [0, 1]", path=where
            )
    if not values["escalate_low"] <= values["decision"] <= values["alert"]:
        raise BadInputError(
            "thresholds must satisfy escalate_low <= decision <= alert, not "
            f"{values['escalate_low']!r}, {values['decision']!r}, "
            f"{values['alert']!r}",
            path=where,
        )
    return values


def read_thresholds_file(
    path: str | Path, model_version: str | None = None
) -> dict[str, float]:
    """``escalate_low``, ``alert`` and ``decision`` (default ``escalate_low``) of a
    thresholds JSON file, checked by :func:`check_thresholds`.

    A file that cannot be read, is not a JSON object, lacks a key or holds a
    value that is no number is a BadInputError (exit 3) naming the file and key.
    With ``model_version``, a file that names the model it was calibrated for
    (``edge-agent calibrate`` writes it) must name that one: another model's scores
    are on another scale, and its thresholds could silence every alert.
    """
    where = str(path)
    expected = (
        'expected a JSON object with numbers "escalate_low" and "alert" (and '
        'optionally "decision") in [0, 1]'
    )
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise BadInputError(
            f"cannot be read ({exc.strerror or exc}); {expected}", path=where
        ) from exc
    except (RecursionError, ValueError) as exc:  # also UnicodeDecodeError
        # RecursionError: JSON nested thousands deep is bad input like any other.
        raise BadInputError(
            f"is not valid JSON ({json_problem(exc)}); {expected}", path=where
        ) from exc
    if not isinstance(data, dict):
        raise BadInputError(
            f"holds a JSON {type(data).__name__}; {expected}", path=where
        )
    out: dict[str, float] = {}
    for key in ("escalate_low", "alert", "decision"):
        if key == "decision" and key not in data:
            out[key] = out["escalate_low"]
            continue
        if key not in data:
            raise BadInputError(f"lacks {key!r}; {expected}", path=where)
        value = data[key]
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(value)
            out[key] = float(value)
        except (TypeError, OverflowError):
            raise BadInputError(
                f"threshold {key!r} is {str(value)[:40]!r}, not a number in "
                f"[0, 1]; {expected}",
                path=where,
            ) from None
    calibrated_for = data.get("model_version")
    if (
        model_version is not None
        and calibrated_for is not None
        and str(calibrated_for) != model_version
    ):
        raise BadInputError(
            f"was calibrated for model {str(calibrated_for)[:80]!r}, but the artifact "
            f"is model {model_version!r}; run edge-agent calibrate with this "
            "artifact again",
            path=where,
        )
    return check_thresholds(out, where)


def load_thresholds(scorer: Any) -> tuple[dict[str, float], str]:
    """The thresholds to use: the site's own when calibrated, else the artifact's.

    Both are checked by :func:`check_thresholds` (BadInputError, exit 3).
    """
    folder = getattr(scorer, "folder", None)
    if folder is not None:
        path = Path(folder) / SITE_THRESHOLDS
        if path.exists() or path.is_symlink():  # a FIFO or folder is not ignored
            from edge_agent.config import check_regular_file

            check_regular_file(path, "site_thresholds.json (from edge-agent calibrate)")
            version = getattr(scorer, "model_version", None)
            return read_thresholds_file(path, version), "site"
    t = dict(scorer.thresholds)
    out = {k: float(t[k]) for k in ("decision", "escalate_low", "alert")}
    where = str(Path(folder) / "thresholds.json") if folder is not None else "artifact"
    return check_thresholds(out, where), "artifact"


def switched_off(thresholds: dict[str, float]) -> str | None:
    """What checked thresholds leave of detection, when they switch (most of) it
    off: ``escalate_low`` at 1 or above (no flow scored below 1 is escalated or
    alerted), or ``alert`` above 1 (no flow is alerted locally); None otherwise.
    """
    if thresholds["escalate_low"] >= 1.0:
        return (
            f"escalate_low {thresholds['escalate_low']!r} is at or above 1, so no "
            "flow scored below 1 is escalated or alerted: detection is switched off"
        )
    if thresholds["alert"] > 1.0:
        return (
            f"alert {thresholds['alert']!r} is above 1, so no flow is alerted "
            "locally (doubtful ones are still escalated)"
        )
    return None


def decide(scores: np.ndarray, thresholds: dict[str, float]) -> np.ndarray:
    """Decision codes per score: 0 benign, 1 escalate, 2 alert."""
    lo, hi = thresholds["escalate_low"], thresholds["alert"]
    s = np.asarray(scores, dtype=np.float64)  # no rounding of the thresholds
    return (s >= lo).astype(np.int8) + (s >= hi).astype(np.int8)


_DECISIONS = (proto.Decision.BENIGN, proto.Decision.ESCALATE, proto.Decision.ALERT)


class _CtrlCAfterStep:
    """Hold a Ctrl-C (SIGINT) that comes inside the ``with`` block until it ends,
    then hand it to the handler that was in place, as if it came then.

    For one batch's counting, outbox commit and alert lines: a KeyboardInterrupt
    between them would leave flows counted in the summary but kept nowhere, or
    stored in the outbox with no alert line. A second Ctrl-C inside the block
    is handed on at once (the user insists: a stuck disk or a stalled reader of
    the alerts). Only in the main thread, where signal handlers run, and only
    over a handler set from Python (an ignored SIGINT stays ignored).
    """

    def __init__(self) -> None:
        self._previous: Any = None
        self._held: list[Any] = []

    def __enter__(self) -> _CtrlCAfterStep:
        if threading.current_thread() is not threading.main_thread():
            return self
        previous = signal.getsignal(signal.SIGINT)
        if callable(previous):
            self._previous = previous
            signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum: int, frame: Any) -> None:
        self._held.append(frame)
        if len(self._held) > 1:
            self._hand_on()

    def _hand_on(self) -> None:
        """Put the handler back and give it the Ctrl-Cs held, in order (the
        first that raises ends it)."""
        previous, self._previous = self._previous, None
        if previous is None:
            return
        signal.signal(signal.SIGINT, previous)
        held, self._held = self._held, []
        for frame in held:
            previous(signal.SIGINT, frame)

    def __exit__(self, *_exc: object) -> None:
        self._hand_on()


_NOT_IN_ID = ("uid", "label", "label_detail")


def _stored_flow(payload: bytes) -> dict[str, Any]:
    """The ts and 5-tuple of the flow in a stored escalation's payload ({} when
    the payload holds none), for the verdict line of a flow this run did not see."""
    try:
        flow = json.loads(payload).get("flow")
    except (RecursionError, ValueError, AttributeError):
        return {}
    if not isinstance(flow, dict):
        return {}
    return {k: flow.get(k) for k in _FIVE_TUPLE}


def flow_id(site: str, gateway: str, flow: dict[str, Any]) -> str:
    """A message id fixed by the flow: the same flow always gets the same id.

    The hash covers the site, the gateway and the flow's measured fields; not
    ``uid`` (the flow meter draws a fresh one on each read) nor the labels.
    """
    fields = {k: v for k, v in proto.clean_flow(flow).items() if k not in _NOT_IN_ID}
    text = json.dumps([site, gateway, fields], sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class Agent:
    """One gateway's agent around a scorer, an outbox and (optionally) a broker link.

    ``scorer`` has ``.score(windows)``, ``.thresholds``, ``.encoder`` and
    ``.model_version`` (see :func:`edge_agent.runtime.load_artifact`). Without a link
    escalations stay in the outbox until an agent with a broker replays them.
    """

    def __init__(
        self,
        scorer: Any,
        *,
        site: str,
        gateway: str,
        outbox: Outbox,
        link: MqttLink | None = None,
        alerts: TextIO | None = None,
        max_batch: int = 256,
        max_wait_ms: float = 20.0,
        thresholds: dict[str, float] | None = None,
        max_hosts: int = 10_000,
        track_latency: bool = False,
        status_interval: float = 60.0,
        max_queue: int = 4096,
        max_awaiting: int | None = None,
        resend_after: float = 10.0,
        thresholds_from: str | None = None,
    ) -> None:
        if max_batch < 1 or max_wait_ms < 0 or max_queue < max_batch:
            raise UsageError(
                "max_batch must be >= 1, max_wait_ms >= 0 and max_queue >= max_batch"
            )
        if (max_awaiting is not None and max_awaiting < 1) or not resend_after > 0:
            raise UsageError("max_awaiting must be >= 1 and resend_after above 0 s")
        self.site = proto.validate_id(site, "site")
        self.gateway = proto.validate_id(gateway, "gateway")
        self.topics = {ch: proto.topic(site, gateway, ch) for ch in proto.Channel}
        self.outbox = outbox
        self._check_outbox_identity()
        # Queued by an earlier run (seq up to this), or sent by one and put back:
        # read back from the file, so checked before they are published.
        self._replay_upto = outbox.last_seq()
        self.link = link
        self.alerts = alerts
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_wait = max_wait_ms / 1000.0
        self.max_hosts = max_hosts
        self.status_interval = status_interval
        # Flow control towards the re-scorer (None: off). At most ``max_awaiting``
        # escalations of this run are out without an answer, so that a burst does
        # not overflow the broker's queue for the re-scorer (mosquitto drops what
        # is past max_queued_messages, 1000 by default, after acknowledging it to
        # us); answers that stop for ``resend_after`` seconds while some are
        # awaited put the unanswered ones back to be published again.
        self.max_awaiting = max_awaiting
        self.resend_after = resend_after
        # The window in use: max_awaiting at first, halved at each re-send (a
        # broker dropped some), grown back by one per window of answers; and the
        # ids published again since the last re-send, not answered yet, which
        # it paces as well.
        self._window = float(max_awaiting or 0)
        self._resending: set[str] = set()
        self._quiet_since = time.monotonic()
        self._quiet_limit = resend_after
        self._answers = 0
        self._answers_at_resend = -1
        self._resend_rounds = 0
        self._resend_due = False  # awaited ones were put back in the outbox
        self._live: tuple | None = None  # a live source read since begin_live
        self.counters = Counters()
        self.first_bad_record: str | None = None  # why the encoder refused the first
        # A broker tried in the background that refused us for good, and who to tell.
        self.link_error: TransportError | None = None
        self.on_link_failed: Any = None
        self.rejects = proto.RejectCounter("agent")
        self.latencies: deque[float] | None = (
            deque(maxlen=200_000) if track_latency else None
        )
        self.round_trips: deque[float] | None = (
            deque(maxlen=200_000) if track_latency else None
        )
        self._created: dict[str, float] = {}
        self._fixed_thresholds = thresholds
        # The file ``thresholds`` came from (--thresholds), named in the log line.
        self._thresholds_from = thresholds_from
        self._lock = threading.Lock()
        self._out_lock = threading.Lock()
        # Escalation ids answered, with the first answer (verdict, teacher
        # version), so that a copy that says otherwise is noticed.
        self._verdict_ids: OrderedDict[str, tuple[str, str]] = OrderedDict()
        # Escalations acknowledged in this run whose verdict has not come yet, by id
        # (one entry per id: the same flow sent twice is answered once); ids pushed
        # out of this bounded map are counted so the drain still waits for them.
        self._awaiting: OrderedDict[str, None] = OrderedDict()
        self._awaiting_evicted = 0
        # The awaited ids an earlier run sent (kept in the outbox's sent table):
        # told apart in the summary, as this run's window waits on them too.
        self._earlier: set[str] = set()
        # Escalations of this run a re-scorer rejected, by id: (reason, detail,
        # teacher version). They stay awaited (another re-scorer may still answer
        # one with a verdict, which takes it out of here); those still unanswered
        # at the end say why their verdicts are missing.
        self._rejected: OrderedDict[str, tuple[str, str, str]] = OrderedDict()
        # Escalations answered since the sender last told the outbox (its ``sent``
        # table keeps the unanswered ones for a re-send), and the link's count of
        # connects without a session when the sender last looked.
        self._answered: list[str] = []
        # Ids the outbox failed to remove once sent or answered (see
        # Counters.outbox_unforgotten), each counted once.
        self._unforgotten: set[str] = set()
        self._sessions_absent_seen = 0
        self._requeued = 0
        # Ids put back in the queue by a re-send or a lost session and not yet
        # acknowledged again: their second acknowledgement is a republish
        # (escalations_requeued), not a flow read again (escalations_resent).
        self._republishing: set[str] = set()
        # Ids published as alerts and not acknowledged yet, so that those the
        # outbox cap dropped while in flight are counted by decision.
        self._alerts_out: set[str] = set()
        self.delivered_after_drop_alerts = 0
        self._sent_ids: OrderedDict[str, None] = OrderedDict()
        self._resent = 0
        self._outbox_error: OutboxError | None = None
        self._tracked: OrderedDict[str, Any] = OrderedDict()
        # Escalation id -> (its 5-tuple, written as a local alert), for verdict lines.
        self._recent: OrderedDict[str, tuple[dict[str, Any], bool]] = OrderedDict()
        self._retry_at = 0.0
        self._retry_delay = 1.0  # doubles while publishes find no subscriber
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._sender: threading.Thread | None = None
        self._install(scorer)
        self._model_updater = None
        # Held from an update's handling to its swap: each update message has its
        # own thread, and without it a thread that handled an older update could
        # swap its model in after a newer one's (the slots naming the newer).
        self._model_update_lock = threading.Lock()
        # Threads handling model-topic messages, waited for by close(): an agent
        # that exits while the runtime builds a session aborts in its threads.
        self._model_threads: list[threading.Thread] = []

    # -- model ------------------------------------------------------------------------

    def _install(self, scorer: Any) -> None:
        enc = scorer.encoder
        if self._fixed_thresholds is not None:
            thresholds, origin = dict(self._fixed_thresholds), "given"
            check_thresholds(thresholds, "--thresholds")
        else:
            thresholds, origin = load_thresholds(scorer)
        self._say_thresholds(scorer, thresholds, origin, self._thresholds_from)
        # A model with the very encoder of the running one (the same artifact
        # reloaded, a retrained network on the same encoder) reads the windows
        # built so far as they are; another encoder needs them rebuilt.
        windower = getattr(self, "windower", None)
        running = getattr(self, "encoder", None)
        if windower is None or running is None or running.to_dict() != enc.to_dict():
            windower = StreamWindower(
                enc.window, enc.n_features, max_hosts=self.max_hosts
            )
        with self._lock:
            self.scorer = scorer
            self.encoder = enc
            self.thresholds = thresholds
            self.windower = windower
            self.model_version = str(getattr(scorer, "model_version", ""))
        logger.info(
            "model %s: thresholds %s (%s), window %d x %d",
            self.model_version,
            thresholds,
            origin,
            enc.window,
            enc.n_features,
        )

    @staticmethod
    def _say_thresholds(
        scorer: Any,
        thresholds: dict[str, float],
        origin: str,
        given_from: str | None = None,
    ) -> None:
        """One warning (shown without -v) when thresholds other than the
        artifact's replace them, naming where they came from (a site's own file,
        or ``given_from``, the --thresholds file), and one when thresholds other
        than the artifact's rule switch detection off (:func:`switched_off`)."""
        folder = getattr(scorer, "folder", None)
        where = {
            "site": str(Path(folder or ".") / SITE_THRESHOLDS),
            "given": given_from or "the thresholds given",
        }.get(origin)
        how = {"site": "edge-agent calibrate", "given": "--thresholds"}.get(origin)
        if how is not None:
            logger.warning(
                "thresholds from %s (%s), not the artifact's thresholds.json: "
                "escalate_low %.6g, alert %.6g",
                where,
                how,
                thresholds["escalate_low"],
                thresholds["alert"],
            )
        off = switched_off(thresholds)
        # The artifact's own rule may set alert past 1 on purpose ("never alert");
        # a site's file, or flags, that silence it are worth a line.
        if off is not None and (where is not None or thresholds["escalate_low"] >= 1):
            logger.warning("thresholds of %s: %s", where or "the artifact", off)

    def swap_scorer(self, scorer: Any) -> None:
        """Replace the running model between two batches.

        The swap is atomic: a batch is scored either wholly by the old model or wholly
        by the new one. A model with the running one's encoder keeps the host windows
        built so far (a reload of the same artifact decides as if none happened);
        another encoder may have another width, so its windows restart empty.
        """
        self._install(scorer)
        self.publish_status("online")

    def reload_model(self, artifact: str | Path) -> bool:
        """Load the artifact at ``artifact`` again and swap it in (SIGHUP).

        For the model slots' ``current`` link after ``edge-agent rollback``, or a
        folder replaced in place: the model is health-checked first, and one that
        fails leaves the running model as it is. True when the new one runs.
        """
        from edge_agent.ota import load_checked

        try:
            scorer = load_checked(artifact)
        except GatewatchError as exc:
            logger.error(
                "reload of %s refused, model %s keeps running: %s",
                artifact,
                self.model_version,
                exc,
            )
            return False
        before = self.model_version
        self.swap_scorer(scorer)
        logger.info(
            "model reloaded from %s: %s (was %s)", artifact, self.model_version, before
        )
        return True

    # -- connection -------------------------------------------------------------------

    def start(self, connect_timeout: float = 10.0) -> None:
        """Connect, subscribe to verdicts, publish status online, start sending."""
        if self.link is not None and self.max_awaiting is not None:
            # Sent by an earlier run, acknowledged and never answered: awaited
            # here too (before the session brings their verdicts), so that they
            # are published again if no answer comes.
            with self._out_lock:
                for msg_id in self.outbox.sent_ids():
                    self._awaiting.setdefault(msg_id, None)
                    self._earlier.add(msg_id)
        if self.link is not None:
            self.link.on_message = self._on_message
            self.link.on_connect = self._wake.set
            self.link.on_give_up = self._link_gave_up
            try:
                self.link.connect(connect_timeout)
            except BrokerUnreachable as exc:
                # A gateway booting before its network or broker must not go blind:
                # flows are scored and alerts written now, escalations wait in the
                # outbox until a background attempt connects.
                logger.warning(
                    "%s; scoring on: escalations wait in the outbox %s and the "
                    "broker is tried again in the background",
                    exc,
                    self.outbox.path,
                )
                self.link.connect_in_background(
                    connect_timeout, on_give_up=self._link_gave_up
                )
            self.link.subscribe(
                self.topics[proto.Channel.VERDICTS], qos=1, timeout=connect_timeout
            )
            self.publish_status("online")
        self._sender = threading.Thread(
            target=self._send_loop, name="outbox-sender", daemon=True
        )
        self._sender.start()
        self._wake.set()

    def _link_gave_up(self, exc: TransportError) -> None:
        """The broker came back but refused us (credentials, certificate; at start
        or after the link was up): stop."""
        self.link_error = exc
        if self.on_link_failed is not None:
            self.on_link_failed(exc)

    def enable_model_updates(self, updater: Any, timeout: float = 10.0) -> None:
        """Pass each message of the model topic to ``updater.handle(payload)``.

        Connected, it returns once the broker acknowledged the subscription (at
        most ``timeout`` seconds), so an update published after that is seen.
        """
        self._model_updater = updater
        if self.link is not None:
            self.link.subscribe(
                self.topics[proto.Channel.MODEL], qos=1, timeout=timeout
            )

    def publish_status(self, state: str) -> None:
        """Publish the retained status (state, model version, counters)."""
        if self.link is None or not self.link.connected:
            return
        payload = proto.encode(self.status_payload(state))
        try:
            self.link.publish(self.topics[proto.Channel.STATUS], payload, retain=True)
        except TransportError as exc:
            logger.warning("status not published: %s", exc)

    def status_payload(self, state: str, **extra: Any) -> dict[str, Any]:
        """The status message for ``state``; a refused model update is in every
        one while its retained message stays (``ModelUpdater.last_refusal``)."""
        updater = self._model_updater
        fields = dict(getattr(updater, "last_refusal", None) or {})
        fields.update(extra)
        return proto.build_status(
            state=state,
            model_version=self.model_version,
            counters=self.counters.as_dict(),
            **fields,
        )

    def will(self) -> tuple[str, bytes]:
        """The last will: the retained offline status."""
        return self.topics[proto.Channel.STATUS], proto.encode(
            proto.build_status(state="offline", model_version=self.model_version)
        )

    # -- scoring ----------------------------------------------------------------------

    def process(
        self, records: list[dict[str, Any]], arrived: list[float] | None = None
    ) -> np.ndarray:
        """Score and decide a batch of canonical records; return decision codes."""
        if not records:
            return np.zeros(0, dtype=np.int8)
        with self._lock:
            scorer, enc, windower = self.scorer, self.encoder, self.windower
            thresholds, version = self.thresholds, self.model_version
            try:
                X = enc.transform_records(records)
            except (BadInputError, TypeError, ValueError):
                records, X = self._encode_one_by_one(enc, records, arrived)
                if not records:
                    return np.zeros(0, dtype=np.int8)
            keys = self._keys(records, enc)
            windows = windower.push_many(keys, X)
            scores = np.asarray(scorer.score(windows), dtype=np.float32)
        codes = decide(scores, thresholds)
        now = time.monotonic()
        if self.latencies is not None and arrived is not None:
            self.latencies.extend(now - t for t in arrived[: len(records)])

        # Counted, stored and written as one step: a Ctrl-C inside it is acted on
        # once the batch is in the outbox with its alert lines, so every flow the
        # summary counts is kept (a second Ctrl-C still stops at once).
        with _CtrlCAfterStep():
            self._count_and_escalate(records, windows, scores, codes, version)
        return codes

    def _count_and_escalate(self, records, windows, scores, codes, version) -> None:
        """Count a scored batch's decisions and escalate those not benign."""
        c = self.counters
        c.flows += len(records)
        n_esc = int(np.count_nonzero(codes == 1))
        n_alert = int(np.count_nonzero(codes == 2))
        c.escalate += n_esc
        c.alert += n_alert
        c.benign += len(records) - n_esc - n_alert
        escalated = np.flatnonzero(codes)
        if len(escalated):
            self._escalate_many(
                [records[i] for i in escalated],
                windows[escalated],
                scores[escalated],
                [_DECISIONS[codes[i]] for i in escalated],
                version,
            )

    def _encode_one_by_one(self, enc, records, arrived):
        good, rows = [], []
        for i, rec in enumerate(records):
            try:
                rows.append(enc.transform_record(rec))
                good.append(rec)
            except (BadInputError, TypeError, ValueError) as exc:
                self.counters.bad_records += 1
                if self.counters.bad_records == 1:
                    self.first_bad_record = str(exc)
                    logger.warning(
                        "flow record rejected (%s); further ones counted", exc
                    )
                if arrived is not None:
                    arrived[i] = -1.0
        if arrived is not None:
            arrived[:] = [t for t in arrived if t >= 0]
        X = np.stack(rows) if rows else np.zeros((0, enc.n_features), np.float32)
        return good, X

    @staticmethod
    def _keys(records: list[dict[str, Any]], enc) -> list[str]:
        return [record_key(r, enc) for r in records]

    def _escalate_many(self, flows, windows, scores, decisions, version) -> None:
        """Build the escalations of one batch and store them in one transaction."""
        items, made = [], []
        topic = self.topics[proto.Channel.ESCALATIONS]
        for flow, window, score, decision in zip(
            flows, windows, scores, decisions, strict=True
        ):
            msg_id = flow_id(self.site, self.gateway, flow)
            # Text fields go out escaped (``\x01``, Zeek's notation): the re-scorer
            # refuses control characters to protect terminals, and rejecting such
            # flows here instead would lose their scoring and alerts. The id is
            # taken from the flow as read, so it does not change.
            body = proto.build_escalation(
                flow=proto.sendable_flow(flow),
                window=window,
                score=float(score),
                decision=decision,
                model_version=version,
                site=self.site,
                gateway=self.gateway,
                msg_id=msg_id,
            )
            alert = decision is proto.Decision.ALERT
            try:
                payload = proto.encode(body)
            except proto.ProtocolError as exc:
                if exc.kind is not proto.RejectKind.OVERSIZED:
                    self.rejects.reject(exc, "outgoing escalation")
                    continue
                # Over the protocol's size cap (a huge text field): no broker or
                # re-scorer can take it, as with one over the broker's packet
                # limit. Dropped and counted (exit 6); its alert line is written.
                self._count_oversized(msg_id, f"{exc} (the protocol's size cap)")
                made.append((flow, float(score), decision, msg_id, False))
                continue
            items.append((msg_id, topic, payload, alert))
            made.append((flow, float(score), decision, msg_id, True))
            if self.round_trips is not None:
                self._created[msg_id] = time.monotonic()

        # Remembered before the sender can see them, so that no verdict comes
        # back before the agent knows which of them are local alerts.
        for flow, _, decision, msg_id, queued in made:
            if queued:
                self._remember(msg_id, flow, decision is proto.Decision.ALERT)

        # Durable first (one fsync per batch), then the local alert lines.
        merged_before = self.outbox.merged
        try:
            kept = self.outbox.add_many(items)
        except OutboxError as exc:
            self._outbox_failed(exc, len(items), sum(1 for i in items if i[3]))
            kept = []
        merged = self.outbox.merged - merged_before
        self._count_merged(merged)
        self.counters.escalations_queued += sum(kept) - merged
        for flow, score, decision, msg_id, _ in made:
            if decision is proto.Decision.ALERT:
                self._write_line(
                    flow,
                    kind="alert",
                    score=score,
                    decision=decision.value,
                    model_version=version,
                    escalation_id=msg_id,
                )
        self._wake.set()

    def _count_merged(self, merged: int) -> None:
        """Count escalations the outbox merged with a waiting copy of the same id
        (``escalations_merged``, in the summary); log the first."""
        if not merged:
            return
        first = self.counters.escalations_merged == 0
        self.counters.escalations_merged += merged
        if first:
            logger.info(
                "a flow was read again while its escalation still waited in the "
                "outbox: merged with it, one verdict for both (the id is made from "
                "the flow's fields, not its uid); further ones only counted"
            )

    def _remember(self, msg_id: str, flow: dict[str, Any], alerted: bool) -> None:
        """Keep an escalation's 5-tuple, and whether it was alerted, for its verdict.

        Only with an alerts output (the lines are all they are for); the last
        ``_MAX_RECENT`` escalations are kept. A flow read again keeps its mark of
        an alert: the line was written once, whatever the later read decided.
        """
        if self.alerts is None:
            return
        with self._out_lock:
            before = self._recent.get(msg_id)
            alerted = alerted or (before is not None and before[1])
            self._recent[msg_id] = ({k: flow.get(k) for k in _FIVE_TUPLE}, alerted)
            self._recent.move_to_end(msg_id)
            if len(self._recent) > _MAX_RECENT:
                self._recent.popitem(last=False)

    def _check_outbox_identity(self) -> None:
        """Refuse an outbox whose escalations another site or gateway wrote: they
        would go out on that gateway's topic and their verdicts to its topic, which
        this run does not hear, so they would be sent again on every run."""
        foreign: dict[tuple[str, str], int] = {}
        for topic, count in self.outbox.topics().items():
            try:
                site, gateway, _ = proto.split_topic(topic)
            except proto.ProtocolError:
                continue  # not a gatewatch topic: the broker or re-scorer names it
            if (site, gateway) != (self.site, self.gateway):
                foreign[site, gateway] = foreign.get((site, gateway), 0) + count
        if not foreign:
            return
        (site, gateway), count = max(foreign.items(), key=lambda item: item[1])
        more = f" (and {len(foreign) - 1} other identities)" if len(foreign) > 1 else ""
        raise UsageError(
            f"outbox {self.outbox.path} holds {count} escalations of site {site} "
            f"gateway {gateway}{more}, not of this agent's --site {self.site} "
            f"--gateway {self.gateway}: their verdicts would go to that gateway's "
            f"topic, which this run does not hear; run once with --site {site} "
            f"--gateway {gateway} to send them, or give this agent another --outbox"
        )

    def _unreadable(self, msg: Any, payload: bytes) -> str | None:
        """Why an escalation read back from the outbox file cannot be sent as
        ``payload`` (its stored payload as :func:`proto.resendable` makes it) says
        it, a payload damaged at rest; None when it can. Only those of earlier runs
        are read again: this run's were built from checked flows a moment ago."""
        if msg.seq > self._replay_upto and msg.id not in self._earlier:
            return None
        try:
            # Size is not judged here: the broker's limit has its own path.
            body = proto.parse_escalation(payload, max_bytes=len(payload) + 1)
        except proto.ProtocolError as exc:
            return str(exc)[:200]
        if body.get("id") != msg.id:
            return f"its id {str(body.get('id'))[:40]!r} is not the stored {msg.id}"
        return None

    def _set_aside(self, msg: Any, why: str) -> None:
        """Take a damaged escalation out of the queue (kept in the outbox's
        ``damaged`` table); count it, log the first."""
        try:
            moved = self.outbox.set_aside(msg.id, why)
        except OutboxError as exc:
            self._outbox_failed(exc)
            return
        if not moved:
            return
        with self._out_lock:
            self.counters.outbox_damaged += 1
            first = self.counters.outbox_damaged == 1
            self._awaiting.pop(msg.id, None)
        if first:
            logger.warning(
                "escalation %s in the outbox %s is damaged (%s): set aside in its "
                "'damaged' table, not sent; further ones only counted",
                msg.id, self.outbox.path, why,
            )

    def _remember_replayed(self, msg: Any) -> None:
        """Remember an escalation replayed from the outbox that this run did not
        score (an earlier run stored it), so that its verdict line carries the
        flow's ts and 5-tuple, taken from the stored escalation. Alerts and
        uncertain escalations alike: an uncertain one has no alert line to be
        matched by its escalation_id, so its verdict line is all a reader has."""
        if self.alerts is None:
            return
        with self._out_lock:
            if msg.id in self._recent:
                return
        self._remember(msg.id, _stored_flow(msg.payload), msg.alert)

    def _stored_escalation(self, esc_id: str) -> tuple[dict[str, Any], bool] | None:
        """The flow and alert mark of an escalation this run did not score, from
        the outbox file (waiting, or sent and kept for a re-send): a verdict for
        an earlier run's escalation still names its flow. None when the file does
        not hold it; ``({}, False)`` when it cannot be read (not taken as
        unknown)."""
        try:
            msg = self.outbox.find(esc_id)
        except OutboxError as exc:
            logger.debug("verdict %s: outbox lookup failed: %s", esc_id, exc)
            return {}, False
        if msg is None:
            return None
        return _stored_flow(msg.payload), msg.alert

    def _outbox_failed(
        self, exc: OutboxError, lost: int = 0, lost_alerts: int = 0
    ) -> None:
        """Count an outbox failure (and the escalations it cost, ``lost_alerts`` of
        them alerts); log the first."""
        self.counters.outbox_failed += lost
        self.counters.outbox_failed_alerts += lost_alerts
        if self._outbox_error is None:
            logger.error(
                "%s; escalations it cannot store are dropped and counted, local "
                "alerts still written",
                exc,
            )
        self._outbox_error = exc

    @property
    def outbox_error(self) -> OutboxError | None:
        """The last error the outbox raised in this run, or None."""
        return self._outbox_error

    def _write_line(self, flow: dict[str, Any], **fields: Any) -> None:
        if self.alerts is None:
            return
        row = {"kind": fields.pop("kind")}
        row.update({k: proto._clean(flow.get(k)) for k in _FIVE_TUPLE})
        row.update(fields)
        with self._out_lock:
            self.alerts.write(json.dumps(row) + "\n")
            self.alerts.flush()

    # -- sources ----------------------------------------------------------------------

    def run_file(
        self, records: Iterable[dict[str, Any]], stop: threading.Event | None = None
    ) -> None:
        """Score a finite source in batches of ``max_batch`` as fast as it reads.

        Once ``stop`` is set (SIGTERM) no more flows are read; those read are scored.
        """
        batch: list[dict[str, Any]] = []
        for rec in records:
            if stop is not None and stop.is_set():
                break
            batch.append(rec)
            if len(batch) >= self.max_batch:
                self.process(batch)
                batch = []
        self.process(batch)

    def begin_live(
        self, records: Iterable[dict[str, Any]], stop: threading.Event | None = None
    ) -> None:
        """Start reading a live source now, in a worker thread, into the queue
        :meth:`run_live` scores from (at most ``max_queue`` flows wait there).

        Called before :meth:`start`, so that a capture is open while the broker
        is tried: a broker that does not answer at start blinds nothing.
        """
        q: queue.Queue = queue.Queue(maxsize=self.max_queue)
        done = object()
        stop = stop or threading.Event()

        def reader() -> None:
            try:
                for rec in records:
                    q.put((time.monotonic(), rec))
                    if stop.is_set() and not getattr(records, "finishing", False):
                        break
            finally:
                q.put((0.0, done))

        thread = threading.Thread(target=reader, name="source-reader", daemon=True)
        thread.start()
        self._live = (records, q, done, thread)

    def run_live(
        self, records: Iterable[dict[str, Any]], stop: threading.Event | None = None
    ) -> None:
        """Score a live source: micro-batches when fast, single flows when slow
        (read from the start of :meth:`begin_live` when that was called for it)."""
        stop = stop or threading.Event()
        live = getattr(self, "_live", None)
        if live is None or live[0] is not records:
            self.begin_live(records, stop)
        _, q, done, thread = self._live
        self._live = None
        finished = False
        while not finished and not stop.is_set():
            try:
                first = q.get(timeout=0.5)
            except queue.Empty:
                continue
            if first[1] is done:
                finished = True
                break
            batch, arrived = [first[1]], [first[0]]
            while len(batch) < self.max_batch:
                try:
                    t, rec = q.get_nowait()
                except queue.Empty:
                    if time.monotonic() - first[0] >= self.max_wait:
                        break
                    try:
                        t, rec = q.get(
                            timeout=max(
                                0.0, first[0] + self.max_wait - time.monotonic()
                            )
                        )
                    except queue.Empty:
                        break
                if rec is done:
                    finished = True
                    break
                batch.append(rec)
                arrived.append(t)
            self.process(batch, arrived)
        if not finished:
            self._score_the_rest(q, done, thread)

    def _score_the_rest(self, q: queue.Queue, done: object, reader) -> None:
        """After a stop, score the flows the reader had already taken from the source.

        The reader ends after its next flow once ``stop`` is set; one blocked in the
        source itself (no data on a pipe or interface) is given two seconds, and a
        source that yields what it holds (a live interface's open connections)
        that long after its last flow, for at most ``_REST_MAX_S`` in all.
        """
        batch: list[dict[str, Any]] = []
        arrived: list[float] = []
        start = time.monotonic()
        deadline = start + 2.0
        while time.monotonic() < deadline:
            try:
                t, rec = q.get(timeout=0.1)
            except queue.Empty:
                if not reader.is_alive():
                    break
                continue
            if rec is done:
                break
            deadline = min(max(deadline, time.monotonic() + 2.0), start + _REST_MAX_S)
            batch.append(rec)
            arrived.append(t)
            if len(batch) >= self.max_batch:
                self.process(batch, arrived)
                batch, arrived = [], []
        self.process(batch, arrived)

    # -- sending ----------------------------------------------------------------------

    def _send_loop(self) -> None:
        """Publish the outbox in order; replay from the start after each reconnect.

        A message the broker acknowledged with "no matching subscribers" (no
        re-scorer subscribed at that moment) stays in the outbox and is published
        again a second later. The retained status (with the counters) is refreshed
        every ``status_interval`` seconds.
        """
        generation, last_seq = -1, 0
        last_status = time.monotonic()
        while not self._stop.is_set():
            self._wake.wait(0.05)
            self._wake.clear()
            try:
                self._collect_acks()
            except OutboxError as exc:
                self._outbox_failed(exc)
                self._stop.wait(1.0)
                continue
            link = self.link
            if link is None or not link.connected:
                continue
            if time.monotonic() - last_status >= self.status_interval:
                last_status = time.monotonic()
                self.publish_status("online")
            if link.generation != generation:
                generation, last_seq = link.generation, 0
                try:
                    self._requeue_if_session_lost(link)
                except OutboxError as exc:
                    self._outbox_failed(exc)
            if self._retry_at and time.monotonic() >= self._retry_at:
                self._retry_at, last_seq = 0.0, 0  # publish the unrouted ones again
            try:
                if self._resend_if_unanswered(link):
                    last_seq = 0
            except OutboxError as exc:
                self._outbox_failed(exc)
            room = _TRACKED_PER_INFLIGHT * link.max_inflight - len(self._tracked)
            if room <= 0:
                continue
            window = self._window_left()
            try:
                published = self._publish_awaited(link, room) if window is not None \
                    and self._resend_due else 0
                if window is not None and window <= 0:
                    if published:
                        self._wake.set()
                    continue  # new ones wait until answers make room
                rows = self.outbox.pending(limit=min(room, 500), after_seq=last_seq)
            except OutboxError as exc:
                self._outbox_failed(exc)
                self._stop.wait(1.0)
                continue
            for msg in rows:
                if not link.connected:
                    break
                if msg.id in self._tracked:
                    last_seq = msg.seq
                    continue
                if window is not None and msg.id not in self._awaiting:
                    if window <= 0:
                        break  # from this one on when answers make room
                    window -= 1
                last_seq = msg.seq
                sent = self._publish_one(link, msg)
                if sent is None:
                    break
                published += sent
            if published:
                self._wake.set()  # more may wait behind them

    def _publish_one(self, link: MqttLink, msg: Any) -> int | None:
        """Publish one outbox message (QoS 1) and track it: 1 when handed to the
        link, 0 when dropped as too large or set aside as damaged, None when the
        link cannot take more now (the caller stops this round)."""
        payload = proto.resendable(msg.payload)
        why = self._unreadable(msg, payload)
        if why is not None:
            self._set_aside(msg, why)
            return 0
        self._remember_replayed(msg)
        try:
            delivery = link.publish(msg.topic, payload, qos=1)
        except MessageTooLargeError as exc:
            self._drop_oversized(msg.id, exc)
            return 0
        except TransportError as exc:
            logger.warning("escalation not published yet: %s", exc)
            return None
        if delivery.lost:
            return None
        self._tracked[msg.id] = delivery
        if msg.alert:
            self._alerts_out.add(msg.id)
        return 1

    def _publish_awaited(self, link: MqttLink, room: int) -> int:
        """Publish again the awaited escalations back in the outbox (put there by
        a re-send or a lost session), ahead of new ones and outside the window
        (they were counted in it when first sent); how many went out. Once none
        is left the re-send is over."""
        with self._out_lock:
            ids = [i for i in self._awaiting
                   if i not in self._tracked and i not in self._resending]
            # Paced like new ones: at most a window of them out unanswered.
            room = min(room, int(self._window) - len(self._resending))
        if room <= 0:
            return 0
        rows = self.outbox.pending_of(ids)[:room] if ids else []
        if not rows:
            if not self._resending:
                self._resend_due = False
            return 0
        published = 0
        for msg in rows:
            if not link.connected:
                break
            if msg.id in self._tracked:
                continue
            sent = self._publish_one(link, msg)
            if sent is None:
                break
            if sent:
                with self._out_lock:
                    self._resending.add(msg.id)
            published += sent
        return published

    def _rejected_awaited(self) -> int:
        """Escalations a re-scorer rejected that still await a verdict (call with
        ``_out_lock`` held)."""
        return sum(1 for i in self._rejected if i in self._awaiting)

    def _window_left(self) -> int | None:
        """How many more escalations may go out before answers come back (None:
        no limit): ``max_awaiting`` less those awaited (rejected ones aside) and
        those handed to the link and not acknowledged yet."""
        if self.max_awaiting is None:
            return None
        with self._out_lock:
            out = len(self._awaiting) - self._rejected_awaited() + len(self._tracked)
        return int(self._window) - out

    def _resend_if_unanswered(self, link: MqttLink) -> bool:
        """Publish again the acknowledged escalations still unanswered when no
        answer came for a while; True if any went back into the outbox.

        A broker acknowledges an escalation and may still drop it before the
        re-scorer takes it (a queue over its cap), so an acknowledgement does not
        mean it arrives. When some are awaited (rejected ones aside) and neither an
        answer nor an acknowledgement came for ``resend_after`` seconds, the
        outbox's ``sent`` table goes back into the queue; the re-scorer answers a
        copy of one it already stored with the stored verdict. The wait doubles
        (up to 5 minutes) after a round that brought no answer at all.
        """
        if self.max_awaiting is None or not link.connected:
            return False
        now = time.monotonic()
        with self._out_lock:
            waiting = len(self._awaiting) - self._rejected_awaited() > 0
        if not waiting or self._tracked:
            self._quiet_since = now
            return False
        waited = now - self._quiet_since
        if waited < self._quiet_limit:
            return False
        if self._answers == self._answers_at_resend:
            self._quiet_limit = min(2 * self._quiet_limit, 300.0)
        else:
            self._quiet_limit = self.resend_after
        self._answers_at_resend = self._answers
        self._quiet_since = now
        moved = self._requeue_sent()
        if not moved:
            return False

        self._window = max(min(8.0, float(self.max_awaiting)), self._window / 2)
        with self._out_lock:
            self._resend_rounds += 1
            first = self._resend_rounds == 1
        log = logger.warning if first else logger.info
        log("no answer from the re-scorer for %.0f s: %d escalations the broker "
            "acknowledged and nobody answered are published again (a broker drops "
            "what is past its queue cap; see --max-awaiting)", waited, moved)
        return True

    def _drop_oversized(self, msg_id: str, exc: MessageTooLargeError) -> None:
        """Drop a message the broker can never take; count it, log the first one.

        Kept, it would fail the same way on every replay and hold up nothing else,
        but the outbox would never drain.
        """
        try:
            gone = self.outbox.ack(msg_id)
        except OutboxError as exc:
            self._outbox_failed(exc)
            return
        if gone:
            self._count_oversized(msg_id, exc)

    def _count_oversized(self, msg_id: str, exc: object) -> None:
        """Count one escalation dropped as too large (``dropped_oversized``, exit
        6); log the first."""
        with self._out_lock:
            self.counters.dropped_oversized += 1
            first = self.counters.dropped_oversized == 1
        if first:
            logger.warning(
                "escalation %s dropped: %s; further ones only counted", msg_id, exc
            )

    def _collect_acks(self) -> None:
        done = []
        for msg_id, delivery in list(self._tracked.items()):
            try:
                acked = delivery.acked()
            except (RuntimeError, ValueError):
                acked = False
                delivery.lost = True
            if delivery.lost or (acked and delivery.unrouted):
                del self._tracked[msg_id]
            if acked and delivery.unrouted:
                # Accepted but nobody subscribed (re-scorer not back yet): keep it.
                delivery.forget()
                self.counters.unrouted += 1
                if not self._retry_at:
                    # Back off while no re-scorer listens: 1 s, 2 s, ... 30 s.
                    self._retry_at = time.monotonic() + self._retry_delay
                    self._retry_delay = min(2 * self._retry_delay, 30.0)
            elif acked:
                delivery.forget()
                done.append(msg_id)
                self._retry_delay = 1.0  # a re-scorer listens again
                self._quiet_since = time.monotonic()
        try:
            missing: list[str] = []
            try:
                self.outbox.ack_many(done, missing)
            except OutboxError:
                self._note_unforgotten(done)
                raise
            self.counters.escalations_sent += len(done)
            # Handed to the link before the outbox cap dropped them from the file:
            # the broker has them all the same, so they were not lost.
            self.counters.delivered_after_drop += len(missing)
            self.delivered_after_drop_alerts += sum(
                1 for i in missing if i in self._alerts_out)
            self._alerts_out.difference_update(done)
            self._note_sent(done)
        finally:
            # Only now out of _tracked: until it is awaited, a verdict that comes
            # in between must still find the id among those this run sent.
            for msg_id in done:
                self._tracked.pop(msg_id, None)
        # After the acks, so that a verdict that beat its ack finds its row in
        # ``sent``; an id answered before (a copy sent again) needs no re-send.
        # One in flight now stays in the file until its acknowledgement, which
        # finds its verdict then (above): the file must not lose it under the link.
        with self._out_lock:
            answered, self._answered = self._answered, []
            answered += [i for i in done if i in self._verdict_ids]
            answered = [i for i in answered if i not in self._tracked]
            # Put back in the queue but answered before going out again: not
            # published again after all (escalations_requeued counts those that go).
            unsent_again = self._republishing.intersection(answered)
            self._requeued -= len(unsent_again)
            self._republishing.difference_update(unsent_again)
        try:
            self.outbox.answered_many(answered)
        except OutboxError:
            self._note_unforgotten(answered)
            raise

    def _note_unforgotten(self, ids: list[str]) -> None:
        """Count escalations the outbox could not remove after the broker took
        them or a re-scorer answered them (``outbox_unforgotten``): they stay in
        the outbox and the next run sends them again."""
        with self._out_lock:
            self._unforgotten.update(ids)
            self.counters.outbox_unforgotten = len(self._unforgotten)

    def _requeue_if_session_lost(self, link: MqttLink) -> None:
        """Publish again what the broker may have lost with our session.

        A connect without the session the link asked for means the broker kept
        nothing for this client (it restarted without its saved state, or the
        session expired): escalations it had acknowledged and not yet answered may
        be gone, so the outbox's ``sent`` table goes back into the queue (the
        re-scorer answers a copy of one it already stored with the stored verdict).
        """
        absent = getattr(link, "sessions_absent", 0)
        if absent == self._sessions_absent_seen:
            return
        self._sessions_absent_seen = absent
        moved = self._requeue_sent()
        if moved:
            logger.warning(
                "broker %s had no session for this gateway: %d escalations sent "
                "earlier and not answered yet are published again",
                link.url, moved)

    def _requeue_sent(self) -> int:
        """Put the outbox's acknowledged, unanswered escalations back in its queue
        to be published again, paced by the window (``_publish_awaited``), and
        count them; how many moved. Shared by the re-send after a quiet spell and
        the re-send after a lost session."""
        ids = self.outbox.sent_ids()  # the sender's thread alone moves them
        moved = self.outbox.requeue_sent()
        with self._out_lock:
            self._resending.clear()  # every unanswered one goes out again
            self._requeued += moved
            self._republishing.update(ids)
        if moved:
            self._resend_due = True
        return moved

    def _note_sent(self, ids: list[str]) -> None:
        """Await one verdict per escalation id just acknowledged by the broker.

        An id already acknowledged in this run was sent again: one the outbox put
        back in the queue (a re-send, a lost session) is counted in
        ``escalations_requeued`` already; any other is the same flow read again
        (twice in the input, or replayed from the outbox and read again), counted
        in ``escalations_resent``. Neither needs a second verdict. An id whose
        verdict came before its acknowledgement was collected is not awaited.
        """
        with self._out_lock:
            for msg_id in ids:
                republished = msg_id in self._republishing
                self._republishing.discard(msg_id)
                if msg_id in self._sent_ids and not republished:
                    self._resent += 1
                else:
                    self._sent_ids[msg_id] = None
                    if len(self._sent_ids) > _MAX_VERDICT_IDS * 10:
                        self._sent_ids.popitem(last=False)
                if msg_id in self._verdict_ids or msg_id in self._awaiting:
                    continue
                self._awaiting[msg_id] = None
                if len(self._awaiting) > _MAX_VERDICT_IDS * 10:
                    self._awaiting.popitem(last=False)
                    self._awaiting_evicted += 1

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic == self.topics[proto.Channel.MODEL]:
            thread = threading.Thread(
                target=self._model_message,
                args=(payload,),
                name="model-update",
                daemon=True,
            )
            self._model_threads = [
                t for t in self._model_threads if t.is_alive()
            ] + [thread]
            thread.start()
            return
        try:
            verdict = proto.parse_answer(payload)
        except proto.ProtocolError as exc:
            self.rejects.reject(exc, topic)
            self.counters.rejected = dict(self.rejects.counts)
            return
        except Exception as exc:  # noqa: BLE001 - must not stop paho's thread
            self.rejects.reject(
                proto.ProtocolError(
                    proto.RejectKind.BAD_VALUE, f"{type(exc).__name__}: {exc}"[:200]
                ),
                topic,
            )
            self.counters.rejected = dict(self.rejects.counts)
            return
        if verdict["kind"] == proto.Kind.REJECTION.value:
            self._on_rejection(verdict)
            return
        esc_id = verdict["escalation_id"]
        answer = (verdict["verdict"], verdict["teacher_version"])
        with self._out_lock:
            ours = esc_id in self._tracked or esc_id in self._awaiting
            if ours:
                self._answers += 1
                self._quiet_since = time.monotonic()
                self._resending.discard(esc_id)
                if self.max_awaiting is not None and self._window < self.max_awaiting:
                    self._window = min(float(self.max_awaiting),
                                       self._window + 1.0 / self._window)
            self._awaiting.pop(esc_id, None)
            self._rejected.pop(esc_id, None)  # answered after all, by another
            first = self._verdict_ids.get(esc_id)
            if first is None:
                self._verdict_ids[esc_id] = answer
                if len(self._verdict_ids) > _MAX_VERDICT_IDS:
                    self._verdict_ids.popitem(last=False)
        if first is not None:
            if first != answer:
                self._unexpected_verdict(
                    esc_id, answer,
                    f"already answered {first[0]} by teacher {first[1]}; ignored: "
                    "a forged verdict, or another publisher on the verdicts topic "
                    "(is the broker's access control on?)",
                )
            return
        with self._out_lock:
            remembered = self._recent.pop(esc_id, None)
        stored = None
        if remembered is None and (self.alerts is not None or not ours):
            # Looked up for its verdict line, or to tell an earlier run's
            # escalation from an id this gateway never escalated.
            stored = self._stored_escalation(esc_id)
        if not ours and remembered is None and stored is None:
            with self._out_lock:
                self._verdict_ids.pop(esc_id, None)  # a copy is counted again
                late = esc_id in self._sent_ids
            if late or self._answered_before(esc_id):
                # Answered long ago in this run (the answer forgotten here), or
                # in an earlier one: a late copy, already counted and written once.
                logger.debug("verdict %s: a late copy for an escalation answered "
                             "before; ignored", esc_id)
                return
            # An earlier run's escalation past what the outbox keeps, or forged:
            # the two look alike here, so it is neither counted as the teacher's
            # verdict nor written as an alert line, and the warning names both.
            self._unexpected_verdict(esc_id, answer, self._unknown_id_causes)
            return

        # A verdict for an id this run did not send answers an earlier run's
        # escalation (a persistent session): counted apart, so "verdicts
        # received" only counts answers to this run.
        if ours:
            self.counters.verdicts_received += 1
            with self._out_lock:
                self._answered.append(esc_id)
        else:
            self.counters.verdicts_unmatched += 1
            if stored is not None or remembered is not None:
                # An escalation the file still holds (an earlier run's, or this
                # run's not yet published): answered, so not published again.
                with self._out_lock:
                    self._answered.append(esc_id)
        if self.round_trips is not None and esc_id in self._created:
            self.round_trips.append(time.monotonic() - self._created.pop(esc_id))
        flow, alerted = remembered or stored or ({}, False)
        if verdict["verdict"] == proto.Verdict.MALICIOUS.value:
            self.counters.verdicts_malicious += 1
            self._write_line(
                flow,
                kind="verdict",
                verdict="malicious",
                score=verdict["score"],
                escalation_id=esc_id,
                teacher_version=verdict["teacher_version"],
            )
            return
        self.counters.verdicts_benign += 1
        if alerted:
            # The teacher rejects a local alert: the alerts output says so.
            self.counters.alerts_overruled += 1
            self._write_line(
                flow,
                kind="verdict",
                verdict="benign",
                overrules_alert=True,
                score=verdict["score"],
                escalation_id=esc_id,
                teacher_version=verdict["teacher_version"],
            )

    def _answered_before(self, esc_id: str) -> bool:
        """Whether the outbox file remembers an answer for ``esc_id`` (a failed
        read: no)."""
        try:
            return self.outbox.was_answered(esc_id)
        except OutboxError as exc:
            logger.debug("verdict %s: outbox lookup failed: %s", esc_id, exc)
            return False

    def _unknown_id_causes(self) -> str:
        """Why a verdict for an id this gateway keeps no escalation of may have
        come, for the warning: an earlier run's escalation the outbox let go (it
        keeps only its newest ``keep_sent`` sent ones), or a forged verdict."""
        try:
            forgotten = self.outbox.forgotten
        except OutboxError:
            forgotten = None
        let_go = (
            f"; this outbox has let {forgotten} unanswered ones go so far"
            if forgotten else ""
        )
        return (
            "for no escalation this gateway keeps (not sent in this run, not in the "
            f"outbox, which keeps the newest {self.outbox.keep_sent} sent and "
            f"unanswered ones{let_go}): an answer to an earlier run's escalation "
            "past the outbox's kept window, or a forged verdict (is the broker's "
            "access control on?); not counted as the teacher's and no alert line "
            "written"
        )

    def _unexpected_verdict(
        self, esc_id: str, answer: tuple[str, str], why: str | Any
    ) -> None:
        """Count a verdict no re-scorer of this gateway is known to have been
        asked for (``verdicts_unexpected``) and log the first at WARNING with
        ``why`` (a text, or a callable that makes it, only for the first)."""
        with self._out_lock:
            self.counters.verdicts_unexpected += 1
            first = self.counters.verdicts_unexpected == 1
        if first:
            logger.warning(
                "unexpected verdict %s (teacher %s) for escalation %s: %s; further "
                "ones only counted (verdicts_unexpected)",
                answer[0], answer[1], esc_id, why() if callable(why) else why,
            )

    def _on_rejection(self, rejection: dict[str, Any]) -> None:
        """A re-scorer refused one of this run's escalations: note why.

        It stays awaited: in a setup where another re-scorer also gets it, that
        one may still answer with a verdict. A rejection of an escalation already
        answered, of one this run did not send, or a copy, changes nothing.
        """
        esc_id = rejection["escalation_id"]
        why = (rejection["reason"], rejection["detail"], rejection["teacher_version"])
        with self._out_lock:
            ours = esc_id in self._tracked or esc_id in self._awaiting
            self._resending.discard(esc_id)  # answered, if not with a verdict
            if not ours or esc_id in self._rejected:
                return
            self._rejected[esc_id] = why
            if len(self._rejected) > _MAX_VERDICT_IDS:
                self._rejected.popitem(last=False)
        self.counters.rejections_received += 1
        if self.counters.rejections_received == 1:
            logger.warning(
                "the re-scorer (teacher %s) rejected escalation %s (%s: %s): no "
                "verdict comes from it; further rejections only counted",
                why[2],
                esc_id,
                why[0],
                why[1],
            )

    def unanswered_rejections(self) -> list[tuple[str, str, str]]:
        """(reason, detail, teacher version) of each escalation still awaited
        whose only answer so far was a rejection, oldest first."""
        with self._out_lock:
            return [why for i, why in self._rejected.items() if i in self._awaiting]

    def _model_message(self, payload: bytes) -> None:
        """Hand one message of the model topic to the updater, then swap the
        model it installed in, or publish why it was refused; one at a time."""
        with self._model_update_lock:
            self._handle_model_message(payload)

    def _handle_model_message(self, payload: bytes) -> None:
        updater = self._model_updater
        if updater is None:
            return
        try:
            result = updater.handle(payload)
        except Exception as exc:  # noqa: BLE001 - a bad update must not stop the agent
            logger.warning("model update failed: %s", exc)
            self.publish_status_reason(f"model update failed: {exc}")
            return
        if getattr(result, "withdrawn", False):
            return
        if getattr(result, "repeated", False) and getattr(result, "ok", False):
            # The message handled last came again (the retained update, after a
            # reconnect): it was installed, or named the running model, already.
            # A repeated refusal still goes to the status below, as it did the
            # first time.
            return
        if (
            getattr(result, "ok", False)
            and not getattr(result, "changed", True)
            and result.version == self.model_version
        ):
            # The retained update of the model this agent runs (sent again after
            # each reconnect): a swap would only empty the host windows.
            return
        if getattr(result, "ok", False):
            self.swap_scorer(result.scorer)
            logger.info("model updated to %s", result.version)
        else:
            reason = getattr(result, "reason", "refused")
            # The updater has logged it already (once is enough in the log).
            logger.debug("model update refused: %s", reason)
            self.publish_status_reason(str(reason))

    def publish_status_reason(self, reason: str) -> None:
        """Publish status online with the reason an update was refused."""
        if self.link is None or not self.link.connected:
            return
        payload = proto.encode(self.status_payload("online", update_refused=reason))
        try:
            self.link.publish(self.topics[proto.Channel.STATUS], payload, retain=True)
        except TransportError as exc:
            logger.warning("status not published: %s", exc)

    # -- ending -----------------------------------------------------------------------

    def drain(
        self,
        timeout: float,
        wait_verdicts: bool = True,
        stop: threading.Event | None = None,
        stop_within: float = 2.0,
    ) -> bool:
        """Wait at the end until every escalation was sent and acknowledged (and,
        with ``wait_verdicts``, answered), for at most ``timeout`` seconds; True if
        so. Sent ones put back in the outbox to be published again count as
        awaiting a verdict, not as unsent.

        ``stop`` (set by SIGTERM) cuts the wait: once it is set, at most
        ``stop_within`` more seconds, however long ``timeout`` was.
        """
        if self.link is None:
            return len(self.outbox) == 0  # nothing can leave without a broker
        deadline = time.monotonic() + timeout
        cut = False
        while time.monotonic() < deadline:
            if stop is not None and not cut and stop.is_set():
                cut = True
                deadline = min(deadline, time.monotonic() + stop_within)

            self._wake.set()
            acked = not self._tracked and self._unsent(exact=False) == 0
            with self._out_lock:
                answered = not self._awaiting and not self._awaiting_evicted
            if acked and (answered or not wait_verdicts):
                return True
            time.sleep(0.05)
        return False

    def _unsent(self, exact: bool = True) -> int:
        """Escalations in the outbox's queue the broker never acknowledged: those
        waiting there less the sent ones put back to be published again (awaited
        ids), which the summary counts as awaiting a verdict instead. Not
        ``exact``: any number above 0 when some are unsent, without reading the
        file's ids when the counts alone tell (the drain asks every 50 ms)."""
        waiting = len(self.outbox)
        with self._out_lock:
            awaited = set(self._awaiting)
        if not waiting or not awaited:
            return waiting
        if not exact and waiting > len(awaited):
            return waiting - len(awaited)
        try:
            queued = self.outbox.held_ids() - set(self.outbox.sent_ids())
        except OutboxError as exc:
            self._outbox_failed(exc)
            return waiting  # not told apart: all taken as unsent
        return max(0, waiting - len(awaited & queued))

    def close(self) -> None:
        """Publish status offline, stop sending and disconnect; the outbox stays."""
        self._stop.set()
        self._wake.set()
        if self._sender is not None:
            self._sender.join(5)
        try:
            self._collect_acks()
        except OutboxError as exc:
            self._outbox_failed(exc)
        self.counters.rejected = dict(self.rejects.counts)
        if self.link is not None:
            status = proto.encode(self.status_payload("offline"))
            self.link.close(final=(self.topics[proto.Channel.STATUS], status))
        self._wait_for_model_updates(MODEL_UPDATE_WAIT_S)
        self.outbox.close()

    def _wait_for_model_updates(self, wait_s: float) -> None:
        """Wait up to ``wait_s`` seconds in all for the model updates still being
        handled (no more come once the link is closed)."""
        deadline = time.monotonic() + wait_s
        for thread in list(self._model_threads):
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                logger.warning(
                    "a model update is still being handled after %g s; the agent "
                    "exits without it", wait_s,
                )
                return

    def summary(self) -> dict[str, Any]:
        """Counters plus outbox state and the model in use."""
        out = self.counters.as_dict()
        out["rejected"] = dict(self.rejects.counts)
        out["outbox_pending"] = len(self.outbox)
        # The queue split in two, so that no escalation is counted twice: those
        # the broker never took, and sent ones put back to be published again
        # (no verdict came in time, a lost session), counted in verdicts_awaited.
        out["outbox_unsent"] = min(self._unsent(), out["outbox_pending"])
        out["outbox_requeued"] = out["outbox_pending"] - out["outbox_unsent"]
        # Flow control at the end: the window in use (--max-awaiting, less after
        # re-sends) and the escalations out in it; None without flow control.
        out["awaiting_window"] = (
            int(self._window) if self.max_awaiting is not None else None)
        with self._out_lock:
            out["awaiting_out"] = (
                len(self._awaiting) - self._rejected_awaited() + len(self._tracked)
                if self.max_awaiting is not None else None)
            out["escalations_resent"] = self._resent
            out["verdicts_awaited"] = len(self._awaiting) + self._awaiting_evicted
            out["verdicts_awaited_earlier"] = sum(
                1 for i in self._earlier if i in self._awaiting
            )
            out["escalations_rejected"] = self._rejected_awaited()
            out["escalations_requeued"] = self._requeued
            awaited = list(self._awaiting)
            out["outbox_unforgotten_answered"] = sum(
                1 for i in self._unforgotten if i in self._verdict_ids)
        # Of those awaited, the ones the outbox still holds for the next run (its
        # sent table keeps only the newest keep_sent; ids evicted from memory
        # cannot be checked and count as not kept).
        try:
            held = self.outbox.held_ids() if awaited else set()
            out["verdicts_awaited_kept"] = sum(1 for i in awaited if i in held)
        except OutboxError as exc:
            self._outbox_failed(exc)
            out["verdicts_awaited_kept"] = None
        out["broker_sessions_lost"] = getattr(self.link, "sessions_lost", 0)
        # Connection losses of a run of quick ones (edge_agent.mqtt._note_loss),
        # counted here instead of logged one by one.
        out["broker_losses_unlogged"] = getattr(self.link, "losses_unlogged", 0)
        try:
            out["outbox_dropped"] = self.outbox.dropped
        except OutboxError as exc:
            self._outbox_failed(exc)
            out["outbox_dropped"] = None
        out["model_version"] = self.model_version
        out["thresholds"] = dict(self.thresholds)
        return out


# -- one MQTT client id per host -------------------------------------------------------

class ClientIdInUseError(UsageError):
    """Another process on this host holds the MQTT client id this agent would
    connect with: exit 2, a setting that clashes with a running agent, as an
    outbox another run holds is."""


def client_id(site: str, gateway: str) -> str:
    """The MQTT client id of the agent of ``site`` and ``gateway``."""
    return f"gatewatch-{site}-{gateway}"


def claim_client_id(name: str) -> int | None:
    """Hold the MQTT client id ``name`` for this process: an open descriptor with
    an exclusive ``flock`` on ``<run folder>/<name>.lock`` (this pid written in
    it), which the kernel drops when the process ends, however it ends; closing
    the descriptor lets it go. None where there is no ``flock``.

    Two agents connected under one id would take turns kicking each other off
    the broker, so a second one is refused at start (:class:`ClientIdInUseError`,
    naming the holder's pid). A lock folder that is not this user's own, or is
    writable by others (who could then hold the id), is a UsageError naming it.
    """
    if fcntl is None:
        return None
    folder = run_folder()
    hint = f"set {RUN_DIR_ENV} to a folder of your own"
    own_folder(folder, f"the lock of the MQTT client id {name}", hint)
    lock = folder / f"{name}.lock"
    try:
        fd = try_lock(lock)
    except OSError as exc:
        if exc.errno in NO_FLOCK:  # a file system without flock: not refused
            logger.debug("client id %s not locked: %s", name, exc)
            return None
        raise UsageError(
            f"cannot lock {lock} for the MQTT client id ({exc.strerror or exc}); "
            f"{hint}"
        ) from None
    if fd is None:
        raise ClientIdInUseError(
            f"the MQTT client id {name} is in use by another process on this host "
            f"({holder(lock)} holds {lock}): the broker would keep one connection "
            "and the two would take turns kicking each other off; stop that agent, "
            "or give this one its own --site/--gateway"
        )
    return fd
