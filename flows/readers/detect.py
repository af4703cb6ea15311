"""Format detection from a file's first bytes (its name is only a tie-breaker)."""

from __future__ import annotations

import re

from flows.errors import BadInputError

PCAP_MAGICS = (
    b"\xd4\xc3\xb2\xa1",
    b"\xa1\xb2\xc3\xd4",  # microsecond, both byte orders
    b"\x4d\x3c\xb2\xa1",
    b"\xa1\xb2\x3c\x4d",  # nanosecond, both byte orders
)
PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"
PARQUET_MAGIC = b"PAR1"
FORMATS = (
    "zeek-tsv",
    "zeek-json",
    "binetflow",
    "nsl-kdd",
    "unsw-nb15",
    "cic-csv",
    "parquet",
    "pcap",
    "pcapng",
)

# Columns a CSV-family header must hold to be read as that format, as written in
# the datasets (matched in any case), and how an error names the format.
_BINETFLOW_MARKERS = ("StartTime", "SrcAddr", "DstAddr")
_UNSW_MARKERS = ("attack_cat", "sbytes")
_NEAR_MISSES = (
    ("an Argus binetflow file", _BINETFLOW_MARKERS),
    ("a UNSW-NB15 CSV", _UNSW_MARKERS),
)
_CIC_MARKERS = {
    "flow duration",
    "flow bytes/s",
    "fwd packet length max",
    "total fwd packets",
    "flow iat mean",
}

# Headerless Zeek TSV (what ``zeek-cut`` prints by default): the column names only
# Zeek uses, a time as Zeek writes it (epoch seconds with six decimals, or the ISO
# form of ``zeek-cut -d``) and a connection uid (``CHhAvVGS1DHFjwGM9``).
_ZEEK_ID_NAMES = {"id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p"}
_ZEEK_TIME = re.compile(
    r"\d{1,11}\.\d{6}|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([+-]\d{4}|Z)?"
)
_ZEEK_UID = re.compile(r"C[0-9A-Za-z]{10,20}")
_KEEP_THE_HEADER = (
    "expected the #separator, #fields and #types lines that name and type its "
    "columns: keep them (zeek-cut -c, or -C for every header block) or read the "
    "log itself"
)


def sniff_binary(head: bytes) -> str | None:
    """``parquet``, ``pcap`` or ``pcapng`` from the magic bytes, else None."""
    if head[:4] == PARQUET_MAGIC:
        return "parquet"
    if head[:4] in PCAP_MAGICS:
        return "pcap"
    if head[:4] == PCAPNG_MAGIC:
        return "pcapng"
    return None


def sniff_text(data: bytes, path: str) -> str:
    """Name the text format of ``data`` (already gunzipped), or raise BadInputError."""
    from flows.readers.nslkdd import kdd_header, looks_like_kdd

    head = data[:65536]
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    text = head.lstrip()
    if text.startswith(b"#separator") or text.startswith(b"#fields"):
        return "zeek-tsv"
    if text.startswith(b"{"):
        return "zeek-json"
    if text[:1] in (b"@", b"%") and b"@relation" in text.lower():
        return "nsl-kdd"

    first = text.split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r")
    if looks_like_kdd(first) or kdd_header(first) is not None:
        return "nsl-kdd"
    sep = "\t" if first.count("\t") > first.count(",") else ","
    names = {f.strip().lower() for f in first.split(sep)}
    if {m.lower() for m in _BINETFLOW_MARKERS} <= names:
        return "binetflow"
    if {m.lower() for m in _UNSW_MARKERS} <= names:
        return "unsw-nb15"
    if len(names & _CIC_MARKERS) >= 2:
        return "cic-csv"
    line = head[: len(head) - len(text)].count(b"\n") + 1
    binary = b"\x00" in head[:512]
    headerless = None if binary else _headerless_zeek(first)
    if headerless is not None:
        # Refused, not guessed: without #fields the columns have no names.
        raise BadInputError(
            f"looks like {headerless}; {_KEEP_THE_HEADER}", path=path, line=line
        )
    near = _near_miss(names)
    if near is not None and not binary:
        what, missing = near
        listed = " or ".join(repr(m) for m in missing)
        raise BadInputError(
            f"looks like {what} but the header has no {listed} column",
            path=path,
            line=line,
            column=missing[0] if len(missing) == 1 else None,
        )
    if binary:
        what = "binary data"
    else:
        what = f"first line {first[:60]!r}"
    raise BadInputError(
        f"unknown format ({what}); expected one of: {', '.join(FORMATS)}",
        path=path,
        line=None,
    )


def _near_miss(names: set[str]) -> tuple[str, list[str]] | None:
    """The CSV family a header almost names, and the marker columns it lacks.

    Used to say what is missing instead of "unknown format": only a header with at
    least half of one family's markers counts, so a random CSV stays unknown. When
    two families qualify, the one with the larger share of its markers is named.
    """
    best: tuple[float, str, list[str]] | None = None
    for what, markers in _NEAR_MISSES:
        missing = [m for m in markers if m.lower() not in names]
        share = (len(markers) - len(missing)) / len(markers)
        if missing and share >= 0.5 and (best is None or share > best[0]):
            best = (share, what, missing)
    return None if best is None else (best[1], best[2])


def _headerless_zeek(first: str) -> str | None:
    """What ``first`` (the first line) shows of Zeek TSV without its header, or None.

    Two shapes: a line of Zeek column names alone (``ts<TAB>uid<TAB>id.orig_h``,
    as ``zeek-cut -m`` prints), or a line of values (``zeek-cut`` without ``-c``):
    tab-separated, with a Zeek time and an IP address or a connection uid, or
    with both of the latter.
    """
    from flows.record import is_address

    fields = first.split("\t")
    if len(fields) < 2:
        return None
    if _ZEEK_ID_NAMES & {f.strip() for f in fields}:
        return (
            "Zeek TSV whose header is a bare line of field names (e.g. zeek-cut -m "
            "output)"
        )
    time = any(_ZEEK_TIME.fullmatch(f) for f in fields)
    uid = any(_ZEEK_UID.fullmatch(f) for f in fields)
    address = any(is_address(f) for f in fields)
    if (time and (uid or address)) or (uid and address):
        return "Zeek TSV without its header (e.g. zeek-cut output)"
    return None
