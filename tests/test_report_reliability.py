"""The reliability report lays out what the soak and fuzz runs recorded."""

import json

from benchmarks import report_reliability as rr


def _soak(growth_ok: bool) -> dict:
    samples = [{"t": 5.0 * i, "rss_mb": 90.0 + i * 0.1, "fds": 12, "threads": 6}
               for i in range(1, 13)]
    return {
        "samples": samples,
        "result": {"fed": 300_000, "mean_rate": 4999.6, "rss_first_mb": 90.1,
                   "rss_last_mb": 91.2, "rss_growth_pct": 1.22, "fds_first": 12,
                   "fds_last": 12, "threads_first": 6, "threads_last": 6,
                   "outbox_pending_at_exit": 0, "ok": growth_ok},
    }


def test_soak_row_carries_the_recorded_figures():
    rows = rr.soak_table({"s1": _soak(True), "s2": _soak(False)})

    assert rows[2] == ("| s1 | 1.0 | 300,000 | 5,000 | 90.1 → 91.2 | +1.2 % | 12 → 12 "
                       "| 6 → 6 | 0 | pass |")
    assert rows[3].endswith("| FAIL |")


def test_fuzz_total_is_the_sum_over_parsers():
    runs = [
        {"target": "pcap", "inputs": 1_000_000, "seconds": 900.0,
         "inputs_per_s": 1111.1, "crashes": 0, "hangs": 0, "failures": {}},
        {"target": "zeek-tsv", "inputs": 250_000, "seconds": 1800.0,
         "inputs_per_s": 138.9, "crashes": 2, "hangs": 1,
         "failures": {"IndexError at x.py:1": 2}},
    ]

    rows = rr.fuzz_table(runs)

    row = "| zeek-tsv | 250,000 | 1,800 | 139 | 2 | 1 | IndexError at x.py:1 ×2 |"
    assert row in rows
    assert rows[-1] == "| **all** | **1,250,000** | | | 2 | 1 | |"


def test_main_writes_markdown_and_plot(tmp_path):
    soak = tmp_path / "soak-1min.json"
    soak.write_text(json.dumps(_soak(True)))
    junit = tmp_path / "faults.xml"
    junit.write_text(
        '<testsuites><testsuite><testcase name="test_cut" time="3.5"/>'
        '<testcase name="test_disk" time="1"><skipped message="no tmpfs"/></testcase>'
        '<testcase name="test_kill" time="2"><failure message="x"/></testcase>'
        "</testsuite></testsuites>"
    )

    assert rr.main(["--soak", str(soak), "--faults", str(junit),
                    "--out", str(tmp_path / "out")]) == 0

    md = (tmp_path / "out" / "reliability.md").read_text()
    assert "| soak-1min | 1.0 | 300,000 |" in md
    assert "| `test_cut` | survived (passed) | 3.5 |" in md
    assert "| `test_disk` | skipped: no tmpfs | 1.0 |" in md
    assert "| `test_kill` | **FAILED** | 2.0 |" in md
    assert (tmp_path / "out" / "soak_rss.png").stat().st_size > 1000


def test_fuzz_rows_say_which_code_and_whether_a_run_was_stopped():
    runs = [
        {"target": "cic-csv", "inputs": 1_000_000, "seconds": 2000.0,
         "inputs_per_s": 500.0, "crashes": 0, "hangs": 0, "failures": {},
         "complete": True, "code": "abc1234"},
        {"target": "binetflow", "inputs": 400_000, "seconds": 3000.0,
         "inputs_per_s": 133.3, "crashes": 0, "hangs": 0, "failures": {},
         "complete": False},
    ]

    rows = rr.fuzz_table(runs)

    assert rows[0].endswith("| distinct failures | code fuzzed |")
    assert "| cic-csv | 1,000,000 | 2,000 | 500 | 0 | 0 | - | abc1234 |" in rows
    assert "| binetflow | 400,000 (stopped) | 3,000 | 133 | 0 | 0 | - | - |" in rows
    assert rows[-1] == "| **all** | **1,400,000** | | | 0 | 0 | | |"
