"""Opening an input: its bytes, gunzipped when they are gzip, with a cut tail kept.

A gzip stream that stops early (a log rotated while it was copied, a download cut
short) is not thrown away: the text inflated before the cut is kept up to its last
complete line, and the cut is reported so the caller can mark the result partial.
Several gzip members in one file (``cat a.gz b.gz``) are read one after the other.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

from flows.errors import BadInputError

GZIP_MAGIC = b"\x1f\x8b"
_BLOCK = 1 << 20


@dataclass
class Source:
    """The text of one input file, with where (if anywhere) it was found cut."""

    path: str
    data: bytes
    compressed: bool = False
    cut: str | None = None


def load(path: str | Path) -> Source:
    """Read ``path`` into memory, gunzipping it when its first bytes say gzip."""
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise BadInputError("no such file", path=name) from None
    except IsADirectoryError:
        raise BadInputError("is a folder, expected a file", path=name) from None
    except OSError as exc:
        raise BadInputError(f"cannot be read ({exc.strerror})", path=name) from exc

    if raw[:2] != GZIP_MAGIC:
        return Source(name, raw)
    data, cut = gunzip(raw)
    if cut is None:
        return Source(name, data, compressed=True)

    keep = data.rfind(b"\n") + 1
    lines = data.count(b"\n", 0, keep)
    dropped = len(data) - keep
    note = f"{name}: {cut}; kept the {lines} complete lines before it"
    if dropped:
        note += f" and dropped a cut line of {dropped} bytes"
    return Source(name, data[:keep], compressed=True, cut=note)


def gunzip(raw: bytes) -> tuple[bytes, str | None]:
    """Inflate every gzip member of ``raw``; return the text and why it stopped."""
    out: list[bytes] = []
    pos = 0
    while pos < len(raw):
        inflater = zlib.decompressobj(wbits=31)
        start = pos
        try:
            while pos < len(raw) and not inflater.eof:
                out.append(inflater.decompress(raw[pos : pos + _BLOCK]))
                pos += min(_BLOCK, len(raw) - pos)
        except zlib.error as exc:
            return b"".join(out), f"gzip data damaged near byte offset {pos} ({exc})"
        if not inflater.eof:
            return b"".join(out), (
                f"gzip stream cut at byte offset {len(raw)} (no end marker after "
                f"the member that starts at byte {start})"
            )
        pos -= len(inflater.unused_data)
        rest = raw[pos:]
        if rest and rest[:2] != GZIP_MAGIC:
            if rest.strip(b"\x00"):
                return b"".join(out), f"bytes after the gzip data at byte offset {pos}"
            break
    return b"".join(out), None
