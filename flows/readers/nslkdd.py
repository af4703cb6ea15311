"""NSL-KDD reader: the 43-column text files (plain or gzip) and the ARFF versions.

Columns 1-41 are the KDD features under their standard names, column 42 the label
(``normal`` or an attack name) and column 43 the difficulty level (0-21). The table
holds the 41 features, then ``label`` (1 for any attack, 0 for normal),
``label_detail`` (the attack name as written), ``attack_family`` (normal, DoS,
Probe, R2L, U2R; null with a warning for a name outside the standard map) and
``difficulty`` (null in the ARFF files, which lack it; never a feature).
A negative ``duration``, ``src_bytes`` or ``dst_bytes`` makes the row a bad row, as
in the Zeek readers, and so does a ``protocol_type`` that is neither a protocol name
nor a number 0..255 (``flows.record.proto_problem``); rates must lie in 0..1 (the
other features are not range-checked).
The ARFF files label rows only ``normal``/``anomaly``: their family is null.
CSV copies with a header line (as shared on Kaggle) are read by column name: the
41 features, a label column (``label``, ``class``, ``attack``...) and, when there,
a difficulty column (``difficulty``, ``level``...), in any order.
"""

from __future__ import annotations

import numpy as np

from flows.errors import BadInputError
from flows.readers._convert import (
    BadRows,
    check_counts,
    check_protos,
    check_rates,
    to_number,
    value_counts,
)
from flows.readers._finish import Problem, finish
from flows.readers._lazy import LazyModule
from flows.readers._source import Source
from flows.readers._table import split_rows
from flows.readers.labels import ATTACK_FAMILY
from flows.readers.result import ReadResult

pa = LazyModule("pyarrow")
pc = LazyModule("pyarrow.compute")

KDD_FEATURES: tuple[str, ...] = (
    "duration",
    "protocol_type",
    "service",
    "flag",
    "src_bytes",
    "dst_bytes",
    "land",
    "wrong_fragment",
    "urgent",
    "hot",
    "num_failed_logins",
    "logged_in",
    "num_compromised",
    "root_shell",
    "su_attempted",
    "num_root",
    "num_file_creations",
    "num_shells",
    "num_access_files",
    "num_outbound_cmds",
    "is_host_login",
    "is_guest_login",
    "count",
    "srv_count",
    "serror_rate",
    "srv_serror_rate",
    "rerror_rate",
    "srv_rerror_rate",
    "same_srv_rate",
    "diff_srv_rate",
    "srv_diff_host_rate",
    "dst_host_count",
    "dst_host_srv_count",
    "dst_host_same_srv_rate",
    "dst_host_diff_srv_rate",
    "dst_host_same_src_port_rate",
    "dst_host_srv_diff_host_rate",
    "dst_host_serror_rate",
    "dst_host_srv_serror_rate",
    "dst_host_rerror_rate",
    "dst_host_srv_rerror_rate",
)
KDD_TEXT = ("protocol_type", "service", "flag")
# The duration and byte counts: checked to be >= 0 like Zeek's.
KDD_COUNTS = ("duration", "src_bytes", "dst_bytes")


def kdd_kind(name: str) -> str:
    """The column kind of a KDD feature: text, rate (float) or count (integer)."""
    if name in KDD_TEXT:
        return "str"
    return "f64" if name.endswith("_rate") else "i64"


def kdd_schema() -> pa.Schema:
    """The Arrow schema of an NSL-KDD table."""
    types = {"str": pa.string(), "f64": pa.float64(), "i64": pa.int64()}
    return pa.schema(
        [pa.field(n, types[kdd_kind(n)]) for n in KDD_FEATURES]
        + [
            pa.field("label", pa.int8()),
            pa.field("label_detail", pa.string()),
            pa.field("attack_family", pa.string()),
            pa.field("difficulty", pa.int64()),
        ]
    )


def looks_like_kdd(first_line: str) -> bool:
    """Whether a first line has the NSL-KDD shape (42/43 fields, tcp/udp/icmp)."""
    fields = first_line.strip().split(",")
    if len(fields) not in (42, 43):
        return False
    try:
        float(fields[0])
    except ValueError:
        return False
    return fields[1].strip().strip("'\"").lower() in ("tcp", "udp", "icmp")


LABEL_HEADERS = ("label", "class", "attack", "attack_type", "labels", "outcome")
DIFFICULTY_HEADERS = ("difficulty", "difficulty_level", "level", "score")


def kdd_header(first_line: str) -> list[str] | None:
    """The column names when the first line is a header naming the KDD features."""
    names = [n.strip().strip("'\"").lower() for n in first_line.split(",")]
    if "protocol_type" in names and "dst_host_srv_rerror_rate" in names:
        return names
    return None


def read_kdd(src: Source, on_error: str) -> ReadResult:
    """Read an NSL-KDD text, CSV-with-header or ARFF file into the nsl-kdd family."""
    data = src.data[3:] if src.data.startswith(b"\xef\xbb\xbf") else src.data
    start_line = 1
    arff = data.lstrip()[:1] in (b"@", b"%")
    if arff:
        data, start_line = _arff_body(data, src.path)

    # Where each column is: by position, or by name when there is a header line.
    end = data.find(b"\n")
    first = data[: end if end >= 0 else len(data)].decode("utf-8", "replace")
    header = None if arff else kdd_header(first.rstrip("\r"))
    if header is not None:
        where = _positions_by_name(header, src.path)
        width = len(header)
        data = data[end + 1 :] if end >= 0 else b""
        start_line += 1
    else:
        width = 43 if len(first.split(",")) == 43 else 42
        where = {name: i for i, name in enumerate(KDD_FEATURES)}
        where["label"] = 41
        where["difficulty"] = 42 if width == 43 else None

    strings, lines, problems, cut = split_rows(
        data,
        [f"c{i}" for i in range(width)],
        ",",
        path=src.path,
        first_line=start_line,
        quote="'" if arff else False,
    )
    cut = src.cut or cut

    def column(name: str) -> pa.Array:
        return strings.column(f"c{where[name]}").combine_chunks()

    bad = BadRows()
    arrays = []
    for name in KDD_FEATURES:
        col = column(name)
        kind = kdd_kind(name)
        if kind == "str":
            text = pc.utf8_trim(col, "'\" ")
            if name == "protocol_type":
                check_protos(text, name, bad)
            arrays.append(text)
        else:
            values = to_number(pc.utf8_trim_whitespace(col), kind, name, bad)[0]
            if name in KDD_COUNTS:
                check_counts(values, name, bad)
            elif name.endswith("_rate"):
                check_rates(values, name, bad)
            arrays.append(values)

    label_text = pc.utf8_trim(column("label"), "'\" .")
    # An empty label is no attack name: a bad row, as UNSW's empty label is.
    label_name = header[where["label"]] if header is not None else "label"
    for row in np.flatnonzero(
        pc.equal(label_text, "").fill_null(True).to_numpy(zero_copy_only=False)
    ):
        found = column("label")[int(row)].as_py()
        bad.add(
            int(row),
            label_name,
            f"expected an attack name or 'normal', found {found or ''!r}",
        )
    lowered = pc.utf8_lower(label_text)
    label = pc.cast(pc.not_equal(lowered, "normal"), pa.int8())
    family = pc.index_in(lowered, value_set=pa.array(list(ATTACK_FAMILY)))
    family = pc.take(pa.array(list(ATTACK_FAMILY.values())), family)
    outside = pc.and_(pc.is_null(family), pc.not_equal(lowered, "anomaly"))

    def tally(keep: np.ndarray) -> tuple[dict, list[str]]:
        """A note on the attack names outside the family map in the rows kept."""
        hit = pc.and_(outside, pa.array(keep))
        unknown = value_counts(pc.filter(label_text, hit))
        if not unknown:
            return {}, []
        return {}, [
            f"{src.path}: attack names outside the family map (family "
            f"null): {', '.join(sorted(unknown))}"
        ]
    if where["difficulty"] is not None:
        difficulty, _ = to_number(
            pc.utf8_trim_whitespace(column("difficulty")),
            "i64",
            "difficulty",
            bad,
        )
    else:
        difficulty = pa.nulls(strings.num_rows, pa.int64())

    table = pa.Table.from_arrays(
        arrays + [label, label_text, family, difficulty], schema=kdd_schema()
    )
    row_problems = {
        row: Problem(int(lines[row]), column, message)
        for row, (column, message) in bad.rows.items()
    }
    stats = {
        "labels": {},
        "labeled": True,
        "arff": arff,
        "header": header is not None,
    }
    return finish(
        table,
        lines,
        problems,
        path=src.path,
        on_error=on_error,
        fmt="nsl-kdd",
        family="nsl-kdd",
        cut=cut,
        stats=stats,
        row_problems=row_problems,
        label_text=label_text,
        tally=tally,
    )


def _positions_by_name(names: list[str], path: str) -> dict[str, int | None]:
    """Column positions from a header line; every feature and a label are required."""
    where: dict[str, int | None] = {}
    for feature in KDD_FEATURES:
        if feature not in names:
            raise BadInputError(
                f"header has no {feature!r} column (the 41 KDD features are required)",
                path=path,
                line=1,
                column=feature,
            )
        where[feature] = names.index(feature)
    label = next((n for n in LABEL_HEADERS if n in names), None)
    if label is None:
        raise BadInputError(
            f"header has no label column (one of {', '.join(LABEL_HEADERS)})",
            path=path,
            line=1,
            column="label",
        )
    where["label"] = names.index(label)
    difficulty = next((n for n in DIFFICULTY_HEADERS if n in names), None)
    where["difficulty"] = names.index(difficulty) if difficulty else None
    return where


def _arff_body(data: bytes, path: str) -> tuple[bytes, int]:
    """Return the rows after ``@data`` and the line number where they start."""
    pos, line = 0, 1
    attributes = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        end = len(data) if end < 0 else end
        text = data[pos:end].strip().lower()
        pos, line = end + 1, line + 1
        if text.startswith(b"@attribute"):
            attributes += 1
        elif text.startswith(b"@data"):
            if attributes not in (42, 43):
                raise BadInputError(
                    f"ARFF header declares {attributes} attributes, expected 42 "
                    "(41 features and the class) or 43",
                    path=path,
                    line=line - 1,
                )
            return data[pos:], line
    raise BadInputError("ARFF file without an @data line", path=path)
