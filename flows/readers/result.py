"""What a reader returns: the table it read and what it had to say about the input."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ReadResult:
    """The rows read from one or more inputs, with their format and any damage found.

    ``partial`` is true when the input was damaged part way: ``table`` then holds the
    rows read before the damage, and ``warnings`` says where it was found.
    """

    table: Any  # pyarrow.Table
    format: str
    family: str
    skipped: int = 0
    warnings: list[str] = field(default_factory=list)
    partial: bool = False
    stats: dict[str, Any] = field(default_factory=dict)
