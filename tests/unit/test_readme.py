"""README.md and docs/configuration.md stay true: the Commands section (the
commands, their options, the exit codes), the settings the README names, every
setting's row and the config-file example in docs/configuration.md, and the
test command match the code and CI. (tests/unit/test_docs.py checks links,
command lines and snippets on every page.)"""
from __future__ import annotations

import ast
import re
import sys

import click

from daemon import cli
from daemon.commands.options import every_settings_class, load_settings
from daemon.settings.names import nested_models, settings_of
from tests.conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
CONFIGURATION = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
COMMON = {"--config", "--data-dir", "--log-level", "--strict", "--qdrant-url", "--qdrant-path", "--help"}


def section(title: str, text: str = README) -> str:
    """A `## title` section, its ### subsections included."""
    start = text.index(f"## {title}\n")
    following = re.search(r"^## ", text[start + 3:], re.M)
    return text[start: start + 3 + following.start()] if following else text[start:]


COMMANDS = section("Commands")


def command(name: str) -> click.Command:
    return cli.cli.get_command(click.Context(cli.cli), name)


def own_options(name: str) -> set[str]:
    """The long options a command has besides the common ones (--no-x halves left out)."""
    return {opt for p in command(name).params if isinstance(p, click.Option)
            for opt in p.opts if opt.startswith("--")} - COMMON


def documented_variables() -> set[str]:
    """Each setting's environment variable, the core's and every installed wing's (a
    table's settings each their own; of the embedding union, what every backend has,
    OUTBOXD_EMBEDDING__BACKEND included, where each backend's own settings are in
    docs/embedding.md)."""
    expected = set()
    for cls in every_settings_class():
        for s in settings_of(cls):
            members = [m for _, m in nested_models(cls.model_fields[s.path[0]].annotation)]
            if len(members) < 2 or all(s.path[1] in m.model_fields for m in members):
                expected.add(s.variable)
    return expected


def test_every_setting_is_in_the_settings_tables():
    """docs/configuration.md has a row for every setting, and for nothing else."""
    rows = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", section("Every setting", CONFIGURATION), re.M))
    assert rows == documented_variables()


def test_the_settings_the_readme_names_are_settings():
    rows = re.findall(r"^\| (`[A-Z_]+`(?:, `[A-Z_]+`)*) \|", section("Configuration"), re.M)
    named = {v for row in rows for v in re.findall(r"`([A-Z_]+)`", row)}
    assert named and named <= documented_variables()


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


def test_the_config_file_example_loads_without_a_warning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key in [k for k in __import__("os").environ if k.startswith("OUTBOXD_")]:
        monkeypatch.delenv(key)
    (toml,) = re.findall(r"```toml\n(.*?)```", CONFIGURATION, re.S)
    path = tmp_path / "outboxd.toml"
    path.write_text(toml)
    settings, problems = load_settings(path, {}, strict=True, settings="consumers.settings:StreamSettings")
    assert problems == []
    assert settings.collection == "docs" and settings.embedding.backend == "onnx"
    assert settings.kafka.topic == "docs.chunks"
    assert load_settings(path, {}, strict=True)[1] == []  # the core's commands know the wing's table too


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


def test_the_embedded_database_url_is_unset_where_it_was_exported():
    """The quick start has the reader export the embedded PostgreSQL's URL, which
    stops answering with the daemon: the same section says to unset it."""
    own_data = section("Quick start")
    assert re.search(r"^export DATABASE_URL='postgresql://[^']*\.outboxd/postgres'", own_data, re.M)
    assert "unset DATABASE_URL" in own_data


FIRST_PARTY = {"db", "daemon", "consumers", "tests"}


def _top_level_imports(path) -> set[str]:
    """The modules a file imports as it loads: its body's import statements (not
    those under `if`/`try` or in functions), up to a module-level importorskip."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Expr) and "importorskip" in ast.unparse(node):
            break
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _first_party_file(module: str):
    base = REPO.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _installed_by(extra: str) -> set[str]:
    """The distributions `pip install -e '.[extra]'` installs: the core's and the
    extra's requirements (outboxd[...] among them followed), and theirs in turn."""
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    pending = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"][extra]]
    found: set[str] = set()
    while pending:
        req = pending.pop()
        name = canonicalize_name(req.name)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if name == "outboxd":
            pending += [Requirement(r) for e in req.extras for r in project["optional-dependencies"][e]]
            continue
        if name in found:
            continue
        found.add(name)
        try:
            pending += [Requirement(r) for r in metadata.requires(req.name) or []]
        except metadata.PackageNotFoundError:
            pass
    return found


def test_the_test_extra_is_all_the_test_modules_need_to_load():
    """After the quick start's install, `pip install -e '.[test]'` is enough for
    the README's test commands to collect every test module: each package a test
    module imports as it loads, itself or through the modules of ours it loads,
    is installed by the core or the test extra (or the module skips without it)."""
    from importlib.metadata import packages_distributions

    from packaging.utils import canonicalize_name

    installed = _installed_by("test")
    distributions = packages_distributions()
    seen: set[str] = set()
    pending = [(f"tests/{p.relative_to(REPO / 'tests')}", p) for p in sorted((REPO / "tests").rglob("*.py"))]
    missing: dict[str, str] = {}
    while pending:
        where, path = pending.pop()
        for module in _top_level_imports(path):
            top = module.split(".")[0]
            if top in FIRST_PARTY:
                parts = module.split(".")
                for i in range(1, len(parts) + 1):  # a package's __init__ loads before its modules
                    name = ".".join(parts[:i])
                    file = _first_party_file(name)
                    if file is not None and name not in seen:
                        seen.add(name)
                        pending.append((f"{where} → {name}", file))
            elif top not in sys.stdlib_module_names:
                dists = {canonicalize_name(d) for d in distributions.get(top, [])}
                if not dists & installed:
                    missing.setdefault(top, where)
    assert missing == {}, "not installed by pip install -e '.[test]': " + "; ".join(
        f"{top} (for {where})" for top, where in sorted(missing.items()))
