"""The named SQL queries: the files parse, and every name the daemon uses exists."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from db.queries import QUERIES_FILE, QUERY_FILES, _all, parse, query

REPO = Path(__file__).resolve().parents[2]
QUERY_FUNCTIONS = {"query", "fetch"}  # db.queries.query, db.gateway.fetch and a transaction's fetch


def names_used_in_code() -> set[str]:
    """The query name of every query(...), fetch(pool, ...) and tx.fetch(...) call in
    daemon/, consumers/ and db/'s own modules: the first string literal among its positional arguments."""
    names = set()
    files = [*sorted((REPO / "daemon").rglob("*.py")), *sorted((REPO / "consumers").rglob("*.py")),
             *sorted((REPO / "db").glob("*.py"))]
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            if name not in QUERY_FUNCTIONS:
                continue
            literal = next((a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)), None)
            if literal is not None:
                names.add(literal)
    return names


def test_parse_splits_named_sections():
    """parse returns one stripped body per '-- name --' header, without the preamble."""
    text = (
        "-- a preamble comment, not a query\n\n"
        "-- first_query --\n"
        "-- a comment that belongs to the query\n"
        "SELECT 1;\n\n"
        "-- second_query --\n"
        "UPDATE t SET x = %(x)s\nWHERE id = %(id)s;\n"
    )
    assert parse(text) == {
        "first_query": "-- a comment that belongs to the query\nSELECT 1;",
        "second_query": "UPDATE t SET x = %(x)s\nWHERE id = %(id)s;",
    }


def test_parse_rejects_a_duplicate_name():
    """A name defined twice is an error, not a silent override."""
    with pytest.raises(ValueError, match="twice"):
        parse("-- same --\nSELECT 1;\n-- same --\nSELECT 2;\n")


def test_queries_file_parses_with_non_empty_bodies():
    """The shipped queries.sql and demo.sql have no duplicate (within or across them) and no empty query."""
    assert QUERIES_FILE in QUERY_FILES
    for path in QUERY_FILES:
        queries = parse(path.read_text(encoding="utf-8"), path)
        assert queries, path
        assert all(body.strip() for body in queries.values()), path
    assert len(_all()) == sum(len(parse(p.read_text(encoding="utf-8"))) for p in QUERY_FILES)


def test_every_query_the_code_uses_exists():
    """Each query("...") / fetch(...) name in daemon/, consumers/ and db/ is defined in db/sql/*.sql."""
    used = names_used_in_code()
    # the scan works, for query(...), fetch(pool, ...) and tx.fetch(...) calls alike
    assert {"claim_batch", "ack_verified", "dead_letters", "retry_dead_letters", "backlog", "relay_versions",
            "make_live_collection"} <= used
    defined = set(_all())
    assert used - defined == set()
    for name in used:
        assert query(name)


def test_unknown_name_raises_key_error_naming_it():
    """Asking for a query that does not exist says which name was wrong."""
    with pytest.raises(KeyError, match="no_such_query"):
        query("no_such_query")
