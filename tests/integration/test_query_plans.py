"""Named queries keep their index probes under a prepared statement's generic plan.

psycopg prepares a statement server-side once it has run a few times, and
PostgreSQL may then plan it once for every parameter value. A key written as
"after IS NULL OR id > after" cannot be an index condition in such a plan: each
page scans from the lowest id, and a walk of N chunks costs N²/page rows (seen
as reconcile and backfill slowing down with the size of the table). And the
statistics such a plan is built on may predate the outbox it runs against: a
backfill fills the outbox faster than autovacuum analyzes it."""
from __future__ import annotations

import re

import pytest

from db.queries import query

KEYSET_QUERIES = {"reconcile_chunks": "chunks_pkey", "backfill_page": "chunks_pkey"}
MANY_CHUNKS = 20_000  # enough that the planner's choice matters
TYPES = {"after": "uuid", "source_id": "uuid", "document_id": "uuid", "limit": "int", "job": "text",
         "chunk_ids": "uuid[]"}
ARGS = {"after": "gen_random_uuid()", "limit": "500", "job": "'plan'",
        "chunk_ids": "ARRAY[gen_random_uuid(), gen_random_uuid()]"}


def add_chunks(conn) -> None:
    # no events for these: the capture triggers are off meanwhile
    conn.execute("INSERT INTO sources (source_type) VALUES ('api')")
    conn.execute("INSERT INTO documents (source_id, title) SELECT id, 'plans' FROM sources")
    conn.execute("ALTER TABLE chunks DISABLE TRIGGER ALL")
    conn.execute("INSERT INTO chunks (document_id, chunk_index, text) "
                 "SELECT d.id, g, 'chunk ' || g FROM documents d, generate_series(1, %s) g", (MANY_CHUNKS,))
    conn.execute("ALTER TABLE chunks ENABLE TRIGGER ALL")


def generic_plan(conn, name: str) -> str:
    """EXPLAIN of the named query as a prepared statement planned once for every value."""
    names: list[str] = []

    def positional(match: re.Match) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    body = re.sub(r"%\((\w+)\)s", positional, query(name).rstrip().rstrip(";"))
    conn.execute(f"PREPARE plan_me ({', '.join(TYPES[n] for n in names)}) AS {body}")
    try:
        conn.execute("SET plan_cache_mode = force_generic_plan")
        args = ", ".join(ARGS.get(n, "NULL") for n in names)
        return "\n".join(r[0] for r in conn.execute(f"EXPLAIN (COSTS OFF) EXECUTE plan_me ({args})").fetchall())
    finally:
        conn.execute("RESET plan_cache_mode")
        conn.execute("DEALLOCATE plan_me")


@pytest.mark.parametrize("name", KEYSET_QUERIES)
def test_a_keyset_page_seeks_by_its_key_in_a_generic_plan(conn, name):
    add_chunks(conn)
    conn.execute("ANALYZE")
    plan = generic_plan(conn, name)
    seek = re.search(rf"Index Scan using {KEYSET_QUERIES[name]} on chunks c\s*\n\s*Index Cond: \(id >= ", plan)
    assert seek, plan


@pytest.mark.parametrize("name", ["backfill_page", "pending_chunks"])
def test_is_an_event_pending_stays_one_probe_on_an_outbox_grown_since_analyze(conn, name):
    """Statistics taken while the outbox was empty, then 20,000 pending events: "is an
    event pending for this chunk?" must stay one probe of the chunk's index entries,
    not an AND with the bitmap of every pending event (seconds per backfill page)."""
    add_chunks(conn)
    conn.execute("ALTER TABLE outboxd.outbox SET (autovacuum_enabled = off)")  # keep the statistics stale
    conn.execute("ANALYZE")
    conn.execute("INSERT INTO outboxd.outbox (chunk_id, op) SELECT id, 'update' FROM chunks")
    plan = generic_plan(conn, name)
    assert "BitmapAnd" not in plan, plan
    if name == "pending_chunks":
        assert re.search(r"Index Only Scan using outbox_chunk_id_status_idx on outbox\s*\n\s*Index Cond: "
                         r"\(\(chunk_id = ANY \(\$1\)\) AND \(status = 'pending'::text\)\)", plan), plan


async def test_the_searches_optional_filters_are_never_planned_generically(conn, dsn):
    """A search's queries filter on "x IS NULL OR ..." for each optional filter; a generic plan
    cannot tell which are set (the keyword side took 783 ms instead of 11 at 100,000 chunks).
    After more runs than psycopg's prepare threshold on one connection, neither is a prepared
    statement, so each run is planned for its own values."""
    from db.gateway import UNPREPARED, make_pool
    from db.reads import SearchReads
    from tests.support import add_document

    add_document(conn, [f"a chunk about gardening, number {i}" for i in range(10)])
    async with make_pool(dsn, application_name="outboxd:test", min_size=1, max_size=1) as pool:
        reads = SearchReads(pool)
        for _ in range(8):
            found = await reads.keyword_candidates("gardening", limit=5)
            await reads.current_chunks([chunk_id for chunk_id, _ in found])
        async with pool.connection() as c:
            prepared = await (await c.execute("SELECT statement FROM pg_prepared_statements")).fetchall()
    assert found and UNPREPARED == {"search_keyword", "search_hits"}
    statements = [row["statement"] for row in prepared]
    assert not [s for s in statements if "websearch_to_tsquery" in s or "ANY(" in s], statements
