"""The named SQL queries in sql/queries.sql (the daemon's and the operator
commands') and sql/demo.sql (`outboxd demo`'s), loaded once. A name is
defined once across all the files. db.gateway runs them."""
from __future__ import annotations

import re
from functools import cache
from pathlib import Path

QUERIES_FILE = Path(__file__).parent / "sql" / "queries.sql"
QUERY_FILES = (QUERIES_FILE, Path(__file__).parent / "sql" / "demo.sql")
_HEADER = re.compile(r"^-- ([a-z_]+) --$", re.MULTILINE)


def parse(text: str, source: Path | str = QUERIES_FILE) -> dict[str, str]:
    parts = _HEADER.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice in {source}")
        queries[name] = body.strip()
    return queries


@cache
def _all() -> dict[str, str]:
    queries: dict[str, str] = {}
    for path in QUERY_FILES:
        for name, body in parse(path.read_text(encoding="utf-8"), path).items():
            if name in queries:
                raise ValueError(f"query {name!r} is defined twice: again in {path}")
            queries[name] = body
    return queries


def query(name: str) -> str:
    try:
        return _all()[name]
    except KeyError:
        raise KeyError(f"no query named {name!r} in {', '.join(p.name for p in QUERY_FILES)}") from None
