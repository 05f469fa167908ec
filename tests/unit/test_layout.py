"""The layout the README promises: imports go one way (consumers -> daemon ->
db), no product module is over 400 lines, and the notify worker, the relay and
the Kafka consumer run in the one runtime shell."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ORDER = ["db", "daemon", "consumers"]  # a folder may import only those before it


def imports(path: Path) -> set[str]:
    """Top-level packages this module imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_imports_go_one_way_between_top_level_folders():
    wrong = []
    for rank, folder in enumerate(ORDER):
        later = set(ORDER[rank + 1:])
        for path in sorted((REPO / folder).rglob("*.py")):
            bad = imports(path) & later
            if bad:
                wrong.append(f"{path.relative_to(REPO)} imports {sorted(bad)}")
    assert wrong == []


def test_no_product_module_is_over_400_lines():
    long = [
        f"{p.relative_to(REPO)}: {n}"
        for folder in ORDER
        for p in sorted((REPO / folder).rglob("*.py"))
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400
    ]
    assert long == []


def test_every_long_running_transport_runs_in_the_one_shell():
    from consumers.qdrant_consumer import QdrantConsumer
    from consumers.relay import Relay
    from consumers.tail import TailConsumer
    from daemon.outbox.notify_daemon import NotifyDaemon
    from daemon.runtime.service import Service

    for transport in (NotifyDaemon, Relay, QdrantConsumer, TailConsumer):
        assert issubclass(transport, Service), transport
    # and they plug in only what differs: none redefines the shell's policy
    for transport in (NotifyDaemon, Relay, QdrantConsumer):
        for shell_method in ("until_reachable", "install_signals", "log_stats", "secret_values", "report_stats"):
            assert shell_method not in vars(transport), f"{transport.__name__} redefines {shell_method}"


def test_every_package_data_pattern_matches_a_file():
    """pyproject's package-data names only files that exist (it once listed an alembic.ini that did not)."""
    import tomllib

    data = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["package-data"]
    empty = [f"{package}/{pattern}" for package, patterns in data.items() for pattern in patterns
             if not list((REPO / package).glob(pattern))]
    assert empty == []
