"""Opening an input: its bytes, gunzipped when they are gzip, with a cut tail kept.

A gzip stream that stops early (a log rotated while it was copied, a download cut
short) is not thrown away: the text inflated before the cut is kept up to its last
complete line, and the cut is reported so the caller can mark the result partial.
Several gzip members in one file (``cat a.gz b.gz``) are read one after the other.

Bounds: inflating never makes more than ``_OUT`` bytes per step, and a whole-file
read stops once the inflated text passes :func:`max_inflated` bytes (2 GiB, or
``$GATEWATCH_MAX_INFLATED``): a gzip bomb keeps the complete lines inflated before
that point and is reported like a cut stream, instead of filling the memory.
Rows longer than :data:`MAX_LINE_BYTES` are bad lines in every reader (pyarrow's
block splitter cannot take them, and no flow record is that long).
"""

from __future__ import annotations

import os
import stat
import zlib
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from flows.errors import BadInputError, UsageError

GZIP_MAGIC = b"\x1f\x8b"
_BLOCK = 1 << 20  # compressed bytes read at a time
_OUT = 1 << 22  # most inflated bytes one step may produce
MAX_LINE_BYTES = 1 << 20
MAX_INFLATED_ENV = "GATEWATCH_MAX_INFLATED"
UTF8_BOM = b"\xef\xbb\xbf"
_MAX_INFLATED_DEFAULT = 2 << 30


@dataclass
class Source:
    """The text of one input file, with where (if anywhere) it was found cut."""

    path: str
    data: bytes
    compressed: bool = False
    cut: str | None = None


def max_inflated() -> int:
    """The most bytes a whole-file read inflates (``$GATEWATCH_MAX_INFLATED``)."""
    text = os.environ.get(MAX_INFLATED_ENV)
    if not text:
        return _MAX_INFLATED_DEFAULT
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise UsageError(
            f"${MAX_INFLATED_ENV} must be a positive number of bytes, not {text!r}"
        )
    return value


def load(path: str | Path) -> Source:
    """Read ``path`` into memory, gunzipping it when its first bytes say gzip."""
    # TODO(gap): whole files are held in memory; no chunked read for logs of many GB.
    name = str(path)
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            raise BadInputError(
                "is a device, expected a file (or - for standard input)", path=name
            )
        if stat.S_ISREG(mode):
            raw = Path(path).read_bytes()
        else:  # a pipe (<(zcat ...)): it has no size, so read it within the limit
            with open(path, "rb") as fh:
                return read_stream(name, fh)
    except FileNotFoundError:
        raise BadInputError("no such file", path=name) from None
    except IsADirectoryError:
        raise BadInputError("is a folder, expected a file", path=name) from None
    except OSError as exc:
        raise BadInputError(f"cannot be read ({exc.strerror})", path=name) from exc
    return from_bytes(name, raw)


def read_stream(name: str, fh: BinaryIO) -> Source:
    """Read a pipe or standard input whole, but no more than :func:`max_inflated`.

    Past the limit the complete lines before it are kept and the input is marked
    cut, as for a gzip bomb (``yes | flows inspect -`` must not fill the memory).
    """
    limit = max_inflated()
    raw = fh.read(limit + 1)
    if len(raw) <= limit:
        return from_bytes(name, raw)
    raw = raw[:limit]
    too_much = f"more than {limit} bytes (${MAX_INFLATED_ENV} sets the limit)"
    if raw[:2] == GZIP_MAGIC:
        data, cut = gunzip(raw, limit=limit)
        return _cut(name, data, cut or too_much, compressed=True)
    return _cut(name, raw, too_much, compressed=False)


def from_bytes(name: str, raw: bytes) -> Source:
    """The :class:`Source` of bytes already read (stdin), gunzipped like a file.

    A leading UTF-8 byte-order mark (Windows editors write one) is dropped: it is
    not part of the first line.
    """
    if raw[:2] != GZIP_MAGIC:
        return Source(name, raw.removeprefix(UTF8_BOM))
    data, cut = gunzip(raw, limit=max_inflated())
    return _cut(name, data.removeprefix(UTF8_BOM), cut, compressed=True)


def _cut(name: str, data: bytes, cut: str | None, compressed: bool) -> Source:
    """The Source of ``data``; when ``cut`` says why it stopped, only whole lines."""
    if cut is None:
        return Source(name, data, compressed=compressed)
    keep = data.rfind(b"\n") + 1
    lines = data.count(b"\n", 0, keep)
    dropped = len(data) - keep
    note = f"{name}: {cut}; kept the {lines} complete lines before it"
    if dropped:
        note += f" and dropped a cut line of {dropped} bytes"
    return Source(name, data[:keep], compressed=compressed, cut=note)


def gunzip(raw: bytes, limit: int | None = None) -> tuple[bytes, str | None]:
    """Inflate every gzip member of ``raw``; return the text and why it stopped.

    With ``limit``, inflating stops once more than ``limit`` bytes came out: the
    text is cut at ``limit`` bytes exactly and the reason says so.
    """
    import io

    # TODO(gap): a line past MAX_LINE_BYTES is inflated whole before the readers
    # refuse it (a 5 MB gzip of one 1.2 GB line peaks at 3.6 GB); bounded only by
    # max_inflated(). The agent's streamed reads hold no such line.
    out: list[bytes] = []
    total = 0
    reader = Gunzip(io.BytesIO(raw))
    for chunk in reader:
        out.append(chunk)
        total += len(chunk)
        if limit is not None and total > limit:
            return b"".join(out)[:limit], (
                f"the inflated text passed {limit} bytes after {reader.offset} "
                f"compressed bytes (a gzip bomb, or a file too large to read whole; "
                f"${MAX_INFLATED_ENV} sets the limit)"
            )
    return b"".join(out), reader.stopped


class Gunzip:
    """The inflated text of every gzip member read from a file, in bounded steps.

    Iterating yields chunks of at most ``_OUT`` bytes. Afterwards ``stopped`` is
    None at a clean end, else a sentence saying where the stream was cut or
    damaged (the text before that point has been yielded). ``offset`` is the
    number of compressed bytes consumed so far.
    """

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.offset = 0
        self.stopped: str | None = None

    def __iter__(self) -> Iterator[bytes]:
        self.stopped = yield from self._chunks()

    def _inflate(self, inflater, data: bytes) -> Iterator[bytes]:
        """Feed ``data`` to ``inflater``, yielding bounded pieces of its output.

        A zlib error (a bad check sum at the end of a member, damaged data) loses
        the output of the call that raised it; that text is recovered first
        (:func:`_salvage`) and yielded, then the error is raised.
        """
        while True:
            before = len(data)
            saved = inflater.copy()
            try:
                text = inflater.decompress(data, _OUT)
            except zlib.error:
                text, clean = _salvage(saved, data)
                self.offset += clean
                if text:
                    yield text
                raise
            data = inflater.unconsumed_tail
            self.offset += before - len(data) - len(inflater.unused_data)
            if text:
                yield text
            if not data and (len(text) < _OUT or inflater.eof):
                return

    def _chunks(self) -> Generator[bytes, None, str | None]:
        fh = self.fh
        inflater = zlib.decompressobj(wbits=31)
        pending = b""
        while True:
            block = pending or fh.read(_BLOCK)
            pending = b""
            if not block:
                if inflater.eof or self.offset == 0:
                    return None
                return f"gzip stream cut at byte offset {self.offset} (no end marker)"
            try:
                yield from self._inflate(inflater, block)
            except zlib.error as exc:
                return f"gzip data damaged near byte offset {self.offset} ({exc})"
            if inflater.eof:
                rest = inflater.unused_data
                if not rest:
                    rest = fh.read(_BLOCK)
                if not rest:
                    return None
                if rest[:2] != GZIP_MAGIC and len(rest) >= 2:
                    if rest.strip(b"\x00") or fh.read(1):
                        return f"bytes after the gzip data at byte offset {self.offset}"
                    return None
                inflater = zlib.decompressobj(wbits=31)
                pending = rest


def _salvage(saved, data: bytes) -> tuple[bytes, int]:
    """All the output a copy of ``saved`` gives for a prefix of ``data`` without error.

    Returns that text and the length of the prefix.

    zlib raises when it reaches the damage (a bad check sum at the end of a member
    included) and drops what that call inflated; fed only the bytes before the
    damage it returns that text. A binary search on the prefix length finds them
    (about 20 tries for a block).
    """
    good, clean, lo, hi = b"", 0, 0, len(data)
    while lo <= hi:
        cut = (lo + hi) // 2
        try:
            text = saved.copy().decompress(data[:cut], _OUT)
        except zlib.error:
            hi = cut - 1
            continue
        good, clean, lo = text, cut, cut + 1
    return good, clean


def iter_gunzip(fh: BinaryIO) -> Generator[bytes, None, str | None]:
    """Yield the inflated text of every gzip member read from ``fh``, block by block.

    The generator's return value (``StopIteration.value``) is None at a clean end,
    else a sentence saying where the stream was cut or damaged; the text inflated
    before that point has been yielded already. See :class:`Gunzip`.
    """
    reader = Gunzip(fh)
    yield from reader
    return reader.stopped


def long_lines(body: bytes, limit: int = MAX_LINE_BYTES) -> list[int]:
    """The 0-based indices of the lines of ``body`` longer than ``limit`` bytes."""
    if len(body) <= limit:
        return []
    # A line over ``limit`` bytes covers a whole aligned block of limit/2 bytes: when
    # every block holds a newline (memchr, fast) there is no such line.
    block = max(1, limit // 2)
    if all(body.find(b"\n", at, at + block) >= 0 for at in range(0, len(body), block)):
        return []
    import numpy as np

    step = 1 << 26  # look for newlines 64 MiB at a time, to bound the temporary mask
    ends = []
    for at in range(0, len(body), step):
        part = np.frombuffer(body, np.uint8, min(step, len(body) - at), at)
        ends.append(np.flatnonzero(part == 10) + at)
    stops = np.concatenate(ends + [np.array([len(body)], dtype=np.int64)])
    starts = np.concatenate(([0], stops[:-1] + 1))
    return [int(i) for i in np.flatnonzero(stops - starts > limit)]


def too_long(length: int) -> str:
    """The problem text for a line of ``length`` bytes over the limit."""
    return (
        f"a line of {length} bytes, longer than the {MAX_LINE_BYTES}-byte limit for "
        "one row"
    )
