"""-v (and -q where there is one) work before and after the command in every tool."""

import pytest

from compress.cli import build_parser as compress_parser
from edge_agent.cli import build_parser as agent_parser
from teacher.cli import build_parser as teacher_parser

COMMANDS = {
    "teacher": (teacher_parser, ["eval", "--checkpoint", "ck", "--data", "f.log"]),
    "teacher serve": (teacher_parser, ["serve", "--checkpoint", "ck", "--broker",
                                       "mqtt://127.0.0.1:1883"]),
    "teacher alerts": (teacher_parser, ["alerts", "--store", "a.sqlite"]),
    "compress": (compress_parser, ["eval", "--artifact", "art", "--data", "f.log"]),
    "edge-agent": (agent_parser, ["run", "--artifact", "art", "--source", "-"]),
}


@pytest.mark.parametrize("tool", sorted(COMMANDS))
def test_verbose_before_or_after_the_command(tool):
    build, argv = COMMANDS[tool]

    before = build().parse_args(["-v", *argv])
    after = build().parse_args([*argv, "-v"])
    neither = build().parse_args(argv)

    assert before.verbose and after.verbose
    assert not neither.verbose


@pytest.mark.parametrize(
    "tool", ["teacher", "teacher serve", "teacher alerts", "compress", "edge-agent"]
)
def test_quiet_before_or_after_the_command(tool):
    build, argv = COMMANDS[tool]

    assert build().parse_args(["-q", *argv]).quiet
    assert build().parse_args([*argv, "-q"]).quiet
    assert not build().parse_args(argv).quiet


def test_the_agent_counts_v_on_either_side():
    build, argv = COMMANDS["edge-agent"]

    assert build().parse_args(["-vv", *argv]).verbose == 2
    assert build().parse_args([*argv, "-vv"]).verbose == 2
    assert build().parse_args(argv).verbose == 0
