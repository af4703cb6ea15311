"""A damaged alert store, rejected messages, and the checks ``teacher serve`` makes
before it loads anything.

Found by a tester:

* ``teacher alerts`` on a store with one damaged row (bytes that are not UTF-8, a
  ``flow`` that is not JSON, a receive time that is not a number) ended in a
  traceback, and that one row hid every other; now every readable row is listed,
  the damaged fields marked, and the command exits 4 with one ``error:`` line.
* ``teacher serve``: a copy (a redelivered escalation) whose stored row is
  damaged failed its whole batch with a traceback, the other escalations of the
  batch got no verdict, and the run still exited 0 with "failed 2"; now the
  damaged row costs only its own copy's verdict, and a run in which escalations
  ended "failed" exits 1.
* Rejected messages were acknowledged and kept nowhere; now they are kept in a
  bounded table of the store, listed by ``teacher alerts --rejected``.
* ``--share-group a/b`` was refused only after the teacher loaded and the broker
  connected, and ``--store`` in a missing folder made the folder silently.

Most tests need no broker; those that do start their own mosquitto on 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from pathlib import Path

import pytest

from edge_agent import protocol as proto
from flows.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_PARTIAL_INPUT,
    EXIT_USAGE,
    UsageError,
)
from teacher.cli import build_parser, main
from teacher.serve import ReScorer
from teacher.store import MAX_REJECTED, MAX_REJECTED_PAYLOAD, AlertStore, StoreError
from tests.conftest import FixedTeacher, wait_for
from tests.test_rescorer_store import _RecordingLink, _ScoreByWindow

SERVE = ["serve", "--checkpoint", "no-such-ckpt", "--broker", "mqtt://127.0.0.1:1"]
TOPIC = "gatewatch/v1/s1/g1/escalations"


def _pair(i: int, gateway: str = "g1", verdict: str = "benign"):
    """Escalation ``i`` of s1/``gateway`` (id ``id{i}``) and its verdict."""
    esc = proto.build_escalation(
        flow={"src_ip": f"10.0.0.{i}", "src_port": 1000 + i, "dst_ip": "10.0.1.1",
              "dst_port": 80, "proto": "tcp", "ts": 100.0 + i},
        window=[[0.5, 0.25]], score=0.6, decision="escalate", model_version="m1",
        site="s1", gateway=gateway, msg_id=f"id{i}")
    ver = proto.build_verdict(escalation_id=esc["id"], verdict=verdict, score=0.9,
                              threshold=0.5, teacher_version="t1")
    return esc, ver


def _store(path: Path, n: int = 4) -> Path:
    """A store of ``n`` escalations received one second apart, ``id0`` first."""
    store = AlertStore(path)
    store.add_many([_pair(i) for i in range(n)])
    store.close()
    _sql(path, "UPDATE escalations SET received_at = 1700000000 + "
               "CAST(substr(id, 3) AS INTEGER)")
    return path


def _sql(path: Path, statement: str) -> None:
    """Run one statement on the store's file, as a tamperer or a bad disk would."""
    db = sqlite3.connect(path)
    try:
        db.execute(statement)
        db.commit()
    finally:
        db.close()


def _commands() -> dict:
    """The ``teacher`` subcommands' parsers, by name."""
    import argparse

    parser = build_parser()
    action = next(a for a in parser._actions
                  if isinstance(a, argparse._SubParsersAction))
    return action.choices


# ---------------------------------------------------------------------------------
# teacher alerts on a damaged store

DAMAGE = {
    # (statement on row id1, damaged field, its stored text as listed)
    "undecodable": ("UPDATE escalations SET flow = CAST(X'7B22FF227D' AS TEXT) "
                    "WHERE id = 'id1'", "flow", '{"\\xff"}'),
    "flow_not_json": ("UPDATE escalations SET flow = '{not json' WHERE id = 'id1'",
                      "flow", "{not json"),
    "time_not_a_number": ("UPDATE escalations SET received_at = 'yesterday' "
                          "WHERE id = 'id1'", "received_at", "yesterday"),
    "site_undecodable": ("UPDATE escalations SET site = CAST(X'73FF' AS TEXT) "
                         "WHERE id = 'id1'", "site", "s\\xff"),
    # Found by the second tester: listed as "teacher malicious 5.000", unmarked.
    "teacher_score_past_1": ("UPDATE escalations SET teacher_score = 5.0 "
                             "WHERE id = 'id1'", "teacher_score", 5.0),
    "agent_score_below_0": ("UPDATE escalations SET agent_score = -3.0 "
                            "WHERE id = 'id1'", "agent_score", -3.0),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_alerts_lists_every_row_of_a_damaged_store(case, tmp_path, capsys):
    """Found: a traceback (OperationalError, JSONDecodeError, TypeError part way
    through the listing) and no row at all; now all 4 rows, one marked."""
    statement, field, raw = DAMAGE[case]
    path = _store(tmp_path / "a.sqlite")
    _sql(path, statement)

    assert main(["alerts", "--store", str(path)]) == EXIT_PARTIAL_INPUT
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 4, out
    damaged = [line for line in lines if "damaged" in line]
    assert len(damaged) == 1
    assert " 10.0.0.1:1001 -> 10.0.1.1:80/tcp " in damaged[0]
    assert damaged[0].endswith(f"  damaged: {field}")
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {path}: 1 of the 4 escalations listed is damaged (damaged fields: "
        f"{field} 1); they are listed with each damaged field's stored text, "
        'marked "damaged", and the others as stored'
    ]
    assert "4 escalations" in err.splitlines()

    assert main(["alerts", "--store", str(path), "--json"]) == EXIT_PARTIAL_INPUT
    out, err = capsys.readouterr()
    rows = {r["id"]: r for r in json.loads(out)}
    assert sorted(rows) == ["id0", "id1", "id2", "id3"]
    assert rows["id1"]["damaged"] == [field]
    assert rows["id1"][field] == raw
    for other in ("id0", "id2", "id3"):
        assert "damaged" not in rows[other]
        assert rows[other]["flow"]["src_port"] == 1000 + int(other[2:])
        assert rows[other]["received_at"] == 1700000000 + int(other[2:])
    assert err.count("error:") == 1 and "Traceback" not in err


def test_alerts_on_a_whole_store_exits_0_without_marks(tmp_path, capsys):
    path = _store(tmp_path / "a.sqlite")
    assert main(["alerts", "--store", str(path), "--json"]) == EXIT_OK
    out, err = capsys.readouterr()
    assert all("damaged" not in r for r in json.loads(out))
    assert "error" not in err


def test_alerts_text_labels_its_time_as_the_receive_time(tmp_path, capsys):
    """Found: the first column was a bare time, read as the flow's; it is when
    the re-scorer received the message (``received_at`` in --json), in UTC."""
    path = _store(tmp_path / "a.sqlite", n=2)  # flows of ts 100.0 and 101.0
    store = AlertStore(path)
    store.add_rejected(TOPIC, "malformed_json", "not JSON", b"{oops")
    store.close()
    _sql(path, "UPDATE rejected SET received_at = 1700000005")
    _sql(path, "UPDATE escalations SET received_at = 'yesterday' WHERE id = 'id1'")

    assert main(["alerts", "--store", str(path)]) == EXIT_PARTIAL_INPUT
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(
        "received 2023-11-14 22:13:20 UTC  s1/g1  10.0.0.0:1000 -> 10.0.1.1:80/tcp  "
    ), lines
    assert lines[1].startswith("received yesterday  s1/g1  ")
    assert main(["alerts", "--store", str(path), "--json"]) == EXIT_PARTIAL_INPUT
    rows = json.loads(capsys.readouterr().out)
    assert [r["received_at"] for r in rows] == [1700000000, "yesterday"]
    assert rows[0]["flow"]["ts"] == 100.0

    assert main(["alerts", "--store", str(path), "--rejected"]) == EXIT_OK
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith(f"received 2023-11-14 22:13:25 UTC  {TOPIC}  malformed_")
    assert main(["alerts", "--store", str(path), "--rejected", "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)[0]["received_at"] == 1700000005
    help_text = " ".join(_commands()["alerts"].format_help().split())
    assert '"received" and the time the re-scorer received it (UTC; "received_at" ' \
        "in --json, Unix seconds)" in help_text


def test_alerts_keeps_the_rows_read_before_a_damaged_page(tmp_path, capsys):
    """A page of the table overwritten (a bad disk): the rows SQLite read before it
    are listed, exit 4; a store whose first page of rows is damaged is exit 3."""
    path = _store(tmp_path / "a.sqlite", n=400)
    db = sqlite3.connect(path)
    try:
        leaves = [r[0] for r in db.execute(
            "SELECT pageno FROM dbstat WHERE name = 'escalations' "
            "AND pagetype = 'leaf' ORDER BY pageno")]
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
    except sqlite3.OperationalError:
        pytest.skip("this SQLite has no dbstat table")
    finally:
        db.close()
    assert len(leaves) > 4
    with open(path, "r+b") as f:
        f.seek((leaves[len(leaves) // 2] - 1) * page_size)
        f.write(b"\xff" * 16)

    assert main(["alerts", "--store", str(path)]) == EXIT_PARTIAL_INPUT
    out, err = capsys.readouterr()
    listed = len(out.splitlines())
    assert 0 < listed < 400
    assert f"{listed} escalations" in err.splitlines()
    [error] = [line for line in err.splitlines() if line.startswith("error:")]
    assert error.startswith(f"error: {path}: the read stopped part way (")
    assert f"the {listed} escalations read before it are listed" in error

    with open(path, "r+b") as f:
        f.seek((leaves[0] - 1) * page_size)
        f.write(b"\xff" * 16)
    assert main(["alerts", "--store", str(path)]) == EXIT_BAD_INPUT
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"error: {path}: cannot read its escalations")


def test_alerts_limit_lists_the_oldest_or_with_newest_the_newest(tmp_path, capsys):
    path = _store(tmp_path / "a.sqlite", n=5)

    def ids(*flags):
        assert main(["alerts", "--store", str(path), "--json", *flags]) == EXIT_OK
        return [r["id"] for r in json.loads(capsys.readouterr().out)]

    assert ids("--limit", "2") == ["id0", "id1"]
    assert ids("--limit", "2", "--newest") == ["id3", "id4"]
    assert ids("--newest") == ["id0", "id1", "id2", "id3", "id4"]
    alerts = _commands()["alerts"]
    limit = " ".join(alerts.format_help().split())
    assert "--limit LIMIT list at most this many" in limit
    assert "the oldest ones, or the newest with --newest" in limit


# ---------------------------------------------------------------------------------
# teacher serve: a copy of a damaged row


def _escalation(msg_id: str, score: float) -> dict:
    return proto.build_escalation(
        flow={"src_ip": "10.0.0.1", "dst_ip": "10.0.0.2", "proto": "tcp"},
        window=[[score, 0.0]], score=0.6, decision="escalate", model_version="m1",
        site="s1", gateway="gw", msg_id=msg_id)


@pytest.mark.parametrize("damage", [
    "verdict = 'weird', teacher_score = 'abc'",  # the tester's row
    "teacher_score = 5.0",
    "teacher_score = 9e999",  # infinity: JSON cannot carry it
    "threshold = NULL",
    "teacher_version = NULL",
    "verdict = CAST(X'FF' AS TEXT)",
])
def test_a_copy_of_a_damaged_row_costs_only_its_own_verdict(damage, tmp_path, caplog):
    """Found: ValueError in _handle; the batch counted "failed" with a traceback
    and the good escalation of the same batch got no verdict."""
    caplog.set_level(logging.INFO, logger="gatewatch")
    path = tmp_path / "a.sqlite"
    store = AlertStore(path)
    first = ReScorer(_ScoreByWindow(), broker="mqtt://127.0.0.1:1", store=store)
    first.link = _RecordingLink()
    bad, kept = _escalation("A", 0.9), _escalation("C", 0.2)
    first._handle([(bad, "t1"), (kept, "t2")])
    _sql(path, f"UPDATE escalations SET {damage} WHERE id = 'A'")

    again = ReScorer(_ScoreByWindow(), broker="mqtt://127.0.0.1:1", store=store)
    again.link = _RecordingLink()
    fresh = _escalation("B", 0.7)
    caplog.clear()
    again._handle([(bad, "t3"), (fresh, "t4"), (kept, "t5")])
    store.close()

    answered = {v["escalation_id"]: v for _, v in again.link.published}
    assert sorted(answered) == ["B", "C"]
    assert answered["B"]["verdict"] == "malicious"
    assert answered["C"]["verdict"] == "benign"
    assert answered["C"]["score"] == pytest.approx(0.2)
    assert again.link.acked == ["t3", "t4", "t5"]
    assert again.counters["failed"] == 0 and again.counters["damaged_rows"] == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert message.startswith(
        f"alert store {path}: the stored row of escalation s1/gw/A is damaged ("
    )
    assert message.endswith("this copy gets no verdict")
    assert errors[0].exc_info is None


def test_a_copy_of_a_row_damaged_elsewhere_still_gets_its_verdict(tmp_path):
    """Damage outside the verdict's fields (here the flow) costs nothing."""
    path = tmp_path / "a.sqlite"
    store = AlertStore(path)
    first = ReScorer(_ScoreByWindow(), broker="mqtt://127.0.0.1:1", store=store)
    first.link = _RecordingLink()
    esc = _escalation("A", 0.9)
    first._handle([(esc, "t1")])
    _sql(path, "UPDATE escalations SET flow = '{not json'")
    first._seen.clear()  # as after a restart: the copy is found in the store
    first.link = _RecordingLink()
    first._handle([(esc, "t2")])
    store.close()
    [(_, verdict)] = first.link.published
    assert verdict["verdict"] == "malicious" and first.counters["damaged_rows"] == 0


# ---------------------------------------------------------------------------------
# teacher serve: exit code and summary (the re-scorer faked: no broker)


def test_serve_exits_1_when_escalations_failed(fake_serve, tmp_path, capsys):
    """Found: "failed 2" in the summary, and exit 0."""
    fake_serve.STATS = {"failed": 2}
    code = main([*SERVE, "--store", str(tmp_path / "a.sqlite"), "--duration", "0"])
    err = capsys.readouterr().err
    assert code == EXIT_FAILURE, err
    assert "failed 2" in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: 2 escalations failed: their batch met a fault of the re-scorer "
        "itself, so they were acknowledged and may have no verdict and no row in the "
        "store; their ids are in the log (ERROR handling a batch ... failed)"
    ]


def test_serve_summary_counts_rejected_messages(fake_serve, tmp_path, capsys):
    fake_serve.STATS = {"rejected": {"malformed_json": 2, "bad_value": 1}}
    code = main([*SERVE, "--store", str(tmp_path / "a.sqlite"), "--duration", "0"])
    err = capsys.readouterr().err
    assert code == EXIT_OK, err
    [summary] = [line for line in err.splitlines() if line.startswith("re-scorer:")]
    assert summary == (
        "re-scorer: received 3, scored 3, stored 3, duplicates 0, verdicts sent 3, "
        "rejected 3"
    )


# ---------------------------------------------------------------------------------
# rejected messages: kept, bounded, listed


def _server(store: AlertStore) -> tuple[ReScorer, list]:
    """A re-scorer for 4 x 3 windows on ``store``, its acks recorded, no broker."""
    server = ReScorer(FixedTeacher(), broker="mqtt://127.0.0.1:1", store=store,
                      client_id="rs-test")
    acked: list = []
    server.link.ack = acked.append
    return server, acked


def test_rejected_messages_are_kept_logged_and_listed(tmp_path, caplog, capsys):
    """Found: rejected messages were acknowledged and kept nowhere."""
    caplog.set_level(logging.INFO, logger="gatewatch")
    path = tmp_path / "a.sqlite"
    store = AlertStore(path)
    server, acked = _server(store)
    other = "gatewatch/v1/s2/g7/escalations"
    bodies = [
        (TOPIC, b"{oops"),
        (TOPIC, b"\xff\xfe{"),  # not UTF-8: malformed JSON too
        (TOPIC, b"{}"),
        (other, b"x" * 300_000),
        ("gatewatch/v1/s1/g\x1b1/escalations", b"{}"),
    ]
    for n, (topic, body) in enumerate(bodies):
        server._on_message(topic, body, n)
    assert acked == list(range(len(bodies)))
    assert server._queue.empty() and store.count() == 0
    assert server.rejects.counts == {"malformed_json": 2, "wrong_schema": 1,
                                     "oversized": 1, "bad_topic": 1}

    got = store.rejected()
    assert got.damaged == 0 and got.stopped is None
    rows = got.rows
    assert [r["kind"] for r in rows] == ["malformed_json", "malformed_json",
                                         "wrong_schema", "oversized", "bad_topic"]
    assert [r["topic"] for r in rows] == [t for t, _ in bodies]
    assert [r["payload"] for r in rows[:3]] == [b"{oops", b"\xff\xfe{", b"{}"]
    assert rows[3]["payload"] == b"x" * MAX_REJECTED_PAYLOAD
    assert [r["payload_length"] for r in rows] == [5, 3, 2, 300_000, 2]
    assert (rows[3]["site"], rows[3]["gateway"]) == ("s2", "g7")
    assert all(r["worker"] == "rs-test" and r["reason"] for r in rows)
    assert not rows[0]["reason"].startswith("malformed_json")

    # The first of each kind is a warning; the second malformed_json one is INFO,
    # with its topic and kind.
    said = [(r.levelno, r.getMessage()) for r in caplog.records
            if "rejected a message" in r.getMessage()]
    assert [level for level, _ in said] == [logging.WARNING, logging.INFO,
                                            logging.WARNING, logging.WARNING,
                                            logging.WARNING]
    assert said[1][1].startswith(f"re-scorer rejected a message on {TOPIC} "
                                 "(malformed_json: ")
    assert "g\\x1b1" in said[4][1] and "\x1b" not in said[4][1]
    store.close()

    assert main(["alerts", "--store", str(path), "--rejected"]) == EXIT_OK
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 5 and "5 rejected messages" in err.splitlines()
    assert f"  {TOPIC}  malformed_json  " in lines[0]
    assert lines[0].endswith("  5 bytes")
    assert lines[3].endswith("  300000 bytes")
    assert "gatewatch/v1/s1/g\\x1b1/escalations  bad_topic" in lines[4]

    assert main(["alerts", "--store", str(path), "--rejected", "--json",
                 "--gateway", "s1/g1"]) == EXIT_OK
    listed = json.loads(capsys.readouterr().out)
    assert [r["payload"] for r in listed] == ["{oops", "\\xff\\xfe{", "{}"]
    assert [r["payload_kept"] for r in listed] == [5, 3, 2]
    assert main(["alerts", "--store", str(path), "--rejected", "--json",
                 "--gateway", "g7", "--since", "1h"]) == EXIT_OK
    [big] = json.loads(capsys.readouterr().out)
    assert big["payload_length"] == 300_000
    assert big["payload_kept"] == MAX_REJECTED_PAYLOAD == 4096
    assert main(["alerts", "--store", str(path), "--rejected", "--json",
                 "--limit", "1", "--newest"]) == EXIT_OK
    assert [r["kind"] for r in json.loads(capsys.readouterr().out)] == ["bad_topic"]

    assert main(["alerts", "--store", str(path), "--rejected",
                 "--decision", "alert"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: --decision applies to escalations")


def test_the_rejected_table_keeps_only_the_newest(tmp_path):
    assert AlertStore(tmp_path / "default.sqlite").max_rejected == MAX_REJECTED
    assert MAX_REJECTED == 10_000
    store = AlertStore(tmp_path / "a.sqlite", max_rejected=5)
    for n in range(12):
        store.add_rejected(TOPIC, "malformed_json", f"r{n}", b"{" * 10_000)
    rows = store.rejected().rows
    assert [r["reason"] for r in rows] == [f"r{n}" for n in range(7, 12)]
    assert all(len(r["payload"]) == MAX_REJECTED_PAYLOAD for r in rows)
    # Topic and reason are cut too, and a lone surrogate cannot fail the write.
    store.add_rejected("t\udcff" * 5000, "bad_value", "why" * 5000, b"")
    last = store.rejected(limit=1, newest=True).rows[0]
    assert len(last["reason"]) == 1000 and last["topic"].startswith("t\\udcff")
    store.close()


def _fill(store: AlertStore) -> None:
    """Make ``store`` full: its file may not grow by one more page."""
    with store._lock:
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages}")


def test_a_rejected_message_the_store_cannot_keep_is_not_acknowledged(tmp_path):
    """The store-failure rule: the re-scorer stops, nothing after is acknowledged."""
    path = tmp_path / "a.sqlite"
    store = AlertStore(path)
    store.add_rejected(TOPIC, "malformed_json", "first", b"{")
    _fill(store)
    halt = threading.Event()
    server, acked = _server(store)
    server.halt = halt
    server._on_message(TOPIC, b"{oops" * 2000, "t1")
    assert acked == []
    assert isinstance(server.store_error, StoreError)
    assert str(server.store_error).startswith(
        f"alert store {path}: cannot write a rejected message: "
    )
    assert "database or disk is full" in str(server.store_error)
    assert halt.is_set() and server._in_hand == 1
    first_error = server.store_error
    server._on_message(TOPIC, b"{}", "t2")  # not even tried: the store failed
    assert acked == [] and server._in_hand == 2
    assert server.store_error is first_error
    assert server.rejects.counts == {"malformed_json": 1, "wrong_schema": 1}
    assert [r["reason"] for r in store.rejected().rows] == ["first"]
    store.close()


# ---------------------------------------------------------------------------------
# schema versions


def _as_version_1(path: Path) -> None:
    """Make ``path`` a store as written before the table of rejected messages."""
    db = sqlite3.connect(path)
    try:
        db.execute("DROP TABLE rejected")
        db.execute("PRAGMA user_version = 1")
        db.commit()
    finally:
        db.close()


def test_a_version_1_store_is_read_as_it_is_and_migrated_for_writing(
    tmp_path, capsys
):
    path = _store(tmp_path / "a.sqlite", n=3)
    _as_version_1(path)
    before = path.read_bytes()

    assert main(["alerts", "--store", str(path)]) == EXIT_OK
    assert main(["alerts", "--store", str(path), "--rejected"]) == EXIT_OK
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 3
    assert "0 rejected messages" in err
    assert f"note: {path} has no table of rejected messages" in err
    # Read-only: not a byte of the store written (SQLite may leave its empty
    # -wal and -shm files beside a WAL store, as for any reader).
    assert path.read_bytes() == before

    store = AlertStore(path)
    store.add_rejected(TOPIC, "wrong_schema", "kind 'x'", b"{}")
    assert store.count() == 3 and len(store.rejected().rows) == 1
    store.close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
        assert db.execute("SELECT count(*) FROM rejected").fetchone()[0] == 1
    finally:
        db.close()


# ---------------------------------------------------------------------------------
# teacher serve: flags checked before anything is loaded


@pytest.mark.parametrize("group", ["a/b", "a+", "#", "$sys", "x" * 65])
def test_serve_refuses_a_bad_share_group_before_loading_the_teacher(group, capsys):
    """Found: --share-group a/b was refused only after the teacher loaded and the
    broker connected (about 15 s); the checkpoint here does not even exist."""
    assert main([*SERVE, "--share-group", group]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: --share-group ") and err.count("\n") == 1
    assert "no-such-ckpt" not in err and "Traceback" not in err
    with pytest.raises(UsageError, match="--share-group"):
        ReScorer(FixedTeacher(), broker="mqtt://127.0.0.1:1",
                 store=None, share_group=group)


@pytest.mark.parametrize("client_id", ["a\x01b", "rs\n1", "x\u202ey"])
def test_serve_refuses_a_client_id_with_control_characters(client_id, capsys):
    """Found: such an id passed the early check, and ten seconds later the broker's
    protocol error read as "did not answer CONNECT in time" (exit 6)."""
    assert main([*SERVE, "--client-id", client_id]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: --client-id ") and err.count("\n") == 1
    assert "no-such-ckpt" not in err


def test_serve_refuses_a_connect_timeout_of_0(capsys):
    """Found: 0 was taken, and the start then failed "within 0 s" (exit 6)."""
    assert main([*SERVE, "--connect-timeout", "0"]) == EXIT_USAGE
    assert "--connect-timeout: must be a number in (0, 3600]" in (
        capsys.readouterr().err
    )


class _NaNTeacher(FixedTeacher):
    """A teacher with NaN weights: every probability is NaN."""

    def predict_proba(self, windows):
        import numpy as np

        return np.full(len(windows), np.nan)


def test_serve_refuses_a_teacher_that_scores_nan(fake_serve, monkeypatch, tmp_path,
                                                  capsys):
    """Found: a checkpoint with a NaN bias (checksums recomputed) loaded, served,
    stored every escalation unscored and exited 0."""
    import teacher.checkpoint

    monkeypatch.setattr(
        teacher.checkpoint, "load_teacher", lambda path, **kw: _NaNTeacher()
    )
    code = main([*SERVE, "--store", str(tmp_path / "a.sqlite")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: teacher no-such-ckpt scores plain windows as ")
    assert "expected probabilities in 0..1" in err
    assert not (tmp_path / "a.sqlite").exists()


def test_serve_exits_1_when_escalations_stayed_unscored(fake_serve, tmp_path, capsys):
    fake_serve.STATS = {"unscored": 2}
    code = main([*SERVE, "--store", str(tmp_path / "a.sqlite"), "--duration", "0"])
    err = capsys.readouterr().err
    assert code == 1
    assert ", unscored 2" in err
    assert "error: the teacher could not score 2 escalations" in err


def test_serve_takes_no_share_group(fake_serve, tmp_path, capsys):
    code = main([*SERVE, "--share-group", "", "--store", str(tmp_path / "a.sqlite"),
                 "--duration", "0"])
    assert code == EXIT_OK, capsys.readouterr().err


def test_serve_refuses_a_store_in_a_missing_folder(tmp_path, capsys):
    """Found: the folder was made silently; a typo started a store nobody reads."""
    folder = tmp_path / "nonexist"
    assert main([*SERVE, "--store", str(folder / "s.sqlite")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err == (
        f"error: --store {folder / 's.sqlite'}: its folder {folder} does not exist; "
        "make the folder first (teacher serve creates the store file, not folders)\n"
    )
    assert not folder.exists()
    blocker = tmp_path / "file"
    blocker.write_text("x\n")
    assert main([*SERVE, "--store", str(blocker / "s.sqlite")]) == EXIT_USAGE
    assert f"its folder {blocker} is not a folder" in capsys.readouterr().err


def test_serve_refuses_an_outbox_as_store_before_loading_the_teacher(tmp_path,
                                                                     capsys):
    from edge_agent.outbox import Outbox

    path = tmp_path / "outbox.sqlite"
    outbox = Outbox(path)
    outbox.add("m1", TOPIC, b"{}", alert=False)
    outbox.close()
    before = path.read_bytes()
    assert main([*SERVE, "--store", str(path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: not an alert store")
    assert "no-such-ckpt" not in err
    assert path.read_bytes() == before


@pytest.mark.parametrize("flags, said", [
    (["--tls-ca", "/nonexistent-gw/ca.pem"], "--tls-ca /nonexistent-gw/ca.pem: "
                                             "no such file"),
    (["--tls-cert", "/nonexistent-gw/c.pem"], "--tls-cert /nonexistent-gw/c.pem: "
                                              "no such file"),
    (["--tls-key", "KEY"], "--tls-key needs --tls-cert"),
    (["--password-file", "/nonexistent-gw/pw"], "cannot read --password-file"),
])
def test_serve_checks_tls_and_password_files_before_loading(flags, said, tmp_path,
                                                             capsys):
    if "KEY" in flags:
        key = tmp_path / "key.pem"
        key.write_text("not really a key\n")
        flags = [str(key) if f == "KEY" else f for f in flags]
    assert main([*SERVE, "--store", str(tmp_path / "a.sqlite"), *flags]) == (
        EXIT_USAGE
    )
    err = capsys.readouterr().err
    assert said in err and "no-such-ckpt" not in err and "Traceback" not in err


# ---------------------------------------------------------------------------------
# help


def test_serve_and_alerts_help_describe_the_command_and_its_exit_codes():
    commands = _commands()
    serve, alerts = commands["serve"], commands["alerts"]
    assert serve.description.startswith("Re-score the gateways' escalations")
    assert alerts.description.startswith("List what an alert store holds")
    for parser, codes in ((serve, (0, 1, 2, 3, 6, 130)),
                          (alerts, (0, 1, 2, 3, 4, 130))):
        text = parser.format_help()
        assert text.index(parser.description) < text.index("options:")
        tail = text[text.index("exit codes:"):]
        for code in codes:
            assert f"\n  {code} " in tail, (parser.prog, code)
    flat = " ".join(serve.format_help().split())
    assert "teacher serve makes the store file but no folder" in flat
    assert "the newest 10,000, each with the first 4096 bytes" in flat
    flat = " ".join(alerts.format_help().split())
    assert '4 partial input: damaged rows' in flat


# ---------------------------------------------------------------------------------
# through a real broker


@pytest.mark.broker
@pytest.mark.timeout(300)
def test_rejected_messages_a_full_store_refused_come_again_and_are_kept(
    mosquitto, tmp_path
):
    """Through mosquitto: a full store stops the re-scorer without acknowledging
    the rejected messages; the next start with the same client id keeps them."""
    from tests.test_rescorer_faults import _queue_for

    path = tmp_path / "a.sqlite"
    topic_filter = proto.subscription(proto.Channel.ESCALATIONS, "gatewatch")
    _queue_for(mosquitto.port, "rs-rej", topic_filter)
    from edge_agent.mqtt import MqttLink

    # Payloads past a page: a full store cannot keep them in the pages it has.
    bodies = [b"{oops" + b" " * 8000, b"{}" + b" " * 8000, b"[1]" + b" " * 8000]
    sender = MqttLink(mosquitto.url, "gw-bad", protocol="5")
    sender.connect(timeout=5)
    try:
        for body in bodies:
            assert sender.publish(TOPIC, body, qos=1).wait(10)
    finally:
        sender.close()

    store = AlertStore(path)
    _fill(store)
    server = ReScorer(FixedTeacher(), broker=mosquitto.url, store=store,
                      client_id="rs-rej")
    server.start(connect_timeout=5)
    try:
        assert server.halt.wait(20), "the re-scorer did not stop on the full store"
    finally:
        server.stop(timeout=5)
        store.close()
    assert server.counters["unacknowledged"] >= 1
    assert server.counters["unacknowledged"] == server.counters["received"]

    store = AlertStore(path)
    again = ReScorer(FixedTeacher(), broker=mosquitto.url, store=store,
                     client_id="rs-rej")
    again.start(connect_timeout=5)
    try:
        wait_for(lambda: len(store.rejected().rows) == 3, 30,
                 "the three rejected messages")
    finally:
        again.stop(timeout=5)
        kept = store.rejected().rows
        store.close()
    assert sorted(r["payload"] for r in kept) == sorted(
        b[:MAX_REJECTED_PAYLOAD] for b in bodies
    )
    assert [r["payload_length"] for r in kept] == [len(b) for b in bodies]
    assert again.store_error is None and again.counters["unacknowledged"] == 0


@pytest.mark.parametrize("gateway", ["a/b/c", "s1/", "g+1"])
def test_alerts_refuses_a_gateway_no_escalation_can_have(gateway, tmp_path, capsys):
    """Found by a fresh tester: ``--gateway a/b/c`` listed 0 escalations, exit 0,
    as if the gateway had none; no stored escalation can ever match it."""
    path = tmp_path / "alerts.sqlite"
    store = AlertStore(path)
    store.close()

    code = main(["alerts", "--store", str(path), "--gateway", gateway])

    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: --gateway") and err.count("\n") == 1


def test_alerts_rejected_takes_any_gateway_text(tmp_path, capsys):
    path = tmp_path / "alerts.sqlite"
    AlertStore(path).close()

    assert main(["alerts", "--store", str(path), "--rejected", "--gateway",
                 "a b"]) == EXIT_OK
