"""Finding 6 of round 14: what the quick benchmark report leaves unsaid."""

from __future__ import annotations

from benchmarks import report_md


def test_the_report_says_the_gate_was_off_and_tshark_missing():
    """Found: max_f1_drop 1.0 showed only in the settings dump, and a missing
    tshark only as "wall –, CPU –"."""
    note = report_md._gate_note({"max_f1_drop": 1.0, "quick": True})
    assert note and "quality gate was off" in note[0]
    assert report_md._gate_note({"max_f1_drop": 0.01}) == []

    lines = report_md._meter({"capture": {}, "meter": {"flows": 3}})
    assert any("tshark was not installed" in line for line in lines)
    with_tshark = report_md._meter({"capture": {}, "meter": {}, "tshark": {"flows": 1}})
    assert not any("tshark was not installed" in line for line in with_tshark)


def test_reproduce_names_the_arguments_given():
    """Found: "Reproduce with `python -m benchmarks run --quick`" left out
    --datasets and the other arguments the run was given."""
    command = "python -m benchmarks run --quick --datasets ctu-conn --out OUT"
    text = report_md.render({"quick": True, "settings": {"command": command}})
    assert f"Reproduce with `{command}`" in text


def test_the_recorded_command_names_no_path_of_this_machine(tmp_path, monkeypatch):
    """The report's "Reproduce with" line (committed with the results) showed
    ``--out /tmp/bench-full``: an absolute path of the machine that ran it."""
    from benchmarks.run import _portable

    monkeypatch.chdir(tmp_path)
    words = ["--out", "/tmp/elsewhere/x", "--work", str(tmp_path / "w"), "--quick"]

    assert _portable(words) == ["--out", "PATH", "--work", "w", "--quick"]
