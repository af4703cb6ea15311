"""``edge-agent``: run the agent on a gateway, calibrate its thresholds, and more.

``edge-agent run`` scores a source and escalates over MQTT; with a file source it
exits once the file is done and its escalations are acknowledged (or
``--drain-timeout`` passed) and prints a summary. ``edge-agent calibrate`` sets this
site's thresholds from its own benign traffic. The bundle, flash and update commands
come from :mod:`edge_agent.bundle` when it is installed.

Exit codes: 0 ok, 1 failure, 2 usage, 3 bad input (a source that gave no usable
flow, a damaged outbox file, left untouched; an empty stdin is no error: a restart
given no new input replays and drains its outbox and exits 0), 4 partial input
(damage part way, damaged packets of a capture skipped while the read went on, or
rejected input lines; the flows read were scored and sent), 6 broker
unavailable (a broker that does not answer at start is retried in the background
while the flows are scored and their alerts written), escalations left
unacknowledged in the outbox (with ``--broker``: a run without one is offline,
keeps its escalations in the outbox for a run with a broker and exits 0), or
escalations dropped because the outbox could not
store them (disk full, I/O error: the agent scores on,
writes its local alerts and counts ``outbox_failed``) or by its cap
(``--outbox-max``, counted in ``outbox_dropped_now``), or escalations still without
a verdict at the end of the drain (unless ``--no-wait-verdicts``; the error line
counts those a re-scorer rejected and says why), 130 interrupted (Ctrl-C;
the flows in hand are scored and the outbox is kept). SIGTERM is the orderly stop
of a service: reading ends (a file part way), the flows read are scored, the outbox
is drained for at most 2 s (from the SIGTERM, when it comes during the drain at
the end of the input), and the exit code is the one the input read so far
earned (0, 3, 4 or 6, as at the end of a file; verdicts still awaited are only a
warning then), never 130; before the first flow is read it ends the start (exit
0, :mod:`edge_agent.entry`), and after the drain it is ignored. Alerts on stdout
whose reader went away (``| head``) cost one warning, not the run.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import logging
import os
import signal
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from edge_agent import entry, logger
from flows.argtypes import nearest_existing, real, zone_name
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
    OutboxError,
    PartialInputError,
    TransportError,
    UsageError,
)
from flows.outfile import check_output, write_file

DESCRIPTION = (
    "edge-agent: run the agent on a gateway, calibrate its thresholds, and more."
)
# Acknowledged escalations kept (in the outbox file) until their verdict comes, to
# be sent again if the broker loses this gateway's session (about 15 kB each).
RESEND_WINDOW = 1000
# Seconds a SIGTERM leaves the outbox to drain, from the stop (or from the
# drain's start, when the stop came before it).
STOP_DRAIN_S = 2.0
RELOAD_WAIT_S = 30.0  # how long an ending run waits for a model reload in flight

EPILOG = f"""\
exit codes:
  {EXIT_OK}    ok
  {EXIT_FAILURE}    failure (an alerts file, a --summary-json file, or calibrate's
       --out file, that cannot be opened or written included (calibrate
       --out in a missing folder, a device or a FIFO: usage, 2), and an
       --outbox that cannot be created or opened: a folder, a path
       under a file, a symbolic link loop or a path under one (the
       error names the link), a read-only file system, no permission; alerts
       on a pipe whose reader went away are only a warning; a summary
       that cannot be written is only a warning when the run fails
       for another reason); an --artifact that is missing,
       lacks a file, was modified after it was written (sha256),
       fails its probe, or whose encoder reads fields no source of the
       agent gives (an NSL-KDD artifact: conn records only here; as
       edge-agent bundle refuses it) (the model is unusable, whatever
       named it)
  {EXIT_USAGE}    usage: bad flags, arguments or settings, a --config file that
       is missing, a folder, unreadable, not UTF-8 or not TOML (the
       config is settings, like flags; the files it names are judged
       as if given by flags), an empty --outbox (the default path is
       --outbox left out), an --outbox another edge-agent run holds
       (its lock file OUTBOX.lock names the pid), an MQTT client id
       (gatewatch-SITE-GATEWAY, with --broker) another process on
       this host holds (its lock file in $GATEWATCH_RUN_DIR, default
       /tmp/gatewatch-UID, names the pid), a broker password
       (--password-file) without a user name, an --outbox holding
       escalations another --site/--gateway wrote (their verdicts go
       to that gateway's topic)
  {EXIT_BAD_INPUT}    bad input: a source that gave no usable flow (stdin whose
       lines held no record, a damaged file with nothing usable), a
       source, a thresholds file or a --password-file that is a folder
       or missing (a password file also when empty or not UTF-8), an
       iface: interface that is missing or not up at start (once
       --wait-interface seconds have passed, when given), a
       damaged outbox file (left untouched), an artifact manifest
       that is not valid JSON, not a JSON object, or whose
       model_version the re-scorer would refuse (a control
       character), an artifact thresholds.json whose keys are not
       numbers in 0..1 in order (escalate_low <= decision <=
       alert); an empty stdin (no lines at all) is no error: the
       outbox is replayed and drained (exit 0)
  {EXIT_PARTIAL_INPUT}    partial input: damage part way (a cut file: the read
       stopped there), damaged packets of a capture (skipped, the
       read went on), input lines rejected, or records the
       artifact's encoder refused, or a live capture (iface:) that
       failed part way (its interface went down or was removed: the
       connections it held were ended and scored, as on SIGTERM, and
       the error line names the interface and the reason); the flows
       read were scored and sent (calibrate: its thresholds were set
       from the flows read before a bad row, 100 or more); the error
       line says which
  {EXIT_UNAVAILABLE}    broker unavailable (refused credentials or certificate; one
       that does not answer at start is retried in the background
       while flows are scored), escalations left unacknowledged in
       the outbox with --broker given (a run without --broker is
       offline: it keeps its escalations in the outbox for a run with
       --broker and exits 0; those --max-awaiting held back while earlier ones
       waited for verdicts included, with --no-wait-verdicts too: they
       stay for the next run), an outbox that cannot be opened for a
       full disk or an I/O error, or escalations dropped because the
       outbox could not store them (disk full, I/O error), or sent
       ones it could not remove once the broker took them or a
       re-scorer answered them (disk full: none is lost, they stay and
       the next run sends them again, as duplicates), or dropped by its cap
       (--outbox-max: it drops the oldest uncertain escalations
       first, alerts last; alerts keep their local lines unless
       --alerts is empty), or
       escalations over the broker's packet limit (dropped, not sent),
       or escalations of an earlier run damaged in the outbox file (set
       aside in its 'damaged' table, not sent; not met again),
       or escalations still without a verdict at the end of the drain
       (--drain-timeout; not awaited with --no-wait-verdicts; sent ones
       queued in the outbox to be published again count here, not as
       unsent): none came
       in time, or a re-scorer rejected them (a teacher of another window
       shape, say: the error line counts them and says why), or the broker
       lost this gateway's session (restarted without its saved state)
       and the unanswered ones were published again
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C, SIGINT); one that comes while a batch is
       counted, stored in the outbox and written to --alerts takes
       effect once that batch is whole (a second one at once)

SIGTERM stops reading (a file part way), scores the flows read, drains the
outbox for at most 2 s and exits as at the end of the input: 0, 3, 4 or 6 by
the rules above (escalations still without a verdict are a warning, not 6;
escalations the broker did not take stay in the outbox for the next run, and
are 6 as at the end of the input), never 130. One that comes during the drain
at the end of the input (a file read once) cuts it to at most 2 s from then,
whatever --drain-timeout was, and the run ends as above; a Ctrl-C during the
drain stops it at once (130). A SIGTERM at any other moment ends with a code
above too:
  - while the agent starts (imports, model load, opening the outbox),
    before it reads anything: 0, with one line "stopped: SIGTERM came
    while the agent was starting, ...": nothing was read or lost, the
    outbox is as it was, and no summary is written (a Ctrl-C then: 130);
  - while --wait-interface waits: the run stops with no flow read (0);
  - once the drain is over (the summary line, and after it): ignored, as
    is a Ctrl-C; the exit code is the run's.
Only in the first few tens of milliseconds, while Python itself starts and
before any line of edge-agent runs, does a SIGTERM end the process by the
signal (status 143 in a shell; systemd counts a stop it asked for as clean).

SIGHUP (systemctl reload) loads --artifact again, e.g. the models/current link
after edge-agent rollback: the model is health-checked and swapped in between
two batches; one that fails is logged and the running model stays. A model
with the running one's encoder keeps the windows built so far (a reload of the
same model decides as if there was none); another encoder starts them empty.
A SIGHUP before the agent is ready to reload (while it starts) is ignored;
SIGHUPs during a load ask for one more load after it; a load in flight when
the input ends is waited for (up to {RELOAD_WAIT_S:.0f} s) before the agent exits.
"""

MIN_CALIBRATION_FLOWS = 100  # benign flows calibrate needs to set thresholds

CALIBRATE_EPILOG = f"""\
exit codes:
  {EXIT_OK}    thresholds written
  {EXIT_FAILURE}    failure: the --out file (or the artifact's
       site_thresholds.json) cannot be written, or the artifact cannot
       be loaded (a missing or modified file, a model its runtime
       refuses, probe windows that do not score as built, an encoder
       that reads fields the source does not give: an NSL-KDD
       artifact, as edge-agent bundle refuses it)
  {EXIT_USAGE}    usage: bad flags (--target-fpr outside 0..1, a live source, an
       empty --out)
  {EXIT_BAD_INPUT}    bad input: an artifact manifest that is not valid JSON, not a
       JSON object, or whose model_version the re-scorer would refuse, an unreadable
       source, a source with no flow, or one with fewer than
       {MIN_CALIBRATION_FLOWS} benign flows (labeled benign,
       or when none is labeled benign, not labeled malicious: an
       unlabeled source is taken as benign whole, with a warning, and
       its attacks would pass the thresholds). The flags are
       right but the input cannot set thresholds: too few flows is
       too little input, like none, so both are bad input, not usage
  {EXIT_PARTIAL_INPUT}    partial input: the source is damaged part way, or a
       capture has damaged packets (skipped, the read went on); the
       thresholds set from the flows read are written
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)
"""


_RUN_FLAGS = {
    "artifact": "artifact folder (model, encoder, thresholds, manifest); required "
    "here or in --config",
    "source": "where flows come from: pcap:FILE, iface:NAME, zeek:PATH (a conn.log), "
    "parquet:FILE or - (JSON lines on stdin); required here or in --config",
    "broker": "mqtt://HOST:PORT or mqtts://HOST:PORT (default: none; escalations "
    "are kept in the outbox)",
    "site": "site id (letters, digits, . _ -); required here or in --config",
    "gateway": "gateway id (letters, digits, . _ -); required here or in --config",
    "outbox": "outbox file; an empty name is refused, exit 2. A run holds a lock "
    "on OUTBOX.lock beside it until it ends: a second run on the same outbox is "
    "refused, exit 2, naming the pid of the first (default: "
    "$XDG_STATE_HOME/gatewatch/outbox-S-G.sqlite)",
    "alerts": "where local alerts go as JSON lines, with a verdict line for each "
    "escalation the re-scorer finds malicious and each local alert it overrules "
    "as benign: FILE, - for stdout, or an empty string for none (default: -)",
    "summary_json": "also write the summary as JSON to this file (default: none)",
    "username": "broker user name (default: none)",
    "password_file": "file whose first line is the broker password (default: none)",
    "tls_ca": "CA certificate file for TLS (default: none)",
    "tls_cert": "client certificate file for TLS (default: none)",
    "tls_key": "client key file for TLS (default: none)",
    "protocol": "MQTT version: auto (5, else 3.1.1), 5 or 3.1.1 (default: auto)",
    "update_public_key": "Ed25519 public key file: accept model updates signed by "
    "it (default: none, updates refused)",
    "thresholds": "site thresholds JSON (default: the artifact's "
    "site_thresholds.json)",
    "capture_filter": "libpcap filter of an iface: source, e.g. \"not port 22\" "
    "(default: none); the agent's own broker connection is left out whatever it "
    "says",
}
_RUN_NUMBERS = {
    "drain_timeout": (
        float,
        "seconds to wait for acknowledgements (and verdicts) at the end; a "
        "SIGTERM meanwhile cuts the wait to 2 s from then (default: 30)",
    ),
    "connect_timeout": (float, "seconds to wait for the broker at start (default: 10)"),
    "max_batch": (int, "largest micro-batch of flows scored at once, 1..4096 "
                  "(default: 256)"),
    "max_flows": (
        int,
        "most connections a pcap: or iface: source tracks at once; past it the "
        "least recently active are ended early, with one warning. About 1 KB "
        "of memory each (0.9 KB measured with 200,000 open SYN-only connections), "
        "so the default bounds what a flood of spoofed SYNs can take to about "
        "100 MB (default: 100000)",
    ),
    "max_wait_ms": (
        float,
        "longest a flow waits for its batch to fill, in ms (default: 20)",
    ),
    "outbox_max": (
        int,
        "most escalations kept unacknowledged; past it the oldest uncertain ones "
        "are dropped first, alerts last, and the run exits 6. On disk an "
        "escalation of a conn-log flow takes about 5 KB (measured with a window of "
        "8 x 93 features, the ctu-conn artifacts; it grows with the window), so a "
        "full default outbox is about 500 MB, plus about 5 MB of sent ones kept "
        "for their verdicts (default: 100000)",
    ),
    "keepalive": (int, "MQTT keepalive in seconds (default: 30)"),
    "max_packet_size": (
        int,
        "the broker's largest MQTT packet in bytes: a message over it is dropped "
        "and counted instead of sent (a broker drops the connection on one, and it "
        "would be sent again after every reconnect). An MQTT 5 broker announces "
        "its own bound, which is used instead; set this for an MQTT 3.1.1 broker "
        "with a limit (default: 0, none assumed)",
    ),
    "status_interval": (
        float,
        "seconds between retained status updates (default: 60)",
    ),
    "max_awaiting": (
        int,
        "most escalations out at once without a verdict; the rest wait in the "
        "outbox (with --no-wait-verdicts too) and go out as verdicts come. Keep it "
        "under the broker's queue per re-scorer divided by the gateways that burst "
        "at once: mosquitto drops messages past max_queued_messages (default "
        "1000) after acknowledging them. 0 turns this off: every escalation is "
        "published at once, for a broker whose queue takes any burst, or a "
        "subscriber that sends no verdicts (default: 500)",
    ),
    "resend_after": (
        float,
        "seconds without any verdict, while some are awaited, after which the "
        "escalations the broker acknowledged and nobody answered are published "
        "again, a window at a time, and the window in use (--max-awaiting at "
        "first) is halved, then grown back by one per window of verdicts (the "
        "re-scorer answers a copy with the verdict it stored); the wait doubles, "
        "up to 300 s, after a round that brought none (default: 10)",
    ),
}


def _add_run(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="score flows and escalate over MQTT",
        description="Score a source's flows and escalate the doubtful ones.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        type=Path,
        help="TOML config file with the same settings; flags override it; one "
        "that is missing, unreadable or not TOML is a usage error, exit 2 "
        "(default: none)",
    )
    for name, text in _RUN_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, help=text)
    for name, (kind, text) in _RUN_NUMBERS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=text)
    _add_timezone(p, None, "(default: UTC, or timezone in --config)")
    p.add_argument(
        "--follow",
        action="store_const",
        const=True,
        help="tail a growing zeek: log, surviving rotation, until Ctrl-C (exit 130) "
        "or SIGTERM (exit as at the end of a file, e.g. 4 when lines were "
        "rejected) (default: read the file once)",
    )
    p.add_argument(
        "--wait-interface",
        dest="wait_interface",
        type=real(0.0),
        metavar="SECONDS",
        help="an iface: source whose interface is not there or not up yet at start "
        "(a boot where the agent comes first) is tried again every 0.25 s for this "
        "long, with one warning that it waits, while the broker is connected and "
        "the outbox replayed; still missing then: exit 3, as without a wait. A "
        "SIGTERM meanwhile stops the run with nothing read (exit 0); in --config: "
        "wait_interface (default: 0, no wait)",
    )
    p.add_argument(
        "--no-wait-verdicts",
        dest="wait_verdicts",
        action="store_const",
        const=False,
        help="at the end, do not wait for the last verdicts: the drain ends once "
        "every escalation was sent and acknowledged. --max-awaiting still holds "
        "back those past its window until verdicts come; any not sent by the end "
        "of the drain stay in the outbox for the next run (exit 6, as for any "
        "escalation left unsent) (default: wait for verdicts too, and exit 6 when "
        "some have not come by the end of the drain)",
    )
    p.set_defaults(func=cmd_run)


def _add_timezone(p: argparse.ArgumentParser, default: str | None, tail: str) -> None:
    """``--timezone``: as in ``flows inspect``/``convert``, for the source read."""
    p.add_argument(
        "--timezone",
        metavar="ZONE",
        type=zone_name,
        default=default,
        help="the time zone of flow-file times written without one, as an IANA "
        "name such as Europe/Prague: an Argus binetflow file's StartTime (a zeek: "
        "file read once may be any conn-family file) and a parquet: ts held as a "
        "timestamp without a zone; pcap, iface, followed zeek logs and stdin carry "
        f"epoch times and ignore it {tail}",
    )


def _add_calibrate(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="set site thresholds from benign flows",
        description="Set this site's thresholds from its own benign flows "
        f"({MIN_CALIBRATION_FLOWS} or more).",
        epilog=CALIBRATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--artifact",
        required=True,
        type=Path,
        help="artifact folder whose model scores the flows (required)",
    )
    p.add_argument(
        "--source",
        required=True,
        help="a file source of this site's flows: pcap:FILE, zeek:PATH or "
        "parquet:FILE (required)",
    )
    _add_timezone(p, "UTC", "(default: UTC)")
    p.add_argument(
        "--target-fpr",
        required=True,
        type=float,
        help="share of benign flows at or above the decision, e.g. 0.01: at "
        "most the highest tenth of them are alerted locally, the rest escalated; "
        "below "
        "the decision the next 1 %% (up to 2.5 %%, a tie group whole) are "
        "escalated too, so the teacher still sees what the student doubts "
        "(required)",
    )
    p.add_argument(
        "--out",
        help="file to write; an empty name is refused, exit 2 (default: "
        "site_thresholds.json in the artifact)",
    )
    p.set_defaults(func=cmd_calibrate)


def build_parser() -> argparse.ArgumentParser:
    """The ``edge-agent`` argument parser (with the bundle commands when present)."""
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more: -v for info, -vv for debug (default: warnings only)",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="errors only (default: warnings too)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_calibrate(sub)
    try:
        from edge_agent import bundle
    except ImportError:
        bundle = None
    if bundle is not None and hasattr(bundle, "register"):
        bundle.register(sub)

    # -v and -q also after the command (``edge-agent run -v``), as the other tools.
    for command in sub.choices.values():
        command.add_argument(
            "-v",
            "--verbose",
            action="count",
            default=argparse.SUPPRESS,
            help="log more: -v for info, -vv for debug (default: warnings only)",
        )
        command.add_argument(
            "-q",
            "--quiet",
            action="store_true",
            default=argparse.SUPPRESS,
            help="errors only (default: warnings too)",
        )
    return parser


# ---------------------------------------------------------------------------------
# run


class _AlertLog:
    """The alerts output (a file, or stdout for ``-``), turning a write failure (disk
    full, I/O error) into one error, and a reader that went away into one warning.

    The first failed write or flush is kept in :attr:`error`; in the thread that
    opened the output it raises :class:`GatewatchError` (exit 1), which stops the
    scoring loop, while in other threads (verdicts from the broker) the line is
    dropped so that the broker loop goes on. A closed pipe (``edge-agent run |
    head -1``) is no failure: the alert lines are only a view of what the agent
    does, so one warning names the output, no more lines are written, and scoring,
    escalating and draining go on to the run's own exit code. ``close`` never
    raises, and never closes stdout.

    A file holds whole JSON lines only: each line goes out in one unbuffered
    write, a write that fails part way (a full disk) is cut back to the line
    before it, and a file that ends in half a line (an earlier run's failure, or
    a crash) gets a newline before this run's first line, so that line is not
    glued onto the fragment and lost to a JSON-lines reader with it.
    """

    def __init__(self, target: str, stream: TextIO | None = None) -> None:
        self.target = target
        self.error: GatewatchError | None = None
        self.gone = False  # the reading end of a pipe was closed
        self._owned = stream is None
        self._file: Any = stream
        self._regular = False  # a regular file: what a failed write left is cut
        self._mend = False  # it ends in half a line: start this run with a newline
        if stream is None:
            self._file = open(target, "ab", buffering=0)
            self._regular, self._mend = _file_end(self._file, target)
        self._owner = threading.get_ident()

    @property
    def _name(self) -> str:
        return "stdout" if self.target == "-" else self.target

    def _failed(self, exc: OSError) -> None:
        if isinstance(exc, BrokenPipeError):
            self._reader_gone()
            return
        if self.error is None:
            reason = exc.strerror or str(exc)
            self.error = GatewatchError(
                f"cannot write alerts to {self._name}: {reason}"
            )
        if threading.get_ident() == self._owner:
            raise self.error from exc

    def _reader_gone(self) -> None:
        if self.gone:
            return
        self.gone = True
        logger.warning(
            "alerts output %s was closed by its reader (broken pipe); no more alert "
            "lines are written, scoring and escalating go on",
            self._name,
        )
        if not self._owned:
            # The lines still in stdout's buffer would fail again when Python
            # flushes it at exit (exit 120): let them go to /dev/null instead.
            try:
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, self._file.fileno())
                os.close(null)
            except (OSError, ValueError, io.UnsupportedOperation):
                pass

    def write(self, text: str) -> int:
        """Write ``text`` (one line, or several whole ones); nothing more is
        written once a write has failed."""
        if self.gone:
            return 0
        if self.error is not None:
            self._failed(OSError(self.error))
            return 0
        if not self._owned:
            try:
                return self._file.write(text)
            except OSError as exc:
                self._failed(exc)
                return 0

        data = text.encode("utf-8")
        if self._mend:
            data = b"\n" + data
        whole = self._size()
        try:
            _write_all(self._file, data)
        except OSError as exc:
            self._cut_back(whole)
            self._failed(exc)
            return 0
        self._mend = False
        return len(text)

    def _size(self) -> int | None:
        """The file's size now (where its last whole line ends), None when it is
        no regular file or cannot be asked."""
        if not self._regular:
            return None
        try:
            return os.fstat(self._file.fileno()).st_size
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            return None

    def _cut_back(self, whole: int | None) -> None:
        """Cut off what a failed write left of its line, back to ``whole`` bytes;
        when that fails too, the next run's newline mends the file."""
        if whole is None:
            return
        try:
            os.ftruncate(self._file.fileno(), whole)
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            logger.debug("alerts file %s: cutting back a half line failed", self._name)

    def flush(self) -> None:
        """Flush to the output (where a full disk or a closed pipe shows)."""
        if self.gone:
            return
        if self.error is not None:
            self._failed(OSError(self.error))
            return
        try:
            self._file.flush()
        except OSError as exc:
            self._failed(exc)

    def close(self) -> None:
        """Close the file (flush stdout); a failure is recorded, not raised."""
        try:
            if self._owned:
                self._file.close()
            elif not self.gone:
                self._file.flush()
        except BrokenPipeError:
            self._reader_gone()
        except OSError as exc:
            if self.error is None and not self.gone:
                reason = exc.strerror or str(exc)
                self.error = GatewatchError(
                    f"cannot write alerts to {self._name}: {reason}"
                )


def _file_end(handle: Any, path: str) -> tuple[bool, bool]:
    """Whether an alerts file opened for appending is a regular file, and whether
    it ends in half a line (not empty, and its last byte no newline). A file
    whose last byte cannot be read (write-only) is taken as whole."""
    try:
        info = os.fstat(handle.fileno())
    except OSError:
        return False, False
    if not stat.S_ISREG(info.st_mode):
        return False, False
    if info.st_size == 0:
        return True, False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True, False
    try:
        last = os.pread(fd, 1, info.st_size - 1)
    except OSError:
        last = b"\n"
    finally:
        os.close(fd)
    return True, last not in (b"\n", b"")


def _write_all(handle: Any, data: bytes) -> None:
    """Write all of ``data`` to an unbuffered file; a write that takes nothing
    (no room left) is an OSError, as a full disk's ENOSPC is."""
    view = memoryview(data)
    while view:
        written = handle.write(view)
        if not written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def _open_alerts(target: str | None):
    if target in (None, ""):
        return None, False
    if target == "-":
        return _AlertLog("-", sys.stdout), True
    try:
        return _AlertLog(target), True
    except OSError as exc:
        # Exit 1, as for an alerts file whose writes fail later (see EPILOG).
        reason = exc.strerror or str(exc)
        raise GatewatchError(f"cannot open alerts file {target}: {reason}") from exc


def _read_thresholds(path: str, model_version: str | None) -> dict[str, float]:
    """``escalate_low`` and ``alert`` (and ``decision``) from a thresholds file."""
    from edge_agent.agent import read_thresholds_file

    # BadInputError (exit 3) naming the file; also when calibrated for another model.
    return read_thresholds_file(path, model_version)


def _model_updater(cfg, scorer) -> Any:
    """The OTA hook of :mod:`edge_agent.ota`, when a public key is configured."""
    try:
        from edge_agent.ota import ModelUpdater
    except ImportError as exc:
        raise UsageError(
            "update_public_key is set but edge_agent.ota is not installed"
        ) from exc
    return ModelUpdater(
        public_key=Path(cfg.update_public_key),
        artifact=Path(cfg.artifact),
        current_version=scorer.model_version,
        site=cfg.site,
        gateway=cfg.gateway,
    )


class _Reloads:
    """SIGHUP's model reloads (``systemctl reload``, e.g. after ``edge-agent
    rollback``), run one at a time in a thread of their own so the signal never
    waits on a batch being scored; signals that come during a load ask for one
    more load after it. :meth:`finish` puts the replaced handler back and waits for
    a load in flight: a process that exits while the runtime builds a session
    aborts in the runtime's own threads."""

    def __init__(self, agent: Any, artifact: str) -> None:
        self.agent = agent
        self.artifact = artifact
        self.wanted = False
        # Taken by the handler and the worker only; reentrant, as a signal may
        # come while the handler itself holds it.
        self.lock = threading.RLock()
        self.worker: threading.Thread | None = None
        self.previous: Any = None
        self.installed = False

    def install(self) -> None:
        """Make SIGHUP ask for a reload (where the platform has SIGHUP)."""
        if not hasattr(signal, "SIGHUP"):
            return
        self.previous = signal.getsignal(signal.SIGHUP)
        signal.signal(signal.SIGHUP, self.request)
        self.installed = True

    def request(self, *_: Any) -> None:
        with self.lock:
            self.wanted = True
            if self.worker is None or not self.worker.is_alive():
                self.worker = threading.Thread(
                    target=self._work, name="model-reload", daemon=True
                )
                self.worker.start()

    def _work(self) -> None:
        while True:
            with self.lock:
                if not self.wanted:
                    return
                self.wanted = False
            self.agent.reload_model(self.artifact)

    def finish(self, wait_s: float = RELOAD_WAIT_S) -> None:
        """Give SIGHUP back to the handler it had and wait up to ``wait_s``
        seconds for a reload in flight (asked-for ones that did not start are
        dropped: the run is over)."""
        if not self.installed:
            return
        signal.signal(signal.SIGHUP, self.previous)
        self.installed = False
        with self.lock:
            self.wanted = False
            worker = self.worker
        if worker is None:
            return
        worker.join(wait_s)
        if worker.is_alive():
            logger.warning(
                "a model reload of %s still runs after %g s; the agent exits "
                "without it", self.artifact, wait_s,
            )


def _let_go(lock: int | None) -> None:
    """Let another agent take the MQTT client id this run held (its lock's
    descriptor, from :func:`edge_agent.agent.claim_client_id`)."""
    if lock is not None:
        os.close(lock)


def cmd_run(args: argparse.Namespace) -> int:
    """``edge-agent run``."""
    from edge_agent.agent import Agent, claim_client_id, client_id
    from edge_agent.config import AgentConfig
    from edge_agent.mqtt import MqttLink, redact_url
    from edge_agent.outbox import Outbox
    from edge_agent.runtime import load_artifact
    from edge_agent.sources import open_source

    overrides = {k: getattr(args, k, None) for k in AgentConfig.names()}
    cfg = AgentConfig.load(args.config, overrides)
    scorer = load_artifact(cfg.artifact)
    if cfg.capture_filter and not str(cfg.source).startswith("iface:"):
        raise UsageError("--capture-filter applies to iface:NAME sources only")
    source = open_source(cfg.source, follow=cfg.follow, timezone=cfg.timezone,
                         max_flows=cfg.max_flows,
                         bpf=capture_filter(cfg.capture_filter, cfg.broker),
                         wait_interface=cfg.wait_interface)
    _check_fit(scorer, source, cfg.artifact)
    thresholds = (
        _read_thresholds(cfg.thresholds, scorer.model_version)
        if cfg.thresholds
        else None
    )
    # Read now, so that a bad password file is refused before anything is opened.
    password = cfg.secret() if cfg.broker else None
    # A SIGTERM or Ctrl-C from here until the run's own handlers are in place is
    # held, not raised between two steps of opening the outbox (a new file cut off
    # half made would be refused as damaged by the next run); acted on below.
    entry.hold_stops()
    alerts, close_alerts = _open_alerts(cfg.alerts)
    # Locked for the run (OUTBOX.lock), before the broker is connected: a second
    # run on this outbox is refused, exit 2, instead of sharing it.
    outbox = Outbox(cfg.outbox_path(), cfg.outbox_max,
                    keep_sent=max(RESEND_WINDOW, 2 * cfg.max_awaiting)
                    if cfg.broker else 0, lock=True)
    client_lock: int | None = None
    try:
        dropped_before = outbox.dropped  # the outbox counts its cap's drops for good
        agent = Agent(
            scorer,
            site=cfg.site,
            gateway=cfg.gateway,
            outbox=outbox,
            alerts=alerts,
            max_batch=cfg.max_batch,
            max_wait_ms=cfg.max_wait_ms,
            max_hosts=cfg.max_hosts,
            thresholds=thresholds,
            status_interval=cfg.status_interval,
            # Flow control holds with --no-wait-verdicts too (that only ends the
            # drain without the last verdicts); 0 turns it off.
            max_awaiting=cfg.max_awaiting or None,
            resend_after=cfg.resend_after,
            thresholds_from=cfg.thresholds,
        )
        if cfg.broker:
            # Held for the run, before the broker is connected: a second agent
            # on this host with this client id is refused, exit 2, instead of
            # the two kicking each other off the broker.
            client_lock = claim_client_id(client_id(cfg.site, cfg.gateway))
            agent.link = MqttLink(
                cfg.broker,
                client_id(cfg.site, cfg.gateway),
                username=cfg.username,
                password=password,
                tls=cfg.tls(),
                keepalive=cfg.keepalive,
                protocol=cfg.protocol,
                will=agent.will(),
                session_expiry=cfg.session_expiry,
                max_packet_size=cfg.max_packet_size or None,
            )
    except BaseException:
        # Refused before the run (thresholds, broker settings): the outbox and
        # its lock are let go at once, not at exit.
        outbox.close()
        _let_go(client_lock)
        raise
    stop = threading.Event()
    interrupted = threading.Event()
    draining = threading.Event()  # set while the end-of-input drain runs

    def on_sigterm(*_) -> None:
        stop.set()
        if source.kind == "iface":
            source.end.set()  # the open connections are ended and scored

    signal.signal(signal.SIGTERM, on_sigterm)
    previous_sigint = signal.getsignal(signal.SIGINT)
    reloads = _Reloads(agent, cfg.artifact)
    reloads.install()
    # Errors of the source are kept and raised after the flows before them were
    # scored (a live source is read in a worker thread, a file one in batches).
    source.capture_errors = True

    def on_sigint(*_) -> None:
        # A followed log ends once it has yielded what the file holds now, so what
        # was read is scored; other live sources, or a second Ctrl-C, stop at once.
        # The exit code says it was interrupted either way (130). One during the
        # drain stops the drain at once.
        if draining.is_set():
            interrupted.set()
            raise KeyboardInterrupt
        if interrupted.is_set() or source.kind != "zeek":
            stop.set()
        interrupted.set()
        source.end.set()

    if not source.finite:
        signal.signal(signal.SIGINT, on_sigint)

    def on_link_failed(_exc) -> None:
        # A broker that came back and refused us will not change its mind: stop as
        # SIGTERM would, and exit 6 below with its reason.
        stop.set()
        source.end.set()

    agent.on_link_failed = on_link_failed
    held = entry.release_stops()
    if held is not None:
        # Stopped before anything was read: let everything go as it was opened.
        signal.signal(signal.SIGINT, previous_sigint)
        reloads.finish()
        outbox.close()
        _let_go(client_lock)
        if close_alerts:
            alerts.close()
        if held == signal.SIGINT:
            raise KeyboardInterrupt
        raise entry.StoppedWhileStarting
    failure: GatewatchError | None = None
    started = time.monotonic()
    drained = False
    drain_for = cfg.drain_timeout
    try:
        if not source.finite:
            # Read (a capture opened) while the broker is tried, not after.
            agent.begin_live(source, stop)
        agent.start(cfg.connect_timeout)
        if cfg.update_public_key:
            agent.enable_model_updates(_model_updater(cfg, scorer))
        try:
            if source.finite:
                agent.run_file(source, stop)
            else:
                agent.run_live(source, stop)
        except GatewatchError as exc:
            failure = exc  # what was read before the damage is scored and kept
        except KeyboardInterrupt:
            interrupted.set()
            stop.set()
        if failure is None and source.error is not None:
            failure = source.error
        drain_for = (
            cfg.drain_timeout if not (stop.is_set() or interrupted.is_set())
            else STOP_DRAIN_S
        )
        draining.set()
        drain_began = time.monotonic()
        # A SIGTERM that comes during the drain cuts it to STOP_DRAIN_S from then.
        drained = agent.drain(drain_for, wait_verdicts=cfg.wait_verdicts,
                              stop=stop, stop_within=STOP_DRAIN_S)
        if stop.is_set() and drain_for > STOP_DRAIN_S:
            drain_for = round(time.monotonic() - drain_began, 1)  # as it was
    except KeyboardInterrupt:
        interrupted.set()  # a second Ctrl-C during the drain: stop draining
    finally:
        draining.clear()
        # The run's work is over: a SIGTERM or Ctrl-C from now on (the summary
        # line printed) does not change its exit code (edge_agent.entry).
        entry.settle()
        signal.signal(signal.SIGINT, previous_sigint)
        reloads.finish()
        summary = agent.summary()
        # Whether the broker was still connected as the drain ended (closing the
        # link disconnects it): a connection lost on the way explains what was
        # not sent better than "no subscriber".
        link_up = agent.link is not None and agent.link.connected
        agent.close()
        _let_go(client_lock)
        if close_alerts:
            alerts.close()
    summary["source_rejected"] = dict(source.rejected)
    # Flows kept as unlabeled whose label no table names (noted once in the log).
    summary["source_unknown_labels"] = source.unknown_labels
    # Records with no IP flow (Argus management records): not damage, skipped.
    summary["source_non_ip"] = getattr(source, "non_ip", 0)
    # What a capture's flow meter could not keep whole (each warned once as well):
    # connections ended early by a full table (--max-flows), each still scored as
    # a flow, and packets libpcap or the interface dropped before the meter.
    summary["flows_evicted"] = source.meter_counts.get("evicted", 0)
    summary["packets_dropped"] = source.meter_counts.get("dropped", 0)
    summary["outbox_dropped_now"] = _dropped_now(
        summary, dropped_before, agent.delivered_after_drop_alerts)
    summary["seconds"] = round(time.monotonic() - started, 3)
    summary["drained"] = drained
    summary_error = _report(summary, cfg.summary_json, broker=bool(cfg.broker))
    try:
        if interrupted.is_set():
            print(
                f"error: interrupted; {summary['outbox_pending']} escalations kept in "
                f"the outbox {cfg.outbox_path()}",
                file=sys.stderr,
            )
            if summary_error is not None:
                print(f"warning: {summary_error}", file=sys.stderr)
            return EXIT_INTERRUPTED
        if failure is not None:
            from flows.meter.live import CaptureFailedError

            if not summary["flows"] and isinstance(failure, CaptureFailedError):
                # The capture worked, then failed: partial input (exit 4) still.
                raise CaptureFailedError(f"{failure}; no flow was read before it")
            raise _as_partial(failure, summary["flows"])
        if agent.link_error is not None:
            raise TransportError(
                f"{agent.link_error}; stopped, {summary['outbox_pending']} escalations "
                f"stay in the outbox {cfg.outbox_path()}"
            )
        # SIGTERM (stop, not interrupted) ends the run as the end of its input would:
        # rejected lines are still exit 4, as documented in EPILOG.
        input_error = _input_problem(
            cfg.source, source, summary["flows"], summary["bad_records"],
            agent.first_bad_record,
        )
        if input_error is not None:
            raise input_error
        if close_alerts and alerts.error is not None:
            raise alerts.error
        if agent.outbox_error is not None:
            raise OutboxError(
                _outbox_failed_text(summary, agent.outbox_error, alerts is not None)
            )
        if sum((summary.get("outbox_dropped_now") or {}).values()) > 0:
            raise OutboxCapError(
                _cap_loss(summary, cfg.outbox_max, cfg.outbox_path()))
        if summary.get("dropped_oversized"):
            from edge_agent.protocol import MAX_PAYLOAD_BYTES

            limit = agent.link.packet_limit if agent.link is not None else None
            bound = f"the protocol's {MAX_PAYLOAD_BYTES}-byte cap" + (
                f" or the broker's packet limit ({limit} bytes)" if limit else "")
            lines = (
                "their alert lines are in the alerts output"
                if alerts is not None
                else "no alert line records them, as --alerts is empty"
            )
            raise TransportError(
                f"{summary['dropped_oversized']} escalations were larger than {bound} "
                f"and were dropped, not sent; {lines} (a record with a huge text "
                "field, or a --max-packet-size set too low)"
            )
        if summary.get("outbox_damaged"):
            raise OutboxError(
                f"{summary['outbox_damaged']} escalations of an earlier run were "
                f"damaged in the outbox {cfg.outbox_path()} and were not sent: set "
                "aside in its 'damaged' table (sqlite3 OUTBOX 'SELECT id, reason "
                "FROM damaged'); their alert lines, if any, were written then"
            )
        shown = redact_url(cfg.broker) if cfg.broker else None  # no password
        # Only those the broker never took: sent ones queued to go out again
        # await their verdicts, as the checks below them say.
        unsent = summary["outbox_unsent"]
        if cfg.broker and unsent:
            raise TransportError(_not_sent(
                summary, cfg, drain_for, shown=shown, link_up=link_up,
                never_up=agent.link is not None and agent.link.generation == 0,
            ))
        lost_sessions = summary.get("broker_sessions_lost", 0)
        if not drained and cfg.wait_verdicts and lost_sessions and summary[
                "verdicts_awaited"]:
            raise TransportError(
                f"the broker {shown} lost this gateway's MQTT session "
                f"{lost_sessions} time(s) during the run (restarted without its saved "
                f"state, or the session expired); {summary['escalations_requeued']} "
                "escalations were published again, and "
                f"{summary['verdicts_awaited']} still got no verdict within the "
                f"{drain_for:g} s drain (the newest {RESEND_WINDOW} unanswered ones "
                "are kept and sent again after the next such loss)"
            )
        awaited = summary["verdicts_awaited"]
        if not drained and cfg.broker and cfg.wait_verdicts and awaited:
            if not stop.is_set():
                raise TransportError(_unanswered(summary, agent, drain_for))
            # SIGTERM: an orderly stop drains for 2 s only; verdicts sent later wait
            # in this gateway's MQTT session, so the stop itself is no failure.
            print(
                f"warning: stopped with {awaited} escalations still without a verdict; "
                "verdicts sent later wait in this gateway's MQTT session for the next "
                "run",
                file=sys.stderr,
            )
        rejected = agent.unanswered_rejections()
        if rejected:  # --no-wait-verdicts: not awaited, but known
            print(f"warning: {_rejections(rejected)}", file=sys.stderr)
    except GatewatchError:
        # The run's own failure is the error line; the summary's, a warning.
        if summary_error is not None:
            print(f"warning: {summary_error}", file=sys.stderr)
        raise
    if summary_error is not None:
        raise summary_error
    return EXIT_OK


def _outbox_failed_text(
    summary: dict, error: Exception, alert_log: bool = True
) -> str:
    """Why the run exits 6 after the outbox refused writes: how many escalations
    were dropped, and of them which left an alert line and which no record (none
    did without an alert log: ``alert_log`` False, ``--alerts ""``); how many it
    could not remove once sent or answered (they stay and go out again). Only
    what happened is named: nothing is called dropped when none was."""
    lost = summary["outbox_failed"]
    stuck = summary.get("outbox_unforgotten") or 0
    if not lost:
        if not stuck:
            return f"the outbox refused a read or a write: {error}"
        return f"{_unforgotten_text(summary)} (last error: {error}){_AGAIN}"
    alerts = summary.get("outbox_failed_alerts", 0)
    uncertain = lost - alerts
    if not alert_log:
        counts = " and ".join(
            f"{n} {what}"
            for n, what in ((alerts, "alerts"), (uncertain, "uncertain escalations"))
            if n
        )
        kinds = (
            f" ({counts}; no record of them is left: with --alerts empty no alert "
            "lines are written)"
            if counts
            else ""
        )
    else:
        parts = []
        if alerts:
            parts.append(f"{alerts} alerts, whose alert lines are in the alert log")
        if uncertain:
            parts.append(
                f"{uncertain} uncertain escalations, of which no record is left"
            )
        kinds = f" ({', and '.join(parts)})" if parts else ""
    stuck_text = f"; {_unforgotten_text(summary)}{_AGAIN}" if stuck else ""
    return (
        f"{lost} escalations were dropped because the outbox could not store "
        f"them{kinds}{stuck_text}; last error: {error}"
    )


# What becomes of escalations the outbox could not remove, for the error line.
_AGAIN = (
    "; they stay in it and are sent again by the next run, as duplicates the "
    "re-scorer answers again"
)


def _unforgotten_text(summary: dict) -> str:
    """``N answered escalations could not be removed from the outbox``, naming
    those the broker took and no re-scorer answered yet when there are some."""
    stuck = summary.get("outbox_unforgotten") or 0
    answered = summary.get("outbox_unforgotten_answered") or 0
    if answered >= stuck:
        what = f"{stuck} answered escalations"
    elif not answered:
        what = f"{stuck} escalations the broker acknowledged"
    else:
        what = (f"{stuck} escalations the broker acknowledged ({answered} of them "
                "answered)")
    return f"{what} could not be removed from the outbox"


def _not_sent(
    summary: dict, cfg: Any, drain_for: float, *, shown: str | None,
    link_up: bool, never_up: bool,
) -> str:
    """The exit 6 error for escalations the broker never took by the end of the
    drain (``outbox_unsent``; sent ones queued to go out again are not among
    them): how many, why, and that the outbox keeps them. ``never_up``: the
    broker never answered; ``link_up``: connected as the drain ended."""
    unrouted = (
        f" (the broker took {summary['unrouted']} publishes with \"no matching "
        "subscribers\": no re-scorer was subscribed, so they were kept)"
        if summary.get("unrouted")
        else ""
    )
    if never_up:
        why = f"the broker {shown} did not answer during the run"
    elif not link_up:
        why = (
            f"the connection to the broker {shown} was lost during "
            f"the run and was not back within the {drain_for:g} s drain"
        )
    elif not unrouted and _window_full(summary):
        why = _held_back(summary, cfg, drain_for)
    else:
        why = (
            f"not delivered to a subscriber within the {drain_for:g} s "
            f"drain{unrouted}"
        )
    return (
        f"{summary['outbox_unsent']} escalations were not sent ({why}); they stay "
        f"in the outbox {cfg.outbox_path()} and are sent by the next run"
        f"{_also_awaited(summary)}"
    )


def _window_full(summary: dict) -> bool:
    """Whether flow control held new escalations back as the run ended: the
    window (``--max-awaiting``, halved after re-sends) was all taken by sent
    ones still without a verdict."""
    window, out = summary.get("awaiting_window"), summary.get("awaiting_out")
    return window is not None and out is not None and out >= window > 0


def _held_back(summary: dict, cfg: Any, drain_for: float) -> str:
    """Why escalations were not sent when the flow control window was full:
    how many sent ones took it, and its size now against ``--max-awaiting``."""
    window = summary["awaiting_window"]
    size = (
        f"at most --max-awaiting {cfg.max_awaiting} are out at once"
        if window >= cfg.max_awaiting
        else f"at most {window} are out at once now: --max-awaiting "
        f"{cfg.max_awaiting}, halved as sent ones were published again for want "
        "of an answer"
    )
    return (
        f"held back while {summary['awaiting_out']} sent ones waited for "
        f"verdicts{_earlier_awaited(summary, cfg)} ({size}), and the "
        f"{drain_for:g} s drain ended first"
    )


def _also_awaited(summary: dict) -> str:
    """The sent escalations still without a verdict, for the end of the error
    about unsent ones (counted apart: none is in both counts); empty if none."""
    awaited = summary.get("verdicts_awaited") or 0
    if not awaited:
        return ""
    return f"; apart from them, {awaited} sent ones still await a verdict"


def _earlier_awaited(summary: dict, cfg: Any) -> str:
    """Of the escalations a run's window waits on, those an earlier run sent, and
    how they clear: a note for the hold-back message, empty when there are none.
    The outbox keeps them until a verdict comes, so the next run awaits them too
    and publishes them again when no answer comes for ``--resend-after`` s."""
    earlier = summary.get("verdicts_awaited_earlier") or 0
    if not earlier:
        return ""
    return (
        f", {earlier} of them sent by an earlier run and kept in the outbox until "
        "their verdicts arrive (the re-scorer answers them; unanswered ones are "
        f"published again after {cfg.resend_after:g} s without an answer, "
        "--resend-after)"
    )


def _unanswered(summary: dict, agent: Any, drain_for: float) -> str:
    """Why the run exits 6 with escalations still without a verdict: how many,
    and the rejections the re-scorer sent for some of them."""
    text = (
        f"{summary['verdicts_awaited']} escalations got no verdict within the "
        f"{drain_for:g} s drain"
    )
    rejected = agent.unanswered_rejections()
    if rejected:
        return f"{text}; {_rejections(rejected)}"
    resent = summary.get("escalations_requeued", 0)
    again = f"; {resent} were published again after answers stopped" if resent else ""
    return (
        f"{text}{again}: no re-scorer answered them in time (is teacher serve "
        "running and keeping up? --drain-timeout waits longer). "
        f"{_kept(summary, agent)}"
    )


def _kept(summary: dict, agent: Any) -> str:
    """What the outbox keeps of the escalations still without a verdict, for the
    exit 6 error: those the next run awaits, and those past the sent table's
    ``keep_sent`` newest, which no run can send again."""
    awaited = summary["verdicts_awaited"]
    kept = summary.get("verdicts_awaited_kept")
    later = (
        "the next run with this outbox awaits them and publishes them again when "
        "no verdict comes (--resend-after)"
    )
    if kept is None or kept >= awaited:
        return f"The outbox keeps the unanswered ones: {later}"
    gone = awaited - kept
    return (
        f"The outbox keeps {kept} of the {awaited}: {later}. It could not keep the "
        f"other {gone} (it keeps only the newest {agent.outbox.keep_sent} sent and "
        "unanswered escalations; --max-awaiting holds the rest back unsent, and "
        "0 turns that off): they are lost unless the broker still delivers them "
        "to a re-scorer"
    )


def _rejections(rejected: list[tuple[str, str, str]]) -> str:
    """One clause: how many escalations a re-scorer rejected, and why (the
    first reason's detail; a window shape names the likely cause)."""
    from edge_agent.protocol import RejectKind

    reasons: dict[str, int] = {}
    for reason, _, _ in rejected:
        reasons[reason] = reasons.get(reason, 0) + 1
    counts = ", ".join(f"{n} {reason}" for reason, n in reasons.items())
    reason, detail, teacher = rejected[0]
    text = (
        f"a re-scorer rejected {len(rejected)} escalations and sent no verdict "
        f"for them ({counts}; the first: {reason}: {detail}, teacher {teacher})"
    )
    if RejectKind.WRONG_WINDOW_SHAPE.value in reasons:
        text += (
            "; a re-scorer serving a teacher of another window shape takes a "
            "share of this broker's escalations (teacher alerts --rejected on "
            "its store lists them)"
        )
    return text


def _dropped_now(
    summary: dict, before: dict[str, int], reached_alerts: int
) -> dict[str, int]:
    """``outbox_dropped_now``: the escalations the outbox cap dropped in this run
    and lost, by decision. The cap's drops in this run (``outbox_dropped`` less
    ``before``, the file's count at open) less those it took out of the file while
    they were with the link, which the broker acknowledged all the same
    (``delivered_after_drop``, of them ``reached_alerts`` alerts)."""
    reached = {
        "alert": reached_alerts,
        "escalate": (summary.get("delivered_after_drop") or 0) - reached_alerts,
    }
    return {
        kind: max(0, count - before.get(kind, 0) - reached.get(kind, 0))
        for kind, count in (summary.get("outbox_dropped") or {}).items()
    }


def _cap_loss(summary: dict, outbox_max: int, path: Any) -> str:
    """The exit 6 error for escalations the outbox cap dropped in this run: those
    lost (``outbox_dropped_now``), and those dropped from the file after they
    reached the broker (``delivered_after_drop``), which are not lost."""
    lost = sum((summary.get("outbox_dropped_now") or {}).values())
    reached = summary.get("delivered_after_drop") or 0
    delivered = (
        f" ({reached} more were dropped from the file while already in flight and "
        "reached the broker)"
        if reached
        else ""
    )
    return (
        f"{lost} escalations were dropped by the outbox cap (outbox_max "
        f"{outbox_max}) in this run and are lost{delivered}; "
        f"{summary['outbox_pending']} stay in the outbox {path}"
    )


class OutboxCapError(GatewatchError):
    """Escalations the outbox's cap (``--outbox-max``) dropped in this run: exit 6.

    The cap keeps the outbox file bounded while the broker or the re-scorer is
    away, and it does so by losing escalations (uncertain ones first, see
    :mod:`edge_agent.outbox`); a run that lost some is not a clean one, like a run
    whose escalations the outbox could not store.
    """

    exit_code = EXIT_UNAVAILABLE


def _kept_before(flows: int) -> str:
    """What became of the flows read before damage, for the end of an error line:
    ``the 3 flows read before it were scored and kept``."""
    if flows == 1:
        return "the 1 flow read before it was scored and kept"
    return f"the {flows} flows read before it were scored and kept"


def _scored(flows: int) -> str:
    """What became of the flows read, for the end of an error line about input
    rejected along the way: ``the 3 flows read were scored and kept``."""
    if flows == 1:
        return "the 1 flow read was scored and kept"
    return f"the {flows} flows read were scored and kept"


def _as_partial(
    exc: GatewatchError, flows: int, kept: str | None = None
) -> GatewatchError:
    """A bad-input error after some flows were scored is a partial input (exit 4);
    ``kept`` says what became of them (default: :func:`_kept_before`)."""
    if flows and isinstance(exc, BadInputError):
        new = PartialInputError(
            f"{str(exc)[len(exc._where()) :]}; {kept or _kept_before(flows)}",
            path=exc.path,
            line=exc.line,
            column=exc.column,
            offset=exc.offset,
            row=getattr(exc, "row", None),
        )
        new.__cause__ = exc
        return new
    return exc


def _check_fit(scorer, source, artifact: str) -> None:
    """Refuse an artifact whose encoder reads fields the agent's records never hold.

    Every source of the agent gives conn records (``flows.record.CONN_FIELDS``: a
    capture, an interface, a conn.log, and stdin or Parquet records cut down to
    those fields); an artifact made from NSL-KDD or UNSW records would refuse every
    flow and leave the gateway blind while looking busy, so it is refused at start.
    It is unusable on every source of the agent, whatever named it: a failure
    (exit 1), as ``edge-agent bundle``, ``flash`` and a model update refuse it
    (:func:`edge_agent.ota.health_check`), not a usage error.
    """
    from edge_agent.sources import artifact_problem
    from flows.errors import ModelError

    problem = artifact_problem(scorer.encoder, source.kind)
    if problem is not None:
        raise ModelError(f"the artifact {artifact} {problem}")


def _input_problem(
    spec: str,
    source,
    flows: int,
    bad_records: int = 0,
    first_bad: str | None = None,
) -> BadInputError | None:
    """Exit 3 when a source (run to its end, or stopped by SIGTERM) gave no usable
    flow, 4 when some of its input was rejected; None when all was well.

    ``bad_records`` are records the source gave that the artifact's encoder refused
    (counted by the agent); they are rejected input like a bad line.
    """
    from edge_agent.sources import STDIN_EXPECTED, damage_sentence

    rejected = sum(source.rejected.values())
    damage = getattr(source, "damage", None) or []
    if flows and not rejected and not damage and not bad_records:
        return None
    where = "stdin" if source.kind == "stdin" else spec
    if bad_records and not rejected and not damage:
        why = f"{bad_records} flow record(s) of {where} were refused by the " + (
            f"artifact's encoder (the first: {first_bad})"
        )
        if not flows:
            return BadInputError(f"no usable flow was read: {why}")
        return PartialInputError(f"{why}; {_scored(flows)}")
    if damage:
        said = damage_sentence(damage)
        if not flows:
            from edge_agent.sources import no_flow_hint

            return BadInputError(
                f"no usable flow was read: {said}; {no_flow_hint(source.kind, damage)}",
                path=spec,
            )
        if any(found.stopped for found in damage):
            kept = _kept_before(flows)
        else:  # damaged packets a capture read went on past: no stop part way
            them = "it" if sum(found.records for found in damage) == 1 else "them"
            kept = f"the read went on past {them}; {_scored(flows)}"
        return PartialInputError(f"{said}; {kept}", path=spec)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(source.rejected.items()))
    first = f"; the first: {source.first_rejected}" if source.first_rejected else ""
    if not flows:
        if not rejected and source.kind != "stdin":
            return None  # an empty log file is no error (a quiet day)
        if not rejected and source.lines == 0:
            # A restart given no new input only replays and drains its outbox.
            logger.info("stdin held no lines; only the outbox was replayed")
            return None
        held = f"{rejected} line(s) rejected ({counts}){first}" if rejected else (
            f"it held {source.lines} blank line(s)"
        )
        expected = (
            STDIN_EXPECTED if source.kind == "stdin" else f"flow records in {spec}"
        )
        said = "" if expected in held else f"; {expected}"  # not twice in a line
        return BadInputError(f"no usable flow record was read from {where}: {held}"
                             f"{said}")
    return PartialInputError(
        f"{rejected} input line(s) of {where} were rejected ({counts}){first}; "
        f"{_scored(flows)}"
    )


def _kinds(counts: dict[str, int]) -> str:
    """``{"malformed_json": 8, "oversized": 1}`` as ``malformed_json 8,
    oversized 1``."""
    return ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items()))


def _queue_split(summary: dict[str, Any]) -> str:
    """After ``outbox pending N`` in the summary line: which of them were never
    sent and which were sent and put back to be published again (those are
    counted among the escalations awaiting a verdict, too); empty when none
    was put back, as then all of them are unsent."""
    requeued = summary.get("outbox_requeued") or 0
    if not requeued:
        return ""
    return (
        f" (not sent yet {summary.get('outbox_unsent') or 0}, sent and queued to "
        f"be published again {requeued})"
    )


def _report(
    summary: dict[str, Any], path: str | None, broker: bool = True
) -> GatewatchError | None:
    """Print the ``summary:`` line (and the outbox cap's warning) on stderr and
    write the JSON to ``path``; the error writing it, if any. ``broker`` False is
    an offline run, whose escalations wait in the outbox for a run with one."""
    awaited = summary.get("verdicts_awaited") or 0
    kept = summary.get("verdicts_awaited_kept")
    requeued = summary.get("outbox_requeued") or 0
    among = f"; the {requeued} queued again among them" if requeued else ""
    lost = sum((summary.get("outbox_dropped_now") or {}).values())
    reached = summary.get("delivered_after_drop") or 0
    print(
        "summary: flows {flows}, benign {benign}, escalate {escalate}, alert {alert}, "
        "escalations sent {escalations_sent}, verdicts received {verdicts_received}, "
        "outbox pending {outbox_pending}".format(**summary)
        + (
            f", no broker given: {summary['outbox_pending']} escalations kept in the "
            "outbox for a run with --broker"
            if not broker and summary.get("outbox_pending")
            else ""
        )
        + _queue_split(summary)
        + (
            ", sent and still awaiting a verdict (kept in the outbox for the next "
            f"run{among}) {awaited}"
            if awaited and (kept is None or kept >= awaited)
            else ""
        )
        + (
            f", sent and still awaiting a verdict {awaited} (kept in the outbox for "
            f"the next run {kept}, not kept {awaited - kept}{among})"
            if awaited and kept is not None and kept < awaited
            else ""
        )
        + (
            f", teacher verdicts malicious {summary.get('verdicts_malicious', 0)}, "
            f"benign {summary.get('verdicts_benign', 0)}"
            if summary.get("verdicts_received") or summary.get("verdicts_unmatched")
            else ""
        )
        + (
            ", escalations sent again for flows read again (each answered once) "
            f"{summary['escalations_resent']}"
            if summary.get("escalations_resent")
            else ""
        )
        + (
            ", sent escalations published again from the outbox (no verdict came "
            "in time, or the broker lost this gateway's session) "
            f"{summary['escalations_requeued']}"
            if summary.get("escalations_requeued")
            else ""
        )
        + (
            ", flows read again while their escalation waited in the outbox (merged "
            f"with it) {summary['escalations_merged']}"
            if summary.get("escalations_merged")
            else ""
        )
        + (
            f", dropped as too large to send {summary['dropped_oversized']}"
            if summary.get("dropped_oversized")
            else ""
        )
        + (
            f", set aside as damaged in the outbox {summary['outbox_damaged']}"
            if summary.get("outbox_damaged")
            else ""
        )
        + (
            f", dropped as the outbox could not store them {summary['outbox_failed']}"
            if summary.get("outbox_failed")
            else ""
        )
        + (
            ", sent but not removed from the outbox (sent again next run) "
            f"{summary['outbox_unforgotten']}"
            if summary.get("outbox_unforgotten")
            else ""
        )
        + (
            f", dropped by the outbox cap {lost}"
            + (f" (and {reached} more that reached the broker first)"
               if reached else "")
            if lost or reached
            else ""
        )
        + (
            f", local alerts overruled as benign by the re-scorer "
            f"{summary['alerts_overruled']}"
            if summary.get("alerts_overruled")
            else ""
        )
        + (
            ", verdicts for escalations an earlier run sent "
            f"{summary['verdicts_unmatched']}"
            if summary.get("verdicts_unmatched")
            else ""
        )
        + (
            ", unexpected verdicts (for an earlier run's escalation past the "
            "outbox's kept window, forged, or contradicting a first answer; the log "
            f"names the first) {summary['verdicts_unexpected']}"
            if summary.get("verdicts_unexpected")
            else ""
        )
        + (
            f", rejected by the re-scorer {summary['rejections_received']}"
            if summary.get("rejections_received")
            else ""
        )
        + (
            ", messages rejected as malformed (answers from the broker this agent "
            "could not read, or an escalation it could not encode; the log names "
            f"the first of each kind: {_kinds(summary['rejected'])}) "
            f"{sum(summary['rejected'].values())}"
            if summary.get("rejected")
            else ""
        )
        + (
            ", connections ended early as the connection table was full "
            f"(--max-flows) {summary['flows_evicted']}"
            if summary.get("flows_evicted")
            else ""
        )
        + (
            ", packets dropped by the capture before the flow meter "
            f"{summary['packets_dropped']}"
            if summary.get("packets_dropped")
            else ""
        ),
        file=sys.stderr,
    )
    if lost or reached:
        also = f", and {reached} more that reached the broker first" if reached else ""
        print(
            f"warning: the outbox was full ({lost} escalations dropped by its cap "
            f"and lost in this run, by kind: {summary['outbox_dropped_now']}{also}); "
            "raise --outbox-max, or check that the broker and re-scorer keep up",
            file=sys.stderr,
        )
    if path:
        try:
            Path(path).write_text(json.dumps(summary, indent=2) + "\n")
        except OSError as exc:
            return GatewatchError(_unwritable(path, exc, "the summary"))
    return None


def _folder_problem(path: str | Path) -> str | None:
    """Why the folder of ``path`` cannot hold a new file (a file where a folder
    should be, or a folder that does not exist), or None when it is a folder."""
    parent = Path(path).parent
    above = nearest_existing(parent)
    if not above.is_dir():
        return f"{above} is a file, not a folder"
    return None if above == parent else f"the folder {parent} does not exist"


def _unwritable(path: str | Path, exc: OSError, what: str) -> str:
    """The error line for ``what`` (the summary, say) not written to ``path``."""
    why = _folder_problem(path) or exc.strerror or str(exc)
    if Path(path).is_dir():
        why = "it is a folder, not a file"
    return f"cannot write {what} to {path}: {why}"


# ---------------------------------------------------------------------------------
# calibrate


def fpr_threshold(scores: np.ndarray, fpr: float) -> float:
    """The lowest threshold at which at most ``fpr`` of ``scores`` reach it.

    Computed in the scores' own dtype (float32 from a model), so the next
    representable value above a score is one the agent's comparison can tell apart.
    """
    s = np.sort(np.asarray(scores))
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    n = len(s)
    allowed = int(np.floor(fpr * n))
    if allowed >= n:
        return float(s[0])
    return float(np.nextafter(s[n - allowed - 1], s.dtype.type(np.inf)))


# Calibrated thresholds keep the artifact's doubt floor: at least this share of the
# site's flows, the highest-scoring below the decision, go to the re-scorer, at most
# CALIBRATION_DOUBT_MOST (a tie group right below the decision is taken whole).
CALIBRATION_DOUBT_SHARE = 0.01
CALIBRATION_DOUBT_MOST = 0.025


def escalation_floor(scores: np.ndarray, decision: float) -> float:
    """``escalate_low`` for calibrated thresholds: low enough that the highest
    :data:`CALIBRATION_DOUBT_SHARE` of ``scores`` below ``decision`` are escalated,
    by the artifact's own doubt floor (:func:`edge_agent.runtime.doubt_floor`).
    Without it a site's thresholds would send the teacher nothing the student
    doubts."""
    from edge_agent.runtime import doubt_floor, midway_below

    s = np.asarray(scores, dtype=np.float64)
    floor = doubt_floor(
        s, decision, decision, CALIBRATION_DOUBT_SHARE, CALIBRATION_DOUBT_MOST
    )
    return midway_below(s, floor) if floor < decision else floor


def capture_filter(given: str | None, broker: str | None) -> str | None:
    """The libpcap filter of an ``iface:`` source: ``given`` (the operator's), and
    never the agent's own connection to ``broker`` (every address its host name
    has now), which would otherwise be scored, escalated over itself, and each
    failed reconnect add a flow while the broker is down."""
    own = None
    if broker:
        import socket

        from edge_agent.mqtt import BrokerAddress

        address = BrokerAddress.parse(broker)
        try:
            found = socket.getaddrinfo(address.host, address.port,
                                       proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError) as exc:
            logger.warning(
                "broker host %s does not resolve now (%s): its traffic is captured "
                "and scored like any other", address.host, exc)
        else:
            hosts = sorted({info[4][0].split("%")[0] for info in found})
            if hosts:
                who = " or ".join(f"host {h}" for h in hosts)
                own = f"tcp and port {address.port} and ({who})"
    if given and own:
        return f"({given}) and not ({own})"
    if own:
        return f"not ({own})"
    return given or None


def cmd_calibrate(args: argparse.Namespace) -> int:
    """``edge-agent calibrate``: write site thresholds from this site's benign flows."""
    from edge_agent.agent import _MAX_THRESHOLD, SITE_THRESHOLDS, switched_off
    from edge_agent.runtime import load_artifact
    from edge_agent.sources import open_source
    from flows.windows import StreamWindower

    if not 0.0 < args.target_fpr < 1.0:
        raise UsageError("--target-fpr must be between 0 and 1, e.g. 0.01")
    if args.out is not None and not str(args.out).strip():
        raise UsageError(
            "--out is an empty file name; name the thresholds file, or leave --out "
            f"out for {SITE_THRESHOLDS} in the artifact"
        )
    if args.out is not None:
        # A device, FIFO, folder or missing folder is refused before any work.
        check_output(args.out, "--out", SITE_THRESHOLDS)
    scorer = load_artifact(args.artifact)
    source = open_source(args.source, timezone=args.timezone)
    _check_fit(scorer, source, args.artifact)
    if not source.finite:
        raise UsageError("calibrate needs a file source (pcap:, zeek: or parquet:)")
    enc = scorer.encoder
    windower = StreamWindower(enc.window, enc.n_features)
    scores, labels, batch = [], [], []

    def flush() -> None:
        if not batch:
            return
        X = enc.transform_records(batch)
        keys = (
            [0] * len(batch)
            if enc.group_by == "stream"
            else [r.get("src_ip") for r in batch]
        )
        scores.append(scorer.score(windower.push_many(keys, X)))
        labels.extend(r.get("label") for r in batch)
        batch.clear()

    # A source that stops on a bad row (parquet:, a zeek: file read once) keeps the
    # flows before it: thresholds are set from them, and the run exits 4 after.
    stopped: BadInputError | None = None
    read = 0
    try:
        for rec in source:
            batch.append(rec)
            read += 1
            if len(batch) >= 1024:
                flush()
    except BadInputError as exc:
        stopped = exc
    flush()
    if stopped is not None and read < MIN_CALIBRATION_FLOWS:
        raise stopped
    # Bad input (exit 3), not usage: the flags are right, but the source does not
    # hold the benign traffic thresholds can be set from.
    if not scores:
        raise BadInputError(
            f"holds no flows to calibrate on; expected {MIN_CALIBRATION_FLOWS} or "
            "more benign flows of this site",
            path=args.source,
        )
    s = np.concatenate(scores)
    lab = np.array([-1 if v is None else int(v) for v in labels])
    # Labeled benign flows only, when there are some; else every flow not labeled
    # malicious, which for an unlabeled capture is all of them: say so.
    benign = s[lab == 0] if np.any(lab == 0) else s[lab != 1]
    _warn_unlabeled(args.source, lab)
    if len(benign) < MIN_CALIBRATION_FLOWS:
        raise BadInputError(
            f"only {len(benign)} benign flows of the {len(s)} read; calibrate needs "
            f"{MIN_CALIBRATION_FLOWS} or more (a longer capture or log of this "
            "site's traffic)",
            path=args.source,
        )
    # A float32 score of 1.0 puts the next value past 1, which run refuses: "never"
    # is the largest threshold it takes (one ulp above 1 in float64).
    lo = min(fpr_threshold(benign, args.target_fpr), _MAX_THRESHOLD)
    hi = min(
        max(
            float(scorer.thresholds["alert"]),
            fpr_threshold(benign, args.target_fpr / 10),
        ),
        _MAX_THRESHOLD,
    )
    out = {
        "decision": lo,
        "escalate_low": escalation_floor(benign, lo),
        "alert": max(hi, lo),
        "target_fpr": args.target_fpr,
        "measured_fpr": float(np.mean(benign >= lo)),
        "flows": int(len(s)),
        "benign_flows": int(len(benign)),
        "labeled": bool(np.any(lab >= 0)),
        "model_version": scorer.model_version,
        "source": args.source,
        "created_at": time.time(),
    }
    path = Path(args.out) if args.out else Path(args.artifact) / SITE_THRESHOLDS
    problem = _folder_problem(path)
    if problem is not None:
        raise GatewatchError(f"cannot write {path}: {problem}")
    try:
        write_file(path, (json.dumps(out, indent=2) + "\n").encode(), force=True)
    except OSError as exc:
        hint = "" if args.out else " (use --out)"
        raise GatewatchError(
            f"cannot write {path}: {exc.strerror or exc}{hint}"
        ) from exc
    wide = benign.astype(np.float64)  # as the agent compares: no rounding
    doubted = float(np.mean((wide >= out["escalate_low"]) & (wide < out["alert"])))
    if doubted > CALIBRATION_DOUBT_MOST:
        logger.warning(
            "the thresholds written to %s send %.1f%% of the benign flows of %s to "
            "the re-scorer: the student scores most of them alike, so the teacher "
            "decides them (mind its load)", path, 100 * doubted, args.source)
    off = switched_off(out)
    if off is not None:
        logger.warning(
            "the thresholds written to %s switch detection off: %s (the benign "
            "flows of %s score that high)", path, off, args.source,
        )
    print(
        f"wrote {path}: escalate_low {out['escalate_low']:.6g}, decision {lo:.6g}, "
        f"alert {out['alert']:.6g}, benign "
        f"flows {len(benign)}, measured fpr {out['measured_fpr']:.4g}"
    )
    # Written from what came before any damage; a damaged source still exits 4.
    if stopped is not None:
        raise _as_partial(
            stopped, read, f"the thresholds were set from the {read} flows read "
            "before it"
        )
    problem = _input_problem(args.source, source, int(len(s)))
    if problem is not None:
        raise problem
    return EXIT_OK


def _warn_unlabeled(source: str, labels: np.ndarray) -> None:
    """Warn when calibrate takes flows as benign that no label says are (labels:
    1 malicious, 0 benign, -1 none): with no label at all every flow counts, so
    thresholds set on a capture that holds an attack pass that attack."""
    if np.any(labels == 0):
        return
    if not np.any(labels >= 0):
        logger.warning(
            "%s holds no labels: every one of its %d flows is taken as benign, so "
            "the thresholds will pass whatever the capture holds, attacks included "
            "(calibrate on traffic known to be clean, or on a labeled log)",
            source,
            len(labels),
        )
        return
    logger.warning(
        "no flow of %s is labeled benign: its %d flows not labeled malicious are "
        "taken as benign, so the thresholds will pass whatever they hold",
        source,
        int(np.sum(labels != 1)),
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``edge-agent``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(signal, "SIGHUP") and getattr(args, "func", None) is not cmd_run:
        # edge_agent.entry held SIGHUP off for run's start; the others end on it.
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    level = (
        logging.ERROR if args.quiet and not args.verbose
        else logging.WARNING - 10 * min(args.verbose, 2)
    )
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = int(args.func(args) or 0)
    except GatewatchError as exc:
        entry.settle()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        entry.settle()
        # run says so itself with what it kept; the other commands say it here.
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except entry.StoppedWhileStarting:
        # A SIGTERM while run started (edge_agent.entry): nothing was read.
        entry.settle()
        print(entry.STOPPED_WHILE_STARTING, file=sys.stderr)
        return EXIT_OK
    entry.settle()
    return code


if __name__ == "__main__":
    sys.exit(main())
