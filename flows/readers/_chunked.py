"""Reading a regular file piece by piece, in memory that does not grow with it.

Only the formats whose readers take their text in pieces (Zeek TSV and Zeek JSON)
are read so; for any other input :func:`read_in_pieces` gives None and the caller
reads the file whole. The checks that a whole read makes on the start of the text
(empty, UTF-16, a gzip-compressed binary, the format) are made on the first
pieces, so every error and result is the same as a whole read's.

:func:`stream_blocks` gives the smaller pieces a reader takes that yields records
as it goes (an Argus binetflow file streamed by
:func:`flows.readers.stream.iter_records`), so that a file of any size is held a
few thousand lines at a time.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

from flows.readers._source import Blocks
from flows.readers.result import ReadResult

# sniff_text looks at no more than this many bytes of text.
_HEAD_BYTES = 65536
# The formats read in pieces, and the function of flows.readers.zeek that does it.
_READERS = {"zeek-tsv": "read_tsv_blocks", "zeek-json": "read_json_blocks"}
# About how much text a streaming reader converts at a time: a few thousand lines
# of a flow file. Read at each call, so that tests can lower it to put the edges
# of the blocks anywhere.
STREAM_BYTES = 1 << 19


def is_regular(path: str | Path) -> bool:
    """Whether ``path`` is a regular file (which can be read more than once);
    False for a pipe, a device, or a path that cannot be looked at (the whole read
    names that problem)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def stream_blocks(path: str | Path, on_error: str) -> Blocks:
    """The text of the regular file ``path`` in pieces of about
    :data:`STREAM_BYTES`, for a reader that yields records as it goes.

    The pieces joined are the text a whole read of ``path`` with ``on_error``
    takes (:func:`flows.readers._source.load`): a gzip input is inflated under the
    same limits and cut at the same place, and, failing at the first bad line, no
    further than a line over the length limit.
    """
    return Blocks(path, stop_at_long_line=on_error == "fail", size=STREAM_BYTES)


def read_in_pieces(
    path: str | Path, on_error: str, timezone: str = "UTC"
) -> ReadResult | None:
    """Read the regular file ``path`` in pieces; None when it is to be read whole.

    ``timezone`` is taken for the formats to come that use it (binetflow).
    """
    from flows.readers import check_wide_text
    from flows.readers.detect import sniff_binary, sniff_text

    if not is_regular(path):
        return None  # the whole read names the problem, or reads the pipe
    blocks = Blocks(path, stop_at_long_line=on_error == "fail")
    pieces = iter(blocks)
    try:
        head: list[bytes] = []
        held = 0
        for piece in pieces:
            head.append(piece)
            held += len(piece)
            if held >= _HEAD_BYTES:
                break
        text = b"".join(head)
        if not text or text.isspace():
            return None  # maybe empty: only the whole text tells
        check_wide_text(text, blocks.path)
        if blocks.compressed and sniff_binary(text[:4]) is not None:
            return None
        fmt = sniff_text(text, blocks.path)
        if fmt not in _READERS:
            return None
        from flows.readers import zeek

        del text  # neither the head's text nor its pieces are kept once read
        read_blocks = getattr(zeek, _READERS[fmt])
        try:
            return read_blocks(
                chain(_handed(head), pieces), blocks.path, on_error, lambda: blocks.cut
            )
        except zeek.Redo:
            return None
    finally:
        pieces.close()


def _handed(head: list[bytes]) -> Iterator[bytes]:
    """The pieces of ``head``, each dropped from it as it is handed out."""
    head.reverse()
    while head:
        yield head.pop()
