"""Range-checked flags: out-of-range numbers are usage errors (exit 2) at parse time."""

from __future__ import annotations

import argparse

import pytest

from flows.argtypes import integer, integers, real, reals


def test_real_keeps_its_bounds_and_refuses_non_finite():
    share = real(0, 1, lo_open=True)
    assert share("1") == 1.0 and share("0.25") == 0.25
    for bad in ("0", "1.5", "nan", "inf", "-inf", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            share(bad)
    assert real()("-3e5") == -3e5  # unbounded, still finite
    with pytest.raises(argparse.ArgumentTypeError, match=r"in \(0, 1\)"):
        real(0, 1, lo_open=True, hi_open=True)("1")


def test_integer_and_lists():
    assert integer(1, 10)("10") == 10
    for bad in ("0", "11", "1.5", "ten"):
        with pytest.raises(argparse.ArgumentTypeError):
            integer(1, 10)(bad)
    assert integers(1)("64, 32,") == [64, 32]
    assert reals(0, 1)("0.1,1") == [0.1, 1.0]
    bad_lists = ((integers(1), "8,0"), (integers(1), ","), (reals(0, 1), "0.5,nan"),
                 # Found by an ML tester: "4,,8" was taken as 4,8 without a word.
                 (integers(1), "4,,8"), (integers(1), ",4"), (reals(0, 1), "0.1,,"))
    for parse, bad in bad_lists:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)


@pytest.mark.parametrize("flag", [
    ["--subspace", "0"], ["--subspace", "nan"], ["--bins", "-3"], ["--bins", "100000"],
    ["--members", "0"], ["--window", "100000"], ["--dropout", "2"],
    ["--conv-filters", "0"], ["--lr", "nan"], ["--lr", "inf"],
    ["--input-noise", "nan"], ["--input-noise", "inf"], ["--batch-size", "1"],
    ["--epochs", "0"], ["--threads", "0"],
])
def test_teacher_train_refuses_bad_numbers_before_reading_data(flag, tmp_path, capsys):
    from teacher.cli import main

    missing = tmp_path / "absent.log"  # never read: the flags fail first

    code = main(["train", "--data", str(missing), "--out", str(tmp_path / "t"), *flag])

    err = capsys.readouterr().err
    assert code == 2
    assert f"argument {flag[0]}" in err and "Traceback" not in err
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("flag", [
    ["--widths", "0"], ["--widths", "100000000"], ["--epochs", "0"],
    ["--calibration-windows", "0"], ["--lr", "nan"], ["--prune-ratios", "1.5"],
    ["--distill-noise", "inf"], ["--distill-swap", "-0.1"], ["--max-f1-drop", "nan"],
])
def test_compress_run_refuses_bad_numbers(flag, tmp_path, capsys):
    from compress.cli import main

    code = main(["run", "--target", "onnx-int8", "--teacher", str(tmp_path),
                 "--out", str(tmp_path / "art"), *flag])

    assert code == 2
    assert f"argument {flag[0]}" in capsys.readouterr().err


def test_teacher_train_out_must_name_a_folder_it_can_make(tmp_path, capsys):
    from teacher.cli import main

    missing = tmp_path / "absent.log"
    for out in ("", " ", "/proc/gatewatch-no/such"):
        code = main(["train", "--data", str(missing), "--out", out])
        err = capsys.readouterr().err
        assert code == 2 and "--out" in err and "Traceback" not in err
