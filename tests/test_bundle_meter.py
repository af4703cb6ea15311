"""Bundles for this machine carry the flow meter's compiled packet path.

Found: the agent wheel of every bundle was built without ``setup.py`` (and without
Cython), so a flashed gateway metered live traffic on the pure-Python path, about
ten times slower, whatever machine it was.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from edge_agent import bundle
from tests.test_flash import edge_wheels
from tests.test_ota_artifacts import make_artifact

REPO = Path(__file__).resolve().parent.parent


def test_a_compiled_agent_wheel_meters_packets_on_the_compiled_path(tmp_path):
    edge_wheels()  # skips, saying why, where no package index is reachable
    wheel = bundle.build_agent_wheel(REPO, tmp_path / "wheel", compiled=True)

    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert wheel.name.startswith(f"gatewatch-0.1.0-{py}-{py}-")
    with zipfile.ZipFile(wheel) as zf:
        assert [n for n in zf.namelist() if n.startswith("flows/meter/_fast.")
                and n.endswith(".so")]
    # Installed alone (as flash installs it, from the wheel), the meter is fast.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet",
                    "--target", str(target), str(wheel)], check=True)
    probe = ("import flows.meter as m, sys; "
             "print(m.fast_available(), m.__file__.startswith(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", probe, str(target)],
                          capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert done.stdout.split() == ["True", "True"], done.stderr


@pytest.mark.parametrize(("platform_tag", "compiled"),
                         [(None, True), ("manylinux_2_28_aarch64", False)])
def test_a_bundle_compiles_the_meter_only_for_this_machine(
        tmp_path, monkeypatch, platform_tag, compiled):
    from edge_agent import signing

    asked = []

    def build(src, outdir, *, compiled=False):
        asked.append(compiled)
        outdir.mkdir(parents=True)
        wheel = outdir / "gatewatch-0.1.0-py3-none-any.whl"
        wheel.write_bytes(b"not a real wheel")
        return wheel

    monkeypatch.setattr(bundle, "build_agent_wheel", build)
    monkeypatch.setattr(bundle, "runtime_wheels", lambda *a, **k: [])
    private, _ = signing.generate_keypair(tmp_path / "keys")
    artifact = make_artifact(tmp_path / "artifact", version="m1")
    config = tmp_path / "gateway.toml"
    config.write_text('[agent]\nartifact = "/opt/gatewatch/models/current"\n'
                      'source = "iface:eth0"\nsite = "s1"\ngateway = "gw1"\n'
                      'broker = "mqtts://central.example:8883"\n')
    bundle.build_bundle(artifact, config, private, tmp_path / "gw.tar.gz",
                        platform_tag=platform_tag)
    assert asked == [compiled]
