"""The demo's own argument checks (the demo itself runs in `make demo` and CI)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.demo import main


def test_a_data_dir_that_is_not_a_folder_is_named(tmp_path: Path, capsys) -> None:
    """Found: a --data-dir that did not exist was told to pass --data-dir."""
    missing = tmp_path / "shared" / "data"

    assert main(["--data-dir", str(missing), "--out", str(tmp_path / "o")]) == 2

    err = capsys.readouterr().err
    assert err.startswith(f"error: --data-dir {missing} is not a folder")
    assert not (tmp_path / "o").exists()


def test_no_data_dir_at_all_says_how_to_give_one(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GATEWATCH_DATA", raising=False)

    assert main(["--data-dir", "", "--out", str(tmp_path / "o")]) == 2

    assert "pass --data-dir or set GATEWATCH_DATA" in capsys.readouterr().err
