"""``edge-agent bundle --platform TAG`` asks pip for every tag the gateway runs.

Found: ``edge-agent bundle --platform manylinux_2_28_aarch64`` (the README's own
example) failed with ``Could not find a version that satisfies the requirement
ai-edge-litert==2.3.0``: pip takes a ``--platform`` tag only as written, and
ai-edge-litert 2.3.0 ships ``manylinux_2_27_aarch64`` wheels only, while pyarrow
26.0.1 ships ``manylinux_2_28_aarch64`` only. A gateway whose glibc runs the one
runs the other (PEP 600), so the older tags go to pip too.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from edge_agent import bundle

AARCH64_2_28 = [
    "manylinux_2_28_aarch64",
    *(f"manylinux_2_{m}_aarch64" for m in range(27, 16, -1)),
    "manylinux2014_aarch64",
]


@pytest.mark.parametrize(
    ("tag", "want"),
    [
        ("manylinux_2_28_aarch64", AARCH64_2_28),
        (
            "manylinux_2_17_x86_64",
            [
                "manylinux_2_17_x86_64",
                "manylinux2014_x86_64",
                *(f"manylinux_2_{m}_x86_64" for m in range(16, 11, -1)),
                "manylinux2010_x86_64",
                *(f"manylinux_2_{m}_x86_64" for m in range(11, 4, -1)),
                "manylinux1_x86_64",
            ],
        ),
        (
            "manylinux2014_aarch64",
            ["manylinux2014_aarch64", "manylinux_2_17_aarch64"],
        ),
        (
            "manylinux2010_i686",
            [
                "manylinux2010_i686",
                *(f"manylinux_2_{m}_i686" for m in range(12, 4, -1)),
                "manylinux1_i686",
            ],
        ),
        (
            "musllinux_1_2_aarch64",
            ["musllinux_1_2_aarch64", "musllinux_1_1_aarch64",
             "musllinux_1_0_aarch64"],
        ),
        ("linux_armv7l", ["linux_armv7l"]),
        ("macosx_11_0_arm64", ["macosx_11_0_arm64"]),  # pip widens it itself
        ("manylinux_2_12_aarch64", ["manylinux_2_12_aarch64"]),  # under 2_17
    ],
)
def test_a_platform_tag_gives_every_older_tag_its_gateway_runs(tag, want):
    assert bundle.compatible_platforms(tag) == want


def test_the_tags_are_those_pip_lists_for_such_a_system(monkeypatch):
    """The same tags, in the same order, as pip's own packaging.tags yields on a
    machine of that glibc and architecture (its glibc faked)."""
    manylinux = pytest.importorskip("pip._vendor.packaging._manylinux")
    if not hasattr(manylinux, "_get_glibc_version"):
        pytest.skip("pip's packaging no longer has _get_glibc_version")
    monkeypatch.setattr(manylinux, "_have_compatible_abi", lambda *a: True)
    for arch, minor in [("aarch64", 28), ("x86_64", 28), ("armv7l", 31),
                        ("ppc64le", 17), ("i686", 17)]:
        monkeypatch.setattr(manylinux, "_get_glibc_version", lambda m=minor: (2, m))
        want = list(manylinux.platform_tags([arch]))
        assert bundle.compatible_platforms(f"manylinux_2_{minor}_{arch}") == want


def _fake_pip(monkeypatch) -> list[list[str]]:
    """Replace pip by a stand-in that writes one dummy wheel into --dest; return
    the list the commands it was given are put in."""
    commands: list[list[str]] = []

    def run(cmd: list[str], what: str, env=None) -> None:
        commands.append(cmd)
        dest = Path(cmd[cmd.index("--dest") + 1])
        (dest / "dummy-1.0-py3-none-any.whl").write_bytes(b"not a real wheel")

    monkeypatch.setattr(bundle, "_run", run)
    return commands


def _platforms(cmd: list[str]) -> list[str]:
    """The values of every ``--platform`` of a pip command line."""
    return [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--platform"]


def test_the_pip_download_carries_every_tag(tmp_path, monkeypatch):
    commands = _fake_pip(monkeypatch)
    reqs = ["ai-edge-litert==2.3.0", "pyarrow==26.0.1"]
    cache = tmp_path / "cache"

    paths = bundle.runtime_wheels(reqs, cache,
                                  platform_tag="manylinux_2_28_aarch64")

    assert [p.name for p in paths] == ["dummy-1.0-py3-none-any.whl"]
    (cmd,) = commands
    assert _platforms(cmd) == AARCH64_2_28
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert cmd[cmd.index("--python-version") + 1] == python
    assert cmd[-2:] == reqs

    # The cache entry is named by the tag as given (as before), and found again.
    key = hashlib.sha256(
        json.dumps([reqs, python, "manylinux_2_28_aarch64"]).encode()
    ).hexdigest()[:16]
    assert paths[0].parent == cache / key
    again = bundle.runtime_wheels(reqs, cache,
                                  platform_tag="manylinux_2_28_aarch64")
    assert again == paths and len(commands) == 1


def test_other_tags_go_to_pip_as_given_and_no_tag_gives_no_platform(
        tmp_path, monkeypatch):
    commands = _fake_pip(monkeypatch)
    bundle.runtime_wheels(["dpkt==1.9.8"], tmp_path / "a",
                          platform_tag="linux_armv7l")
    bundle.runtime_wheels(["dpkt==1.9.8"], tmp_path / "b")
    assert _platforms(commands[0]) == ["linux_armv7l"]
    assert _platforms(commands[1]) == []
    assert "--python-version" not in commands[1]


def test_the_help_and_readme_say_the_older_tags_are_taken():
    import argparse

    parser = argparse.ArgumentParser(prog="edge-agent")
    bundle.register(parser.add_subparsers())
    sub = parser._subparsers._group_actions[0].choices["bundle"]
    text = " ".join(sub.format_help().split())
    assert "the older tags such a gateway also runs" in text
    assert "manylinux2014_aarch64" in text
    readme = (Path(bundle.__file__).parent / "README.md").read_text()
    assert "manylinux_2_27_aarch64" in " ".join(readme.split())
