"""Keyset pages stay index seeks under a prepared statement's generic plan.

psycopg prepares a statement server-side once it has run a few times, and
PostgreSQL may then plan it once for every parameter value. A key written as
"after IS NULL OR id > after" cannot be an index condition in such a plan: each
page scans from the lowest id, and a walk of N chunks costs N²/page rows (seen
as reconcile and backfill slowing down with the size of the table)."""
from __future__ import annotations

import re

import pytest

from db.queries import query

KEYSET_QUERIES = {"reconcile_chunks": "chunks_pkey", "backfill_page": "chunks_pkey"}
MANY_CHUNKS = 20_000  # enough that the planner's choice matters
TYPES = {"after": "uuid", "source_id": "uuid", "document_id": "uuid", "limit": "int", "job": "text"}


@pytest.mark.parametrize("name", KEYSET_QUERIES)
def test_a_keyset_page_seeks_by_its_key_in_a_generic_plan(conn, name):
    # no events for these: the capture triggers are off meanwhile
    conn.execute("INSERT INTO sources (source_type) VALUES ('api')")
    conn.execute("INSERT INTO documents (source_id, title) SELECT id, 'plans' FROM sources")
    conn.execute("ALTER TABLE chunks DISABLE TRIGGER ALL")
    conn.execute("INSERT INTO chunks (document_id, chunk_index, text) "
                 "SELECT d.id, g, 'chunk ' || g FROM documents d, generate_series(1, %s) g", (MANY_CHUNKS,))
    conn.execute("ALTER TABLE chunks ENABLE TRIGGER ALL")
    conn.execute("ANALYZE")
    names: list[str] = []

    def positional(match: re.Match) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    body = re.sub(r"%\((\w+)\)s", positional, query(name).rstrip().rstrip(";"))
    conn.execute(f"PREPARE page ({', '.join(TYPES[n] for n in names)}) AS {body}")
    try:
        conn.execute("SET plan_cache_mode = force_generic_plan")
        args = ", ".join({"after": "gen_random_uuid()", "limit": "500", "job": "'plan'"}.get(n, "NULL") for n in names)
        plan = "\n".join(r[0] for r in conn.execute(f"EXPLAIN (COSTS OFF) EXECUTE page ({args})").fetchall())
    finally:
        conn.execute("RESET plan_cache_mode")
        conn.execute("DEALLOCATE page")
    seek = re.search(rf"Index Scan using {KEYSET_QUERIES[name]} on chunks c\s*\n\s*Index Cond: \(id >= ", plan)
    assert seek, plan
