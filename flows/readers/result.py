"""What a reader returns: the table it read and what it had to say about the input."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Damage:
    """Damage found in one input, for the message a command ends with.

    ``place`` says where (``byte offset 96``; None where ``what`` says it, as in
    ``the last line (12) is cut short``) and ``what`` what was found there.
    ``stopped``: the read of ``path`` stopped there (a cut, bytes that are no
    record), so nothing after it was read. Otherwise the read went on past it:
    ``records`` damaged records (a capture's packets) were found, the first at
    ``place``, and ``skipped`` of them were skipped (the others were read as far
    as they go).
    """

    path: str
    what: str
    place: str | None = None
    stopped: bool = True
    records: int = 0
    skipped: int = 0


def damaged_packets(found: Damage) -> str:
    """``2 damaged packets skipped`` and the like: how a message counts the damaged
    packets of a capture that ``found`` stands for."""
    n, skipped = found.records, found.skipped
    noun = "damaged packet" if n == 1 else "damaged packets"
    if skipped >= n:
        return f"{n} {noun} skipped"
    if skipped == 0:
        return f"{n} {noun} read as far as {'it goes' if n == 1 else 'they go'}"
    return f"{n} {noun} ({skipped} skipped, {n - skipped} read as far as they go)"


@dataclass
class ReadResult:
    """The rows read from one or more inputs, with their format and any damage found.

    ``partial`` is true when the input was damaged: ``table`` then holds the rows
    read before the damage (or, for damaged packets a capture reader went on past,
    the rows of the others), ``warnings`` says where it was found and ``damage``
    holds one :class:`Damage` per place. ``label_text`` is the label of each row
    of ``table`` as written in the input (None when the format carries none);
    ``stats["labels"]`` counts it. ``recount`` (a
    :class:`flows.readers._finish.Recount`, None when the reader counts nothing
    per row) counts the reader's other per-row stats again over fewer rows.

    ``row_lines`` (one file read, None when unknown) is where each row of
    ``table`` was in the input: its file line, or its 1-based row number where
    ``row_unit`` is ``"row"`` (Parquet), for a caller that takes the rows one by
    one to name one by its place. ``non_ip`` (None when the reader marks none)
    is true for each row that is a record of no IP flow (an Argus management
    record, a layer-2 flow), whose addresses the reader left null.
    """

    table: Any  # pyarrow.Table
    format: str
    family: str
    skipped: int = 0
    warnings: list[str] = field(default_factory=list)
    partial: bool = False
    stats: dict[str, Any] = field(default_factory=dict)
    damage: list[Damage] = field(default_factory=list)
    label_text: Any = field(default=None, repr=False, compare=False)
    recount: Any = field(default=None, repr=False, compare=False)
    row_lines: Any = field(default=None, repr=False, compare=False)
    row_unit: str = "line"
    non_ip: Any = field(default=None, repr=False, compare=False)
