"""A Zeek conn.log line with an unknown label costs the label, not the flow.

Found: a ``zeek:`` line whose label column held a label the tables do not know
(``evil``) was skipped and counted as a bad line (exit 4), though labels are not
used for scoring and stdin keeps such a flow as unlabeled. Now the file source,
read once or followed, keeps it as stdin does, counts it and notes the first
once, naming the file and its line.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import threading
from pathlib import Path

import pytest

from edge_agent.cli import main
from edge_agent.sources import open_source
from tests.conftest import data_file
from tests.test_agent_fixtures import CTU_NORMAL

HEADER_LINES = 8  # the CTU log's # lines, before its first data line
UNKNOWN = {12: "evil", 20: "Sneaky", 31: "evil"}  # line number -> label text


def _log(data_dir: Path, path: Path, rows: int = 40) -> Path:
    """The CTU log's header and first ``rows`` data lines, with the labels of the
    lines in UNKNOWN replaced by text no table names (plain or gzip by name)."""
    lines = data_file(data_dir, CTU_NORMAL).read_text().splitlines()
    header = [x for x in lines[:HEADER_LINES] if x.startswith("#")]
    assert len(header) == HEADER_LINES
    label = header[6].split("\t")[1:].index("label")
    out = header + lines[HEADER_LINES : HEADER_LINES + rows]
    for line_no, text in UNKNOWN.items():
        cells = out[line_no - 1].split("\t")
        cells[label] = text
        out[line_no - 1] = "\t".join(cells)
    data = ("\n".join(out) + "\n").encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def _json_log(path: Path) -> Path:
    """A Zeek JSON conn.log of 6 flows, lines 2 and 5 with unknown labels."""
    labels = ["Benign", "evil", "Malicious", "-", "Sneaky", "Benign"]
    rows = [{"ts": 1.5 + i, "uid": f"C{i}", "id.orig_h": "10.0.0.1",
             "id.orig_p": 40000 + i, "id.resp_h": "10.0.0.2", "id.resp_p": 80,
             "proto": "tcp", "label": text} for i, text in enumerate(labels)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", ["conn.log", "conn.log.gz"])
def test_a_zeek_file_keeps_a_flow_with_an_unknown_label_as_unlabeled(
    data_dir, tmp_path: Path, caplog, name: str
):
    log = _log(data_dir, tmp_path / name)
    src = open_source(f"zeek:{log}")

    with caplog.at_level(logging.WARNING, logger="gatewatch"):
        got = list(src)

    assert len(got) == 40 and src.rejected == {}
    assert src.unknown_labels == len(UNKNOWN)
    # In the file's order, the kept flows in their places, their text kept.
    lines = data_file(data_dir, CTU_NORMAL).read_text().splitlines()
    expected = [float(x.split("\t")[0]) for x in lines[HEADER_LINES:HEADER_LINES + 40]]
    assert [r["ts"] for r in got] == pytest.approx(expected)
    # The label's text goes to label_detail unless the line has a detailed label,
    # which wins there as on any labelled line (and as on stdin).
    fields = lines[6].split("\t")[1:]
    for line_no, text in UNKNOWN.items():
        rec = got[line_no - HEADER_LINES - 1]
        detail = lines[line_no - 1].split("\t")[fields.index("detailedlabel")]
        want = text if detail in ("-", "(empty)", "") else detail
        assert rec["label"] is None and rec["label_detail"] == want
    notes = [r.getMessage() for r in caplog.records
             if "unknown label" in r.getMessage()]
    assert len(notes) == 1
    assert notes[0].startswith(f"source {log}: line 12: unknown label 'evil' taken as")


def test_a_run_on_such_a_log_exits_0_and_counts_them(
    data_dir, tmp_path: Path, capsys
):
    from tests.test_agent_fixtures import tiny

    tm = tiny(data_dir, _Factory(tmp_path))
    log = _log(data_dir, tmp_path / "conn.log")
    summary = tmp_path / "s.json"
    argv = ["run", "--artifact", str(tm.artifact), "--source", f"zeek:{log}",
            "--site", "s1", "--gateway", "g1", "--outbox", str(tmp_path / "o.db"),
            "--alerts", "", "--summary-json", str(summary)]

    assert main(argv) == 0, capsys.readouterr().err

    report = json.loads(summary.read_text())
    assert report["flows"] == 40 and report["source_rejected"] == {}
    assert report["source_unknown_labels"] == len(UNKNOWN)


class _Factory:
    """tmp_path_factory's one method the shared fixture needs."""

    def __init__(self, base: Path) -> None:
        self.base = base

    def mktemp(self, name: str) -> Path:
        path = self.base / name
        path.mkdir()
        return path


def test_a_zeek_json_file_keeps_them_too(tmp_path: Path):
    src = open_source(f"zeek:{_json_log(tmp_path / 'conn.json')}")

    got = list(src)

    assert [r["src_port"] for r in got] == [40000 + i for i in range(6)]
    assert [r["label"] for r in got] == [0, None, 1, None, None, 0]
    assert [got[1]["label_detail"], got[4]["label_detail"]] == ["evil", "Sneaky"]
    assert (src.rejected, src.unknown_labels) == ({}, 2)


def test_stdin_with_zeeks_json_names_keeps_them_too(tmp_path: Path):
    text = _json_log(tmp_path / "conn.json").read_text()
    src = open_source("-", stdin=io.StringIO(text))

    got = list(src)

    assert [r["label"] for r in got] == [0, None, 1, None, None, 0]
    assert (src.rejected, src.unknown_labels) == ({}, 2)


def test_a_followed_log_keeps_them_too(data_dir, tmp_path: Path):
    log = _log(data_dir, tmp_path / "conn.log")
    src = open_source(f"zeek:{log}", follow=True, poll=0.05)
    got: list[dict] = []
    thread = threading.Thread(target=lambda: got.extend(src), daemon=True)
    thread.start()
    src.end.set()  # ends once it yielded what the file holds
    thread.join(60)

    assert not thread.is_alive()
    assert len(got) == 40 and src.rejected == {}
    assert src.unknown_labels == len(UNKNOWN)
    rec = got[20 - HEADER_LINES - 1]
    assert rec["label"] is None and rec["label_detail"] == "ESET"  # detailedlabel
