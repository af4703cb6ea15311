"""A Parquet ``ts`` held as an Arrow timestamp, of any unit, with or without a zone.

Found: such a file was refused ("column cannot be read as double"). Now it is read
as epoch seconds (float64), each value the float nearest the exact time; a
timestamp without a zone is wall-clock time in the reader's ``timezone`` (default
UTC), as Argus binetflow start times are. The expected values are worked out here
with integer arithmetic (``Fraction``) and fixed offsets: Prague is UTC+1 in
January and UTC+2 in August, and 02:30 on 2023-10-29 comes twice there (read as
the first, still UTC+2).
"""

from __future__ import annotations

import calendar
import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import main as flows_main
from flows.readers import read
from flows.record import conn_schema

REPO = Path(__file__).resolve().parent.parent
TICKS = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}
PRAGUE = "Europe/Prague"


def _utc_second(*when: int) -> int:
    """Epoch second of a UTC wall-clock time (year, month, day, h, m, s)."""
    return calendar.timegm((*when, 0, 0, 0))


# (UTC wall-clock second, ticks below the second as nanoseconds): ordinary times,
# two in 1975 (nanosecond counts there are past 2**53 but the seconds are few),
# one a few days after 1970 and one exactly on a second. For the first of each
# year, dividing the count turned float by 10**9 is one float off the exact time.
MOMENTS = [
    (_utc_second(2023, 11, 14, 22, 13, 20), 955_892_128),
    (_utc_second(1975, 1, 1, 0, 0, 0), 366_360_798),
    (_utc_second(2023, 11, 14, 22, 13, 20), 123_456_789),
    (_utc_second(2011, 8, 10, 9, 46, 53), 500_000_001),
    (_utc_second(1975, 1, 1, 0, 0, 0), 999_999_999),
    (_utc_second(1970, 1, 5, 3, 0, 0), 7),
    (_utc_second(2038, 1, 19, 3, 14, 8), 0),
]


def _ticks(second: int, nanos: int, unit: str) -> int:
    """The count in ``unit``, the nanoseconds cut to what the unit holds."""
    return second * TICKS[unit] + nanos // (10**9 // TICKS[unit])


def _conn_parquet(path: Path, ts: pa.Array) -> Path:
    """A canonical conn table with ``ts`` as given, one flow per value."""
    n = len(ts)
    columns = {field.name: pa.nulls(n, field.type) for field in conn_schema()}
    columns.update(
        ts=ts,
        src_ip=pa.array(["10.0.0.1"] * n),
        dst_ip=pa.array(["10.0.0.2"] * n),
        proto=pa.array(["tcp"] * n),
    )
    pq.write_table(pa.table(columns), path)
    return path


@pytest.mark.parametrize("unit", sorted(TICKS))
def test_a_timestamp_without_a_zone_is_utc_by_default(tmp_path, unit):
    counts = [_ticks(s, ns, unit) for s, ns in MOMENTS]
    path = _conn_parquet(tmp_path / "t.parquet", pa.array(counts, pa.timestamp(unit)))

    got = read(path).table.column("ts")

    assert got.type == pa.float64()
    assert got.to_pylist() == [float(Fraction(c, TICKS[unit])) for c in counts]


@pytest.mark.parametrize("unit", sorted(TICKS))
@pytest.mark.parametrize("zone", ["UTC", "America/New_York", "+05:30"])
def test_a_timestamp_with_a_zone_is_the_instant_it_holds(tmp_path, unit, zone):
    """Arrow keeps such a timestamp as UTC ticks; the reader's zone is not used."""
    counts = [_ticks(s, ns, unit) for s, ns in MOMENTS]
    path = _conn_parquet(
        tmp_path / "t.parquet", pa.array(counts, pa.timestamp(unit, tz=zone))
    )

    got = read(path, timezone=PRAGUE).table.column("ts").to_pylist()

    assert got == [float(Fraction(c, TICKS[unit])) for c in counts]


# Prague wall-clock times (UTC date-time tuple of the same digits, nanoseconds)
# and Prague's offset from UTC then, in hours.
PRAGUE_TIMES = [
    ((2011, 1, 10, 9, 46, 53), 250_000_000, 1),
    ((2011, 8, 10, 9, 46, 53), 500_000_001, 2),
    ((2023, 10, 29, 2, 30, 0), 123_456_789, 2),  # comes twice: the first
]


@pytest.mark.parametrize("unit", sorted(TICKS))
def test_a_timestamp_without_a_zone_is_read_in_the_given_zone(tmp_path, unit):
    counts = [_ticks(_utc_second(*when), ns, unit) for when, ns, _ in PRAGUE_TIMES]
    path = _conn_parquet(tmp_path / "t.parquet", pa.array(counts, pa.timestamp(unit)))

    got = read(path, timezone=PRAGUE).table.column("ts").to_pylist()

    expected = [
        float(Fraction(c, TICKS[unit]) - hours * 3600)
        for c, (_, _, hours) in zip(counts, PRAGUE_TIMES, strict=True)
    ]
    assert got == expected


def test_nulls_and_many_chunks_stay_in_place(tmp_path):
    stamp = _ticks(*MOMENTS[0], "us")
    table_ts = pa.chunked_array(
        [pa.array([stamp, None], pa.timestamp("us")),
         pa.array([stamp + 1], pa.timestamp("us"))]
    )
    from flows.readers.parquet import epoch_seconds

    got = epoch_seconds(table_ts, PRAGUE).to_pylist()

    base = Fraction(stamp, 10**6) - 3600  # November: UTC+1
    assert got == [float(base), None, float(base + Fraction(1, 10**6))]


def test_flows_convert_writes_epoch_seconds_in_the_given_zone(tmp_path, capsys):
    counts = [_ticks(_utc_second(*when), ns, "ns") for when, ns, _ in PRAGUE_TIMES]
    src = _conn_parquet(tmp_path / "t.parquet", pa.array(counts, pa.timestamp("ns")))
    out = tmp_path / "out.parquet"

    code = flows_main(["convert", str(src), "-o", str(out), "--timezone", PRAGUE])

    assert code == 0, capsys.readouterr().err
    written = pq.read_table(out).column("ts")
    assert written.type == pa.float64()
    assert written.to_pylist() == [
        float(Fraction(c, 10**9) - hours * 3600)
        for c, (_, _, hours) in zip(counts, PRAGUE_TIMES, strict=True)
    ]


def test_standard_input_is_read_in_the_given_zone_too(tmp_path):
    when, nanos, hours = PRAGUE_TIMES[1]
    count = _ticks(_utc_second(*when), nanos, "ms")
    src = _conn_parquet(tmp_path / "t.parquet", pa.array([count], pa.timestamp("ms")))

    run = subprocess.run(
        [sys.executable, "-m", "flows.cli", "inspect", "--json", "--timezone",
         PRAGUE, "-"],
        input=src.read_bytes(), capture_output=True, cwd=REPO, timeout=120,
    )

    assert run.returncode == 0, run.stderr.decode()
    first = json.loads(run.stdout)["time_span"]["first"]
    assert first == float(Fraction(count, 10**3) - hours * 3600)
