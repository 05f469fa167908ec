"""The named SQL queries: the file parses, and every name the daemon uses exists."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from db.queries import QUERIES_FILE, parse, query

REPO = Path(__file__).resolve().parents[2]
_CALL = re.compile(r"""\b(?:query|_fetch)\(\s*["']([a-z_]+)["']""")


def names_used_in_code() -> set[str]:
    files = sorted((REPO / "daemon").rglob("*.py")) + sorted((REPO / "consumers").rglob("*.py"))
    return {name for f in files for name in _CALL.findall(f.read_text(encoding="utf-8"))}


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
    """The shipped queries.sql has no duplicate and no empty query."""
    queries = parse(QUERIES_FILE.read_text(encoding="utf-8"))
    assert queries
    assert all(body.strip() for body in queries.values())


def test_every_query_the_code_uses_exists():
    """Each query("...") / _fetch("...") name in daemon/ and consumers/ is defined in queries.sql."""
    used = names_used_in_code()
    assert {"claim_batch", "ack_verified", "dead_letters", "retry_dead_letters"} <= used  # the scan works
    defined = set(parse(QUERIES_FILE.read_text(encoding="utf-8")))
    assert used - defined == set()
    for name in used:
        assert query(name)


def test_unknown_name_raises_key_error_naming_it():
    """Asking for a query that does not exist says which name was wrong."""
    with pytest.raises(KeyError, match="no_such_query"):
        query("no_such_query")
