"""Argus bidirectional flow files (``.binetflow``, CTU-13 style), comma or tab.

Mapping onto the canonical conn record:

* ``StartTime`` (``YYYY/MM/DD HH:MM:SS.ffffff``) -> ``ts``. Argus writes the local
  time of the machine it ran on, without a zone: it is read in the ``timezone``
  option (an IANA name such as ``Europe/Prague``; default ``UTC``). In a zone, a
  time the clock shows twice (the hour repeated when summer time ends) is read as
  the first of the two, and a time it skips (the hour lost when summer time starts)
  with the offset from before the change (Python's ``fold=0``). A ``ts`` before 1970
  (below 0) makes the row a bad row, named ``StartTime``; so does a date that does
  not exist (``2011/02/30``, or ``2011/02/29`` in a year that is no leap year), as
  a month 13 or an hour 25 does: it is not moved on into the next month.
  ``Dur`` -> ``duration``; ``Proto`` -> ``proto`` (lower case; one that is neither
  a protocol name nor a number 0..255 makes the row a bad row);
  ``SrcAddr``/``Sport`` -> ``src_ip``/``src_port`` and ``DstAddr``/``Dport`` ->
  ``dst_ip``/``dst_port`` (hex ports such as ``0x0035`` are read as numbers); an
  address that is not IPv4/IPv6 or a port outside 0..65535 makes the row a bad
  row, except in Argus records of no IP flow (Proto ``man`` management records,
  layer-2 flows whose addresses are MAC addresses): their addresses read as
  null, counted in ``stats["non_ip"]`` with a warning;
  ``State`` -> ``conn_state`` (Argus's state names, not Zeek's).
* Argus byte counts include IP headers, so ``SrcBytes`` -> ``orig_ip_bytes`` and
  ``TotBytes - SrcBytes`` -> ``resp_ip_bytes``; ``SrcPkts`` -> ``orig_pkts`` and
  ``TotPkts - SrcPkts`` -> ``resp_pkts``. Without a ``SrcPkts`` column both packet
  fields are null: the split is unknown and is not guessed. ``orig_bytes``,
  ``resp_bytes`` (payload), ``uid``, ``service``, ``history`` and ``missed_bytes``
  are null. A negative ``Dur``, ``TotBytes``, ``SrcBytes``, ``TotPkts`` or
  ``SrcPkts`` makes the row a bad row named by that column; so does a total
  smaller than its ``Src`` part, named by the total.
* ``Dir`` is *not* used to swap the sides: Argus already names the side that
  started the flow ``Src``; ``<-`` only says that traffic was seen from Dst alone,
  and swapping would break the Src* counters. The counts of each ``Dir`` are in
  ``stats["dir"]``.
* ``Label``: ``From-Botnet``/``Botnet``/``Malware`` -> 1, ``Normal`` -> 0,
  ``Background`` or empty -> null; a label naming none of these (Slips data has
  ``flow=TCP-Established-To-Microsoft-7``) is null too, counted in a warning
  (see :func:`flows.readers.labels.ctu_label`);
  ``label_detail`` is the label as written.
"""

from __future__ import annotations

import calendar
import functools
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flows.errors import BadInputError, UsageError
from flows.readers._convert import (
    BadRows,
    check_addresses,
    check_counts,
    check_ports,
    check_protos,
    check_times,
    note_rows,
    to_number,
    value_counts,
)
from flows.readers._finish import Problem, finish
from flows.readers._source import Source
from flows.readers._table import header_and_body, split_rows
from flows.readers.labels import ctu_label
from flows.readers.result import ReadResult
from flows.record import CONN_FIELD_NAMES, conn_schema

REQUIRED = ("StartTime", "Proto", "SrcAddr", "DstAddr")
# Columns of durations and packet/byte counts, never below 0.
COUNTS = ("Dur", "TotBytes", "SrcBytes", "TotPkts", "SrcPkts")
DEFAULT_TIMEZONE = "UTC"
# Files of the system's zone folder that zoneinfo opens but that name no zone:
# links to whatever zone this machine is set to (so a file would be read in a
# different zone on each machine), and tzdata's placeholder zone.
NOT_ZONES = frozenset({"localtime", "posixrules", "Factory"})


@functools.cache
def zone_names() -> frozenset[str]:
    """The IANA zone names this Python knows (the ``tzdata`` package's list and
    the system's zone folder; ``posix/`` and ``right/`` copies not included),
    less :data:`NOT_ZONES`. Read once: it opens every file of the folder."""
    return frozenset(available_timezones()) - NOT_ZONES


def time_zone(name: str) -> ZoneInfo | None:
    """The zone ``name`` (an IANA name) for reading StartTime; None for ``UTC``.

    A name that is not an IANA zone (not in :func:`zone_names`: a typo, a path,
    ``localtime``) is a UsageError. ``UTC`` needs no zone data.
    """
    if name == DEFAULT_TIMEZONE:
        return None
    expected = "expected an IANA name such as Europe/Prague or America/New_York, or UTC"
    if name in NOT_ZONES:
        raise UsageError(
            f"unknown time zone {name!r}: it names no zone of its own (a link to "
            f"this machine's zone, or a placeholder); {expected}"
        )
    try:
        if name not in zone_names():
            raise ZoneInfoNotFoundError(name)
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise UsageError(f"unknown time zone {name!r}: {expected}") from None


def read_binetflow(
    src: Source, on_error: str, timezone: str = DEFAULT_TIMEZONE
) -> ReadResult:
    """Read an Argus binetflow file into canonical conn records.

    ``timezone`` names the zone the file's StartTime is written in (see the module
    doc); an unknown name is a UsageError.
    """
    zone = time_zone(timezone)
    first, body = header_and_body(src.data)
    delimiter = "\t" if first.count("\t") > first.count(",") else ","
    names = [n.strip() for n in first.split(delimiter)]
    index = {n.lower(): i for i, n in enumerate(names)}
    for name in REQUIRED:
        if name.lower() not in index:
            raise BadInputError(
                f"header has no {name!r} column (required: {', '.join(REQUIRED)})",
                path=src.path,
                line=1,
                column=name,
            )
    strings, lines, problems, cut = split_rows(
        body, names, delimiter, path=src.path, first_line=2
    )
    n = strings.num_rows
    bad = BadRows()

    def col(name: str) -> pa.Array | None:
        i = index.get(name.lower())
        if i is None:
            return None
        arr = pc.utf8_trim_whitespace(strings.column(f"c{i}").combine_chunks())
        return pc.if_else(pc.equal(arr, ""), pa.scalar(None, pa.string()), arr)

    def number(name: str, kind: str) -> pa.Array:
        arr = col(name)
        if arr is None:
            return pa.nulls(n, pa.float64() if kind == "f64" else pa.int64())
        return to_number(arr, kind, name, bad, hex_ok=kind == "i64")[0]

    out: dict[str, pa.Array] = {}
    out["ts"] = _start_time(col("StartTime"), bad, zone)
    check_times(out["ts"], "StartTime", bad)
    out["duration"] = number("Dur", "f64")
    out["proto"] = pc.utf8_lower(col("Proto"))
    check_protos(out["proto"], "Proto", bad)
    out["src_ip"] = col("SrcAddr")
    out["dst_ip"] = col("DstAddr")
    out["src_port"] = number("Sport", "i64")
    out["dst_port"] = number("Dport", "i64")
    non_ip = _non_ip(out["proto"], out["src_ip"], out["dst_ip"])
    if pc.any(non_ip).as_py():
        for canon in ("src_ip", "dst_ip"):
            out[canon] = pc.if_else(non_ip, pa.scalar(None, pa.string()), out[canon])
    for canon, name in (("src_ip", "SrcAddr"), ("dst_ip", "DstAddr")):
        check_addresses(out[canon], name, bad)
    for canon, name in (("src_port", "Sport"), ("dst_port", "Dport")):
        check_ports(out[canon], name, bad)
    state = col("State")
    out["conn_state"] = state if state is not None else pa.nulls(n, pa.string())

    tot_bytes, src_bytes = number("TotBytes", "i64"), number("SrcBytes", "i64")
    tot_pkts, src_pkts = number("TotPkts", "i64"), number("SrcPkts", "i64")
    counts = (out["duration"], tot_bytes, src_bytes, tot_pkts, src_pkts)
    for arr, name in zip(counts, COUNTS, strict=True):
        check_counts(arr, name, bad)
    out["orig_ip_bytes"] = src_bytes
    out["resp_ip_bytes"] = _rest(tot_bytes, src_bytes, "SrcBytes", "TotBytes", bad)
    out["orig_pkts"] = src_pkts
    out["resp_pkts"] = _rest(tot_pkts, src_pkts, "SrcPkts", "TotPkts", bad)

    stats: dict = {"labels": {}, "labeled": "label" in index, "non_ip": 0}
    raw_label = col("Label")
    written = None
    if raw_label is not None:
        written = pc.utf8_trim_whitespace(
            strings.column(f"c{index['label']}").combine_chunks()
        )
        out["label"] = _labels(raw_label)
        out["label_detail"] = raw_label
        stats["labeled"] = bool(pc.any(pc.is_valid(raw_label)).as_py())
    direction = col("Dir")

    def tally(keep: np.ndarray) -> tuple[dict, list[str]]:
        """Records without IP addresses, Dir values and unknown labels in the rows
        kept."""
        notes: list[str] = []
        mask = pa.array(keep)
        lacking = np.flatnonzero(np.asarray(non_ip.fill_null(False)) & keep)
        counted: dict = {"non_ip": len(lacking)}
        if len(lacking):
            notes.append(
                f"{src.path}: {len(lacking)} Argus record(s) without IP addresses "
                "(management records, layer-2 flows with MAC addresses; the first "
                f"at line {int(lines[lacking[0]])}) read with null src_ip/dst_ip"
            )
        if raw_label is not None:
            notes += _unknown_labels(raw_label.filter(mask), src.path)
        if direction is not None:
            counted["dir"] = value_counts(direction.filter(mask), null_as="")
        return counted, notes

    table = pa.Table.from_arrays(
        [
            out.get(name, pa.nulls(n, conn_schema().field(name).type))
            for name in CONN_FIELD_NAMES
        ],
        schema=conn_schema(),
    )
    row_problems = {
        row: Problem(int(lines[row]), column, message)
        for row, (column, message) in bad.rows.items()
    }
    return finish(
        table,
        lines,
        problems,
        path=src.path,
        on_error=on_error,
        fmt="binetflow",
        family="conn",
        cut=src.cut or cut,
        stats=stats,
        row_problems=row_problems,
        label_text=written,
        tally=tally,
        non_ip=np.asarray(non_ip.fill_null(False)),
    )


_MAC = r"^[0-9a-fA-F]{1,2}(:[0-9a-fA-F]{1,2}){5}$"


def _non_ip(proto: pa.Array, src: pa.Array, dst: pa.Array) -> pa.Array:
    """Rows that are Argus records of no IP flow: ``man`` records, MAC addresses.

    Argus writes management records (Proto ``man``, addresses ``0``) and layer-2
    flows (``llc``, ``arp`` replies...) whose addresses are MAC addresses.
    """
    man = pc.fill_null(pc.equal(proto, "man"), False)
    mac = pc.and_(
        pc.fill_null(pc.match_substring_regex(src, _MAC), True),
        pc.fill_null(pc.match_substring_regex(dst, _MAC), True),
    )
    any_mac = pc.or_(
        pc.fill_null(pc.match_substring_regex(src, _MAC), False),
        pc.fill_null(pc.match_substring_regex(dst, _MAC), False),
    )
    return pc.or_(man, pc.and_(mac, any_mac))


def _start_time(arr: pa.Array, bad: BadRows, zone: ZoneInfo | None) -> pa.Array:
    """``YYYY/MM/DD HH:MM:SS[.ffffff]`` (or with ``-``) as epoch seconds.

    The text is the local time of ``zone`` (None: UTC).
    """
    text = pc.replace_substring(arr, "-", "/")
    whole = pc.utf8_slice_codeunits(text, 0, 19)
    frac = pc.utf8_slice_codeunits(text, 19, 64)
    secs = pc.strptime(whole, format="%Y/%m/%d %H:%M:%S", unit="s", error_is_null=True)
    frac_ok = pc.or_(pc.equal(frac, ""), pc.match_substring_regex(frac, r"^\.\d+$"))
    fraction = pc.cast(
        pc.if_else(frac_ok, pc.binary_join_element_wise("0", frac, ""), "0"),
        pa.float64(),
    )
    wrong = pc.and_(pc.is_valid(arr), pc.or_(pc.is_null(secs), pc.invert(frac_ok)))
    if pc.any(wrong).as_py():
        for row in np.flatnonzero(np.asarray(wrong.fill_null(False))):
            bad.add(
                int(row),
                "StartTime",
                f"expected YYYY/MM/DD HH:MM:SS.ffffff, found {arr[row].as_py()!r}",
            )
    _impossible_dates(whole, secs, arr, bad)
    seconds = pc.cast(secs, pa.int64())
    if zone is not None:
        seconds = _local_to_utc(seconds, zone)
    return pc.add(pc.cast(seconds, pa.float64()), fraction)


def _impossible_dates(
    whole: pa.Array, secs: pa.Array, arr: pa.Array, bad: BadRows
) -> None:
    """Note the rows whose StartTime names a day its month does not have.

    Arrow's ``strptime`` takes any day from 1 to 31 and rolls the surplus into
    the next month (``2011/02/30`` reads as 2011-03-02): a parsed day that differs
    from the day written is such a date, and the row is a bad row named
    ``StartTime``, as a month 13 is.
    """
    day_written = r"^\d+/\d+/(?P<day>\d+) "
    written = pc.struct_field(pc.extract_regex(whole, day_written), "day")
    shifted = pc.not_equal(pc.day(secs), pc.cast(written, pa.int64()))
    rows = np.flatnonzero(np.asarray(shifted.fill_null(False)))
    for row in rows:
        text = arr[row].as_py()
        year, month = (int(part) for part in whole[row].as_py().split("/")[:2])
        days = calendar.monthrange(year, month)[1]
        bad.add(
            int(row),
            "StartTime",
            f"expected YYYY/MM/DD HH:MM:SS.ffffff with a day its month has, found "
            f"{text!r} ({year:04d}/{month:02d} has {days} days)",
        )


_EPOCH = datetime(1970, 1, 1)


def _local_to_utc(local: pa.Array, zone: ZoneInfo) -> pa.Array:
    """Whole seconds of wall-clock time in ``zone`` -> UTC epoch seconds.

    Each distinct second is looked up once: a file holds far fewer distinct
    seconds than rows. A time outside Python's years 1..9999 keeps offset 0 (a
    year 0 is before 1970, a bad row whatever the offset).
    """
    valid = np.asarray(pc.is_valid(local))
    if not valid.any():
        return local
    values = np.asarray(local.fill_null(0))
    distinct, where = np.unique(values[valid], return_inverse=True)
    offsets = np.zeros(len(distinct), dtype=np.int64)
    for i, second in enumerate(distinct.tolist()):
        try:
            wall = (_EPOCH + timedelta(seconds=second)).replace(tzinfo=zone)
            offsets[i] = int(wall.utcoffset().total_seconds())
        except (OverflowError, ValueError):
            continue
    utc = np.zeros(len(values), dtype=np.int64)
    utc[valid] = (distinct - offsets)[where]
    return pa.array(utc, type=pa.int64(), mask=~valid)


def _rest(
    total: pa.Array, part: pa.Array, part_name: str, total_name: str, bad: BadRows
) -> pa.Array:
    """``total - part``: the responder's share of a total that counts both sides.

    A row where it comes out below 0 is a bad row named by the total's column: it
    was expected to hold the part. (A negative total or part is noted before this,
    by ``check_counts``, and that note is the one kept.)
    """
    rest = pc.subtract(total, part)
    note_rows(
        pc.less(rest, 0),
        total_name,
        bad,
        lambda row: f"expected at least {part_name} ({part[row].as_py()}), "
        f"found {total[row].as_py()}",
    )
    return rest


def _labels(text: pa.Array) -> pa.Array:
    """Map CTU labels to 1/0/null; texts no rule knows read as null (see
    :func:`_unknown_labels` for the note)."""
    unique = pc.unique(text).to_pylist()
    mapped = {u: ctu_label(u) for u in unique if u is not None}
    keys = [k for k, v in mapped.items() if v in (0, 1)]
    values = pa.array([mapped[k] for k in keys], pa.int8())
    return pc.take(values, pc.index_in(text, value_set=pa.array(keys, pa.string())))


def _unknown_labels(text: pa.Array, path: str) -> list[str]:
    """A note on the rows whose CTU label no rule knows (read as null), if any."""
    unknown = sorted(
        u for u in pc.unique(text).to_pylist() if u is not None and ctu_label(u) == "?"
    )
    if not unknown:
        return []
    count = pc.sum(pc.is_in(text, value_set=pa.array(unknown))).as_py()
    return [
        f"{path}: {count} row(s) carry CTU labels that name neither "
        f"Botnet/Malware, Normal nor Background; their label is null: "
        f"{', '.join(unknown[:5])}"
    ]
