"""The complete gateway.toml in edge_agent/README.md is one the agent takes, and it
names every setting (commented ones too), so the README cannot fall behind."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from edge_agent.config import AgentConfig, read_config_file

README = Path(__file__).resolve().parent.parent / "edge_agent" / "README.md"


def _complete_example() -> str:
    text = README.read_text()
    start = text.index("A complete one, with every setting")
    return re.search(r"```toml\n(.*?)```", text[start:], re.S).group(1)


def test_the_complete_config_parses_and_names_every_setting(tmp_path: Path):
    example = _complete_example()
    path = tmp_path / "gateway.toml"
    path.write_text(example)
    settings = read_config_file(path)
    assert settings["source"] == "iface:eth1" and settings["site"] == "plant-3"

    # Every setting is there, set or named in a comment.
    known = {f.name for f in fields(AgentConfig)} - {"password"}  # a file's job
    named = set(settings) | {
        word for line in example.splitlines() if "#" in line
        for word in re.findall(r"[a-z_]+", line.split("#", 1)[1])
    }
    assert known <= named, sorted(known - named)
