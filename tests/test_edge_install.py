"""``pip install .[edge]`` in a fresh venv brings neither torch nor tensorflow,
and importing the edge agent (every module of it) loads neither.

The repository is copied (sources and pyproject only) into a temporary folder
first, so the build leaves nothing behind in the working tree. It takes about
25 s here (local wheels), so it stays in the default suite. Package indexes
configured for pip on this machine (PyPI or local mirrors) are used as they are.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("flows", "teacher", "student", "compress", "edge_agent")
FORBIDDEN = ("torch", "tensorflow", "tensorflow-cpu", "tf-keras", "keras", "jax")
FORBIDDEN_MODULES = ("torch", "tensorflow", "keras", "jax")

CHECK = """
import importlib, json, pkgutil, sys
import edge_agent
import flows.readers, flows.record, flows.errors
failed = {}
for info in pkgutil.walk_packages(edge_agent.__path__, "edge_agent."):
    try:
        importlib.import_module(info.name)
    except Exception as exc:
        failed[info.name] = f"{type(exc).__name__}: {exc}"
heavy = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
print(json.dumps({"heavy": heavy, "failed": failed}))
""".replace("FORBIDDEN", repr(FORBIDDEN_MODULES))


def _copy_repo(dest: Path) -> Path:
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for pkg in PACKAGES:
        if (REPO / pkg).is_dir():
            shutil.copytree(REPO / pkg, dest / pkg, ignore=ignore)
    return dest


def test_edge_install_has_no_torch_or_tensorflow(tmp_path):
    src = _copy_repo(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", f"{src}[edge]"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    listing = subprocess.run(
        [str(python), "-m", "pip", "list", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    )
    names = {p["name"].lower() for p in json.loads(listing.stdout)}
    assert "gatewatch" in names and "onnxruntime" in names and "paho-mqtt" in names
    assert not names & set(FORBIDDEN), sorted(names & set(FORBIDDEN))

    probe = subprocess.run(
        [str(python), "-c", CHECK],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    report = json.loads(probe.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [], report["heavy"]
    assert report["failed"] == {}, report["failed"]
