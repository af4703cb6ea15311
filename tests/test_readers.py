"""Reader quirks, each with an input the test writes itself (no shared data)."""

from __future__ import annotations

import gzip
import json
import sys
import zlib

import pyarrow as pa
import pytest

from flows.errors import BadInputError, PartialInputError, UsageError
from flows.readers import (
    detect_format,
    iter_records,
    read,
    write_conn_log,
    write_parquet,
)

FIELDS = (
    "ts uid id.orig_h id.orig_p id.resp_h id.resp_p proto service duration "
    "orig_bytes resp_bytes conn_state local_orig local_resp missed_bytes history "
    "orig_pkts orig_ip_bytes resp_pkts resp_ip_bytes tunnel_parents"
).split()
TYPES = (
    "time string addr port addr port enum string interval count count string bool "
    "bool count string count count count count set[string]"
).split()

ROW_A = [
    "1600000000.000001",
    "CabC1",
    "10.0.0.1",
    "50000",
    "10.0.0.2",
    "80",
    "tcp",
    "http",
    "1.500000",
    "100",
    "2000",
    "SF",
    "T",
    "F",
    "0",
    "ShADadFf",
    "5",
    "400",
    "6",
    "2300",
    "(empty)",
]
ROW_B = [
    "1600000001.250000",
    "CabC2",
    "10.0.0.3",
    "40000",
    "8.8.8.8",
    "53",
    "udp",
    "-",
    "-",
    "-",
    "-",
    "S0",
    "T",
    "F",
    "0",
    "D",
    "1",
    "60",
    "0",
    "0",
    "-",
]


def zeek_text(rows, fields=FIELDS, types=TYPES, close=True, extra_header=()):
    """A Zeek TSV conn.log as Zeek's ASCII writer lays it out."""
    lines = [
        "#separator \\x09",
        "#set_separator\t,",
        "#empty_field\t(empty)",
        "#unset_field\t-",
        "#path\tconn",
        "#open\t2020-09-13-12-26-40",
        *extra_header,
        "#fields\t" + "\t".join(fields),
        "#types\t" + "\t".join(types),
    ]
    lines += ["\t".join(r) for r in rows]
    if close:
        lines.append("#close\t2020-09-13-12-30-00")
    return "\n".join(lines) + "\n"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def only(result, index=0):
    return result.table.slice(index, 1).to_pylist()[0]


# ------------------------------------------------------------------ Zeek TSV


def test_zeek_tsv_values_unset_and_empty(tmp_path):
    path = write(tmp_path, "conn.log", zeek_text([ROW_A, ROW_B]))
    result = read(path)
    assert result.format == "zeek-tsv" and result.family == "conn"
    assert result.table.num_rows == 2 and not result.partial
    a, b = result.table.to_pylist()
    assert a["ts"] == 1600000000.000001 and a["src_ip"] == "10.0.0.1"
    assert a["src_port"] == 50000 and a["dst_port"] == 80 and a["service"] == "http"
    assert a["orig_bytes"] == 100 and a["resp_ip_bytes"] == 2300
    assert a["history"] == "ShADadFf" and a["label"] is None
    # '-' is unset: null, never 0 and never the string "-"
    assert b["service"] is None and b["duration"] is None and b["orig_bytes"] is None
    assert b["orig_pkts"] == 1 and b["resp_pkts"] == 0


def test_zeek_tsv_any_order_missing_and_extra_columns(tmp_path):
    order = [
        FIELDS.index(n)
        for n in [
            "proto",
            "id.resp_p",
            "ts",
            "id.orig_h",
            "id.resp_h",
            "id.orig_p",
            "duration",
            "orig_bytes",
        ]
    ]
    fields = [FIELDS[i] for i in order] + ["ip_proto"]
    types = [TYPES[i] for i in order] + ["count"]
    rows = [[ROW_A[i] for i in order] + ["6"]]
    result = read(write(tmp_path, "c.log", zeek_text(rows, fields, types)))
    rec = only(result)
    assert rec["proto"] == "tcp" and rec["dst_port"] == 80 and rec["src_port"] == 50000
    assert rec["ts"] == 1600000000.000001 and rec["duration"] == 1.5
    assert rec["orig_bytes"] == 100
    for missing in (
        "uid",
        "service",
        "resp_bytes",
        "conn_state",
        "history",
        "orig_pkts",
        "missed_bytes",
    ):
        assert rec[missing] is None


def test_zeek_tsv_empty_field_is_empty_string(tmp_path):
    row = list(ROW_A)
    row[FIELDS.index("history")] = "(empty)"
    rec = only(read(write(tmp_path, "c.log", zeek_text([row]))))
    assert rec["history"] == ""


def test_zeek_tsv_missing_required_column_names_it(tmp_path):
    keep = [i for i, n in enumerate(FIELDS) if n != "id.orig_p"]
    text = zeek_text(
        [[ROW_A[i] for i in keep]], [FIELDS[i] for i in keep], [TYPES[i] for i in keep]
    )
    with pytest.raises(BadInputError) as info:
        read(write(tmp_path, "c.log", text))
    assert info.value.column == "id.orig_p" and info.value.line == 7
    assert "c.log" in str(info.value) and "id.orig_p" in str(info.value)


def test_zeek_tsv_escapes_are_undone(tmp_path):
    row = list(ROW_A)
    row[FIELDS.index("service")] = "a\\x09b\\x5cc"
    row[FIELDS.index("uid")] = "C\\xc3\\xa9"
    rec = only(read(write(tmp_path, "c.log", zeek_text([row]))))
    assert rec["service"] == "a\tb\\c" and rec["uid"] == "C\u00e9"
    assert list(iter_records(tmp_path / "c.log")) == [rec]


def test_zeek_tsv_close_and_concatenated_logs(tmp_path):
    other_fields = ["id.orig_h", "ts", "id.orig_p", "id.resp_h", "id.resp_p", "proto"]
    other_rows = [
        ["192.168.1.9", "1700000000.5", "1234", "1.1.1.1", "443", "tcp"],
        ["192.168.1.9", "1700000001.5", "x", "1.1.1.1", "443", "tcp"],
    ]
    text = zeek_text([ROW_A]) + zeek_text(other_rows, other_fields, ["addr"] * 6)
    path = write(tmp_path, "cat.log", text)
    with pytest.raises(PartialInputError) as info:
        read(path)
    # line: 10 lines in the first log, 8 header lines, then the two rows
    assert info.value.line == 20 and info.value.column == "id.orig_p"
    kept = info.value.result.table.to_pylist()
    assert [r["src_ip"] for r in kept] == ["10.0.0.1", "192.168.1.9"]
    skipped = read(path, on_error="skip")
    assert skipped.table.num_rows == 2 and skipped.skipped == 1
    assert only(skipped, 1)["ts"] == 1700000000.5 and only(skipped, 1)["uid"] is None


def test_several_files_and_rotated_gz(tmp_path):
    plain = write(tmp_path, "conn.log", zeek_text([ROW_A]))
    rotated = write(
        tmp_path,
        "conn.00:00:00-01:00:00.log.gz",
        gzip.compress(zeek_text([ROW_B, ROW_A]).encode()),
    )
    result = read([plain, rotated])
    assert result.table.num_rows == 3
    assert [r["uid"] for r in result.table.to_pylist()] == ["CabC1", "CabC2", "CabC1"]
    assert detect_format(rotated) == "zeek-tsv"


def test_gzip_members_concatenated(tmp_path):
    data = gzip.compress(zeek_text([ROW_A]).encode()) + gzip.compress(
        zeek_text([ROW_B]).encode()
    )
    result = read(write(tmp_path, "two.log.gz", data))
    assert result.table.num_rows == 2 and not result.partial


def test_cut_gzip_keeps_complete_rows_and_reports_partial(tmp_path):
    rows = []
    for i in range(3000):
        row = list(ROW_A)
        row[FIELDS.index("uid")] = f"C{i:06d}"
        row[FIELDS.index("orig_bytes")] = str(i * 7919 % 100003)
        rows.append(row)
    full = gzip.compress(zeek_text(rows).encode())
    cut = full[: len(full) * 2 // 3]
    path = write(tmp_path, "cut.log.gz", cut)
    # what a plain inflate of the cut bytes gives, independently of the reader
    prefix = zlib.decompressobj(wbits=31).decompress(cut)
    complete = prefix[: prefix.rfind(b"\n") + 1].decode().splitlines()
    expected = [ln.split("\t")[1] for ln in complete if not ln.startswith("#")]
    assert 0 < len(expected) < 3000

    for mode in ("fail", "skip"):
        result = read(path, on_error=mode)
        assert result.partial is True
        assert result.table.column("uid").to_pylist() == expected
        assert any("cut" in w for w in result.warnings)


def test_non_number_fail_names_file_line_column_and_keeps_rows(tmp_path):
    bad = list(ROW_B)
    bad[FIELDS.index("orig_pkts")] = "seven"
    path = write(tmp_path, "bad.log", zeek_text([ROW_A, ROW_A, bad, ROW_B]))
    with pytest.raises(PartialInputError) as info:
        read(path)
    err = info.value
    assert err.line == 11 and err.column == "orig_pkts" and err.exit_code == 4
    assert "bad.log" in str(err) and "line 11" in str(err) and "'seven'" in str(err)
    assert err.result.table.num_rows == 2 and err.result.partial

    result = read(path, on_error="skip")
    assert result.skipped == 1 and result.table.num_rows == 3
    assert "line 11" in result.warnings[0]


def test_bad_first_row_is_bad_input_not_partial(tmp_path):
    bad = list(ROW_A)
    bad[FIELDS.index("duration")] = "1.2.3"
    with pytest.raises(BadInputError) as info:
        read(write(tmp_path, "b.log", zeek_text([bad])))
    assert not isinstance(info.value, PartialInputError)
    assert info.value.exit_code == 3 and info.value.column == "duration"


def test_wrong_field_count_and_blank_lines(tmp_path):
    text = zeek_text([ROW_A, ROW_A[:5], ROW_B]).replace(
        "\t".join(ROW_B), "\n" + "\t".join(ROW_B)
    )
    path = write(tmp_path, "short.log", text)
    with pytest.raises(PartialInputError) as info:
        read(path)
    assert info.value.line == 10 and "found 5" in str(info.value)
    result = read(path, on_error="skip")
    assert result.skipped == 1 and result.table.column("uid").to_pylist() == [
        "CabC1",
        "CabC2",
    ]


def test_cut_last_line_without_newline_is_partial(tmp_path):
    text = zeek_text([ROW_A, ROW_B], close=False)
    path = write(tmp_path, "cut.log", text + "\t".join(ROW_A[:7]))
    result = read(path)
    assert result.partial and result.table.num_rows == 2


def test_unknown_format(tmp_path):
    with pytest.raises(BadInputError) as info:
        read(write(tmp_path, "conn.log", "hello,world\n1,2\n"))
    assert "unknown format" in str(info.value) and "conn.log" in str(info.value)
    with pytest.raises(BadInputError):
        read(write(tmp_path, "empty.log", ""))
    with pytest.raises(BadInputError, match="no such file"):
        read(tmp_path / "absent.log")
    with pytest.raises(UsageError):
        read(tmp_path / "absent.log", on_error="ignore")


ZEEK_CUT_ROW = (
    "1300475167.096535\tCXWv6p3arKYeMETxOg\t141.142.220.202\t5353\t224.0.0.251\t"
    "5353\tudp\tdns\t-\t-\t-\tS0\t-\t-\t0\tD\t1\t73\t0\t0\t-"
)
KEEP_THE_HEADER = (
    "expected the #separator, #fields and #types lines that name and type its "
    "columns: keep them (zeek-cut -c, or -C for every header block) or read the "
    "log itself"
)
HEADERLESS = "Zeek TSV without its header (e.g. zeek-cut output)"
NAMES_ONLY = (
    "Zeek TSV whose header is a bare line of field names (e.g. zeek-cut -m output)"
)


@pytest.mark.parametrize(
    ("text", "line", "what"),
    [
        (ZEEK_CUT_ROW + "\n" + ZEEK_CUT_ROW + "\n", 1, HEADERLESS),
        # zeek-cut -d: ISO times; only three columns picked
        ("2011-03-18T19:06:07+0000\t141.142.220.202\t224.0.0.251\n", 1, HEADERLESS),
        # zeek-cut uid id.orig_h: no time, a uid and an address
        ("\nCXWv6p3arKYeMETxOg\t141.142.220.202\n", 2, HEADERLESS),
        ("\t".join(FIELDS) + "\n" + ZEEK_CUT_ROW + "\n", 1, NAMES_ONLY),
    ],
    ids=["zeek-cut", "zeek-cut-d", "uid-address", "zeek-cut-m"],
)
def test_headerless_zeek_tsv_is_refused_saying_how_to_keep_the_header(
    tmp_path, text, line, what
):
    """Found: zeek-cut output (Zeek TSV without its #fields header) was called an
    unknown format, which did not say what it was or how to get a readable one."""
    path = write(tmp_path, "cut.log", text)
    for attempt in (read, detect_format, lambda p: list(iter_records(p))):
        with pytest.raises(BadInputError) as info:
            attempt(path)
        err = info.value
        assert not isinstance(err, PartialInputError) and err.exit_code == 3
        assert (err.path, err.line, err.column) == (str(path), line, None)
        assert str(err) == f"{path}, line {line}: looks like {what}; {KEEP_THE_HEADER}"


@pytest.mark.parametrize(
    "text",
    [
        "a\tb\tc\n1\t2\t3\n",
        "1300475167.096535\tfoo\tbar\n",  # a time, but no address or uid
        "10.0.0.1\t10.0.0.2\n",  # addresses, but no time or uid
        ZEEK_CUT_ROW.replace("\t", ",") + "\n",  # not tab-separated
    ],
    ids=["plain", "time-only", "addresses-only", "commas"],
)
def test_other_tab_separated_text_is_still_an_unknown_format(tmp_path, text):
    path = write(tmp_path, "x.tsv", text)
    with pytest.raises(BadInputError) as info:
        read(path)
    assert str(info.value).startswith(f"{path}: unknown format (first line ")


def test_detection_uses_content_not_name(tmp_path):
    path = write(tmp_path, "data.csv", zeek_text([ROW_A]))
    assert detect_format(path) == "zeek-tsv"
    json_path = write(tmp_path, "conn.log", json.dumps({"ts": 1.0}) + "\n")
    assert detect_format(json_path) == "zeek-json"


UNSW_NO_SBYTES = "id,dur,attack_cat,label\n1,0,Normal,0\n"
ARGUS = "an Argus binetflow file"


@pytest.mark.parametrize(
    ("header", "what", "missing"),
    [
        ("id,dur,attack_cat,label", "a UNSW-NB15 CSV", "sbytes"),
        ("id,dur,sbytes,label", "a UNSW-NB15 CSV", "attack_cat"),
        ("StartTime,Dur,Proto,SourceAddr,DstAddr", ARGUS, "SrcAddr"),
        ("Time\tProto\tSrcAddr\tDstAddr", ARGUS, "StartTime"),
        ("starttime,proto,srcaddr,daddr", ARGUS, "DstAddr"),
    ],
)
def test_a_csv_header_missing_one_marker_names_the_column(
    tmp_path, header, what, missing
):
    """A header with most of a format's marker columns is named with what it lacks,
    not reported as an unknown format."""
    path = write(tmp_path, "near.csv", header + "\n1,2,3,4\n")
    expected = (
        f"{path}, line 1, column {missing!r}: looks like {what} "
        f"but the header has no {missing!r} column"
    )
    for attempt in (read, detect_format, lambda p: list(iter_records(p))):
        with pytest.raises(BadInputError) as info:
            attempt(path)
        err = info.value
        assert not isinstance(err, PartialInputError) and err.exit_code == 3
        assert (err.path, err.line, err.column) == (str(path), 1, missing)
        assert str(err) == expected


def test_a_header_after_blank_lines_is_named_at_its_own_line(tmp_path):
    path = write(tmp_path, "u.csv", b"\xef\xbb\xbf\n\r\n" + UNSW_NO_SBYTES.encode())
    with pytest.raises(BadInputError) as info:
        read(path)
    assert info.value.line == 3 and "no 'sbytes' column" in str(info.value)


@pytest.mark.parametrize(
    "header",
    [
        "hello,world",
        "StartTime,value",  # one of binetflow's three markers
        " Flow Duration, Something Else",  # one of CIC's five
        "label,attack,text",
    ],
)
def test_a_header_with_few_markers_is_still_an_unknown_format(tmp_path, header):
    path = write(tmp_path, "x.csv", header + "\n1,2\n")
    with pytest.raises(BadInputError) as info:
        read(path)
    assert str(info.value).startswith(f"{path}: unknown format (first line ")
    assert info.value.line is None and info.value.exit_code == 3


# The message of a ts below 0 (flows.record.time_problem), with what was found.
BEFORE_1970 = "expected a time in epoch seconds >= 0 (1970 or later), found "


@pytest.mark.parametrize(("text", "found"), [("-1.5", "-1.5"), ("-0.000001", "-1e-06")])
def test_zeek_tsv_time_before_1970_is_a_bad_row(tmp_path, text, found):
    bad = list(ROW_B)
    bad[0] = text
    epoch = list(ROW_A)
    epoch[0] = "0.000000"  # 1970-01-01 00:00:00 itself is a time
    path = write(tmp_path, "conn.log", zeek_text([ROW_A, bad, epoch]))
    expected = f"{path}, line 10, column 'ts': {BEFORE_1970}{found}"
    for attempt in (read, lambda p: list(iter_records(p))):
        with pytest.raises(PartialInputError) as info:
            attempt(path)
        err = info.value
        assert (err.path, err.line, err.column) == (str(path), 10, "ts")
        assert str(err) == expected and err.exit_code == 4
        if attempt is read:
            assert err.result.table.num_rows == 1

    result = read(path, on_error="skip")
    assert result.skipped == 1 and result.stats["skipped_lines"] == [10]
    assert result.table.column("ts").to_pylist() == [1600000000.000001, 0.0]
    assert f"the first at line 10, column 'ts': {BEFORE_1970}{found}" in (
        result.warnings[-1]
    )
    assert [r["ts"] for r in iter_records(path, on_error="skip")] == [
        1600000000.000001,
        0.0,
    ]


# The message of a ts at or past flows.record.TS_LIMIT (the year 10000).
PAST_9999 = (
    "expected a time in epoch seconds below 253402300800 (before the year 10000), "
    "found "
)


def test_time_problem_refuses_the_year_10000_as_captures_do():
    """Found: the text readers took a ts of 1e300 while the flow meter skipped a
    packet stamped at or past TS_LIMIT as damaged; both use one rule now."""
    from flows.record import TS_LIMIT, packet_time_problem, time_problem

    assert time_problem(TS_LIMIT - 1) is None  # 9999-12-31 23:59:59
    assert time_problem(TS_LIMIT) == f"{PAST_9999}253402300800"
    assert time_problem(1e300) == f"{PAST_9999}1e+300"
    for value in (TS_LIMIT - 1, TS_LIMIT, 1e300, -0.5, float("nan")):
        assert packet_time_problem(value) == time_problem(value)


@pytest.mark.parametrize(
    ("text", "found"), [("1e300", "1e+300"), ("253402300800.0", "253402300800")]
)
def test_zeek_tsv_time_past_9999_is_a_bad_row(tmp_path, text, found):
    bad = list(ROW_B)
    bad[0] = text
    last = list(ROW_A)
    last[0] = "253402300799.000000"  # the last second of 9999 is a time
    path = write(tmp_path, "conn.log", zeek_text([ROW_A, bad, last]))
    expected = f"{path}, line 10, column 'ts': {PAST_9999}{found}"
    for attempt in (read, lambda p: list(iter_records(p))):
        with pytest.raises(PartialInputError) as info:
            attempt(path)
        err = info.value
        assert (err.line, err.column, err.exit_code) == (10, "ts", 4)
        assert str(err) == expected
    result = read(path, on_error="skip")
    assert result.skipped == 1 and result.stats["skipped_lines"] == [10]
    assert result.table.column("ts").to_pylist() == [1600000000.000001, 253402300799.0]
    assert [r["ts"] for r in iter_records(path, on_error="skip")] == [
        1600000000.000001,
        253402300799.0,
    ]


# ------------------------------------------------------------------- labels

LABEL_FIELDS = FIELDS + ["label", "detailedlabel"]
LABEL_TYPES = TYPES + ["string", "string"]


def test_stratosphere_label_columns(tmp_path):
    rows = [
        ROW_A + ["Malicious", "C&C"],
        ROW_B + ["Benign", "Google"],
        ROW_A + ["Background", "(empty)"],
        ROW_B + ["Malicious", "-"],
    ]
    path = write(
        tmp_path, "s.conn.log.labeled", zeek_text(rows, LABEL_FIELDS, LABEL_TYPES)
    )
    result = read(path)
    assert result.table.column("label").to_pylist() == [1, 0, None, 1]
    assert result.table.column("label_detail").to_pylist() == [
        "C&C",
        "Google",
        "Background",
        "Malicious",
    ]
    assert result.stats["labels"] == {"Malicious": 2, "Benign": 1, "Background": 1}
    dropped = read(path, drop_unlabeled=True)
    assert dropped.table.column("label").to_pylist() == [1, 0, 1]


def test_iot23_joined_label_field(tmp_path):
    fields = FIELDS[:-1] + ["tunnel_parents   label   detailed-label"]
    types = TYPES[:-1] + ["set[string]   string   string"]
    rows = [
        ROW_A[:-1] + ["(empty)   Malicious   PartOfAHorizontalPortScan"],
        ROW_B[:-1] + ["-   Benign   -"],
        ROW_B[:-1] + ["-\tX"],
    ]
    text = zeek_text(rows, fields, types).replace("-\tX\n", "-   Background   -\n")
    path = write(tmp_path, "iot23.conn.log.labeled", text)
    result = read(path)
    assert result.table.column("label").to_pylist() == [1, 0, None]
    assert result.table.column("label_detail").to_pylist() == [
        "PartOfAHorizontalPortScan",
        "Benign",
        "Background",
    ]
    assert list(iter_records(path)) == result.table.to_pylist()


def test_iot23_labels_under_plain_header_are_not_lost(tmp_path):
    """The classic bug: labels hidden in tunnel_parents read as 'all benign'."""
    rows = [
        ROW_A[:-1] + ["(empty)   Malicious   Okiru"],
        ROW_B[:-1] + ["(empty)   Malicious   DDoS"],
    ]
    path = write(tmp_path, "hidden.labeled", zeek_text(rows))
    result = read(path)
    assert result.table.column("label").to_pylist() == [1, 1]
    assert any("IoT-23" in w for w in result.warnings)


def test_unknown_label_text_is_never_benign(tmp_path):
    rows = [ROW_A + ["Benign", "-"], ROW_A + ["malware-ish", "-"]]
    path = write(tmp_path, "l.labeled", zeek_text(rows, LABEL_FIELDS, LABEL_TYPES))
    with pytest.raises(PartialInputError) as info:
        read(path)
    assert info.value.column == "label" and "malware-ish" in str(info.value)
    assert read(path, on_error="skip").table.column("label").to_pylist() == [0]


def test_no_label_column_gives_nulls_not_zeros(tmp_path):
    path = write(tmp_path, "x.conn.log.labeled", zeek_text([ROW_A, ROW_B]))
    result = read(path)
    assert result.table.column("label").to_pylist() == [None, None]
    assert result.stats["labeled"] is False
    assert any("no label column" in w for w in result.warnings)
    with pytest.raises(BadInputError, match="no label column"):
        read(path, drop_unlabeled=True)


# --------------------------------------------------------------------- JSON


def test_zeek_json_epoch_iso_and_omitted_keys(tmp_path):
    objs = [
        {
            "ts": 1664462456.755299,
            "uid": "C1",
            "id.orig_h": "172.16.1.11",
            "id.orig_p": 40042,
            "id.resp_h": "8.8.8.8",
            "id.resp_p": 53,
            "proto": "udp",
            "service": "dns",
            "duration": 0.012166976928710938,
            "orig_pkts": 1,
        },
        {
            "ts": "2022-09-29T14:40:56.755299Z",
            "uid": "C2",
            "id.orig_h": "::1",
            "id.orig_p": 1,
            "id.resp_h": "::2",
            "id.resp_p": 2,
            "proto": "tcp",
            "label": "Malicious",
            "detailed-label": "PortScan",
        },
    ]
    path = write(tmp_path, "conn.json", "\n".join(json.dumps(o) for o in objs) + "\n")
    result = read(path)
    a, b = result.table.to_pylist()
    assert result.format == "zeek-json"
    assert a["duration"] == 0.012166976928710938 and a["resp_bytes"] is None
    assert a["orig_pkts"] == 1 and a["conn_state"] is None and a["label"] is None
    assert b["ts"] == 1664462456.755299 and b["service"] is None
    assert b["label"] == 1 and b["label_detail"] == "PortScan"
    assert list(iter_records(path)) == [a, b]


# One good Zeek JSON conn record.
JSON_FLOW = {
    "ts": 1.5,
    "id.orig_h": "10.0.0.1",
    "id.orig_p": 1,
    "id.resp_h": "10.0.0.2",
    "id.resp_p": 2,
    "proto": "tcp",
}


def test_zeek_json_bad_lines(tmp_path):
    good = json.dumps(JSON_FLOW)
    wrong_type = good.replace('"id.orig_p": 1', '"id.orig_p": "one"')
    path = write(
        tmp_path, "j.log", "\n".join([good, "{not json", good, wrong_type]) + "\n"
    )
    with pytest.raises(PartialInputError) as info:
        read(path)
    assert info.value.line == 2 and info.value.result.table.num_rows == 1
    result = read(path, on_error="skip")
    assert result.skipped == 2 and result.table.num_rows == 2
    assert "line 2" in result.warnings[0]


@pytest.mark.parametrize(
    ("ts", "found"), [(1e300, "1e+300"), (253402300800000, "253402300800000")]
)
def test_zeek_json_time_past_9999_is_a_bad_row(tmp_path, ts, found):
    """A JSON ts from 10**11 on is milliseconds (JSON::TS_MILLIS): the message says
    so and quotes the number as written, not divided by 1000."""
    from flows.readers.stream import parse_json_line as stream_json_line

    last = 253402300799999  # the last millisecond of 9999 is a time
    lines = [JSON_FLOW, dict(JSON_FLOW, ts=ts), dict(JSON_FLOW, ts=last)]
    path = write(tmp_path, "j.log", "".join(json.dumps(o) + "\n" for o in lines))
    problem = (
        "expected a time in epoch seconds before the year 10000 (from 100000000000 "
        "on, Zeek's JSON::TS_MILLIS milliseconds, below 253402300800000), found "
        f"{found}"
    )
    for attempt in (read, lambda p: list(iter_records(p))):
        with pytest.raises(PartialInputError) as info:
            attempt(path)
        assert (info.value.line, info.value.column) == (2, "ts")
        assert str(info.value) == f"{path}, line 2, column 'ts': {problem}"
    with pytest.raises(BadInputError) as info:
        stream_json_line(json.dumps(dict(JSON_FLOW, ts=ts)), "<stdin>", 7)
    assert str(info.value) == f"<stdin>, line 7, column 'ts': {problem}"
    result = read(path, on_error="skip")
    assert result.skipped == 1
    assert result.table.column("ts").to_pylist() == [1.5, 253402300799.999]


@pytest.mark.parametrize(
    ("ts", "found"), [(-5, "-5"), ("1969-12-31T23:59:59.500000Z", "-0.5")]
)
def test_zeek_json_time_before_1970_is_a_bad_row(tmp_path, ts, found):
    good = JSON_FLOW
    lines = [good, dict(good, ts=ts), dict(good, ts=0)]
    path = write(tmp_path, "j.log", "".join(json.dumps(o) + "\n" for o in lines))
    for attempt in (read, lambda p: list(iter_records(p))):
        with pytest.raises(PartialInputError) as info:
            attempt(path)
        assert (info.value.line, info.value.column) == (2, "ts")
        assert str(info.value) == f"{path}, line 2, column 'ts': {BEFORE_1970}{found}"
    result = read(path, on_error="skip")
    assert result.skipped == 1 and result.stats["skipped_lines"] == [2]
    assert result.table.column("ts").to_pylist() == [1.5, 0.0]


# ------------------------------------------------------------------ NSL-KDD

KDD_ROW = (
    "0,tcp,private,REJ,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,229,10,0.00,0.00,"
    "1.00,1.00,0.04,0.06,0.00,255,10,0.04,0.06,0.00,0.00,0.00,0.00,1.00,1.00"
)


def test_nsl_kdd_text_labels_families_difficulty(tmp_path):
    lines = [
        f"{KDD_ROW},{name},{d}"
        for name, d in [
            ("normal", 21),
            ("neptune", 20),
            ("apache2", 18),
            ("mscan", 7),
            ("httptunnel", 12),
            ("buffer_overflow", 3),
            ("newattack", 5),
        ]
    ]
    path = write(tmp_path, "KDDTest+.txt", "\n".join(lines) + "\n")
    result = read(path)
    t = result.table
    assert result.format == "nsl-kdd" and result.family == "nsl-kdd"
    assert t.column_names[:4] == ["duration", "protocol_type", "service", "flag"]
    assert (
        len(t.column_names) == 45 and t.column_names[40] == "dst_host_srv_rerror_rate"
    )
    assert t.column("label").to_pylist() == [0, 1, 1, 1, 1, 1, 1]
    assert t.column("attack_family").to_pylist() == [
        "normal",
        "DoS",
        "DoS",
        "Probe",
        "R2L",
        "U2R",
        None,
    ]
    assert t.column("difficulty").to_pylist() == [21, 20, 18, 7, 12, 3, 5]
    assert t.column("count").to_pylist()[0] == 229
    assert t.column("dst_host_srv_rerror_rate").to_pylist()[0] == 1.0
    assert any("newattack" in w for w in result.warnings)
    gz = write(tmp_path, "k.txt.gz", gzip.compress(path.read_bytes()))
    assert read(gz).table.equals(t)


def test_nsl_kdd_arff(tmp_path):
    from flows.readers.nslkdd import KDD_FEATURES

    head = (
        ["@relation 'KDDTrain'"]
        + [f"@attribute '{n}' real" for n in KDD_FEATURES]
        + ["@attribute 'class' {'normal', 'anomaly'}", "", "@data"]
    )
    rows = [f"{KDD_ROW},normal", f"{KDD_ROW},anomaly"]
    path = write(tmp_path, "KDDTrain+.arff", "\n".join(head + rows) + "\n")
    result = read(path)
    assert result.format == "nsl-kdd"
    assert result.table.column("label").to_pylist() == [0, 1]
    assert result.table.column("difficulty").to_pylist() == [None, None]
    assert result.table.column("protocol_type").to_pylist() == ["tcp", "tcp"]


def test_nsl_kdd_bad_number(tmp_path):
    bad = KDD_ROW.replace("0,tcp,private,REJ,0", "0,tcp,private,REJ,abc", 1)
    path = write(tmp_path, "k.txt", f"{KDD_ROW},normal,21\n{bad},normal,21\n")
    with pytest.raises(PartialInputError) as info:
        read(path)
    assert info.value.line == 2 and info.value.column == "src_bytes"
    assert read(path, on_error="skip").skipped == 1


@pytest.mark.parametrize(
    ("index", "column"), [(0, "duration"), (4, "src_bytes"), (5, "dst_bytes")]
)
def test_nsl_kdd_negative_duration_or_bytes_is_a_bad_row(tmp_path, index, column):
    values = KDD_ROW.split(",")
    values[index] = "-7"
    bad = ",".join(values)
    text = f"{KDD_ROW},normal,21\n{bad},neptune,20\n{KDD_ROW},normal,9\n"
    path = write(tmp_path, "k.txt", text)
    result = _one_negative_row(path, 2, column, "-7")
    assert result.table.column("difficulty").to_pylist() == [21, 9]


def _one_negative_row(path, line: int, column: str, found: str):
    """One row with a negative count at ``line``: a partial read stopping there
    (the row before kept), then a skipping read without it; the skipping result."""
    with pytest.raises(PartialInputError) as info:
        read(path)
    err = info.value
    assert (err.line, err.column, err.exit_code) == (line, column, 4)
    problem = f"column {column!r}: expected a number >= 0, found {found}"
    assert str(err) == f"{path}, line {line}, {problem}"
    assert err.result.table.num_rows == 1

    result = read(path, on_error="skip")
    assert result.skipped == 1 and result.stats["skipped_lines"] == [line]
    expected = f"skipped 1 bad line(s); the first at line {line}, {problem}"
    assert expected in result.warnings[0]
    return result


@pytest.mark.parametrize(("cell", "found"), [("", "''"), ("'.'", "\"'.'\"")])
def test_nsl_kdd_empty_label_is_a_bad_row_not_an_attack(tmp_path, cell, found):
    text = f"{KDD_ROW},normal,21\n{KDD_ROW},{cell},20\n{KDD_ROW},neptune,9\n"
    path = write(tmp_path, "k.txt", text)
    with pytest.raises(PartialInputError) as info:
        read(path)
    err = info.value
    problem = f"column 'label': expected an attack name or 'normal', found {found}"
    assert (err.line, err.column, err.exit_code) == (2, "label", 4)
    assert str(err) == f"{path}, line 2, {problem}"
    assert err.result.table.column("label").to_pylist() == [0]

    result = read(path, on_error="skip")
    assert result.skipped == 1 and result.stats["skipped_lines"] == [2]
    assert result.table.column("label").to_pylist() == [0, 1]
    assert result.table.column("label_detail").to_pylist() == ["normal", "neptune"]


@pytest.mark.parametrize(("value", "found"), [("5.5", "5.5"), ("-0.01", "-0.01"),
                                            ("2", "2")])
def test_nsl_kdd_rate_outside_0_to_1_is_a_bad_row(tmp_path, value, found):
    """Found: rate features took any number (``serror_rate`` 5.5)."""
    from flows.readers.nslkdd import KDD_FEATURES

    cells = KDD_ROW.split(",")
    at = KDD_FEATURES.index("serror_rate")
    bad_row = ",".join(cells[:at] + [value] + cells[at + 1:])
    edge = ",".join(cells[:at] + ["1.00"] + cells[at + 1:])  # 1 is a rate
    text = f"{KDD_ROW},normal,21\n{edge},normal,21\n{bad_row},neptune,20\n"
    path = write(tmp_path, "k.txt", text)

    with pytest.raises(PartialInputError) as info:
        read(path)

    assert str(info.value) == (
        f"{path}, line 3, column 'serror_rate': expected a rate from 0 to 1, "
        f"found {found}"
    )
    assert info.value.result.table.num_rows == 2


def test_nsl_kdd_csv_with_header_empty_label_names_its_column(tmp_path):
    from flows.readers.nslkdd import KDD_FEATURES

    head = ",".join(KDD_FEATURES + ("class", "level"))
    path = write(tmp_path, "k.csv", f"{head}\n{KDD_ROW},normal,21\n{KDD_ROW}, ,3\n")
    with pytest.raises(PartialInputError) as info:
        read(path)
    assert str(info.value) == (
        f"{path}, line 3, column 'class': expected an attack name or 'normal', "
        "found ' '"
    )


def test_nsl_kdd_csv_with_header_negative_duration_is_named_at_its_line(tmp_path):
    from flows.readers.nslkdd import KDD_FEATURES

    head = ",".join(KDD_FEATURES + ("class", "level"))
    bad = KDD_ROW.replace("0,tcp", "-1,tcp", 1)
    path = write(tmp_path, "k.csv", f"{head}\n{bad},normal,21\n")
    with pytest.raises(BadInputError) as info:  # the first row: nothing kept
        read(path)
    assert not isinstance(info.value, PartialInputError)
    assert (info.value.line, info.value.column) == (2, "duration")
    assert read(path, on_error="skip").table.num_rows == 0


# ---------------------------------------------------------------- binetflow

BINET_HEAD = (
    "StartTime,Dur,Proto,SrcAddr,Sport,Dir,DstAddr,Dport,State,sTos,dTos,"
    "TotPkts,TotBytes,SrcBytes,SrcPkts,Label"
)


def test_binetflow_comma_hex_ports_dir_and_labels(tmp_path):
    rows = [
        "2011/08/10 09:46:53.047277,3.5,tcp,147.32.84.165,1027,   ->,1.2.3.4,0x0050,"
        "S_RA,0,0,4,244,124,2,flow=From-Botnet-V42-TCP-Attempt",
        "2011/08/10 09:46:54.000000,0.1,UDP,147.32.84.2,0x0035,  <->,147.32.84.3,53,"
        "CON,0,,2,180,90,1,flow=To-Normal-V42-UDP-DNS",
        "2011/08/10 09:46:55.5,0,icmp,1.1.1.1,,  <-,2.2.2.2,,ECO,,,1,60,60,1,"
        "flow=Background-TCP-Attempt",
        "2011/08/10 09:46:56.000000,0,tcp,1.1.1.1,1,   ->,2.2.2.2,2,REQ,,,1,60,60,1,",
    ]
    result = read(
        write(tmp_path, "c.binetflow", BINET_HEAD + "\n" + "\n".join(rows) + "\n")
    )
    t = result.table.to_pylist()
    assert result.format == "binetflow" and result.family == "conn"
    assert t[0]["ts"] == 1312969613.047277 and t[0]["dst_port"] == 80
    assert t[1]["src_port"] == 53 and t[1]["proto"] == "udp"
    assert t[0]["orig_ip_bytes"] == 124 and t[0]["resp_ip_bytes"] == 120
    assert t[0]["orig_pkts"] == 2 and t[0]["resp_pkts"] == 2
    assert t[2]["src_port"] is None and t[2]["ts"] == 1312969615.5
    assert [r["label"] for r in t] == [1, 0, None, None]
    assert t[0]["label_detail"] == "flow=From-Botnet-V42-TCP-Attempt"
    # <- is not swapped: SrcAddr stays the originator
    assert t[2]["src_ip"] == "1.1.1.1"
    assert result.stats["dir"] == {"->": 2, "<->": 1, "<-": 1}


def test_binetflow_tab_and_missing_srcpkts(tmp_path):
    head = BINET_HEAD.replace(",SrcPkts", "").replace(",", "\t")
    row = "\t".join(
        [
            "2018/09/27 22:40:52.403669",
            "0.008364",
            "udp",
            "192.168.2.12",
            "56343",
            "  <->",
            "192.168.2.1",
            "53",
            "CON",
            "0",
            "0",
            "2",
            "208",
            "72",
            "flow=Normal",
        ]
    )
    rec = only(read(write(tmp_path, "t.binetflow", head + "\n" + row + "\n")))
    assert rec["orig_pkts"] is None and rec["resp_pkts"] is None
    assert rec["resp_ip_bytes"] == 136 and rec["label"] == 0


def _binet_row(tot_pkts, tot_bytes, src_bytes, src_pkts):
    return (
        "2011/08/10 09:46:53.0,1,tcp,10.0.0.1,1027,   ->,10.0.0.2,80,S_RA,0,0,"
        f"{tot_pkts},{tot_bytes},{src_bytes},{src_pkts},flow=From-Botnet"
    )


@pytest.mark.parametrize(
    ("counts", "column", "message"),
    [
        ((4, -5, 60, 2), "TotBytes", "expected a number >= 0, found -5"),
        ((4, 100, 124, 2), "TotBytes", "expected at least SrcBytes (124), found 100"),
        ((-1, 244, 124, 2), "TotPkts", "expected a number >= 0, found -1"),
        ((1, 244, 124, 2), "TotPkts", "expected at least SrcPkts (2), found 1"),
        # one of the pair not a number: that one is named (as before this fix)
        ((4, 244, "abc", 2), "SrcBytes", "expected an integer, found 'abc'"),
        ((4, "abc", 124, 2), "TotBytes", "expected an integer, found 'abc'"),
    ],
)
def test_binetflow_total_below_its_part_names_the_total(
    tmp_path, counts, column, message
):
    rows = [_binet_row(4, 244, 124, 2), _binet_row(*counts), _binet_row(4, 244, 124, 2)]
    path = write(tmp_path, "t.binetflow", BINET_HEAD + "\n" + "\n".join(rows) + "\n")
    with pytest.raises(PartialInputError) as info:
        read(path)
    err = info.value
    assert (err.line, err.column) == (3, column)
    assert str(err) == f"{path}, line 3, column {column!r}: {message}"
    result = read(path, on_error="skip")
    assert result.skipped == 1 and result.stats["skipped_lines"] == [3]
    assert result.table.column("resp_ip_bytes").to_pylist() == [120, 120]


ARGUS_ROW = dict(
    zip(
        BINET_HEAD.split(","),
        "2011/08/10 09:46:53.0,1,tcp,10.0.0.1,1027,   ->,10.0.0.2,80,S_RA,0,0,"
        "4,244,124,2,flow=From-Botnet".split(","),
        strict=True,
    )
)


def _argus(**values: str) -> str:
    """One binetflow row in BINET_HEAD's columns, with ``values`` replaced."""
    return ",".join({**ARGUS_ROW, **values}.values())


def _argus_file(tmp_path, *rows: str):
    return write(tmp_path, "a.binetflow", BINET_HEAD + "\n" + "\n".join(rows) + "\n")


@pytest.mark.parametrize(
    ("values", "column", "found"),
    [
        ({"Dur": "-0.5"}, "Dur", "-0.5"),
        ({"TotBytes": "-200", "SrcBytes": "-300"}, "TotBytes", "-200"),
        ({"TotBytes": "10", "SrcBytes": "-3"}, "SrcBytes", "-3"),
        ({"TotPkts": "-1", "SrcPkts": "-2"}, "TotPkts", "-1"),
        ({"TotPkts": "4", "SrcPkts": "-3"}, "SrcPkts", "-3"),
    ],
)
def test_binetflow_negative_duration_or_count_is_a_bad_row(
    tmp_path, values, column, found
):
    """Found: a negative part under a larger total (TotBytes 10, SrcBytes -3) was
    taken, and gave canonical rows the Parquet reader refuses."""
    path = _argus_file(tmp_path, _argus(), _argus(**values), _argus(Dur="0"))
    expected = (
        f"{path}, line 3, column {column!r}: expected a number >= 0, found {found}"
    )
    with pytest.raises(PartialInputError) as info:
        read(path)
    err = info.value
    assert (err.path, err.line, err.column, err.exit_code) == (str(path), 3, column, 4)
    assert str(err) == expected
    assert err.result.table.num_rows == 1

    result = read(path, on_error="skip")
    assert result.skipped == 1 and result.stats["skipped_lines"] == [3]
    assert result.table.column("duration").to_pylist() == [1.0, 0.0]
    assert result.warnings[-1] == (
        f"{path}: skipped 1 bad line(s); the first at line 3, column {column!r}: "
        f"expected a number >= 0, found {found}"
    )


def test_binetflow_negative_count_in_the_first_row_is_bad_input(tmp_path):
    path = _argus_file(tmp_path, _argus(TotBytes="10", SrcBytes="-3"), _argus())
    with pytest.raises(BadInputError) as info:
        read(path)
    assert not isinstance(info.value, PartialInputError)
    assert (info.value.line, info.value.column, info.value.exit_code) == (
        2,
        "SrcBytes",
        3,
    )


def test_binetflow_to_parquet_and_conn_log_round_trip(tmp_path):
    """What the binetflow reader accepts, the Parquet and conn.log readers take
    back unchanged (they refuse negative counts and times before 1970)."""
    rows = [
        _argus(),
        _argus(TotBytes="10", SrcBytes="-3"),
        _argus(SrcPkts="-1"),
        _argus(StartTime="1969/12/31 23:59:59"),
        _argus(StartTime="1970/01/01 00:00:00", Dur="0", TotBytes="60", SrcBytes="60"),
    ]
    src = read(_argus_file(tmp_path, *rows), on_error="skip")
    assert src.skipped == 3 and src.stats["skipped_lines"] == [3, 4, 5]
    assert src.table.column("ts").to_pylist() == [1312969613.0, 0.0]
    assert src.table.column("resp_ip_bytes").to_pylist() == [120, 0]

    write_parquet(src.table, tmp_path / "a.parquet")
    back = read(tmp_path / "a.parquet")  # on_error="fail": no row is refused
    assert (back.format, back.skipped) == ("parquet", 0)
    assert back.table.equals(src.table)
    write_conn_log(src.table, tmp_path / "a.log")
    again = read(tmp_path / "a.log")
    assert (again.format, again.skipped) == ("zeek-tsv", 0)
    assert again.table.equals(src.table)


@pytest.mark.parametrize(
    ("start", "found"),
    [("1969/12/31 23:59:59.5", "-0.5"), ("0000/01/01 00:00:00", "-62167219200")],
)
def test_binetflow_start_time_before_1970_is_a_bad_row(tmp_path, start, found):
    rows = [_argus(StartTime="1970/01/01 00:00:00"), _argus(StartTime=start), _argus()]
    path = _argus_file(tmp_path, *rows)
    with pytest.raises(PartialInputError) as info:
        read(path)
    assert (info.value.line, info.value.column) == (3, "StartTime")
    assert str(info.value) == (
        f"{path}, line 3, column 'StartTime': {BEFORE_1970}{found}"
    )
    result = read(path, on_error="skip")
    assert result.skipped == 1 and result.stats["skipped_lines"] == [3]
    assert result.table.column("ts").to_pylist() == [0.0, 1312969613.0]


PRAGUE = "Europe/Prague"


def test_binetflow_start_time_read_in_a_named_zone(tmp_path):
    """``timezone``: StartTime is the local time of that zone (Argus writes no
    zone). The expected times are worked out here with fixed UTC offsets."""
    from datetime import datetime, timedelta, timezone

    def at(hours: int, *when: int) -> float:
        return datetime(*when, tzinfo=timezone(timedelta(hours=hours))).timestamp()

    rows = [
        _argus(StartTime="2011/08/10 09:46:53.047277"),  # summer time: UTC+2
        _argus(StartTime="2011/01/10 09:46:53"),  # winter: UTC+1
        _argus(StartTime="2011/10/30 02:30:00"),  # shown twice: the first (UTC+2)
        _argus(StartTime="2011/03/27 02:30:00"),  # skipped: the offset before (+1)
        _argus(StartTime="1970/01/01 01:00:00"),  # 1970 in Prague: UTC+1
    ]
    path = _argus_file(tmp_path, *rows)
    prague = read(path, timezone=PRAGUE).table.column("ts").to_pylist()
    assert prague == [
        at(2, 2011, 8, 10, 9, 46, 53) + 0.047277,
        at(1, 2011, 1, 10, 9, 46, 53),
        at(2, 2011, 10, 30, 2, 30),
        at(1, 2011, 3, 27, 2, 30),
        0.0,
    ]
    assert prague[0] == 1312962413.047277
    assert [r["ts"] for r in iter_records(path, timezone=PRAGUE)] == prague
    # The default is UTC, as before the option; "UTC" names it.
    utc = [at(0, 2011, 8, 10, 9, 46, 53) + 0.047277, at(0, 2011, 1, 10, 9, 46, 53)]
    for table in (read(path).table, read(path, timezone="UTC").table):
        assert table.column("ts").to_pylist()[:2] == utc
    assert read(path, timezone="America/New_York").table.column("ts")[1].as_py() == (
        at(-5, 2011, 1, 10, 9, 46, 53)
    )


def test_binetflow_time_in_a_zone_before_1970_utc_is_a_bad_row(tmp_path):
    rows = [_argus(), _argus(StartTime="1970/01/01 00:30:00")]
    path = _argus_file(tmp_path, *rows)
    assert read(path).table.num_rows == 2  # 00:30 UTC is after the epoch
    with pytest.raises(PartialInputError) as info:
        read(path, timezone=PRAGUE)
    assert str(info.value) == (
        f"{path}, line 3, column 'StartTime': {BEFORE_1970}-1800"
    )


@pytest.mark.parametrize("zone", ["Europe/Prag", "Europe", "", "../etc/passwd"])
def test_an_unknown_time_zone_is_a_usage_error(tmp_path, zone):
    argus = _argus_file(tmp_path, _argus())
    zeek = write(tmp_path, "conn.log", zeek_text([ROW_A]))
    expected = (
        f"unknown time zone {zone!r}: expected an IANA name such as Europe/Prague "
        "or America/New_York, or UTC"
    )
    for path in (argus, zeek):  # refused whatever the format, before any read
        for attempt in (
            lambda p: read(p, timezone=zone),
            lambda p: list(iter_records(p, timezone=zone)),
        ):
            with pytest.raises(UsageError) as info:
                attempt(path)
            assert str(info.value) == expected and info.value.exit_code == 2


def test_timezone_leaves_formats_with_epoch_times_alone(tmp_path):
    path = write(tmp_path, "conn.log", zeek_text([ROW_A, ROW_B]))
    assert read(path, timezone=PRAGUE).table.equals(read(path).table)


# -------------------------------------------------------------- UNSW and CIC


def test_unsw_bom_crlf(tmp_path):
    head = "id,dur,proto,service,state,spkts,sbytes,rate,attack_cat,label"
    rows = [
        "1,0.000011,udp,-,INT,2,496,90909.0902,Normal,0",
        "2,1.5,tcp,http,FIN,10,1000,6.6,Exploits,1",
    ]
    data = b"\xef\xbb\xbf" + "\r\n".join([head] + rows).encode() + b"\r\n"
    result = read(write(tmp_path, "u.csv", data))
    assert result.format == "unsw-nb15" and result.family == "unsw-nb15"
    assert result.table.column_names == [
        "dur",
        "proto",
        "service",
        "state",
        "spkts",
        "sbytes",
        "rate",
        "label",
        "label_detail",
    ]
    a, b = result.table.to_pylist()
    assert a["service"] is None and a["rate"] == 90909.0902 and a["label"] == 0
    assert b["state"] == "FIN" and b["label_detail"] == "Exploits"


def test_cic_names_duplicates_repeated_headers_and_non_finite(tmp_path):
    head = (
        " Destination Port, Flow Duration, Total Fwd Packets, Flow Bytes/s,"
        " Flow Packets/s, Fwd Header Length, Fwd Header Length, Label"
    )
    rows = [
        "80,100,2,Infinity,NaN,40,40,BENIGN",
        head,
        "443,5,1,,20000.5,20,20,DDoS",
        "22,7,3,-Infinity,1.5,32,32,SSH-Patator",
    ]
    result = read(write(tmp_path, "cic.csv", "\n".join([head] + rows) + "\n"))
    t = result.table
    assert result.format == "cic-csv" and result.family == "cic"
    assert "Flow Duration" in t.column_names and "Fwd Header Length_2" in t.column_names
    assert t.num_rows == 3 and result.stats["repeated_headers"] == 1
    assert t.column("Flow Bytes/s").to_pylist() == [None, None, None]
    assert t.column("Flow Packets/s").to_pylist() == [None, 20000.5, 1.5]
    assert result.stats["non_finite"] == 4
    assert t.column("label").to_pylist() == [0, 1, 1]
    assert t.column("label_detail").to_pylist() == ["BENIGN", "DDoS", "SSH-Patator"]


UNSW_HEAD = "id,dur,proto,service,state,spkts,dpkts,sbytes,dbytes,rate,attack_cat,label"
UNSW_ROW = "1,0.5,tcp,-,FIN,2,2,100,200,4.0,Normal,0"


@pytest.mark.parametrize("column", ["dur", "spkts", "dpkts", "sbytes", "dbytes"])
def test_unsw_negative_duration_or_count_is_a_bad_row(tmp_path, column):
    values = UNSW_ROW.split(",")
    values[UNSW_HEAD.split(",").index(column)] = "-2.5"
    rows = [UNSW_ROW, ",".join(values), "3,0,udp,dns,INT,0,0,0,0,0,Exploits,1"]
    path = write(tmp_path, "u.csv", "\n".join([UNSW_HEAD] + rows) + "\n")
    result = _one_negative_row(path, 3, column, "-2.5")
    assert result.table.column(column).to_pylist() == [
        float(UNSW_ROW.split(",")[UNSW_HEAD.split(",").index(column)]),
        0.0,  # zero is a count
    ]


def test_unsw_negative_first_row_is_bad_input(tmp_path):
    bad = UNSW_ROW.replace(",100,200,", ",-100,200,")
    path = write(tmp_path, "u.csv", f"{UNSW_HEAD}\n{bad}\n{UNSW_ROW}\n")
    with pytest.raises(BadInputError) as info:
        read(path)
    assert not isinstance(info.value, PartialInputError)
    assert (info.value.line, info.value.column) == (2, "sbytes")
    assert info.value.exit_code == 3


def test_cic_negative_duration_or_total_is_a_bad_row_other_negatives_stay(tmp_path):
    head = (
        " Flow Duration, Total Fwd Packets, Total Length of Fwd Packets,"
        " Init_Win_bytes_forward, Flow IAT Min, Label"
    )
    rows = [
        "100,2,80,-1,-3,BENIGN",  # -1: no window seen; IATs are not checked
        "-12,2,80,8192,5,BENIGN",
        "100,-2,80,8192,5,DoS",
        "100,2,-80,8192,5,DoS",
        "Infinity,0,0,8192,5,BENIGN",  # the CIC rule: null, not bad
    ]
    path = write(tmp_path, "cic.csv", "\n".join([head] + rows) + "\n")
    result = read(path, on_error="skip")
    assert result.skipped == 3 and result.stats["skipped_lines"] == [3, 4, 5]
    t = result.table
    assert t.column("Init_Win_bytes_forward").to_pylist() == [-1.0, 8192.0]
    assert t.column("Flow IAT Min").to_pylist() == [-3.0, 5.0]
    assert t.column("Flow Duration").to_pylist() == [100.0, None]
    assert result.warnings[1].endswith(
        "the first at line 3, column 'Flow Duration': expected a number >= 0, "
        "found -12"
    )
    with pytest.raises(PartialInputError) as info:
        read(path)
    assert (info.value.line, info.value.column) == (3, "Flow Duration")
    assert str(info.value) == (
        f"{path}, line 3, column 'Flow Duration': expected a number >= 0, found -12"
    )


@pytest.mark.parametrize(
    "column", ["Tot Fwd Pkts", "Tot Bwd Pkts", "TotLen Fwd Pkts", "TotLen Bwd Pkts"]
)
def test_cic_2018_total_names_are_checked_too(tmp_path, column):
    names = ["Dst Port", "Flow Duration", "Tot Fwd Pkts", "Tot Bwd Pkts",
             "TotLen Fwd Pkts", "TotLen Bwd Pkts", "Flow IAT Mean", "Label"]
    good = ["80", "5", "1", "1", "40", "40", "2.5", "Benign"]
    bad = list(good)
    bad[names.index(column)] = "-1"
    text = "\n".join(",".join(r) for r in (names, good, bad)) + "\n"
    with pytest.raises(PartialInputError) as info:
        read(write(tmp_path, "c.csv", text))
    assert (info.value.line, info.value.column) == (3, column)


def test_unsw_start_or_last_time_before_1970_is_a_bad_row(tmp_path):
    head = (
        "srcip,sport,dstip,dsport,proto,state,dur,sbytes,stime,ltime,attack_cat,label"
    )
    rows = [
        "10.0.0.1,1,10.0.0.2,80,tcp,FIN,0.5,100,1421927414,1421927415,,0",
        "10.0.0.1,1,10.0.0.2,80,tcp,FIN,0.5,100,-1,1421927415,,0",
        "10.0.0.1,1,10.0.0.2,80,tcp,FIN,0.5,100,0,-3.5,Exploits,1",
        "10.0.0.1,1,10.0.0.2,80,tcp,FIN,0.5,100,0,0,Exploits,1",
    ]
    path = write(tmp_path, "u.csv", "\n".join([head] + rows) + "\n")
    with pytest.raises(PartialInputError) as info:
        read(path)
    assert str(info.value) == f"{path}, line 3, column 'stime': {BEFORE_1970}-1"
    result = read(path, on_error="skip")
    assert result.skipped == 2 and result.stats["skipped_lines"] == [3, 4]
    assert result.table.column("stime").to_pylist() == [1421927414.0, 0.0]
    assert result.warnings[-1].endswith(f"line 3, column 'stime': {BEFORE_1970}-1")


# ------------------------------- counts and ports must be whole numbers

WHOLE_PORT = "expected a port from 0 to 65535 (a whole number), "
WHOLE_COUNT = "expected a whole number >= 0, "


def _one_bad_value(path, line: int, column: str, problem: str):
    """One bad row at ``line``: a partial read stopping there (the row before kept),
    then a skipping read without it; the skipping result. ``problem`` is the exact
    text after the column in the error and the warning."""
    with pytest.raises(PartialInputError) as info:
        read(path)
    err = info.value
    assert (err.path, err.line, err.column) == (str(path), line, column)
    assert err.exit_code == 4
    assert str(err) == f"{path}, line {line}, column {column!r}: {problem}"
    assert err.result.table.num_rows == 1

    result = read(path, on_error="skip")
    assert result.skipped == 1 and result.stats["skipped_lines"] == [line]
    assert result.warnings[-1] == (
        f"{path}: skipped 1 bad line(s); the first at line {line}, "
        f"column {column!r}: {problem}"
    )
    return result


@pytest.mark.parametrize("column", ["spkts", "dpkts", "sbytes", "dbytes"])
def test_unsw_packet_or_byte_count_with_a_fraction_is_a_bad_row(tmp_path, column):
    """Found: ``spkts=3.5`` was read as a count. ``3.0`` (a whole number written as
    a float) is still 3; ``dur`` is seconds and keeps its fraction."""
    where = UNSW_HEAD.split(",").index(column)
    bad, whole = UNSW_ROW.split(","), UNSW_ROW.split(",")
    bad[where], whole[where] = "3.5", "3.0"
    rows = [UNSW_ROW, ",".join(bad), ",".join(whole)]
    path = write(tmp_path, "u.csv", "\n".join([UNSW_HEAD] + rows) + "\n")
    result = _one_bad_value(path, 3, column, f"{WHOLE_COUNT}found 3.5")
    assert result.table.column(column).to_pylist() == [
        float(UNSW_ROW.split(",")[where]),
        3.0,
    ]
    assert result.table.column("dur").to_pylist() == [0.5, 0.5]


@pytest.mark.parametrize("column", ["sport", "dsport"])
def test_unsw_port_with_a_fraction_is_a_bad_row(tmp_path, column):
    head = "srcip,sport,dstip,dsport,proto,state,dur,sbytes,attack_cat,label"
    names = head.split(",")
    good = "10.0.0.1,1027,10.0.0.2,80,tcp,FIN,0.5,100,,0".split(",")
    bad, whole = list(good), list(good)
    bad[names.index(column)], whole[names.index(column)] = "1.5", "443.0"
    rows = [",".join(r) for r in (good, bad, whole)]
    path = write(tmp_path, "u.csv", "\n".join([head] + rows) + "\n")
    result = _one_bad_value(path, 3, column, f"{WHOLE_PORT}found 1.5")
    assert result.table.column(column).to_pylist() == [
        float(good[names.index(column)]),
        443.0,
    ]


CIC_HEAD = (
    "Source Port,Destination Port,Flow Duration,Total Fwd Packets,"
    "Total Length of Fwd Packets,Flow IAT Mean,Label"
)
CIC_ROW = "40000,80,100,2,80,2.5,BENIGN"


@pytest.mark.parametrize(
    ("column", "value", "problem"),
    [
        ("Source Port", "1.5", WHOLE_PORT),
        ("Destination Port", "80.25", WHOLE_PORT),
        ("Total Fwd Packets", "2.5", WHOLE_COUNT),
        ("Total Length of Fwd Packets", "0.5", WHOLE_COUNT),
    ],
    ids=["src-port", "dst-port", "fwd-packets", "fwd-bytes"],
)
def test_cic_port_or_total_with_a_fraction_is_a_bad_row(
    tmp_path, column, value, problem
):
    """Found: a port of ``1.5`` and a packet total of ``2.5`` were taken. ``2.0`` is
    2; ``Flow Duration`` and the rates are not counts and keep their fractions."""
    where = CIC_HEAD.split(",").index(column)
    bad, whole = CIC_ROW.split(","), CIC_ROW.split(",")
    bad[where], whole[where] = value, "2.0"
    whole[2] = "100.5"  # Flow Duration (microseconds) is not checked for a fraction
    rows = [CIC_ROW, ",".join(bad), ",".join(whole)]
    path = write(tmp_path, "cic.csv", "\n".join([CIC_HEAD] + rows) + "\n")
    result = _one_bad_value(path, 3, column, f"{problem}found {value}")
    t = result.table
    assert t.column(column).to_pylist() == [float(CIC_ROW.split(",")[where]), 2.0]
    assert t.column("Flow Duration").to_pylist() == [100.0, 100.5]
    assert t.column("Flow IAT Mean").to_pylist() == [2.5, 2.5]


def test_cic_negative_total_with_a_fraction_is_named_for_being_negative(tmp_path):
    bad = CIC_ROW.split(",")
    bad[3] = "-2.5"
    path = write(tmp_path, "cic.csv", f"{CIC_HEAD}\n{CIC_ROW}\n{','.join(bad)}\n")
    _one_bad_value(path, 3, "Total Fwd Packets", "expected a number >= 0, found -2.5")


@pytest.mark.parametrize(
    ("column", "value", "problem"),
    [
        ("Source Port", "70000", "expected a port from 0 to 65535, found 70000"),
        ("Destination Port", "70000.0", "expected a port from 0 to 65535, found 70000"),
        ("Destination Port", "-1", "expected a port from 0 to 65535, found -1"),
        ("Total Fwd Packets", "-3", "expected a number >= 0, found -3"),
        ("Flow Duration", "-12.5", "expected a number >= 0, found -12.5"),
    ],
    ids=["src-port", "dst-port-float", "dst-port-negative", "packets", "duration"],
)
def test_cic_whole_numbers_out_of_range_are_quoted_as_integers(
    tmp_path, column, value, problem
):
    """Found: a port of 70000 in a float column was quoted as ``found 70000.0``;
    a value with a fraction keeps it (``-12.5``)."""
    where = CIC_HEAD.split(",").index(column)
    bad = CIC_ROW.split(",")
    bad[where] = value
    path = write(
        tmp_path, "cic.csv", "\n".join([CIC_HEAD, CIC_ROW, ",".join(bad)]) + "\n"
    )
    _one_bad_value(path, 3, column, problem)


def test_record_problems_quote_whole_floats_as_integers():
    from flows.record import port_problem, time_problem, value_problem

    assert port_problem(70000.0) == "expected a port from 0 to 65535, found 70000"
    assert port_problem(80.5) == (
        "expected a port from 0 to 65535 (a whole number), found 80.5"
    )
    assert time_problem(-2600.0) == f"{BEFORE_1970}-2600"
    assert time_problem(-0.5) == f"{BEFORE_1970}-0.5"
    assert time_problem(float("-inf")) == "expected a finite number, found -inf"
    assert time_problem(1e300) == f"{PAST_9999}1e+300"
    # Past 2**53 a float names no one integer: its repr stays.
    assert value_problem("i64", 1e300) == (
        f"expected an integer from {-(2**63)} to {2**63 - 1}, found 1e+300"
    )


@pytest.mark.parametrize(
    ("index", "column", "value"),
    [(4, "src_bytes", "3.5"), (5, "dst_bytes", "1e2"), (22, "count", "229.0")],
)
def test_nsl_kdd_count_that_is_no_integer_is_a_bad_row(tmp_path, index, column, value):
    """The KDD counts are integer columns: any value not written as an integer is
    a bad row (the shared KDD files write every count as an integer)."""
    values = KDD_ROW.split(",")
    values[index] = value
    text = f"{KDD_ROW},normal,21\n{','.join(values)},neptune,20\n{KDD_ROW},normal,9\n"
    path = write(tmp_path, "k.txt", text)
    result = _one_bad_value(path, 2, column, f"expected an integer, found {value!r}")
    assert result.table.column("difficulty").to_pylist() == [21, 9]


@pytest.mark.parametrize(
    ("values", "column", "found"),
    [
        ({"Sport": "1027.5"}, "Sport", "1027.5"),
        ({"Dport": "80.0"}, "Dport", "80.0"),
        ({"TotPkts": "4.5"}, "TotPkts", "4.5"),
        ({"SrcBytes": "124.5"}, "SrcBytes", "124.5"),
    ],
)
def test_binetflow_port_or_count_that_is_no_integer_is_a_bad_row(
    tmp_path, values, column, found
):
    """Argus ports and counts are integer columns (hex ports aside): a value with
    a fraction is a bad row (the shared binetflow files write none)."""
    path = _argus_file(tmp_path, _argus(), _argus(**values), _argus(Dur="0"))
    result = _one_bad_value(path, 3, column, f"expected an integer, found {found!r}")
    assert result.table.column("duration").to_pylist() == [1.0, 0.0]


# ------------------------------------------------- writing and round trips


def test_conn_log_and_parquet_round_trip_exact(tmp_path):
    row = list(ROW_A)
    row[FIELDS.index("history")] = "a\\x09b"
    odd = list(ROW_B)
    odd[FIELDS.index("service")] = "\\x2d"  # a literal "-" string
    odd[FIELDS.index("duration")] = "0.012166976928710938"
    rows = [
        row + ["Malicious", "C&C"],
        odd + ["Background", "(empty)"],
        ROW_A + ["Benign", "Google"],
    ]
    src = read(write(tmp_path, "in.log", zeek_text(rows, LABEL_FIELDS, LABEL_TYPES)))
    assert only(src, 1)["service"] == "-"

    write_conn_log(src.table, tmp_path / "out.log")
    again = read(tmp_path / "out.log")
    assert again.table.equals(src.table)
    write_parquet(src.table, tmp_path / "out.parquet")
    back = read(tmp_path / "out.parquet")
    assert back.format == "parquet" and back.family == "conn"
    assert list(iter_records(tmp_path / "out.parquet")) == src.table.to_pylist()
    text = (tmp_path / "out.log").read_text()
    assert text.startswith("#separator \\x09\n") and "\n#close\t" in text
    assert "#fields\tts\tuid\tid.orig_h\tid.orig_p" in text


def test_parquet_time_before_1970_is_a_bad_row(tmp_path):
    import pyarrow.parquet as pq

    from flows.record import CONN_FIELD_NAMES, columns_to_table

    base = {"ts": 1.0, "src_ip": "10.0.0.1", "src_port": 1, "dst_ip": "10.0.0.2",
            "dst_port": 2, "proto": "tcp"}
    rows = [base, dict(base, ts=-2.0), dict(base, ts=0.0)]
    path = tmp_path / "c.parquet"
    pq.write_table(
        columns_to_table({n: [r.get(n) for r in rows] for n in CONN_FIELD_NAMES}), path
    )
    with pytest.raises(PartialInputError) as info:
        read(path)
    assert (info.value.row, info.value.column) == (2, "ts")
    assert str(info.value) == f"{path}, row 2, column 'ts': {BEFORE_1970}-2"
    result = read(path, on_error="skip")
    assert result.skipped == 1 and result.table.column("ts").to_pylist() == [1.0, 0.0]


def test_parquet_of_other_family_keeps_columns(tmp_path):
    table = pa.table(
        {
            "dur": [1.0],
            "sbytes": [2.0],
            "dbytes": [3.0],
            "sttl": [4.0],
            "label": pa.array([1], pa.int8()),
        }
    )
    write_parquet(table, tmp_path / "u.parquet", family="unsw-nb15")
    result = read(tmp_path / "u.parquet")
    assert result.family == "unsw-nb15" and result.table.equals(table)


# ------------------------------------------------------------------ captures


def test_capture_goes_to_the_flow_meter_or_says_it_is_missing(tmp_path, monkeypatch):
    import struct

    header = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    path = write(tmp_path, "empty.pcap", header)
    assert detect_format(path) == "pcap"
    monkeypatch.setitem(sys.modules, "flows.meter", None)
    with pytest.raises(BadInputError, match="flow meter"):
        read(path)


# ------------------------------------------------------ streaming and extras


def test_iter_records_matches_read_on_cut_gzip(tmp_path):
    rows = []
    for i in range(2500):
        row = list(ROW_B)
        row[FIELDS.index("uid")] = f"U{i}"
        rows.append(row)
    full = gzip.compress(zeek_text(rows).encode())
    path = write(tmp_path, "cut.log.gz", full[: len(full) // 2])
    batch = read(path)
    assert batch.partial
    assert list(iter_records(path)) == batch.table.to_pylist()


def test_iter_records_errors_and_skip(tmp_path):
    bad = list(ROW_A)
    bad[FIELDS.index("missed_bytes")] = "-3x"
    path = write(tmp_path, "s.log", zeek_text([ROW_A, bad, ROW_B]))
    records = iter_records(path)
    assert next(records)["uid"] == "CabC1"
    with pytest.raises(BadInputError) as info:
        next(records)
    assert info.value.line == 10 and info.value.column == "missed_bytes"
    kept = [r["uid"] for r in iter_records(path, on_error="skip")]
    assert kept == ["CabC1", "CabC2"]


def test_several_files_failing_later_keep_earlier_rows(tmp_path):
    good = write(tmp_path, "a.log", zeek_text([ROW_A, ROW_B]))
    bad_row = list(ROW_A)
    bad_row[FIELDS.index("id.resp_p")] = "http"
    bad = write(tmp_path, "b.log", zeek_text([bad_row]))
    with pytest.raises(PartialInputError) as info:
        read([good, bad])
    assert "b.log" in str(info.value) and info.value.column == "id.resp_p"
    assert info.value.result.table.num_rows == 2
    assert read([good, bad], on_error="skip").table.num_rows == 2


def test_families_cannot_be_mixed(tmp_path):
    conn = write(tmp_path, "a.log", zeek_text([ROW_A]))
    kdd = write(tmp_path, "k.txt", f"{KDD_ROW},normal,21\n")
    with pytest.raises(BadInputError, match="different families"):
        read([conn, kdd])


def test_bytes_that_are_not_utf8_are_a_bad_line(tmp_path):
    text = zeek_text([ROW_A, ROW_B, ROW_A]).encode()
    second = "\t".join(ROW_B).encode()
    data = text.replace(second, second.replace(b"CabC2", b"Cab\xff\xfe"))
    path = write(tmp_path, "u.log", data)
    with pytest.raises(PartialInputError) as info:
        read(path)
    assert info.value.line == 10 and "UTF-8" in str(info.value)
    assert info.value.result.table.num_rows == 1
    skipped = read(path, on_error="skip")
    assert skipped.skipped == 1 and skipped.table.num_rows == 2


def test_cic_windows_1252_label(tmp_path):
    head = " Flow Duration, Flow Bytes/s, Label"
    data = (head + "\n5,1.5,Web Attack \u2013 Brute Force\n7,2,BENIGN\n").encode(
        "cp1252"
    )
    assert b"\x96" in data
    result = read(write(tmp_path, "thu.csv", data))
    assert result.table.column("label_detail").to_pylist() == [
        "Web Attack \u2013 Brute Force",
        "BENIGN",
    ]
    assert result.table.column("label").to_pylist() == [1, 0]
    assert any("Windows-1252" in w for w in result.warnings)


def test_binetflow_many_hex_ports_and_a_bad_one(tmp_path):
    rows = [
        f"2011/08/10 09:46:{i % 60:02d}.0,0.1,udp,10.0.0.1,{hex(1000 + i)},  <->,"
        f"10.0.0.2,{53 if i % 2 else '0x0035'},CON,0,0,2,180,90,1,flow=Background"
        for i in range(200)
    ]
    path = write(tmp_path, "h.binetflow", BINET_HEAD + "\n" + "\n".join(rows) + "\n")
    t = read(path).table
    assert t.column("src_port").to_pylist() == [1000 + i for i in range(200)]
    assert set(t.column("dst_port").to_pylist()) == {53}
    rows[5] = rows[5].replace(hex(1005), "0xZZ")
    path.write_text(BINET_HEAD + "\n" + "\n".join(rows) + "\n")
    with pytest.raises(PartialInputError) as info:
        read(path)
    assert info.value.line == 7 and info.value.column == "Sport"


def test_json_ts_in_milliseconds_and_header_only_tsv(tmp_path):
    obj = {
        "ts": 1664462456755,
        "id.orig_h": "10.0.0.1",
        "id.orig_p": 1,
        "id.resp_h": "10.0.0.2",
        "id.resp_p": 2,
        "proto": "udp",
    }
    path = write(tmp_path, "ms.json", json.dumps(obj) + "\n")
    assert only(read(path))["ts"] == 1664462456.755
    empty = read(write(tmp_path, "empty.log", zeek_text([])))
    assert empty.format == "zeek-tsv" and empty.table.num_rows == 0
    assert empty.table.schema.names[:3] == ["ts", "uid", "src_ip"]


def test_nsl_kdd_csv_with_header_in_any_order(tmp_path):
    from flows.readers.nslkdd import KDD_FEATURES

    values = KDD_ROW.split(",")
    order = list(reversed(range(41)))
    head = ",".join(["level", "class"] + [KDD_FEATURES[i] for i in order])
    rows = [
        ",".join(["18", "apache2"] + [values[i] for i in order]),
        "",
        ",".join(["21", "normal"] + [values[i] for i in order]),
    ]
    path = write(tmp_path, "KDDTest.csv", "\n".join([head] + rows) + "\n")
    result = read(path)
    assert result.format == "nsl-kdd" and result.stats["header"] is True
    plain = read(
        write(tmp_path, "k.txt", f"{KDD_ROW},apache2,18\n{KDD_ROW},normal,21\n")
    )
    assert result.table.equals(plain.table)
    bad = head.replace(",count,", ",cnt,")
    with pytest.raises(BadInputError) as info:
        read(write(tmp_path, "b.csv", bad + "\n" + rows[0] + "\n"))
    assert info.value.column == "count" and info.value.line == 1


def test_detect_each_format_from_content(tmp_path):
    write_parquet(
        read(write(tmp_path, "c.log", zeek_text([ROW_A]))).table, tmp_path / "p.bin"
    )
    samples = {
        "a.bin": (BINET_HEAD.replace(",", "\t") + "\n", "binetflow"),
        "b.bin": ("id,dur,sbytes,attack_cat,label\n1,0,1,Normal,0\n", "unsw-nb15"),
        "c.bin": (" Flow Duration, Total Fwd Packets, Label\n1,2,BENIGN\n", "cic-csv"),
        "d.bin": (f"{KDD_ROW},normal,21\n", "nsl-kdd"),
        "e.bin": (b"\x0a\x0d\x0d\x0a" + b"\x00" * 24, "pcapng"),
    }
    for name, (content, fmt) in samples.items():
        assert detect_format(write(tmp_path, name, content)) == fmt, name
    assert detect_format(tmp_path / "p.bin") == "parquet"


def test_damaged_parquet_is_bad_input(tmp_path):
    table = read(write(tmp_path, "c.log", zeek_text([ROW_A, ROW_B]))).table
    write_parquet(table, tmp_path / "ok.parquet")
    data = (tmp_path / "ok.parquet").read_bytes()
    cut = write(tmp_path, "cut.parquet", data[: len(data) // 2])
    with pytest.raises(BadInputError, match="Parquet"):
        read(cut)


def test_line_parsers_for_a_followed_log(tmp_path):
    """The agent's follow mode feeds lines itself: same records as a whole read."""
    from flows.readers.stream import TsvLineParser, parse_json_line

    text = zeek_text(
        [ROW_A + ["Malicious", "C&C"], ROW_B + ["Background", "-"]],
        LABEL_FIELDS,
        LABEL_TYPES,
    )
    expected = read(write(tmp_path, "f.log", text)).table.to_pylist()
    parser = TsvLineParser("live")
    got = []
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        if line.startswith("#"):
            parser.header_line(line.rstrip("\n"), number)
        else:
            got.append(parser.parse(line, number))
    assert got == expected
    with pytest.raises(BadInputError) as info:
        parser.parse("\t".join(ROW_A[:3]) + "\n", 99)
    assert info.value.line == 99 and info.value.path == "live"
    rec = parse_json_line(
        json.dumps(
            {
                "ts": 2.5,
                "id.orig_h": "10.0.0.1",
                "id.orig_p": 1,
                "id.resp_h": "10.0.0.2",
                "id.resp_p": 2,
            }
        )
    )
    assert rec["ts"] == 2.5 and rec["proto"] is None


def test_parquet_of_no_known_family_names_the_file_and_its_columns(tmp_path):
    import pyarrow.parquet as pq

    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"alpha": [1, 2], "beta": ["x", "y"]}), path)
    with pytest.raises(BadInputError) as info:
        read(str(path))
    text = str(info.value)
    assert str(path) in text
    assert "Parquet columns (alpha, beta) match no known family" in text


# ------------------------------------------------ no rows after the header


def test_a_garbage_first_row_after_a_zeek_header_names_its_line(tmp_path):
    """Found: a Zeek header then random bytes said "cannot split rows (Empty CSV
    file)", pyarrow's words, with no line; the garbage line is named instead."""
    text = zeek_text([], close=False).encode() + b"\xff\xfe\x81\x00junk\x9c\n"
    path = write(tmp_path, "g.log", text)
    with pytest.raises(BadInputError) as info:
        read(path)
    err = info.value
    assert not isinstance(err, PartialInputError)
    assert (err.line, err.exit_code) == (9, 3)
    assert str(err) == f"{path}, line 9: bytes that are not UTF-8"


def test_a_text_first_row_after_a_zeek_header_says_what_was_expected(tmp_path):
    path = write(tmp_path, "g.log", zeek_text([], close=False) + "junk junk\n")
    with pytest.raises(BadInputError) as info:
        read(path)
    assert str(info.value) == (
        f"{path}, line 9: expected {len(FIELDS)} fields separated by '\\t', found 1"
    )


def _header_only(name: str) -> str:
    from flows.readers.nslkdd import KDD_FEATURES

    return {
        "u.csv": UNSW_HEAD,
        "c.csv": CIC_HEAD,
        "k.csv": ",".join(KDD_FEATURES + ("class", "level")),
        "a.binetflow": BINET_HEAD,
        "z.log": zeek_text([]).rstrip("\n"),
    }[name] + "\n"


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("u.csv", "unsw-nb15"),
        ("c.csv", "cic-csv"),
        ("k.csv", "nsl-kdd"),
        ("a.binetflow", "binetflow"),
        ("z.log", "zeek-tsv"),
    ],
)
def test_a_header_only_file_is_zero_rows_like_a_header_only_zeek_log(
    tmp_path, name, fmt
):
    """Found: a UNSW/CIC CSV of only its header was "cannot split rows (Empty CSV
    file)"; every reader now reads a header without rows as 0 rows, no error."""
    result = read(write(tmp_path, name, _header_only(name)))
    assert (result.format, result.table.num_rows, result.skipped) == (fmt, 0, 0)
    assert (result.partial, result.warnings) == (False, [])


def test_a_header_then_blank_lines_is_zero_rows(tmp_path):
    path = write(tmp_path, "u.csv", UNSW_HEAD + "\n\n\n")
    result = read(path)
    assert (result.format, result.table.num_rows) == ("unsw-nb15", 0)


# ---------------------------------------------------------- proto names a protocol


PROTO_NAME = (
    "expected a protocol name (letters, digits and - _ . + /, such as tcp or "
    "ipv6-icmp) or number 0..255, found "
)


@pytest.mark.parametrize(
    ("proto", "found"),
    [
        ("tcp;rm -rf", PROTO_NAME + "'tcp;rm -rf'"),
        ("x" * 33, PROTO_NAME + "'" + "x" * 33 + "'"),
        ("300", "expected a protocol number from 0 to 255, found '300'"),
    ],
)
def test_a_proto_that_names_no_protocol_is_a_bad_row(tmp_path, proto, found):
    """Found: ``proto`` took any text (a whole command line, a blank). Like a port
    outside 0..65535 it is a bad row, counted and named, in every conn reader;
    protocol names of the shared data (tcp, ipv6-icmp, a/n, tp++, 3pc,
    unknown_transport) and numbers 0..255 pass."""
    import pyarrow.parquet as pq

    from flows.readers.stream import parse_json_line
    from flows.record import CONN_FIELD_NAMES, columns_to_table

    # Zeek TSV, read whole and streamed.
    bad_row = list(ROW_A)
    bad_row[FIELDS.index("proto")] = proto
    tsv = write(tmp_path, "conn.log", zeek_text([ROW_A, bad_row, ROW_B]))
    result = _one_bad_value(tsv, 10, "proto", found)
    assert result.table.column("proto").to_pylist() == ["tcp", ROW_B[6]]
    with pytest.raises(PartialInputError) as info:
        list(iter_records(tsv))
    assert (info.value.line, info.value.column) == (10, "proto")

    # Zeek JSON, the fast path and the line-by-line one (stdin, followed logs).
    lines = [JSON_FLOW, dict(JSON_FLOW, proto=proto), dict(JSON_FLOW, proto="udp")]
    js = write(tmp_path, "j.log", "".join(json.dumps(o) + "\n" for o in lines))
    for attempt in (read, lambda p: list(iter_records(p))):
        with pytest.raises(PartialInputError) as info:
            attempt(js)
        assert str(info.value) == f"{js}, line 2, column 'proto': {found}"
    with pytest.raises(BadInputError) as info:
        parse_json_line(json.dumps(dict(JSON_FLOW, proto=proto)), "<stdin>", 7)
    assert str(info.value) == f"<stdin>, line 7, column 'proto': {found}"
    assert read(js, on_error="skip").skipped == 1

    # Argus binetflow.
    argus = _argus_file(tmp_path, _argus(), _argus(Proto=proto), _argus(Proto="udp"))
    _one_bad_value(argus, 3, "Proto", found)

    # Parquet.
    base = {"ts": 1.0, "src_ip": "10.0.0.1", "src_port": 1, "dst_ip": "10.0.0.2",
            "dst_port": 2, "proto": "tcp"}
    rows = [base, dict(base, proto=proto), dict(base, proto="6")]
    pqt = tmp_path / "c.parquet"
    pq.write_table(
        columns_to_table({n: [r.get(n) for r in rows] for n in CONN_FIELD_NAMES}), pqt
    )
    with pytest.raises(PartialInputError) as info:
        read(pqt)
    assert str(info.value) == f"{pqt}, row 2, column 'proto': {found}"
    skipped = read(pqt, on_error="skip")
    assert skipped.skipped == 1
    assert skipped.table.column("proto").to_pylist() == ["tcp", "6"]


@pytest.mark.parametrize(
    "proto",
    ["tcp", "UDP", "icmp", "ipv6-icmp", "a/n", "tp++", "3pc", "ax.25",
     "unknown_transport", "0", "6", "255"],
)
def test_protocol_names_and_numbers_are_protos(tmp_path, proto):
    from flows.record import field_problem, proto_problem

    assert proto_problem(proto) is None and field_problem("proto", proto) is None
    row = list(ROW_A)
    row[FIELDS.index("proto")] = proto
    assert only(read(write(tmp_path, "c.log", zeek_text([row]))))["proto"] == proto
