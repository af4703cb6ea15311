"""Findings 15: impossible dates and fractions of a second that were read as times.

* An Argus binetflow StartTime naming a day its month lacks (``2011/02/30``,
  ``2011/02/29``) was moved on into March by Arrow's ``strptime``; it is now a bad
  row named ``StartTime``, as a month 13 is.
* A classic pcap record whose fraction of a second was a whole second or more
  (4,000,000,000 microseconds) moved the packet 4000 s later; the record is now
  skipped as a damaged packet (``bad_time``) and the read goes on after it.
"""

from __future__ import annotations

import struct

import pytest

from flows.cli import main
from flows.errors import BadInputError, PartialInputError
from flows.meter import read_capture
from flows.meter.capture import CaptureReader
from flows.readers import read
from tests.test_meter_craft import A4, B4, eth, ip4, udp

# ------------------------------------------------------------- binetflow dates

HEAD = "StartTime,Dur,Proto,SrcAddr,Sport,Dir,DstAddr,Dport,State,TotPkts,TotBytes,"
HEAD += "SrcBytes,Label"
REST = ",1.5,tcp,10.0.0.1,1000,->,10.0.0.2,80,CON,3,300,100,Normal"


def _binetflow(tmp_path, *starts: str):
    """A binetflow file with one row per StartTime in ``starts``."""
    path = tmp_path / "a.binetflow"
    path.write_text(HEAD + "\n" + "".join(s + REST + "\n" for s in starts))
    return path


def _day_message(found: str, month: str, days: int) -> str:
    return (
        "expected YYYY/MM/DD HH:MM:SS.ffffff with a day its month has, found "
        f"{found!r} ({month} has {days} days)"
    )


@pytest.mark.parametrize(
    ("start", "month", "days"),
    [
        ("2011/02/30 10:00:00.000000", "2011/02", 28),
        ("2011/02/29 10:00:00", "2011/02", 28),
        ("1900/02/29 00:00:00", "1900/02", 28),  # no leap year: a century
        ("2011/04/31 23:59:59.5", "2011/04", 30),
        ("2011-06-31 00:00:00", "2011/06", 30),  # dashes read as slashes
    ],
)
def test_binetflow_impossible_date_is_a_bad_row(tmp_path, start, month, days):
    """Found: ``2011/02/30`` read as 2011-03-02, exit 0; now as month 13 is."""
    path = _binetflow(tmp_path, "2011/02/28 10:00:00", start, "2012/02/29 10:00:00")
    with pytest.raises(PartialInputError) as info:
        read(path)
    err = info.value
    assert (err.line, err.column, err.exit_code) == (3, "StartTime", 4)
    assert str(err) == f"{path}, line 3, column 'StartTime': " + _day_message(
        start, month, days
    )
    result = read(path, on_error="skip")
    assert result.skipped == 1 and result.stats["skipped_lines"] == [3]
    # 2011-02-28 10:00 UTC and 2012-02-29 10:00 UTC (a leap day that exists).
    assert result.table.column("ts").to_pylist() == [1298887200.0, 1330509600.0]


def test_binetflow_impossible_date_first_is_bad_input(tmp_path):
    """With nothing read before it, the bad date is bad input (exit 3)."""
    path = _binetflow(tmp_path, "2011/02/29 10:00:00")
    with pytest.raises(BadInputError) as info:
        read(path)
    assert not isinstance(info.value, PartialInputError)
    assert (info.value.line, info.value.exit_code) == (2, 3)


def test_binetflow_impossible_date_in_a_zone(tmp_path):
    """The check holds when StartTime is read in a time zone too."""
    path = _binetflow(tmp_path, "2011/02/28 10:00:00", "2011/02/29 10:00:00")
    result = read(path, on_error="skip", timezone="Europe/Prague")
    assert result.stats["skipped_lines"] == [3]
    assert result.table.column("ts").to_pylist() == [1298883600.0]


def test_binetflow_impossible_date_on_the_command_line(tmp_path, capsys):
    """``flows inspect`` exits 4 with the file, line and column, as for month 13."""
    path = _binetflow(tmp_path, "2011/02/28 10:00:00", "2011/02/30 10:00:00.000000")
    assert main(["inspect", str(path)]) == 4
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        f"error: {path}, line 3, column 'StartTime': "
        + _day_message("2011/02/30 10:00:00.000000", "2011/02", 28)
    )


# ------------------------------------------------------ pcap fractions of seconds

ENGINES = ["python", "fast"]


def _engine(engine: str) -> str:
    """The engine, or a skip when it is the compiled one and that is not built."""
    from flows.meter import fast_available

    if engine == "fast" and not fast_available():
        pytest.skip("the compiled meter flows.meter._fast is not built here")
    return engine


def _dns(sport: int) -> bytes:
    return eth(ip4(A4, B4, 17, udp(A4, B4, sport, 53, b"query")))


def _pcap(path, records, nano: bool = False, big: bool = False):
    """A classic pcap of ``(sec, frac, frame)`` records, fractions as written;
    returns the path and the byte offset of each record."""
    o = ">" if big else "<"
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    blob = struct.pack(o + "IHHiIII", magic, 2, 4, 0, 0, 65535, 1)
    offsets = []
    for sec, frac, data in records:
        offsets.append(len(blob))
        blob += struct.pack(o + "IIII", sec, frac, len(data), len(data)) + data
    path.write_bytes(blob)
    return path, offsets


@pytest.mark.parametrize(
    ("nano", "bad", "good", "good_ts", "unit", "limit"),
    [
        (False, 4_000_000_000, 999_999, 1002.999999, "microseconds", 1_000_000),
        (False, 1_000_000, 5, 1002.000005, "microseconds", 1_000_000),
        (True, 1_000_000_000, 999_999_999, 1002.999999999, "nanoseconds", 10**9),
        (True, 4_000_000_000, 5, 1002.000000005, "nanoseconds", 10**9),
    ],
)
@pytest.mark.parametrize("big", [False, True])
def test_capture_reader_skips_a_record_with_a_second_in_its_fraction(
    tmp_path, nano, bad, good, good_ts, unit, limit, big
):
    """The record is skipped as damaged; the records after it are read."""
    records = [(1000, 0, _dns(1000)), (1001, bad, _dns(1001)), (1002, good, _dns(1))]
    path, offsets = _pcap(tmp_path / "t.pcap", records, nano=nano, big=big)
    reader = CaptureReader(str(path))
    seen = []
    reader.on_damaged = lambda *args: seen.append(args)
    got = [(ts, offset) for ts, _, _, _, offset in reader]
    assert got == [(1000.0, offsets[0]), (good_ts, offsets[2])]
    assert reader.damage is None
    assert (reader.packets, dict(reader.skipped_blocks)) == (2, {"bad_time": 1})
    assert seen == [
        (
            offsets[1],
            "bad_time",
            "packet time stamp is unusable: expected a fraction of a second "
            f"below {limit} {unit}, found {bad}",
        )
    ]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_pcap_fraction_of_a_second_out_of_range_is_a_damaged_packet(
    tmp_path, engine, on_error
):
    """Found: 4,000,000,000 microseconds put the packet at 5001.0 s, exit 0."""
    records = [
        (1000, 0, _dns(1000)),
        (1001, 4_000_000_000, _dns(1001)),
        (1002, 5, _dns(1002)),
    ]
    path, offsets = _pcap(tmp_path / "f.pcap", records)
    res = read_capture(path, engine=_engine(engine), on_error=on_error)
    message = (
        "packet time stamp is unusable: expected a fraction of a second below "
        "1000000 microseconds, found 4000000000"
    )
    assert res.partial and res.warnings == [
        f"{path}: byte offset {offsets[1]}: {message}"
    ]
    rows = [(r["ts"], r["src_port"]) for r in res.table.to_pylist()]
    assert rows == [(1000.0, 1000), (1002.000005, 1002)]
    assert res.skipped == 1 and res.stats["skipped"] == {"bad_time": 1}
    assert res.stats["damage"]["reasons"] == {"bad_time": 1}
    assert (res.stats["packets"], res.stats["last_ts"]) == (3, 1002.000005)


@pytest.mark.parametrize("engine", ENGINES)
def test_pcap_fraction_out_of_range_on_the_command_line(
    tmp_path, capsys, monkeypatch, engine
):
    """``flows inspect`` exits 4, the error line giving the count and the offset."""
    monkeypatch.setenv("GATEWATCH_METER", _engine(engine))
    records = [(1000, 0, _dns(1000)), (1001, 4_000_000_000, _dns(1001))]
    path, offsets = _pcap(tmp_path / "f.pcap", records)
    assert main(["inspect", str(path)]) == 4
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        f"error: {path}: 1 damaged packet skipped at byte offset {offsets[1]}: "
        "packet time stamp is unusable: expected a fraction of a second below "
        "1000000 microseconds, found 4000000000; the read went on past it and "
        "kept the rows of the other packets"
    )
