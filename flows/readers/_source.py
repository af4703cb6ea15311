"""Opening an input: its bytes, gunzipped when they are gzip, with a cut tail kept.

A gzip stream that stops early (a log rotated while it was copied, a download cut
short) is not thrown away: the text inflated before the cut is kept up to its last
complete line, and the cut is reported so the caller can mark the result partial.
Several gzip members in one file (``cat a.gz b.gz``) are read one after the other.
"""

from __future__ import annotations

import zlib
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

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
    # TODO(gap): whole files are held in memory; no chunked read for logs of many GB.
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
    import io

    out: list[bytes] = []
    chunks = iter_gunzip(io.BytesIO(raw))
    while True:
        try:
            out.append(next(chunks))
        except StopIteration as stop:
            return b"".join(out), stop.value


def iter_gunzip(fh: BinaryIO) -> Generator[bytes, None, str | None]:
    """Yield the inflated text of every gzip member read from ``fh``, block by block.

    The generator's return value (``StopIteration.value``) is None at a clean end,
    else a sentence saying where the stream was cut or damaged; the text inflated
    before that point has been yielded already.
    """
    inflater = zlib.decompressobj(wbits=31)
    offset = 0
    pending = b""
    while True:
        block = pending or fh.read(_BLOCK)
        pending = b""
        if not block:
            if inflater.eof or offset == 0:
                return None
            return f"gzip stream cut at byte offset {offset} (no end marker)"
        try:
            text = inflater.decompress(block)
        except zlib.error as exc:
            return f"gzip data damaged near byte offset {offset} ({exc})"
        offset += len(block) - len(inflater.unused_data)
        if text:
            yield text
        if inflater.eof:
            rest = inflater.unused_data
            if not rest:
                rest = fh.read(_BLOCK)
            if not rest:
                return None
            if rest[:2] != GZIP_MAGIC and len(rest) >= 2:
                if rest.strip(b"\x00") or fh.read(1):
                    return f"bytes after the gzip data at byte offset {offset}"
                return None
            inflater = zlib.decompressobj(wbits=31)
            pending = rest
