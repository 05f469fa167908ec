"""README.md stays true: its settings table, its Commands section (commands,
their options, the pasted --help, the config-file example, the exit codes)
and its test command match the code and CI."""
from __future__ import annotations

import re

import click
import pytest

from daemon import cli
from daemon.commands.options import load_settings
from daemon.config import Settings, env_name
from daemon.config_sources import _nested_models
from tests.conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
COMMON = {"--config", "--data-dir", "--log-level", "--strict", "--qdrant-url", "--qdrant-path", "--help"}


def section(title: str) -> str:
    """A `## title` section, its ### subsections included."""
    start = README.index(f"## {title}\n")
    following = re.search(r"^## ", README[start + 3:], re.M)
    return README[start: start + 3 + following.start()] if following else README[start:]


COMMANDS = section("Commands")


def command(name: str) -> click.Command:
    return cli.cli.get_command(click.Context(cli.cli), name)


def own_options(name: str) -> set[str]:
    """The long options a command has besides the common ones (--no-x halves left out)."""
    return {opt for p in command(name).params if isinstance(p, click.Option)
            for opt in p.opts if opt.startswith("--")} - COMMON


def help_text(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert cli.main([*argv, "--help"]) == 0
    return capsys.readouterr().out


def test_every_setting_is_in_the_settings_table():
    """Each Settings field's environment variable has a row in the Configuration table
    (a nested backend table as OUTBOXD_<NAME>__BACKEND, another nested group as each
    of its OUTBOXD_<NAME>__<KEY>); nothing else does."""
    rows = set(re.findall(r"^\| `([A-Z_]+)` \|", section("Configuration"), re.M))
    expected = set()
    for name, field in Settings.model_fields.items():
        nested = _nested_models(field.annotation)
        if not nested:
            expected.add(env_name(name))
        elif any("backend" in model.model_fields for _, model in nested):
            expected.add(f"{env_name(name)}__BACKEND")
        else:
            expected |= {f"{env_name(name)}__{key.upper()}" for _, model in nested for key in model.model_fields}
    assert rows == expected


def test_every_command_is_documented_with_exactly_its_options():
    """Each command has a row in the Commands table, and the options its rows list
    are the options the command has (beyond the common ones)."""
    cells: dict[str, str] = {}
    for row in re.findall(r"^\| (`outboxd [a-z-]+.*?) \| ", COMMANDS, re.M):
        name = re.match(r"`outboxd ([a-z-]+)", row).group(1)
        cells[name] = cells.get(name, "") + " " + row
    assert set(cells) == set(cli.COMMANDS)
    for name, cell in cells.items():
        documented = {o for o in re.findall(r"--[a-z][a-z-]*", cell) if not o.startswith("--no-")}
        assert documented == own_options(name), name


def test_the_common_options_paragraph_is_true():
    """The commands said to take --qdrant-url/--qdrant-path take them, and only those."""
    sentence = re.search(r"those that open\s+Qdrant \(([^)]*)\)", COMMANDS).group(1)
    said = set(re.findall(r"`([a-z-]+)`", sentence))
    has = {name for name in cli.COMMANDS if "--qdrant-path" in {o for p in command(name).params for o in p.opts}}
    assert said == has


@pytest.mark.parametrize("argv", [[], ["run"], ["status"]])
def test_the_pasted_help_is_the_real_help(argv, capsys, monkeypatch):
    """The `outboxd [COMMAND] --help` blocks are what the code prints (at 80 columns)."""
    monkeypatch.setenv("COLUMNS", "80")
    real = help_text(argv, capsys).rstrip()
    prompt = " ".join(["$ outboxd", *argv, "--help"])
    block = re.search(rf"^{re.escape(prompt)}\n(.*?)\n```", COMMANDS, re.M | re.S)
    assert block, f"no `{prompt}` block in the Commands section"
    assert block.group(1).rstrip() == real


def test_the_config_file_example_loads_without_a_warning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key in [k for k in __import__("os").environ if k.startswith("OUTBOXD_")]:
        monkeypatch.delenv(key)
    (toml,) = re.findall(r"```toml\n(.*?)```", COMMANDS, re.S)
    path = tmp_path / "outboxd.toml"
    path.write_text(toml)
    settings, problems = load_settings(path, {}, strict=True)
    assert problems == []
    assert settings.collection == "docs" and settings.embedding.backend == "onnx"


def test_the_exit_code_table_matches_daemon_errors():
    from daemon import errors

    table = dict(re.findall(r"^\| `(\d+)` \| (.*) \|$", COMMANDS, re.M))
    assert set(map(int, table)) == {0, 1, 2, 3, 69, 78, 130}
    documented = set(re.findall(r"^  (\d+) ", errors.__doc__, re.M))
    assert documented == set(table)
    assert errors.EXIT_CHECK_FAILED == 3 and "reconcile --check" in table["3"] and "status --max-*" in table["3"]


def test_ci_runs_the_test_command_the_readme_gives():
    """.ci/run runs `python -m pytest -q`, which the README names as the test command."""
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "python -m pytest -q" in ci and "python -m pytest -q" in README
    assert "bash .ci/run" in README
