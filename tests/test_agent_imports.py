"""The edge agent's streaming sources never import pyarrow (about 100 MB of RSS).

Each check runs in a fresh interpreter, imports the agent's command line and
sources, reads a small conn.log through the agent's own source, and lists the
pyarrow modules loaded. A whole-file read in the same process then does load
pyarrow, so the first answer is laziness, not a missing package.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

_HEADER = [
    "#separator \\x09",
    "#set_separator\t,",
    "#empty_field\t(empty)",
    "#unset_field\t-",
    "#path\tconn",
    "#fields\tts\tuid\tid.orig_h\tid.orig_p\tid.resp_h\tid.resp_p\tproto\tservice"
    "\tduration\torig_bytes\tresp_bytes\tconn_state\thistory\torig_pkts\tresp_pkts"
    "\tlabel",
    "#types\ttime\tstring\taddr\tport\taddr\tport\tenum\tstring\tinterval\tcount"
    "\tcount\tstring\tstring\tcount\tcount\tstring",
]
_ROWS = [
    "1655071198.444458\tC1\t10.0.0.5\t62771\t40.74.108.123\t443\ttcp\tssl\t1.13"
    "\t1596\t4039\tSF\tShADdaFf\t14\t16\tBenign",
    "1655071199.1\tC2\t10.0.0.5\t53211\t10.0.0.1\t53\tudp\tdns\t0.01\t40\t80"
    "\tSF\tDd\t1\t1\tBenign",
    "1655071200.5\tC3\t10.0.0.9\t4444\t10.0.0.7\t23\ttcp\t-\t-\t-\t-\tS0\tS\t1\t0"
    "\tMalicious",
]

_CHECK = """
import sys
import edge_agent.cli, edge_agent.sources
from edge_agent.sources import open_source

edge_agent.cli.build_parser()
spec = sys.argv[1]
src = open_source(spec, stdin=open(sys.argv[2]) if spec == "-" else None)
records = list(src)
before = sorted(m for m in sys.modules if m.split(".")[0] == "pyarrow")
from flows.readers import read
if spec != "-":
    read(spec.partition(":")[2])
after = "pyarrow" in sys.modules
print(json.dumps({"n": len(records), "first": records[0], "before": before,
                  "after": after}))
"""


def _conn_log(path: Path) -> Path:
    path.write_text("\n".join(_HEADER + _ROWS + ["#close\t2022-06-17-01-00-00"]) + "\n")
    return path


def _run(spec: str, stdin_file: Path | None = None) -> dict:
    code = "import json\n" + _CHECK
    args = [sys.executable, "-c", code, spec, str(stdin_file or "")]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["tsv", "tsv.gz", "json"])
def test_zeek_source_reads_without_pyarrow(tmp_path: Path, kind: str) -> None:
    log = _conn_log(tmp_path / "conn.log")
    if kind == "tsv.gz":
        gz = tmp_path / "conn.log.gz"
        gz.write_bytes(gzip.compress(log.read_bytes()))
        log = gz
    elif kind == "json":
        lines = [
            {
                "ts": 1655071198.4,
                "uid": f"J{i}",
                "id.orig_h": "10.0.0.5",
                "id.orig_p": 1000 + i,
                "id.resp_h": "10.0.0.1",
                "id.resp_p": 53,
                "proto": "udp",
            }
            for i in range(3)
        ]
        log = tmp_path / "conn.json"
        log.write_text("".join(json.dumps(x) + "\n" for x in lines))

    got = _run(f"zeek:{log}")

    assert got["n"] == 3
    assert got["first"]["src_ip"] == "10.0.0.5"
    assert got["before"] == [], f"pyarrow imported by the stream path: {got['before']}"
    assert got["after"] is True  # the batch reader still builds Arrow tables


def test_stdin_source_reads_without_pyarrow(tmp_path: Path) -> None:
    lines = tmp_path / "in.jsonl"
    lines.write_text(
        json.dumps({"src_ip": "10.0.0.5", "dst_ip": "10.0.0.1", "proto": "udp"}) + "\n"
    )
    got = _run("-", lines)
    assert got["n"] == 1 and got["first"]["dst_ip"] == "10.0.0.1"
    assert got["before"] == []


def test_followed_zeek_source_parses_lines_without_pyarrow(tmp_path: Path) -> None:
    """Follow mode: the same line parser, fed line by line, also stays lazy."""
    log = _conn_log(tmp_path / "conn.log")
    code = (
        "import sys, json, itertools\n"
        "from edge_agent.sources import open_source\n"
        f"src = open_source('zeek:{log}', follow=True, poll=0.05)\n"
        "recs = list(itertools.islice(iter(src), 3))\n"
        "print(json.dumps([len(recs), 'pyarrow' in sys.modules]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [3, False]


def test_edge_agent_run_on_a_zeek_log_never_imports_pyarrow(
    data_dir, tmp_path_factory, tmp_path: Path
) -> None:
    """The whole ``edge-agent run`` (model, windows, outbox) on the real conn.log."""
    from tests.test_agent_fixtures import tiny

    tm = tiny(data_dir, tmp_path_factory)
    code = (
        "import sys\n"
        "from edge_agent.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "print(rc, 'pyarrow' in sys.modules)\n"
    )
    argv = [
        "run",
        "--artifact", str(tm.artifact),
        "--source", f"zeek:{tm.conn_log}",
        "--site", "s1",
        "--gateway", "g1",
        "--outbox", str(tmp_path / "o.db"),
        "--alerts", "",
    ]  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "False"]
    assert f"summary: flows {len(tm.records)}," in out.stderr


def test_streamed_zeek_log_is_not_read_whole_first(tmp_path: Path) -> None:
    """The first record comes after reading the head, not the whole (20 MB) log."""
    import tracemalloc

    from flows.readers import detect_format
    from flows.readers.stream import iter_records, stream_format

    row = _ROWS[0] + "\n"
    big = tmp_path / "big.conn.log"
    with open(big, "w") as fh:
        fh.write("\n".join(_HEADER) + "\n")
        fh.write(row * (20_000_000 // len(row)))
    assert stream_format(str(big)) == detect_format(big) == "zeek-tsv"

    tracemalloc.start()
    try:
        first = next(iter_records(big))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert first["dst_port"] == 443
    assert peak < 4_000_000, f"{peak} bytes traced before the first record"


@pytest.mark.parametrize(
    "text",
    ["", "   \n", "\ufeff" + "\n".join(_HEADER + _ROWS) + "\n", "a,b\n1,2\n"],
    ids=["empty", "blank", "bom-tsv", "unknown"],
)
def test_stream_format_agrees_with_detect_format(tmp_path: Path, text: str) -> None:
    """Same answer, or the same error, as the whole-file detection."""
    from flows.errors import BadInputError
    from flows.readers import detect_format
    from flows.readers.stream import stream_format

    path = tmp_path / "x.log"
    path.write_text(text, encoding="utf-8")
    for gz in (False, True):
        if gz:
            path.write_bytes(gzip.compress(text.encode()))
        try:
            want = detect_format(path)
        except BadInputError as exc:
            with pytest.raises(BadInputError) as err:
                stream_format(str(path))
            assert str(err.value) == str(exc)
        else:
            assert stream_format(str(path)) == want


def test_a_gzip_stream_cut_inside_its_first_line_is_named_as_cut(tmp_path: Path):
    """Found: the streaming reader sniffed the cut line alone and said 'looks like
    an Argus binetflow file but the header has no 'DstAddr' column'."""
    import zlib

    from flows.errors import BadInputError
    from flows.readers.stream import iter_records, stream_format

    header = b"StartTime,Dur,Proto,SrcAddr,Sport,Dir,DstAddr,Dport,State,Label\n"
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    cut = deflate.compress(header[:30]) + deflate.flush(zlib.Z_SYNC_FLUSH)
    path = tmp_path / "cut.binetflow.gz"
    path.write_bytes(cut)  # no end marker: the stream stops inside line 1

    for attempt in (lambda: stream_format(str(path)),
                    lambda: next(iter_records(path))):
        with pytest.raises(BadInputError) as err:
            attempt()
        assert "gzip stream cut at byte offset" in str(err.value)
        assert "DstAddr" not in str(err.value)
