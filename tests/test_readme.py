"""The README's commands and figures stay true to the code."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from outbox import cli
from outbox.retry import RetryPolicy

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def _shell_lines() -> list[str]:
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line.startswith("outbox "):
                lines.append(line)
    return lines


@pytest.mark.parametrize("line", _shell_lines())
def test_every_outbox_command_in_the_readme_parses(line):
    """Each documented `outbox …` line is accepted by the CLI's parser as written."""
    parser = cli.build_parser()
    args = parser.parse_args(shlex.split(line)[1:])
    assert callable(args.func)


def test_the_readme_says_how_to_get_the_commands_on_path():
    assert "source .venv/bin/activate" in README and ".venv/bin/outbox status" in README


def test_the_retry_budget_in_the_readme_is_the_policys():
    minutes = RetryPolicy().patience().total_seconds() / 60
    assert f"at least {minutes:.1f} minutes" in README
