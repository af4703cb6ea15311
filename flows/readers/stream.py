"""Record-at-a-time reading of flow files, for the edge agent's streaming sources.

:class:`TsvLineParser` turns one TSV line into a canonical record dict, following
the ``#`` header lines it was fed, with the same rules as the batch reader
(:mod:`flows.readers.zeek`); :func:`parse_json_line` does the same for a JSON line.
:func:`iter_records` reads a Zeek log line by line with them, and an Argus
binetflow file a block of a few thousand lines at a time
(:class:`flows.readers.binetflow.BinetflowStream`); Parquet, packet captures
and pipes are read whole and then yielded row by row. Memory stays bounded
whatever a Zeek or binetflow file holds (gzip is inflated in bounded steps, a line
over ``MAX_LINE_BYTES`` is a bad line); a stream has no total size cap, unlike a
whole-file read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from flows import logger
from flows.errors import BadInputError, PartialInputError, json_problem
from flows.readers._chunked import is_regular
from flows.readers._convert import _ESCAPE, _parse_one, parse_problem
from flows.readers._finish import check_on_error
from flows.readers._source import (
    GZIP_MAGIC,
    MAX_LINE_BYTES,
    NOT_UTF8,
    iter_gunzip,
    not_utf8_text,
    too_long,
)
from flows.readers._table import _CR_INSIDE
from flows.readers.labels import ZEEK_LABELS
from flows.readers.result import Damage
from flows.readers.zeek import (
    CANON_TO_ZEEK,
    DETAIL_NAMES,
    LABEL_NAMES,
    ZEEK_TO_CANON,
    _check_fields,
    _directive,
    _expand_names,
    _FieldError,
    _Header,
    json_record,
)
from flows.record import (
    ADDRESS_FIELDS,
    CONN_FIELD_KINDS,
    COUNT_FIELDS,
    PORT_FIELDS,
    PORT_RANGE,
    field_problem,
    is_address,
    proto_problem,
    time_problem,
)

_MASKED = re.compile(r"X+\.X+\Z")
_SPACES = re.compile(r"\s+")
_INNER_SPACE = re.compile(r"\S\s+\S")
_PORT_LOW, _PORT_HIGH = PORT_RANGE


def _unescape(text: str) -> str:
    if "\\x" not in text:
        return text
    raw = text.encode("utf-8", "surrogateescape")
    decoded = _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), raw)
    return decoded.decode("utf-8", "backslashreplace")


class TsvLineParser:
    """Parse Zeek TSV lines one at a time; feed it the ``#`` lines as they come.

    At each ``#fields`` line it works out, once, where every canonical field and
    label sits, so that a data line costs one split and a pass over the fields.

    ``on_unknown_label``: by default a label no table names refuses the line; when
    given, the flow is kept without a label (the label's text in
    ``label_detail``) and this is called with the text and the line number, for
    readers that do not use labels (the edge agent scores flows, labels or not).
    """

    def __init__(
        self,
        path: str = "<stream>",
        on_unknown_label: Callable[[str, int], None] | None = None,
    ) -> None:
        self.path = path
        self.on_unknown_label = on_unknown_label
        self.header = _Header()
        self._fields: list[str] | None = None
        self._plan: list[tuple[str, int | None, str, str]] = []
        self._joined: tuple[int, list[str]] | None = None
        self._hidden: int | None = None
        self._label: tuple[int, str] | None = None
        self._detail: int | None = None

    def header_line(self, line: str, line_no: int = 0) -> None:
        """Apply one ``#`` line (``#separator``, ``#fields``, ``#close``...).

        The rules are the batch reader's: the same separators are refused and a
        ``#fields`` line is checked the same way.
        """
        before = self.header.fields
        self.header = _directive(self.header, line, line_no, self.path)
        if self.header.fields is None:
            self._fields = None
        elif self.header.fields is not before:
            _check_fields(self.header, self.path)
            self._set_fields(self.header.fields)

    def _set_fields(self, fields: list[str]) -> None:
        """Plan where each field is read from (the columns were checked already)."""
        names = _expand_names(fields)
        self._fields = fields
        self._joined = next(
            (
                (i, _SPACES.split(f.strip()))
                for i, f in enumerate(fields)
                if _SPACES.search(f.strip())
            ),
            None,
        )
        has_label = any(n.lower() in LABEL_NAMES for n in names)
        self._hidden = (
            fields.index("tunnel_parents")
            if "tunnel_parents" in fields and not has_label
            else None
        )
        position = {name: i for i, name in enumerate(names)}
        self._plan = [
            (canon, position.get(zeek), CONN_FIELD_KINDS[canon], zeek)
            for zeek, canon in ZEEK_TO_CANON.items()
        ]
        label = next((n for n in names if n.lower() in LABEL_NAMES), None)
        detail = next((n for n in names if n.lower() in DETAIL_NAMES), None)
        self._label = (position[label], label) if label else None
        self._detail = position[detail] if detail else None

    def parse(self, line: str, line_no: int = 0) -> dict:
        """One data line -> canonical record; BadInputError names line and column."""
        if self._fields is None:
            raise BadInputError(
                "row before any #fields line", path=self.path, line=line_no
            )
        line = line.rstrip("\r\n")
        if "\r" in line:
            # As in a whole-file read, where pyarrow would end the row there.
            raise BadInputError(_CR_INSIDE, path=self.path, line=line_no)
        values = line.split(self.header.separator)
        if len(values) != len(self._fields):
            raise BadInputError(
                f"expected {len(self._fields)} fields separated by "
                f"{self.header.separator!r}, found {len(values)}",
                path=self.path,
                line=line_no,
            )
        if self._joined is not None:
            index, parts = self._joined
            values = self._expand(values, index, parts, line_no)
            return self._record(values, self._plan, self._label, self._detail, line_no)
        if self._hidden is not None and _INNER_SPACE.search(values[self._hidden]):
            return self._hidden_layout(values, line_no)
        return self._record(values, self._plan, self._label, self._detail, line_no)

    def _expand(
        self, values: list[str], index: int, parts: list[str], line_no: int
    ) -> list[str]:
        """Split the space-joined field at ``index`` into its ``parts``."""
        pieces = _SPACES.split(values[index].strip(), maxsplit=len(parts) - 1)
        if len(pieces) != len(parts):
            raise BadInputError(
                f"expected {len(parts)} space-separated parts "
                f"({', '.join(parts)}), found {len(pieces)}",
                path=self.path,
                line=line_no,
                column=self._fields[index],
            )
        return values[:index] + pieces + values[index + 1 :]

    def _hidden_layout(self, values: list[str], line_no: int) -> dict:
        """IoT-23 labels inside ``tunnel_parents`` under a plain header."""
        index = self._hidden
        parts = ["tunnel_parents", "label", "detailed-label"]
        values = self._expand(values, index, parts, line_no)
        names = self._fields[:index] + parts + self._fields[index + 1 :]
        position = {name: i for i, name in enumerate(names)}
        plan = [(c, position.get(z), k, z) for c, _, k, z in self._plan]
        label = (position["label"], "label")
        return self._record(values, plan, label, position["detailed-label"], line_no)

    def _bad_field(self, canon: str, value, line_no: int) -> None:
        raise BadInputError(
            field_problem(canon, value),
            path=self.path,
            line=line_no,
            column=CANON_TO_ZEEK[canon],
        )

    def _record(self, values, plan, label, detail, line_no: int) -> dict:
        """Convert the planned fields of one split line into a canonical record."""
        unset, empty = self.header.unset, self.header.empty
        record: dict = {}
        for canon, index, kind, zeek_name in plan:
            text = values[index] if index is not None else None
            if text is None or text == unset:
                record[canon] = None
            elif kind == "str":
                record[canon] = "" if text == empty else _unescape(text)
            elif canon == "ts" and _MASKED.match(text):
                record[canon] = None
            else:
                value = _parse_one(text, kind, False)
                if value is None:
                    raise BadInputError(
                        parse_problem(text, kind),
                        path=self.path,
                        line=line_no,
                        column=zeek_name,
                    )
                record[canon] = value
        # The field rules of flows.record, inlined: this runs once per line.
        for canon in ADDRESS_FIELDS:
            value = record[canon]
            if value is not None and not is_address(value):
                self._bad_field(canon, value, line_no)
        for canon in PORT_FIELDS:
            value = record[canon]
            if value is not None and not _PORT_LOW <= value <= _PORT_HIGH:
                self._bad_field(canon, value, line_no)
        proto = record["proto"]
        if proto is not None and proto_problem(proto):
            self._bad_field("proto", proto, line_no)
        for canon in COUNT_FIELDS:
            value = record[canon]
            if value is not None and value < 0:
                self._bad_field(canon, value, line_no)
        ts = record["ts"]  # finite already (_parse_one); before 1970 or past 9999 bad
        if ts is not None and (problem := time_problem(ts)):
            raise BadInputError(problem, path=self.path, line=line_no, column="ts")

        record["label"] = record["label_detail"] = None
        if label is None:
            return record
        nulls = (unset, empty, "")
        text = values[label[0]]
        if text not in nulls:
            text = _unescape(text)
            mapped = ZEEK_LABELS.get(text.strip().lower(), "?")
            if mapped == "?" and self.on_unknown_label is None:
                raise BadInputError(
                    f"unknown label {text!r} (expected Malicious, Benign, Background "
                    "or Unknown)",
                    path=self.path,
                    line=line_no,
                    column=label[1],
                )
            if mapped == "?":
                self.on_unknown_label(text, line_no)
                mapped = None
            record["label"] = mapped
            record["label_detail"] = text
        if detail is not None and values[detail] not in nulls:
            record["label_detail"] = _unescape(values[detail])
        return record


def parse_json_line(
    line: str,
    path: str = "<stream>",
    line_no: int = 0,
    on_unknown_label: Callable[[str, int], None] | None = None,
) -> dict:
    """One Zeek JSON line -> canonical record; BadInputError names line and key.
    ``on_unknown_label`` as for :class:`TsvLineParser`."""
    try:
        obj = json.loads(line)
        if not isinstance(obj, dict):
            raise ValueError("not an object")
    except (ValueError, RecursionError) as exc:
        # RecursionError: a nesting bomb ("[" * 100000) is one bad line.
        raise BadInputError(
            f"expected one JSON object ({json_problem(exc)})", path=path, line=line_no
        ) from None
    return zeek_json_record(obj, path, line_no, on_unknown_label)


def zeek_json_record(
    obj: dict,
    path: str = "<stream>",
    line_no: int = 0,
    on_unknown_label: Callable[[str, int], None] | None = None,
) -> dict:
    """One parsed Zeek JSON object -> canonical record, by the Zeek JSON reader's rules.

    Keys as Zeek writes them with ``LogAscii::use_json=T`` (``id.orig_h``...,
    or a nested ``id`` object); BadInputError names the line and the key.
    """
    keep = None
    if on_unknown_label is not None:
        def keep(text: str) -> None:
            on_unknown_label(text, line_no)

    try:
        return json_record(obj, on_unknown_label=keep)
    except _FieldError as exc:
        raise BadInputError(
            exc.message, path=path, line=line_no, column=exc.column
        ) from None


# The endpoint fields by their Zeek JSON names (``id.orig_h``...): the only conn
# fields whose canonical name (``src_ip``...) differs; the others share one name.
_ZEEK_ENDPOINTS = {zeek: canon for zeek, canon in ZEEK_TO_CANON.items()
                   if zeek.startswith("id.")}
_CANON_ENDPOINTS = {canon: zeek for zeek, canon in _ZEEK_ENDPOINTS.items()}


def _endpoint_naming(obj: dict, key: str) -> str | None:
    """How ``key`` of a JSON record names an endpoint field: ``"canonical"``,
    ``"zeek"`` (an ``id.*`` key, or a nested ``id`` object holding one of its
    parts), or None when it names none."""
    if key in _CANON_ENDPOINTS:
        return "canonical"
    if key in _ZEEK_ENDPOINTS:
        return "zeek"
    nested = obj[key] if key == "id" else None
    if isinstance(nested, dict) and any(f"id.{part}" in _ZEEK_ENDPOINTS
                                        for part in nested):
        return "zeek"
    return None


def check_one_naming(obj: dict, path: str = "<stream>", line_no: int = 0) -> None:
    """Refuse a JSON record that names its endpoint fields both ways.

    The edge agent reads a record on stdin by canonical names (``src_ip``,
    ``dst_port``...) or by Zeek's JSON names (``id.orig_h``, ``id.resp_p``... or a
    nested ``id``), one or the other: the two namings read ``ts``, ``proto`` and
    the label by different rules, so a record that mixes them has no one way to
    be read, and taking one naming would silently drop the fields given in the
    other. The first endpoint key of the record sets its naming; BadInputError
    names the first key of the other naming and the keys that set it.
    """
    first: str | None = None
    seen: list[str] = []
    for key in obj:
        naming = _endpoint_naming(obj, key)
        if naming is None:
            continue
        if first is None or naming == first:
            first = naming
            seen.append(key)
            continue
        if naming == "zeek" and key == "id":
            what = "Zeek's nested endpoints (id.orig_h, ...)"
        elif naming == "zeek":
            what = f"Zeek's name for {_ZEEK_ENDPOINTS[key]}"
        else:
            what = f"the canonical name of {_CANON_ENDPOINTS[key]}"
        how = "canonical names" if first == "canonical" else "Zeek's names"
        raise BadInputError(
            f"{what}, in a record whose endpoints have {how} ({', '.join(seen)}); "
            "expected one naming in a record, not a mix",
            path=path,
            line=line_no,
            column=key,
        )


def _lines(path: str, damage: list | None = None) -> Iterator[str | int]:
    """The text lines of a plain or gzip file, as read; a cut gzip stops early
    (noted in ``damage`` when a list is given).

    Gzip is inflated with :func:`flows.readers._source.iter_gunzip`, the same way as
    the batch reader, so a cut stream gives the same complete lines in both, and
    the cut line itself is dropped (with a warning) rather than half read. Bytes
    that are not UTF-8 are decoded with ``surrogateescape``, for the caller to
    refuse the line (:func:`~flows.readers._source.not_utf8_text`). A line
    longer than ``MAX_LINE_BYTES`` is not held: its length (an int) is yielded in
    its place, so memory stays bounded whatever the file holds.
    """
    with open(path, "rb") as fh:
        gz = fh.read(2) == GZIP_MAGIC
        fh.seek(0)
        chunks = iter_gunzip(fh) if gz else iter(lambda: fh.read(1 << 16), b"")
        rest = b""
        skipping = 0  # bytes of an over-long line seen so far, 0 when none
        cut = None
        while True:
            try:
                chunk = next(chunks)
            except StopIteration as stop:
                cut = stop.value if gz else None
                break
            if skipping:
                end = chunk.find(b"\n")
                if end < 0:
                    skipping += len(chunk)
                    continue
                yield skipping + end
                skipping, chunk = 0, chunk[end + 1 :]
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for raw in lines:
                if len(raw) > MAX_LINE_BYTES:
                    yield len(raw)
                else:
                    yield raw.decode("utf-8", "surrogateescape") + "\n"
            if len(rest) > MAX_LINE_BYTES:
                skipping, rest = len(rest), b""
        if skipping:
            yield skipping
        elif cut is not None:
            logger.warning("%s: %s; stopped there", path, cut)
            if damage is not None:
                damage.append(Damage(path, cut, stopped=True))
        elif rest:
            yield rest.decode("utf-8", "surrogateescape")


@dataclass
class Place:
    """Where the record :func:`iter_records` yielded last was in its file, for a
    caller that refuses a record to name it: ``number``, a file line (``unit``
    ``"line"``) or a 1-based row number (``"row"``: Parquet, which has no lines);
    None when the reader does not say."""

    number: int | None = None
    unit: str = "line"


# sniff_text looks at no more than this many bytes of (gunzipped) text.
_SNIFF_BYTES = 65536
# The feature family each format stream_format names is read into (a Parquet
# file's is in its schema instead). iter_records refuses, by the head, the formats
# of other families than conn.
FORMAT_FAMILY = {
    "zeek-tsv": "conn", "zeek-json": "conn", "binetflow": "conn", "pcap": "conn",
    "pcapng": "conn", "nsl-kdd": "nsl-kdd", "unsw-nb15": "unsw-nb15",
    "cic-csv": "cic",
}


def _head(path: str) -> bytes:
    """The first ``_SNIFF_BYTES`` of the file's text (gunzipped), not the whole."""
    with open(path, "rb") as fh:
        gz = fh.read(2) == GZIP_MAGIC
        fh.seek(0)
        if not gz:
            return fh.read(_SNIFF_BYTES)
        head = b""
        for chunk in iter_gunzip(fh):
            head += chunk
            if len(head) >= _SNIFF_BYTES:
                break
        return head[:_SNIFF_BYTES]


def stream_format(path: str) -> str:
    """Name the format like :func:`flows.readers.detect_format`, from the head only.

    A whole-file read would hold a conn.log of many GB in memory before the first
    record is yielded; the text formats are told apart by their first 64 KiB.
    """
    from flows.readers import _sniff_head, check_wide_text, detect_format
    from flows.readers.detect import sniff_text

    kind = _sniff_head(path)
    if kind is not None:
        return kind
    head = _head(path)
    if not head or head.isspace() or (b"\n" not in head and len(head) < _SNIFF_BYTES):
        # Short, or one cut line (a gzip stream ending inside it): the whole read
        # gives the exact error.
        return detect_format(path)
    check_wide_text(head, path)
    return sniff_text(head, path)


def iter_records(
    path: str | Path,
    on_error: str = "fail",
    drop_unlabeled: bool = False,
    timezone: str = "UTC",
    damage: list | None = None,
    on_skip: Callable[[BadInputError], None] | None = None,
    on_unknown_label: Callable[[str, int], None] | None = None,
    place: Place | None = None,
    on_non_ip: Callable[[int | None], None] | None = None,
) -> Iterator[dict]:
    """Yield canonical records one by one (Zeek TSV/JSON line by line, Argus
    binetflow block by block; see the module doc).

    The records, their lines, and the errors are those of
    :func:`flows.readers.read` on the same file. Failing at a bad line, the
    records before it are yielded first (Zeek and binetflow files), then its error
    is raised: a :class:`PartialInputError` when records came before it. A file
    of another family than conn (NSL-KDD, UNSW-NB15, CICFlowMeter) is refused from
    its head.

    ``place`` (when given) is updated before each record is yielded to where the
    record was (:class:`Place`). ``on_non_ip`` (when given): a record the reader
    marks as one of no IP flow (an Argus ``man`` management record, a layer-2
    flow; ``stats["non_ip"]`` of :func:`flows.readers.read`) is not yielded, and
    this is called with its line instead; without it such a record is yielded
    with null addresses, as ``flows`` keeps it.

    With ``on_error`` "skip", ``on_skip`` (when given) is called with the error of
    each Zeek line skipped, so that a caller can count it by its line.
    ``on_unknown_label`` (Zeek TSV/JSON only): keep a flow whose label no table
    names, without a label, and call it with the text and line (see
    :class:`TsvLineParser`); by default such a line is bad.

    ``timezone``: the zone of binetflow start times (see :func:`flows.readers.read`).
    Damage the read stops at or goes past without raising (a gzip stream or last
    line cut short, a file read whole that was damaged part way) is logged as a
    warning and, when ``damage`` is a list, added to it as
    :class:`~flows.readers.result.Damage` entries once the rows before it are
    yielded.
    """
    from flows.readers import check_timezone, read

    check_on_error(on_error)
    check_timezone(timezone)
    name = str(path)
    fmt = stream_format(name)
    if FORMAT_FAMILY.get(fmt, "conn") != "conn":
        # Refused from its head, before the whole file is read for nothing.
        raise BadInputError(f"is {fmt}, not a conn-family input", path=name)

    if fmt == "binetflow" and is_regular(name):
        from flows.readers.binetflow import BinetflowStream  # pyarrow: not for Zeek

        stream = BinetflowStream(name, on_error, timezone, drop_unlabeled)
        if place is not None:
            place.unit = "line"
        for block in stream:
            yield from _rows(block.table, block.lines, block.non_ip, place, on_non_ip)
        for warning in stream.warnings:
            logger.warning("%s", warning)
        if damage is not None:
            damage.extend(stream.damage)
        return

    if fmt not in ("zeek-tsv", "zeek-json"):
        # TODO(gap): Parquet, captures and pipes are read whole, then by row
        # (flows.meter.iter_flows reads a capture as it goes, for pcap: sources).
        result = read(
            name, on_error=on_error, drop_unlabeled=drop_unlabeled, timezone=timezone
        )
        if result.family != "conn":
            raise BadInputError(
                f"is {result.format}, not a conn-family input", path=name
            )
        if place is not None:
            place.unit = result.row_unit
        yield from _rows(
            result.table, result.row_lines, result.non_ip, place, on_non_ip
        )
        for warning in result.warnings:
            logger.warning("%s", warning)
        if damage is not None:
            damage.extend(result.damage)
        return

    parser = TsvLineParser(name, on_unknown_label)
    skipped = yielded = 0
    for line_no, line in enumerate(_lines(name, damage), start=1):
        if line_no == 1 and isinstance(line, str):
            line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark
        if isinstance(line, int):
            exc = BadInputError(too_long(line), path=name, line=line_no)
            if on_error == "fail":
                _stop(exc, yielded)
            if on_skip is None:
                logger.warning("%s", exc)
            else:
                on_skip(exc)
            skipped += 1
            continue
        stripped = line.strip()
        if not stripped or (fmt == "zeek-json" and stripped.startswith("#")):
            continue
        undecodable = not_utf8_text(line)
        if fmt == "zeek-tsv" and line.startswith("#"):
            if undecodable:  # as the whole-file reader decodes a # line
                line = line.encode("utf-8", "surrogateescape").decode(
                    "utf-8", "replace"
                )
            parser.header_line(line.rstrip("\r\n"), line_no)
            continue

        try:
            if undecodable:
                # A bad line, as the whole-file reader refuses it (never a field
                # read with U+FFFD in it).
                raise BadInputError(NOT_UTF8, path=name, line=line_no)
            if fmt == "zeek-json":
                record = parse_json_line(stripped, name, line_no, on_unknown_label)
            else:
                record = parser.parse(line, line_no)
        except BadInputError as exc:
            if not line.endswith("\n"):
                cut = f"the last line ({line_no}) is cut short"
                logger.warning("%s: %s", name, cut)
                if damage is not None:
                    damage.append(Damage(name, cut, stopped=True))
                break
            if on_error == "fail":
                _stop(exc, yielded)
            if on_skip is not None:
                on_skip(exc)
            skipped += 1
            continue

        if drop_unlabeled and record["label"] is None:
            continue
        yielded += 1
        if place is not None:
            place.number = line_no
        yield record
    if skipped:
        logger.warning("%s: skipped %d bad line(s)", name, skipped)


def _rows(
    table,
    lines,
    non_ip,
    place: Place | None,
    on_non_ip: Callable[[int | None], None] | None,
) -> Iterator[dict]:
    """The records of ``table`` one by one, ``place`` kept at each one's line
    (``lines[i]``, when known); with ``on_non_ip``, the records ``non_ip`` marks
    are not yielded but passed to it by their line."""
    row = 0
    for batch in table.to_batches(max_chunksize=4096):
        for record in batch.to_pylist():
            at = int(lines[row]) if lines is not None else None
            skip = on_non_ip is not None and non_ip is not None and non_ip[row]
            row += 1
            if skip:
                on_non_ip(at)
                continue
            if place is not None:
                place.number = at
            yield record


def _stop(exc: BadInputError, yielded: int) -> None:
    """Raise ``exc``; as a PartialInputError when records were yielded before it."""
    if not yielded:
        raise exc
    raise PartialInputError(
        str(exc)[len(exc._where()) :],
        path=exc.path,
        line=exc.line,
        column=exc.column,
    ) from exc
