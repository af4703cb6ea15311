"""``edge-agent run`` on damaged files: exit 4 after scoring what was read, 3 when
nothing usable was read, as ``flows inspect`` does for the same files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from edge_agent.cli import main
from tests.test_agent_fixtures import tiny
from tests.test_meter_craft import eth, handshake, write_pcap


@pytest.fixture(scope="module")
def tm(data_dir, tmp_path_factory):
    return tiny(data_dir, tmp_path_factory)


def _run(tm, tmp_path: Path, source: str) -> tuple[int, dict | None]:
    summary = tmp_path / "s.json"
    rc = main(
        [
            "run", "--artifact", str(tm.artifact), "--source", source, "--site", "s1",
            "--gateway", "g1", "--outbox", str(tmp_path / "o.db"), "--alerts", "",
            "--summary-json", str(summary),
        ]
    )
    return rc, json.loads(summary.read_text()) if summary.exists() else None


def _frames(n: int) -> list[tuple[float, bytes]]:
    out = []
    for i in range(n):
        out += [(t, eth(f)) for t, f in handshake(sport=40000 + i, t0=1000.0 + i)]
    return out


def test_a_capture_cut_inside_a_packet_record_exits_4(tm, tmp_path, capsys) -> None:
    whole = write_pcap(tmp_path / "whole.pcap", _frames(3))
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(whole.read_bytes()[:-7])  # inside the last packet's bytes
    rc, summary = _run(tm, tmp_path, f"pcap:{cut}")
    err = capsys.readouterr().err
    assert rc == 4, err
    assert f"error: pcap:{cut}: damaged part way:" in err
    assert summary["flows"] == 3  # the cut packet is a FIN: all three flows read
    assert "Traceback" not in err


@pytest.mark.parametrize("kind", ["empty", "20 bytes", "unknown link type"])
def test_a_capture_with_nothing_usable_exits_3(tm, tmp_path, capsys, kind) -> None:
    path = tmp_path / "x.pcap"
    if kind == "unknown link type":
        write_pcap(path, _frames(2), link=147)  # LINKTYPE_USER0: no meter decodes it
    else:
        whole = write_pcap(tmp_path / "whole.pcap", _frames(1)).read_bytes()
        path.write_bytes(b"" if kind == "empty" else whole[:20])
    rc, summary = _run(tm, tmp_path, f"pcap:{path}")
    err = capsys.readouterr().err
    assert rc == 3, err
    assert str(path) in err and "Traceback" not in err
    assert summary is None or summary["flows"] == 0


def _log_bytes(tm, rows: int) -> bytes:
    lines = tm.conn_log.read_text().splitlines()
    header = [x for x in lines if x.startswith("#") and not x.startswith("#close")]
    data = [x for x in lines if not x.startswith("#")][:rows]
    return ("\n".join(header + data) + "\n").encode()


def test_a_conn_log_whose_last_line_is_cut_exits_4(tm, tmp_path, capsys) -> None:
    text = _log_bytes(tm, 300)
    log = tmp_path / "conn.log"
    log.write_bytes(text[: text.rstrip(b"\n").rfind(b"\n") + 12])  # 11 bytes of 300
    rc, summary = _run(tm, tmp_path, f"zeek:{log}")
    err = capsys.readouterr().err
    assert rc == 4, err
    assert "cut short" in err
    assert summary["flows"] == 299


def test_a_cut_gzip_conn_log_exits_4_and_keeps_the_flows_before(
    tm, tmp_path, capsys
) -> None:
    packed = gzip.compress(_log_bytes(tm, 2500))
    log = tmp_path / "conn.log.gz"
    log.write_bytes(packed[: len(packed) * 2 // 3])
    rc, summary = _run(tm, tmp_path, f"zeek:{log}")
    err = capsys.readouterr().err
    assert rc == 4, err
    assert f"error: zeek:{log}: damaged part way:" in err
    assert 0 < summary["flows"] < 2500


def test_an_intact_capture_still_exits_0(tm, tmp_path, capsys) -> None:
    path = write_pcap(tmp_path / "ok.pcap", _frames(3))
    rc, summary = _run(tm, tmp_path, f"pcap:{path}")
    assert rc == 0, capsys.readouterr().err
    assert summary["flows"] == 3
