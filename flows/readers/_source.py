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
block splitter cannot take them, and no flow record is that long). While a gzip
input is inflated, such a line is held only up to one byte past the limit (enough
for the readers to refuse it) and the rest of it is dropped as it comes out, so one
huge line costs no more memory than a line at the limit; when the caller fails on
the first bad line anyway, inflating stops at that line.

:class:`Blocks` reads a regular file the same way without holding it whole: it
yields the text :func:`load` would return, in pieces of whole lines of about
:data:`CHUNK_BYTES`, and knows the input's ``cut`` once they are all read.
"""

from __future__ import annotations

import io
import os
import re
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
# The problem of a line holding bytes that are not UTF-8: a bad line in every
# reader, the whole-file readers (flows) and the agent's sources alike.
NOT_UTF8 = "bytes that are not UTF-8"
# What ``surrogateescape`` decoding makes of a byte that is not UTF-8.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
_MAX_INFLATED_DEFAULT = 2 << 30
# The most bytes one read of a pipe or standard input asks for (see _read_within).
_PIPE_PIECE = 1 << 26
# About how much text a chunked read (Blocks) hands a reader at a time; the pieces
# end at a newline, so one may be longer. Tests lower it to cut inputs anywhere.
CHUNK_BYTES = 1 << 24


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


def load(path: str | Path, stop_at_long_line: bool = False) -> Source:
    """Read ``path`` into memory, gunzipping it when its first bytes say gzip.

    ``stop_at_long_line`` (for a reader that fails on its first bad line): a gzip
    input is inflated no further than its first line over :data:`MAX_LINE_BYTES`.
    """
    # TODO(gap): pipes, stdin and formats but Zeek TSV/JSON are read whole here.
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
                return read_stream(name, fh, stop_at_long_line)
    except MemoryError:  # a plain file is read whole, whatever the limit
        raise _no_room(name, capped=False) from None
    except FileNotFoundError:
        raise BadInputError("no such file", path=name) from None
    except IsADirectoryError:
        raise BadInputError("is a folder, expected a file", path=name) from None
    except OSError as exc:
        raise BadInputError(f"cannot be read ({exc.strerror})", path=name) from exc
    try:
        return from_bytes(name, raw, stop_at_long_line)
    except MemoryError:  # inflating gzip text, which the limit caps
        del raw
        raise _no_room(name, capped=True) from None


def _no_room(name: str, capped: bool) -> BadInputError:
    """The error for an input that did not fit in memory while it was read whole.

    Bad input (exit 3), as nothing of it was read. ``capped``: the read stops at
    :func:`max_inflated` bytes (standard input, a pipe, gzip text), so a lower
    ``$GATEWATCH_MAX_INFLATED`` lets part of it be read; a plain file is read
    whole, and only a smaller file helps.
    """
    if capped:
        fix = (
            f"set ${MAX_INFLATED_ENV} (now {max_inflated()} bytes) lower to read "
            "only its start, or split the input"
        )
    else:
        fix = "split the input into smaller files"
    return BadInputError(
        f"did not fit in memory when read whole, so nothing of it was read; {fix}",
        path=name,
    )


def read_stream(name: str, fh: BinaryIO, stop_at_long_line: bool = False) -> Source:
    """Read a pipe or standard input whole, but no more than :func:`max_inflated`.

    Past the limit the complete lines before it are kept and the input is marked
    cut, as for a gzip bomb (``yes | flows inspect -`` must not fill the memory).
    ``stop_at_long_line`` is as for :func:`load`.
    """
    limit = max_inflated()
    try:
        raw, more = _read_within(fh, limit)
        if not more:
            return from_bytes(name, raw, stop_at_long_line)
        too_much = f"more than {limit} bytes (${MAX_INFLATED_ENV} sets the limit)"
        if raw[:2] == GZIP_MAGIC:
            return gunzip(name, raw, limit, stop_at_long_line, stopped=too_much)
        return _cut(name, raw, too_much, compressed=False)
    except MemoryError:
        raise _no_room(name, capped=True) from None


def _read_within(fh: BinaryIO, limit: int) -> tuple[bytes, bool]:
    """The first ``limit`` bytes of ``fh`` (all of it when shorter), and whether
    more followed.

    Read in pieces, so only what the input holds is taken (one read of
    ``limit + 1`` bytes would claim the whole limit at once, 2 GiB by default,
    for a few lines), and at most one byte past the limit is read.
    """
    held = io.BytesIO()  # grows in place; getvalue() hands its buffer over
    size = _BLOCK
    while (room := limit + 1 - held.tell()) > 0:
        piece = fh.read(min(size, room))
        if not piece:
            break
        held.write(piece)
        del piece
        size = min(size * 2, _PIPE_PIECE)
    more = held.tell() > limit
    if more:
        held.truncate(limit)
    return held.getvalue(), more


def from_bytes(name: str, raw: bytes, stop_at_long_line: bool = False) -> Source:
    """The :class:`Source` of bytes already read (stdin), gunzipped like a file.

    A leading UTF-8 byte-order mark (Windows editors write one) is dropped: it is
    not part of the first line. ``stop_at_long_line`` is as for :func:`load`.
    """
    if raw[:2] != GZIP_MAGIC:
        return Source(name, raw.removeprefix(UTF8_BOM))
    return gunzip(name, raw, max_inflated(), stop_at_long_line)


def _cut(
    name: str,
    data: bytes,
    cut: str | None,
    compressed: bool,
    tail: int | None = None,
) -> Source:
    """The Source of ``data``; when ``cut`` says why it stopped, only whole lines.

    ``tail`` is the length the unfinished last line had in the input, when less
    of it than that is in ``data`` (a long line held only up to the limit).
    """
    if cut is None:
        return Source(name, data, compressed=compressed)
    keep = data.rfind(b"\n") + 1
    lines = data.count(b"\n", 0, keep)
    dropped = len(data) - keep if tail is None else tail
    note = f"{name}: {cut}; {kept_lines(lines)}"
    if dropped:
        note += f" and dropped a cut line of {_bytes(dropped)}"
    return Source(name, data[:keep], compressed=compressed, cut=note)


def _bytes(n: int) -> str:
    """``1 byte``, ``7 bytes``."""
    return "1 byte" if n == 1 else f"{n} bytes"


def kept_lines(lines: int) -> str:
    """What a cut input kept, in words: ``kept the 3 complete lines before it``."""
    if lines == 0:
        return "no complete line came before it"
    if lines == 1:
        return "kept the one complete line before it"
    return f"kept the {lines} complete lines before it"


def gunzip(
    name: str,
    raw: bytes,
    limit: int,
    stop_at_long_line: bool = False,
    stopped: str | None = None,
) -> Source:
    """Inflate every gzip member of ``raw`` into the :class:`Source` of ``name``.

    Inflating stops once more than ``limit`` bytes came out: the text is cut at
    ``limit`` bytes exactly and the Source says so. A line over
    :data:`MAX_LINE_BYTES` is held only up to one byte past it (see
    :class:`_LineGuard`); with ``stop_at_long_line`` inflating ends at that line,
    which is kept (so the reader names it) and the Source is marked cut after it.
    ``stopped`` is the reason given when the gzip data themselves end cleanly but
    the input was cut all the same (a pipe read only up to the limit).
    """
    import io

    guard = _LineGuard(stop_at_long_line)
    reader = Gunzip(io.BytesIO(raw))
    for over in _inflate(reader, guard, limit):
        if guard.long_line is not None:
            note = _long_line_note(name, guard.long_line, reader.offset)
            text = guard.text().removeprefix(UTF8_BOM)
            return Source(name, text, compressed=True, cut=note)
        if over:
            why = _over_limit(limit, reader.offset)
            text = guard.text().removeprefix(UTF8_BOM)
            return _cut(name, text, why, compressed=True, tail=guard.run)
    text = guard.text().removeprefix(UTF8_BOM)
    return _cut(name, text, reader.stopped or stopped, compressed=True, tail=guard.run)


class _LineGuard:
    """Collects inflated text, holding no line past ``MAX_LINE_BYTES + 1`` bytes.

    A line over :data:`MAX_LINE_BYTES` keeps its first ``MAX_LINE_BYTES + 1``
    bytes: the readers see it is too long and refuse it as a bad line; the rest
    of it is dropped as it arrives. ``run`` is the length the unfinished last line
    has in the input so far. With ``stop`` the first such line ends the text (a
    newline is put after what is kept of it) and ``long_line`` is its number.
    """

    _KEEP = MAX_LINE_BYTES + 1

    def __init__(self, stop: bool) -> None:
        self.stop = stop
        self.parts: list[bytes] = []
        self.run = 0
        self.long_line: int | None = None
        self.lines_taken = 0  # newlines in the text :meth:`take` handed out

    def text(self) -> bytes:
        """Everything collected so far, as one bytes object."""
        text = b"".join(self.parts)
        self.parts = [text]
        return text

    def take(self) -> bytes:
        """The text collected since the last call, which the guard then forgets."""
        text = b"".join(self.parts)
        self.parts = []
        self.lines_taken += text.count(b"\n")
        return text

    def add(self, chunk: bytes) -> None:
        """Take the next piece of inflated text (after ``long_line`` is set, none)."""
        first = chunk.find(b"\n")
        if first < 0:
            self._line(chunk, ends=False)
            return
        last = chunk.rfind(b"\n")
        tail = len(chunk) - last - 1
        if (
            self.run + first <= MAX_LINE_BYTES
            and tail <= MAX_LINE_BYTES
            and not _long_inside(chunk, first + 1, last)
        ):
            self.parts.append(chunk)  # the usual case: no line here is too long
            self.run = tail
            return
        self._slow(chunk, first, last)

    def _slow(self, chunk: bytes, first: int, last: int) -> None:
        """:meth:`add` for a chunk that holds (part of) a line over the limit."""
        import numpy as np

        if not self._line(chunk[:first], ends=True):
            return
        at = first + 1  # where the text not yet taken starts
        mask = np.frombuffer(chunk, np.uint8, last - first, at) == 10
        ends = np.flatnonzero(mask) + at  # every newline after the first
        starts = np.concatenate(([at], ends[:-1] + 1))[: len(ends)]
        for i in np.flatnonzero(ends - starts > MAX_LINE_BYTES):
            start, end = int(starts[i]), int(ends[i])
            self.parts.append(chunk[at:start])
            if not self._line(chunk[start:end], ends=True):
                return
            at = end + 1
        self.parts.append(chunk[at : last + 1])
        self._line(chunk[last + 1 :], ends=False)

    def _line(self, piece: bytes, ends: bool) -> bool:
        """Add ``piece`` to the last line (which it ends, with ``ends``).

        Returns False when inflating should stop here (``long_line`` is set).
        """
        room = self._KEEP - self.run
        if room > 0:
            self.parts.append(piece[:room] if len(piece) > room else piece)
        self.run += len(piece)
        if self.stop and self.run > MAX_LINE_BYTES:
            self.parts.append(b"\n")
            self.long_line = self.lines_taken + sum(
                part.count(b"\n") for part in self.parts
            )
            return False
        if ends:
            self.parts.append(b"\n")
            self.run = 0
        return True


def _long_inside(text: bytes, start: int, stop: int) -> bool:
    """Whether ``text[start:stop]`` may hold a line over :data:`MAX_LINE_BYTES`.

    Such a line spans a whole block of half the limit, counted from ``start``; when
    every such block holds a newline (a fast search) there is none. True can be a
    false alarm (a line just under the limit), never a miss.
    """
    block = MAX_LINE_BYTES // 2
    return any(
        text.find(b"\n", at, at + block) < 0
        for at in range(start, stop - block + 1, block)
    )


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
    """The problem text for a line of ``length`` bytes over the limit.

    ``MAX_LINE_BYTES + 1`` is all a gzip input's long line keeps (see
    :class:`_LineGuard`), so for that length the text does not claim to know more.
    """
    if length == MAX_LINE_BYTES + 1:
        return f"a line longer than the {MAX_LINE_BYTES}-byte limit for one row"
    return (
        f"a line of {length} bytes, longer than the {MAX_LINE_BYTES}-byte limit for "
        "one row"
    )


def _inflate(reader: Gunzip, guard: _LineGuard, limit: int) -> Iterator[bool]:
    """Feed ``reader``'s inflated text to ``guard``, no more than ``limit`` bytes.

    Yields after each chunk whether the limit was passed there; the caller stops on
    that or on ``guard.long_line``.
    """
    total = 0
    for chunk in reader:
        over = limit - total < len(chunk)
        if over:
            chunk = chunk[: limit - total]
        total += len(chunk)
        guard.add(chunk)
        yield over


def _long_line_note(name: str, line: int, offset: int) -> str:
    """The cut note of a gzip input whose inflating stopped at an over-long line."""
    return (
        f"{name}: line {line} is longer than the {MAX_LINE_BYTES}-byte limit for "
        f"one row; stopped inflating there, after {offset} compressed bytes"
    )


def _over_limit(limit: int, offset: int) -> str:
    """Why a gzip input was cut at the inflated-size limit."""
    return (
        f"the inflated text passed {limit} bytes after {offset} compressed bytes (a "
        f"gzip bomb, or a file too large to read whole; ${MAX_INFLATED_ENV} sets the "
        "limit)"
    )


class Blocks:
    """A regular file's text in pieces of whole lines, read in bounded memory.

    Iterating (once) yields exactly the bytes ``load(path, stop_at_long_line).data``
    would hold: a byte-order mark dropped, gzip inflated under the same limits and
    cut at the same place. Each piece ends at a newline (only the last may not) and
    holds at least :data:`CHUNK_BYTES` bytes unless the text ends first. Once the
    last piece is out, ``cut`` is what ``Source.cut`` would be. Held at a time: a
    piece and the line it stops inside (twice that while a piece is joined; a
    piece handed out is not kept); a plain file's line is held whole however
    long it is, a gzip line only up to the limit (see :class:`_LineGuard`).
    ``size``, when given, is the piece size to use instead of :data:`CHUNK_BYTES`
    (a reader that yields records as it goes takes smaller pieces).
    """

    def __init__(
        self,
        path: str | Path,
        stop_at_long_line: bool = False,
        size: int | None = None,
    ) -> None:
        self.path = str(path)
        self.stop = stop_at_long_line
        self.size = size
        self.compressed = False
        self.cut: str | None = None
        self._note: str | None = None  # a cut that ends on a whole line already
        self._stopped: tuple[str, int] | None = None  # why, length of the cut line

    def __iter__(self) -> Iterator[bytes]:
        try:
            with open(self.path, "rb") as fh:
                self.compressed = fh.read(2) == GZIP_MAGIC
                fh.seek(0)
                text = self._inflated(fh) if self.compressed else self._plain(fh)
                yield from self._pieces(text)
        except OSError as exc:
            raise BadInputError(
                f"cannot be read ({exc.strerror})", path=self.path
            ) from exc

    def _size(self) -> int:
        """The size of a piece: ``size``, else :data:`CHUNK_BYTES` (read now, as
        tests lower it)."""
        return max(1, CHUNK_BYTES if self.size is None else self.size)

    def _plain(self, fh: BinaryIO) -> Iterator[bytes]:
        size = min(self._size(), _BLOCK)  # _pieces joins these into pieces
        while piece := fh.read(size):
            yield piece

    def _inflated(self, fh: BinaryIO) -> Iterator[bytes]:
        """The text :func:`gunzip` would give, as it comes out (see there)."""
        limit = max_inflated()
        guard = _LineGuard(self.stop)
        reader = Gunzip(fh)
        for over in _inflate(reader, guard, limit):
            if text := guard.take():
                yield text
            if guard.long_line is not None:
                self._note = _long_line_note(self.path, guard.long_line, reader.offset)
                return
            if over:
                self._stopped = (_over_limit(limit, reader.offset), guard.run)
                return
        if reader.stopped is not None:
            self._stopped = (reader.stopped, guard.run)

    def _pieces(self, text: Iterator[bytes]) -> Iterator[bytes]:
        """Regroup ``text`` into pieces of whole lines; then set ``cut``."""
        size = self._size()
        parts: list[bytes] = []
        held = 0
        lines = 0  # newlines handed out
        start = True  # the byte-order mark is not looked for yet
        for piece in text:
            parts.append(piece)
            held += len(piece)
            if start:
                if held < len(UTF8_BOM):
                    continue
                parts, start = [b"".join(parts).removeprefix(UTF8_BOM)], False
                held = len(parts[0])
            # Only a piece with a newline can end one of ours.
            if held < size or b"\n" not in piece:
                continue
            one = _cut_last(parts, held, size)
            if one is not None:  # the usual case: one piece, joined once
                (out, rest), one = one, None
                parts, held = ([rest] if rest else []), len(rest)
                lines += out.count(b"\n")
                yield out
                del out
                continue
            buf = b"".join(parts)
            ends = []
            at = 0
            while len(buf) - at >= size:
                end = buf.find(b"\n", at + size - 1) + 1
                if not end:
                    break
                ends.append(end)
                at = end
            parts = [buf[at:]] if at < len(buf) else []
            held = len(buf) - at
            at = 0
            for end in ends:
                out = buf[at:end] if at or end < len(buf) else buf
                lines += out.count(b"\n")
                at = end
                if end == ends[-1]:
                    buf = b""  # the joined text is not held while the last goes out
                yield out
                del out  # nor a piece while the next is read
        rest = b"".join(parts)
        if start:
            rest = rest.removeprefix(UTF8_BOM)
        if self._stopped is not None:
            why, tail = self._stopped
            rest = rest[: rest.rfind(b"\n") + 1]
            lines += rest.count(b"\n")
            note = f"{self.path}: {why}; {kept_lines(lines)}"
            if tail:
                note += f" and dropped a cut line of {_bytes(tail)}"
            self.cut = note
        else:
            self.cut = self._note
        if rest:
            yield rest


def _cut_last(parts: list[bytes], held: int, size: int) -> tuple[bytes, bytes] | None:
    """The piece :meth:`Blocks._pieces` cuts from ``parts`` (``held`` bytes in
    all), and the rest, when the cut falls in the last part and the rest is too
    short for another piece; else None. The piece is joined without first
    joining all the parts, so the text is copied once."""
    last = parts[-1]
    before = held - len(last)
    if before >= size:
        return None
    end = last.find(b"\n", size - 1 - before) + 1
    if not end or len(last) - end >= size:
        return None
    if end == len(last):
        return b"".join(parts), b""
    return b"".join(parts[:-1] + [last[:end]]), last[end:]


def not_utf8_text(text: str) -> bool:
    """Whether ``text``, decoded with ``errors="surrogateescape"``, held bytes that
    are not UTF-8 (each became a lone surrogate U+DC80..U+DCFF), so that a line
    read as text can be refused as :data:`NOT_UTF8`, as the whole-file readers
    refuse it, instead of being read with U+FFFD in a field."""
    return not text.isascii() and _ESCAPED_BYTE.search(text) is not None
