"""README.md stays true: its configuration table, commands and test command
match the code and CI."""
from __future__ import annotations

import re

from daemon.cli import build_parser, env_name
from daemon.config import Settings
from tests.conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def test_every_setting_is_documented_with_its_env_var_and_flag():
    """Each Settings field appears in the configuration table as env var and flag."""
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([A-Z_]+)` \| `(--[a-z-]+)` \|", README, re.M)}
    expected = {env_name(name): "--" + name.replace("_", "-") for name in Settings.model_fields}
    assert rows == expected


def test_every_command_in_the_readme_exists():
    """`outboxd X` in the README's command table is a real subcommand."""
    parser = build_parser()
    subcommands = set(parser._subparsers._group_actions[0].choices)
    documented = set(re.findall(r"^\| `outboxd ([a-z-]+)", README, re.M))
    assert documented and documented <= subcommands


def test_ci_runs_the_test_command_the_readme_gives():
    """.ci/run runs `python -m pytest -q`, which the README names as the test command."""
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "python -m pytest -q" in ci and "python -m pytest -q" in README
    assert "bash .ci/run" in README
