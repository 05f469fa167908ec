"""db/ owns every query: outside it, no module loads a named query, runs one
through the gateway, or executes SQL on a connection or cursor of its own. The
rest of outboxd calls the repositories (db.outbox, db.catalog, db.coordination,
db.scans, db.reads), whose methods say what they do."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUTSIDE_DB = ("daemon", "consumers")

# What only db/ may use: the query loader, and the gateway's runners of named queries.
DB_ONLY_MODULES = {"db.queries"}
DB_ONLY_NAMES = {"db.gateway": {"fetch", "transaction", "Transaction"}, "db": {"queries"}}
SQL_METHODS = {"execute", "executemany", "cursor"}


def sql_outside_db(source: str) -> list[str]:
    """What in this module's source only db/ may do, one line each (empty: nothing)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name in DB_ONLY_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in DB_ONLY_MODULES:
                found.append(f"line {node.lineno}: from {node.module} import ...")
            names = {a.name for a in node.names} & DB_ONLY_NAMES.get(node.module, set())
            found += [f"line {node.lineno}: from {node.module} import {n}" for n in sorted(names)]
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id == "gateway" and node.attr in DB_ONLY_NAMES["db.gateway"]):
            found.append(f"line {node.lineno}: gateway.{node.attr}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SQL_METHODS:
            found.append(f"line {node.lineno}: .{node.func.attr}(...)")
    return found


def modules_outside_db() -> dict[str, Path]:
    return {p.relative_to(REPO).as_posix(): p for folder in OUTSIDE_DB for p in sorted((REPO / folder).rglob("*.py"))}


def test_no_module_outside_db_runs_sql():
    """Every module of daemon/ and consumers/ reaches PostgreSQL through db/'s repositories only."""
    wrong = {name: found for name, path in modules_outside_db().items()
             if (found := sql_outside_db(path.read_text(encoding="utf-8")))}
    assert wrong == {}


def test_the_check_sees_each_way_of_running_sql():
    """The scan finds each thing only db/ may do, and passes a repository's call."""
    for source in (
        "from db.queries import query",
        "import db.queries",
        "from db import queries",
        "from db.gateway import make_pool, fetch",
        "from db.gateway import transaction",
        "from db import gateway\nasync def f(pool):\n    await gateway.fetch(pool, 'backlog')",
        "async def f(conn):\n    await conn.execute('SELECT 1')",
        "def f(conn):\n    with conn.cursor() as cur:\n        pass",
    ):
        assert sql_outside_db(source), source
    assert sql_outside_db(
        "from db.gateway import make_pool, probe\nfrom db.outbox import OutboxRepository\n"
        "async def f(pool):\n    return await OutboxRepository(pool).backlog()"
    ) == []
