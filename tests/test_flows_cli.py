"""The ``flows`` command line: inspect and convert, exit codes, error messages."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest

from flows.cli import main
from flows.readers import read
from tests.conftest import data_file
from tests.test_readers import BINET_HEAD, FIELDS, ROW_A, ROW_B, zeek_text


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.data
@pytest.mark.parametrize(
    "rel, fmt, rows, labels",
    [
        (
            "zeek-conn/ctu50-normal-40-day1.conn.log.labeled",
            "zeek-tsv",
            5663,
            {"Malicious": 4201, "Benign": 1402, "Background": 60},
        ),
        ("nsl-kdd/KDDTest+.txt", "nsl-kdd", 22544, None),
        ("nsl-kdd/KDDTrain+.txt.gz", "nsl-kdd", 125973, None),
        ("zeek-conn/nmap-portscans.conn.json.log", "zeek-json", 4504, {}),
        ("unsw-nb15/UNSW_NB15_training-set.csv.gz", "unsw-nb15", 82332, None),
    ],
)
def test_inspect_json_real_counts(capsys, data_dir, rel, fmt, rows, labels):
    code, out, err = run(capsys, "inspect", "--json", str(data_file(data_dir, rel)))
    assert code == 0, err
    summary = json.loads(out)
    assert summary["format"] == fmt and summary["rows"] == rows
    if labels is not None:
        assert summary["labels"] == labels
    assert sum(summary["labels"].values()) in (0, rows)


@pytest.mark.data
def test_inspect_json_kdd_attack_names(capsys, data_dir):
    path = data_file(data_dir, "nsl-kdd/KDDTest+.txt")
    summary = json.loads(run(capsys, "inspect", "--json", str(path))[1])
    assert summary["labels"]["normal"] == 9711 and summary["labels"]["neptune"] == 4657
    assert summary["label_values"] == {"1": 22544 - 9711, "0": 9711, "null": 0}


def test_inspect_text_nulls_and_time_span(capsys, tmp_path):
    path = tmp_path / "c.log"
    path.write_text(zeek_text([ROW_A, ROW_B]))
    code, out, _ = run(capsys, "inspect", str(path))
    assert code == 0
    assert "format:   zeek-tsv" in out and "rows:     2" in out
    assert "1.249999" in out or "1.25" in out  # ts span between the two rows
    summary = json.loads(run(capsys, "inspect", "--json", str(path))[1])
    assert summary["nulls"]["service"] == 1 and summary["nulls"]["duration"] == 1
    assert summary["time_span"]["first"] == 1600000000.000001


def test_convert_parquet_and_zeek(capsys, tmp_path):
    src = tmp_path / "c.log"
    src.write_text(zeek_text([ROW_A, ROW_B]))
    code, _, err = run(capsys, "convert", str(src), "-o", str(tmp_path / "o.parquet"))
    assert code == 0 and "wrote 2 rows" in err
    assert read(tmp_path / "o.parquet").table.equals(read(src).table)
    code, _, _ = run(
        capsys,
        "convert",
        str(tmp_path / "o.parquet"),
        "--format",
        "zeek",
        "-o",
        str(tmp_path / "back.log"),
    )
    assert code == 0
    assert read(tmp_path / "back.log").table.equals(read(src).table)


def test_convert_zeek_needs_conn_family(capsys, tmp_path):
    src = tmp_path / "k.txt"
    src.write_text("0,tcp,private,REJ" + ",0" * 37 + ",normal,21\n")
    code, _, err = run(
        capsys, "convert", str(src), "--format", "zeek", "-o", str(tmp_path / "k.log")
    )
    assert code == 2 and err.startswith("error: ") and "nsl-kdd" in err


def test_bad_value_fail_writes_rows_before_and_exits_4(capsys, tmp_path):
    bad = list(ROW_B)
    bad[FIELDS.index("resp_pkts")] = "many"
    src = tmp_path / "bad.log"
    src.write_text(zeek_text([ROW_A, bad, ROW_B]))
    out = tmp_path / "o.parquet"
    code, _, err = run(capsys, "convert", str(src), "-o", str(out))
    assert code == 4
    assert "bad.log" in err and "line 10" in err and "resp_pkts" in err
    assert read(out).table.column("uid").to_pylist() == ["CabC1"]

    code, _, err = run(
        capsys, "convert", str(src), "-o", str(out), "--on-error", "skip", "--force"
    )
    assert code == 0 and "skipped 1" in err
    assert read(out).table.column("uid").to_pylist() == ["CabC1", "CabC2"]


def test_cut_gzip_exits_4_with_rows_written(capsys, tmp_path):
    rows = [ROW_A] * 2000
    data = gzip.compress(zeek_text(rows).encode())
    src = tmp_path / "cut.log.gz"
    src.write_bytes(data[: len(data) // 2])
    out = tmp_path / "o.parquet"
    code, _, err = run(capsys, "convert", str(src), "-o", str(out))
    assert code == 4 and "cut" in err
    assert 0 < read(out).table.num_rows < 2000


def test_every_line_skipped_is_bad_input_and_convert_writes_nothing(capsys, tmp_path):
    """Found: with --on-error skip a file whose every line was bad exited 0 (and
    convert wrote an empty file): nothing usable was read, which is exit 3."""
    rows = []
    for uid in ("CabC1", "CabC2", "CabC3"):
        bad = list(ROW_B)
        bad[FIELDS.index("uid")] = uid
        bad[FIELDS.index("resp_pkts")] = "many"
        rows.append(bad)
    src = tmp_path / "allbad.log"
    src.write_text(zeek_text(rows))

    code, _, err = run(capsys, "inspect", str(src), "--on-error", "skip")
    assert code == 3
    error = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert error == [
        f"error: {src}: every one of the 3 line(s) read was bad and skipped; "
        "nothing usable was read"
    ]

    out = tmp_path / "o.parquet"
    code, _, err = run(
        capsys, "convert", str(src), "-o", str(out), "--on-error", "skip"
    )
    assert code == 3 and "nothing usable was read" in err
    assert not out.exists()


def test_capture_cut_inside_its_header_is_bad_input(capsys, data_dir, tmp_path):
    """Found: a pcap cut inside its 24-byte file header was 'partial input' (4)
    with 0 rows in flows inspect, while the agent said 3 for the same file."""
    src = tmp_path / "hdr20.pcap"
    src.write_bytes(data_file(data_dir, "pcap/wikipedia.pcap").read_bytes()[:20])
    code, _, err = run(capsys, "inspect", str(src))
    assert code == 3
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        f"error: {src}: damaged part way at byte offset 0: the file ends inside "
        "the 24-byte pcap file header; nothing usable came before it"
    ]

    # convert writes nothing, and a good output from before stays as it was.
    good = tmp_path / "good.parquet"
    syn = data_file(data_dir, "pcap/tcp_syn.pcap")
    code, _, _ = run(capsys, "convert", str(syn), "-o", str(good))
    assert code == 0
    before = good.read_bytes()
    code, _, err = run(capsys, "convert", str(src), "-o", str(good), "--force")
    assert code == 3 and "nothing usable" in err
    assert good.read_bytes() == before


def test_unknown_format_and_missing_column_exit_3(capsys, tmp_path):
    src = tmp_path / "x.txt"
    src.write_text("what is this\n")
    code, out, err = run(capsys, "inspect", str(src))
    assert code == 3 and err.startswith("error: ") and "unknown format" in err
    text = zeek_text([ROW_A]).replace("\tid.resp_h\t", "\tresp_host\t")
    src.write_text(text)
    code, _, err = run(capsys, "inspect", str(src))
    assert code == 3 and "id.resp_h" in err and "line 7" in err


def test_usage_errors_exit_2_and_help_documents_codes(capsys):
    assert run(capsys, "convert", "a.log")[0] == 2
    assert run(capsys, "frobnicate")[0] == 2
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for line in ("0    ok", "2    usage", "3    bad input", "4    partial input"):
        assert line in out


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "inspect", str(tmp_path / "absent.log")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


@pytest.mark.data
def test_inspect_capture_shows_meter_stats(capsys, data_dir):
    pytest.importorskip("flows.meter", reason="the flow meter is not installed")
    path = data_file(data_dir, "pcap/tcp_syn.pcap")
    code, out, _ = run(capsys, "inspect", "--json", str(path))
    summary = json.loads(out)
    assert code == 0 and summary["format"] == "pcap" and summary["rows"] == 1
    assert summary["stats"]["packets"] == 1
    assert summary["stats"]["link_types"] == {"ethernet": 1}
    code, out, _ = run(capsys, "inspect", str(path))
    assert "packets: 1" in out
    # Plain text, not Python reprs of dicts, lists and None.
    assert "link_types: ethernet=1" in out and "damage: -" in out
    assert "{" not in out and "[" not in out and "None" not in out


def test_data_dir_resolves_relative_names(capsys, tmp_path, monkeypatch):
    (tmp_path / "zeek").mkdir()
    (tmp_path / "zeek" / "c.log").write_text(zeek_text([ROW_A]))
    monkeypatch.chdir(tmp_path / "zeek")
    monkeypatch.delenv("GATEWATCH_DATA", raising=False)
    code, out, _ = run(
        capsys, "inspect", "--json", "--data-dir", str(tmp_path), "zeek/c.log"
    )
    assert code == 0 and json.loads(out)["rows"] == 1
    monkeypatch.setenv("GATEWATCH_DATA", str(tmp_path))
    assert run(capsys, "inspect", "zeek/c.log")[0] == 0
    assert run(capsys, "inspect", "zeek/absent.log")[0] == 3


def test_output_in_a_missing_folder_exits_2_before_the_read(capsys, tmp_path):
    """Checked up front (it was exit 1 once the whole input had been read)."""
    src = tmp_path / "no-such.log"  # exit 3, were it read first
    out = tmp_path / "no" / "such" / "dir" / "o.parquet"
    code, _, err = run(capsys, "convert", str(src), "-o", str(out))
    assert code == 2
    # The output is named, not the temporary ``.o.parquet.NNNN.part`` beside it.
    assert err == (
        f"error: -o {out}: the folder {out.parent} does not exist; make it first\n"
    )
    assert not out.parent.exists()


@pytest.mark.parametrize("name", ["x.parquet", "x.log", "a/b/x.parquet"])
def test_output_under_a_file_names_the_file_without_a_traceback(
    capsys, tmp_path, name
):
    src = tmp_path / "c.log"
    src.write_text(zeek_text([ROW_A]))
    afile = tmp_path / "afile.log"
    afile.write_text("keep\n")
    out = afile / name
    code, _, err = run(capsys, "convert", str(src), "-o", str(out))
    assert (code, err) == (
        2,
        f"error: -o {out}: {afile} is a file, not a folder\n",
    )
    assert afile.read_text() == "keep\n"


@pytest.mark.parametrize("name", ["o.parquet", "o.log"])
def test_read_only_output_is_one_line_and_cleanup_never_raises(
    capsys, tmp_path, monkeypatch, name
):
    import errno
    from pathlib import Path

    import flows.readers.writers as writers

    def refuse(*_args, **_kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    # As on a read-only mount: the temporary file cannot be made, nor removed.
    monkeypatch.setattr(writers, "open", refuse, raising=False)
    monkeypatch.setattr(Path, "unlink", refuse)
    src = tmp_path / "c.log"
    src.write_text(zeek_text([ROW_A]))
    out = tmp_path / name
    code, _, err = run(capsys, "convert", str(src), "-o", str(out))
    assert (code, err) == (
        1, f"error: {out}: cannot be written (read-only file system)\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.log"]


def test_a_failed_rename_is_reported_and_the_temporary_file_removed(
    capsys, tmp_path, monkeypatch
):
    import errno

    import flows.cli as cli

    def refuse(*_args):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cli.os, "replace", refuse)
    monkeypatch.setattr(cli.os, "link", refuse)  # the rename without --force
    src = tmp_path / "c.log"
    src.write_text(zeek_text([ROW_A]))
    out = tmp_path / "o.parquet"
    code, _, err = run(capsys, "convert", str(src), "-o", str(out))
    assert (code, err) == (
        1, f"error: {out}: cannot be written (read-only file system)\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.log"]


def _argus(tmp_path):
    """A binetflow file of one flow that started 2011-08-10 09:46:53.5, local time."""
    path = tmp_path / "a.binetflow"
    path.write_text(
        BINET_HEAD + "\n2011/08/10 09:46:53.5,1,tcp,10.0.0.1,1027,   ->,10.0.0.2,80,"
        "S_RA,0,0,4,244,124,2,flow=From-Botnet\n"
    )
    return path


def test_timezone_reads_binetflow_start_times_in_that_zone(capsys, tmp_path):
    from datetime import UTC, datetime

    src = _argus(tmp_path)
    # 09:46:53.5 in Prague in August is summer time, UTC+2: 07:46:53.5 UTC.
    prague = datetime(2011, 8, 10, 7, 46, 53, 500000, tzinfo=UTC).timestamp()
    code, out, err = run(
        capsys, "inspect", "--json", "--timezone", "Europe/Prague", str(src)
    )
    assert code == 0, err
    assert json.loads(out)["time_span"]["first"] == prague
    code, out, _ = run(capsys, "inspect", "--json", str(src))  # default: UTC
    assert code == 0 and json.loads(out)["time_span"]["first"] == prague + 7200

    dest = tmp_path / "a.parquet"
    argv = ["convert", str(src), "--timezone", "Europe/Prague", "-o", str(dest)]
    code, _, err = run(capsys, *argv)
    assert code == 0 and "wrote 1 rows (binetflow -> parquet)" in err
    assert read(dest).table.column("ts").to_pylist() == [prague]


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_an_unknown_timezone_is_a_usage_error(capsys, tmp_path, command):
    src, dest = _argus(tmp_path), tmp_path / "o.parquet"
    more = ["-o", str(dest)] if command == "convert" else []
    code, out, err = run(capsys, command, str(src), "--timezone", "Mars/Tharsis", *more)
    assert code == 2 and out == ""
    assert err.startswith(f"usage: flows {command} ")
    assert err.rstrip().endswith(
        "error: argument --timezone: unknown time zone 'Mars/Tharsis': expected an "
        "IANA name such as Europe/Prague or America/New_York, or UTC"
    )
    assert "Traceback" not in err and not dest.exists()


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_help_says_what_timezone_is_for(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    text = " ".join(out.split())
    assert code == 0 and "--timezone ZONE the time zone an Argus binetflow" in text
    assert "IANA name such as Europe/Prague" in text
    assert "other formats carry epoch times and ignore it (default: UTC)" in text


def test_convert_names_the_inputs_a_stop_left_unread(tmp_path, capsys):
    # Found: three inputs, the second cut part way: the third was never read and
    # nothing said so.
    ok = tmp_path / "ok.log"
    ok.write_text(zeek_text([ROW_A]))
    bad = tmp_path / "bad.log"
    bad.write_text(zeek_text([ROW_B], close=False) + "garbage\n")
    last = tmp_path / "last.log"
    last.write_text(zeek_text([ROW_A, ROW_B]))
    code = main(["convert", str(ok), str(bad), str(last), "-o",
                 str(tmp_path / "m.parquet")])
    err = capsys.readouterr().err
    assert code == 4
    assert f"1 input(s) after {bad} were not read: {last}" in err
    assert len(read(str(tmp_path / "m.parquet")).table) == 2  # ok's row, bad's row


# ------------------------------------------- where a capture's damage is named


def _pcapng_with_offset(tmp_path, name, stamps, cut=0):
    """A pcapng whose interface has if_tsoffset -3600 s and one DNS packet per
    stamp (µs ticks; below 3600 s is before 1970), its last ``cut`` bytes cut
    off; returns the path and each packet block's byte offset."""
    from tests.test_meter_craft import pcapng_epb, pcapng_shb
    from tests.test_meter_damage import _dns, _idb_with_offset

    blob = pcapng_shb() + _idb_with_offset(-3600)
    offsets = []
    for i, seconds in enumerate(stamps):
        offsets.append(len(blob))
        blob += pcapng_epb(0, seconds * 10**6, _dns(1000 + i))
    path = tmp_path / name
    path.write_bytes(blob[: len(blob) - cut])
    return path, offsets


BEFORE_1970 = (
    "packet time stamp is unusable: expected a time in epoch seconds >= 0 "
    "(1970 or later), found -2600"
)


def _errors(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_a_capture_cut_in_its_last_block_names_the_place(capsys, tmp_path, command):
    """Found: the error line said only 'damaged part way; the rows before it were
    kept'; the byte offset was on a warning line before it."""
    path, offsets = _pcapng_with_offset(tmp_path, "cut.pcapng", [5000, 5001], cut=10)
    extra = ["-o", str(tmp_path / "o.parquet")] if command == "convert" else []
    code, _, err = run(capsys, command, str(path), *extra)
    assert code == 4
    assert _errors(err) == [
        f"error: {path}: damaged part way at byte offset {offsets[1]}: the file "
        "ends inside a block of type 0x6 (70 of 80 bytes); the rows before it "
        "were kept"
    ]


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_a_packet_before_1970_is_counted_not_called_part_way(
    capsys, tmp_path, command
):
    """Found: one packet stamped before 1970 in the middle of a capture gave
    'damaged part way; the rows before it were kept' although the packet after
    it was read and kept too."""
    path, offsets = _pcapng_with_offset(tmp_path, "t.pcapng", [5000, 1000, 5001])
    extra = ["-o", str(tmp_path / "o.parquet")] if command == "convert" else []
    code, _, err = run(capsys, command, str(path), *extra)
    assert code == 4  # damaged input, as documented: skipped as bad_time
    assert _errors(err) == [
        f"error: {path}: 1 damaged packet skipped at byte offset {offsets[1]}: "
        f"{BEFORE_1970}; the read went on past it and kept the rows of the other "
        "packets"
    ]
    assert "part way" not in err
    assert "note: skipped 1 bad packet record(s)" in err.splitlines()
    result = read(str(path))
    assert result.table.column("ts").to_pylist() == [1400.0, 1401.0]
    assert [(d.place, d.stopped, d.records, d.skipped) for d in result.damage] == [
        (f"byte offset {offsets[1]}", False, 1, 1)
    ]


def test_packets_before_1970_then_a_cut_name_both(capsys, tmp_path):
    path, offsets = _pcapng_with_offset(
        tmp_path, "both.pcapng", [5000, 1000, 1000, 5001, 5002], cut=10
    )
    code, out, err = run(capsys, "inspect", "--json", str(path))
    assert code == 4 and json.loads(out)["rows"] == 2
    assert _errors(err) == [
        f"error: {path}: 2 damaged packets skipped, the first at byte offset "
        f"{offsets[1]}: {BEFORE_1970}; then damaged part way at byte offset "
        f"{offsets[4]}: the file ends inside a block of type 0x6 (70 of 80 "
        "bytes); the rows before it were kept"
    ]


# ------------------------------------------ inspect --json: one object per exit


def _inspect_json(capsys, *argv):
    """Run ``flows inspect --json``; the exit code, the one JSON object stdout
    holds (json.loads refuses anything else) and the stderr error lines."""
    code = main(["inspect", "--json", *argv])
    out, err = capsys.readouterr()
    return code, json.loads(out), _errors(err)


def _no_input(tmp_path, case: str):
    """An input that cannot be read at all, and the error it gives."""
    path = tmp_path / f"{case}.log"
    if case == "empty":
        path.write_bytes(b"")
        return path, f"{path}: is empty"
    if case == "unknown":
        path.write_text("hello world\nfoo bar\n")
        return path, (
            f"{path}: unknown format (first line 'hello world'); expected one of: "
            "zeek-tsv, zeek-json, binetflow, nsl-kdd, unsw-nb15, cic-csv, parquet, "
            "pcap, pcapng"
        )
    if case == "folder":
        path.mkdir()
        return path, f"{path}: is a folder, expected a file"
    if case == "zeek-cut":
        path.write_text("1300475167.096535\tCXWv6p3arKYeMETxOg\t141.142.220.202\n")
        return path, (
            f"{path}, line 1: looks like Zeek TSV without its header (e.g. zeek-cut "
            "output); expected the #separator, #fields and #types lines that name "
            "and type its columns: keep them (zeek-cut -c, or -C for every header "
            "block) or read the log itself"
        )
    return path, f"{path}: no such file"  # missing


@pytest.mark.parametrize("case", ["empty", "unknown", "folder", "missing", "zeek-cut"])
def test_inspect_json_prints_the_error_of_an_input_that_cannot_be_read(
    capsys, tmp_path, case
):
    """Found: with --json, an input refused before anything was read (exit 3)
    printed nothing on stdout, so a script reading the JSON got no object."""
    path, error = _no_input(tmp_path, case)
    code, summary, errors = _inspect_json(capsys, str(path))
    assert code == 3
    assert summary == {"error": error, "exit_code": 3}  # nothing was read
    assert errors == [f"error: {error}"]
    code, out, err = run(capsys, "inspect", str(path))  # text: stdout stays empty
    assert (code, out, _errors(err)) == (3, "", [f"error: {error}"])


def test_inspect_json_of_a_capture_cut_in_its_header_says_the_error(capsys, tmp_path):
    """Exit 3 after a read: what was read (no row) and the error line's text."""
    path = tmp_path / "hdr.pcap"
    path.write_bytes(bytes.fromhex("d4c3b2a1020004000000"))  # 10 of 24 header bytes
    code, summary, errors = _inspect_json(capsys, str(path))
    error = (
        f"{path}: damaged part way at byte offset 0: the file ends inside the "
        "24-byte pcap file header; nothing usable came before it"
    )
    assert (code, summary["exit_code"], summary["error"]) == (3, 3, error)
    assert (summary["format"], summary["rows"], summary["partial"]) == (
        "pcap", 0, True
    )
    assert errors == [f"error: {error}"]


def test_inspect_json_of_a_bad_first_row_shows_what_was_read(capsys, tmp_path):
    """A bad value before any good row (exit 3): the error carries the read so
    far (format, no row), and the JSON object shows it."""
    bad = list(ROW_A)
    bad[FIELDS.index("id.orig_p")] = "70000"
    path = tmp_path / "bad.log"
    path.write_text(zeek_text([bad, ROW_B]))
    code, summary, errors = _inspect_json(capsys, str(path))
    error = (
        f"{path}, line 9, column 'id.orig_p': expected a port from 0 to 65535, "
        "found 70000"
    )
    assert (code, summary["exit_code"], summary["error"]) == (3, 3, error)
    assert (summary["format"], summary["rows"]) == ("zeek-tsv", 0)
    assert errors == [f"error: {error}"]


def test_inspect_json_says_the_error_of_exit_0_and_4(capsys, tmp_path):
    path = tmp_path / "c.log"
    path.write_text(zeek_text([ROW_A, ROW_B]))
    code, summary, errors = _inspect_json(capsys, str(path))
    assert (code, summary["exit_code"], summary["error"], errors) == (0, 0, None, [])
    assert summary["rows"] == 2

    path.write_text(zeek_text([ROW_A, ROW_B], close=False) + "\t".join(ROW_A[:7]))
    code, summary, errors = _inspect_json(capsys, str(path))
    error = (
        f"{path}: damaged part way: the last line (11) is cut short (7 of 21 "
        "fields); the rows before it were kept"
    )
    assert (code, summary["exit_code"], summary["error"]) == (4, 4, error)
    assert summary["rows"] == 2 and errors == [f"error: {error}"]


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (
            ["--on-error", "bogus", "x.log"],
            "argument --on-error: invalid choice: 'bogus' (choose from 'fail', "
            "'skip')",
        ),
        (["-", "-"], "- (standard input) can be given only once"),
    ],
    ids=["argparse", "usage-error"],
)
def test_inspect_json_prints_usage_errors_too(capsys, argv, error):
    code, summary, _ = _inspect_json(capsys, *argv)
    assert code == 2 and summary == {"error": error, "exit_code": 2}
    # argparse's own abbreviation of --json counts too; text mode prints no JSON.
    code = main(["inspect", "--js", *argv])
    out, err = capsys.readouterr()
    assert code == 2 and json.loads(out) == summary and error in err
    assert run(capsys, "inspect", *argv)[:2] == (2, "")


def test_inspect_json_prints_an_interrupt(capsys, tmp_path, monkeypatch):
    import flows.readers

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(flows.readers, "read", interrupted)
    code, summary, errors = _inspect_json(capsys, str(tmp_path / "c.log"))
    assert code == 130 and summary == {"error": "interrupted", "exit_code": 130}
    assert errors == ["error: interrupted"]


def test_garbage_after_a_zeek_header_names_the_line_in_inspect_and_convert(
    capsys, tmp_path
):
    src = tmp_path / "g.log"
    src.write_bytes(zeek_text([], close=False).encode() + b"\xff\xfe\x81junk\n")
    error = f"error: {src}, line 9: bytes that are not UTF-8\n"
    assert run(capsys, "inspect", str(src)) == (3, "", error)
    out = tmp_path / "o.parquet"
    assert run(capsys, "convert", str(src), "-o", str(out)) == (3, "", error)
    assert not out.exists()


def test_a_header_only_csv_converts_to_zero_rows(capsys, tmp_path):
    from tests.test_readers import UNSW_HEAD

    src = tmp_path / "u.csv"
    src.write_text(UNSW_HEAD + "\n")
    out = tmp_path / "o.parquet"
    code, _, err = run(capsys, "convert", str(src), "-o", str(out))
    assert (code, err) == (0, f"wrote 0 rows (unsw-nb15 -> parquet) to {out}\n")
    assert read(out).table.num_rows == 0
