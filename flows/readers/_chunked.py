"""Reading a regular file piece by piece, in memory that does not grow with it.

Only the formats whose readers take their text in pieces (Zeek TSV) are read so;
for any other input :func:`read_in_pieces` gives None and the caller reads the
file whole. The checks that a whole read makes on the start of the text (empty,
UTF-16, a gzip-compressed binary, the format) are made on the first pieces, so
every error and result is the same as a whole read's.
"""

from __future__ import annotations

import os
import stat
from itertools import chain
from pathlib import Path

from flows.readers._source import Blocks
from flows.readers.result import ReadResult

# sniff_text looks at no more than this many bytes of text.
_HEAD_BYTES = 65536


def read_in_pieces(
    path: str | Path, on_error: str, timezone: str = "UTC"
) -> ReadResult | None:
    """Read the regular file ``path`` in pieces; None when it is to be read whole.

    ``timezone`` is taken for the formats to come that use it (binetflow).
    """
    from flows.readers import check_wide_text
    from flows.readers.detect import sniff_binary, sniff_text

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
    except OSError:
        return None  # the whole read names the problem
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
        if sniff_text(text, blocks.path) != "zeek-tsv":
            return None
        from flows.readers.zeek import Redo, read_tsv_blocks

        try:
            return read_tsv_blocks(
                chain(head, pieces), blocks.path, on_error, lambda: blocks.cut
            )
        except Redo:
            return None
    finally:
        pieces.close()
