"""argparse types that refuse out-of-range numbers before any work starts.

Every command-line tool takes sizes, rates and shares; a value outside its range
(``--lr nan``, ``--members 0``, ``--subspace 2``) must be a usage error (exit 2)
when the flags are parsed, not a traceback or a failure after the data was read.
Each factory returns a callable for ``add_argument(type=...)``; argparse turns its
``ArgumentTypeError`` into the usage message and exit code 2. :func:`zone_name` is
such a callable itself: every tool's ``--timezone`` is checked by it, so all of
them refuse an unknown zone with the same words.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flows.errors import UsageError

__all__ = [
    "check_can_create", "check_writable_above", "integer", "integers", "named",
    "real", "reals", "zone_name",
]


def _fmt(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def _bounds(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    """The range in words, e.g. 'in (0, 1]' or '>= 1'."""
    if lo is not None and hi is not None:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        return f"in {left}{_fmt(lo)}, {_fmt(hi)}{right}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {_fmt(lo)}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {_fmt(hi)}"
    return "finite"


def _check(value: float, text: str, lo, hi, lo_open, hi_open) -> None:
    inside = math.isfinite(value)
    if inside and lo is not None:
        inside = value > lo if lo_open else value >= lo
    if inside and hi is not None:
        inside = value < hi if hi_open else value <= hi
    if not inside:
        where = _bounds(lo, hi, lo_open, hi_open)
        raise argparse.ArgumentTypeError(f"must be a number {where}, got {text!r}")


def _number(convert, expected: str, lo, hi, lo_open: bool, hi_open: bool):
    """An argparse type: ``convert(text)`` (ValueError: not a number), then bounds."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(
                f"expected {expected}, got {text!r}") from exc
        _check(value, text, lo, hi, lo_open, hi_open)
        return value

    return parse


def real(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> Callable[[str], float]:
    """A finite float within the bounds (``lo_open``/``hi_open``: bound excluded)."""
    return _number(float, "a number", lo, hi, lo_open, hi_open)


def integer(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An integer within ``[lo, hi]``."""
    return _number(int, "an integer", lo, hi, False, False)


def _list_of(one: Callable[[str], float], example: str) -> Callable[[str], list]:
    """An argparse type: a comma-separated list, each item checked by ``one``."""

    def parse(text: str) -> list:
        items = [v.strip() for v in text.split(",")]
        if items and not items[-1]:
            items.pop()  # one trailing comma, as in "64,32,"
        if not any(items):
            raise argparse.ArgumentTypeError(
                f"expected a list like {example}, got {text!r}")
        if not all(items):
            # "4,,8" was read as 4,8 without a word: a lost value is a typo's sign.
            raise argparse.ArgumentTypeError(
                f"expected a list like {example}, got {text!r}: an empty item "
                "(two commas in a row, or one at the start)")
        return [one(v) for v in items]

    return parse


def integers(
    lo: int | None = None, hi: int | None = None
) -> Callable[[str], list[int]]:
    """A comma-separated list of integers within ``[lo, hi]``, e.g. ``64,64``."""
    return _list_of(integer(lo, hi), "64,64")


def reals(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> Callable[[str], list[float]]:
    """A comma-separated list of finite floats within the bounds, e.g. ``1e-3,3e-4``."""
    return _list_of(real(lo, hi, lo_open=lo_open, hi_open=hi_open), "0.1,0.2")


def named(what: str, as_path: bool = True) -> Callable[[str], Any]:
    """An argparse type for a file, folder or dataset name that must not be empty:
    ``Path("")`` is the current folder, so ``--out ""`` (an unset shell variable)
    would write there. ``what`` completes "name ..." in the error."""

    def parse(text: str) -> Any:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"is empty; name {what}")
        return Path(text) if as_path else text

    return parse


def zone_name(text: str) -> str:
    """The argparse type of every ``--timezone``: an IANA zone name such as
    ``Europe/Prague`` (or ``UTC``), returned as given; any other name is the
    readers' "unknown time zone" message, so a usage error (exit 2) before any
    file is read."""
    from flows.readers import check_timezone

    try:
        check_timezone(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def nearest_existing(start: str | Path) -> Path:
    """The nearest name at or above ``start`` that exists; a dangling link counts
    (nothing can be made through it). Whether it is a folder says whether an
    output under ``start`` can be made there."""
    above = Path(start)
    while not (above.exists() or above.is_symlink()) and above != above.parent:
        above = above.parent
    return above


def check_writable_above(start: Path, label: str) -> None:
    """Refuse (UsageError) an output whose nearest existing folder at or above
    ``start`` is a file or cannot be written in; ``label`` names the flag and
    value in the message (``--out X``). Checked before the work, so a run does not
    end in a failed write."""
    above = nearest_existing(start)
    if not above.is_dir():
        raise UsageError(f"{label}: {above} is a file, not a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise UsageError(f"{label}: cannot write in {above}")


def check_can_create(start: Path, label: str) -> None:
    """Refuse (UsageError) an output under ``start`` where no folder or file can
    be made: one of each is made, then removed, in the nearest existing folder at
    or above it. Stricter than :func:`check_writable_above`, whose permission bits
    allow /proc and /sys for root (they refuse new entries all the same), and a
    read-only mount too; ``label`` names the flag and value (``--out X``)."""
    from flows.readers.writers import write_problem

    above = nearest_existing(start)
    try:
        probe = Path(tempfile.mkdtemp(prefix=".gatewatch-probe-", dir=above))
    except OSError as exc:
        raise UsageError(f"{label}: cannot make a folder in {above} "
                         f"({write_problem(exc, above / '.probe')})") from exc
    try:
        fd = os.open(probe / "file", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
    except OSError as exc:
        raise UsageError(f"{label}: cannot make a file in {above} "
                         f"({write_problem(exc, probe / 'file')})") from exc
    finally:
        with contextlib.suppress(OSError):
            (probe / "file").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            probe.rmdir()
