"""The layout the README promises: imports go one way (consumers -> daemon ->
db) with no circle between modules and no module reaching into another's
private names, and the notify worker, the relay and the Kafka consumer run in
the one runtime shell, whose lifecycle alone creates tasks."""
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


def product_modules() -> dict[str, Path]:
    return {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
            for folder in ORDER for p in sorted((REPO / folder).rglob("*.py"))}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The product modules this one imports, anywhere in it (function level and
    TYPE_CHECKING included: a lazy import that dodges a cycle is still a cycle)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def test_no_module_imports_another_modules_private_names():
    """A split that needs private names (`from x import _y`) is one module cut in two."""
    wrong = []
    known = set(product_modules())
    for name, path in product_modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module in known and node.module != name:
                private = [a.name for a in node.names if a.name.startswith("_")]
                if private:
                    wrong.append(f"{name} imports {private} from {node.module}")
    assert wrong == []


def test_the_import_graph_has_no_circle():
    modules = product_modules()
    graph = {name: imported_modules(path, set(modules)) - {name} for name, path in modules.items()}
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == [], "\n".join(" -> ".join(c) for c in circles)


def test_every_long_running_transport_runs_in_the_one_shell():
    from consumers.qdrant_consumer import QdrantConsumer
    from consumers.relay import Relay
    from consumers.tail import TailConsumer
    from daemon.outbox.notify_daemon import NotifyDaemon
    from daemon.runtime.service import Service

    for transport in (NotifyDaemon, Relay, QdrantConsumer, TailConsumer):
        assert issubclass(transport, Service), transport
    # and they plug in only what differs: none redefines the shell's policy or its lifecycle
    shell = ("until_reachable", "install_signals", "log_stats", "secret_values", "report_stats",
             "run", "watch", "fail", "on_second_signal")
    for transport in (NotifyDaemon, Relay, QdrantConsumer, TailConsumer):
        for cls in transport.__mro__[:transport.__mro__.index(Service)]:
            for shell_method in shell:
                assert shell_method not in vars(cls), f"{cls.__name__} redefines {shell_method}"


# The one lifecycle: the module that starts, watches, drains and cancels every
# worker and side task (daemon.runtime.service: Service.watch, Service.run,
# run_service). A task created anywhere else escapes it: nothing would see it
# fail, and it could outlive the work it serves.
LIFECYCLE = {"daemon/runtime/service.py"}
SPAWNS = {"create_task", "ensure_future", "run_coroutine_threadsafe"}  # asyncio's, a loop's, a TaskGroup's
# (module, function) -> why a task may be created there
SPAWN_ALLOWED = {
    ("daemon/runtime/retry.py", "wait_for_any"):
        "waiters on events, each cancelled before the function returns",
    ("daemon/embedding/http_backend.py", "_encode"):
        "a TaskGroup's children (one request per part of a batch): they end and fail with the encode",
    ("daemon/outbox/service.py", "_process_claimed"):
        "a TaskGroup's child (the lease renewer): it ends and fails with its batch",
}


def spawns(source: str) -> list[tuple[str, int]]:
    """(enclosing function, line) of every call that creates a task."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else function
            if isinstance(child, ast.Call):
                func = child.func
                name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
                if name in SPAWNS:
                    found.append((function, child.lineno))
            visit(child, inner)

    visit(ast.parse(source), "<module>")
    return found


def test_the_spawn_check_sees_every_way_to_create_a_task():
    source = """
import asyncio
from asyncio import create_task, ensure_future
async def a(loop, group):
    asyncio.create_task(x())
    loop.create_task(x())
    group.create_task(x())
    asyncio.ensure_future(x())
    create_task(x())
    ensure_future(x())
    asyncio.get_running_loop().create_task(x())
"""
    assert [f for f, _ in spawns(source)] == ["a"] * 7


def test_no_task_is_created_outside_the_lifecycle():
    """Every worker and side task runs through the one lifecycle; a task created
    elsewhere is either on the list above, with why, or a defect."""
    found, seen = [], set()
    for folder in ORDER:
        for path in sorted((REPO / folder).rglob("*.py")):
            where = path.relative_to(REPO).as_posix()
            if where in LIFECYCLE:
                continue
            for function, line in spawns(path.read_text(encoding="utf-8")):
                if (where, function) in SPAWN_ALLOWED:
                    seen.add((where, function))
                else:
                    found.append(f"{where}:{line} ({function}) creates a task outside the lifecycle")
    assert found == [], "\n".join(found)
    assert set(SPAWN_ALLOWED) == seen, f"allowed but gone: {sorted(set(SPAWN_ALLOWED) - seen)}"


def test_every_package_data_pattern_matches_a_file():
    """pyproject's package-data names only files that exist (it once listed an alembic.ini that did not)."""
    import tomllib

    data = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["package-data"]
    empty = [f"{package}/{pattern}" for package, patterns in data.items() for pattern in patterns
             if not list((REPO / package).glob(pattern))]
    assert empty == []


def test_the_core_settings_hold_nothing_of_the_kafka_wing():
    """The Kafka settings are the wing's ([kafka], consumers.settings): the core's
    Settings has no Kafka field, and building it loads nothing of consumers/ (a
    real process: nothing loaded by other tests)."""
    import subprocess
    import sys

    from daemon.config import Settings

    assert not [name for name in Settings.model_fields if "kafka" in name.lower()]
    script = ("import sys\nfrom daemon.config import Settings\nSettings()\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] == 'consumers'))")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
