"""The outbox's one-run lock holds for every name of the file (found by an operator
tester: a symbolic link to a running agent's outbox let a second agent in)."""

from __future__ import annotations

import os

import pytest

from edge_agent.outbox import Outbox, OutboxInUseError, lock_path


def test_a_symlink_to_a_held_outbox_is_refused(tmp_path):
    real = tmp_path / "ob.sqlite"
    link = tmp_path / "obl.sqlite"
    first = Outbox(real, lock=True)
    os.symlink(real.name, link)
    try:
        assert lock_path(link) == lock_path(real) == tmp_path / "ob.sqlite.lock"
        with pytest.raises(OutboxInUseError, match=r"is in use by another"):
            Outbox(link, lock=True)
    finally:
        first.close()

    # Once the first run let go, the link opens the same file and its messages.
    ob = Outbox(real)
    ob.add("a" * 32, "t", b"{}", alert=False)
    ob.close()
    second = Outbox(link, lock=True)
    try:
        assert [m.id for m in second.pending()] == ["a" * 32]
        assert not (tmp_path / "obl.sqlite-wal").exists()
    finally:
        second.close()


def test_a_hard_link_to_a_held_outbox_is_refused(tmp_path):
    """Found by an operator tester: a hard link (another name of the same file in
    another folder) got past the lock, and two agents corrupted the outbox."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    real = tmp_path / "a" / "ob.sqlite"
    first = Outbox(real, lock=True)
    os.link(real, tmp_path / "b" / "hard.sqlite")
    try:
        with pytest.raises(OutboxInUseError, match=r"outbox-\d+-\d+\.lock"):
            Outbox(tmp_path / "b" / "hard.sqlite", lock=True)
    finally:
        first.close()

    # Released, the other name opens it (and the lock beside it was not left held).
    second = Outbox(tmp_path / "b" / "hard.sqlite", lock=True)
    second.close()
