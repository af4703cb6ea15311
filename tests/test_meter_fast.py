"""The compiled packet path (flows.meter._fast) gives what the Python meter gives.

The pure-Python :class:`FlowMeter` is the reference. Every comparison here runs the
same input through both paths and asserts equal records field by field (uids
included: both take the same seed), equal counters and equal damage notes, on the
shared captures (zeek-reference, pcap, pcap/malformed), on crafted captures, and on
a fixed-seed run of a few thousand mutated captures. Also here: choosing the path
(``GATEWATCH_METER``) and the exit codes of files that are no capture at all.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

import flows.meter as meter_pkg
from flows.cli import main as flows_main
from flows.errors import BadInputError, GatewatchError, PartialInputError, UsageError
from flows.meter import (
    FlowMeter,
    Timeouts,
    fast_available,
    iter_flows,
    make_meter,
    read_capture,
)
from flows.meter.capture import CaptureReader
from tests.conftest import data_file
from tests.test_meter_craft import (
    A4,
    A6,
    B4,
    B6,
    C4,
    eth,
    handshake,
    icmp,
    ip4,
    ip6,
    pcapng_epb,
    pcapng_idb,
    pcapng_shb,
    tcp,
    udp,
    write_pcap,
)

NOT_BUILT = "the compiled meter flows.meter._fast is not built in this install"
needs_fast = pytest.mark.skipif(not fast_available(), reason=NOT_BUILT)


def outcome(path: Path, engine: str, **kw) -> dict:
    """Everything ``read_capture`` gives for one file, as plain comparable data."""
    out: dict = {}
    try:
        res = read_capture(path, engine=engine, uid_seed="same", **kw)
    except GatewatchError as exc:
        out["error"] = (type(exc).__name__, str(exc), exc.exit_code)
        res = getattr(exc, "result", None)
        if res is None:
            return out
    out.update(
        rows=res.table.to_pylist(),
        stats=res.stats,
        warnings=res.warnings,
        partial=res.partial,
        skipped=res.skipped,
    )
    return out


def streamed(path: Path, engine: str) -> tuple[list[dict], str | None]:
    """``iter_flows`` records (uids dropped: they are random there) and the error."""
    got = []
    try:
        for rec in iter_flows(path, engine=engine, on_error="fail"):
            got.append(dict(rec, uid=None))
    except GatewatchError as exc:
        return got, f"{type(exc).__name__}: {exc}"
    return got, None


def first_difference(a: dict, b: dict) -> str:
    """A short account of where two outcomes differ, for the assertion message."""
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            if key == "rows" and a.get(key) and b.get(key):
                if len(a[key]) != len(b[key]):
                    return f"rows: {len(a[key])} vs {len(b[key])}"
                for i, (x, y) in enumerate(zip(a[key], b[key], strict=True)):
                    if x != y:
                        diff = {k: (x[k], y[k]) for k in x if x[k] != y.get(k)}
                        return f"row {i}: {diff}"
            return f"{key}: {a.get(key)!r} vs {b.get(key)!r}"
    return "equal"


def shared_captures(data_dir: Path) -> list[Path]:
    """Every capture of the shared data the meter is tested on."""
    files = []
    for rel in ("zeek-reference", "pcap", "pcap/malformed"):
        folder = data_file(data_dir, rel)
        files += sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and p.suffix in (".pcap", ".pcapng", ".cap", "")
        )
    return files


@needs_fast
@pytest.mark.parametrize("checksums", [False, True])
def test_shared_captures_give_the_same_records(data_dir, checksums):
    files = shared_captures(data_dir)
    assert len(files) >= 30, files
    compared = 0
    for path in files:
        want = outcome(path, "python", check_checksums=checksums)
        got = outcome(path, "fast", check_checksums=checksums)
        assert got == want, f"{path.name}: {first_difference(want, got)}"
        compared += len(want.get("rows", ()))
    assert compared > 500


@needs_fast
def test_shared_captures_stream_the_same(data_dir):
    for path in shared_captures(data_dir):
        assert streamed(path, "fast") == streamed(path, "python"), path.name


# -- crafted captures ---------------------------------------------------------------


def seg(t, src, dst, sport, dport, seq, ack, flags, payload=b"", win=65535):
    mk = ip6 if ":" in src else ip4
    return (t, eth(mk(src, dst, 6, tcp(src, dst, sport, dport, seq, ack, flags,
                                       payload, win))))  # fmt: skip


def dgram(t, src, dst, sport, dport, payload=b"x"):
    mk = ip6 if ":" in src else ip4
    return (t, eth(mk(src, dst, 17, udp(src, dst, sport, dport, payload))))


def vxlan(t, inner: bytes) -> tuple[float, bytes]:
    """A VXLAN datagram (UDP 4789) carrying an Ethernet frame."""
    body = struct.pack("!II", 0x08000000, 42 << 8) + inner
    return (t, eth(ip4(C4, B4, 17, udp(C4, B4, 50000, 4789, body))))


def fragments(t, src, dst, payload: bytes, ident: int = 7) -> list:
    """One UDP datagram in two IPv4 fragments (8-byte aligned split)."""
    whole = udp(src, dst, 5353, 5353, payload)
    cut = 16
    return [
        (t, eth(ip4(src, dst, 17, whole[:cut], ident=ident, frag=0x2000))),
        (t + 0.001, eth(ip4(src, dst, 17, whole[cut:], ident=ident, frag=cut // 8))),
    ]


def crafted() -> dict[str, tuple[list, dict]]:
    """Named captures (frames, write_pcap/meter options) covering the meter's cases."""
    hs4 = [(t, eth(p)) for t, p in handshake()]
    hs6 = [(t, eth(p)) for t, p in handshake(A6, B6, 40001, 443, t0=1000.5)]
    vlan = [(t, eth(p, vlans=(10, 20))) for t, p in handshake(sport=40002)]
    x, y = 100, 900
    cases = {
        "handshakes": (hs4 + hs6 + vlan, {}),
        "syn_ack_first": (
            [
                seg(1.0, B4, A4, 80, 40000, y, x + 1, "SA"),
                seg(1.1, A4, B4, 40000, 80, x + 1, y + 1, "A"),
            ],
            {},
        ),
        "missing_syn_server_port": (
            [
                seg(1.0, B4, A4, 443, 51000, y, x, "PA", b"hello"),
                seg(1.1, A4, B4, 51000, 443, x, y + 5, "A"),
            ],
            {},
        ),
        "rejected_then_reused": (
            [
                seg(1.0, A4, B4, 40000, 23, x, 0, "S"),
                seg(1.1, B4, A4, 23, 40000, 0, x + 1, "RA"),
                seg(2.0, A4, B4, 40000, 23, x + 50, 0, "S"),
                seg(9.0, A4, B4, 40000, 23, x + 99, 0, "S"),
            ],
            {},
        ),
        "gaps_retransmits_zero_window": (
            [
                seg(1.0, A4, B4, 40000, 80, x, 0, "S"),
                seg(1.1, B4, A4, 80, 40000, y, x + 1, "SA"),
                seg(1.2, A4, B4, 40000, 80, x + 1, y + 1, "A"),
                seg(1.3, A4, B4, 40000, 80, x + 1, y + 1, "PA", b"a" * 10),
                seg(1.4, A4, B4, 40000, 80, x + 1, y + 1, "PA", b"a" * 10),
                seg(1.5, A4, B4, 40000, 80, x + 31, y + 1, "PA", b"b" * 10),
                seg(1.6, B4, A4, 80, 40000, y + 1, x + 41, "A", win=0),
                seg(1.7, B4, A4, 80, 40000, y + 1, x + 41, "FA"),
                seg(1.8, A4, B4, 40000, 80, x + 41, y + 2, "RA"),
            ],
            {},
        ),
        "udp_icmp_other": (
            [
                dgram(1.0, A4, B4, 5000, 53, b"q" * 30),
                dgram(1.1, B4, A4, 53, 5000, b"r" * 60),
                dgram(1.2, A6, B6, 123, 40000, b"n" * 48),
                (1.3, eth(ip4(A4, B4, 1, icmp(8, 0, b"ping")))),
                (1.4, eth(ip4(B4, A4, 1, icmp(0, 0, b"ping")))),
                (1.5, eth(ip4(A4, C4, 1, icmp(3, 3, b"x" * 28)))),
                (1.6, eth(ip6(A6, B6, 58, icmp(128, 0, b"p6", A6, B6)))),
                (1.7, eth(ip4(A4, B4, 50, b"\0" * 40))),
                (1.8, eth(ip6(A6, B6, 132, b"\0" * 24))),
                (200.0, dgram(200.0, A4, B4, 5000, 53)[1]),
            ],
            {},
        ),
        "tunnels_and_fragments": (
            [
                vxlan(1.0, eth(ip4(A4, B4, 6, tcp(A4, B4, 1, 2, 5, 0, "S")))),
                (1.1, eth(ip4(C4, B4, 4, ip4(A4, B4, 17, udp(A4, B4, 7, 8, b"in"))))),
                *fragments(1.2, A4, B4, b"f" * 40),
                *fragments(1.3, B4, A4, b"g" * 40, ident=8)[:1],
                (
                    1.4,
                    eth(ip6(A6, B6, 17, udp(A6, B6, 9, 10, b"e"), [(60, b"\0" * 6)])),
                ),
            ],
            {},
        ),
        "timeouts": (
            [
                dgram(1.0, A4, B4, 5000, 5001),
                dgram(70.0, A4, B4, 5000, 5001),
                seg(71.0, A4, B4, 40000, 80, x, 0, "S"),
                seg(80.0, A4, B4, 40003, 80, x, 0, "S"),
                *[(t + 90.0, f) for t, f in hs4],
                seg(200.0, A4, B4, 40009, 80, x, 0, "S"),
            ],
            {"timeouts": Timeouts(udp=30.0, tcp_close_delay=2.0)},
        ),
        "bad_checksums": (
            [
                (1.0, eth(ip4(A4, B4, 6, tcp(A4, B4, 1, 2, 5, 0, "S")[:16] + b"\0\0"))),
                (1.1, eth(ip4(A4, B4, 17, udp(A4, B4, 7, 8, b"x")[:6] + b"\1\1x"))),
                (1.2, eth(ip4(A4, B4, 1, b"\x08\0\0\0" + b"\0" * 8))),
            ],
            {"check_checksums": True},
        ),
        "eviction": (
            [dgram(1.0 + i * 0.01, A4, B4, 1000 + i, 53) for i in range(250)],
            {"max_flows": 20},
        ),
        "damaged_packets": (
            [
                (1.0, eth(ip4(A4, B4, 6, b"\0" * 10))),
                (1.1, eth(ip4(A4, B4, 6, tcp(A4, B4, 1, 2, 5, 0, "S")))[:30]),
                (1.2, b"\x02" * 13),
                (1.3, eth(ip4(A4, B4, 17, udp(A4, B4, 1, 2, b"x" * 50))), 40),
                (1.4, eth(b"\x41" + b"\0" * 30)),
                (1.5, eth(b"\0" * 28, ethertype=0x0806)),
                dgram(1.6, A4, B4, 7, 9),
            ],
            {},
        ),
    }
    raw = [(t, p) for t, p in handshake(sport=41000)]
    cases["raw_ip_link"] = (raw, {"link": 101})
    sll = [
        (t, struct.pack("!HHH8sH", 0, 1, 6, b"\2" * 8, 0x0800) + p)
        for t, p in handshake(sport=41001)
    ]
    cases["linux_sll_link"] = (sll, {"link": 113})
    null = [(t, struct.pack("<I", 2) + p) for t, p in handshake(sport=41002)]
    cases["bsd_null_link"] = (null, {"link": 0})
    cases["big_endian_nanosecond"] = (hs4, {"big": True, "nano": True})
    return cases


WRITE_KEYS = ("link", "big", "nano", "snaplen")


@needs_fast
@pytest.mark.parametrize("name", sorted(crafted()))
def test_crafted_captures_give_the_same_records(tmp_path, name):
    frames, opts = crafted()[name]
    write = {k: v for k, v in opts.items() if k in WRITE_KEYS}
    read = {k: v for k, v in opts.items() if k not in WRITE_KEYS}
    path = write_pcap(tmp_path / f"{name}.pcap", frames, **write)
    want = outcome(path, "python", **read)
    got = outcome(path, "fast", **read)
    assert want.get("rows"), want
    assert got == want, first_difference(want, got)


@needs_fast
def test_pcapng_with_two_interfaces(tmp_path):
    hs = handshake(sport=42000)
    blob = pcapng_shb() + pcapng_idb(1) + pcapng_idb(101)
    for i, (t, p) in enumerate(hs):
        blob += pcapng_epb(i % 2, int(t * 1e6), eth(p) if i % 2 == 0 else p)
    path = tmp_path / "two.pcapng"
    path.write_bytes(blob)
    want = outcome(path, "python")
    assert want["rows"] and want["stats"]["format"] == "pcapng"
    assert outcome(path, "fast") == want


# -- mutations --------------------------------------------------------------------


def corpus(data_dir: Path | None) -> list[tuple[int, list[tuple[float, bytes, int]]]]:
    """Base captures to mutate: crafted ones and the smaller shared ones."""
    out = []
    for frames, opts in crafted().values():
        link = opts.get("link", 1)
        out.append(
            (link, [(f[0], f[1], f[2] if len(f) > 2 else len(f[1])) for f in frames])
        )
    if data_dir is not None:
        for path in sorted((data_dir / "zeek-reference").glob("*.pcap")):
            if path.stat().st_size > 60_000:
                continue
            reader = CaptureReader(str(path))
            pkts = [(ts, data, wire) for ts, _, data, wire, _ in reader]
            if pkts and len(reader.link_types) == 1:
                out.append((next(iter(reader.link_types)), pkts[:400]))
    return out


def mutate(rng: random.Random, pkts: list) -> list:
    """A few random changes: header bytes, lengths, cuts, order, times."""
    pkts = list(pkts)
    for _ in range(rng.randint(1, 6)):
        if not pkts:
            break
        i = rng.randrange(len(pkts))
        ts, data, wire = pkts[i]
        kind = rng.random()
        if kind < 0.55 and data:
            b = bytearray(data)
            for _ in range(rng.randint(1, 3)):
                at = rng.randrange(min(len(b), 80))
                b[at] = rng.randrange(256) if rng.random() < 0.7 else b[at] ^ 0xFF
            pkts[i] = (ts, bytes(b), wire)
        elif kind < 0.7:
            pkts[i] = (ts, data[: rng.randrange(len(data) + 1)], wire)
        elif kind < 0.8:
            pkts[i] = (ts, data, max(0, wire + rng.randint(-40, 40)))
        elif kind < 0.9:
            j = rng.randrange(len(pkts))
            pkts[i], pkts[j] = pkts[j], pkts[i]
        else:
            pkts[i] = (max(0.0, ts + rng.choice([-5.0, 0.5, 61.0, 400.0])), data, wire)
    return pkts


def run_feed(cls, link: int, pkts: list, **kw) -> tuple:
    """Feed packets one by one; the records, counters and damage note."""
    m = cls(uid_seed="mut", **kw)
    recs = []
    for off, (ts, data, wire) in enumerate(pkts):
        m.feed(ts, link, data, wire, off * 100, 65535)
        recs.extend(m.pop_done())
    recs.extend(m.flush())
    d = m.damage
    note = (d.offset, d.message, d.count, dict(d.reasons)) if d else None
    return recs, m.stats, note


@needs_fast
def test_mutated_captures_give_the_same_records(tmp_path, request):
    """A fixed-seed run of mutated captures, fed packet by packet and as files."""
    from flows.meter._fast import FastMeter

    try:
        data_dir = request.getfixturevalue("data_dir")
    except pytest.skip.Exception:
        data_dir = None
    base = corpus(data_dir)
    rng = random.Random(20261204)
    deadline = time.monotonic() + 60.0
    done = files = 0
    while done < 3000 and time.monotonic() < deadline:
        link, pkts = rng.choice(base)
        if rng.random() < 0.05:
            link = rng.choice([0, 1, 9, 12, 101, 105, 108, 113, 127, 228, 229, 276])
        pkts = mutate(rng, pkts)
        kw = {"check_checksums": rng.random() < 0.3}
        if rng.random() < 0.1:
            kw["max_flows"] = rng.randint(1, 8)
        want = run_feed(FlowMeter, link, pkts, **kw)
        got = run_feed(FastMeter, link, pkts, **kw)
        assert got == want, (
            f"mutation {done}: {first_difference(*_as_dicts(want, got))}"
        )
        if done % 10 == 0:
            # As a file too, with a damaged record header now and then: the bulk
            # reader path and the damage notes of the capture reader.
            path = write_pcap(tmp_path / "m.pcap", [(t, d, w) for t, d, w in pkts],
                              link=link)  # fmt: skip
            if rng.random() < 0.5 and path.stat().st_size > 40:
                blob = bytearray(path.read_bytes())
                at = rng.randrange(24, len(blob))
                blob[at : at + 4] = rng.randbytes(4)
                if rng.random() < 0.3:
                    blob = blob[: rng.randrange(len(blob))]
                path.write_bytes(bytes(blob))
            want_f = outcome(path, "python", **kw)
            got_f = outcome(path, "fast", **kw)
            assert got_f == want_f, f"file {done}: {first_difference(want_f, got_f)}"
            files += 1
        elif done % 10 == 5:
            # As pcapng, either byte order, blocks mangled now and then.
            o = rng.choice("<>")
            head = pcapng_shb(o) + pcapng_idb(link, 65535, None, o)
            blob = bytearray(
                head
                + b"".join(
                    pcapng_epb(0, int(t * 1e6), d, w or None, o) for t, d, w in pkts
                )
            )
            if rng.random() < 0.5 and len(blob) > len(head) + 8:
                at = rng.randrange(len(head), len(blob))
                blob[at : at + 4] = rng.randbytes(4)
            path = tmp_path / "m.pcapng"
            path.write_bytes(bytes(blob))
            want_f = outcome(path, "python", **kw)
            got_f = outcome(path, "fast", **kw)
            assert got_f == want_f, f"pcapng {done}: {first_difference(want_f, got_f)}"
            files += 1
        done += 1
    assert done >= 300, f"only {done} mutations in the time allowed"
    assert files >= 60


@needs_fast
def test_random_frames_of_every_link_type_give_the_same_counts():
    """Random bytes as frames (IP-looking now and then), fed to both paths."""
    from flows.meter._fast import FastMeter

    from flows.meter.decode import LINK_NAMES

    rng = random.Random(7)
    links = sorted(LINK_NAMES) + [147]
    starts = {1: 14, 113: 16, 276: 20, 0: 4, 108: 4}
    for it in range(3000):
        link = rng.choice(links)
        b = bytearray(rng.randbytes(rng.randrange(0, 120)))
        at = starts.get(link, 0)
        if rng.random() < 0.6 and len(b) > at:
            b[at] = rng.choice([0x45, 0x46, 0x4F, 0x60])
            if link == 1 and len(b) > 14:
                b[12:14] = rng.choice([b"\x08\x00", b"\x86\xdd", b"\x81\x00"])
        data = bytes(b)
        wire = len(data) + (rng.randrange(0, 2000) if rng.random() < 0.5 else 0)
        frames = [(1.0, data, wire), (2.0, data[::-1], len(data)), (3.0, data, wire)]
        kw = {"check_checksums": bool(it % 2)}
        want = run_feed(FlowMeter, link, frames, **kw)
        assert run_feed(FastMeter, link, frames, **kw) == want, (link, data.hex())


def _as_dicts(a: tuple, b: tuple) -> tuple[dict, dict]:
    names = ("rows", "stats", "damage")
    return dict(zip(names, a, strict=True)), dict(zip(names, b, strict=True))


# -- choosing the path --------------------------------------------------------------


def test_engine_choice(monkeypatch, caplog):
    monkeypatch.setattr(meter_pkg, "_announced", set())
    monkeypatch.setenv("GATEWATCH_METER", "python")
    assert type(make_meter()) is FlowMeter
    with pytest.raises(UsageError, match="one of auto, fast, python"):
        make_meter("turbo")
    monkeypatch.setenv("GATEWATCH_METER", "bogus")
    with pytest.raises(UsageError, match="GATEWATCH_METER"):
        make_meter()
    # Without the compiled module: auto falls back, fast is refused by name.
    monkeypatch.setattr(meter_pkg, "FastMeter", None)
    monkeypatch.setattr(meter_pkg, "_FAST_MISSING", "no module named _fast")
    monkeypatch.delenv("GATEWATCH_METER")
    monkeypatch.setattr(meter_pkg, "_announced", set())
    with caplog.at_level(logging.INFO, logger="gatewatch.flows"):
        assert type(make_meter()) is FlowMeter
        assert type(make_meter("auto")) is FlowMeter
    notes = [r.getMessage() for r in caplog.records if "packet path" in r.getMessage()]
    assert len(notes) == 1 and "not built" in notes[0], notes
    with pytest.raises(UsageError, match="not built"):
        make_meter("fast")


@needs_fast
def test_auto_picks_the_compiled_path(monkeypatch, tmp_path):
    from flows.meter._fast import FastMeter

    monkeypatch.delenv("GATEWATCH_METER", raising=False)
    assert type(make_meter()) is FastMeter
    assert type(make_meter("fast", max_flows=5)) is FastMeter
    with pytest.raises(UsageError, match="max_flows"):
        make_meter("fast", max_flows=0)
    path = write_pcap(tmp_path / "a.pcap", [(t, eth(p)) for t, p in handshake()])
    monkeypatch.setenv("GATEWATCH_METER", "python")
    want = outcome(path, None)
    monkeypatch.setenv("GATEWATCH_METER", "fast")
    assert outcome(path, None) == want


def _spy_meters(monkeypatch) -> list:
    """Record every meter that ``flows.meter.make_meter`` builds from now on."""
    made: list = []
    real = meter_pkg.make_meter

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(meter_pkg, "make_meter", spy)
    monkeypatch.delenv("GATEWATCH_METER", raising=False)
    return made


@needs_fast
def test_agent_pcap_source_takes_the_compiled_path(monkeypatch, tmp_path):
    from flows.meter._fast import FastMeter

    from edge_agent.sources import open_source

    made = _spy_meters(monkeypatch)
    path = write_pcap(tmp_path / "a.pcap", [(t, eth(p)) for t, p in handshake()])
    recs = list(open_source(f"pcap:{path}"))
    assert [type(m) for m in made] == [FastMeter]
    # handshake(): S, SA, A, request, reply, both FINs; the responder never sends
    # a pure ACK, so no "a".
    assert [(r["conn_state"], r["history"]) for r in recs] == [("SF", "ShADdFf")]


@needs_fast
@pytest.mark.skipif(os.geteuid() != 0, reason="capturing on lo needs root here")
def test_live_source_takes_the_compiled_path(monkeypatch):
    pytest.importorskip("pcapy", reason="pcapy-ng is not installed")
    from flows.meter._fast import FastMeter

    from flows.meter.live import iter_live

    made = _spy_meters(monkeypatch)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    port = rx.getsockname()[1]
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def talk():
        time.sleep(0.5)
        for i in range(3):
            tx.sendto(b"y" * (20 + i), ("127.0.0.1", port))
            time.sleep(0.02)

    th = threading.Thread(target=talk)
    th.start()
    try:
        recs = list(iter_live("lo", bpf=f"udp and dst port {port}", duration=1.5))
    finally:
        th.join()
        tx.close()
        rx.close()
    assert [type(m) for m in made] == [FastMeter]
    assert [(r["dst_port"], r["orig_pkts"], r["orig_bytes"]) for r in recs] == [
        (port, 3, 20 + 21 + 22)
    ]


# -- files that are no capture at all: bad input (3), not partial (4) ----------------


def _pcap_header(link: int = 1) -> bytes:
    return struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, link)


@pytest.mark.parametrize("engine", ["python", "fast"])
@pytest.mark.parametrize(
    "blob, message",
    [
        (_pcap_header() + struct.pack("<IIII", 1, 0, 5_000_000, 60), "record header"),
        (pcapng_shb()[:8] + b"\x11\x22\x33\x44" + pcapng_shb()[12:], "byte-order"),
        (b"#separator \\x09\n#fields\tts\tuid\n1.0\tC1\n", "not a pcap or pcapng"),
    ],
    ids=["bogus_first_record", "bad_pcapng_magic", "conn_log"],
)
def test_nothing_readable_is_bad_input(tmp_path, engine, blob, message):
    if engine == "fast" and not fast_available():
        pytest.skip(NOT_BUILT)
    path = tmp_path / "x.pcap"
    path.write_bytes(blob)
    for on_error in ("fail", "skip"):
        with pytest.raises(BadInputError, match=message) as info:
            read_capture(path, engine=engine, on_error=on_error)
        assert not isinstance(info.value, PartialInputError)
        assert info.value.exit_code == 3
        assert str(path) in str(info.value)
    with pytest.raises(BadInputError, match=message) as info:
        list(iter_flows(f"pcap:{path}", engine=engine))
    assert not isinstance(info.value, PartialInputError)


@pytest.mark.parametrize("engine", ["python", "fast"])
def test_cli_exit_codes_for_no_capture_and_garbage_later(
    tmp_path, monkeypatch, capsys, engine
):
    if engine == "fast" and not fast_available():
        pytest.skip(NOT_BUILT)
    monkeypatch.setenv("GATEWATCH_METER", engine)
    bogus = tmp_path / "bogus.pcap"
    bogus.write_bytes(_pcap_header() + struct.pack("<IIII", 1, 0, 5_000_000, 60))
    assert flows_main(["inspect", str(bogus)]) == 3
    err = capsys.readouterr().err
    assert "record header claims 5000000 captured bytes" in err and str(bogus) in err
    # Garbage after good packets stays a partial input (4): the flows are kept.
    frames = [(t, eth(p)) for t, p in handshake()]
    good = write_pcap(tmp_path / "g.pcap", frames).read_bytes()
    cut = tmp_path / "g2.pcap"
    cut.write_bytes(good + struct.pack("<IIII", 1, 0, 5_000_000, 60))
    assert flows_main(["inspect", str(cut)]) == 4
    assert "record header claims" in capsys.readouterr().err
