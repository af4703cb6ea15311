"""Readers on the real files of the shared data folder, with their published counts."""

from __future__ import annotations

import pytest

from flows.readers import iter_records, read, write_conn_log, write_parquet
from tests.conftest import data_file

pytestmark = pytest.mark.data


@pytest.mark.parametrize(
    "rel, fmt, rows",
    [
        ("nsl-kdd/KDDTest+.txt", "nsl-kdd", 22544),
        ("nsl-kdd/KDDTrain+.txt.gz", "nsl-kdd", 125973),
        ("nsl-kdd/KDDTrain+_20Percent.txt", "nsl-kdd", 25192),
        ("zeek-conn/ctu50-normal-40-day1.conn.log.labeled", "zeek-tsv", 5663),
        (
            "zeek-conn/ctu-malware-botnet-230-1-njrat-first1000.conn.log.labeled",
            "zeek-tsv",
            992,
        ),
        ("zeek-conn/android-mischief-rat01-androidtester.conn.log", "zeek-tsv", 361),
        ("zeek-conn/nmap-portscans.conn.json.log", "zeek-json", 4504),
        ("unsw-nb15/UNSW_NB15_training-set.csv.gz", "unsw-nb15", 82332),
        ("binetflow/test5-mixed.binetflow", "binetflow", 300),
        ("binetflow/test11-portscan.binetflow", "binetflow", 66),
        ("binetflow/test4-malicious.binetflow", "binetflow", 394),
    ],
)
def test_row_counts(data_dir, rel, fmt, rows):
    result = read(data_file(data_dir, rel))
    assert result.format == fmt
    assert result.table.num_rows == rows
    assert result.skipped == 0 and not result.partial


def test_nsl_kdd_test_labels(data_dir):
    result = read(data_file(data_dir, "nsl-kdd/KDDTest+.txt"))
    labels = result.stats["labels"]
    assert len(labels) == 38 and labels["normal"] == 9711 and labels["mscan"] == 996
    t = result.table
    assert t.column("label").to_pylist().count(0) == 9711
    assert t.column("attack_family").null_count == 0
    assert max(t.column("difficulty").to_pylist()) == 21


def test_ctu50_labels(data_dir):
    path = data_file(data_dir, "zeek-conn/ctu50-normal-40-day1.conn.log.labeled")
    result = read(path)
    assert result.stats["labels"] == {
        "Malicious": 4201,
        "Benign": 1402,
        "Background": 60,
    }
    labels = result.table.column("label").to_pylist()
    assert (labels.count(1), labels.count(0), labels.count(None)) == (4201, 1402, 60)
    assert read(path, drop_unlabeled=True).table.num_rows == 5603


def test_njrat_relative_ts_and_ipv6(data_dir):
    path = data_file(
        data_dir, "zeek-conn/ctu-malware-botnet-230-1-njrat-first1000.conn.log.labeled"
    )
    result = read(path)
    assert result.stats["labels"] == {"Background": 739, "Malicious": 244, "Benign": 9}
    first = result.table.slice(0, 1).to_pylist()[0]
    assert first["ts"] == 19.981745 and ":" in first["src_ip"]


def test_nmap_json_conn_states(data_dir):
    result = read(data_file(data_dir, "zeek-conn/nmap-portscans.conn.json.log"))
    states = result.table.column("conn_state").to_pylist()
    assert states.count("S0") == 2409 and states.count("REJ") == 1273
    assert states.count("OTH") == 652
    assert set(result.table.column("src_ip").to_pylist()) >= {"172.16.1.11"}


def test_unsw_attack_categories(data_dir):
    result = read(data_file(data_dir, "unsw-nb15/UNSW_NB15_training-set.csv.gz"))
    assert result.stats["labels"]["Normal"] == 37000
    assert result.stats["labels"]["Worms"] == 44
    assert result.table.column("label").to_pylist().count(1) == 45332
    assert "id" not in result.table.column_names


def test_conn_log_parquet_records_round_trip(data_dir, tmp_path):
    path = data_file(data_dir, "zeek-conn/ctu50-normal-40-day1.conn.log.labeled")
    original = read(path).table
    write_parquet(original, tmp_path / "c.parquet")
    assert list(iter_records(tmp_path / "c.parquet")) == original.to_pylist()
    assert list(iter_records(path)) == original.to_pylist()
    write_conn_log(original, tmp_path / "c.log")
    assert read(tmp_path / "c.log").table.equals(original)


def test_json_stream_matches_batch(data_dir):
    path = data_file(data_dir, "zeek-conn/nmap-portscans.conn.json.log")
    assert list(iter_records(path)) == read(path).table.to_pylist()


def test_capture_is_read_by_the_flow_meter(data_dir):
    pytest.importorskip("flows.meter", reason="the flow meter is not installed")
    result = read(data_file(data_dir, "pcap/tcp_syn.pcap"))
    assert result.format == "pcap" and result.family == "conn"
    assert result.table.num_rows == 1 and result.stats["packets"] == 1
    rec = result.table.to_pylist()[0]
    assert rec["proto"] == "tcp" and rec["orig_pkts"] == 1 and rec["label"] is None


def test_ctu50_values_match_a_plain_split(data_dir):
    """Every numeric column against an independent parse with str.split."""
    path = data_file(data_dir, "zeek-conn/ctu50-normal-40-day1.conn.log.labeled")
    lines = path.read_text().splitlines()
    fields = next(ln for ln in lines if ln.startswith("#fields")).split("\t")[1:]
    rows = [ln.split("\t") for ln in lines if not ln.startswith("#")]
    table = read(path).table
    pairs = {
        "duration": "duration",
        "orig_bytes": "orig_bytes",
        "resp_ip_bytes": "resp_ip_bytes",
        "id.resp_p": "dst_port",
        "missed_bytes": "missed_bytes",
        "ts": "ts",
    }
    for zeek, canon in pairs.items():
        i = fields.index(zeek)
        texts = [r[i] for r in rows]
        got = table.column(canon).to_pylist()
        assert got.count(None) == texts.count("-"), zeek
        assert sum(v for v in got if v is not None) == pytest.approx(
            sum(float(t) for t in texts if t != "-"), rel=1e-12
        ), zeek
    i = fields.index("service")
    assert table.column("service").to_pylist() == [
        None if r[i] == "-" else r[i] for r in rows
    ]


def test_nmap_json_values_match_json_module(data_dir):
    import json

    path = data_file(data_dir, "zeek-conn/nmap-portscans.conn.json.log")
    objs = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    table = read(path).table
    assert table.column("ts").to_pylist() == [o["ts"] for o in objs]
    assert table.column("orig_bytes").to_pylist() == [o.get("orig_bytes") for o in objs]
    assert table.column("dst_port").to_pylist() == [o["id.resp_p"] for o in objs]


def test_kdd_train_sums_match_csv_module(data_dir):
    import csv
    import gzip

    path = data_file(data_dir, "nsl-kdd/KDDTrain+.txt.gz")
    with gzip.open(path, "rt") as fh:
        rows = list(csv.reader(fh))
    table = read(path).table
    assert sum(table.column("src_bytes").to_pylist()) == sum(int(r[4]) for r in rows)
    assert sum(table.column("serror_rate").to_pylist()) == pytest.approx(
        sum(float(r[24]) for r in rows)
    )
    assert table.column("difficulty").to_pylist() == [int(r[42]) for r in rows]
