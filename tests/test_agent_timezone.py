"""``edge-agent run``/``calibrate --timezone``: the zone of file times without one.

Found: the agent had no ``--timezone`` (``flows``, ``teacher`` and ``compress``
have one), so an Argus binetflow file read through ``zeek:`` and a Parquet ``ts``
held as a timestamp without a zone were always taken as UTC. The expected times
use fixed offsets: Prague is UTC+1 in January and UTC+2 in August.
"""

from __future__ import annotations

import calendar
import json
from fractions import Fraction
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from edge_agent.cli import main
from edge_agent.sources import open_source
from flows.record import conn_schema
from tests.test_readers import BINET_HEAD

PRAGUE = "Europe/Prague"
# Wall-clock times (as UTC tuples of the same digits), nanoseconds, Prague offset.
TIMES = [
    ((2011, 1, 10, 9, 46, 53), 250_000_000, 1),
    ((2011, 8, 10, 9, 46, 53), 500_000_001, 2),
]
UNKNOWN = (
    "unknown time zone 'Mars/Tharsis': expected an IANA name such as "
    "Europe/Prague or America/New_York, or UTC"
)


def _wall(when) -> int:
    return calendar.timegm((*when, 0, 0, 0))


def _expected(in_prague: bool) -> list[float]:
    return [
        float(Fraction(_wall(when)) + Fraction(nanos, 10**9)
              - (hours * 3600 if in_prague else 0))
        for when, nanos, hours in TIMES
    ]


def _naive_parquet(path: Path) -> Path:
    """Canonical conn records whose ``ts`` is a timestamp[ns] without a zone."""
    n = len(TIMES)
    columns = {field.name: pa.nulls(n, field.type) for field in conn_schema()}
    columns.update(
        ts=pa.array([_wall(w) * 10**9 + ns for w, ns, _ in TIMES],
                    pa.timestamp("ns")),
        src_ip=pa.array(["10.0.0.1"] * n), src_port=pa.array([40000, 40001]),
        dst_ip=pa.array(["10.0.0.2"] * n), dst_port=pa.array([80, 80]),
        proto=pa.array(["tcp"] * n), duration=pa.array([1.0, 1.0]),
    )
    pq.write_table(pa.table(columns), path)
    return path


def _binetflow(path: Path) -> Path:
    rows = [
        f"{w[0]}/{w[1]:02d}/{w[2]:02d} {w[3]:02d}:{w[4]:02d}:{w[5]:02d}."
        f"{ns:09d},1,tcp,10.0.0.1,1027,   ->,10.0.0.2,80,S_RA,0,0,4,244,124,2,"
        "flow=From-Normal"
        for w, ns, _ in TIMES
    ]
    path.write_text("\n".join([BINET_HEAD, *rows]) + "\n")
    return path


@pytest.mark.parametrize("make, kind", [(_naive_parquet, "parquet"),
                                        (_binetflow, "zeek")])
def test_a_file_source_reads_times_without_a_zone_in_the_given_zone(
    tmp_path, make, kind
):
    path = make(tmp_path / f"flows.{kind}")

    utc = [rec["ts"] for rec in open_source(f"{kind}:{path}")]
    prague = [rec["ts"] for rec in open_source(f"{kind}:{path}", timezone=PRAGUE)]

    assert utc == pytest.approx(_expected(False), abs=1e-6)
    assert prague == pytest.approx(_expected(True), abs=1e-6)
    if kind == "parquet":  # nanoseconds: every digit the float holds
        assert (utc, prague) == (_expected(False), _expected(True))


def test_run_reads_the_source_in_the_zone_of_its_flag(
    tmp_path, tmp_path_factory, capsys, data_dir
):
    """End to end: thresholds of 0 make every flow an alert, whose line holds
    the flow's ts as the agent read it."""
    pytest.importorskip("onnxruntime")
    from tests.test_agent_fixtures import tiny

    tm = tiny(data_dir, tmp_path_factory)
    thresholds = tmp_path / "all-alert.json"
    thresholds.write_text(json.dumps(
        {"escalate_low": 0.0, "decision": 0.0, "alert": 0.0}))
    alerts = tmp_path / "alerts.jsonl"
    source = _naive_parquet(tmp_path / "flows.parquet")

    code = main([
        "run", "--artifact", str(tm.artifact), "--source", f"parquet:{source}",
        "--site", "s1", "--gateway", "g1", "--outbox", str(tmp_path / "o.db"),
        "--alerts", str(alerts), "--thresholds", str(thresholds),
        "--timezone", PRAGUE,
    ])

    err = capsys.readouterr().err
    assert code == 0, err
    lines = [json.loads(line) for line in alerts.read_text().splitlines()]
    assert sorted(line["ts"] for line in lines if line["kind"] == "alert") == (
        _expected(True))


def test_an_unknown_zone_is_a_usage_error_as_flag_and_in_the_config(
    tmp_path, capsys
):
    for command in (["run", "--source", "-"], ["calibrate", "--source", "-",
                                               "--target-fpr", "0.1"]):
        with pytest.raises(SystemExit) as info:
            main([*command, "--artifact", "a", "--timezone", "Mars/Tharsis"])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert f"error: argument --timezone: {UNKNOWN}" in err

    config = tmp_path / "agent.toml"
    config.write_text('timezone = "Mars/Tharsis"\n')
    code = main(["run", "--config", str(config), "--artifact", "a", "--source",
                 "-", "--site", "s1", "--gateway", "g1"])
    assert code == 2
    assert capsys.readouterr().err == (
        f"error: timezone in config {config}: {UNKNOWN}\n")


def test_calibrate_passes_its_zone_to_the_source(tmp_path, monkeypatch):
    import edge_agent.cli as cli
    import edge_agent.runtime as runtime
    import edge_agent.sources as sources

    seen = []

    class Stop(Exception):
        pass

    def fake_open(spec, **kwargs):
        seen.append((spec, kwargs))
        raise Stop

    monkeypatch.setattr(runtime, "load_artifact", lambda path: None)
    monkeypatch.setattr(sources, "open_source", fake_open)
    for given, zone in (([], "UTC"), (["--timezone", PRAGUE], PRAGUE)):
        with pytest.raises(Stop):
            cli.main(["calibrate", "--artifact", "a", "--source", "zeek:x.log",
                      "--target-fpr", "0.1", *given])
        assert seen.pop() == ("zeek:x.log", {"timezone": zone})
