"""The ``--alerts`` file holds whole JSON lines, across a failed write and runs.

Found by a tester: a write that failed part way (disk full) left half a line at
the end of the file, and the next run appended its first alert straight onto it,
so one more alert was lost to any JSON-lines reader. Now a failed write is cut
back to the last whole line, and a file that still ends in half a line (a crash)
gets a newline before the run's first line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from edge_agent.cli import main
from tests.test_agent_fixtures import tiny

FRAGMENT = '{"kind": "alert", "src_ip": "10.0.0.1", "sco'


def _json_lines(path: Path) -> list[str]:
    """The file's lines, each checked to be one JSON object (the fragment aside)."""
    lines = path.read_text().split("\n")
    assert lines[-1] == ""  # ends in a newline
    for line in lines[:-1]:
        if line != FRAGMENT:
            assert isinstance(json.loads(line), dict), line
    return lines[:-1]


def test_a_run_starts_after_the_half_line_an_earlier_run_left(
    data_dir, tmp_path_factory, tmp_path, capsys
):
    tm = tiny(data_dir, tmp_path_factory)
    alerts = tmp_path / "alerts.jsonl"
    alerts.write_text('{"kind": "alert", "n": 1}\n' + FRAGMENT)

    rc = main([
        "run", "--artifact", str(tm.artifact), "--source", f"zeek:{tm.conn_log}",
        "--site", "s1", "--gateway", "g1", "--outbox", str(tmp_path / "o.db"),
        "--alerts", str(alerts),
    ])

    assert rc == 0, capsys.readouterr().err
    lines = _json_lines(alerts)
    assert lines[:2] == ['{"kind": "alert", "n": 1}', FRAGMENT]  # kept as it was
    assert len(lines) > 2  # this run's lines, every one readable


# A process whose files may grow to LIMIT bytes: a write past it is cut short and
# then fails (EFBIG; Python ignores SIGXFSZ), as a write onto a full disk does.
_WRITER = textwrap.dedent(
    """
    import resource, sys
    from edge_agent.cli import _AlertLog
    from flows.errors import GatewatchError

    path, limit = sys.argv[1], int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    log = _AlertLog(path)
    try:
        for n in range(10):
            log.write('{"kind": "alert", "n": %d, "pad": "%s"}\\n' % (n, "x" * 20))
            log.flush()
    except GatewatchError as exc:
        print(exc)
    log.close()
    """
)


def test_a_write_that_fails_part_way_leaves_only_whole_lines(tmp_path):
    alerts = tmp_path / "alerts.jsonl"
    line_bytes = len('{"kind": "alert", "n": 0, "pad": "' + "x" * 20 + '"}\n')
    limit = 2 * line_bytes + line_bytes // 2  # the third line fits half way

    done = subprocess.run(
        [sys.executable, "-c", _WRITER, str(alerts), str(limit)],
        capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )

    assert done.returncode == 0, done.stderr
    assert f"cannot write alerts to {alerts}" in done.stdout
    assert len(_json_lines(alerts)) == 2  # the half of the third line is gone

    # The next run (no limit now) appends whole lines after them.
    subprocess.run(
        [sys.executable, "-c", _WRITER, str(alerts), str(10**6)],
        check=True, timeout=60, cwd=Path(__file__).resolve().parents[1],
    )
    assert len(_json_lines(alerts)) == 12
