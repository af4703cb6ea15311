"""Live capture from a network interface through libpcap (the pcapy-ng binding).

:func:`iter_live` opens an interface, feeds every frame to a :class:`FlowMeter`
and yields records as connections end; it also ends idle connections by the wall
clock when no packet comes. Capturing needs privilege: root, or the capabilities
``cap_net_raw`` and ``cap_net_admin`` on the Python binary. Without them the
error says so and gives the ``setcap`` command that grants them.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time
from collections.abc import Iterator

from flows import logger
from flows.errors import BadInputError, PartialInputError, UsageError
from flows.meter.meter import Timeouts

SNAPLEN = 65535


class CaptureFailedError(PartialInputError):
    """A live capture that was open and then failed part way (the interface went
    down or was removed): partial input, exit 4. :func:`iter_live` raises it only
    after it has ended and yielded the connections it still held, so what was
    metered before the failure is scored and kept, as on a stop."""


def privilege_hint() -> str:
    """The sentence telling a user how to grant capture privilege to this Python."""
    exe = os.path.realpath(sys.executable)
    return (
        "live capture needs the cap_net_raw and cap_net_admin capabilities (or "
        f"root); grant them once with: sudo setcap cap_net_raw,cap_net_admin+eip {exe}"
    )


def open_live(
    name: str,
    *,
    bpf: str | None = None,
    snaplen: int = SNAPLEN,
    promisc: bool = False,
    timeout_ms: int = 200,
):
    """Open ``name`` for capture, with gatewatch errors for what is missing."""
    try:
        import pcapy
    except ImportError as exc:
        raise UsageError(
            "live capture needs the pcapy-ng package (pip install 'gatewatch[edge]')"
        ) from exc
    try:
        cap = pcapy.open_live(name, snaplen, 1 if promisc else 0, timeout_ms)
    except pcapy.PcapError as exc:
        text = str(exc)
        low = text.lower()
        if "permission" in low or "not permitted" in low:
            raise UsageError(
                f"cannot capture on {name!r}: {text}. " + privilege_hint()
            ) from exc
        if _not_there(text) == "missing":
            try:
                names = ", ".join(pcapy.findalldevs())
            except pcapy.PcapError:
                names = "unknown"
            raise BadInputError(
                f"no interface named {name!r} (interfaces: {names})"
            ) from exc
        raise BadInputError(f"cannot capture on {name!r}: {text}") from exc
    if bpf:
        try:
            cap.setfilter(bpf)
        except pcapy.PcapError as exc:
            raise UsageError(f"capture filter {bpf!r} is not valid: {exc}") from exc
    return cap


def _not_there(text: str) -> str | None:
    """What libpcap's error ``text`` says of an interface that cannot be captured
    on yet: ``"missing"`` (no such interface), ``"down"`` (it is not up), or None
    for any other error (no privilege, a bad name)."""
    low = text.lower()
    if "no such device" in low or "doesn't exist" in low:
        return "missing"
    if "not up" in low:
        return "down"
    return None


def wait_for_interface(
    name: str,
    seconds: float,
    *,
    end: threading.Event | None = None,
    poll: float = 0.25,
) -> bool:
    """Wait at most ``seconds`` for interface ``name`` to be there and up, as for
    an agent that starts at boot before its interface does: True once libpcap can
    open it, False when the time ran out or ``end`` was set first.

    The interface is tried every ``poll`` seconds, and the wait is logged once.
    Any other error (no privilege, no pcapy) ends the wait at once: the capture
    opened next reports it, as without a wait.
    """
    try:
        import pcapy
    except ImportError:
        return True

    started = time.monotonic()
    deadline = started + seconds
    said = False
    while True:
        try:
            cap = pcapy.open_live(name, 64, 0, 100)
        except pcapy.PcapError as exc:
            state = _not_there(str(exc))
            if state is None:
                return True
        else:
            cap.close()
            if said:
                logger.info("%s: the interface is up after %.1f s", name,
                            time.monotonic() - started)
            return True

        left = deadline - time.monotonic()
        if left <= 0 or (end is not None and end.is_set()):
            return False
        if not said:
            what = "no such interface yet" if state == "missing" else "it is not up"
            logger.warning("%s: %s; waiting up to %g s for it", name, what, seconds)
            said = True
        if end is not None:
            if end.wait(min(poll, left)):
                return False
        else:
            time.sleep(min(poll, left))


def _note_drops(cap, name: str, warned: int = 0) -> int:
    """Warn when libpcap or the interface dropped packets since ``warned`` were
    reported (the capture could not keep up: the flows they belonged to are
    short or missing); the number dropped so far."""
    try:
        _, dropped, if_dropped = cap.stats()
    except Exception:  # noqa: BLE001 - pcapy raises PcapError; no stats: nothing
        return warned
    total = int(dropped) + int(if_dropped)
    if total > warned:
        logger.warning(
            "%s: %d packets dropped before the flow meter saw them (%d by libpcap, "
            "%d by the interface): the capture cannot keep up; flows they belonged "
            "to are short or missing", name, total, dropped, if_dropped)
    return max(total, warned)


def table_full(name: str, max_flows: int) -> str:
    """The warning for a capture whose connection table filled up."""
    return (f"{name}: the connection table is full ({max_flows} open connections, "
            "max_flows): the least recently active are ended early to make room; "
            "a flood of new connections (spoofed SYNs, a scan) does this, or a "
            "max_flows too small for this network")


def iter_live(
    name: str,
    *,
    bpf: str | None = None,
    duration: float | None = None,
    max_packets: int | None = None,
    timeouts: Timeouts | None = None,
    max_flows: int = 1_000_000,
    check_checksums: bool = False,
    promisc: bool = False,
    engine: str | None = None,
    end: threading.Event | None = None,
    counts: dict[str, int] | None = None,
) -> Iterator[dict]:
    """Yield canonical records from interface ``name`` as connections end.

    Runs until ``end`` is set (checked at least every 0.2 s), a Ctrl-C, or for
    ``duration`` seconds, or ``max_packets`` packets; then ends every open
    connection and yields it, so a stop does not lose the connections still
    open (a Ctrl-C is raised again once they are yielded). A capture that fails
    part way (the interface went down or was removed) ends and yields them too,
    then raises :class:`CaptureFailedError` naming the interface and the reason.
    ``counts`` (a dict) is kept up to date with ``evicted`` (connections ended
    early by a full table) and ``dropped`` (packets libpcap or the interface
    dropped).
    """
    cap = open_live(name, bpf=bpf, promisc=promisc)
    try:
        yield from _capture(cap, name, duration, max_packets, timeouts, max_flows,
                            check_checksums, engine, end, counts)
    finally:
        cap.close()  # also when the reader leaves early: not left to the collector


def _capture(cap, name: str, duration: float | None, max_packets: int | None,
             timeouts: Timeouts | None, max_flows: int, check_checksums: bool,
             engine: str | None, end: threading.Event | None,
             counts: dict[str, int] | None) -> Iterator[dict]:
    """:func:`iter_live`'s work on the open capture ``cap`` (closed by it)."""
    counts = {} if counts is None else counts
    link = cap.datalink()
    from flows.meter import make_meter

    meter = make_meter(
        engine,
        timeouts=timeouts,
        max_flows=max_flows,
        check_checksums=check_checksums,
    )
    logger.info("capturing on %s (link type %d)", name, link)
    from flows.meter import fast_available

    if not fast_available():
        # TODO(gap): a bundle built with --platform (another machine's) carries a
        # pure-Python agent wheel, so that gateway meters live traffic this way.
        logger.warning(
            "%s: the flow meter runs on its pure-Python packet path (about 10x "
            "slower than the compiled one, which is not built here: pip install "
            "with a C compiler and Cython builds it); a busy link may drop packets",
            name)
    deadline = time.monotonic() + duration if duration is not None else None
    # Non-blocking reads behind select(): a blocking read may never return when
    # the filter lets nothing through, and idle timers must still run.
    cap.setnonblock(1)
    fd = cap.getfd()
    seen = [0]
    # An error of the meter itself (not of the capture) is kept here and raised
    # as it is, not reported as the interface failing.
    meter_error: list[BaseException] = []

    def on_packet(hdr, data) -> None:
        sec, usec = hdr.getts()
        seen[0] += 1
        try:
            meter.feed(sec + usec * 1e-6, link, data, hdr.getlen(), None, SNAPLEN)
        except Exception as exc:
            meter_error.append(exc)
            raise

    interrupted, warned_full = None, False
    failed: CaptureFailedError | None = None
    next_drops, warned_drops = time.monotonic() + 10.0, 0
    try:
        while end is None or not end.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            if max_packets is not None and seen[0] >= max_packets:
                break
            wait = 0.2 if deadline is None else max(
                0.0, min(0.2, deadline - time.monotonic()))
            got = 0
            try:
                ready, _, _ = select.select([fd], [], [], wait)
                if ready:
                    budget = -1 if max_packets is None else max_packets - seen[0]
                    got = cap.dispatch(budget, on_packet)
            except Exception as exc:  # noqa: BLE001 - pcapy raises PcapError
                if meter_error:
                    raise meter_error[0] from None
                # The open connections are ended and yielded below, then this.
                failed = CaptureFailedError(
                    f"live capture on {name!r} failed: {_reason(exc)}")
                failed.__cause__ = exc
                break
            if not got:
                meter._sweep(time.time())  # idle: let the timers run on wall time
            if meter.done:
                yield from meter.pop_done()
            if time.monotonic() >= next_drops:
                next_drops = time.monotonic() + 10.0
                warned_drops = _note_drops(cap, name, warned_drops)
                counts["dropped"] = warned_drops
            counts["evicted"] = meter.evicted
            if meter.evicted and not warned_full:
                warned_full = True
                logger.warning(table_full(name, max_flows))
    except KeyboardInterrupt as exc:
        interrupted = exc  # the open connections first, then the interrupt

    counts["evicted"] = meter.evicted
    yield from meter.flush()
    counts["dropped"] = max(_note_drops(cap, name), warned_drops)
    if interrupted is not None:
        raise interrupted
    if failed is not None:
        raise failed


def _reason(exc: BaseException) -> str:
    """Why a capture failed, in one piece of text (an OSError's strerror, else
    the library's message, else the exception's type)."""
    text = getattr(exc, "strerror", None) or str(exc)
    return text or type(exc).__name__
