"""CSV feature families: UNSW-NB15 and CICFlowMeter (CIC-IDS2017/2018) exports.

UNSW-NB15: the UTF-8 BOM and CRLF endings are handled; ``id`` is dropped; ``proto``,
``service`` and ``state`` stay text (``service`` ``-`` means none and reads as
null); every other feature is float64; ``label`` is checked to be 0 or 1 and
``attack_cat`` becomes ``label_detail``. A negative duration or byte/packet total
(``dur``, ``spkts``, ``dpkts``, ``sbytes``, ``dbytes``) makes the row a bad row, as in
the Zeek readers, and so does a packet/byte total that is not a whole number
(``3.5``; ``3.0`` is 3); so does an ``stime`` or ``ltime`` (epoch seconds, in files
with the full data set's columns) below 0, before 1970.

CICFlowMeter: column names are stripped of spaces; a name that repeats (CIC-IDS2017
has ``Fwd Header Length`` twice) gets ``_2``, ``_3``... and a warning; header rows
repeated inside the file (files joined with ``cat``) are dropped and counted in
``stats["repeated_headers"]``. The one rule for unusable numbers: **``Infinity``,
``-Infinity``, ``NaN`` and empty values in any numeric column read as null**, and
their count is ``stats["non_finite"]`` (with a warning). The identifying columns
(flow id, addresses, timestamp) stay text; ``Label`` ``BENIGN`` (any case) -> 0,
any other text -> 1, empty -> null; ``label_detail`` is the label as written.
A negative ``Flow Duration`` or packet/byte total (``Total Fwd Packets``,
``TotLen Bwd Pkts``... in any of CICFlowMeter's spellings) makes the row a bad row,
and so does a packet/byte total that is not a whole number (``2.5``; ``2.0`` is 2);
other columns may be below 0 (``Init_Win_bytes_forward`` is -1 when no window was
seen) and are left as written.

In both families a port (``sport``, ``dsport``, ``Source Port``, ``Dst Port``...)
must be a whole number from 0 to 65535 (``80.0`` is 80): ``1.5`` or ``70000``
makes the row a bad row. The protocol follows the conn record's rule
(``flows.record.proto_problem``): UNSW-NB15's ``proto`` a protocol name or a
number 0..255 (``bogus proto`` or ``300`` is a bad row), CICFlowMeter's
``Protocol`` a whole number 0..255 (``300``, ``6.5`` or ``-4`` is a bad row).
A UNSW-NB15 header without ``proto``, ``service`` or ``state`` whose rows hold
text in a column read as numbers (``proto`` renamed ``protocol``) is refused
for the missing column, the cause, not for each row's text. One without
``label`` or ``attack_cat`` is refused; one without another of the features
every UNSW-NB15 file has (:data:`UNSW_CORE`: ``spkts``, ``sbytes``...) is read,
with a warning naming them, as an encoder fitted on the data set would find
them missing. A file that is not
UTF-8 is read as Windows-1252 (CIC-IDS2017's Thursday file is).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flows.errors import BadInputError
from flows.readers._convert import (
    BadRows,
    check_addresses,
    check_counts,
    check_ports,
    check_proto_numbers,
    check_protos,
    check_times,
    to_number,
)
from flows.readers._finish import Problem, finish
from flows.readers._source import Source
from flows.readers._table import header_and_body, split_rows
from flows.readers.result import ReadResult

UNSW_TEXT = ("proto", "service", "state", "srcip", "dstip")
# The text features every UNSW-NB15 file has (the partitions and the full files).
UNSW_FEATURE_TEXT = ("proto", "service", "state")
# Every feature the partitions and the full files both have (matched in any case:
# the full files write ``Spkts``); a file without one is read with a warning.
UNSW_CORE = ("dur", "proto", "service", "state", "spkts", "dpkts", "sbytes", "dbytes")
CIC_TEXT = {
    "flow id",
    "source ip",
    "src ip",
    "destination ip",
    "dst ip",
    "timestamp",
    "simillarhttp",
    "label",
}
# Columns that hold addresses and ports, in either family (lower case).
ADDRESS_COLUMNS = {"source ip", "src ip", "destination ip", "dst ip", "srcip", "dstip"}
PORT_COLUMNS = {
    "source port",
    "src port",
    "destination port",
    "dst port",
    "sport",
    "dsport",
}
# Durations and packet/byte totals, which are never below 0 (lower case). UNSW-NB15
# defines none of its features as negative; only these are checked, as Zeek's are.
UNSW_COUNTS = {"dur", "spkts", "dpkts", "sbytes", "dbytes"}
# Of those, the packet and byte totals: whole numbers as well (``dur`` is seconds).
UNSW_WHOLE = UNSW_COUNTS - {"dur"}
# Start and last time, epoch seconds, in the full UNSW-NB15_1..4 files' columns (the
# training/testing partitions have none): a time before 1970 is a bad row, as in Zeek.
UNSW_TIMES = {"stime", "ltime"}
# CICFlowMeter's names for them: CIC-IDS2017, CSE-CIC-IDS2018, CICFlowMeter-V4.
CIC_COUNTS = {
    "flow duration",
    "total fwd packets",
    "total backward packets",
    "total length of fwd packets",
    "total length of bwd packets",
    "tot fwd pkts",
    "tot bwd pkts",
    "totlen fwd pkts",
    "totlen bwd pkts",
    "total fwd packet",
    "total bwd packets",
    "total length of fwd packet",
    "total length of bwd packet",
}
# Of those, the packet and byte totals: whole numbers as well (``Flow Duration`` is
# microseconds, and not checked for a fraction).
CIC_WHOLE = CIC_COUNTS - {"flow duration"}


def read_unsw(src: Source, on_error: str) -> ReadResult:
    """Read a UNSW-NB15 CSV into the unsw-nb15 feature family."""
    first, body = header_and_body(src.data)
    names = [n.strip() for n in first.split(",")]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        # No UNSW-NB15 file repeats a column: which copy holds the values is
        # unknown, so the header is refused rather than one copy kept.
        raise BadInputError(
            f"header names {', '.join(map(repr, twice))} more than once; a "
            "UNSW-NB15 header names each column once",
            path=src.path, line=1, column=twice[0],
        )
    for name in ("label", "attack_cat"):
        if name not in names:
            raise BadInputError(
                f"header has no {name!r} column", path=src.path, line=1, column=name
            )
    strings, lines, problems, cut = split_rows(
        body, names, ",", path=src.path, first_line=2, quote='"'
    )
    bad = BadRows()
    arrays, fields = [], []
    absent = [name for name in UNSW_FEATURE_TEXT if name not in names]
    for i, name in enumerate(names):
        if name in ("id", "label", "attack_cat"):
            continue
        arr = pc.utf8_trim_whitespace(strings.column(f"c{i}").combine_chunks())
        if name in UNSW_TEXT:
            if name == "service":
                arr = pc.if_else(pc.equal(arr, "-"), pa.scalar(None, pa.string()), arr)
            elif name == "proto":
                check_protos(arr, name, bad)
            arrays.append(arr)
            fields.append(pa.field(name, pa.string()))
        else:
            text_in = BadRows()
            values = to_number(arr, "f64", name, text_in)[0]
            if absent and text_in.rows:
                _refuse_renamed_text(text_in, arr, name, absent, lines, src.path)
            for row, (column, message) in text_in.rows.items():
                bad.add(row, column, message)
            if name.lower() in UNSW_COUNTS:
                check_counts(values, name, bad, whole=name.lower() in UNSW_WHOLE)
            elif name.lower() in UNSW_TIMES:
                check_times(values, name, bad)
            arrays.append(values)
            fields.append(pa.field(name, pa.float64()))

    label_text = pc.utf8_trim_whitespace(
        strings.column(f"c{names.index('label')}").combine_chunks()
    )
    label, _ = to_number(label_text, "i8", "label", bad)
    not_binary = pc.invert(pc.is_in(label, value_set=pa.array([0, 1], pa.int8())))
    for row in np.flatnonzero(np.asarray(not_binary.fill_null(False))):
        bad.add(
            int(row), "label", f"expected 0 or 1, found {label_text[row].as_py()!r}"
        )
    detail = pc.utf8_trim_whitespace(
        strings.column(f"c{names.index('attack_cat')}").combine_chunks()
    )
    detail = pc.if_else(pc.equal(detail, ""), pa.scalar(None, pa.string()), detail)
    arrays += [label, detail]
    fields += [pa.field("label", pa.int8()), pa.field("label_detail", pa.string())]

    _check_endpoints(arrays, fields, bad)
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    stats = {"labels": {}, "labeled": True}
    lower = {name.lower() for name in names}
    missing = [name for name in UNSW_CORE if name not in lower]
    warnings = []
    if missing:
        warnings.append(
            f"{src.path}: header has no {', '.join(map(repr, missing))} column"
            f"{'s' if len(missing) > 1 else ''}, which every UNSW-NB15 file has; "
            "an encoder or model made on the data set cannot score these rows"
        )
    return finish(
        table,
        lines,
        problems,
        path=src.path,
        on_error=on_error,
        fmt="unsw-nb15",
        family="unsw-nb15",
        cut=src.cut or cut,
        stats=stats,
        warnings=warnings,
        row_problems=_row_problems(bad, lines),
        label_text=detail,
    )


def _refuse_renamed_text(
    text_in: BadRows, arr: pa.Array, column: str, absent: list[str], lines, path: str
) -> None:
    """Refuse a UNSW-NB15 header that lacks a text feature when a column read as
    numbers holds text in every row: that column is most likely the feature
    renamed (``proto`` as ``protocol``), and the missing name is the cause to
    report, not each row's text. A column where only some rows fail (damage)
    leaves them to be judged one by one as bad rows."""
    messages = [message for _, message in text_in.rows.values()]
    if len(messages) < len(arr) - arr.null_count or not all(
        message.startswith("expected a number") for message in messages
    ):
        return
    row = min(text_in.rows)
    listed = " or ".join(repr(name) for name in absent)
    raise BadInputError(
        f"header has no {listed} column, and column {column!r} holds text where "
        f"numbers are expected (line {int(lines[row])}: {text_in.rows[row][1]}); "
        f"UNSW-NB15 names its text features {', '.join(UNSW_FEATURE_TEXT)}",
        path=path,
        line=1,
        column=absent[0],
    )


def read_cic(src: Source, on_error: str) -> ReadResult:
    """Read a CICFlowMeter CSV into the cic feature family."""
    data, warnings = _text_of_cic(src)
    first, body = header_and_body(data)
    raw_names = first.split(",")
    names, seen = [], {}
    for raw in raw_names:
        name = raw.strip()
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            warnings.append(
                f"{src.path}: column {name!r} repeats; the copy number "
                f"{seen[name]} is named {name}_{seen[name]!s}"
            )
            name = f"{name}_{seen[name]}"
        names.append(name)
    label_index = next((i for i, n in enumerate(names) if n.lower() == "label"), None)
    if label_index is None:
        raise BadInputError(
            "header has no 'Label' column", path=src.path, line=1, column="Label"
        )

    strings, lines, problems, cut = split_rows(
        body, names, ",", path=src.path, first_line=2, quote='"'
    )
    first_col = pc.utf8_trim_whitespace(strings.column("c0").combine_chunks())
    repeated = pc.equal(first_col, names[0])
    if label_index:
        label_col = pc.utf8_trim_whitespace(
            strings.column(f"c{label_index}").combine_chunks()
        )
        repeated = pc.and_(repeated, pc.equal(label_col, names[label_index]))
    n_repeated = pc.sum(repeated).as_py() or 0
    if n_repeated:
        keep = pc.invert(repeated)
        strings = strings.filter(keep)
        lines = lines[np.asarray(keep)]
        warnings.append(
            f"{src.path}: dropped {n_repeated} header row(s) repeated inside the file"
        )

    bad = BadRows()
    arrays, fields = [], []
    non_finite = np.zeros(strings.num_rows, dtype=np.int64)  # per row
    for i, name in enumerate(names):
        if i == label_index:
            continue
        arr = pc.utf8_trim_whitespace(strings.column(f"c{i}").combine_chunks())
        if name.lower() in CIC_TEXT:
            arrays.append(arr)
            fields.append(pa.field(name, pa.string()))
            continue
        values, _ = to_number(
            arr, "f64", name, bad, non_finite_null=True, non_finite_rows=non_finite
        )
        if name.lower() in CIC_COUNTS:
            check_counts(values, name, bad, whole=name.lower() in CIC_WHOLE)
        elif name.lower() == "protocol":
            check_proto_numbers(values, name, bad)
        arrays.append(values)
        fields.append(pa.field(name, pa.float64()))

    def tally(keep: np.ndarray) -> tuple[dict, list[str]]:
        """Infinity/NaN/empty values, counted in the rows kept."""
        count = int(non_finite[keep].sum())
        notes = [
            f"{src.path}: {count} Infinity/NaN/empty value(s) in numeric columns "
            "read as null"
        ] if count else []
        return {"non_finite": count}, notes

    text = pc.utf8_trim_whitespace(strings.column(f"c{label_index}").combine_chunks())
    detail = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
    label = pc.cast(pc.not_equal(pc.utf8_lower(detail), "benign"), pa.int8())
    arrays += [label, detail]
    fields += [pa.field("label", pa.int8()), pa.field("label_detail", pa.string())]
    _check_endpoints(arrays, fields, bad)
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    stats = {
        "labels": {},
        "labeled": True,
        "repeated_headers": n_repeated,
        "non_finite": 0,
    }
    return finish(
        table,
        lines,
        problems,
        path=src.path,
        on_error=on_error,
        fmt="cic-csv",
        family="cic",
        cut=src.cut or cut,
        stats=stats,
        warnings=warnings,
        row_problems=_row_problems(bad, lines),
        label_text=text,
        tally=tally,
    )


def _text_of_cic(src: Source) -> tuple[bytes, list[str]]:
    """The file's text as UTF-8; CIC-IDS2017 CSVs that are Windows-1252 are recoded.

    (Its Thursday file labels ``Web Attack \x96 Brute Force`` with a cp1252 dash.)
    """
    try:
        src.data.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = src.data.decode("cp1252", errors="replace").encode("utf-8")
        note = (
            f"{src.path}: not UTF-8 (byte {exc.start}); read as Windows-1252, "
            "as CICFlowMeter wrote it on Windows"
        )
        return text, [note]
    return src.data, []


def _check_endpoints(arrays: list, fields: list, bad: BadRows) -> None:
    """Note rows whose address is not IPv4/IPv6 or whose port is not a port number.

    A port is a whole number in 0..65535. Empty values are unknown, not bad
    (CIC-IDS2017 files end in empty rows).
    """
    for arr, field in zip(arrays, fields, strict=True):
        name = field.name.lower()
        if name in ADDRESS_COLUMNS and pa.types.is_string(arr.type):
            empty = pc.equal(arr, "")
            check_addresses(
                pc.if_else(empty, pa.scalar(None, pa.string()), arr), field.name, bad
            )
        elif name in PORT_COLUMNS and not pa.types.is_string(arr.type):
            check_ports(arr, field.name, bad)


def _row_problems(bad: BadRows, lines: np.ndarray) -> dict[int, Problem]:
    return {
        row: Problem(int(lines[row]), column, message)
        for row, (column, message) in bad.rows.items()
    }
