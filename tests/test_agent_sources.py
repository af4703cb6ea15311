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
    # An unknown label costs the label, not the flow (labels are not scored).
    assert [(r["label"], r["label_detail"]) for r in got] == [
        (mapped, detail) for _, mapped, detail in labels
    ] + [(1, "C&C"), (None, "evil")]
    assert src.rejected == {} and src.unknown_labels == 1


_ZEEK_JSON = {
    "ts": 1.5, "uid": "C1", "id.orig_h": "10.0.0.1", "id.orig_p": 40000,
    "id.resp_h": "10.0.0.2", "id.resp_p": 80, "proto": "tcp",
}


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("id.orig_p", "x", "expected an integer, found 'x'"),
        ("id.resp_p", 70000, "expected a port from 0 to 65535, found 70000"),
        # Found: any text was a proto (a blank, a command line, a control code).
        ("proto", "tcp udp", "expected a protocol name (letters, digits and - _ . "
         "+ /, such as tcp or ipv6-icmp) or number 0..255, found 'tcp udp'"),
        ("proto", "999", "expected a protocol number from 0 to 255, found '999'"),
        ("id.orig_h", "10.0.0.999", "expected an IPv4 or IPv6 address, found "
         "'10.0.0.999'"),
        ("ts", "soon", "expected epoch seconds or ISO-8601, found 'soon'"),
    ],
)
def test_a_bad_zeek_json_record_on_stdin_is_rejected_by_line_and_field(
    key, value, expected, nested
) -> None:
    """Found: a stdin record in Zeek's JSON names with a bad value was rejected as
    ``line 3: bad_value: expected an integer, found 'x'``, naming no field."""
    import io

    def line(uid: str, **values) -> str:
        obj = {**_ZEEK_JSON, "uid": uid, **values}
        if nested:
            obj["id"] = {k[3:]: obj.pop(k) for k in list(obj) if k.startswith("id.")}
        return json.dumps(obj)

    text = "\n".join([line("C1"), line("C2"), line("C3", **{key: value}), line("C4")])
    src = open_source("-", stdin=io.StringIO(text + "\n"))
    assert [r["uid"] for r in src] == ["C1", "C2", "C4"]
    assert src.rejected == {"bad_value": 1}
    assert src.first_rejected == f"line 3: bad_value: field {key!r}: {expected}"


def test_a_stdin_record_whose_proto_names_no_protocol_is_rejected() -> None:
    """Canonical names too: the record is rejected (bad_value), counted and
    named by line and field, and the read goes on."""
    import io

    base = {"ts": 1.5, "src_ip": "10.0.0.1", "src_port": 1, "dst_ip": "10.0.0.2",
            "dst_port": 2}
    lines = [dict(base, uid="C1", proto="tcp"), dict(base, uid="C2", proto="\x1b[2J"),
             dict(base, uid="C3", proto="17")]
    text = "".join(json.dumps(o) + "\n" for o in lines)
    src = open_source("-", stdin=io.StringIO(text))
    assert [r["uid"] for r in src] == ["C1", "C3"]
    assert src.rejected == {"bad_value": 1}
    assert src.first_rejected == (
        "line 2: bad_value: field 'proto': expected a protocol name (letters, "
        "digits and - _ . + /, such as tcp or ipv6-icmp) or number 0..255, found "
        "'\\x1b[2J'")


def test_a_bad_line_of_a_followed_log_is_rejected_by_line_and_field(tmp_path):
    """The same for a followed Zeek TSV log: the rejection names the column."""
    import threading

    from tests.test_agent_imports import _HEADER, _ROWS

    bad = _ROWS[1].replace("\t53211\t", "\tx\t")
    log = tmp_path / "conn.log"
    log.write_text("\n".join([*_HEADER, _ROWS[0], bad, _ROWS[2]]) + "\n")
    src = open_source(f"zeek:{log}", follow=True, poll=0.05)
    got: list[dict] = []
    thread = threading.Thread(target=lambda: got.extend(src), daemon=True)
    thread.start()
    src.end.set()  # ends once it yielded what the file holds
    thread.join(60)
    assert not thread.is_alive()
    assert [r["uid"] for r in got] == ["C1", "C3"]
    assert src.rejected == {"bad_line": 1}
    line_no = len(_HEADER) + 2
    assert src.first_rejected == (
        f"line {line_no}: bad_line: field 'id.orig_p': expected an integer, found 'x'"
    )
