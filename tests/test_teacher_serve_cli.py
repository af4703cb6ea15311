"""``teacher serve`` / ``teacher alerts`` command lines: bad flags, exit codes,
terminal-safe output and help; without a broker (the re-scorer is faked where it
would connect)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent import protocol as proto
from flows.errors import EXIT_INTERRUPTED, EXIT_UNAVAILABLE, EXIT_USAGE
from teacher.cli import build_parser, main
from teacher.store import AlertStore
from tests.conftest import FakeServer

BIN = Path(sys.executable).parent
SERVE = ["serve", "--checkpoint", "no-such-ckpt", "--broker", "mqtt://127.0.0.1:1"]


def _store_with(path: Path, *, src_ip, proto_name, score) -> None:
    esc = proto.build_escalation(
        flow={"src_ip": src_ip, "src_port": 1, "dst_ip": "10.0.0.2",
              "dst_port": 80, "proto": proto_name, "ts": 1.0},
        window=[[0.5, 0.25]], score=0.7, decision="escalate",
        model_version="m1", site="s1", gateway="g1", msg_id="e1")
    ver = proto.build_verdict(escalation_id="e1", verdict="malicious", score=0.9,
                              threshold=0.5, teacher_version="t1")
    ver["score"] = score  # as a crafted or corrupted row would hold it
    store = AlertStore(path)
    assert store.add(esc, ver)
    store.close()


def test_alerts_escape_control_characters_and_bound_lengths(tmp_path, capsys):
    path = tmp_path / "a.sqlite"
    evil_ip = "\x1b[2J\x1b[H" + "A" * 5000
    _store_with(path, src_ip=evil_ip, proto_name="tcp\x07\r\x9b", score=1e300)
    # A teacher score of 1e300 is no score the protocol allows: a damaged field.
    assert main(["alerts", "--store", str(path)]) == 4
    out = capsys.readouterr().out
    assert out.rstrip("\n").endswith("  damaged: teacher_score")
    line = out.rstrip("\n")
    assert "\n" not in line and "\r" not in line
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in line)
    assert "\\x1b[2J\\x1b[H" in line
    assert "tcp\\x07\\x0d\\x9b" in line
    assert "A" * 200 not in line and "..." in line
    assert len(line) < 400
    assert "1e+300" in line and "0" * 30 not in line


def test_alerts_scores_are_three_decimals_when_ordinary(tmp_path, capsys):
    path = tmp_path / "a.sqlite"
    _store_with(path, src_ip="10.0.0.1", proto_name="tcp", score=0.91234)
    assert main(["alerts", "--store", str(path)]) == 0
    line = capsys.readouterr().out
    assert "10.0.0.1:1 -> 10.0.0.2:80/tcp" in line
    assert line.rstrip().endswith("agent escalate 0.700  teacher malicious 0.912")


@pytest.mark.parametrize("extra", [
    ["--threads", "0"],
    ["--threads", "-1"],
    ["--duration", "nan"],
    ["--duration", "inf"],
    ["--duration", "-1"],
    ["--max-wait-ms", "nan"],
    ["--connect-timeout", "-inf"],
    ["--max-batch", "0"],
    ["--session-expiry", "-1"],
    ["--stats-json", "/nonexistent-gatewatch/x.json"],
    ["--client-id", "x" * 70_000],  # found: a struct.error traceback from paho
    # Found: OverflowError tracebacks (past what a wait or a clock can hold).
    ["--duration", "1e308"],
    ["--duration", str(366 * 86_400 + 1)],
    ["--connect-timeout", "1e308"],
    ["--connect-timeout", "3601"],
])
def test_serve_refuses_bad_flags_before_serving(extra, capsys):
    assert main([*SERVE, *extra]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert extra[0] in err and "Traceback" not in err
    assert "error: " in err.strip().splitlines()[-1]


@pytest.mark.parametrize("url", ["mqtt://[::1", "mqtt://[zz]:1883"])
def test_serve_names_a_broker_url_it_cannot_parse(url, capsys):
    """Found: ``ValueError: Invalid IPv6 URL`` as a traceback; now one usage error
    naming the URL, before the checkpoint is loaded."""
    assert main([*SERVE, "--broker", url]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert repr(url) in err and "not a URL like mqtt://" in err
    assert "no-such-ckpt" not in err and "Traceback" not in err


@pytest.mark.parametrize(("url", "said"), [
    ("mqtt://127.0.0.1:0", "has port 0"),
    ("mqtts://[::1]:65536", "has a bad port"),
    ("mqtt://127.0.0.1:-1", "has a bad port"),
])
def test_serve_refuses_a_broker_port_outside_1_to_65535(url, said, capsys):
    """Found: ``--broker mqtt://HOST:0`` was taken as no port (1883): a usage
    error naming the URL, before the checkpoint is loaded."""
    assert main([*SERVE, "--broker", url]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err == f"error: broker {url!r} {said}; expected a number 1..65535\n"


@pytest.mark.parametrize("flag", ["--duration", "--connect-timeout"])
def test_serve_takes_its_longest_waits(flag, capsys):
    """At the caps (a year, an hour) the flags pass; the command goes on to the
    (absent) checkpoint."""
    top = {"--duration": "31622400", "--connect-timeout": "3600"}[flag]
    main([*SERVE, flag, top])
    err = capsys.readouterr().err
    assert "no-such-ckpt" in err and flag not in err


def test_serve_refuses_a_folder_as_store(tmp_path, capsys):
    assert main([*SERVE, "--store", str(tmp_path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"--store {tmp_path} is a folder" in err and "Traceback" not in err


def test_serve_help_says_what_a_failed_store_does(capsys):
    assert main(["serve", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "stops at the first failed write with exit 1" in out
    assert "broker delivers it again when the re-scorer restarts" in out


@pytest.mark.parametrize("client_id", ["\u00e9" * 40_000, "rs-\udcff"])
def test_serve_refuses_client_ids_mqtt_cannot_carry(client_id, capsys):
    """The limit is 65,535 bytes of UTF-8, not characters; an id that is not valid
    UTF-8 (undecodable bytes in argv) cannot be sent at all."""
    assert main([*SERVE, "--client-id", client_id]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--client-id" in err and "Traceback" not in err
    assert len(err) < 400


def test_serve_takes_a_client_id_of_65535_bytes(capsys):
    """At the limit the id passes; the command goes on to the (absent) checkpoint."""
    main([*SERVE, "--client-id", "\u00e9" * 32_767 + "x"])
    err = capsys.readouterr().err
    assert "no-such-ckpt" in err and "--client-id" not in err


@pytest.mark.parametrize("flags", [[], ["--json"]])
def test_alerts_into_a_closed_pipe_ends_quietly(tmp_path, flags):
    """Found: ``teacher alerts | head -1`` ended in a BrokenPipeError traceback
    once ``head`` had gone. Now it stops quietly with exit 0, as Unix tools do."""
    path = tmp_path / "a.sqlite"
    _store_with(path, src_ip="10.0.0.1", proto_name="tcp", score=0.9)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line is written
    try:
        out = subprocess.run(
            [str(BIN / "teacher"), "alerts", "--store", str(path), *flags],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr
    assert "Exception ignored" not in out.stderr


@pytest.mark.parametrize("extra", [["--limit", "-5"], ["--since", "nan"],
                                   ["--since", "inf"],
                                   # found: sqlite3.IntegrityError: datatype mismatch
                                   ["--limit", "99999999999999999999999"],
                                   ["--limit", str(2**63)]])
def test_alerts_refuses_bad_flags(extra, tmp_path, capsys):
    path = tmp_path / "a.sqlite"
    _store_with(path, src_ip="10.0.0.1", proto_name="tcp", score=0.9)
    assert main(["alerts", "--store", str(path), *extra]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert extra[0] in err and "Traceback" not in err


def test_alerts_takes_the_largest_limit_sqlite_has(tmp_path, capsys):
    path = tmp_path / "a.sqlite"
    _store_with(path, src_ip="10.0.0.1", proto_name="tcp", score=0.9)
    assert main(["alerts", "--store", str(path), "--limit", str(2**63 - 1)]) == 0
    assert "1 escalations" in capsys.readouterr().err


def test_alerts_says_a_folder_is_not_a_store(tmp_path, capsys):
    """Found: ``--store /tmp`` said "no alert store at /tmp"; it is a folder."""
    assert main(["alerts", "--store", str(tmp_path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"error: --store {tmp_path} is a folder; expected an alert")


def test_alerts_on_a_store_that_is_not_there_is_bad_input(tmp_path, capsys):
    """Found: ``--store NOSUCH`` was a usage error (exit 2); a missing input file
    is bad input (exit 3) in every tool, as a missing ``--data`` file is. The
    error names the path, and nothing is made there."""
    from flows.errors import EXIT_BAD_INPUT

    absent = tmp_path / "nosuch.sqlite"
    assert main(["alerts", "--store", str(absent)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err == (f"error: --store {absent}: no such file; expected an alert store "
                   "(the file teacher serve --store writes)\n")
    assert not absent.exists()
    # A flag conflict is still the usage error it is, whatever --store names.
    assert main(["alerts", "--store", str(absent), "--rejected", "--decision",
                 "benign"]) == EXIT_USAGE
    assert "--decision applies to escalations" in capsys.readouterr().err


def test_serve_exits_130_on_ctrl_c_after_its_summary(fake_serve, tmp_path,
                                                     monkeypatch, capsys):
    import threading

    def interrupted(self, timeout=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(threading.Event, "wait", interrupted)
    stats = tmp_path / "stats.json"
    code = main([*SERVE, "--store", str(tmp_path / "a.sqlite"),
                 "--stats-json", str(stats)])
    monkeypatch.undo()
    assert code == EXIT_INTERRUPTED
    assert "re-scorer: received 3" in capsys.readouterr().err
    assert json.loads(stats.read_text())["received"] == 3


def test_serve_reports_stats_it_cannot_write_on_stderr(fake_serve, tmp_path,
                                                       monkeypatch, capsys):
    import teacher.serve

    folder = tmp_path / "gone"
    folder.mkdir()
    stats = folder / "stats.json"

    class Vanishing(FakeServer):
        def start(self, timeout):  # the folder goes while serving
            folder.rmdir()

    monkeypatch.setattr(teacher.serve, "ReScorer", Vanishing)
    code = main([*SERVE, "--store", str(tmp_path / "a.sqlite"), "--duration", "0",
                 "--stats-json", str(stats)])
    assert code == 1
    err = capsys.readouterr().err
    assert f"--stats-json {stats}" in err and '"received": 3' in err
    assert "re-scorer: received 3" in err and "Traceback" not in err


def test_train_refuses_an_existing_file_as_out_before_training(tmp_path, capsys):
    out = tmp_path / "model"
    out.write_text("keep me\n")
    data = tmp_path / "absent.txt"  # never read: --out is checked first
    assert main(["train", "--data", str(data), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}" in err and "not a folder" in err
    assert "absent.txt" not in err
    assert out.read_text() == "keep me\n"
    assert main(["train", "--data", str(data), "--out", str(out / "sub"),
                 "-q"]) == 2
    assert "is a file" in capsys.readouterr().err


def _subparsers(parser):
    action = next(a for a in parser._actions
                  if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _options(parser):
    """(command, option strings, help) of every option, subcommands included
    (walked as tests/test_cli_hardening.py walks flows.cli and edge_agent.cli)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{name} {c}", o, h) for c, o, h in _options(sub))
        elif not isinstance(action, argparse._HelpAction):
            yield "", action.option_strings or [action.dest], action.help


def test_every_teacher_option_has_help_saying_its_default():
    options = list(_options(build_parser()))
    commands = {c.split()[0] for c, _, _ in options if c}
    assert {"train", "eval", "baselines", "tune", "update", "serve",
            "alerts"} <= commands
    assert len(options) > 100
    missing = [
        (path, opts)
        for path, opts, text in options
        if opts[0].startswith("-")
        and not (text and ("default" in text or "required" in text))
    ]
    assert missing == []
    assert all(text for _, _, text in options)


def test_teacher_help_lists_every_exit_code_on_each_command():
    """Every command lists the teacher's exit codes; serve and alerts list their
    own (serve never reads damaged input, alerts never meets a broker)."""
    parser = build_parser()
    every = (0, 1, 2, 3, 4, EXIT_UNAVAILABLE, EXIT_INTERRUPTED)
    own = {"serve": (0, 1, 2, 3, EXIT_UNAVAILABLE, EXIT_INTERRUPTED),
           "alerts": (0, 1, 2, 3, 4, EXIT_INTERRUPTED)}
    for name, text in [("", parser.format_help()),
                       *((n, p.format_help())
                         for n, p in _subparsers(parser).items())]:
        codes = text[text.index("exit codes:"):]
        assert "\\\n" not in text[: text.index("exit codes:") + 1][-3:]
        for code in own.get(name, every):
            assert f"\n  {code} " in codes, (code, text[:40])
    top = parser.format_help()
    assert "\n\\\n" not in top


def test_train_progress_bar_counts_every_members_epochs(capsys):
    from teacher.cli import _progress

    bar, on_epoch = _progress(1, 0, False, members=3)
    rec = {"train_loss": 0.5, "val_loss": 0.4, "val_f1": 0.9}
    for _ in range(3):  # --epochs 1, three members: one epoch each
        on_epoch(rec)
    assert bar.total == 3 and bar.n == 3
    bar.close()
    assert "3/3" in capsys.readouterr().err
    assert _progress(1, 0, True, members=3) == (None, None)


def test_a_checkpoint_without_checksums_is_refused_with_exit_3(tmp_path, capsys):
    import torch

    from teacher.checkpoint import CHECKSUMS_FILE, save_checkpoint
    from teacher.model import TeacherConfig, TeacherNet
    from tests.test_teacher_model import _encoder

    torch.manual_seed(0)
    net = TeacherNet(TeacherConfig(n_features=4, window=2, conv_filters=(4,),
                                   lstm_hidden=4)).eval()
    ck = save_checkpoint(tmp_path / "ck", net, encoder=_encoder(4, 2),
                         threshold={"threshold": 0.5, "rule": "best-f1",
                                    "chosen_on": "val"})
    (ck / CHECKSUMS_FILE).unlink()  # as a tamperer would, after editing weights
    data = tmp_path / "absent.txt"
    for argv in (["eval", "--checkpoint", str(ck), "--data", str(data), "-q"],
                 [*SERVE[:2], str(ck), *SERVE[3:], "--store",
                  str(tmp_path / "a.sqlite")]):
        argv = [a if a != "no-such-ckpt" else str(ck) for a in argv]
        assert main(argv) == 3
        err = capsys.readouterr().err
        assert f"{ck}: checkpoint has no checksums.json" in err
        assert "--allow-unverified" in err and "Traceback" not in err
    # Opted in, eval gets past the checkpoint to the (absent) data: bad input.
    assert main(["eval", "--checkpoint", str(ck), "--data", str(data), "-q",
                 "--allow-unverified"]) == 3
    errors = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("error:")]
    assert errors == [f"error: --data {data}: no such file (a registered dataset "
                      "name goes with --dataset)"]


# ------------------------------------------------------------- default client ids


def test_default_client_ids_are_one_per_process_and_taken_back(tmp_path, monkeypatch):
    """A kept session: the lowest id of the host and group nobody holds; given
    back, the next re-scorer takes it again. A clean session: a fresh id each."""
    import re

    from teacher.serve import claim_client_id, default_client_id

    run = tmp_path / "run"
    monkeypatch.setenv("GATEWATCH_RUN_DIR", str(run))
    base = default_client_id("grp")
    first = claim_client_id("grp", 3600)
    second = claim_client_id("grp", 3600)
    assert (first.client_id, second.client_id) == (base, f"{base}-2")
    assert claim_client_id("other", 3600).client_id == default_client_id("other")
    assert oct(run.stat().st_mode & 0o777) == "0o700"
    assert (run / f"{base}.lock").read_text() == f"{os.getpid()}\n"
    first.release()
    first.release()  # twice is harmless
    assert claim_client_id("grp", 3600).client_id == base
    clean = [claim_client_id("grp", 0) for _ in range(3)]
    assert len({c.client_id for c in clean}) == 3
    for claim in clean:
        assert re.fullmatch(re.escape(base) + r"-clean-[0-9a-f]{8}", claim.client_id)
        assert not claim.locked
    assert not list(run.glob("*clean*"))


def test_the_lock_folder_is_one_place_whatever_the_session(tmp_path, monkeypatch):
    """Found: a re-scorer from a login shell ($XDG_RUNTIME_DIR set) and one from
    cron (unset), or two with another $TMPDIR, kept their locks apart and took the
    same id. Neither variable moves the folder now; a relative one is refused."""
    from flows.errors import UsageError
    from teacher.serve import run_folder

    monkeypatch.delenv("GATEWATCH_RUN_DIR", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    plain = run_folder()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert run_folder() == plain == Path("/tmp") / f"gatewatch-{os.getuid()}"

    monkeypatch.setenv("GATEWATCH_RUN_DIR", "locks")
    with pytest.raises(UsageError, match="relative path"):
        run_folder()
    monkeypatch.setenv("GATEWATCH_RUN_DIR", str(tmp_path / "locks"))
    assert run_folder() == tmp_path / "locks"


def test_a_lock_folder_others_can_write_is_refused(tmp_path, monkeypatch):
    """Found: a folder of this user with mode 777 was taken as is, so another
    user could put lock files there and hold the ids."""
    from flows.errors import UsageError
    from teacher.serve import claim_client_id

    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o777)
    monkeypatch.setenv("GATEWATCH_RUN_DIR", str(run))

    with pytest.raises(UsageError, match="writable by other users \\(mode 777\\)"):
        claim_client_id("grp", 3600)
    assert list(run.iterdir()) == []
    run.chmod(0o700)
    assert claim_client_id("grp", 3600).locked


def test_a_default_client_id_is_not_taken_from_a_folder_of_someone_else(
    tmp_path, monkeypatch
):
    """The locks' folder must be this user's own: a link there (which another
    user could have planted in /tmp) is refused, naming it."""
    from flows.errors import UsageError
    from teacher.serve import claim_client_id

    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    monkeypatch.setenv("GATEWATCH_RUN_DIR", str(link))
    with pytest.raises(UsageError) as caught:
        claim_client_id("grp", 3600)
    assert str(caught.value) == (
        f"{link} (for the default client id's lock) is not a folder of this user; "
        "set GATEWATCH_RUN_DIR to a folder of your own, or give --client-id"
    )
    assert list(real.iterdir()) == []
