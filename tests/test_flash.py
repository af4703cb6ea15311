"""edge_agent.flash: a real bundle installed offline into a temporary gateway root.

The bundle carries the agent wheel built from this tree and the real ``edge`` wheels
(downloaded once into a cache: ``GATEWATCH_WHEEL_CACHE``, else
``~/.cache/gatewatch/wheels``). Where ``unshare -n`` works, the flash runs with no
network at all, which proves the install needs none.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from edge_agent import bundle, signing  # noqa: E402
from edge_agent.cli import main  # noqa: E402
from edge_agent.flash import GatewayLayout, flash  # noqa: E402
from flows.errors import BadInputError, GatewatchError, ModelError  # noqa: E402
from tests.test_ota_artifacts import (  # noqa: E402
    W,
    fit_conn_encoder,
    make_artifact,
    numpy_scores,
)

REPO = Path(__file__).resolve().parent.parent


@functools.cache
def _edge_wheels() -> tuple[Path, ...] | str:
    cache = Path(
        os.environ.get("GATEWATCH_WHEEL_CACHE") or bundle.default_wheel_cache()
    )
    try:
        return tuple(bundle.runtime_wheels(bundle.runtime_requirements(REPO), cache))
    except GatewatchError as exc:
        return str(exc)


def edge_wheels() -> list[Path]:
    """The runtime wheels of the edge extra, or a skip that says why not."""
    got = _edge_wheels()
    if isinstance(got, str):
        pytest.skip(f"cannot get the edge wheels (no index reachable?): {got}")
    return list(got)


@functools.cache
def _agent_wheel(outdir: str) -> Path:
    return bundle.build_agent_wheel(REPO, Path(outdir))


def all_wheels(tmp_root: Path) -> list[Path]:
    """The agent wheel (built from this tree) and the edge wheels."""
    return [_agent_wheel(str(tmp_root / "agent-wheel")), *edge_wheels()]


def no_network_prefix() -> list[str]:
    """``unshare -n`` where this process may use it (root), else nothing."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return []
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    return ["unshare", "-n"] if probe.returncode == 0 else []


def gateway_config(root: Path, **extra: str) -> str:
    """A gateway.toml whose paths point into the temporary root."""
    lines = {
        "artifact": f"{root}/opt/gatewatch/models/current",
        "update_public_key": f"{root}/etc/gatewatch/update.pub",
        "outbox": f"{root}/var/lib/gatewatch/outbox.sqlite",
        "source": "-",
        "site": "plant-3",
        "gateway": "gw-17",
        **extra,
    }
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in lines.items())


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its kind, size, mtime and link target."""
    out: dict[str, tuple] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            link = os.readlink(path) if path.is_symlink() else None
            out[str(path.relative_to(root))] = (
                st.st_mode,
                st.st_size,
                st.st_mtime_ns,
                link,
            )
    return out


def venv_scores(python: Path, artifact: Path, windows: np.ndarray, tmp: Path):
    """Scores of ``windows`` computed by the gateway venv's own runtime."""
    np.save(tmp / "windows.npy", windows)
    code = (
        "import json, sys, numpy as np\n"
        "from edge_agent.runtime import load_artifact\n"
        "s = load_artifact(sys.argv[1])\n"
        "print(json.dumps([s.model_version, s.score(np.load(sys.argv[2])).tolist()]))\n"
    )
    proc = subprocess.run(
        [str(python), "-c", code, str(artifact), str(tmp / "windows.npy")],
        capture_output=True,
        text=True,
        check=True,
    )
    version, scores = json.loads(proc.stdout)
    return version, np.asarray(scores)


def venv_thresholds(python: Path, artifact: Path) -> list:
    """The thresholds the gateway venv's agent would use, and where they came from."""
    code = (
        "import json, sys\n"
        "from edge_agent.agent import load_thresholds\n"
        "from edge_agent.runtime import load_artifact\n"
        "print(json.dumps(load_thresholds(load_artifact(sys.argv[1]))))\n"
    )
    proc = subprocess.run(
        [str(python), "-c", code, str(artifact)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout)


def test_flash_offline_switch_refuse_and_roll_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    wheels = all_wheels(tmp_path)
    private, public = signing.generate_keypair(tmp_path / "keys")
    root = tmp_path / "root"
    config = tmp_path / "gateway.toml"
    config.write_text(gateway_config(root))

    def make_bundle(name: str, site: dict | None = None, **kw) -> Path:
        artifact = make_artifact(tmp_path / f"art-{name}", version=name, **kw)
        if site is not None:
            (artifact / "site_thresholds.json").write_text(json.dumps(site))
        out = tmp_path / f"{name}.tar.gz"
        bundle.build_bundle(artifact, config, private, out, wheels=wheels)
        return out

    v1 = make_bundle("v1", seed=1)

    # 1. A bad bundle into an empty root leaves it empty.
    root.mkdir()
    bad = tmp_path / "bad.tar.gz"
    data = bytearray(v1.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(BadInputError):
        flash(bad, root, public)
    assert list(root.iterdir()) == []

    # 2. Flash v1 through the CLI, with no network where the machine allows it.
    cmd = [
        sys.executable,
        "-m",
        "edge_agent.cli",
        "flash",
        str(v1),
        "--root",
        str(root),
        "--pubkey",
        str(public),
    ]
    proc = subprocess.run(no_network_prefix() + cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    layout = GatewayLayout(root)
    assert os.readlink(layout.models / "current") == "A"
    assert layout.config.read_text() == config.read_text()
    assert layout.pubkey.read_bytes() == public.read_bytes()
    assert "ExecStart=/opt/gatewatch/venv/bin/edge-agent" in layout.unit.read_text()
    python = layout.venv / "bin" / "python"
    assert (layout.venv / "bin" / "edge-agent").exists()

    # The venv is the gateway's own: no torch, no tensorflow, the runtime present.
    proc = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.util as u, json; print(json.dumps("
            "{m: u.find_spec(m) is not None for m in ['torch', 'tensorflow', "
            "'onnxruntime', 'paho', 'cryptography', 'edge_agent']}))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(proc.stdout) == {
        "torch": False,
        "tensorflow": False,
        "onnxruntime": True,
        "paho": True,
        "cryptography": True,
        "edge_agent": True,
    }
    shape = (9, W, fit_conn_encoder().n_features)
    windows = np.random.default_rng(5).uniform(0, 1, shape).astype(np.float32)
    version, scores = venv_scores(python, layout.models / "current", windows, tmp_path)
    assert version == "v1"
    np.testing.assert_allclose(scores, numpy_scores(windows, 1), atol=1e-6)

    # 3. Flash v2: the venv is reused (same wheels), the model goes to slot B with
    # the site's calibrated thresholds, which the gateway's agent then uses.
    site = {"decision": 0.2, "escalate_low": 0.2, "alert": 0.93, "model_version": "v2"}
    v2 = make_bundle("v2", site=site, seed=2)
    result = flash(v2, root, public)
    assert (result.slot, result.model_version) == ("B", "v2")
    assert len(list(layout.releases.iterdir())) == 1
    version, scores = venv_scores(python, layout.models / "current", windows, tmp_path)
    assert version == "v2"
    np.testing.assert_allclose(scores, numpy_scores(windows, 2), atol=1e-6)
    installed = layout.models / "B" / "site_thresholds.json"
    assert json.loads(installed.read_text()) == site
    assert venv_thresholds(python, layout.models / "current") == [
        {"decision": 0.2, "escalate_low": 0.2, "alert": 0.93},
        "site",
    ]

    # 4. Refusals after the install change nothing at all under the root.
    before = snapshot(root)
    _, stranger = signing.generate_keypair(tmp_path / "stranger")
    with pytest.raises(signing.SignatureError, match="signed by key"):
        flash(v2, root, stranger)
    short = tmp_path / "short.tar.gz"
    short.write_bytes(v2.read_bytes()[: v2.stat().st_size // 2])
    with pytest.raises(BadInputError, match="truncated"):
        flash(short, root, public)
    # An unhealthy model is refused when the bundle is built ...
    with pytest.raises(ModelError, match="probe scores differ"):
        make_bundle("v3", seed=3, expected_shift=0.2)
    # ... and, from a bundle signed by a tool that skipped that check, at flash time.
    with monkeypatch.context() as patch:
        patch.setattr("edge_agent.ota.load_checked", lambda artifact: None)
        unhealthy = make_bundle("v3b", seed=3, expected_shift=0.2)
    with pytest.raises(ModelError, match="health check"):
        flash(unhealthy, root, public)
    assert snapshot(root) == before

    # 5. Rollback goes to the other slot and back again.
    assert main(["rollback", "--root", str(root)]) == 0
    assert os.readlink(layout.models / "current") == "A"
    version, scores = venv_scores(python, layout.models / "current", windows, tmp_path)
    assert version == "v1"
    np.testing.assert_allclose(scores, numpy_scores(windows, 1), atol=1e-6)
    assert main(["rollback", "--root", str(root)]) == 0
    assert os.readlink(layout.models / "current") == "B"

    # 6. v1 was built before the running v2: flash refuses it, as an update would,
    # unless the downgrade is asked for.
    before = snapshot(root)
    args = ["flash", str(v1), "--root", str(root), "--pubkey", str(public)]
    assert main(args) == 2
    assert "refusing a downgrade" in capsys.readouterr().err
    assert snapshot(root) == before
    assert main([*args, "--allow-downgrade"]) == 0
    assert os.readlink(layout.models / "current") == "A"
    version, _ = venv_scores(python, layout.models / "current", windows, tmp_path)
    assert version == "v1"


def test_rollback_without_a_second_model_is_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["rollback", "--root", str(tmp_path / "empty")]) == 2
    assert "no flashed model" in capsys.readouterr().err


def test_flash_installs_the_agent_although_pythonpath_sees_this_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With this tree on PYTHONPATH (its gatewatch.egg-info included), pip once took
    # the agent for installed and skipped it, and the health check passed anyway.
    wheels = all_wheels(tmp_path)
    private, public = signing.generate_keypair(tmp_path / "keys")
    root = tmp_path / "root"
    root.mkdir()
    config = tmp_path / "gateway.toml"
    config.write_text(gateway_config(root))
    artifact = make_artifact(tmp_path / "art", version="p1", seed=1)
    out = tmp_path / "p1.tar.gz"
    bundle.build_bundle(artifact, config, private, out, wheels=wheels)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.chdir(REPO)

    flash(out, root, public)

    venv = GatewayLayout(root).venv
    assert (venv / "bin" / "edge-agent").is_file()
    proc = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-I",
            "-c",
            "import edge_agent as e; print(e.__file__)",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).resolve().is_relative_to(venv.resolve())
