"""``flows inspect`` counts describe exactly the rows kept.

Found: the label counts (and the other per-row counts in ``stats``: Infinity/NaN
values, masked Zeek times, Argus records without IP addresses, ``Dir`` values)
were counted over every line read, bad rows and rows after a stop included, while
``rows``, nulls and the time span were counted over the rows kept: a 20-row
UNSW-NB15 file with a bad row 10 said ``rows: 9`` and ``labels: Normal 20``.
Each test checks the library result, ``flows inspect`` text and ``--json``, a
file and standard input, with ``--on-error fail`` and ``skip``.
"""

from __future__ import annotations

import io
import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import main
from flows.errors import PartialInputError
from flows.readers import read
from tests.test_readers import (
    BINET_HEAD,
    JSON_FLOW,
    KDD_ROW,
    LABEL_FIELDS,
    LABEL_TYPES,
    ROW_A,
    ROW_B,
    zeek_text,
)

UNSW_HEAD = "id,dur,proto,service,state,spkts,dpkts,sbytes,dbytes,attack_cat,label"
CIC_HEAD = (
    "Flow ID,Source IP,Source Port,Destination IP,Destination Port,Protocol,"
    "Timestamp,Flow Duration,Total Fwd Packets,Total Backward Packets,"
    "Flow Bytes/s,Label"
)


def unsw_text() -> str:
    """20 rows, all Normal; row 10 (line 11) has spkts 3.5, a bad row."""
    rows = [UNSW_HEAD]
    for i in range(1, 21):
        spkts = "3.5" if i == 10 else "3"
        rows.append(f"{i},0.5,tcp,-,FIN,{spkts},2,100,200,Normal,0")
    return "\n".join(rows) + "\n"


def cic_text() -> str:
    """20 rows: DDoS in every 4th, BENIGN else; row 10 (line 11) has 3.5 forward
    packets (bad); rows 10 and 15 have Flow Bytes/s Infinity (read as null)."""
    rows = [CIC_HEAD]
    for i in range(1, 21):
        fwd = "3.5" if i == 10 else "3"
        rate = "Infinity" if i in (10, 15) else "12.5"
        label = "DDoS" if i % 4 == 0 else "BENIGN"
        rows.append(
            f"f{i},10.0.0.1,{1000 + i},10.0.0.2,80,6,2017-07-07 10:00:{i:02d},500,"
            f"{fwd},2,{rate},{label}"
        )
    return "\n".join(rows) + "\n"


def inspect(capsys, monkeypatch, text: str, tmp_path, name: str, *flags, stdin=False):
    """Run ``flows inspect`` on ``text`` (a file, or standard input); return the
    exit code, the JSON summary and the text output's lines."""
    if stdin:
        source = "-"
    else:
        path = tmp_path / name
        path.write_text(text)
        source = str(path)

    def run(*extra):
        if stdin:
            stream = io.TextIOWrapper(io.BytesIO(text.encode()))
            monkeypatch.setattr(sys, "stdin", stream)
        code = main(["inspect", source, *flags, *extra])
        return code, capsys.readouterr()

    code, done = run("--json")
    text_code, text_done = run()
    assert code == text_code
    assert "Traceback" not in done.err
    return code, json.loads(done.out), text_done.out.splitlines()


def label_lines(lines: list[str]) -> dict[str, int]:
    """The ``labels:`` block of ``flows inspect`` text output."""
    start = lines.index("labels:") + 1
    out = {}
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        key, count = line.split()
        out[key] = int(count)
    return out


@pytest.mark.parametrize("stdin", [False, True], ids=["file", "stdin"])
@pytest.mark.parametrize(
    ("on_error", "code", "rows"), [("fail", 4, 9), ("skip", 0, 19)]
)
def test_unsw_labels_count_the_rows_kept(
    capsys, monkeypatch, tmp_path, stdin, on_error, code, rows
):
    got, summary, lines = inspect(
        capsys, monkeypatch, unsw_text(), tmp_path, "u.csv", "--on-error", on_error,
        stdin=stdin,
    )
    assert got == code
    assert summary["rows"] == rows
    assert summary["labels"] == {"Normal": rows}
    assert summary["label_values"] == {"1": 0, "0": rows, "null": 0}
    assert summary["nulls"] == {"service": rows}
    assert f"rows:     {rows}" in lines
    assert label_lines(lines) == {"Normal": rows}


@pytest.mark.parametrize("stdin", [False, True], ids=["file", "stdin"])
def test_cic_labels_and_non_finite_count_the_rows_kept(
    capsys, monkeypatch, tmp_path, stdin
):
    name = "<stdin>" if stdin else str(tmp_path / "c.csv")
    code, summary, lines = inspect(
        capsys, monkeypatch, cic_text(), tmp_path, "c.csv", stdin=stdin
    )
    # Stopped at row 10: rows 1-9 kept, DDoS in rows 4 and 8, no Infinity.
    assert code == 4 and summary["rows"] == 9
    assert summary["labels"] == {"BENIGN": 7, "DDoS": 2}
    assert summary["stats"]["non_finite"] == 0 and summary["nulls"] == {}
    assert summary["warnings"] == [
        f"{name}: stopped at line 11: expected a whole number >= 0, found 3.5"
    ]
    assert label_lines(lines) == {"BENIGN": 7, "DDoS": 2}
    assert "non_finite: 0" in lines

    code, summary, lines = inspect(
        capsys, monkeypatch, cic_text(), tmp_path, "c.csv", "--on-error", "skip",
        stdin=stdin,
    )
    # Row 10 skipped: 19 rows, DDoS in rows 4, 8, 12, 16, 20; Infinity in row 15.
    assert code == 0 and summary["rows"] == 19
    assert summary["labels"] == {"BENIGN": 14, "DDoS": 5}
    assert summary["stats"]["non_finite"] == 1
    assert summary["nulls"] == {"Flow Bytes/s": 1}
    assert summary["warnings"][0] == (
        f"{name}: 1 Infinity/NaN/empty value(s) in numeric columns read as null"
    )
    assert label_lines(lines) == {"BENIGN": 14, "DDoS": 5}
    assert "non_finite: 1" in lines


MASKED = "XXXXXXXXXX.XXXXXX"


def zeek_labeled() -> str:
    """Four rows: a masked ts in rows 2 and 3; row 3 (line 11) has a bad port."""
    bad = list(ROW_A)
    bad[0], bad[3] = MASKED, "http"
    masked = list(ROW_B)
    masked[0] = MASKED
    rows = [
        ROW_A + ["Malicious", "C&C"],
        masked + ["Benign", "-"],
        bad + ["Background", "-"],
        ROW_B + ["Benign", "-"],
    ]
    return zeek_text(rows, LABEL_FIELDS, LABEL_TYPES)


@pytest.mark.parametrize(
    ("on_error", "code", "labels", "first", "last"),
    [
        ("fail", 4, {"Benign": 1, "Malicious": 1}, float(ROW_A[0]), float(ROW_A[0])),
        ("skip", 0, {"Benign": 2, "Malicious": 1}, float(ROW_A[0]), float(ROW_B[0])),
    ],
)
def test_zeek_tsv_labels_and_masked_ts_count_the_rows_kept(
    capsys, monkeypatch, tmp_path, on_error, code, labels, first, last
):
    got, summary, lines = inspect(
        capsys, monkeypatch, zeek_labeled(), tmp_path, "z.log", "--on-error", on_error
    )
    assert got == code
    assert summary["labels"] == labels
    assert summary["stats"]["masked_ts"] == 1  # row 2's; row 3 is bad
    assert summary["nulls"]["ts"] == 1
    assert (summary["time_span"]["first"], summary["time_span"]["last"]) == (
        first,
        last,
    )
    masked_notes = [w for w in summary["warnings"] if "masked" in w]
    assert masked_notes == [
        f"{tmp_path / 'z.log'}: 1 ts value(s) masked as XXXXXXXXXX.XXXXXX (Zeek "
        "test output) read as null"
    ]
    assert label_lines(lines) == labels


def test_drop_unlabeled_leaves_the_dropped_labels_out_of_the_counts(
    capsys, monkeypatch, tmp_path
):
    rows = [
        ROW_A + ["Malicious", "C&C"],
        ROW_B + ["Benign", "Google"],
        ROW_A + ["Background", "(empty)"],
        ROW_B + ["Malicious", "-"],
    ]
    text = zeek_text(rows, LABEL_FIELDS, LABEL_TYPES)
    code, summary, lines = inspect(
        capsys, monkeypatch, text, tmp_path, "s.log", "--drop-unlabeled"
    )
    assert code == 0 and summary["rows"] == 3
    assert summary["labels"] == {"Malicious": 2, "Benign": 1}
    assert summary["stats"]["dropped_unlabeled"] == 1
    assert label_lines(lines) == {"Malicious": 2, "Benign": 1}


def test_drop_unlabeled_over_several_files_counts_each_file_s_rows_kept(
    capsys, tmp_path
):
    """Found: with --drop-unlabeled over several files, each file's own entry in
    ``stats["files"]`` still counted the Background rows dropped (the combined
    counts were right)."""
    first = tmp_path / "a.log"
    first.write_text(zeek_text(
        [
            ROW_A + ["Malicious", "C&C"],
            ROW_B + ["Background", "-"],
            ROW_A + ["Background", "-"],
        ],
        LABEL_FIELDS,
        LABEL_TYPES,
    ))
    second = tmp_path / "b.log"
    bad = ROW_B[:3] + ["many"] + ROW_B[4:]  # line 10: a bad id.orig_p
    second.write_text(zeek_text(
        [
            ROW_B + ["Benign", "Google"],
            ROW_A + ["Background", "-"],
            bad + ["Benign", "-"],
            ROW_B + ["Malicious", "-"],
        ],
        LABEL_FIELDS,
        LABEL_TYPES,
    ))
    paths = [str(first), str(second)]

    result = read(paths, drop_unlabeled=True, on_error="skip")
    files = result.stats["files"]
    assert [f["labels"] for f in files] == [
        {"Malicious": 1},
        {"Benign": 1, "Malicious": 1},
    ]
    assert [f["dropped_unlabeled"] for f in files] == [2, 1]
    assert result.stats["labels"] == {"Benign": 1, "Malicious": 2}
    assert result.stats["dropped_unlabeled"] == 3

    code = main(["inspect", "--json", "--drop-unlabeled", "--on-error", "skip", *paths])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["rows"] == 3
    assert [f["labels"] for f in summary["stats"]["files"]] == [
        {"Malicious": 1},
        {"Benign": 1, "Malicious": 1},
    ]

    # Stopped at the bad line: the second file's entry counts its rows before it.
    with pytest.raises(PartialInputError) as info:
        read(paths, drop_unlabeled=True)
    kept = info.value.result
    assert kept.table.num_rows == 2
    assert [f["labels"] for f in kept.stats["files"]] == [
        {"Malicious": 1},
        {"Benign": 1},
    ]
    assert kept.stats["labels"] == {"Benign": 1, "Malicious": 1}


@pytest.mark.parametrize("stdin", [False, True], ids=["file", "stdin"])
def test_zeek_json_labels_count_the_rows_kept(capsys, monkeypatch, tmp_path, stdin):
    objs = [
        dict(JSON_FLOW, label="Malicious"),
        dict(JSON_FLOW, label="Benign", **{"id.orig_p": "one"}),  # bad: line 2
        dict(JSON_FLOW, label="Weird"),  # bad: an unknown label, line 3
        dict(JSON_FLOW, label="Benign"),
    ]
    text = "".join(json.dumps(o) + "\n" for o in objs)
    code, summary, lines = inspect(
        capsys, monkeypatch, text, tmp_path, "j.log", stdin=stdin
    )
    assert (code, summary["rows"]) == (4, 1)
    assert summary["labels"] == {"Malicious": 1}
    assert label_lines(lines) == {"Malicious": 1}
    code, summary, lines = inspect(
        capsys, monkeypatch, text, tmp_path, "j.log", "--on-error", "skip",
        stdin=stdin,
    )
    assert (code, summary["rows"]) == (0, 2)
    assert summary["labels"] == {"Benign": 1, "Malicious": 1}
    assert label_lines(lines) == {"Benign": 1, "Malicious": 1}


def binet_text() -> str:
    """Five rows; row 3 (line 4) has a negative Dur; rows 2 and 4 are Argus
    management records (no IP addresses); row 4's label no CTU rule knows."""
    rows = [
        "2011/08/10 09:46:53.000000,1.0,tcp,1.1.1.1,1027,   ->,2.2.2.2,80,"
        "S_RA,0,0,4,244,124,2,flow=From-Botnet-V42-TCP-Attempt",
        "2011/08/10 09:46:54.000000,0,man,0,,   ->,0,,INT,,,1,60,60,1,"
        "flow=Background",
        "2011/08/10 09:46:55.000000,-1,udp,1.1.1.1,53,  <->,2.2.2.2,53,"
        "CON,0,0,2,180,90,1,flow=To-Normal-V42-UDP-DNS",
        "2011/08/10 09:46:56.000000,0,man,0,,  <-,0,,INT,,,1,60,60,1,"
        "flow=TCP-Established-To-Microsoft-7",
        "2011/08/10 09:46:57.000000,0.5,udp,1.1.1.1,54,  <->,2.2.2.2,53,"
        "CON,0,0,2,180,90,1,flow=To-Normal-V42-UDP-DNS",
    ]
    return BINET_HEAD + "\n" + "\n".join(rows) + "\n"


def test_binetflow_counts_the_rows_kept(capsys, monkeypatch, tmp_path):
    path = tmp_path / "c.binetflow"
    code, summary, lines = inspect(
        capsys, monkeypatch, binet_text(), tmp_path, "c.binetflow"
    )
    assert (code, summary["rows"]) == (4, 2)
    assert summary["labels"] == {
        "flow=Background": 1,
        "flow=From-Botnet-V42-TCP-Attempt": 1,
    }
    assert summary["stats"]["non_ip"] == 1
    assert summary["stats"]["dir"] == {"->": 2}
    assert summary["warnings"] == [
        f"{path}: 1 Argus record(s) without IP addresses (management records, "
        "layer-2 flows with MAC addresses; the first at line 3) read with null "
        "src_ip/dst_ip",
        f"{path}: stopped at line 4: expected a number >= 0, found -1",
    ]
    assert "non_ip: 1" in lines and "dir: ->=2" in lines

    code, summary, lines = inspect(
        capsys, monkeypatch, binet_text(), tmp_path, "c.binetflow", "--on-error",
        "skip",
    )
    assert (code, summary["rows"]) == (0, 4)
    assert summary["labels"] == {
        "flow=To-Normal-V42-UDP-DNS": 1,
        "flow=Background": 1,
        "flow=From-Botnet-V42-TCP-Attempt": 1,
        "flow=TCP-Established-To-Microsoft-7": 1,
    }
    assert summary["stats"]["non_ip"] == 2
    assert summary["stats"]["dir"] == {"->": 2, "<-": 1, "<->": 1}
    assert summary["warnings"][:2] == [
        f"{path}: 2 Argus record(s) without IP addresses (management records, "
        "layer-2 flows with MAC addresses; the first at line 3) read with null "
        "src_ip/dst_ip",
        f"{path}: 1 row(s) carry CTU labels that name neither Botnet/Malware, "
        "Normal nor Background; their label is null: "
        "flow=TCP-Established-To-Microsoft-7",
    ]


def test_nsl_kdd_labels_and_unknown_names_count_the_rows_kept(tmp_path):
    bad = KDD_ROW.replace("0,tcp,", "x,tcp,", 1)
    lines = [
        f"{KDD_ROW},normal,21",
        f"{KDD_ROW},neptune,20",
        f"{bad},neptune,20",  # line 3: a bad duration
        f"{KDD_ROW},madeup,5",  # an attack name outside the family map
    ]
    path = tmp_path / "k.txt"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PartialInputError) as info:
        read(path)
    kept = info.value.result
    assert kept.stats["labels"] == {"neptune": 1, "normal": 1}
    assert kept.warnings == [
        f"{path}: stopped at line 3: expected an integer, found 'x'"
    ]
    skipped = read(path, on_error="skip")
    assert skipped.stats["labels"] == {"madeup": 1, "neptune": 1, "normal": 1}
    assert skipped.warnings[0] == (
        f"{path}: attack names outside the family map (family null): madeup"
    )


def test_parquet_labels_count_the_rows_kept(tmp_path):
    rows = [ROW_A + ["Malicious", "C&C"], ROW_B + ["Benign", "-"]] * 2
    log = tmp_path / "s.log"
    log.write_text(zeek_text(rows, LABEL_FIELDS, LABEL_TYPES))
    table = read(log).table
    ports = table.column("src_port").to_pylist()
    ports[1] = -1  # row 2: a port below 0, a bad row
    table = table.set_column(
        table.schema.get_field_index("src_port"), "src_port", pa.array(ports)
    )
    path = tmp_path / "s.parquet"
    pq.write_table(table, path)
    with pytest.raises(PartialInputError) as info:
        read(path)
    assert info.value.result.stats["labels"] == {"C&C": 1}
    skipped = read(path, on_error="skip")
    assert skipped.table.num_rows == 3
    assert skipped.stats["labels"] == {"C&C": 2, "Benign": 1}


def test_several_files_add_up_the_rows_kept(tmp_path):
    good = tmp_path / "a.csv"
    good.write_text(unsw_text().replace(",3.5,", ",3,"))
    bad = tmp_path / "b.csv"
    bad.write_text(unsw_text())
    result = read([good, bad], on_error="skip")
    assert result.table.num_rows == 39
    assert result.stats["labels"] == {"Normal": 39}
    with pytest.raises(PartialInputError) as info:
        read([good, bad])
    assert info.value.result.table.num_rows == 29
    assert info.value.result.stats["labels"] == {"Normal": 29}
