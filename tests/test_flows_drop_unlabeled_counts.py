"""With ``--drop-unlabeled`` the per-row counts describe the rows kept, not the dropped.

Found: the label counts left the dropped rows out, but the reader's other per-row
counts (``masked_ts``, ``non_ip``, ``dir``, ``non_finite``) and the warnings that
state them still counted the rows ``--drop-unlabeled`` then left out. In each file
here the rows dropped are the ones those counts would pick out.
"""

from __future__ import annotations

import pytest

from flows.errors import PartialInputError
from flows.readers import read
from tests.test_flows_inspect_counts import CIC_HEAD, MASKED, binet_text, inspect
from tests.test_readers import LABEL_FIELDS, LABEL_TYPES, ROW_A, ROW_B, zeek_text


def test_binetflow_non_ip_and_dir_count_the_labeled_rows_only(
    capsys, monkeypatch, tmp_path
):
    # Rows 2 and 4 (management records, Dir "->" and "<-") have null labels;
    # row 3 is bad and skipped; rows 1 ("->") and 5 ("<->") are kept.
    code, summary, lines = inspect(
        capsys,
        monkeypatch,
        binet_text(),
        tmp_path,
        "c.binetflow",
        "--on-error",
        "skip",
        "--drop-unlabeled",
    )

    assert (code, summary["rows"]) == (0, 2)
    stats = summary["stats"]
    assert stats["dropped_unlabeled"] == 2
    assert stats["non_ip"] == 0
    assert stats["dir"] == {"->": 1, "<->": 1}
    assert not [w for w in summary["warnings"] if "without IP addresses" in w]
    assert not [w for w in summary["warnings"] if "CTU labels" in w]
    assert len(summary["warnings"]) == 1 and "skipped 1 bad" in summary["warnings"][0]
    assert "non_ip: 0" in lines and "dir: ->=1, <->=1" in lines


def test_binetflow_counts_after_a_stop_and_a_drop(tmp_path):
    """Stopped at the bad line 4, then the Background row 2 dropped: row 1 stays."""
    path = tmp_path / "c.binetflow"
    path.write_text(binet_text())

    with pytest.raises(PartialInputError) as info:
        read(path, drop_unlabeled=True)

    kept = info.value.result
    assert kept.table.num_rows == 1
    assert kept.stats["non_ip"] == 0 and kept.stats["dir"] == {"->": 1}
    assert kept.warnings == [
        f"{path}: stopped at line 4: expected a number >= 0, found -1"
    ]


def _zeek_masked_background(name_rows: int) -> str:
    """Zeek TSV rows: a Malicious row, then ``name_rows`` Background rows whose ts
    is masked, then a Benign row."""
    masked = list(ROW_B)
    masked[0] = MASKED
    rows = [ROW_A + ["Malicious", "C&C"]]
    rows += [masked + ["Background", "-"]] * name_rows
    rows += [ROW_B + ["Benign", "-"]]
    return zeek_text(rows, LABEL_FIELDS, LABEL_TYPES)


def test_zeek_masked_ts_counts_the_labeled_rows_only(capsys, monkeypatch, tmp_path):
    code, summary, lines = inspect(
        capsys,
        monkeypatch,
        _zeek_masked_background(2),
        tmp_path,
        "z.log",
        "--drop-unlabeled",
    )

    assert (code, summary["rows"]) == (0, 2)
    assert summary["stats"]["masked_ts"] == 0
    assert summary["stats"]["dropped_unlabeled"] == 2
    assert summary["warnings"] == []
    assert "masked_ts: 0" in lines


def test_each_file_of_several_counts_its_own_rows_kept(tmp_path):
    one = tmp_path / "a.log"
    one.write_text(_zeek_masked_background(1))
    two = tmp_path / "b.log"
    masked = list(ROW_A)
    masked[0] = MASKED
    two.write_text(
        zeek_text(
            [
                masked + ["Malicious", "-"],  # kept: its masked ts still counts
                masked + ["Background", "-"],
            ],
            LABEL_FIELDS,
            LABEL_TYPES,
        )
    )

    result = read([one, two], drop_unlabeled=True)

    files = result.stats["files"]
    assert [f["masked_ts"] for f in files] == [0, 1]
    assert result.warnings == [
        f"{two}: 1 ts value(s) masked as XXXXXXXXXX.XXXXXX (Zeek test output) "
        "read as null"
    ]


def test_cic_non_finite_counts_the_labeled_rows_only(tmp_path):
    rows = [CIC_HEAD]
    for i, (rate, label) in enumerate(
        [("12.5", "BENIGN"), ("Infinity", ""), ("NaN", ""), ("Infinity", "DDoS")]
    ):
        rows.append(
            f"f{i},10.0.0.1,{1000 + i},10.0.0.2,80,6,2017-07-07 10:00:0{i},500,"
            f"3,2,{rate},{label}"
        )
    path = tmp_path / "c.csv"
    path.write_text("\n".join(rows) + "\n")

    every = read(path)
    kept = read(path, drop_unlabeled=True)

    assert every.stats["non_finite"] == 3
    assert kept.table.num_rows == 2 and kept.stats["non_finite"] == 1
    assert kept.warnings == [
        f"{path}: 1 Infinity/NaN/empty value(s) in numeric columns read as null"
    ]
