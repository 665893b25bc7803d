"""The README's two set-up commands are the ones CI runs and the ones that work."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readmeCommands() -> list[str]:
    start = (ROOT / "README.md").read_text().split("## Start here", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", start)


def test_readme_has_a_run_and_a_test_command():
    run, test = readmeCommands()
    assert "twist sockets" in run
    assert "pytest" in test


def test_ci_runs_exactly_the_readme_test_command():
    _, test = readmeCommands()
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in lines
