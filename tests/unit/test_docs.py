"""README.md and docs/ stay true and reachable: every page is linked from the
README, every relative link and anchor resolves, every `outboxd` command line
they show names a real command with real options, every Python snippet's
imports resolve, and no page speaks of how the project is made instead of the
product."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import click
import pytest

from daemon import cli
from tests.conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TEXT = {page: page.read_text(encoding="utf-8") for page in PAGES}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
COMMON = {"--config", "--data-dir", "--log-level", "--strict", "--qdrant-url", "--qdrant-path", "--help", "-h"}


def anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for heading in re.findall(r"^#+ (.+)$", FENCE.sub("", text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")
        found.add(slug)
    return found


def name(page: Path) -> str:
    return str(page.relative_to(REPO))


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / target.split("#")[0]).resolve() for target in LINK.findall(TEXT[REPO / "README.md"])
              if not target.startswith(("http://", "https://", "#"))}
    assert [name(p) for p in PAGES[1:] if p.resolve() not in linked] == []


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in LINK.findall(TEXT[page]):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text(encoding="utf-8")):
            broken.append(target)
    assert broken == []


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_no_page_speaks_of_how_the_project_is_made(page):
    """The product speaks of the product: no issue numbers, no lent machines or
    tasks, no paths outside the repository."""
    words = re.compile(r"\bissues? (?:\d+|notes?)\b|issues' notes|\bthis task\b|lent to|\.\./shared|"
                       r"\bthe next task\b|when issue", re.I)
    assert words.findall(TEXT[page]) == []


def command_lines() -> list[tuple[str, str]]:
    """(page, line) of every `outboxd ...` invocation in a shell block or after a `$ ` prompt."""
    lines = []
    for page, text in TEXT.items():
        for lang, body in FENCE.findall(text):
            for raw in body.splitlines():
                line = raw.strip()
                if lang not in ("sh", "bash", "") or line.startswith("#"):
                    continue
                line = line.removeprefix("$ ")
                line = re.sub(r"^(?:[A-Z_]+=\S+ )+", "", line)  # VAR=value prefixes
                line = re.sub(r"^(?:\.venv/bin/|/opt/outboxd/bin/)", "", line)
                if line.startswith("outboxd ") and (lang in ("sh", "bash") or raw.strip().startswith("$ ")):
                    lines.append((name(page), line))
    return lines


def command(name_: str) -> click.Command:
    return cli.cli.get_command(click.Context(cli.cli), name_)


def options_of(cmd: click.Command) -> set[str]:
    return {o for p in cmd.params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts)}


@pytest.mark.parametrize("where, line", command_lines())
def test_every_command_shown_is_a_real_command_with_real_options(where, line):
    line = re.split(r"\s(?:&&|\|\||\||;|&|>|2>)\s?|\s#", line)[0]  # this command only, not the pipe after it
    words = shlex.split(line.replace("…", "x"))[1:]
    if not words or words[0].startswith("-"):
        assert set(words) <= {"--help", "-h", "--version"}, line
        return
    assert words[0] in cli.COMMANDS, f"{where}: `{line}` names no command"
    cmd = command(words[0])
    known = options_of(cmd) | COMMON
    unknown = [w.split("=")[0] for w in words[1:] if w.startswith("-") and w.split("=")[0] not in known]
    assert unknown == [], f"{where}: `{line}`"


def python_snippets() -> list[tuple[str, str]]:
    return [(name(page), body) for page, text in TEXT.items() for lang, body in FENCE.findall(text) if lang == "python"]


@pytest.mark.parametrize("where, source", python_snippets())
def test_every_python_snippet_compiles_and_its_imports_resolve(where, source):
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            module = importlib.import_module(node.module)
            missing = [a.name for a in node.names
                       if not hasattr(module, a.name) and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
            assert missing == [], f"{where}: from {node.module} import {missing}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)


SHELL_VARIABLE = re.compile(r"\$\{?([A-Za-z_]\w*)")
ASSIGNMENT = re.compile(r"(?:^|[\s;(])(?:export\s+)?([A-Za-z_]\w*)=")


def shell_snippets() -> list[tuple[str, str]]:
    return [(name(page), body) for page, text in TEXT.items() for lang, body in FENCE.findall(text)
            if lang in ("sh", "bash")]


def setting_variables() -> set[str]:
    from daemon.commands.options import every_settings_class
    from daemon.settings.names import settings_of

    return {s.variable for cls in every_settings_class() for s in settings_of(cls)}


@pytest.mark.parametrize("where, source", shell_snippets())
def test_every_shell_variable_a_snippet_uses_is_set_before_it(where, source):
    """Pasted as written, a shell block works: each variable it reads is set by
    an earlier line of it, or is a setting the reader exports (QDRANT_URL, ...)."""
    known = setting_variables() | {"HOME", "PATH"}
    unset = []
    for line in source.replace("\\\n", " ").splitlines():
        line = re.sub(r"(?:^|\s)#.*", "", line)  # a comment
        unset += [v for v in SHELL_VARIABLE.findall(line) if v not in known]
        known |= set(ASSIGNMENT.findall(line))
    assert unset == [], f"{where}: set nowhere before their use: {unset}"


def test_the_readme_is_a_short_way_in():
    assert len(TEXT[REPO / "README.md"].splitlines()) <= 400
