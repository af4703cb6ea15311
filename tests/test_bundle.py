"""edge_agent.bundle and signing: keygen, build, verify, and the ways to break a bundle.

Bundles here carry only the agent's own wheel (built from this tree), so they build in
seconds; the full offline install with the runtime wheels is in ``test_flash.py``.
"""

from __future__ import annotations

import hashlib
import io
import json
import stat
import tarfile
from pathlib import Path

import pytest

from edge_agent import bundle, signing
from edge_agent.cli import main
from flows.errors import BadInputError, ModelError, UsageError
from tests.test_ota_artifacts import make_artifact

REPO = Path(__file__).resolve().parent.parent

CONFIG = """\
artifact = "/opt/gatewatch/models/current"
source = "zeek:/var/log/zeek/current/conn.log"
follow = true
site = "plant-3"
gateway = "gw-17"
update_public_key = "/etc/gatewatch/update.pub"
"""


@pytest.fixture(scope="module")
def agent_wheel(tmp_path_factory) -> Path:
    """The agent's wheel, built once for this module from the working tree."""
    return bundle.build_agent_wheel(REPO, tmp_path_factory.mktemp("wheel"))


def _inputs(tmp_path: Path, config_text: str = CONFIG, **artifact_kw):
    """(private key, public key, artifact folder, config) written under tmp_path."""
    private, public = signing.generate_keypair(tmp_path / "keys")
    artifact = make_artifact(tmp_path / "artifact", **artifact_kw)
    config = tmp_path / "gateway.toml"
    config.write_text(config_text)
    return private, public, artifact, config


@pytest.fixture
def made(tmp_path: Path, agent_wheel: Path):
    """(bundle path, public key, artifact folder, config) of a freshly built bundle."""
    private, public, artifact, config = _inputs(tmp_path, version="b-0001")
    out = tmp_path / "gw.tar.gz"
    bundle.build_bundle(artifact, config, private, out, wheels=[agent_wheel])
    return out, public, artifact, config


def _members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path, "r:gz") as tar:
        return [
            (m, tar.extractfile(m).read() if m.isreg() else b"")
            for m in tar.getmembers()
        ]


def _write(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            info = tarfile.TarInfo(info.name) if info.isreg() else info
            if not info.issym() and not info.islnk() and not info.isdir():
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def test_keygen_writes_a_private_key_only_its_owner_reads(tmp_path, capsys):
    assert main(["keygen", "-o", str(tmp_path / "k")]) == 0

    key, pub = tmp_path / "k" / "signing.key", tmp_path / "k" / "signing.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    kid = signing.key_id(signing.load_public_key(pub))
    assert kid in capsys.readouterr().out
    # The private key signs what the public key verifies, and nothing else.
    sig = signing.sign(signing.load_private_key(key), b"data")
    signing.verify(signing.load_public_key(pub), b"data", sig, what="t")
    with pytest.raises(signing.SignatureError):
        signing.verify(signing.load_public_key(pub), b"date", sig, what="t")

    # A second keygen into the same folder would strand gateways: refused.
    assert main(["keygen", "-o", str(tmp_path / "k")]) == 2
    assert "already holds a signing key" in capsys.readouterr().err


def test_bundle_holds_every_file_with_its_hash(made, agent_wheel, capsys):
    out, public, artifact, config = made

    manifest = bundle.verify_bundle(out, public)

    expected = {
        f"wheels/{agent_wheel.name}": agent_wheel.read_bytes(),
        "config/gateway.toml": config.read_bytes(),
    }
    for path in artifact.iterdir():
        expected[f"model/{path.name}"] = path.read_bytes()
    unit = next(data for info, data in _members(out) if info.name == bundle.UNIT_PATH)
    expected[bundle.UNIT_PATH] = unit
    assert set(manifest.files) == set(expected)
    for name, data in expected.items():
        assert manifest.files[name].sha256 == hashlib.sha256(data).hexdigest(), name
        assert manifest.files[name].size == len(data)
    assert b"ExecStart=/opt/gatewatch/venv/bin/edge-agent run --config" in unit
    assert b"ExecReload=/bin/kill -HUP $MAINPID" in unit  # a reload is SIGHUP
    assert manifest.model_version == "b-0001"
    assert manifest.requirement == "gatewatch[edge]==0.1.0"
    names = [info.name for info, _ in _members(out)]
    assert names[:2] == ["MANIFEST.json", "MANIFEST.sig"]

    assert main(["verify", str(out), "--pubkey", str(public)]) == 0
    assert "signature and 7 file hashes OK" in capsys.readouterr().out


def _flip_config_byte(members):
    for i, (info, data) in enumerate(members):
        if info.name == "config/gateway.toml":
            members[i] = (info, data.replace(b"gw-17", b"gw-18"))
    return members


def _edit_manifest(members):
    info, data = members[0]
    manifest = json.loads(data)
    manifest["model"]["model_version"] = "evil"
    members[0] = (info, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return members


def _add_member(name: str, kind: bytes = tarfile.REGTYPE, link: str = ""):
    def mutate(members):
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = link
        members.append((info, b"x" if kind == tarfile.REGTYPE else b""))
        return members

    return mutate


def _drop_member(members):
    return [m for m in members if m[0].name != "model/thresholds.json"]


def _duplicate_member(members):
    return members + [m for m in members if m[0].name == "model/thresholds.json"]


def _signature_second_missing(members):
    return [m for m in members if m[0].name != "MANIFEST.sig"]


TAMPERING = {
    "changed file": (_flip_config_byte, "sha256 mismatch for config/gateway.toml"),
    "edited manifest": (_edit_manifest, "does not match its signature"),
    "unlisted file": (_add_member("model/extra.bin"), "not in the signed manifest"),
    "missing file": (_drop_member, "lacks 1 signed file(s): model/thresholds.json"),
    "duplicate": (_duplicate_member, "appears twice"),
    "no signature": (_signature_second_missing, "starts with"),
    "traversal": (_add_member("model/../../evil.sh"), "points outside the archive"),
    "absolute": (_add_member("/etc/cron.d/evil"), "absolute path"),
    "symlink": (
        _add_member("model/link", tarfile.SYMTYPE, "/etc/shadow"),
        "is a link file",
    ),
    "hardlink": (
        _add_member("model/hard", tarfile.LNKTYPE, "config/gateway.toml"),
        "is a link file",
    ),
    "fifo": (_add_member("model/pipe", tarfile.FIFOTYPE), "is a special file"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampered_bundle_is_refused_and_nothing_is_left(case, made, tmp_path):
    out, public, _, _ = made
    mutate, message = TAMPERING[case]
    bad = _write(tmp_path / "bad.tar.gz", mutate(_members(out)))
    dest = tmp_path / "unpacked"

    with pytest.raises(
        BadInputError, match=message.replace("(", r"\(").replace(")", r"\)")
    ):
        bundle.verify_bundle(bad, public, extract_to=dest)

    assert not dest.exists()
    assert not (tmp_path / "evil.sh").exists()


def test_truncated_bundle_is_refused(made, tmp_path, capsys):
    out, public, _, _ = made
    data = out.read_bytes()
    # Cuts in a member, in the tar's zero padding, and in the gzip trailer.
    for cut in (len(data) // 3, len(data) - 2000, len(data) - 50, len(data) - 3):
        short = tmp_path / f"short-{cut}.tar.gz"
        short.write_bytes(data[:cut])
        with pytest.raises(BadInputError, match="truncated or damaged"):
            bundle.verify_bundle(short, public, extract_to=tmp_path / f"u{cut}")
        assert not (tmp_path / f"u{cut}").exists()

    assert main(["verify", str(short), "--pubkey", str(public)]) == 3
    assert "error:" in capsys.readouterr().err


def test_wrong_key_names_both_keys(made, tmp_path, capsys):
    out, public, _, _ = made
    _, other = signing.generate_keypair(tmp_path / "other")
    signer = signing.key_id(signing.load_public_key(public))
    trusted = signing.key_id(signing.load_public_key(other))

    with pytest.raises(signing.SignatureError, match=f"key {signer}.*{trusted}"):
        bundle.verify_bundle(out, other)

    assert main(["verify", str(out), "--pubkey", str(other)]) == 3
    assert "signed by key" in capsys.readouterr().err


def test_bundle_refuses_a_modified_artifact_or_bad_config(tmp_path, agent_wheel):
    private, _, artifact, config = _inputs(tmp_path, "site = [unclosed\n")
    out = tmp_path / "gw.tar.gz"

    with pytest.raises(BadInputError, match="not valid TOML"):
        bundle.build_bundle(artifact, config, private, out, wheels=[agent_wheel])

    config.write_text(CONFIG)
    mismatched = make_artifact(tmp_path / "mismatched", model_window=6)
    with pytest.raises(ModelError, match="does not match its encoder"):
        bundle.build_bundle(mismatched, config, private, out, wheels=[agent_wheel])

    (artifact / "model.onnx").write_bytes(b"\x00" * 10)
    with pytest.raises(BadInputError, match="sha256 mismatch for model.onnx"):
        bundle.build_bundle(artifact, config, private, out, wheels=[agent_wheel])
    assert not out.exists()


def test_edge_requirements_leave_out_torch_and_tensorflow():
    reqs = bundle.runtime_requirements(REPO)

    names = {r.split("==")[0].split("[")[0].lower() for r in reqs}
    assert {"onnxruntime", "paho-mqtt", "cryptography", "numpy"} <= names
    assert not names & {"torch", "tensorflow", "tensorflow-cpu", "neural-compressor"}


def test_flash_refuses_another_python_before_touching_the_root(made, tmp_path):
    from edge_agent.flash import flash

    out, public, _, _ = made
    root = tmp_path / "root"
    root.mkdir()
    other = next(
        (
            p
            for p in (
                "/root/.pyenv/versions/3.12.1/bin/python3",
                "/usr/bin/python3.12",
                "/usr/bin/python3.10",
            )
            if Path(p).exists()
        ),
        "/bin/false",
    )

    with pytest.raises(UsageError, match="wheels are for Python 3.11"):
        flash(out, root, public, python=other)

    assert list(root.iterdir()) == []


def test_keygen_refuses_a_file_or_a_path_under_one(tmp_path, capsys):
    existing = tmp_path / "passwd"
    existing.write_text("root:x:0:0\n")
    for out in (existing, existing / "keys"):
        for extra in ([], ["--force"]):
            assert main(["keygen", "-o", str(out), *extra]) == 2
            err = capsys.readouterr().err
            assert err.startswith("error: keygen -o") and "Traceback" not in err
            assert len(err.strip().splitlines()) == 1
    assert existing.read_text() == "root:x:0:0\n"


def test_keygen_write_failure_leaves_no_half_pair(tmp_path, capsys, monkeypatch):
    real = Path.write_bytes

    def write_bytes(self, data):
        if self.name == signing.PUBLIC_NAME:
            raise OSError(28, "No space left on device", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    assert main(["keygen", "-o", str(tmp_path / "k")]) == 1
    err = capsys.readouterr().err
    assert "No space left" in err and "Traceback" not in err
    assert list((tmp_path / "k").iterdir()) == []


def test_bundle_out_is_checked_before_the_build(tmp_path, agent_wheel, capsys,
                                                monkeypatch):
    private, _, artifact, config = _inputs(tmp_path)
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(UsageError, match="is a folder"):
        bundle.build_bundle(artifact, config, private, folder, wheels=[agent_wheel])
    with pytest.raises(UsageError, match="not an existing folder"):
        bundle.build_bundle(artifact, config, private, tmp_path / "no" / "gw.tgz",
                            wheels=[agent_wheel])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "artifact", "gateway.toml", "keys", "out"]

    def no_build(*a, **k):
        raise AssertionError("the wheels were built before -o was checked")

    monkeypatch.setattr(bundle, "build_agent_wheel", no_build)
    assert main(["bundle", "--artifact", str(artifact), "--config", str(config),
                 "--key", str(private), "-o", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: -o") and "Traceback" not in err
    assert list(folder.iterdir()) == []

    # A bundle already there (perhaps the one flashed) is kept unless --force.
    earlier = tmp_path / "gw.tar.gz"
    earlier.write_bytes(b"the bundle flashed last week")
    args = ["bundle", "--artifact", str(artifact), "--config", str(config),
            "--key", str(private), "-o", str(earlier)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: -o {earlier} already exists; pass --force")
    assert earlier.read_bytes() == b"the bundle flashed last week"
    with pytest.raises(AssertionError, match="wheels were built"):
        main([*args, "--force"])  # past the check, to the build


def test_bundle_write_failure_leaves_no_partial_file(tmp_path, agent_wheel,
                                                     monkeypatch):
    private, _, artifact, config = _inputs(tmp_path)
    out = tmp_path / "gw.tar.gz"

    def replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bundle.os, "replace", replace)
    with pytest.raises(bundle.GatewatchError, match="cannot write -o") as info:
        bundle.build_bundle(artifact, config, private, out, wheels=[agent_wheel])
    assert info.value.exit_code == 1
    assert not out.exists() and not (tmp_path / "gw.tar.gz.partial").exists()
