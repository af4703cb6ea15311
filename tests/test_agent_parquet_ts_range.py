"""The agent's ``parquet:`` source refuses a ``ts`` that ``flows`` refuses.

Found: a Parquet file whose timestamp column held -1 s, -2**63 us or 2**62 ms was
scored by ``edge-agent run`` (exit 0, alerts with ``"ts": -9223372036854.775``) and
taken by ``calibrate``, while ``flows inspect`` on the same file exits 4 naming the
row (``row 6, column 'ts': expected a time in epoch seconds >= 0 (1970 or
later)``). Now the source applies the same check (``flows.record.time_problem``)
and handles the row as it does any other bad row: the read stops there, the rows
before it are scored, the row is named, exit 4 (3 when no flow came before it);
calibrate sets its thresholds from the flows before the bad row and exits 4, or,
with fewer than it needs before it, refuses the file (exit 3, nothing written).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from edge_agent.cli import main  # noqa: E402
from edge_agent.sources import open_source  # noqa: E402
from flows.errors import BadInputError  # noqa: E402
from flows.record import CONN_FIELD_NAMES  # noqa: E402
from tests.test_ota_artifacts import (  # noqa: E402
    conn_records,
    fit_conn_encoder,
    make_artifact,
)

BEFORE_1970 = "expected a time in epoch seconds >= 0 (1970 or later)"
PAST_9999 = "expected a time in epoch seconds below 253402300800 (before the year"
BAD_ROW = 6

# ts column type, the bad row's raw value, what flows and the agent say of it.
CASES = {
    "-1 s (float seconds)": (pa.float64(), -1.0, BEFORE_1970),
    "-1 s (integer seconds)": (pa.int64(), -1, BEFORE_1970),
    "-1 s (timestamp[s])": (pa.timestamp("s"), -1, BEFORE_1970),
    "-2**63 us (timestamp[us])": (pa.timestamp("us"), -(2**63), BEFORE_1970),
    "2**62 ms (timestamp[ms], UTC)": (
        pa.timestamp("ms", tz="UTC"), 2**62, PAST_9999),
    "the year 10000 (float seconds)": (pa.float64(), 253402300800.0, PAST_9999),
}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """A conn artifact that escalates or alerts on every flow (so each scored flow
    shows in the alerts file or the outbox)."""
    return make_artifact(
        tmp_path_factory.mktemp("art") / "art",
        version="tiny-ts",
        encoder=fit_conn_encoder(),
        thresholds={"decision": 0.0, "escalate_low": 0.0, "alert": 0.0},
    )


def _write(path: Path, records: list[dict], ts_type, bad_row: int, bad) -> Path:
    """``records`` as a Parquet file whose ``ts`` column is of ``ts_type`` and
    holds ``bad`` (a raw value of that type) at row ``bad_row`` (from 1)."""
    raw = [int(r["ts"]) if not pa.types.is_floating(ts_type) else r["ts"]
           for r in records]
    if pa.types.is_timestamp(ts_type):
        scale = {"s": 1, "ms": 1000, "us": 10**6, "ns": 10**9}[ts_type.unit]
        raw = [int(r["ts"]) * scale for r in records]
    raw[bad_row - 1] = bad
    columns = {}
    for name in CONN_FIELD_NAMES:
        if name == "ts":
            storage = pa.float64() if pa.types.is_floating(ts_type) else pa.int64()
            columns[name] = pa.array(raw, storage).cast(ts_type)
        else:
            columns[name] = pa.array([r[name] for r in records])
    pq.write_table(pa.table(columns), path)
    return path


def _flows_says(path: Path, capsys) -> tuple[int, str]:
    from flows.cli import main as flows_main

    rc = flows_main(["inspect", str(path)])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case", list(CASES))
def test_the_source_stops_at_the_row_flows_refuses(case, tmp_path, capsys):
    ts_type, bad, said = CASES[case]
    path = _write(tmp_path / "f.parquet", conn_records(10), ts_type, BAD_ROW, bad)

    rc, flows_err = _flows_says(path, capsys)
    assert rc == 4, flows_err
    assert f"row {BAD_ROW}, column 'ts': {said}" in flows_err

    src = open_source(f"parquet:{path}")
    got = []
    with pytest.raises(BadInputError) as caught:
        got.extend(rec["uid"] for rec in src)
    assert got == [f"C0x{i}" for i in range(BAD_ROW - 1)]
    assert str(caught.value).startswith(f"{path}, row {BAD_ROW}: field 'ts': {said}")
    # The same words as flows for the value found.
    assert flows_err.split("column 'ts': ", 1)[1].split(";")[0].strip() in str(
        caught.value)


def _run(artifact: Path, tmp_path: Path, path: Path) -> tuple[int, list[dict], dict]:
    alerts = tmp_path / "alerts.jsonl"
    summary = tmp_path / "summary.json"
    rc = main([
        "run", "--artifact", str(artifact), "--source", f"parquet:{path}",
        "--site", "s1", "--gateway", "g1", "--outbox", str(tmp_path / "o.db"),
        "--alerts", str(alerts), "--summary-json", str(summary),
    ])
    lines = [json.loads(x) for x in alerts.read_text().splitlines()] if (
        alerts.exists()) else []
    return rc, lines, json.loads(summary.read_text()) if summary.exists() else {}


@pytest.mark.parametrize("case", list(CASES))
def test_run_scores_the_rows_before_and_exits_4(case, artifact, tmp_path, capsys):
    ts_type, bad, said = CASES[case]
    records = conn_records(10)
    path = _write(tmp_path / "f.parquet", records, ts_type, BAD_ROW, bad)

    rc, alerts, summary = _run(artifact, tmp_path, path)

    err = capsys.readouterr().err
    assert rc == 4, err
    assert f"error: {path}, row {BAD_ROW}: field 'ts': {said}" in err
    assert "Traceback" not in err
    assert summary["flows"] == BAD_ROW - 1
    assert alerts and all(0 <= line["ts"] < 253402300800 for line in alerts)
    # Every alert is one of the rows before the bad one, by its time.
    assert {line["ts"] for line in alerts} <= {r["ts"] for r in records[: BAD_ROW - 1]}


def test_run_with_the_bad_row_first_reads_no_flow_and_exits_3(
    artifact, tmp_path, capsys
):
    path = _write(tmp_path / "f.parquet", conn_records(10), pa.timestamp("us"),
                  1, -(2**63))

    rc, alerts, summary = _run(artifact, tmp_path, path)

    err = capsys.readouterr().err
    assert rc == 3, err
    assert f"error: {path}, row 1: field 'ts': {BEFORE_1970}" in err
    assert alerts == [] and summary.get("flows", 0) == 0


@pytest.mark.parametrize("case", ["-1 s (integer seconds)",
                                  "-2**63 us (timestamp[us])",
                                  "2**62 ms (timestamp[ms], UTC)"])
def test_calibrate_keeps_the_flows_before_a_bad_row(
    case, artifact, tmp_path, capsys
):
    ts_type, bad, said = CASES[case]
    records = conn_records(300)
    for rec in records:
        rec["label"] = 0
    path = _write(tmp_path / "f.parquet", records, ts_type, 250, bad)
    out = tmp_path / "site.json"

    rc = main(["calibrate", "--artifact", str(artifact), "--source",
               f"parquet:{path}", "--target-fpr", "0.01", "--out", str(out)])

    err = capsys.readouterr().err
    assert rc == 4, err
    assert f"error: {path}, row 250: field 'ts': {said}" in err
    assert err.endswith("; the thresholds were set from the 249 flows read before "
                        "it\n")
    assert json.loads(out.read_text())["flows"] == 249
    out.unlink()

    # Too few flows before the bad row: the file is refused, nothing written.
    early = _write(tmp_path / "early.parquet", records, ts_type, 50, bad)
    rc = main(["calibrate", "--artifact", str(artifact), "--source",
               f"parquet:{early}", "--target-fpr", "0.01", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert f"error: {early}, row 50: field 'ts': {said}" in err
    assert not out.exists()

    # The same file with the row's time in range is calibrated on.
    good = _write(tmp_path / "good.parquet", records, ts_type, 250,
                  _write_value(ts_type, records[249]["ts"]))
    rc = main(["calibrate", "--artifact", str(artifact), "--source",
               f"parquet:{good}", "--target-fpr", "0.01", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["flows"] == 300


def _write_value(ts_type, seconds: float):
    """``seconds`` as the raw value of a ``ts_type`` column."""
    if pa.types.is_timestamp(ts_type):
        scale = {"s": 1, "ms": 1000, "us": 10**6, "ns": 10**9}[ts_type.unit]
        return int(seconds) * scale
    return seconds if pa.types.is_floating(ts_type) else int(seconds)


def test_stdin_refuses_the_same_times():
    """The stdin source applies the same check to a canonical record (a Zeek
    JSON line was already refused by its reader): the line is rejected, counted,
    and the source goes on, as for any other bad value."""
    import io

    records = conn_records(8)
    records[2]["ts"] = -1
    records[5]["ts"] = 2.0**62
    text = "".join(json.dumps(r) + "\n" for r in records)
    src = open_source("-", stdin=io.StringIO(text))
    got = [rec["uid"] for rec in src]
    assert got == [r["uid"] for i, r in enumerate(records) if i not in (2, 5)]
    assert src.rejected == {"bad_value": 2}
    assert src.first_rejected == (
        f"line 3: bad_value: field 'ts': {BEFORE_1970}, found -1")
