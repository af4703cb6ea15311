"""teacher.store and the ``teacher alerts`` filters, without a broker."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from edge_agent import protocol as proto
from flows.errors import BadInputError, UsageError
from teacher.serve import _since, register
from teacher.store import AlertStore


def _pair(i: int, gateway: str, decision: str, verdict: str):
    esc = proto.build_escalation(
        flow={
            "src_ip": f"10.0.0.{i}",
            "src_port": 1000 + i,
            "dst_ip": "10.0.1.1",
            "dst_port": 80,
            "proto": "tcp",
            "ts": 100.0 + i,
        },
        window=[[0.5, 0.25]],
        score=0.6 + i / 100,
        decision=decision,
        model_version="m1",
        site="s1",
        gateway=gateway,
        msg_id=f"id{i}",
    )
    ver = proto.build_verdict(
        escalation_id=esc["id"],
        verdict=verdict,
        score=0.9,
        threshold=0.5,
        teacher_version="t1",
    )
    return esc, ver


def test_store_keeps_one_row_per_id_and_filters(tmp_path: Path) -> None:
    store = AlertStore(tmp_path / "a.sqlite")
    pairs = [
        _pair(0, "g1", "escalate", "benign"),
        _pair(1, "g1", "alert", "malicious"),
        _pair(2, "g2", "escalate", "malicious"),
    ]
    assert store.add_many(pairs) == [True, True, True]
    assert store.add_many(pairs[:2]) == [False, False]
    other = AlertStore(tmp_path / "a.sqlite")  # a second process's view
    assert not other.add(*pairs[2])
    assert store.count() == 3
    assert [r["id"] for r in store.query(gateway="g1")] == ["id0", "id1"]
    assert [r["id"] for r in store.query(gateway="s1/g2")] == ["id2"]
    assert [r["id"] for r in store.query(gateway="s9/g2")] == []
    assert [r["id"] for r in store.query(decision="alert")] == ["id1"]
    assert [r["id"] for r in store.query(decision="malicious")] == ["id1", "id2"]
    assert store.query(since=time.time() + 60) == []
    row = store.query(gateway="g1", decision="escalate")[0]
    assert row["flow"]["src_port"] == 1000 and row["verdict"] == "benign"
    assert row["agent_score"] == pytest.approx(0.6)
    with pytest.raises(UsageError):
        store.query(decision="maybe")


def test_since_accepts_ages_iso_and_unix() -> None:
    now = time.time()
    assert _since("2h") == pytest.approx(now - 7200, abs=5)
    assert _since("1700000000") == 1700000000.0
    assert _since("2023-11-14T22:13:20") == pytest.approx(1700000000.0)
    with pytest.raises(UsageError):
        _since("yesterday")


def test_alerts_command_prints_a_json_list(tmp_path: Path, capsys) -> None:
    import argparse

    store = AlertStore(tmp_path / "a.sqlite")
    store.add_many(
        [_pair(0, "g1", "escalate", "benign"), _pair(1, "g2", "alert", "malicious")]
    )
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["alerts", "--store", str(tmp_path / "a.sqlite"), "--json", "--gateway", "g2"]
    )
    assert args.func(args) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in listed] == ["id1"] and listed[0]["verdict"] == "malicious"
    # No store there: bad input (exit 3), as a missing input file is everywhere.
    args = parser.parse_args(["alerts", "--store", str(tmp_path / "none.sqlite")])
    with pytest.raises(BadInputError):
        args.func(args)


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file of ``folder`` by name, with the SHA-256 of its bytes."""
    import hashlib

    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
    }


def _tables(path: Path) -> list[str]:
    import sqlite3

    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return [r[0] for r in db.execute("SELECT name FROM sqlite_master")]
    finally:
        db.close()


def test_alerts_refuses_an_agent_outbox_and_leaves_it_untouched(
    tmp_path: Path, capsys
) -> None:
    """``teacher alerts --store OUTBOX`` exits 3 naming the file; not a byte changes,
    no table is added, no journal file appears; nor does teacher serve's store."""
    from edge_agent.outbox import Outbox
    from flows.errors import EXIT_BAD_INPUT, BadInputError
    from teacher.cli import main

    folder = tmp_path / "agent"
    folder.mkdir()
    outbox_path = folder / "outbox.sqlite"
    outbox = Outbox(outbox_path)
    outbox.add("m1", "gatewatch/v1/s1/g1/escalations", b"{}", alert=False)
    outbox.close()
    before, tables = _snapshot(folder), _tables(outbox_path)
    assert "escalations" not in tables

    assert main(["alerts", "--store", str(outbox_path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith(f"error: {outbox_path}: not an alert store")
    assert "no escalations table" in err and "Traceback" not in err
    with pytest.raises(BadInputError, match="not an alert store"):
        AlertStore(outbox_path)  # what teacher serve --store opens
    assert _snapshot(folder) == before and _tables(outbox_path) == tables

    # Bytes that are no database at all, and an empty database: refused alike.
    junk = folder / "junk.sqlite"
    junk.write_bytes(b"not sqlite at all\n" * 10)
    empty = folder / "empty.sqlite"
    empty.touch()
    before = _snapshot(folder)
    assert main(["alerts", "--store", str(junk)]) == EXIT_BAD_INPUT
    assert main(["alerts", "--store", str(empty)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"{junk}: cannot open the alert store" in err
    assert f"{empty}: not an alert store: the database holds no tables" in err
    assert _snapshot(folder) == before


def test_alerts_prints_ipv6_endpoints_in_brackets(tmp_path: Path, capsys) -> None:
    """``[2001:db8::1]:443``, not ``2001:db8::1:443``; IPv4 stays ``10.0.0.0:1000``."""
    from teacher.cli import main

    esc, ver = _pair(0, "g1", "alert", "malicious")
    v6, v6_ver = _pair(1, "g1", "alert", "malicious")
    v6["flow"].update(src_ip="2001:db8::1", src_port=443, dst_ip="fe80::2", dst_port=53)
    store = AlertStore(tmp_path / "a.sqlite")
    store.add_many([(esc, ver), (v6, v6_ver)])
    store.close()

    assert main(["alerts", "--store", str(tmp_path / "a.sqlite")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert " 10.0.0.0:1000 -> 10.0.1.1:80/tcp " in lines[0]
    assert " [2001:db8::1]:443 -> [fe80::2]:53/tcp " in lines[1]


class _ScoreByWindow:
    """A stand-in teacher whose score is the window's first value."""

    config = {"window": 1, "n_features": 2}
    threshold = 0.5
    version = "fake-1"

    def predict_proba(self, windows):
        import numpy as np

        return np.asarray(windows)[:, 0, 0]


class _RecordingLink:
    """Records publishes and acks in place of the MQTT link."""

    def __init__(self) -> None:
        self.published: list[tuple[str, dict]] = []
        self.acked: list[object] = []

    def publish(self, topic, payload, qos=1):
        self.published.append((topic, json.loads(payload)))

    def ack(self, token):
        self.acked.append(token)


def _escalation(gateway: str, score: float, msg_id: str = "X"):
    return proto.build_escalation(
        flow={"src_ip": "10.0.0.1", "dst_ip": "10.0.0.2", "proto": "tcp"},
        window=[[score, 0.0]],
        score=0.6,
        decision="escalate",
        model_version="m1",
        site="s1" if gateway == "gw2" else "evil",
        gateway=gateway,
        msg_id=msg_id,
    )


def test_two_gateways_with_one_message_id_each_get_their_own_verdict(
    tmp_path: Path,
) -> None:
    from teacher.serve import ReScorer

    store = AlertStore(tmp_path / "a.sqlite")
    server = ReScorer(_ScoreByWindow(), broker="mqtt://127.0.0.1:1", store=store)
    server.link = _RecordingLink()
    evil = _escalation("gw1", 0.1)  # evil/gw1 publishes id X first: benign
    victim = _escalation("gw2", 0.9)  # s1/gw2's own id X: malicious
    server._handle([(evil, "t1")])
    server._handle([(victim, "t2")])
    # And a second process sharing the store, seeing the victim's id X afresh.
    other = ReScorer(_ScoreByWindow(), broker="mqtt://127.0.0.1:1", store=store)
    other.link = _RecordingLink()
    other._handle([(victim, "t3")])
    assert server.counters["scored"] == 2 and server.counters["duplicates"] == 0
    assert server.counters["stored"] == 2
    by_topic = {t: v for t, v in server.link.published}
    assert set(by_topic) == {
        "gatewatch/v1/evil/gw1/verdicts",
        "gatewatch/v1/s1/gw2/verdicts",
    }
    assert by_topic["gatewatch/v1/evil/gw1/verdicts"]["verdict"] == "benign"
    assert by_topic["gatewatch/v1/evil/gw1/verdicts"]["score"] == pytest.approx(0.1)
    assert by_topic["gatewatch/v1/s1/gw2/verdicts"]["verdict"] == "malicious"
    assert by_topic["gatewatch/v1/s1/gw2/verdicts"]["score"] == pytest.approx(0.9)
    # The copy is answered with the victim's stored verdict, not evil's.
    assert other.counters["duplicates"] == 1 and other.counters["scored"] == 0
    [(topic, again)] = other.link.published
    assert topic == "gatewatch/v1/s1/gw2/verdicts"
    assert again["verdict"] == "malicious" and again["score"] == pytest.approx(0.9)
    rows = {(r["site"], r["gateway"]): r for r in store.query()}
    assert set(rows) == {("evil", "gw1"), ("s1", "gw2")}
    assert rows[("s1", "gw2")]["teacher_score"] == pytest.approx(0.9)
    assert rows[("evil", "gw1")]["verdict"] == "benign"
    store.close()


def test_an_old_id_keyed_store_is_migrated_keeping_its_rows(tmp_path: Path) -> None:
    import sqlite3

    from teacher import store as store_mod

    path = tmp_path / "old.sqlite"
    old_schema = store_mod._SCHEMA.replace(
        "id TEXT NOT NULL", "id TEXT PRIMARY KEY"
    ).replace(",\n    PRIMARY KEY (site, gateway, id)", "")
    assert "id TEXT PRIMARY KEY" in old_schema and "(site, gateway, id)" not in (
        old_schema
    )
    db = sqlite3.connect(path)  # a store as written before the fix: user_version 0
    db.executescript(old_schema)
    esc, ver = _pair(0, "g1", "escalate", "benign")
    db.execute(
        f"INSERT INTO escalations ({','.join(store_mod._COLUMNS)}) VALUES "
        f"({','.join('?' * len(store_mod._COLUMNS))})",
        store_mod._row(esc, ver, "w"),
    )
    db.commit()
    db.close()
    store = AlertStore(path)
    assert store.count() == 1
    # Same id, another gateway: a new row now, not a suppressed copy.
    esc2, ver2 = _pair(0, "g2", "escalate", "malicious")
    assert store.add(esc2, ver2)
    assert not store.add(esc, ver)
    assert store.count() == 2
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == store_mod.SCHEMA_VERSION
    db.close()


# ------------------------------------------- a store copied onto a read-only mount

REPO = Path(__file__).resolve().parent.parent


def _wal_store(folder: Path) -> Path:
    """A two-row alert store as teacher serve writes it (WAL mode), closed."""
    folder.mkdir(parents=True, exist_ok=True)
    store = AlertStore(folder / "alerts.sqlite")
    store.add_many(
        [_pair(0, "g1", "escalate", "benign"), _pair(1, "g2", "alert", "malicious")]
    )
    store.close()
    return folder / "alerts.sqlite"


def _unprivileged() -> list[str]:
    """The command prefix that runs a program as a user file permissions bind:
    none for a normal user; as root, ``setpriv`` to nobody (root reads and writes
    past any permission). Skips when neither can run this checkout's Python."""
    import os
    import shutil
    import subprocess
    import sys

    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: no user to whom a "
                    "read-only folder is read-only")
    prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run([*prefix, sys.executable, "-c", "import teacher.serve"],
                           cwd=REPO, capture_output=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip("user nobody cannot run this checkout's Python")
    return prefix


def test_alerts_reads_a_wal_store_copied_alone_onto_a_read_only_folder() -> None:
    """Found: ``teacher alerts --store COPY``, COPY a WAL-mode store copied alone
    (no -wal, no -shm) into a read-only folder, the forensic case, ended "cannot
    open the alert store: ...", exit 3: SQLite's read-only open needs a -shm
    file beside the store. Now the rows are listed, read as an unchanging file,
    and a note says what that does not see. Run as a user the permissions bind."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    prefix = _unprivileged()
    top = Path(tempfile.mkdtemp(prefix="gatewatch-ro-"))
    try:
        top.chmod(0o755)  # nobody may reach it
        copy = top / "evidence" / "alerts.sqlite"
        copy.parent.mkdir()
        shutil.copy(_wal_store(top / "live"), copy)
        copy.chmod(0o444)
        copy.parent.chmod(0o555)

        run = subprocess.run(
            [*prefix, sys.executable, "-m", "teacher.cli", "alerts", "--store",
             str(copy), "--json"],
            cwd=REPO, capture_output=True, text=True, timeout=120,
            env={**os.environ, "HOME": str(top)},
        )

        assert run.returncode == 0, run.stderr
        assert [r["id"] for r in json.loads(run.stdout)] == ["id0", "id1"]
        assert run.stderr.startswith(
            f"note: {copy}: SQLite could not open this store read-only the usual "
            "way (")
        assert "read as an unchanging file" in run.stderr
        assert "Traceback" not in run.stderr
        assert sorted(p.name for p in copy.parent.iterdir()) == ["alerts.sqlite"]
    finally:
        for path in (top / "evidence", top):
            if path.exists():
                path.chmod(0o755)
        shutil.rmtree(top, ignore_errors=True)


def test_alerts_falls_back_to_an_immutable_open_when_read_only_fails(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """The same fallback without a read-only folder (as root, say): SQLite's usual
    read-only open is made to fail as it does there; the rows are then read
    through an ``immutable=1`` URI, and a -wal file beside the store, which that
    does not read, is named with its size."""
    import sqlite3

    from teacher.cli import main

    path = _wal_store(tmp_path)
    (tmp_path / "alerts.sqlite-wal").write_bytes(b"\0" * 100)
    real = sqlite3.connect
    opened: list[str] = []

    def connect(database, *args, **kwargs):
        opened.append(str(database))
        if "immutable=1" not in str(database):
            exc = sqlite3.OperationalError("unable to open database file")
            exc.sqlite_errorcode = sqlite3.SQLITE_CANTOPEN
            raise exc
        return real(database, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect)
    capsys.readouterr()

    assert main(["alerts", "--store", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    assert [r["id"] for r in json.loads(captured.out)] == ["id0", "id1"]
    assert opened == [
        f"{path.resolve().as_uri()}?mode=ro",
        f"{path.resolve().as_uri()}?mode=ro&immutable=1",
    ]
    assert captured.err == (
        f"note: {path}: SQLite could not open this store read-only the usual way "
        "(unable to open database file; its folder cannot take the -shm file a "
        "WAL-mode store needs), so it is read as an unchanging file: rows a running "
        "teacher serve adds meanwhile are not listed; nor the rows in "
        f"{path}-wal (100 bytes) beside it, not yet copied into the store (copy "
        "the store with its -wal file into a folder that can be written to list "
        "those)\n"
    )


def test_alerts_says_plainly_when_not_even_a_read_only_open_works(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """When the immutable open fails too, one error line says that the store could
    not be opened read-only, with both of SQLite's reasons; exit 3. A file that is
    no database at all is refused as before, without the fallback."""
    import sqlite3

    from flows.errors import EXIT_BAD_INPUT
    from teacher.cli import main

    path = _wal_store(tmp_path)
    real = sqlite3.connect
    opened: list[str] = []

    def connect(database, *args, **kwargs):
        opened.append(str(database))
        if str(database).startswith("file:") and "junk" not in str(database):
            exc = sqlite3.OperationalError(
                "attempt to write a readonly database"
                if "immutable" not in str(database)
                else "disk I/O error"
            )
            exc.sqlite_errorcode = (
                sqlite3.SQLITE_READONLY if "immutable" not in str(database) else 10
            )
            raise exc
        return real(database, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect)
    capsys.readouterr()

    assert main(["alerts", "--store", str(path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err == (
        f"error: {path}: cannot open the alert store read-only: SQLite refused it "
        "(attempt to write a readonly database), and as an unchanging file too "
        "(disk I/O error)\n"
    )
    assert len(opened) == 2

    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not sqlite at all\n" * 10)
    opened.clear()
    assert main(["alerts", "--store", str(junk)]) == EXIT_BAD_INPUT
    assert "cannot open the alert store: file is not a database" in \
        capsys.readouterr().err
    assert len(opened) == 1
