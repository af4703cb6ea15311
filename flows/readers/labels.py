"""What each source's label text means: malicious (1), benign (0) or unknown (null).

The rule everywhere is that a label is never guessed. A text that none of the known
spellings matches is an error (or a skipped row), not benign; a file without any
label column gets null labels, not zeros.
"""

from __future__ import annotations

import numpy as np

from flows.readers._convert import BadRows
from flows.readers._lazy import LazyModule

pa = LazyModule("pyarrow")
pc = LazyModule("pyarrow.compute")

# Stratosphere / IoT-23 Zeek labels, compared without case.
ZEEK_LABELS: dict[str, int | None] = {
    "malicious": 1,
    "benign": 0,
    "background": None,
    "unknown": None,
}

# The standard NSL-KDD attack -> family map, with the attacks found only in KDDTest+.
ATTACK_FAMILY: dict[str, str] = {
    "normal": "normal",
    **dict.fromkeys(
        [
            "back",
            "land",
            "neptune",
            "pod",
            "smurf",
            "teardrop",
            "apache2",
            "mailbomb",
            "processtable",
            "udpstorm",
            "worm",
        ],
        "DoS",
    ),
    **dict.fromkeys(
        ["ipsweep", "nmap", "portsweep", "satan", "mscan", "saint"], "Probe"
    ),
    **dict.fromkeys(
        [
            "ftp_write",
            "guess_passwd",
            "imap",
            "multihop",
            "phf",
            "spy",
            "warezclient",
            "warezmaster",
            "named",
            "sendmail",
            "snmpgetattack",
            "snmpguess",
            "xlock",
            "xsnoop",
            "httptunnel",
        ],
        "R2L",
    ),
    **dict.fromkeys(
        [
            "buffer_overflow",
            "loadmodule",
            "perl",
            "rootkit",
            "ps",
            "sqlattack",
            "xterm",
        ],
        "U2R",
    ),
}


def zeek_label(text: pa.Array, column: str, bad: BadRows) -> pa.Array:
    """Map Stratosphere label text (nulls already applied) to int8 1/0/null."""
    lowered = pc.utf8_lower(pc.utf8_trim_whitespace(text))
    known = pc.is_in(lowered, value_set=pa.array(list(ZEEK_LABELS)))
    unknown = pc.and_(pc.invert(known), pc.is_valid(lowered))
    if pc.any(unknown).as_py():
        for row in np.flatnonzero(np.asarray(unknown.fill_null(False))):
            bad.add(
                int(row),
                column,
                f"unknown label {text[row].as_py()!r} (expected Malicious, Benign, "
                "Background or Unknown)",
            )
    one = pc.equal(lowered, "malicious")
    zero = pc.equal(lowered, "benign")
    out = pc.if_else(
        one,
        pa.scalar(1, pa.int8()),
        pc.if_else(zero, pa.scalar(0, pa.int8()), pa.scalar(None, pa.int8())),
    )
    return out


def ctu_label(text: str | None) -> int | None | str:
    """Map one CTU binetflow label to 1/0/None; the string ``"?"`` when unknown.

    ``flow=From-Botnet-V42-TCP-CC`` and ``flow=Malware-TCP`` are malicious,
    ``flow=To-Normal-...``/``flow=Normal-...`` benign, ``flow=Background-...`` and an
    empty label unknown. Tokens are compared without case after ``flow=``.
    """
    if text is None:
        return None
    body = text.strip()
    if body.lower().startswith("flow="):
        body = body[5:]
    if not body:
        return None
    tokens = {t.lower() for t in body.replace("_", "-").split("-")}
    if tokens & {"botnet", "malware", "malicious", "attack", "cc"}:
        return 1
    if tokens & {"normal", "benign"}:
        return 0
    if tokens & {"background", "unknown"}:
        return None
    return "?"


def attack_family(name: str) -> str | None:
    """The NSL-KDD family of an attack name (``normal`` for normal), None if unknown."""
    return ATTACK_FAMILY.get(name.strip().lower().rstrip("."))
