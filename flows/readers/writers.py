"""Writing canonical records: a Zeek-style TSV conn.log, and Parquet.

The conn.log has Zeek's header (``#separator``, ``#set_separator``, ``#empty_field``,
``#unset_field``, ``#path``, ``#open``, ``#fields``, ``#types``) and a ``#close``
line, with Zeek's column names and order for the fields the record has, so a user
can diff it against Zeek's own output. Nulls are written ``-``, empty strings
``(empty)``, and a string that is literally ``-`` or ``(empty)`` or holds a tab,
newline or backslash is escaped ``\\xHH`` the way Zeek does. Times and intervals
use Zeek's six decimals when that reads back as the same float, else the shortest
exact form. Labels, when any row has one, go to ``label`` (Malicious, Benign,
Background/Unknown kept from ``label_detail``, else ``-`` for null) and
``detailedlabel`` (``label_detail``), Stratosphere's layout.
"""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flows.argtypes import nearest_existing
from flows.errors import GatewatchError
from flows.readers.parquet import FAMILY_KEY, to_conn_table
from flows.readers.zeek import CANON_TO_ZEEK

# Zeek's conn.log order for the canonical fields, with Zeek's type names.
ZEEK_COLUMNS: tuple[tuple[str, str], ...] = (
    ("ts", "time"),
    ("uid", "string"),
    ("src_ip", "addr"),
    ("src_port", "port"),
    ("dst_ip", "addr"),
    ("dst_port", "port"),
    ("proto", "enum"),
    ("service", "string"),
    ("duration", "interval"),
    ("orig_bytes", "count"),
    ("resp_bytes", "count"),
    ("conn_state", "string"),
    ("missed_bytes", "count"),
    ("history", "string"),
    ("orig_pkts", "count"),
    ("orig_ip_bytes", "count"),
    ("resp_pkts", "count"),
    ("resp_ip_bytes", "count"),
)
_LABEL_TEXT = {1: "Malicious", 0: "Benign", None: "-"}


def _escape(value: str) -> str:
    """Zeek's escaping of one string value for the TSV writer."""
    if value == "":
        return "(empty)"
    if value in ("-", "(empty)"):
        return f"\\x{ord(value[0]):02x}" + value[1:]
    if any(ch in value for ch in "\t\n\r\\") or not value.isprintable():
        return "".join(
            ch
            if ch.isprintable() and ch not in "\\\t"
            else "".join(f"\\x{b:02x}" for b in ch.encode("utf-8"))
            for ch in value
        )
    return value


def _label_text(label: int | None, detail: str | None) -> str:
    """The ``label`` cell: Malicious/Benign, or Background/Unknown from the detail."""
    if (
        label is None
        and detail is not None
        and detail.strip().lower() in ("background", "unknown")
    ):
        return detail
    return _LABEL_TEXT[label]


def write_problem(exc: OSError, path: str | Path) -> str:
    """Why writing ``path`` failed, in words for the ``cannot be written (...)``
    message: a path component that is a file, a missing folder, a read-only file
    system, else the system's own reason, lower-cased."""
    path = Path(path)
    code = getattr(exc, "errno", None)
    if code in (errno.ENOTDIR, errno.ENOENT):
        # The nearest existing name above the file says which case it is.
        try:
            above = nearest_existing(path.parent)
            if not above.is_dir():
                return f"{above} is a file, not a folder"
        except OSError:
            pass
        if code == errno.ENOENT and not path.parent.exists():
            return f"folder {path.parent} does not exist"
    if code == errno.EROFS:
        return "read-only file system"
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return reason[:1].lower() + reason[1:]


def _time(value: float) -> str:
    text = f"{value:.6f}"
    return text if float(text) == value else repr(value)


def _cell(value, zeek_type: str) -> str:
    if value is None:
        return "-"
    if zeek_type in ("time", "interval"):
        return _time(value)
    if zeek_type in ("count", "port"):
        return str(value)
    return _escape(str(value))


def write_conn_log(
    table: pa.Table, path: str | Path, *, name: str | Path | None = None
) -> None:
    """Write a canonical conn table (extra columns ignored) as a Zeek TSV conn.log;
    messages name ``name`` (the final output, when ``path`` is a temporary file)."""
    # TODO(gap): cells are formatted one by one in Python; slow past ~10^6 rows.
    name = path if name is None else name
    table = to_conn_table(table, str(name))
    with_labels = (
        pc.any(pc.is_valid(table.column("label"))).as_py()
        or pc.any(pc.is_valid(table.column("label_detail"))).as_py()
    )
    columns = list(ZEEK_COLUMNS)
    names = [CANON_TO_ZEEK[c] for c, _ in columns]
    types = [t for _, t in columns]
    if with_labels:
        names += ["label", "detailedlabel"]
        types += ["string", "string"]
    stamp = time.strftime("%Y-%m-%d-%H-%M-%S", time.gmtime())
    head = [
        "#separator \\x09",
        "#set_separator\t,",
        "#empty_field\t(empty)",
        "#unset_field\t-",
        "#path\tconn",
        f"#open\t{stamp}",
        "#fields\t" + "\t".join(names),
        "#types\t" + "\t".join(types),
    ]
    try:
        with open(path, "w", encoding="utf-8", newline="\n") as out:
            out.write("\n".join(head) + "\n")
            for batch in table.to_batches(max_chunksize=65536):
                cols = [batch.column(c).to_pylist() for c, _ in columns]
                if with_labels:
                    details = batch.column("label_detail").to_pylist()
                    cols.append(
                        [
                            _label_text(v, d)
                            for v, d in zip(
                                batch.column("label").to_pylist(), details, strict=True
                            )
                        ]
                    )
                    cols.append(details)
                cell_types = types[: len(columns)] + (
                    ["raw", "string"] if with_labels else []
                )
                for row in zip(*cols, strict=True):
                    cells = [
                        value if kind == "raw" else _cell(value, kind)
                        for value, kind in zip(row, cell_types, strict=True)
                    ]
                    out.write("\t".join(cells) + "\n")
            out.write(
                "#close\t" + time.strftime("%Y-%m-%d-%H-%M-%S", time.gmtime()) + "\n"
            )
    except OSError as exc:
        raise GatewatchError(
            f"{name}: cannot be written ({write_problem(exc, name)})"
        ) from exc


def write_parquet(
    table: pa.Table,
    path: str | Path,
    family: str = "conn",
    *,
    name: str | Path | None = None,
) -> None:
    """Write ``table`` as Parquet with ``gatewatch.family`` in its metadata;
    messages name ``name`` (the final output, when ``path`` is a temporary file)."""
    name = path if name is None else name
    if family == "conn":
        table = to_conn_table(table, str(name))
    metadata = dict(table.schema.metadata or {})
    metadata[FAMILY_KEY] = family.encode()
    try:
        # Opened here, not by pyarrow, so a failure keeps its errno.
        with open(path, "wb") as sink:
            pq.write_table(table.replace_schema_metadata(metadata), sink)
    except OSError as exc:
        raise GatewatchError(
            f"{name}: cannot be written ({write_problem(exc, name)})"
        ) from exc
