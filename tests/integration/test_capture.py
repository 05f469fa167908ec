"""Invariant 1 on a real PostgreSQL: capture is transactional. An outbox row
exists if and only if its chunk change committed; rolled-back writes leave
nothing; cascaded deletes and TRUNCATE are captured; one NOTIFY per transaction.
Also the content schema's own guarantees the pipeline relies on (generated
content_hash, search vectors, updated_at, CHECK and UNIQUE constraints)."""
from __future__ import annotations

import hashlib
import uuid
from collections import Counter

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import create_database, drop_database
from tests.support import add_document, add_source, outbox_rows

SENTINEL = "test-sentinel"


# --- helpers ------------------------------------------------------------------------
def events(conn: psycopg.Connection) -> Counter:
    """The outbox as a multiset of (chunk id, op)."""
    return Counter((r["chunk_id"], r["op"]) for r in outbox_rows(conn))


def expect(ids, op: str) -> Counter:
    return Counter((i, op) for i in ids)


def clear_outbox(conn: psycopg.Connection) -> None:
    """What the daemon does once events are applied: start each test from an empty outbox."""
    conn.execute("DELETE FROM outboxd.outbox")


def chunk_ids_of(conn: psycopg.Connection, where: str = "true", params=()) -> list[uuid.UUID]:
    return [r[0] for r in conn.execute(f"SELECT id FROM chunks WHERE {where}", params).fetchall()]


@pytest.fixture(scope="module")
def capture_db(pg_server, template_db):
    """One migrated database for this module (a database per test costs more than the tests)."""
    name = f"outboxd_capture_{uuid.uuid4().hex[:10]}"
    yield create_database(pg_server, name, template=template_db)
    drop_database(pg_server, name)


@pytest.fixture
def dsn(capture_db):
    """Overrides conftest's `dsn`: the module's database, emptied of content and events before each test."""
    with psycopg.connect(capture_db, autocommit=True) as c:
        c.execute("DELETE FROM sources")  # cascades to documents, chunks and crawl_jobs
        c.execute("DELETE FROM outboxd.outbox")
    return capture_db


@pytest.fixture
def doc(conn):
    """A document with three chunks, already captured and acknowledged."""
    doc_id, ids = add_document(
        conn, ["alpha text", "beta text", "gamma text"],
        title="Original title", url="https://example.org/a", document_type="html", metadata={"lang": "en"},
    )
    clear_outbox(conn)
    return doc_id, ids


@pytest.fixture
def listener(dsn, doc):
    """A second connection LISTENing on the daemon's channel, from after the `doc` setup on."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("LISTEN outboxd")
        yield c


def notifications(listener: psycopg.Connection, writer: psycopg.Connection) -> list[psycopg.Notify]:
    """Every notification on 'outboxd' committed so far: a sentinel sent last (in its own
    transaction) marks the end, since notifications arrive in commit order."""
    writer.execute("SELECT pg_notify('outboxd', %s)", (SENTINEL,))
    got = []
    for n in listener.notifies(timeout=5):
        if n.channel == "outboxd" and n.payload == SENTINEL:
            return got
        got.append(n)
    pytest.fail("the sentinel notification never arrived")


# --- INSERT ---------------------------------------------------------------------------
def test_insert_captures_one_insert_per_chunk(conn):
    """Each inserted chunk gets exactly one 'insert' event."""
    _, ids = add_document(conn, ["one", "two", "three"])
    assert events(conn) == expect(ids, "insert")


def test_multi_row_insert_statement_captures_every_row(conn):
    """A single multi-row INSERT statement captures one 'insert' per row."""
    doc_id, _ = add_document(conn, [])
    rows = conn.execute(
        "INSERT INTO chunks (document_id, chunk_index, text) "
        "VALUES (%(d)s, 0, 'a'), (%(d)s, 1, 'b'), (%(d)s, 2, 'c') RETURNING id",
        {"d": doc_id},
    ).fetchall()
    bulk = conn.execute(
        "INSERT INTO chunks (document_id, chunk_index, text) "
        "SELECT %s, i, 'chunk ' || i FROM generate_series(3, 202) i RETURNING id",
        (doc_id,),
    ).fetchall()
    ids = [r[0] for r in rows + bulk]
    assert len(ids) == 203
    assert events(conn) == expect(ids, "insert")


def test_upsert_captures_insert_and_update(conn, doc):
    """INSERT ... ON CONFLICT DO UPDATE captures 'insert' for new rows and 'update' for changed ones."""
    doc_id, ids = doc
    conn.execute(
        "INSERT INTO chunks (document_id, chunk_index, text) VALUES (%(d)s, 0, 'alpha rewritten'), (%(d)s, 7, 'new') "
        "ON CONFLICT (document_id, chunk_index) DO UPDATE SET text = excluded.text",
        {"d": doc_id},
    )
    (new_id,) = chunk_ids_of(conn, "document_id = %s AND chunk_index = 7", (doc_id,))
    assert events(conn) == Counter({(ids[0], "update"): 1, (new_id, "insert"): 1})


def test_upsert_do_nothing_on_conflict_captures_nothing(conn, doc):
    """INSERT ... ON CONFLICT DO NOTHING that inserts nothing leaves no event."""
    doc_id, _ = doc
    conn.execute(
        "INSERT INTO chunks (document_id, chunk_index, text) VALUES (%s, 0, 'ignored') ON CONFLICT DO NOTHING",
        (doc_id,),
    )
    assert events(conn) == Counter()


def test_merge_captures_insert_update_and_delete(conn, doc):
    """A MERGE statement captures its inserts, updates and deletes like the plain statements."""
    doc_id, ids = doc
    conn.execute(
        """MERGE INTO chunks t
           USING (VALUES (0, 'alpha merged'), (1, NULL), (5, 'merged in')) AS v(i, txt)
           ON t.document_id = %(d)s AND t.chunk_index = v.i
           WHEN MATCHED AND v.txt IS NULL THEN DELETE
           WHEN MATCHED THEN UPDATE SET text = v.txt
           WHEN NOT MATCHED THEN INSERT (document_id, chunk_index, text) VALUES (%(d)s, v.i, v.txt)""",
        {"d": doc_id},
    )
    (new_id,) = chunk_ids_of(conn, "document_id = %s AND chunk_index = 5", (doc_id,))
    assert events(conn) == Counter({(ids[0], "update"): 1, (ids[1], "delete"): 1, (new_id, "insert"): 1})


# --- UPDATE of chunks -------------------------------------------------------------
def test_update_of_text_is_an_update(conn, doc):
    """Changing a chunk's text captures op 'update' for that chunk only."""
    _, ids = doc
    conn.execute("UPDATE chunks SET text = 'alpha changed' WHERE id = %s", (ids[0],))
    assert events(conn) == expect([ids[0]], "update")


def test_update_of_text_and_payload_is_an_update(conn, doc):
    """A text change wins over a simultaneous payload change: op 'update'."""
    _, ids = doc
    conn.execute("UPDATE chunks SET text = 'beta changed', token_count = 99 WHERE id = %s", (ids[1],))
    assert events(conn) == expect([ids[1]], "update")


@pytest.mark.parametrize(
    "assignment",
    [
        "chunk_index = chunk_index + 100",
        "token_count = 42",
        "token_count = NULL",
        "metadata = '{\"k\": 1}'::jsonb",
        "metadata = NULL",
    ],
)
def test_update_of_payload_columns_is_payload(conn, doc, assignment):
    """Changing chunk_index, token_count or metadata (not text) captures op 'payload'."""
    _, ids = doc
    conn.execute(f"UPDATE chunks SET {assignment} WHERE id = %s", (ids[2],))
    assert events(conn) == expect([ids[2]], "payload")


def test_moving_a_chunk_to_another_document_is_payload(conn, doc):
    """Changing chunks.document_id captures op 'payload'."""
    _, ids = doc
    other_doc, _ = add_document(conn, [])
    clear_outbox(conn)
    conn.execute("UPDATE chunks SET document_id = %s WHERE id = %s", (other_doc, ids[0]))
    assert events(conn) == expect([ids[0]], "payload")


@pytest.mark.parametrize(
    "assignment",
    [
        "text = text",
        "created_at = now() - interval '1 day'",
        "updated_at = now()",
        "metadata = metadata, token_count = token_count, chunk_index = chunk_index",
    ],
)
def test_update_that_reaches_nothing_in_qdrant_is_not_captured(conn, doc, assignment):
    """An UPDATE that changes no column Qdrant sees writes no outbox row."""
    conn.execute(f"UPDATE chunks SET {assignment}")
    assert events(conn) == Counter()


def test_update_of_primary_key_is_delete_then_insert(conn, doc):
    """Changing chunks.id captures a 'delete' of the old id and an 'insert' of the new one."""
    _, ids = doc
    new_id = uuid.uuid4()
    conn.execute("UPDATE chunks SET id = %s WHERE id = %s", (new_id, ids[0]))
    assert events(conn) == Counter({(ids[0], "delete"): 1, (new_id, "insert"): 1})


def test_update_of_many_rows_in_one_statement(conn, doc):
    """A multi-row UPDATE captures each changed row once, and skips unchanged ones."""
    _, ids = doc
    conn.execute("UPDATE chunks SET text = CASE WHEN id = %s THEN text ELSE text || '!' END", (ids[0],))
    assert events(conn) == expect(ids[1:], "update")


# --- DELETE and cascades --------------------------------------------------------------
def test_delete_of_a_chunk_is_a_delete(conn, doc):
    """DELETE of a chunk captures op 'delete' for it alone."""
    _, ids = doc
    conn.execute("DELETE FROM chunks WHERE id = %s", (ids[1],))
    assert events(conn) == expect([ids[1]], "delete")


def test_deleting_a_document_cascades_to_chunk_deletes(conn, doc):
    """ON DELETE CASCADE from documents captures one 'delete' per chunk of that document."""
    doc_id, ids = doc
    add_document(conn, ["unrelated chunk"])
    clear_outbox(conn)
    conn.execute("DELETE FROM documents WHERE id = %s", (doc_id,))
    assert events(conn) == expect(ids, "delete")


def test_deleting_a_source_cascades_through_documents(conn):
    """Deleting a source captures deletes for all chunks of all its documents, and no others."""
    src = add_source(conn)
    _, ids1 = add_document(conn, ["s1 d1 c0", "s1 d1 c1"], source_id=src)
    _, ids2 = add_document(conn, ["s1 d2 c0"], source_id=src)
    _, other = add_document(conn, ["other source chunk"])
    clear_outbox(conn)
    conn.execute("DELETE FROM sources WHERE id = %s", (src,))
    assert events(conn) == expect(ids1 + ids2, "delete")
    assert chunk_ids_of(conn) == other


# --- TRUNCATE ---------------------------------------------------------------------------
def test_truncate_chunks_captures_a_delete_per_chunk(conn, doc):
    """TRUNCATE chunks captures a 'delete' for every chunk that existed."""
    _, ids = doc
    _, more = add_document(conn, ["another", "two"])
    clear_outbox(conn)
    conn.execute("TRUNCATE chunks")
    assert events(conn) == expect(ids + more, "delete")


@pytest.mark.parametrize("statement", ["TRUNCATE documents CASCADE", "TRUNCATE sources CASCADE"])
def test_truncate_cascade_captures_a_delete_per_chunk(conn, doc, statement):
    """TRUNCATE ... CASCADE that reaches chunks captures a 'delete' for every chunk."""
    _, ids = doc
    _, more = add_document(conn, ["another"])
    clear_outbox(conn)
    conn.execute(statement)
    assert chunk_ids_of(conn) == []
    assert events(conn) == expect(ids + more, "delete")


def test_truncate_of_an_empty_table_captures_nothing(conn):
    """TRUNCATE of an empty chunks table writes no outbox row."""
    conn.execute("TRUNCATE chunks")
    assert events(conn) == Counter()


# --- UPDATE of documents ---------------------------------------------------------
@pytest.mark.parametrize(
    "assignment",
    [
        "title = 'New title'",
        "url = 'https://example.org/b'",
        "url = NULL",
        "document_type = 'pdf'",
        "metadata = '{\"lang\": \"fr\"}'::jsonb",
        "source_id = %(other_source)s",
    ],
)
def test_document_payload_change_refreshes_each_chunk(conn, doc, assignment):
    """Changing a document field in its chunks' payload captures a 'payload' per chunk of it."""
    doc_id, ids = doc
    add_document(conn, ["a chunk of another document"])
    other_source = add_source(conn)
    clear_outbox(conn)
    conn.execute(f"UPDATE documents SET {assignment} WHERE id = %(doc)s", {"doc": doc_id, "other_source": other_source})
    assert events(conn) == expect(ids, "payload")


@pytest.mark.parametrize(
    "assignment",
    [
        "status = 'completed'",
        "total_chunks = 3",
        "content_hash = 'abc'",
        "title = title, url = url, metadata = metadata",
        "created_at = now() - interval '1 day'",
    ],
)
def test_document_change_outside_the_payload_is_not_captured(conn, doc, assignment):
    """Changing documents.status / total_chunks / content_hash (or nothing) captures nothing."""
    doc_id, _ = doc
    conn.execute(f"UPDATE documents SET {assignment} WHERE id = %s", (doc_id,))
    assert events(conn) == Counter()


# --- rollback ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO chunks (document_id, chunk_index, text) VALUES (%(doc)s, 50, 'never committed')",
        "UPDATE chunks SET text = 'never committed' WHERE document_id = %(doc)s",
        "UPDATE chunks SET metadata = '{\"x\": 1}' WHERE document_id = %(doc)s",
        "UPDATE documents SET title = 'never committed' WHERE id = %(doc)s",
        "DELETE FROM chunks WHERE document_id = %(doc)s",
        "DELETE FROM documents WHERE id = %(doc)s",
        "TRUNCATE chunks",
        "TRUNCATE sources CASCADE",
    ],
)
def test_rolled_back_write_leaves_no_outbox_row(conn, doc, statement):
    """A write whose transaction rolls back leaves no outbox row."""
    doc_id, _ = doc
    with conn.transaction():
        conn.execute(statement, {"doc": doc_id})
        assert sum(events(conn).values()) > 0  # captured inside the transaction...
        raise psycopg.Rollback()
    assert events(conn) == Counter()  # ...and gone with it


def test_rolled_back_transaction_with_many_writes_leaves_nothing(conn, doc):
    """A transaction mixing insert, update, delete and truncate, then rolled back, leaves no outbox row."""
    doc_id, ids = doc
    with pytest.raises(RuntimeError), conn.transaction():
        conn.execute("INSERT INTO chunks (document_id, chunk_index, text) VALUES (%s, 9, 'x')", (doc_id,))
        conn.execute("UPDATE chunks SET text = 'y' WHERE id = %s", (ids[0],))
        conn.execute("DELETE FROM chunks WHERE id = %s", (ids[1],))
        conn.execute("TRUNCATE chunks")
        raise RuntimeError("application failure")
    assert events(conn) == Counter()
    assert sorted(chunk_ids_of(conn)) == sorted(ids)


def test_rolled_back_savepoint_discards_only_its_events(conn, doc):
    """Writes undone by ROLLBACK TO SAVEPOINT leave no event; the committed rest of the transaction does."""
    doc_id, ids = doc
    with conn.transaction():
        conn.execute("UPDATE chunks SET text = 'kept' WHERE id = %s", (ids[0],))
        with conn.transaction():
            conn.execute("UPDATE chunks SET text = 'undone' WHERE id = %s", (ids[1],))
            conn.execute("DELETE FROM documents WHERE id = %s", (doc_id,))
            raise psycopg.Rollback()
    assert events(conn) == expect([ids[0]], "update")


def test_outbox_rows_become_visible_with_the_commit(conn, dsn, doc):
    """Another session sees the outbox row exactly when it sees the chunk change: at commit."""
    _, ids = doc
    with psycopg.connect(dsn, autocommit=True) as observer:
        with conn.transaction():
            conn.execute("UPDATE chunks SET text = 'committed later' WHERE id = %s", (ids[0],))
            assert events(observer) == Counter()
        assert events(observer) == expect([ids[0]], "update")


def test_failed_statement_leaves_no_outbox_row(conn, doc):
    """A statement that fails (here a duplicate chunk_index) captures nothing, even for its valid rows."""
    doc_id, _ = doc
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(
            "INSERT INTO chunks (document_id, chunk_index, text) VALUES (%(d)s, 10, 'ok'), (%(d)s, 0, 'dup')",
            {"d": doc_id},
        )
    assert events(conn) == Counter()


def test_capture_needs_no_outbox_privileges(conn, doc):
    """An application role with rights on the content tables only can still write chunks, and is captured."""
    doc_id, _ = doc
    role = f"outboxd_app_{uuid.uuid4().hex[:8]}"
    conn.execute(f'CREATE ROLE "{role}"')
    try:
        conn.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON sources, documents, chunks TO "{role}"')
        with conn.transaction():
            conn.execute(f'SET LOCAL ROLE "{role}"')
            new_id = conn.execute(
                "INSERT INTO chunks (document_id, chunk_index, text) VALUES (%s, 20, 'by the app role') RETURNING id",
                (doc_id,),
            ).fetchone()[0]
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                with conn.transaction():
                    conn.execute("SELECT 1 FROM outboxd.outbox")
        assert events(conn) == expect([new_id], "insert")
    finally:
        conn.execute(f'DROP OWNED BY "{role}"')
        conn.execute(f'DROP ROLE "{role}"')


# --- content_hash -----------------------------------------------------------------------
@pytest.mark.parametrize("text", ["plain ascii", "naïve café 東京", "", "emoji 🚀 and\nnewlines\ttabs"])
def test_content_hash_is_sha256_of_utf8_text(conn, text):
    """chunks.content_hash is the lowercase hex SHA-256 of the UTF-8 bytes of the text."""
    _, (cid,) = add_document(conn, [text])
    (got,) = conn.execute("SELECT content_hash FROM chunks WHERE id = %s", (cid,)).fetchone()
    assert got == hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_content_hash_follows_the_text(conn, doc):
    """content_hash changes when the text changes, and only then."""
    _, ids = doc
    before = conn.execute("SELECT content_hash FROM chunks WHERE id = %s", (ids[0],)).fetchone()[0]
    conn.execute("UPDATE chunks SET metadata = '{\"x\": 2}' WHERE id = %s", (ids[0],))
    assert conn.execute("SELECT content_hash FROM chunks WHERE id = %s", (ids[0],)).fetchone()[0] == before
    conn.execute("UPDATE chunks SET text = 'naïve café 東京' WHERE id = %s", (ids[0],))
    after = conn.execute("SELECT content_hash FROM chunks WHERE id = %s", (ids[0],)).fetchone()[0]
    assert after != before
    assert after == hashlib.sha256("naïve café 東京".encode()).hexdigest()


def test_application_cannot_write_content_hash(conn, doc):
    """INSERT or UPDATE that sets chunks.content_hash is refused."""
    doc_id, ids = doc
    with pytest.raises(psycopg.errors.GeneratedAlways):
        conn.execute(
            "INSERT INTO chunks (document_id, chunk_index, text, content_hash) VALUES (%s, 30, 'x', 'forged')",
            (doc_id,),
        )
    with pytest.raises(psycopg.errors.GeneratedAlways):
        conn.execute("UPDATE chunks SET content_hash = 'forged' WHERE id = %s", (ids[0],))
    assert "forged" not in {r[0] for r in conn.execute("SELECT content_hash FROM chunks").fetchall()}
    assert events(conn) == Counter()


# --- search vectors -------------------------------------------------------------------
def test_chunk_search_vector_is_maintained(conn, doc):
    """chunks.search_vector is set on INSERT and follows the text on UPDATE."""
    _, ids = doc
    sv = "SELECT search_vector IS NOT NULL, search_vector @@ to_tsquery('english', %s) FROM chunks WHERE id = %s"
    assert conn.execute(sv, ("alpha", ids[0])).fetchone() == (True, True)
    conn.execute("UPDATE chunks SET text = 'Kangaroos jumping everywhere' WHERE id = %s", (ids[0],))
    assert conn.execute(sv, ("kangaroo & jump", ids[0])).fetchone() == (True, True)
    assert conn.execute(sv, ("alpha", ids[0])).fetchone() == (True, False)


def test_document_search_vector_is_maintained(conn, doc):
    """documents.search_vector covers title, url and metadata, on INSERT and UPDATE."""
    doc_id, _ = doc
    sv = "SELECT search_vector IS NOT NULL, search_vector @@ to_tsquery('english', %s) FROM documents WHERE id = %s"
    assert conn.execute(sv, ("original & title", doc_id)).fetchone() == (True, True)
    conn.execute("UPDATE documents SET title = 'Pelicans', metadata = %s WHERE id = %s", (Jsonb({"tag": "zebras"}), doc_id))
    assert conn.execute(sv, ("pelican & zebra", doc_id)).fetchone() == (True, True)
    assert conn.execute(sv, ("original", doc_id)).fetchone() == (True, False)


# --- one NOTIFY per transaction -----------------------------------------------------------
def test_one_notify_per_transaction(conn, listener, doc):
    """A transaction capturing many events sends exactly one tiny notification on 'outboxd'."""
    doc_id, ids = doc
    with conn.transaction():
        conn.execute(
            "INSERT INTO chunks (document_id, chunk_index, text) SELECT %s, i, 'bulk ' || i FROM generate_series(100, 299) i",
            (doc_id,),
        )
        conn.execute("UPDATE chunks SET text = text || ' more' WHERE document_id = %s", (doc_id,))
        conn.execute("UPDATE documents SET title = 'Retitled' WHERE id = %s", (doc_id,))
        conn.execute("DELETE FROM chunks WHERE id = %s", (ids[0],))
    assert sum(events(conn).values()) > 400
    got = notifications(listener, conn)
    assert len(got) == 1, got
    assert got[0].channel == "outboxd"
    assert len(got[0].payload) < 100


def test_one_notify_per_transaction_with_savepoints(conn, listener, doc):
    """Captures spread over several savepoints of one transaction still send a single notification."""
    doc_id, _ = doc
    with conn.transaction():
        for k in range(3):
            with conn.transaction():
                conn.execute("UPDATE chunks SET text = text || %s WHERE document_id = %s", (f" {k}", doc_id))
        conn.execute("UPDATE chunks SET token_count = 1 WHERE document_id = %s", (doc_id,))
    assert len(notifications(listener, conn)) == 1


def test_each_committed_transaction_notifies(conn, listener, doc):
    """Two separate capturing transactions send one notification each."""
    _, ids = doc
    conn.execute("UPDATE chunks SET text = 'first' WHERE id = %s", (ids[0],))
    conn.execute("UPDATE chunks SET text = 'second' WHERE id = %s", (ids[1],))
    assert len(notifications(listener, conn)) == 2


@pytest.mark.parametrize(
    "statement",
    ["UPDATE chunks SET text = text", "UPDATE documents SET status = 'completed'", "UPDATE sources SET status = 'failed'"],
)
def test_no_notify_when_nothing_is_captured(conn, listener, doc, statement):
    """A committed statement that captures nothing sends no notification."""
    conn.execute(statement)
    assert events(conn) == Counter()
    assert notifications(listener, conn) == []


def test_no_notify_on_rollback(conn, listener, doc):
    """A capturing transaction that rolls back sends no notification."""
    doc_id, _ = doc
    with conn.transaction():
        conn.execute("UPDATE chunks SET text = 'rolled back' WHERE document_id = %s", (doc_id,))
        conn.execute("DELETE FROM documents WHERE id = %s", (doc_id,))
        raise psycopg.Rollback()
    assert notifications(listener, conn) == []


# --- updated_at -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "table, assignment",
    [
        ("sources", "url = 'https://example.org/src'"),
        ("documents", "status = 'processing'"),
        ("chunks", "token_count = 7"),
        ("crawl_jobs", "status = 'running'"),
    ],
)
def test_updated_at_moves_on_update(conn, doc, table, assignment):
    """The updated_at trigger sets updated_at = now() on every UPDATE, whatever the application wrote."""
    src = add_source(conn, "crawl")
    conn.execute("INSERT INTO crawl_jobs (source_id) VALUES (%s)", (src,))
    old = "timestamptz '2001-01-01 00:00:00+00'"
    # The trigger wins even over an explicit SET updated_at.
    conn.execute(f"UPDATE {table} SET updated_at = {old}, created_at = {old}")
    times = conn.execute(f"SELECT created_at, updated_at FROM {table}").fetchall()
    assert times and all(c.year == 2001 and u.year > 2001 for c, u in times)
    before = {r[0]: r[1] for r in conn.execute(f"SELECT id, updated_at FROM {table}").fetchall()}
    conn.execute(f"UPDATE {table} SET {assignment}")
    (now,) = conn.execute("SELECT now()").fetchone()
    after = {r[0]: r[1] for r in conn.execute(f"SELECT id, updated_at FROM {table}").fetchall()}
    assert before.keys() == after.keys()
    assert all(after[k] > before[k] for k in before)
    assert all(abs((now - after[k]).total_seconds()) < 60 for k in after)


# --- constraints ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO sources (source_type) VALUES ('ftp')",
        "INSERT INTO sources (source_type, status) VALUES ('api', 'bogus')",
        "UPDATE sources SET status = 'done'",
        "INSERT INTO crawl_jobs (source_id, status) SELECT id, 'bogus' FROM sources LIMIT 1",
        "INSERT INTO crawl_jobs (source_id, pages_crawled) SELECT id, -1 FROM sources LIMIT 1",
        "INSERT INTO documents (source_id, title, total_chunks) SELECT id, 't', -1 FROM sources LIMIT 1",
        "UPDATE documents SET status = 'bogus'",
    ],
)
def test_check_constraints_reject_bad_values(conn, doc, statement):
    """CHECK constraints reject invalid source_type, statuses and negative counters."""
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(statement)


def test_unique_chunk_index_per_document(conn, doc):
    """UNIQUE(document_id, chunk_index) rejects a duplicate chunk_index, by INSERT or UPDATE."""
    doc_id, ids = doc
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("INSERT INTO chunks (document_id, chunk_index, text) VALUES (%s, 1, 'dup')", (doc_id,))
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("UPDATE chunks SET chunk_index = 0 WHERE id = %s", (ids[2],))
    other_doc, _ = add_document(conn, [])
    conn.execute("INSERT INTO chunks (document_id, chunk_index, text) VALUES (%s, 1, 'same index, other doc')", (other_doc,))


def test_chunk_needs_an_existing_document(conn):
    """A chunk cannot reference a missing document (no orphan chunk to capture)."""
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute("INSERT INTO chunks (document_id, chunk_index, text) VALUES (%s, 0, 'orphan')", (uuid.uuid4(),))
    assert events(conn) == Counter()
