"""``teacher alerts`` on a WAL-mode store in a folder it cannot write, with a -wal.

Found: such a store was read as an unchanging file (SQLite ``immutable=1``), which
reads the main file alone, so the rows still held in the -wal file beside it were
not listed (a note said so). Now the store, its -wal and its -shm are copied into
a private temporary folder and the copy is read, so those rows are listed; the
unchanging-file read stays for when the copy cannot be made (no space, say).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from teacher.store import AlertStore
from tests.test_rescorer_store import REPO, _pair, _unprivileged

IDS = ["id0", "id1", "id2", "id3"]


def _store_with_rows_in_its_wal(folder: Path, ends=("", "-wal")) -> Path:
    """A store whose first two rows are in its main file and the next two only
    in its -wal: a reader connection kept open (autocheckpoint off) stops the
    writer's close from moving them into the main file. Returned is a copy of
    its files (``ends``: the store, its -wal...) in ``evidence`` beside
    ``folder``, made while it was open."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "alerts.sqlite"
    first = AlertStore(path)
    first.add_many([_pair(0, "g1", "escalate", "benign"),
                    _pair(1, "g2", "alert", "malicious")])
    first.close()  # the last connection: checkpointed into the main file
    hold = sqlite3.connect(path)
    try:
        hold.execute("PRAGMA wal_autocheckpoint=0")
        hold.execute("SELECT count(*) FROM escalations").fetchall()
        second = AlertStore(path)
        second._db.execute("PRAGMA wal_autocheckpoint=0")
        second.add_many([_pair(2, "g1", "escalate", "malicious"),
                         _pair(3, "g2", "alert", "benign")])
        second.close()
        assert Path(f"{path}-wal").stat().st_size > 0
        copy = folder.parent / "evidence" / path.name
        copy.parent.mkdir()
        for end in ends:
            shutil.copyfile(f"{path}{end}", f"{copy}{end}")
    finally:
        hold.close()
    return copy


def _immutable_ids(path: Path) -> list[str]:
    uri = f"{path.resolve().as_uri()}?mode=ro&immutable=1"
    db = sqlite3.connect(uri, uri=True)
    try:
        return [r[0] for r in db.execute("SELECT id FROM escalations ORDER BY id")]
    finally:
        db.close()


@pytest.mark.parametrize("shm", ["absent", "unreadable"])
def test_alerts_lists_the_rows_of_the_wal_of_a_store_in_a_read_only_folder(shm):
    """Run as a user the permissions bind (``setpriv`` to nobody as root). The
    store was copied with its -wal; a -shm beside them, when there is one, is
    one this user cannot read (SQLite rebuilds it from the -wal)."""
    prefix = _unprivileged()
    top = Path(tempfile.mkdtemp(prefix="gatewatch-ro-"))
    evidence = top / "evidence"
    temp = top / "tmp"
    try:
        top.chmod(0o755)  # nobody may reach it
        ends = ("", "-wal") if shm == "absent" else ("", "-wal", "-shm")
        copy = _store_with_rows_in_its_wal(top / "live", ends)
        assert _immutable_ids(copy) == IDS[:2]  # what the old read listed
        before = {p.name: p.read_bytes() for p in evidence.iterdir()}
        for item in evidence.iterdir():
            item.chmod(0o000 if item.name.endswith("-shm") else 0o444)
        evidence.chmod(0o555)
        temp.mkdir()
        temp.chmod(0o777)

        run = subprocess.run(
            [*prefix, sys.executable, "-m", "teacher.cli", "alerts", "--store",
             str(copy), "--json"],
            cwd=REPO, capture_output=True, text=True, timeout=120,
            env={**os.environ, "HOME": str(top), "TMPDIR": str(temp)},
        )

        assert run.returncode == 0, run.stderr
        assert [r["id"] for r in json.loads(run.stdout)] == IDS
        assert run.stderr.startswith(
            f"note: {copy}: SQLite could not open this store read-only the usual "
            "way (")
        assert run.stderr.rstrip("\n").endswith(
            "so a private copy of it and its -wal file, made now, is read: rows a "
            "running teacher serve adds meanwhile are not listed")
        assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
        for item in evidence.iterdir():
            item.chmod(0o444)
        after = {p.name: p.read_bytes() for p in evidence.iterdir()}
        assert after == before  # the store itself untouched
        assert list(temp.iterdir()) == []  # the private copy removed
    finally:
        for path in (evidence, top):
            if path.exists():
                path.chmod(0o755)
        shutil.rmtree(top, ignore_errors=True)


def _as_if_read_only(monkeypatch, store: Path) -> list[str]:
    """Make SQLite's usual read-only open of ``store`` fail as it does in a
    folder that cannot take a -shm file, and its folder look unwritable; the
    URIs opened are returned as they come."""
    import teacher.serve as serve

    real_connect, real_access = sqlite3.connect, os.access
    opened: list[str] = []

    def connect(database, *args, **kwargs):
        opened.append(str(database))
        if str(database) == f"{store.resolve().as_uri()}?mode=ro":
            exc = sqlite3.OperationalError("unable to open database file")
            exc.sqlite_errorcode = sqlite3.SQLITE_CANTOPEN
            raise exc
        return real_connect(database, *args, **kwargs)

    def access(path, mode, **kwargs):
        if Path(path) == store.absolute().parent and mode & os.W_OK:
            return False
        return real_access(path, mode, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect)
    monkeypatch.setattr(serve.os, "access", access)
    return opened


def test_the_copy_is_read_in_process_too(tmp_path, capsys, monkeypatch):
    """The same without another user (no setpriv needed): the copy lies in a
    private folder of the temporary folder, opened read-only, then removed."""
    from teacher.cli import main

    copy = _store_with_rows_in_its_wal(tmp_path / "live")
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    opened = _as_if_read_only(monkeypatch, copy)
    capsys.readouterr()

    assert main(["alerts", "--store", str(copy), "--json"]) == 0

    captured = capsys.readouterr()
    assert [r["id"] for r in json.loads(captured.out)] == IDS
    assert "a private copy of it and its -wal file, made now, is read" in (
        captured.err)
    assert len(opened) == 2 and opened[1].startswith(temp.resolve().as_uri())
    assert opened[1].endswith("/alerts.sqlite?mode=ro")
    assert list(temp.iterdir()) == []


def test_a_copy_that_fails_falls_back_to_the_unchanging_file(
    tmp_path, capsys, monkeypatch
):
    """No room for the copy: the store is read as an unchanging file, as before,
    and the note names the -wal whose rows that does not list."""
    import teacher.serve as serve
    from teacher.cli import main

    copy = _store_with_rows_in_its_wal(tmp_path / "live")
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    _as_if_read_only(monkeypatch, copy)

    def full(src, dst, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(serve.shutil, "copyfile", full)
    capsys.readouterr()

    assert main(["alerts", "--store", str(copy), "--json"]) == 0

    captured = capsys.readouterr()
    assert [r["id"] for r in json.loads(captured.out)] == IDS[:2]
    wal_bytes = Path(f"{copy}-wal").stat().st_size
    assert captured.err.endswith(
        "so it is read as an unchanging file: rows a running teacher serve adds "
        f"meanwhile are not listed; nor the rows in {copy}-wal ({wal_bytes:,} "
        "bytes) beside it, not yet copied into the store (copy the store with its "
        "-wal file into a folder that can be written to list those)\n")
    assert list(temp.iterdir()) == []
