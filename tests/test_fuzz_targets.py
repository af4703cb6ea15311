"""Fuzz targets, seed inputs and byte mutators shared by the fuzz tests and benchmark.

A *target* takes one input (bytes) and feeds it to one parser of outside input the
way the product does: capture files through the flow meter, text logs through
``flows.readers``, MQTT payloads through ``edge_agent.protocol``, bundles through
``edge_agent.bundle.verify_bundle``. A target returns normally or raises a
:class:`~flows.errors.GatewatchError`; anything else that escapes is a bug, and
:func:`run_target` lets it through so the caller sees it.

Seeds are small valid inputs built here, plus (for captures and logs) the bytes of
the real files in the shared data folder, read when asked and never copied. The
tests at the end check that every seed is valid input for its parser, so mutations
start from something the parser accepts and reach past its first check.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import struct
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from flows.errors import GatewatchError

# The gateway the updates here are signed for, and the updater's own ids.
TARGET = {"site": "plant-3", "gateways": ["gw-17"]}
HERE = {"site": "plant-3", "gateway": "gw-17"}

# ---------------------------------------------------------------------------------
# seeds: captures


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ipv4(src: bytes, dst: bytes, proto: int, l4: bytes, ident: int = 7) -> bytes:
    head = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), ident, 0, 64, proto, 0, src, dst
    )
    return head[:10] + struct.pack("!H", _csum(head)) + head[12:] + l4


def _tcp(sport: int, dport: int, seq: int, ack: int, flags: int, data: bytes = b""):
    return (
        struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 8192, 0, 0)
        + data
    )


def _udp(sport: int, dport: int, data: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


def _ether(l3: bytes, vlan: int | None = None) -> bytes:
    macs = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02"
    if vlan is None:
        return macs + b"\x08\x00" + l3
    return macs + b"\x81\x00" + struct.pack("!H", vlan) + b"\x08\x00" + l3


def seed_frames() -> list[tuple[float, bytes]]:
    """A TCP conversation (handshake, data, FIN), a UDP exchange and a VLAN frame."""
    a, b = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    syn, synack, ack, psh, fin = 0x02, 0x12, 0x10, 0x18, 0x11
    t = 1_600_000_000.0
    frames = [
        _ipv4(a, b, 6, _tcp(40000, 80, 100, 0, syn)),
        _ipv4(b, a, 6, _tcp(80, 40000, 500, 101, synack)),
        _ipv4(a, b, 6, _tcp(40000, 80, 101, 501, ack)),
        _ipv4(a, b, 6, _tcp(40000, 80, 101, 501, psh, b"GET / HTTP/1.0\r\n\r\n")),
        _ipv4(b, a, 6, _tcp(80, 40000, 501, 119, psh, b"HTTP/1.0 200 OK\r\n\r\n")),
        _ipv4(a, b, 6, _tcp(40000, 80, 119, 520, fin)),
        _ipv4(b, a, 6, _tcp(80, 40000, 520, 120, fin)),
        _ipv4(a, b, 17, _udp(5353, 53, b"\x12\x34\x01\x00\x00\x01" + b"\0" * 6)),
        _ipv4(b, a, 17, _udp(53, 5353, b"\x12\x34\x81\x80\x00\x01" + b"\0" * 6)),
    ]
    out = [(t + i * 0.01, _ether(f)) for i, f in enumerate(frames)]
    out.append((t + 1.0, _ether(frames[7], vlan=12)))
    return out


def seed_pcap() -> bytes:
    """A little-endian microsecond pcap of :func:`seed_frames`."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    for ts, frame in seed_frames():
        sec, usec = int(ts), round((ts - int(ts)) * 1e6)
        out.append(struct.pack("<IIII", sec, usec, len(frame), len(frame)) + frame)
    return b"".join(out)


def _block(btype: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    n = 12 + len(body)
    return struct.pack("<II", btype, n) + body + struct.pack("<I", n)


def seed_pcapng() -> bytes:
    """A pcapng of :func:`seed_frames`: SHB, one Ethernet IDB, enhanced packets."""
    shb = _block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    idb = _block(1, struct.pack("<HHI", 1, 0, 65535))
    out = [shb, idb]
    for ts, frame in seed_frames():
        units = round(ts * 1e6)
        body = (
            struct.pack(
                "<IIIII", 0, units >> 32, units & 0xFFFFFFFF, len(frame), len(frame)
            )
            + frame
        )
        out.append(_block(6, body))
    return b"".join(out)


# ---------------------------------------------------------------------------------
# seeds: text logs

_ZEEK_FIELDS = (
    "ts uid id.orig_h id.orig_p id.resp_h id.resp_p proto service duration "
    "orig_bytes resp_bytes conn_state local_orig local_resp missed_bytes "
    "history orig_pkts orig_ip_bytes resp_pkts resp_ip_bytes tunnel_parents"
).split()
_ZEEK_TYPES = (
    "time string addr port addr port enum string interval count count "
    "string bool bool count string count count count count set[string]"
).split()
_ZEEK_ROWS = [
    "1600000000.000000 CAbc1 10.0.0.1 40000 10.0.0.2 80 tcp http 0.5 18 19 SF - - 0 "
    "ShADadFf 4 218 3 179 -",
    "1600000001.250000 CAbc2 10.0.0.1 5353 10.0.0.2 53 udp dns 0.01 12 12 SF - - 0 "
    "Dd 1 40 1 40 -",
    "1600000002.000000 CAbc3 fe80::1 0 ff02::1 0 icmp - - - - OTH - - 0 - 1 56 0 0 -",
]


def seed_zeek_tsv() -> bytes:
    """A Zeek TSV conn.log with full header lines and three rows."""
    head = [
        "#separator \\x09",
        "#set_separator\t,",
        "#empty_field\t(empty)",
        "#unset_field\t-",
        "#path\tconn",
        "#open\t2020-09-13-12-26-40",
        "#fields\t" + "\t".join(_ZEEK_FIELDS),
        "#types\t" + "\t".join(_ZEEK_TYPES),
    ]
    rows = ["\t".join(r.split(" ")) for r in _ZEEK_ROWS]
    return ("\n".join(head + rows + ["#close\t2020-09-13-12-27-00"]) + "\n").encode()


def seed_zeek_json() -> bytes:
    """The same rows as Zeek JSON lines."""
    lines = []
    for row in _ZEEK_ROWS:
        rec = {}
        for name, kind, value in zip(
            _ZEEK_FIELDS, _ZEEK_TYPES, row.split(" "), strict=True
        ):
            if value == "-":
                continue
            if kind in ("time", "interval"):
                rec[name] = float(value)
            elif kind in ("port", "count"):
                rec[name] = int(value)
            else:
                rec[name] = value
        lines.append(json.dumps(rec))
    return ("\n".join(lines) + "\n").encode()


def seed_binetflow() -> bytes:
    """A CTU-13 style binetflow with a flow per label kind."""
    return (
        b"StartTime,Dur,Proto,SrcAddr,Sport,Dir,DstAddr,Dport,State,sTos,dTos,"
        b"TotPkts,TotBytes,SrcBytes,Label\n"
        b"2011/08/16 10:01:46.972101,3.05,tcp,147.32.84.165,1027,   ->,"
        b"74.125.232.195,80,FSPA_FSPA,0,0,10,1800,700,flow=From-Botnet-V42-TCP\n"
        b"2011/08/16 10:01:47.000000,0.0001,udp,147.32.84.229,13363,  <->,"
        b"147.32.80.9,53,CON,0,0,2,210,75,flow=To-Background-UDP-CVUT-DNS-Server\n"
        b"2011/08/16 10:01:48.100000,0.2,icmp,147.32.84.165,0x0008,   ->,"
        b"147.32.96.69,0x7e00,ECO,0,,1,98,98,flow=From-Normal-V42-Grill\n"
    )


_KDD_ROW = (
    "0,tcp,http,SF,181,5450,0,0,0,0,0,1,0,0,0,0,0,0,0,0,0,0,8,8,0.00,0.00,"
    "0.00,0.00,1.00,0.00,0.00,9,9,1.00,0.00,0.11,0.00,0.00,0.00,0.00,0.00,"
    "normal,21"
)


def seed_nslkdd() -> bytes:
    """Three NSL-KDD rows (41 features, label, difficulty)."""
    rows = [
        _KDD_ROW,
        _KDD_ROW.replace("normal", "neptune").replace(",SF,", ",S0,"),
        _KDD_ROW.replace("http", "ftp_data").replace(",21", ",15"),
    ]
    return ("\n".join(rows) + "\n").encode()


def seed_unsw() -> bytes:
    """A UNSW-NB15 style CSV with a benign and an attack row."""
    head = (
        "id,dur,proto,service,state,spkts,dpkts,sbytes,dbytes,rate,sttl,dttl,"
        "sload,dload,attack_cat,label"
    )
    return (
        head + "\n"
        "1,0.121,tcp,-,FIN,6,4,258,172,74.08,252,254,14158.9,8495.4,Normal,0\n"
        "2,0.000009,udp,dns,INT,2,0,114,0,111111.1,254,0,50666664,0,Generic,1\n"
    ).encode()


def seed_cic() -> bytes:
    """A CICFlowMeter CSV (names with the usual leading spaces) with two rows."""
    head = (
        " Destination Port, Flow Duration, Total Fwd Packets, Total Backward "
        "Packets,Total Length of Fwd Packets, Flow Bytes/s, Flow IAT Mean, Label"
    )
    return (
        head + "\n80,1266342,41,44,2664,5548.6,15076.5,BENIGN\n"
        "22,3,2,0,0,Infinity,3,SSH-Patator\n"
    ).encode()


# ---------------------------------------------------------------------------------
# seeds: MQTT payloads and bundles

WINDOW_SHAPE = (4, 3)


def seed_escalation() -> bytes:
    """An escalation as the agent encodes it (window 4 x 3)."""
    from edge_agent import protocol as proto

    flow = {
        "ts": 1600000000.5,
        "uid": "C1",
        "src_ip": "10.0.0.1",
        "src_port": 40000,
        "dst_ip": "10.0.0.2",
        "dst_port": 80,
        "proto": "tcp",
        "service": "http",
        "duration": 0.5,
        "orig_bytes": 18,
        "resp_bytes": 19,
        "conn_state": "SF",
        "history": "ShADadFf",
        "label": None,
    }
    window = [[0.0, 0.25, 1.0], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0], [1.0, 0.1, 0.9]]
    return proto.encode(
        proto.build_escalation(
            flow=flow,
            window=window,
            score=0.91,
            decision="alert",
            model_version="m-1",
            site="plant1",
            gateway="gw01",
            msg_id="0123456789abcdef0123456789abcdef",
        )
    )


def seed_verdict() -> bytes:
    """A verdict as the re-scorer encodes it."""
    from edge_agent import protocol as proto

    return proto.encode(
        proto.build_verdict(
            escalation_id="0123456789abcdef0123456789abcdef",
            verdict="malicious",
            score=0.97,
            threshold=0.5,
            teacher_version="sha256:abcd",
        )
    )


_KEYS: dict[str, object] = {}


def bundle_keys():
    """One Ed25519 key pair per process (private, public)."""
    if not _KEYS:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import (
            Ed25519PrivateKey,
        )

        priv = Ed25519PrivateKey.generate()
        _KEYS.update(priv=priv, pub=priv.public_key())
    return _KEYS["priv"], _KEYS["pub"]


BUNDLE_MEMBERS = {
    "model/model.onnx": b"\x08\x07onnx-bytes-stand-in",
    "config/gateway.toml": b'site = "plant1"\ngateway = "gw01"\n',
    "systemd/gatewatch-agent.service": b"[Service]\nExecStart=/bin/true\n",
}


def bundle_manifest() -> dict:
    """A manifest of the schema ``verify_bundle`` reads, for BUNDLE_MEMBERS."""
    import hashlib

    from edge_agent import bundle, signing

    _, pub = bundle_keys()
    return {
        "schema": bundle.BUNDLE_SCHEMA,
        "key_id": signing.key_id(pub),
        "agent": {"version": "0.1.0", "requirement": "gatewatch[edge]==0.1.0"},
        "model": {"model_version": "m-1"},
        "python": "3.11",
        "config": "config/gateway.toml",
        "unit": "systemd/gatewatch-agent.service",
        "files": {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            for name, data in BUNDLE_MEMBERS.items()
        },
    }


def make_bundle(
    manifest_raw: bytes,
    members: dict[str, bytes] | None = None,
    sign: bool = True,
    compresslevel: int = 9,
) -> bytes:
    """A gzip tar: manifest, its signature (over these exact bytes), the members.

    ``compresslevel`` changes the bytes but not what they unpack to; the
    ``bundle-manifest`` target uses 1, which takes about 0.15 ms less per input.
    """
    from edge_agent import bundle, signing

    priv, _ = bundle_keys()
    sig = signing.sign(priv, manifest_raw) if sign else b"\0" * 64
    buf = io.BytesIO()
    with gzip.GzipFile(
        fileobj=buf, mode="wb", mtime=0, compresslevel=compresslevel
    ) as gz:
        with tarfile.open(fileobj=gz, mode="w") as tar:
            items = [(bundle.MANIFEST_NAME, manifest_raw), (bundle.SIGNATURE_NAME, sig)]
            items += list((BUNDLE_MEMBERS if members is None else members).items())
            for name, data in items:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def seed_bundle() -> bytes:
    """A complete signed bundle that verifies."""
    return make_bundle(json.dumps(bundle_manifest(), indent=1).encode())


def seed_manifest() -> bytes:
    """The manifest JSON alone (the ``bundle-manifest`` target signs what it gets)."""
    return json.dumps(bundle_manifest(), indent=1).encode()


# ---------------------------------------------------------------------------------
# real files (read at run time, never copied)

REAL = {
    "pcap": [
        "pcap/tcp_syn.pcap",
        "pcap/dns53.pcap",
        "pcap/communityid_icmp.pcap",
        "pcap/communityid_ipv6.pcap",
        "pcap/http-vlan-0.pcap",
        "pcap/ipv6-fragmented-dns.pcap",
        "pcap/test12-icmp-portscan.pcap",
        "pcap/wikipedia.pcap",
        "pcap/nmap-vsn.pcap",
        "zeek-reference/core.pppoe.pcap",
        "zeek-reference/core.q-in-q.pcap",
        "zeek-reference/core.radiotap.pcap",
        "zeek-reference/core.vlan-mpls.pcap",
        "zeek-reference/core.udp-corrupt.pcap",
    ],
    "pcapng": [
        "pcap/vlan-pcp-dei.pcapng",
        "zeek-reference/core.pcapng-pktsrc.pcapng",
        "zeek-reference/core.tcp.flip-without-syn.pcapng",
    ],
    "zeek-tsv": [
        "zeek-conn/ctu50-normal-40-day1.conn.log.labeled",
        "zeek-conn/android-mischief-rat01-androidtester.conn.log",
        "zeek-reference/core.pppoe.conn.log",
    ],
    "zeek-json": ["zeek-conn/nmap-portscans.conn.json.log"],
    "binetflow": ["binetflow/test11-portscan.binetflow"],
    "nsl-kdd": ["nsl-kdd/KDDTest+.txt"],
}
MAX_REAL_BYTES = 24_000  # the head of a big file: a cut is an input too


def real_seeds(
    kind: str, data_dir: Path | None, max_bytes: int = MAX_REAL_BYTES
) -> list[bytes]:
    """Heads of the real files of one kind under ``data_dir`` (absent ones skipped)."""
    if data_dir is None:
        return []
    out = []
    for rel in REAL.get(kind.removesuffix("-pieces"), []):
        path = data_dir / rel
        if path.is_file():
            with open(path, "rb") as handle:
                data = handle.read(max_bytes)
            if kind not in ("pcap", "pcapng"):
                data = data[: data.rfind(b"\n") + 1] or data  # whole lines only
            out.append(data)
    return out


# ---------------------------------------------------------------------------------
# targets


def _scratch_parent() -> str | None:
    """A memory-backed folder for scratch files where there is one, else the default.

    Each input is one small file written and read once; on a disk file system that
    costs more than many of the parsers under test.
    """
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None


class Scratch:
    """One scratch folder per process; each input replaces the same file."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(
            prefix="gw-fuzz-", dir=_scratch_parent()
        )
        self.root = Path(self._dir.name)

    def write(self, name: str, data: bytes) -> Path:
        """Write ``data`` to ``name`` in the folder and return its path.

        The old file is removed first, not truncated: ext4 flushes a file that was
        truncated and rewritten when it is closed (``auto_da_alloc``), which took
        about 2 ms a write here, more than most parsers take on one input.
        """
        path = self.root / name
        path.unlink(missing_ok=True)
        path.write_bytes(data)
        return path

    def cleanup(self) -> None:
        """Remove the folder."""
        self._dir.cleanup()


def t_capture(data: bytes, scratch: Scratch, suffix: str = ".pcap") -> None:
    """Batch and streaming meter, strict and lenient, on one capture file."""
    from flows.meter import iter_flows, read_capture
    from flows.record import CONN_FIELD_NAMES

    path = scratch.write("input" + suffix, data)
    for on_error in ("fail", "skip"):
        try:
            res = read_capture(path, on_error=on_error, max_flows=2000)
        except GatewatchError:
            continue
        # Every ended connection is one row, in the canonical layout.
        assert len(res.table) == res.stats["flows"]
        assert res.table.schema.names[: len(CONN_FIELD_NAMES)] == list(CONN_FIELD_NAMES)
        assert isinstance(res.partial, bool)
    try:
        for _ in iter_flows(path, max_flows=2000):
            pass
    except GatewatchError:
        pass


def t_reader(data: bytes, scratch: Scratch, name: str = "input.log") -> None:
    """``flows.readers.read`` (fail and skip) and, for conn logs, the streaming form."""
    from flows.readers import iter_records, read
    from flows.record import CONN_FIELD_NAMES

    path = scratch.write(name, data)
    fmt = None
    for on_error in ("fail", "skip"):
        try:
            res = read(path, on_error=on_error)
        except GatewatchError:
            continue
        fmt = res.format
        if res.family == "conn":
            names = res.table.schema.names
            assert names[: len(CONN_FIELD_NAMES)] == list(CONN_FIELD_NAMES), names
    if fmt in ("zeek-tsv", "zeek-json", "binetflow"):
        try:
            for _ in iter_records(path, on_error="skip"):
                pass
        except GatewatchError:
            pass


def _read_outcome(call) -> str:
    """What a read returned, or the gatewatch error it raised, as comparable text
    (``repr``, so that a NaN equals a NaN)."""
    try:
        res = call()
    except GatewatchError as exc:
        kept = getattr(exc, "result", None)
        return repr((type(exc).__name__, str(exc), getattr(exc, "line", None),
                     getattr(exc, "column", None), _read_state(kept)))
    return repr(_read_state(res))


def _read_state(res) -> tuple | None:
    if res is None:
        return None
    labels = None if res.label_text is None else res.label_text.to_pylist()
    return (res.table.schema, res.table.to_pydict(), res.format, res.family,
            res.skipped, res.warnings, res.partial, res.stats, res.damage, labels)


def t_zeek_pieces(data: bytes, scratch: Scratch) -> None:
    """A file read in pieces (the size drawn from the input, 1-512 bytes) gives
    exactly what the whole read gives, result or error, failing and skipping."""
    from flows.readers import _read_source, read
    from flows.readers import _source as source

    path = scratch.write("input.log", data)
    size = 1 + zlib.crc32(data) % 512
    kept = source.CHUNK_BYTES
    for on_error in ("fail", "skip"):
        mode = on_error
        whole = _read_outcome(
            lambda m=mode: _read_source(source.load(path, m == "fail"), m, "UTC")
        )
        source.CHUNK_BYTES = size
        try:
            pieced = _read_outcome(lambda m=mode: read(path, on_error=m))
        finally:
            source.CHUNK_BYTES = kept
        assert pieced == whole, f"pieces of {size} bytes, {on_error}"


def t_escalation(data: bytes, scratch: Scratch) -> None:
    """``parse_escalation`` with and without a window shape, and the topic parser."""
    from edge_agent import protocol as proto

    for shape in (WINDOW_SHAPE, None):
        try:
            proto.parse_escalation(data, window_shape=shape)
        except GatewatchError:
            pass
    text = data.decode("utf-8", "replace")
    try:
        proto.split_topic(text)
    except GatewatchError:
        pass


def t_verdict(data: bytes, scratch: Scratch) -> None:
    """``parse_verdict``."""
    from edge_agent import protocol as proto

    try:
        proto.parse_verdict(data)
    except GatewatchError:
        pass


def t_bundle(data: bytes, scratch: Scratch) -> None:
    """``verify_bundle`` on the bytes as a bundle file (signature checked)."""
    from edge_agent.bundle import verify_bundle

    _, pub = bundle_keys()
    path = scratch.write("input.bundle.tar.gz", data)
    try:
        verify_bundle(path, pub)
    except GatewatchError:
        pass


def t_manifest(data: bytes, scratch: Scratch) -> None:
    """``verify_bundle`` on a bundle whose (mutated) manifest is properly signed.

    The signature holds, so the manifest parser and the member checks see the
    mutated JSON: this is what a holder of the signing key, or a bug in the
    builder, could hand a gateway.
    """
    from edge_agent.bundle import verify_bundle

    _, pub = bundle_keys()
    path = scratch.write("input.bundle.tar.gz", make_bundle(data, compresslevel=1))
    out = scratch.root / "unpacked"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    try:
        verify_bundle(path, pub, extract_to=out)
    except GatewatchError:
        pass


# ---------------------------------------------------------------------------------
# over-the-air model updates (edge_agent.ota)

_OTA: dict = {}


def _ota_seed_artifact() -> Path:
    """A tiny real ONNX artifact (``tests.test_ota_artifacts``), made once per
    process in a folder of its own."""
    if "artifact" not in _OTA:
        from tests.test_ota_artifacts import make_artifact

        _OTA["dir"] = tempfile.TemporaryDirectory(prefix="gw-fuzz-ota-")
        _OTA["artifact"] = make_artifact(
            Path(_OTA["dir"].name) / "seed", version="fz-1", seed=3
        )
    return _OTA["artifact"]


def _ota_key():
    """The private key updates are signed with, and the public key file."""
    if "pub" not in _OTA:
        from edge_agent import signing

        _ota_seed_artifact()
        priv, pub = signing.generate_keypair(Path(_OTA["dir"].name) / "keys")
        _OTA.update(priv=signing.load_private_key(priv), pub=pub)
    return _OTA["priv"], _OTA["pub"]


def _ota_updater(scratch: Scratch):
    """One updater per scratch folder, over A/B slots in it. Inputs that install
    change its state (the active slot), as a stream of updates does on a gateway."""
    from edge_agent.ota import ModelUpdater

    _, pub = _ota_key()
    key = ("updater", str(scratch.root))
    if key not in _OTA:
        slots = scratch.root / "ota-slots"
        _OTA[key] = ModelUpdater(pub, slots, tolerance=1e-4, **HERE)
    return _OTA[key]


def _ota_apply(scratch: Scratch, message: bytes) -> None:
    """The steps of ``ModelUpdater.handle`` without its catch-all.

    ``handle`` turns any exception into an "internal error" refusal, so the
    property is checked a step inside it: a refusal must be a gatewatch error, and
    anything else escapes here with its own traceback.
    """
    from edge_agent import ota

    updater = _ota_updater(scratch)
    try:
        updater._apply(ota._parse_message(message))
    except GatewatchError:
        pass


def _ota_wrap(archive: bytes, statement: bytes | None = None) -> bytes:
    """An update message carrying ``archive`` inline, signed with the fuzz key;
    ``statement`` replaces the signed statement (it is signed as given)."""
    import base64

    from edge_agent import ota, signing

    priv, _ = _ota_key()
    message = json.loads(ota.sign_archive(archive, "fz-2", priv, **TARGET).message)
    if statement is not None:
        message["statement"] = base64.b64encode(statement).decode()
        message["signature"] = base64.b64encode(signing.sign(priv, statement)).decode()
    return json.dumps(message).encode()


def _ota_archive() -> bytes:
    """The seed artifact as the gzip tar an update carries."""
    from edge_agent.ota import pack_artifact

    return pack_artifact(_ota_seed_artifact())[0]


def seed_ota_message() -> bytes:
    """A complete, validly signed update message (archive inline)."""
    return _ota_wrap(_ota_archive())


def seed_ota_statement() -> bytes:
    """The signed statement of the seed update, as JSON."""
    import base64

    return base64.b64decode(json.loads(seed_ota_message())["statement"])


def seed_ota_archive() -> bytes:
    """The seed update's archive, uncompressed (the target gzips what it gets)."""
    return gzip.decompress(_ota_archive())


def t_ota_message(data: bytes, scratch: Scratch) -> None:
    """An update message as it comes off the model topic."""
    _ota_apply(scratch, data)


def t_ota_statement(data: bytes, scratch: Scratch) -> None:
    """A mutated statement, signed with the key the gateway trusts, around the
    seed archive: what a holder of the key (or a bug in the signer) could send."""
    _ota_apply(scratch, _ota_wrap(_ota_archive(), statement=data))


def t_ota_archive(data: bytes, scratch: Scratch) -> None:
    """A mutated artifact tar, gzipped and properly signed: the unpacking, the
    manifest checks and the health check see hostile archive contents."""
    _ota_apply(scratch, _ota_wrap(gzip.compress(data, compresslevel=1, mtime=0)))


TARGETS: dict[str, tuple[Callable[[bytes, Scratch], None], Callable[[], list[bytes]]]]
TARGETS = {
    "pcap": (t_capture, lambda: [seed_pcap()]),
    "pcapng": (lambda d, s: t_capture(d, s, ".pcapng"), lambda: [seed_pcapng()]),
    "zeek-tsv": (t_reader, lambda: [seed_zeek_tsv()]),
    "zeek-tsv-pieces": (t_zeek_pieces, lambda: [seed_zeek_tsv()]),
    "zeek-json": (t_reader, lambda: [seed_zeek_json()]),
    "zeek-json-pieces": (t_zeek_pieces, lambda: [seed_zeek_json()]),
    "binetflow": (
        lambda d, s: t_reader(d, s, "input.binetflow"),
        lambda: [seed_binetflow()],
    ),
    "nsl-kdd": (lambda d, s: t_reader(d, s, "input.txt"), lambda: [seed_nslkdd()]),
    "unsw-nb15": (lambda d, s: t_reader(d, s, "input.csv"), lambda: [seed_unsw()]),
    "cic-csv": (lambda d, s: t_reader(d, s, "input.csv"), lambda: [seed_cic()]),
    "escalation": (t_escalation, lambda: [seed_escalation()]),
    "verdict": (t_verdict, lambda: [seed_verdict()]),
    "bundle": (t_bundle, lambda: [seed_bundle()]),
    "bundle-manifest": (t_manifest, lambda: [seed_manifest()]),
    "ota-message": (t_ota_message, lambda: [seed_ota_message()]),
    "ota-statement": (t_ota_statement, lambda: [seed_ota_statement()]),
    "ota-archive": (t_ota_archive, lambda: [seed_ota_archive()]),
}


def seeds(kind: str, data_dir: Path | None) -> list[bytes]:
    """Built seeds of one target, then the heads of its real files."""
    return TARGETS[kind][1]() + real_seeds(kind, data_dir)


def run_target(kind: str, data: bytes, scratch: Scratch) -> None:
    """Feed one input to one target; non-gatewatch exceptions propagate."""
    TARGETS[kind][0](data, scratch)


# ---------------------------------------------------------------------------------
# mutation (a plain random-number generator, for the long run without hypothesis)

INTERESTING = [
    b"",
    b"\x00",
    b"\xff",
    b"\x7f",
    b"\x80",
    b"\xff\xff\xff\xff",
    b"\x00\x00\x00\x00",
    b"\x7f\xff\xff\xff",
    b"\x80\x00\x00\x00",
    b"-",
    b"(empty)",
    b"nan",
    b"inf",
    b"-inf",
    b"1e309",
    b"-1",
    b"18446744073709551616",
    b"\t",
    b",",
    b"\n",
    b"\r\n",
    b'"',
    b"{",
    b"}",
    b"[",
    b"]",
    b"null",
    b"true",
    b"\xc3\x28",
    b"\xef\xbb\xbf",
    b"#fields",
    b"#types",
    b"9" * 40,
    b"0x",
    b"::",
    b"1.2.3.4.5",
]


def mutate(data: bytes, rng: random.Random, max_ops: int = 4) -> bytes:
    """Apply 1..max_ops random edits: flips, interesting tokens, cuts, copies."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, max_ops)):
        op = rng.randrange(7)
        n = len(buf)
        pos = rng.randrange(n + 1)
        if op == 0 and n:  # flip bits of one byte
            buf[pos % n] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # overwrite a byte
            buf[pos % n] = rng.randrange(256)
        elif op == 2:  # insert an interesting token
            buf[pos:pos] = rng.choice(INTERESTING)
        elif op == 3 and n:  # delete a range
            del buf[pos : pos + rng.randint(1, 16)]
        elif op == 4:  # truncate
            del buf[pos:]
        elif op == 5 and n:  # duplicate a chunk elsewhere
            start = rng.randrange(n)
            chunk = bytes(buf[start : start + rng.randint(1, 64)])
            where = rng.randrange(len(buf) + 1)
            buf[where:where] = chunk
        elif op == 6 and n >= 4:  # overwrite 4 bytes with an interesting word
            word = rng.choice(
                [
                    b"\xff\xff\xff\xff",
                    b"\x00\x00\x00\x00",
                    b"\x7f\xff\xff\xff",
                    b"\x00\x00\x01\x00",
                ]
            )
            buf[pos % (n - 3) : pos % (n - 3) + 4] = word
    return bytes(buf)


# ---------------------------------------------------------------------------------
# the seeds are valid input


@pytest.fixture(scope="module")
def scratch():
    s = Scratch()
    yield s
    s.cleanup()


@pytest.mark.parametrize("kind", ["pcap", "pcapng"])
def test_built_capture_seeds_give_the_flows_they_hold(kind, scratch):
    from flows.meter import read_capture

    data = seeds(kind, None)[0]
    res = read_capture(scratch.write("seed." + kind, data))
    assert not res.partial and res.warnings == []
    cols = res.table.to_pydict()
    # The VLAN-tagged datagram has the UDP flow's 5-tuple: Zeek counts it there.
    assert sorted(cols["proto"]) == ["tcp", "udp"]
    tcp, udp = cols["proto"].index("tcp"), cols["proto"].index("udp")
    assert (cols["orig_pkts"][udp], cols["resp_pkts"][udp]) == (2, 1)
    assert cols["conn_state"][tcp] == "SF"
    assert cols["orig_bytes"][tcp] == 18 and cols["resp_bytes"][tcp] == 19


@pytest.mark.parametrize(
    "kind,fmt,rows",
    [
        ("zeek-tsv", "zeek-tsv", 3),
        ("zeek-json", "zeek-json", 3),
        ("binetflow", "binetflow", 3),
        ("nsl-kdd", "nsl-kdd", 3),
        ("unsw-nb15", "unsw-nb15", 2),
        ("cic-csv", "cic-csv", 2),
    ],
)
def test_built_text_seeds_read_without_warnings(kind, fmt, rows, scratch):
    from flows.readers import read

    res = read(scratch.write("seed-" + kind, seeds(kind, None)[0]))
    assert (res.format, len(res.table), res.partial) == (fmt, rows, False)
    assert res.skipped == 0


def test_built_message_and_bundle_seeds_are_accepted(scratch):
    from edge_agent import protocol as proto
    from edge_agent.bundle import verify_bundle

    esc = proto.parse_escalation(seed_escalation(), window_shape=WINDOW_SHAPE)
    assert esc["flow"]["dst_port"] == 80 and esc["decision"] == "alert"
    assert proto.parse_verdict(seed_verdict())["verdict"] == "malicious"
    _, pub = bundle_keys()
    for raw in (seed_bundle(), make_bundle(seed_manifest())):
        manifest = verify_bundle(scratch.write("seed.tar.gz", raw), pub)
        assert set(manifest.files) == set(BUNDLE_MEMBERS)


def test_built_ota_seeds_install_and_score_like_the_seed_artifact(tmp_path):
    """Each OTA seed, through its target's wrapping, is an update a gateway takes:
    it installs, and the model it activates scores like the seed artifact."""
    from edge_agent.ota import ModelUpdater
    from edge_agent.runtime import load_artifact
    from tests.test_ota_artifacts import W, fit_conn_encoder, numpy_scores

    _, pub = _ota_key()
    shape = (8, W, fit_conn_encoder().n_features)
    windows = np.random.default_rng(5).uniform(0, 1, shape).astype(np.float32)
    messages = {
        "ota-message": seed_ota_message(),
        "ota-statement": _ota_wrap(_ota_archive(), statement=seed_ota_statement()),
        "ota-archive": _ota_wrap(gzip.compress(seed_ota_archive(), mtime=0)),
    }
    for kind, message in messages.items():
        updater = ModelUpdater(pub, tmp_path / kind, tolerance=1e-4, **HERE)
        result = updater.handle(message)
        assert result.ok and result.changed, (kind, result.reason)
        scorer = load_artifact(updater.slots.current_path)
        np.testing.assert_allclose(
            scorer.score(windows), numpy_scores(windows, 3), atol=1e-5
        )


def test_mutate_changes_inputs_and_is_deterministic():
    base = seed_pcap()
    outs = [mutate(base, random.Random(i)) for i in range(200)]
    assert sum(o != base for o in outs) >= 190
    assert outs == [mutate(base, random.Random(i)) for i in range(200)]
