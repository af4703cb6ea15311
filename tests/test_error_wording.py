"""Error lines in the user's words: no Python repr, no internals, the cause first.

Each test is a regression test for wording a fresh-eyes tester found: the agent's
oversized capture record ("the flows before it were yielded (the 11 flows read
before it were scored and kept)"), a Parquet ``ts`` of another type shown as
``datetime.datetime(2022, 6, 12, ...)``, and a UNSW-NB15 file whose ``proto``
header was renamed, reported as text in a number column on every row instead of
as the missing column. (Row groups counted from 1: test_parquet_damage_one_line.)
"""

from __future__ import annotations

import datetime
import struct

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from edge_agent.cli import main
from flows.errors import BadInputError, PartialInputError
from flows.readers import read
from flows.record import conn_schema
from tests.test_agent_damage import _frames
from tests.test_agent_fixtures import tiny
from tests.test_meter_craft import write_pcap
from tests.test_readers import UNSW_HEAD, UNSW_ROW, write


@pytest.fixture(scope="module")
def tm(data_dir, tmp_path_factory):
    return tiny(data_dir, tmp_path_factory)


def _agent(tm, tmp_path, source: str, capsys) -> tuple[int, list[str]]:
    rc = main([
        "run", "--artifact", str(tm.artifact), "--source", source, "--site", "s1",
        "--gateway", "g1", "--outbox", str(tmp_path / "o.db"), "--alerts", "",
    ])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, [line for line in err.splitlines() if line.startswith("error:")]


def test_an_oversized_capture_record_says_what_was_kept_in_plain_words(
    tm, tmp_path, capsys
):
    path = write_pcap(tmp_path / "big.pcap", _frames(3))
    at = path.stat().st_size
    record = struct.pack("<IIII", 2000, 0, 2_000_000, 2_000_000)  # 2 MB claimed
    path.write_bytes(path.read_bytes() + record + b"\0" * 64)

    rc, errors = _agent(tm, tmp_path, f"pcap:{path}", capsys)

    assert rc == 4 and len(errors) == 1
    assert errors[0] == (
        f"error: {path}, byte offset {at}: record header claims 2000000 captured "
        "bytes (wire length 2000000, snap length 65535); the 3 flows read before "
        "it were scored and kept"
    )


def test_a_date_ts_in_parquet_is_shown_as_iso_time_and_type(
    tm, tmp_path, capsys
):
    """A timestamp ``ts`` is read as epoch seconds now (test_parquet_timestamps);
    a calendar date, which names no time, is still refused in these words."""
    stamp = datetime.date(2022, 6, 12)
    columns = {field.name: pa.nulls(1, field.type) for field in conn_schema()}
    columns.update(
        ts=pa.array([stamp], pa.date32()),
        src_ip=pa.array(["10.0.0.1"]), dst_ip=pa.array(["10.0.0.2"]),
        proto=pa.array(["tcp"]),
    )
    path = tmp_path / "ts.parquet"
    pq.write_table(pa.table(columns), path)

    rc, errors = _agent(tm, tmp_path, f"parquet:{path}", capsys)

    assert rc == 3
    assert errors == [
        f"error: {path}, column 'ts': is date32[day], a calendar date, which names "
        "no time; expected epoch seconds (a number type) or a timestamp"
    ]


def test_a_renamed_unsw_proto_header_is_named_as_the_missing_column(tmp_path):
    head = UNSW_HEAD.replace(",proto,", ",protocol,")
    rows = [UNSW_ROW, UNSW_ROW.replace(",tcp,", ",udp,")]
    path = write(tmp_path, "u.csv", "\n".join([head, *rows]) + "\n")

    with pytest.raises(BadInputError) as info:
        read(path)

    err = info.value
    assert not isinstance(err, PartialInputError) and err.exit_code == 3
    assert (err.line, err.column) == (1, "proto")
    assert str(err) == (
        f"{path}, line 1, column 'proto': header has no 'proto' column, and column "
        "'protocol' holds text where numbers are expected (line 2: expected a "
        "number, found 'tcp'); UNSW-NB15 names its text features proto, service, "
        "state"
    )


def test_a_damaged_number_in_a_unsw_file_without_proto_stays_a_bad_row(tmp_path):
    """Only a column whose every value is text points at a renamed feature; one
    bad value among numbers is damage, named by its row as before."""
    head = "id,dur,sbytes,attack_cat,label"
    path = write(tmp_path, "u.csv", f"{head}\n1,0.5,10,Normal,0\n2,oops,10,DoS,1\n")

    with pytest.raises(PartialInputError) as info:
        read(path)

    assert (info.value.line, info.value.column) == (3, "dur")
    assert str(info.value).endswith("expected a number, found 'oops'")
