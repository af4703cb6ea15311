"""``flows convert -o`` and ``edge-agent pack-update -o`` never overwrite unasked.

Found: both replaced an existing output without a word. Now an existing file is a
usage error (exit 2) naming it, in the words ``teacher baselines --out`` uses,
unless ``--force``; with ``--force`` the new file is written beside the old one
and renamed into place, so a write that fails keeps the old file.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from flows.cli import main as flows_main
from flows.readers import read
from tests.test_readers import ROW_A, ROW_B, zeek_text

# pack-update's flags naming the gateways an update is for.
PACK = ["pack-update", "--site", "plant-3", "--gateway", "gw-17"]


def _conn_log(tmp_path: Path) -> Path:
    path = tmp_path / "c.log"
    path.write_text(zeek_text([ROW_A, ROW_B]))
    return path


def _flows(capsys, *argv: str) -> tuple[int, str]:
    code = flows_main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------- flows convert


def test_convert_refuses_an_existing_output_before_reading(tmp_path, capsys):
    out = tmp_path / "o.parquet"
    out.write_bytes(b"keep me")
    missing = tmp_path / "no-such.log"  # would be exit 3, were it read first

    code, err = _flows(capsys, "convert", str(missing), "-o", str(out))

    assert code == 2
    assert err == (f"error: -o {out} already exists; pass --force to overwrite it, "
                   "or name a new file\n")
    assert out.read_bytes() == b"keep me"
    assert _names(tmp_path) == ["o.parquet"]


def test_convert_refuses_an_existing_file_behind_a_link(tmp_path, capsys):
    target = tmp_path / "real.log"
    target.write_text("old\n")
    link = tmp_path / "link.log"
    link.symlink_to(target)

    code, err = _flows(capsys, "convert", str(_conn_log(tmp_path)), "-o", str(link))

    assert code == 2 and f"-o {link} already exists" in err
    assert target.read_text() == "old\n"


def test_convert_force_replaces_the_output(tmp_path, capsys):
    src = _conn_log(tmp_path)
    out = tmp_path / "o.parquet"
    out.write_bytes(b"old")

    code, err = _flows(capsys, "convert", str(src), "-o", str(out), "--force")

    assert code == 0, err
    assert read(out).table.equals(read(src).table)
    assert _names(tmp_path) == ["c.log", "o.parquet"]


def test_convert_force_keeps_the_old_file_when_the_write_fails(
    tmp_path, capsys, monkeypatch
):
    """The new file is written beside the old one: a disk that fills part way
    leaves the old output whole, and no temporary file behind."""
    import flows.readers as readers

    written = []

    def half_then_full(table, path, family="conn", *, name=None):
        Path(path).write_bytes(b"PAR1 half a file")
        written.append(Path(path))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(readers, "write_parquet", half_then_full)
    out = tmp_path / "o.parquet"
    out.write_bytes(b"the old output")

    code, err = _flows(
        capsys, "convert", str(_conn_log(tmp_path)), "-o", str(out), "--force"
    )

    assert code == 1
    assert err == f"error: {out}: cannot be written (no space left on device)\n"
    assert written and written[0] != out and written[0].parent == out.parent
    assert out.read_bytes() == b"the old output"
    assert _names(tmp_path) == ["c.log", "o.parquet"]


def test_convert_keeps_a_file_that_appeared_during_the_read(
    tmp_path, capsys, monkeypatch
):
    """Without --force the name is checked before the read and the rename does
    not replace a file another process put there meanwhile."""
    import flows.readers as readers

    out = tmp_path / "o.parquet"
    real_read = readers.read

    def read_while_another_writes(*args, **kwargs):
        out.write_bytes(b"another run's output")
        return real_read(*args, **kwargs)

    monkeypatch.setattr(readers, "read", read_while_another_writes)

    code, err = _flows(capsys, "convert", str(_conn_log(tmp_path)), "-o", str(out))

    assert code == 1
    assert err == (f"error: {out}: a file appeared there while the input was read; "
                   "not overwritten (--force overwrites it)\n")
    assert out.read_bytes() == b"another run's output"
    assert _names(tmp_path) == ["c.log", "o.parquet"]


def test_convert_help_documents_force(capsys):
    assert flows_main(["convert", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--force" in text and "an existing file is refused" in text


# ------------------------------------------------------------- edge-agent pack-update


@pytest.fixture
def packing(tmp_path):
    """(artifact folder, private key) for pack-update; needs onnxruntime."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from edge_agent import signing
    from tests.test_ota_artifacts import make_artifact

    private, _ = signing.generate_keypair(tmp_path / "keys")
    return make_artifact(tmp_path / "v2", version="v2", seed=2), private


def _agent(capsys, *argv: str) -> tuple[int, str]:
    from edge_agent.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_pack_update_refuses_an_existing_out_before_signing(
    tmp_path, capsys, monkeypatch, packing
):
    import edge_agent.ota as ota

    art, key = packing
    signed = []
    monkeypatch.setattr(ota, "pack_update", lambda *a, **k: signed.append(a))
    out = tmp_path / "update.json"
    out.write_text("the update already published\n")

    code, err = _agent(capsys, *PACK, "--artifact", str(art), "--key",
                       str(key), "-o", str(out))

    assert code == 2
    assert err == (f"error: --out {out} already exists; pass --force to overwrite "
                   "it, or name a new file\n")
    assert signed == []
    assert out.read_text() == "the update already published\n"


def test_pack_update_refuses_an_existing_archive_out(tmp_path, capsys, packing):
    art, key = packing
    archive = tmp_path / "v2.tar.gz"
    archive.write_bytes(b"served now")
    out = tmp_path / "update.json"

    code, err = _agent(capsys, *PACK, "--artifact", str(art), "--key",
                       str(key), "-o", str(out), "--url",
                       "https://example.invalid/v2.tar.gz", "--archive-out",
                       str(archive))

    assert code == 2 and f"--archive-out {archive} already exists" in err
    assert archive.read_bytes() == b"served now" and not out.exists()


def test_pack_update_force_replaces_the_out(tmp_path, capsys, packing):
    art, key = packing
    out = tmp_path / "update.json"
    out.write_text("old\n")

    code, err = _agent(capsys, *PACK, "--artifact", str(art), "--key",
                       str(key), "-o", str(out), "--force")

    assert code == 0, err
    message = json.loads(out.read_text())
    assert (message["kind"], message["model_version"]) == ("model_update", "v2")
    assert _names(tmp_path) == ["keys", "update.json", "v2"]


def test_pack_update_force_keeps_the_old_out_when_the_write_fails(
    tmp_path, capsys, monkeypatch, packing
):
    import flows.outfile as outfile

    art, key = packing
    out = tmp_path / "update.json"
    out.write_text("old\n")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outfile.os, "fsync", full_disk)

    code, err = _agent(capsys, *PACK, "--artifact", str(art), "--key",
                       str(key), "-o", str(out), "--force")

    assert code == 1
    assert err == f"error: cannot write --out {out}: No space left on device\n"
    assert out.read_text() == "old\n"
    assert _names(tmp_path) == ["keys", "update.json", "v2"]


def test_pack_update_help_documents_force(capsys):
    from edge_agent.cli import main

    with pytest.raises(SystemExit):
        main(["pack-update", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--force" in text and "already exists, without --force" in text
