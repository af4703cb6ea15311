"""Property test: any canonical records survive conn.log and Parquet unchanged."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.readers import iter_records, read, write_conn_log, write_parquet
from flows.record import columns_to_table

text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), max_codepoint=0x2FF),
    max_size=12,
)
count = st.one_of(st.none(), st.integers(min_value=0, max_value=2**53))
seconds = st.one_of(
    st.none(),
    st.floats(min_value=0, max_value=2e9, allow_nan=False).filter(math.isfinite),
)
label = st.sampled_from(
    [(1, "C&C"), (0, "Benign"), (None, "Background"), (None, None), (1, "Malicious")]
)


@st.composite
def records(draw):
    rows = []
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        lab, detail = draw(label)
        rows.append(
            {
                "ts": draw(st.floats(min_value=0, max_value=2e9, allow_nan=False)),
                "uid": draw(st.one_of(st.none(), text)),
                "src_ip": draw(st.ip_addresses().map(str)),
                "src_port": draw(st.integers(min_value=0, max_value=65535)),
                "dst_ip": draw(st.ip_addresses().map(str)),
                "dst_port": draw(st.integers(min_value=0, max_value=65535)),
                "proto": draw(st.sampled_from(["tcp", "udp", "icmp"])),
                "service": draw(st.one_of(st.none(), text)),
                "duration": draw(seconds),
                "orig_bytes": draw(count),
                "resp_bytes": draw(count),
                "orig_pkts": draw(count),
                "resp_pkts": draw(count),
                "orig_ip_bytes": draw(count),
                "resp_ip_bytes": draw(count),
                "conn_state": draw(st.one_of(st.none(), text)),
                "history": draw(st.one_of(st.none(), text)),
                "missed_bytes": draw(count),
                "label": lab,
                "label_detail": detail,
            }
        )
    return rows


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(rows=records())
def test_conn_log_and_parquet_round_trip(tmp_path_factory, rows):
    folder = tmp_path_factory.mktemp("rt")
    table = columns_to_table({k: [r[k] for r in rows] for k in rows[0]})

    write_conn_log(table, folder / "c.log")
    back = read(folder / "c.log")
    assert back.table.to_pylist() == rows
    assert list(iter_records(folder / "c.log")) == rows

    write_parquet(table, folder / "c.parquet")
    assert read(folder / "c.parquet").table.equals(table)


@pytest.mark.parametrize("value", ["-", "(empty)", "", "a\tb", "back\\slash", "\\x41"])
def test_awkward_strings_round_trip(tmp_path, value):
    rows = [
        {
            "ts": 1.0,
            "src_ip": "10.0.0.1",
            "src_port": 1,
            "dst_ip": "10.0.0.2",
            "dst_port": 2,
            "proto": "tcp",
            "history": value,
            "service": value,
        }
    ]
    table = columns_to_table({k: [r[k] for r in rows] for k in rows[0]})
    write_conn_log(table, tmp_path / "c.log")
    rec = read(tmp_path / "c.log").table.to_pylist()[0]
    assert rec["history"] == value and rec["service"] == value


def _zeek_json(rows, omit):
    """Zeek-style JSON lines for canonical rows, leaving out null values' keys."""
    import json

    from flows.readers.zeek import CANON_TO_ZEEK

    lines = []
    for row in rows:
        obj = {}
        for canon, value in row.items():
            if canon in ("label", "label_detail"):
                continue
            if value is None and omit:
                continue
            obj[CANON_TO_ZEEK[canon]] = value
        if row["label"] is not None or row["label_detail"] is not None:
            obj["label"] = {1: "Malicious", 0: "Benign", None: "Background"}[
                row["label"]
            ]
            obj["detailed-label"] = row["label_detail"] or "-"
        lines.append(json.dumps(obj))
    return ("\n".join(lines) + "\n").encode()


@settings(max_examples=40, deadline=None)
@given(rows=records(), omit=st.booleans())
def test_json_fast_path_equals_line_path(rows, omit):
    from flows.readers._source import Source
    from flows.readers.zeek import _read_json_fast, _read_json_lines

    for row in rows:
        row["ts"] = row["ts"] if row["ts"] < 1e11 else 1.0
    src = Source("mem.json", _zeek_json(rows, omit))
    fast = _read_json_fast(src)
    slow = _read_json_lines(src, "fail")
    assert fast is not None
    assert fast[0].to_pylist() == slow.table.to_pylist()
    assert fast[1] == slow.stats
