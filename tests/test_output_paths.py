"""Output names that must be refused before any work: found by a fresh tester.

``edge-agent pack-update -o X --force`` replaced a FIFO or a device node at X with
a regular file (the rename goes onto whatever is there); ``flows convert`` wrote
through a dangling link without ``--force``; an empty ``-o ''`` was a traceback
(pack-update), a write into the current folder (keygen), a silent default
(``run --outbox ''``) or exit 1 (``calibrate --out ''``); ``pack-update -o -``
wrote a file named ``-``; ``flows convert -o /missing/x.parquet`` read the whole
input before it failed. Each is now a usage error (exit 2), one line, checked
before anything is read or signed, with the words ``flows convert`` uses.

Nothing here touches ``/dev``: FIFOs are made with os.mkfifo in ``tmp_path`` and
the device node (root only) with os.mknod there too.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from flows.errors import UsageError
from tests.test_output_force import _agent, _conn_log, _flows

NOT_REGULAR = "exists and is not a regular file (a device, FIFO or socket)"
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")


@pytest.fixture
def signed(monkeypatch):
    """pack-update with a stand-in for the signing: the calls it got. A check
    that passes leads to it; one that refuses must come first."""
    import edge_agent.ota as ota

    calls = []

    def fake_pack_update(artifact, key, url=None, **targets):
        calls.append((artifact, key, url))
        return SimpleNamespace(message=b'{"kind": "model_update"}\n',
                               archive=b"the archive", model_version="v2")

    monkeypatch.setattr(ota, "pack_update", fake_pack_update)
    return calls


def _pack(tmp_path: Path, *extra: str) -> list[str]:
    return ["pack-update", "--site", "plant-3", "--gateway", "gw-17",
            "--artifact", str(tmp_path / "art"), "--key",
            str(tmp_path / "signing.key"), *extra]


def _device_node(path: Path) -> Path:
    """A character device like /dev/null (1, 3), made at ``path`` in tmp_path."""
    if os.geteuid() != 0 or not hasattr(os, "mknod"):
        pytest.skip("making a device node needs root")
    try:
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except OSError as exc:
        pytest.skip(f"cannot make a device node here: {exc}")
    return path


# ------------------------------------------------- 1. a FIFO or device, never replaced


@needs_fifo
@pytest.mark.parametrize("force", [[], ["--force"]])
def test_pack_update_refuses_a_fifo_out(tmp_path, capsys, signed, force):
    fifo = tmp_path / "update.json"
    os.mkfifo(fifo)

    code, err = _agent(capsys, *_pack(tmp_path, "-o", str(fifo), *force))

    assert code == 2
    assert err == (f"error: {fifo} {NOT_REGULAR}; --out needs a regular file "
                   "name\n")
    assert fifo.is_fifo() and signed == []


@needs_fifo
@pytest.mark.parametrize("force", [[], ["--force"]])
def test_pack_update_refuses_a_fifo_archive_out(tmp_path, capsys, signed, force):
    fifo = tmp_path / "v2.tar.gz"
    os.mkfifo(fifo)
    out = tmp_path / "update.json"

    code, err = _agent(capsys, *_pack(
        tmp_path, "-o", str(out), "--url", "https://h/x", "--archive-out",
        str(fifo), *force))

    assert code == 2
    assert err == (f"error: {fifo} {NOT_REGULAR}; --archive-out needs a regular "
                   "file name\n")
    assert fifo.is_fifo() and signed == [] and not out.exists()


@needs_fifo
def test_pack_update_refuses_a_link_to_a_fifo(tmp_path, capsys, signed):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "update.json"
    link.symlink_to(fifo)

    code, err = _agent(capsys, *_pack(tmp_path, "-o", str(link), "--force"))

    assert code == 2 and NOT_REGULAR in err and signed == []
    assert fifo.is_fifo() and link.is_symlink()


def test_pack_update_refuses_a_device_node(tmp_path, capsys, signed):
    node = _device_node(tmp_path / "null")

    code, err = _agent(capsys, *_pack(tmp_path, "-o", str(node), "--force"))

    assert code == 2
    assert err == f"error: {node} {NOT_REGULAR}; --out needs a regular file name\n"
    assert stat.S_ISCHR(node.lstat().st_mode) and signed == []


def test_convert_refuses_a_device_node_with_force(tmp_path, capsys):
    node = _device_node(tmp_path / "null.parquet")

    code, err = _flows(capsys, "convert", str(_conn_log(tmp_path)), "-o", str(node),
                       "--force")

    assert code == 2
    assert err == f"error: {node} {NOT_REGULAR}; -o needs a regular file name\n"
    assert stat.S_ISCHR(node.lstat().st_mode)


@needs_fifo
def test_write_file_never_replaces_a_fifo(tmp_path):
    """The last guard, for one that appears after the up-front check."""
    from flows.outfile import write_file

    fifo = tmp_path / "out"
    os.mkfifo(fifo)

    with pytest.raises(UsageError, match="is not a regular file"):
        write_file(fifo, b"data", force=True)

    assert fifo.is_fifo() and sorted(os.listdir(tmp_path)) == ["out"]


# ----------------------------------------------------------------- 2. dangling links


def test_convert_refuses_a_dangling_link_without_force(tmp_path, capsys):
    target = tmp_path / "missing.parquet"
    link = tmp_path / "dangling.parquet"
    link.symlink_to(target)

    code, err = _flows(capsys, "convert", str(_conn_log(tmp_path)), "-o", str(link))

    assert code == 2
    assert err == (f"error: -o {link} already exists; pass --force to overwrite "
                   "it, or name a new file\n")
    assert not target.exists() and link.is_symlink()


def test_convert_force_writes_a_dangling_links_target(tmp_path, capsys):
    """As pack-update: the file the link names is written, the link stays."""
    from flows.readers import read

    src = _conn_log(tmp_path)
    target = tmp_path / "missing.parquet"
    link = tmp_path / "dangling.parquet"
    link.symlink_to(target)

    code, err = _flows(capsys, "convert", str(src), "-o", str(link), "--force")

    assert code == 0, err
    assert link.is_symlink() and read(target).table.equals(read(src).table)


def test_pack_update_force_writes_a_dangling_links_target(tmp_path, capsys, signed):
    target = tmp_path / "missing.json"
    link = tmp_path / "update.json"
    link.symlink_to(target)

    assert _agent(capsys, *_pack(tmp_path, "-o", str(link)))[0] == 2
    code, err = _agent(capsys, *_pack(tmp_path, "-o", str(link), "--force"))

    assert code == 0, err
    assert link.is_symlink() and target.read_bytes().startswith(b'{"kind"')


@pytest.mark.parametrize("command", ["convert", "pack-update"])
def test_a_link_into_a_missing_folder_is_refused_up_front(
    tmp_path, capsys, signed, command
):
    link = tmp_path / "out.parquet"
    link.symlink_to(tmp_path / "gone" / "out.parquet")

    if command == "convert":
        flag = "-o"
        code, err = _flows(capsys, "convert", str(tmp_path / "no-such.log"), "-o",
                           str(link), "--force")
    else:
        flag = "--out"
        code, err = _agent(capsys, *_pack(tmp_path, "-o", str(link), "--force"))

    assert code == 2
    assert err == (f"error: {flag} {link}: the folder {tmp_path / 'gone'} does not "
                   "exist; make it first\n")
    assert signed == []


# ------------------------------------------------------------ 3. empty names and -


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_pack_update_refuses_an_empty_out(tmp_path, capsys, signed, monkeypatch,
                                          force):
    monkeypatch.chdir(tmp_path)

    code, err = _agent(capsys, *_pack(tmp_path, "-o", "", *force))

    assert code == 2
    assert err == "error: --out is an empty output path; give a file name\n"
    assert signed == [] and os.listdir(tmp_path) == []


def test_pack_update_refuses_an_empty_archive_out(tmp_path, capsys, signed,
                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)

    code, err = _agent(capsys, *_pack(tmp_path, "-o", "u.json", "--url",
                                      "https://h/x", "--archive-out", "", "--force"))

    assert code == 2
    assert err == "error: --archive-out is an empty output path; give a file name\n"
    assert signed == [] and os.listdir(tmp_path) == []


def test_pack_update_refuses_dash_as_convert_does(tmp_path, capsys, signed,
                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)

    code, err = _agent(capsys, *_pack(tmp_path, "-o", "-"))
    code2, err2 = _flows(capsys, "convert", "c.log", "-o", "-")

    assert (code, code2) == (2, 2)
    assert err.startswith("error: --out - (standard output) is not supported")
    assert err2.startswith("error: -o - (standard output) is not supported")
    assert err.count("\n") == 1 and signed == [] and os.listdir(tmp_path) == []


def test_keygen_refuses_an_empty_out(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)

    code, err = _agent(capsys, "keygen", "-o", "")

    assert code == 2
    assert err == ("error: keygen -o is an empty folder name; name a folder for "
                   "signing.key and signing.pub\n")
    assert os.listdir(tmp_path) == []


def test_run_refuses_an_empty_outbox(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)

    code, err = _agent(capsys, "run", "--artifact", str(tmp_path / "no-art"),
                       "--source", "zeek:x.log", "--site", "s", "--gateway", "g",
                       "--outbox", "")

    assert code == 2
    assert err == ("error: --outbox is an empty file name; name the outbox file, "
                   "or leave --outbox out for the default\n")
    assert os.listdir(tmp_path) == []


def test_run_refuses_an_empty_outbox_in_the_config(tmp_path, capsys, monkeypatch):
    # The config's settings are judged as flags are: an empty name is not the
    # default outbox (which may hold another run's escalations).
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\noutbox = "  "\n')

    code, err = _agent(capsys, "run", "--config", str(config), "--artifact",
                       str(tmp_path / "no-art"), "--source", "zeek:x.log", "--site",
                       "s", "--gateway", "g")

    assert code == 2
    assert err == (f"error: outbox in config {config} is an empty file name; name "
                   "the outbox file, or leave it out for the default\n")
    assert sorted(os.listdir(tmp_path)) == ["agent.toml"]


def test_calibrate_refuses_an_empty_out(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)

    code, err = _agent(capsys, "calibrate", "--artifact", str(tmp_path / "no-art"),
                       "--source", "zeek:x.log", "--target-fpr", "0.01",
                       "--out", "")

    assert code == 2
    assert err == ("error: --out is an empty file name; name the thresholds file, "
                   "or leave --out out for site_thresholds.json in the artifact\n")
    assert os.listdir(tmp_path) == []


@needs_fifo
def test_calibrate_refuses_a_fifo_out_before_loading_anything(tmp_path, capsys):
    # The artifact does not exist: were the check made after loading it, the
    # error would be about the artifact (exit 3), and a FIFO would hang the write.
    fifo = tmp_path / "site.json"
    os.mkfifo(fifo)

    code, err = _agent(capsys, "calibrate", "--artifact", str(tmp_path / "no-art"),
                       "--source", "zeek:x.log", "--target-fpr", "0.01",
                       "--out", str(fifo))

    assert code == 2
    assert err == (f"error: {fifo} {NOT_REGULAR}; --out needs a regular file "
                   "name\n")
    assert fifo.is_fifo()


# ------------------------------------------------- 4. the output's folder, up front


def test_convert_refuses_a_missing_folder_before_reading(tmp_path, capsys):
    missing = tmp_path / "no-such.log"  # exit 3, were it read first
    out = tmp_path / "nonexistent" / "x.parquet"

    code, err = _flows(capsys, "convert", str(missing), "-o", str(out))

    assert code == 2
    assert err == (f"error: -o {out}: the folder {out.parent} does not exist; make "
                   "it first\n")


def test_convert_refuses_a_folder_it_cannot_write_in_before_reading(
    tmp_path, capsys, monkeypatch
):
    import flows.argtypes as argtypes

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    real_access = os.access
    # Root may write anywhere: the folder is refused as for another user.
    monkeypatch.setattr(argtypes.os, "access", lambda p, mode, **k: (
        Path(p) != folder and real_access(p, mode, **k)))
    out = folder / "x.parquet"

    try:
        code, err = _flows(capsys, "convert", str(tmp_path / "no-such.log"), "-o",
                           str(out))
    finally:
        folder.chmod(0o755)

    assert code == 2
    assert err == f"error: -o {out}: cannot write in {folder}\n"


def test_pack_update_refuses_a_missing_folder_before_signing(tmp_path, capsys,
                                                            signed):
    out = tmp_path / "nonexistent" / "u.json"

    code, err = _agent(capsys, *_pack(tmp_path, "-o", str(out)))

    assert code == 2
    assert err == (f"error: --out {out}: the folder {out.parent} does not exist; "
                   "make it first\n")
    assert signed == []


def test_a_misspelt_config_setting_gets_the_near_one_named(tmp_path, capsys):
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\nbrokr = "mqtt://127.0.0.1:1"\nzzz = 1\n')

    code, err = _agent(capsys, "run", "--config", str(config), "--artifact",
                       str(tmp_path / "no-art"), "--source", "-", "--site", "s",
                       "--gateway", "g")

    assert code == 2
    assert err == (f"error: config {config}: unknown keys 'brokr' (did you mean "
                   "'broker'?), 'zzz'\n")


def test_ctrl_c_in_a_command_other_than_run_says_interrupted(tmp_path, capsys,
                                                             monkeypatch):
    """Found: Ctrl-C during flash or bundle exited 130 without a word."""
    import edge_agent.bundle

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(edge_agent.bundle, "_cmd_keygen", interrupted)

    code, err = _agent(capsys, "keygen", "-o", str(tmp_path / "keys"))

    assert code == 130
    assert err == "error: interrupted\n"
