"""Round 15 findings: a followed conn.log truncated or rewritten in place.

An operator found ``zeek:conn.log --follow`` losing rows when the log changed
under the same inode: after logrotate's ``copytruncate`` Zeek goes on writing
rows with no new header, and every one was rejected as a row before any
``#fields`` line; and a file rewritten while the agent was busy, ending larger
than the point reached, was read on from that point, mid-line in the new text.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from edge_agent.sources import open_source
from tests.conftest import wait_for
from tests.test_agent_imports import _HEADER

_TRUNCATED = "the file was truncated in place; reading on with its earlier #fields"
_ROTATED = "the file was truncated in place (a copytruncate rotation)"
_REWRITTEN = "the file was rewritten in place"


def _row(i: int, service: str = "dns") -> str:
    """A Zeek TSV row under ``_HEADER`` whose uid is ``C{i}``."""
    return (
        f"{1655071198 + i}.5\tC{i}\t10.0.0.5\t{10000 + i}\t10.0.0.1\t53\tudp"
        f"\t{service}\t0.01\t40\t80\tSF\tDd\t1\t1\tBenign"
    )


def _text(lines: list[str]) -> str:
    return "\n".join(lines) + "\n"


def _uids(first: int, last: int) -> list[str]:
    return [f"C{i}" for i in range(first, last + 1)]


def _follow(log: Path) -> tuple[object, list[dict], threading.Thread]:
    """``log`` followed by a source whose records a thread (not started yet)
    gathers into the list."""
    src = open_source(f"zeek:{log}", follow=True, poll=0.05)
    got: list[dict] = []
    return src, got, threading.Thread(target=lambda: got.extend(src), daemon=True)


def test_rows_after_a_copytruncate_keep_the_earlier_fields(tmp_path: Path, caplog):
    """Found: after ``cp conn.log conn.log.1; : > conn.log`` the rows Zeek went on
    writing (no header) were all rejected. They keep the layout read before, said
    once; a later header replaces it (here one without the label column)."""
    log = tmp_path / "conn.log"
    log.write_text(_text([*_HEADER, *map(_row, range(1, 101))]))
    src, got, thread = _follow(log)
    with caplog.at_level(logging.INFO, logger="gatewatch"):
        thread.start()
        wait_for(lambda: len(got) == 100, 10, "100 records")
        (tmp_path / "conn.log.1").write_bytes(log.read_bytes())
        with log.open("r+b") as fh:  # copytruncate: the same inode, cut to 0
            fh.truncate(0)
        with log.open("a") as fh:
            fh.write(_text([_row(i) for i in range(101, 201)]))
        wait_for(lambda: len(got) == 200, 10, "200 records")
        no_label = [
            line.removesuffix("\tlabel").removesuffix("\tstring") for line in _HEADER
        ]
        with log.open("r+b") as fh:
            fh.truncate(0)
        with log.open("a") as fh:
            fh.write(_text([*no_label, *(_row(i)[:-7] for i in range(201, 204))]))
        wait_for(lambda: len(got) == 203, 10, "203 records")
        src.end.set()
        thread.join(10)
    assert not thread.is_alive()
    assert [r["uid"] for r in got] == _uids(1, 203)
    assert [r["label"] for r in got[199:]] == [0, None, None, None]
    assert src.rejected == {} and src.error is None
    assert caplog.text.count(_TRUNCATED) == 1
    assert caplog.text.count(_ROTATED) == 2


def test_a_rewrite_larger_than_the_point_reached_is_read_from_its_start(
    tmp_path: Path, caplog
):
    """Found: a file rewritten through its inode while the agent was busy (header
    and rows 101-361, larger than before) gave 259 flows and a rejected line. The
    changed first bytes say it was rewritten: all 261 new rows are read."""
    log = tmp_path / "conn.log"
    log.write_text(_text([*_HEADER, *map(_row, range(1, 101))]))
    src = open_source(f"zeek:{log}", follow=True, poll=0.05)
    records = iter(src)
    with caplog.at_level(logging.WARNING, logger="gatewatch"):
        got = [next(records) for _ in range(100)]  # the agent is busy with row 100
        with log.open("r+") as fh:
            fh.truncate(0)
            fh.write(_text([*_HEADER, *map(_row, range(101, 362))]))
        src.end.set()  # ends once it yielded what the file holds
        got.extend(records)
    assert [r["uid"] for r in got] == _uids(1, 361)
    assert src.rejected == {} and src.error is None
    assert caplog.text.count(_REWRITTEN) == 1


def test_a_rewrite_with_the_same_first_bytes_is_noticed_by_its_line_end(
    tmp_path: Path, caplog
):
    """A rewrite that keeps the first 4 KiB is still noticed when the point
    reached is no longer the end of a line: the file is read again from its start
    (the rows it holds again are read again, as the warning says)."""
    log = tmp_path / "conn.log"
    old = _text([*_HEADER, *map(_row, range(1, 101))])
    http = [_row(i, "http") for i in range(201, 301)]
    new = _text([*_HEADER, *map(_row, range(1, 61)), *http])
    # What the test relies on: the same first 4 KiB, larger, mid-line at the end.
    assert new[:4096] == old[:4096] and len(new) > len(old)
    assert new[len(old) - 1] != "\n"
    log.write_text(old)
    src = open_source(f"zeek:{log}", follow=True, poll=0.05)
    records = iter(src)
    with caplog.at_level(logging.WARNING, logger="gatewatch"):
        got = [next(records) for _ in range(100)]
        with log.open("r+") as fh:
            fh.truncate(0)
            fh.write(new)
        src.end.set()
        got.extend(records)
    assert [r["uid"] for r in got] == [*_uids(1, 100), *_uids(1, 60), *_uids(201, 300)]
    assert [r["service"] for r in got[160:162]] == ["http", "http"]
    assert src.rejected == {} and src.error is None
    assert caplog.text.count(_REWRITTEN) == 1


def test_a_rewrite_without_a_header_says_rewritten_not_truncated(
    tmp_path: Path, caplog
):
    """Found in review: rows read on with the earlier #fields after a rewrite were
    said to follow a truncation."""
    log = tmp_path / "conn.log"
    log.write_text(_text([*_HEADER, *map(_row, range(1, 101))]))
    src = open_source(f"zeek:{log}", follow=True, poll=0.05)
    records = iter(src)
    with caplog.at_level(logging.WARNING, logger="gatewatch"):
        got = [next(records) for _ in range(100)]
        with log.open("r+") as fh:  # rows only, larger than before, no header
            fh.truncate(0)
            fh.write(_text(list(map(_row, range(101, 301)))))
        src.end.set()
        got.extend(records)
    assert [r["uid"] for r in got] == _uids(1, 300)
    assert src.rejected == {} and src.error is None
    assert caplog.text.count(
        "the file was rewritten in place; reading on with its earlier #fields") == 1
    assert _TRUNCATED not in caplog.text


def test_a_writer_that_does_not_append_leaves_a_hole_that_is_skipped(
    tmp_path: Path, caplog
):
    """Found: a writer that keeps its own offset (no O_APPEND) goes on past the
    truncation point after a copytruncate, so the file starts with a hole of NUL
    bytes; its first row after the hole was rejected (exit 4). It is read."""
    log = tmp_path / "conn.log"
    writer = log.open("wb")  # no O_APPEND: writes go at this handle's own offset
    writer.write(_text([*_HEADER, *map(_row, range(1, 101))]).encode())
    writer.flush()
    size = writer.tell()
    src, got, thread = _follow(log)
    with caplog.at_level(logging.INFO, logger="gatewatch"):
        thread.start()
        wait_for(lambda: len(got) == 100, 10, "100 records")
        with log.open("r+b") as fh:  # copytruncate's cut, through another handle
            fh.truncate(0)
        wait_for(lambda: "truncated in place" in caplog.text, 10, "the truncation")
        writer.write(_text([_row(i) for i in range(101, 151)]).encode())
        writer.close()
        assert log.read_bytes()[:size] == b"\x00" * size  # the hole
        wait_for(lambda: len(got) == 150, 10, "150 records")
        src.end.set()
        thread.join(10)
    assert not thread.is_alive()
    assert [r["uid"] for r in got] == _uids(1, 150)
    assert src.rejected == {} and src.error is None
    assert caplog.text.count(f"skipped {size} NUL bytes") == 1
