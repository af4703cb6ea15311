"""``edge-agent run`` on damaged files: exit 4 after scoring what was read, 3 when
nothing usable was read, as ``flows inspect`` does for the same files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from edge_agent.cli import main
from edge_agent.sources import open_source
from tests.test_agent_fixtures import tiny
from tests.test_meter_craft import A4, B4, eth, handshake, ip4, udp, write_pcap


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
    at = len(whole.read_bytes()) - (16 + len(_frames(3)[-1][1]))  # the last record
    assert f"error: pcap:{cut}: damaged part way at byte offset {at}: " in err
    assert "flows read before it were scored and kept" in err
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


def _with_damaged_packets(tmp_path: Path, n_bad: int) -> tuple[Path, int]:
    """Three TCP connections, with ``n_bad`` UDP packets cut inside their UDP
    header after the second packet (damaged: the meter skips them and reads on);
    the capture and the byte offset of the first damaged packet's record."""
    frames = _frames(3)
    bad = eth(ip4(A4, B4, 17, udp(A4, B4, 5000, 53, b"x")[:4]))
    frames[2:2] = [(1000.05 + i / 100, bad) for i in range(n_bad)]
    at = 24 + sum(16 + len(data) for _, data in frames[:2])
    return write_pcap(tmp_path / "bad.pcap", frames), at


@pytest.mark.parametrize("n_bad", [1, 2])
def test_damaged_packets_skipped_are_not_called_a_stop_part_way(
    tm, tmp_path, capsys, n_bad
) -> None:
    """Found: a capture whose damaged packets were skipped while the read went on
    ended in "damaged part way", as if the read had stopped there."""
    path, at = _with_damaged_packets(tmp_path, n_bad)
    rc, summary = _run(tm, tmp_path, f"pcap:{path}")
    err = capsys.readouterr().err
    assert rc == 4, err
    assert summary["flows"] == 3  # every connection, the ones after them too
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    which = (
        f"1 damaged packet skipped at byte offset {at}" if n_bad == 1
        else f"2 damaged packets skipped, the first at byte offset {at}"
    )
    assert line == (
        f"error: pcap:{path}: {which}: UDP header is cut; the read went on past "
        f"{'it' if n_bad == 1 else 'them'}; the 3 flows read were scored and kept"
    )


def test_damaged_packets_then_a_cut_say_both_in_order(tm, tmp_path, capsys) -> None:
    path, at = _with_damaged_packets(tmp_path, 1)
    whole = path.read_bytes()
    cut_at = len(whole) - (16 + len(_frames(3)[-1][1]))  # the last packet's record
    path.write_bytes(whole[:-7])
    rc, summary = _run(tm, tmp_path, f"pcap:{path}")
    err = capsys.readouterr().err
    assert rc == 4, err
    assert summary["flows"] == 3
    assert (
        f"error: pcap:{path}: 1 damaged packet skipped at byte offset {at}: UDP "
        f"header is cut; then damaged part way at byte offset {cut_at}: the file "
        "ends inside a packet record"
    ) in err
    assert err.rstrip().endswith("the 3 flows read before it were scored and kept")


def test_the_source_keeps_its_damage_by_kind(tm, tmp_path) -> None:
    """``Source.damage``: a capture's skipped packets are no stop; a conn.log's
    cut last line is one (named without the path the error line gives)."""
    path, at = _with_damaged_packets(tmp_path, 2)
    src = open_source(f"pcap:{path}")
    assert len(list(src)) == 3
    (found,) = src.damage
    assert (found.stopped, found.records, found.skipped) == (False, 2, 2)
    assert (found.place, found.what) == (f"byte offset {at}", "UDP header is cut")

    text = _log_bytes(tm, 30)
    log = tmp_path / "conn.log"
    log.write_bytes(text[: text.rstrip(b"\n").rfind(b"\n") + 12])
    src = open_source(f"zeek:{log}")
    assert len(list(src)) == 29
    (found,) = src.damage
    last = text.count(b"\n")  # the header lines, then 30 records
    assert found.stopped and found.what == f"the last line ({last}) is cut short"


def test_a_binetflow_cut_in_its_last_line_exits_4_through_a_zeek_source(
    tm, tmp_path, capsys
) -> None:
    """A conn-family file the readers read whole (binetflow) passes its damage on
    too: it used to be logged nowhere, and the agent exited 0."""
    from tests.test_readers import BINET_HEAD

    rows = [
        f"2011/08/10 09:46:{10 + i:02d}.000000,0.5,tcp,10.0.0.{i + 1},{40000 + i},"
        f"   ->,10.0.1.1,80,S_RA,0,0,4,244,124,2,flow=To-Normal-V42-TCP"
        for i in range(12)
    ]
    text = BINET_HEAD + "\n" + "\n".join(rows) + "\n"
    log = tmp_path / "cut.binetflow"
    log.write_text(text[:-25])  # the last row loses its end, and its newline
    rc, summary = _run(tm, tmp_path, f"zeek:{log}")
    err = capsys.readouterr().err
    assert rc == 4, err
    assert f"error: zeek:{log}: damaged part way" in err and "cut short" in err
    assert summary["flows"] == 11
