"""The agent's capture sources go through the flow meter: ``pcap:`` and ``iface:``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.sources import canonical, open_source
from flows.errors import BadInputError, UsageError

REPO = Path(__file__).resolve().parent.parent

# Runs in its own interpreter: the live source never ends, so the process does.
_LIVE = """
import json, socket, threading, time
from edge_agent.sources import open_source

srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen()
port = srv.getsockname()[1]

def talk():
    time.sleep(0.7)
    c = socket.create_connection(("127.0.0.1", port))
    s, _ = srv.accept()
    c.sendall(b"hello")
    s.recv(10)
    s.sendall(b"world!")
    c.recv(10)
    c.close()
    s.close()

threading.Thread(target=talk, daemon=True).start()
for rec in open_source("iface:lo"):
    if rec["dst_port"] == port:
        print(json.dumps(rec))
        break
"""


def test_pcap_source_gives_the_meters_records(data_dir: Path) -> None:
    from flows.meter import iter_flows
    from tests.conftest import data_file

    pcap = data_file(data_dir, "pcap/tcp_syn.pcap")
    # The meter draws a fresh uid on each read; every other field must match.
    got = [dict(r, uid=None) for r in open_source(f"pcap:{pcap}")]
    want = [dict(canonical(r), uid=None) for r in iter_flows(pcap)]
    assert got and got == want


def test_unknown_interface_is_named_when_the_source_starts() -> None:
    pytest.importorskip("pcapy", reason="pcapy-ng is not installed")
    source = open_source("iface:gw-no-such0")
    assert not source.finite
    with pytest.raises((BadInputError, UsageError), match="gw-no-such0"):
        next(iter(source))


@pytest.mark.skipif(os.geteuid() != 0, reason="capturing on lo needs root here")
def test_iface_source_yields_a_tcp_connection_on_loopback() -> None:
    pytest.importorskip("pcapy", reason="pcapy-ng is not installed")
    out = subprocess.run(
        [sys.executable, "-c", _LIVE],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    rec = json.loads(out.stdout)
    assert (rec["src_ip"], rec["dst_ip"], rec["proto"]) == (
        "127.0.0.1",
        "127.0.0.1",
        "tcp",
    )
    assert (rec["orig_bytes"], rec["resp_bytes"], rec["conn_state"]) == (5, 6, "SF")
    assert set(rec) == set(canonical({}))


# -- followed logs that vanish, folders, missing files ---------------------------------


def _wait(predicate, seconds: float = 20.0) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_follow_waits_for_a_missing_or_removed_log_and_says_so(tmp_path, caplog):
    import logging
    import threading

    from tests.test_readers import ROW_A, ROW_B, zeek_text

    log = tmp_path / "conn.log"
    src = open_source(f"zeek:{log}", follow=True, poll=0.05)
    got: list[dict] = []
    thread = threading.Thread(target=lambda: got.extend(src), daemon=True)
    with caplog.at_level(logging.WARNING, logger="gatewatch"):
        thread.start()
        assert _wait(lambda: "no such file yet; waiting" in caplog.text)
        log.write_text(zeek_text([ROW_A], close=False))
        assert _wait(lambda: len(got) == 1)
        log.unlink()
        assert _wait(lambda: "the file was removed; waiting" in caplog.text)
        log.write_text(zeek_text([ROW_B], close=False))
        assert _wait(lambda: len(got) == 2)
        src.end.set()
        thread.join(10)
    assert not thread.is_alive()
    assert [r["uid"] for r in got] == ["CabC1", "CabC2"]
    assert src.rejected == {} and src.error is None


@pytest.mark.parametrize("kind", ["zeek", "pcap", "parquet"])
def test_a_folder_or_a_missing_file_is_named_with_what_is_expected(tmp_path, kind):
    with pytest.raises(BadInputError) as info:
        open_source(f"{kind}:{tmp_path}")
    assert info.value.path == str(tmp_path)
    assert f"is a directory; {kind}: expects a" in str(info.value)
    with pytest.raises(BadInputError) as info:
        open_source(f"{kind}:{tmp_path / 'nope'}")
    assert "no such file" in str(info.value) and "expects a" in str(info.value)


def test_stdin_reads_text_labels_as_the_zeek_readers_do(caplog) -> None:
    """Found: a canonical stdin record with ``"label": "Malicious"`` (as the zeek-json
    reader accepts) was a bad value, so such a stdin ended the run with exit 3."""
    import io

    base = {
        "ts": 1.5, "src_ip": "10.0.0.1", "src_port": 40000, "dst_ip": "10.0.0.2",
        "dst_port": 80, "proto": "tcp",
    }
    labels = [
        ("Malicious", 1, "Malicious"),
        (" benign ", 0, " benign "),
        ("Background", None, "Background"),
        ("UNKNOWN", None, "UNKNOWN"),
        ("-", None, None),
        (1, 1, None),
        (None, None, None),
    ]
    lines = [json.dumps({**base, "label": text}) for text, _, _ in labels]
    lines.append(json.dumps({**base, "label": "Malicious", "label_detail": "C&C"}))
    lines.append(json.dumps({**base, "label": "evil"}))
    src = open_source("-", stdin=io.StringIO("\n".join(lines) + "\n"))
    got = list(src)
    assert [(r["label"], r["label_detail"]) for r in got] == [
        (mapped, detail) for _, mapped, detail in labels
    ] + [(1, "C&C")]
    assert src.rejected == {"bad_value": 1}
    assert src.first_rejected.startswith("line 9: bad_value: field 'label'")
    assert "unknown label 'evil'" in src.first_rejected
