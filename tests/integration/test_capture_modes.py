"""Capture mode on a real PostgreSQL (migration 0005, db/capture.py).

In the default 'origin' mode only the statement-level capture triggers fire,
and only in ordinary sessions: writes made under session_replication_role =
replica (bulk loads, replays, a subscription's apply worker) are NOT captured.
In 'always' mode the row-level capture triggers fire under the replica role
(ENABLE REPLICA), the TRUNCATE and NOTIFY triggers in every session (ENABLE
ALWAYS): every committed chunk change is captured exactly once whichever
session made it, by the same rules as the statement path, with a NOTIFY.
A real publisher/subscriber pair proves it for the apply worker. capture_mode()
tells the states apart; the migration goes down and up. SET
session_replication_role needs a superuser, which the test server gives."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from db import capture, migrate
from tests.conftest import create_database, drop_database
from tests.integration.test_migrations import catalog
from tests.support import add_document, add_source, outbox_rows

SENTINEL = "test-sentinel"

# The definition of the modes (the table in 0005_capture_mode.up.sql), as pg_trigger.tgenabled letters.
STATEMENT_PATH = {  # origin in both modes: ordinary sessions only
    ("public.chunks", "outboxd_capture_insert"),
    ("public.chunks", "outboxd_capture_update"),
    ("public.chunks", "outboxd_capture_delete"),
    ("public.documents", "outboxd_capture_document_update"),
}
EVERY_SESSION = {  # origin in 'origin', ALWAYS in 'always'
    ("public.chunks", "outboxd_capture_truncate"),
    ("outboxd.outbox", "outboxd_notify"),
}
ROW_PATH = {  # disabled in 'origin', REPLICA in 'always'
    ("public.chunks", "outboxd_capture_row_insert"),
    ("public.chunks", "outboxd_capture_row_update"),
    ("public.chunks", "outboxd_capture_row_delete"),
    ("public.documents", "outboxd_capture_row_document_update"),
}
OUTBOXD_TRIGGERS = STATEMENT_PATH | EVERY_SESSION | ROW_PATH
AT_0004 = STATEMENT_PATH | EVERY_SESSION
ORIGIN = {**{t: "O" for t in STATEMENT_PATH | EVERY_SESSION}, **{t: "D" for t in ROW_PATH}}
ALWAYS = {**{t: "O" for t in STATEMENT_PATH}, **{t: "A" for t in EVERY_SESSION}, **{t: "R" for t in ROW_PATH}}
STATE_NAMES = {"O": "origin", "A": "always", "R": "replica", "D": "disabled"}


# --- helpers ------------------------------------------------------------------------
def events(conn: psycopg.Connection) -> Counter:
    """The outbox as a multiset of (chunk id, op)."""
    return Counter((r["chunk_id"], r["op"]) for r in outbox_rows(conn))


def tgenabled(conn: psycopg.Connection) -> dict[tuple[str, str], str]:
    """pg_trigger.tgenabled of every non-internal trigger on the three tables, straight from the catalog."""
    rows = conn.execute(
        "SELECT format('%I.%I', n.nspname, c.relname), t.tgname, t.tgenabled "
        "FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE t.tgrelid IN ('public.chunks'::regclass, 'public.documents'::regclass, 'outboxd.outbox'::regclass) "
        "AND NOT t.tgisinternal"
    ).fetchall()
    return {(table, name): mode for table, name, mode in rows}


def outboxd_tgenabled(conn: psycopg.Connection) -> dict[tuple[str, str], str]:
    return {k: v for k, v in tgenabled(conn).items() if k[1].startswith("outboxd_")}


@contextmanager
def replica_session(dsn: str):
    """A connection whose writes run as a logical-replication apply worker's
    (or a bulk loader's) do: session_replication_role = replica."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SET session_replication_role = replica")
        assert c.execute("SHOW session_replication_role").fetchone()[0] == "replica"
        yield c


def write_everything(w: psycopg.Connection, doc_id: uuid.UUID, ids: list[uuid.UUID]) -> tuple[uuid.UUID, Counter]:
    """An insert, an update and a delete of chunks and a document retitle, each
    its own transaction. Returns the new chunk's id and the events 'always'
    capture must record for them."""
    new_id = w.execute(
        "INSERT INTO chunks (document_id, chunk_index, text) VALUES (%s, 3, 'delta text') RETURNING id", (doc_id,)
    ).fetchone()[0]
    w.execute("UPDATE chunks SET text = 'alpha rewritten' WHERE id = %s", (ids[0],))
    w.execute("DELETE FROM chunks WHERE id = %s", (ids[1],))
    w.execute("UPDATE documents SET title = 'Retitled' WHERE id = %s", (doc_id,))
    expected = Counter({
        (new_id, "insert"): 1,
        (ids[0], "update"): 1,
        (ids[1], "delete"): 1,
        # the retitle refreshes the payload of every chunk the document has then
        (ids[0], "payload"): 1,
        (ids[2], "payload"): 1,
        (new_id, "payload"): 1,
    })
    return new_id, expected


def notifications(listener: psycopg.Connection, dsn: str) -> list[psycopg.Notify]:
    """Every notification on 'outboxd' committed so far: a sentinel sent last (in its own
    transaction) marks the end, since notifications arrive in commit order."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SELECT pg_notify('outboxd', %s)", (SENTINEL,))
    got = []
    for n in listener.notifies(timeout=5):
        if n.channel == "outboxd" and n.payload == SENTINEL:
            return got
        got.append(n)
    pytest.fail("the sentinel notification never arrived")


def wakeups(listener: psycopg.Connection, dsn: str) -> list[tuple[str, str]]:
    return [(n.channel, n.payload) for n in notifications(listener, dsn)]


# --- fixtures -----------------------------------------------------------------------
@pytest.fixture
def doc(conn):
    """A document with three chunks, captured and acknowledged: the outbox starts empty."""
    doc_id, ids = add_document(conn, ["alpha text", "beta text", "gamma text"], title="Original title")
    conn.execute("DELETE FROM outboxd.outbox")
    return doc_id, ids


@pytest.fixture
def listener(dsn, doc):
    """A second connection LISTENing on the daemon's channel, from after the `doc` setup on."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("LISTEN outboxd")
        yield c


@pytest.fixture
def plain_role(conn):
    """A role that is neither superuser nor owner of anything, for privilege checks."""
    name = f"outboxd_plain_{uuid.uuid4().hex[:10]}"
    ident = sql.Identifier(name)
    conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(ident))
    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA outboxd TO {}").format(ident))
    try:
        yield name
    finally:
        conn.execute("RESET ROLE")
        conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
        conn.execute(sql.SQL("DROP ROLE {}").format(ident))


@pytest.fixture
def reference_dsn(pg_server):
    """Another new, empty database, to build a reference schema in."""
    name = f"outboxd_ref_{uuid.uuid4().hex[:10]}"
    yield create_database(pg_server, name)
    drop_database(pg_server, name)


# --- the definition of the modes -------------------------------------------------------
def test_default_mode_after_migrate_is_origin(conn):
    """A migrated database captures in 'origin' mode: the statement triggers plain
    ENABLE ('O'), the row-level capture triggers DISABLED ('D')."""
    assert capture.capture_mode(conn) == "origin"
    assert outboxd_tgenabled(conn) == ORIGIN


def test_always_sets_each_trigger_to_its_state(conn):
    """'always' leaves the statement path ENABLE ('O'), makes TRUNCATE and NOTIFY
    ENABLE ALWAYS ('A') and the row path ENABLE REPLICA ('R'); 'origin' restores."""
    assert capture.set_capture_mode(conn, "always") == "always"
    assert capture.capture_mode(conn) == "always"
    assert outboxd_tgenabled(conn) == ALWAYS
    assert capture.set_capture_mode(conn, "origin") == "origin"
    assert outboxd_tgenabled(conn) == ORIGIN


def test_capture_triggers_lists_each_trigger_with_its_states(conn):
    """capture_triggers() lists exactly the ten outboxd triggers (not the
    application's own), each with its level, its state now and in each mode."""
    listed = capture.capture_triggers(conn)
    assert {(t["table"], t["trigger"]) for t in listed} == OUTBOXD_TRIGGERS
    by_key = {(t["table"], t["trigger"]): t for t in listed}
    for key, t in by_key.items():
        assert t["level"] == ("row" if key in ROW_PATH else "statement")
        assert (t["origin"], t["always"]) == (STATE_NAMES[ORIGIN[key]], STATE_NAMES[ALWAYS[key]])
        assert t["enabled"] == t["origin"]
    capture.set_capture_mode(conn, "always")
    assert all(t["enabled"] == t["always"] for t in capture.capture_triggers(conn))
    # the content schema's own triggers exist on the same tables and are not outboxd's
    assert ("public.chunks", "chunks_updated_at") in tgenabled(conn)


# --- the blind spot of 'origin' -----------------------------------------------------------
def test_origin_mode_misses_writes_under_replica_role(dsn, conn, doc, listener):
    """The blind spot: in 'origin' mode an insert, update and delete of chunks, a
    document retitle and a TRUNCATE made under session_replication_role = replica
    leave no outbox row, and no NOTIFY wakes the daemon, although the writes committed."""
    doc_id, ids = doc
    with replica_session(dsn) as w:
        new_id, _ = write_everything(w, doc_id, ids)
    assert conn.execute("SELECT count(*) FROM chunks WHERE id = ANY(%s)", ([new_id, ids[0], ids[2]],)).fetchone()[0] == 3
    assert conn.execute("SELECT title FROM documents WHERE id = %s", (doc_id,)).fetchone()[0] == "Retitled"
    with replica_session(dsn) as w:
        w.execute("TRUNCATE chunks")
    assert conn.execute("SELECT count(*) FROM chunks").fetchone()[0] == 0
    assert events(conn) == Counter()
    assert wakeups(listener, dsn) == []


# --- 'always' under the replica role -------------------------------------------------------
def test_always_mode_captures_writes_under_replica_role(dsn, conn, doc, listener):
    """After set_capture_mode('always') the same writes under the replica role are
    captured once each with the right ops, and each of the four transactions wakes
    the daemon with one NOTIFY."""
    doc_id, ids = doc
    capture.set_capture_mode(conn, "always")
    with replica_session(dsn) as w:
        _, expected = write_everything(w, doc_id, ids)
    assert events(conn) == expected
    assert wakeups(listener, dsn) == [("outboxd", "")] * 4


def test_always_mode_captures_a_replica_role_notify_on_its_own(dsn, conn, doc, listener):
    """The outbox's NOTIFY trigger fires in every session: an outbox row written under
    the replica role (not by a capture trigger) still wakes the daemon; in 'origin' not."""
    with replica_session(dsn) as w:
        w.execute("INSERT INTO outboxd.outbox (chunk_id, op) VALUES (%s, 'update')", (doc[1][0],))
    assert wakeups(listener, dsn) == []
    capture.set_capture_mode(conn, "always")
    with replica_session(dsn) as w:
        w.execute("INSERT INTO outboxd.outbox (chunk_id, op) VALUES (%s, 'update')", (doc[1][0],))
    assert wakeups(listener, dsn) == [("outboxd", "")]


def test_always_mode_captures_truncate_under_replica_role(dsn, conn, doc, listener):
    """TRUNCATE has no row triggers: its statement trigger (ENABLE ALWAYS) makes a
    delete per chunk under the replica role in 'always' mode, once (nothing in 'origin')."""
    _, ids = doc
    with replica_session(dsn) as w:
        w.execute("TRUNCATE chunks")
    assert events(conn) == Counter()

    _, more = add_document(conn, ["one", "two"])
    conn.execute("DELETE FROM outboxd.outbox")
    wakeups(listener, dsn)  # drain the add_document wake-up
    capture.set_capture_mode(conn, "always")
    with replica_session(dsn) as w:
        w.execute("TRUNCATE sources CASCADE")
    assert events(conn) == Counter((i, "delete") for i in more)
    assert wakeups(listener, dsn) == [("outboxd", "")]


def test_always_mode_captures_a_replica_role_bulk_load(dsn, conn, doc, listener):
    """A bulk load the way loaders do it (replica role, COPY, one transaction) is
    captured row by row: one 'insert' per copied chunk and one NOTIFY."""
    doc_id, _ = doc
    capture.set_capture_mode(conn, "always")
    loaded = [uuid.uuid4() for _ in range(250)]
    with replica_session(dsn) as w, w.transaction():
        with w.cursor().copy("COPY chunks (id, document_id, chunk_index, text) FROM STDIN") as copy:
            for i, chunk_id in enumerate(loaded):
                copy.write_row((chunk_id, doc_id, 100 + i, f"loaded chunk {i}"))
    assert events(conn) == Counter((i, "insert") for i in loaded)
    assert wakeups(listener, dsn) == [("outboxd", "")]


def test_replica_role_does_not_cascade_and_a_replayed_cascade_is_captured(dsn, conn):
    """ON DELETE CASCADE is a trigger that PostgreSQL does not fire under the replica
    role: deleting a document or a source there leaves its chunks, and no chunk
    changed, so nothing is captured (in either mode). A replay (or a subscriber)
    deletes the chunks explicitly, as the origin's cascade did: each delete is
    captured once in 'always'."""
    capture.set_capture_mode(conn, "always")
    src = add_source(conn)
    doc1, ids1 = add_document(conn, ["d1 c0", "d1 c1"], source_id=src)
    doc2, ids2 = add_document(conn, ["d2 c0"], source_id=src)
    conn.execute("DELETE FROM outboxd.outbox")
    with replica_session(dsn) as w:
        w.execute("DELETE FROM documents WHERE id = %s", (doc1,))
        w.execute("DELETE FROM sources WHERE id = %s", (src,))
    assert sorted(r[0] for r in conn.execute("SELECT id FROM chunks").fetchall()) == sorted(ids1 + ids2)
    assert events(conn) == Counter()

    with replica_session(dsn) as w, w.transaction():  # the replay of the origin's cascade
        w.execute("DELETE FROM chunks WHERE document_id = ANY(%s)", ([doc1, doc2],))
        w.execute("DELETE FROM documents WHERE id = %s", (doc2,))
    assert events(conn) == Counter((i, "delete") for i in ids1 + ids2)


# --- the row path follows the statement path's rules --------------------------------------
# Each case: statements (psycopg parameters named after the `rules_data` ids) and the
# events they must capture. Run in an ordinary session and under the replica role.
RULE_CASES = {
    "insert": (["INSERT INTO chunks (id, document_id, chunk_index, text) VALUES (%(n1)s, %(d)s, 5, 'new')"],
               [("n1", "insert")]),
    "multi-row insert": (["INSERT INTO chunks (id, document_id, chunk_index, text) "
                          "VALUES (%(n1)s, %(d)s, 5, 'a'), (%(n2)s, %(d)s, 6, 'b')"],
                         [("n1", "insert"), ("n2", "insert")]),
    "text update": (["UPDATE chunks SET text = 'alpha rewritten' WHERE id = %(c0)s"], [("c0", "update")]),
    "metadata update": (["UPDATE chunks SET metadata = '{\"k\": 1}' WHERE id = %(c0)s"], [("c0", "payload")]),
    "chunk_index update": (["UPDATE chunks SET chunk_index = 9 WHERE id = %(c0)s"], [("c0", "payload")]),
    "token_count update": (["UPDATE chunks SET token_count = 99 WHERE id = %(c1)s"], [("c1", "payload")]),
    "move to another document": (["UPDATE chunks SET document_id = %(d2)s, chunk_index = 10 WHERE id = %(c2)s"],
                                 [("c2", "payload")]),
    "text and metadata update": (["UPDATE chunks SET text = 'x', metadata = '{}' WHERE id = %(c0)s"],
                                 [("c0", "update")]),
    "multi-row update, one unchanged": (["UPDATE chunks SET text = CASE WHEN id = %(c0)s THEN text ELSE text || '!' END "
                                         "WHERE document_id = %(d)s"],
                                        [("c1", "update"), ("c2", "update")]),
    "irrelevant update": (["UPDATE chunks SET text = text, created_at = now() - interval '1 day', updated_at = now()"],
                          []),
    "primary key change": (["UPDATE chunks SET id = %(n1)s WHERE id = %(c0)s"], [("n1", "insert"), ("c0", "delete")]),
    "upsert": (["INSERT INTO chunks (id, document_id, chunk_index, text) "
                "VALUES (%(n1)s, %(d)s, 0, 'alpha upserted'), (%(n2)s, %(d)s, 7, 'new') "
                "ON CONFLICT (document_id, chunk_index) DO UPDATE SET text = excluded.text"],
               [("c0", "update"), ("n2", "insert")]),
    "merge": (["MERGE INTO chunks t USING (VALUES (0, 'alpha merged'), (1, NULL), (5, 'merged in')) AS v(i, txt) "
               "ON t.document_id = %(d)s AND t.chunk_index = v.i "
               "WHEN MATCHED AND v.txt IS NULL THEN DELETE "
               "WHEN MATCHED THEN UPDATE SET text = v.txt "
               "WHEN NOT MATCHED THEN INSERT (id, document_id, chunk_index, text) VALUES (%(n1)s, %(d)s, v.i, v.txt)"],
              [("c0", "update"), ("c1", "delete"), ("n1", "insert")]),
    "delete": (["DELETE FROM chunks WHERE id = %(c1)s"], [("c1", "delete")]),
    "multi-row delete": (["DELETE FROM chunks WHERE document_id = %(d)s"],
                         [("c0", "delete"), ("c1", "delete"), ("c2", "delete")]),
    "chunks, then their document": (["DELETE FROM chunks WHERE document_id = %(d)s",
                                     "DELETE FROM documents WHERE id = %(d)s"],
                                    [("c0", "delete"), ("c1", "delete"), ("c2", "delete")]),
    "truncate": (["TRUNCATE chunks"], [("c0", "delete"), ("c1", "delete"), ("c2", "delete"), ("x0", "delete")]),
    "document retitle": (["UPDATE documents SET title = 'Retitled' WHERE id = %(d)s"],
                         [("c0", "payload"), ("c1", "payload"), ("c2", "payload")]),
    "document url, type and metadata": (["UPDATE documents SET url = 'https://example.org/b', document_type = 'pdf', "
                                         "metadata = '{\"lang\": \"de\"}' WHERE id = %(d)s"],
                                        [("c0", "payload"), ("c1", "payload"), ("c2", "payload")]),
    "document moved to another source": (["UPDATE documents SET source_id = %(s2)s WHERE id = %(d)s"],
                                         [("c0", "payload"), ("c1", "payload"), ("c2", "payload")]),
    "every document retitled": (["UPDATE documents SET title = title || '!'"],
                                [("c0", "payload"), ("c1", "payload"), ("c2", "payload"), ("x0", "payload")]),
    "irrelevant document update": (["UPDATE documents SET status = 'completed', total_chunks = 3, content_hash = 'h'"],
                                   []),
}


@pytest.fixture(scope="module")
def rules_db(pg_server, template_db):
    """One migrated database for the rule cases (each runs in rolled-back transactions)."""
    name = f"outboxd_rules_{uuid.uuid4().hex[:10]}"
    yield create_database(pg_server, name, template=template_db)
    drop_database(pg_server, name)


@pytest.fixture(scope="module")
def rules_data(rules_db):
    """Document d with chunks c0..c2, document d2 with chunk x0 (another source s2), and
    the ids n1, n2 the cases insert; the outbox empty."""
    with psycopg.connect(rules_db, autocommit=True) as c:
        d, (c0, c1, c2) = add_document(c, ["alpha text", "beta text", "gamma text"], title="Original title",
                                       url="https://example.org/a", document_type="html", metadata={"lang": "en"})
        s2 = add_source(c)
        d2, (x0,) = add_document(c, ["other text"], source_id=s2)
        c.execute("DELETE FROM outboxd.outbox")
    return dict(d=d, c0=c0, c1=c1, c2=c2, d2=d2, x0=x0, s2=s2, n1=uuid.uuid4(), n2=uuid.uuid4())


def captured(conn: psycopg.Connection, statements: list[str], ids: dict, *, replica: bool) -> Counter:
    """The events the statements capture, in a transaction rolled back afterwards."""
    with conn.transaction(force_rollback=True):
        if replica:
            conn.execute("SET LOCAL session_replication_role = replica")
        for statement in statements:
            conn.execute(statement, {k: v for k, v in ids.items() if f"%({k})s" in statement} or None)
        return events(conn)


@pytest.mark.parametrize("mode", ["origin", "always"])
@pytest.mark.parametrize("case", sorted(RULE_CASES))
def test_each_change_is_captured_once_by_the_same_rules_in_every_session(rules_db, rules_data, mode, case):
    """In both modes an ordinary session captures exactly the expected events (the
    statement path); under the replica role 'always' captures exactly the same ones
    (the row path: same relevance filter, same ops, a primary-key change as insert
    + delete), and 'origin' captures nothing."""
    statements, expected_ops = RULE_CASES[case]
    expected = Counter((rules_data[name], op) for name, op in expected_ops)
    with psycopg.connect(rules_db, autocommit=True) as conn:
        assert capture.set_capture_mode(conn, mode) == mode
        assert events(conn) == Counter()
        assert captured(conn, statements, rules_data, replica=False) == expected
        assert captured(conn, statements, rules_data, replica=True) == (expected if mode == "always" else Counter())


# --- ordinary sessions -----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["origin", "always"])
def test_ordinary_writes_are_captured_exactly_once_in_both_modes(dsn, conn, doc, listener, mode):
    """Writes under the default (origin) role are captured once each in either mode,
    cascades and TRUNCATE included, with one NOTIFY per transaction."""
    doc_id, ids = doc
    capture.set_capture_mode(conn, mode)
    assert conn.execute("SHOW session_replication_role").fetchone()[0] == "origin"
    new_id, expected = write_everything(conn, doc_id, ids)
    conn.execute("DELETE FROM documents WHERE id = %s", (doc_id,))  # cascades to ids[0], ids[2], new_id
    expected.update({(ids[0], "delete"): 1, (ids[2], "delete"): 1, (new_id, "delete"): 1})
    _, more = add_document(conn, ["one", "two"])
    conn.execute("TRUNCATE chunks")
    expected.update({(i, "insert"): 1 for i in more})
    expected.update({(i, "delete"): 1 for i in more})
    assert events(conn) == expected
    assert wakeups(listener, dsn) == [("outboxd", "")] * 7


def test_a_local_role_session_is_an_ordinary_one(dsn, conn, doc):
    """session_replication_role = local fires origin triggers, not replica ones: captured once."""
    doc_id, ids = doc
    capture.set_capture_mode(conn, "always")
    with psycopg.connect(dsn, autocommit=True) as w:
        w.execute("SET session_replication_role = local")
        _, expected = write_everything(w, doc_id, ids)
    assert events(conn) == expected


def test_always_mode_leaves_the_applications_triggers_alone(conn):
    """Only the outboxd triggers are switched: updated_at and the search vectors keep their mode."""
    before = {k: v for k, v in tgenabled(conn).items() if k not in OUTBOXD_TRIGGERS}
    assert before and set(before.values()) == {"O"}
    capture.set_capture_mode(conn, "always")
    assert {k: v for k, v in tgenabled(conn).items() if k not in OUTBOXD_TRIGGERS} == before


def test_set_capture_mode_is_idempotent_and_takes_no_lock_when_nothing_changes(dsn, conn, doc):
    """Setting the mode the triggers already have touches nothing: it succeeds while
    a writer holds chunks; an actual switch waits for that writer (SHARE ROW EXCLUSIVE)."""
    doc_id, _ = doc
    with psycopg.connect(dsn) as writer:  # an open transaction holding ROW EXCLUSIVE on chunks
        writer.execute("INSERT INTO chunks (document_id, chunk_index, text) VALUES (%s, 9, 'uncommitted')", (doc_id,))
        with psycopg.connect(dsn) as admin:
            admin.execute("SET lock_timeout = '1s'")
            assert capture.set_capture_mode(admin, "origin") == "origin"
            admin.commit()
            with pytest.raises(psycopg.errors.LockNotAvailable):
                capture.set_capture_mode(admin, "always")
            admin.rollback()
        writer.rollback()
    assert capture.capture_mode(conn) == "origin"
    assert capture.set_capture_mode(conn, "always") == "always"
    assert capture.set_capture_mode(conn, "always") == "always"
    assert outboxd_tgenabled(conn) == ALWAYS


# --- states and errors ------------------------------------------------------------------
def test_capture_mode_reports_each_state(conn):
    """'origin' and 'always' when every trigger has that mode's state; 'mixed' when
    they match neither; 'disabled' when ordinary writes are being missed (a
    statement trigger disabled or replica-only, the outbox's NOTIFY included);
    set_capture_mode repairs each."""
    assert set(capture.CAPTURE_STATES) == {"origin", "always", "mixed", "disabled"}
    assert capture.capture_mode(conn) == "origin"

    # a row trigger that fires in ordinary sessions: they would be captured twice
    conn.execute("ALTER TABLE chunks ENABLE TRIGGER outboxd_capture_row_insert")
    assert capture.capture_mode(conn) == "mixed"
    assert capture.set_capture_mode(conn, "origin") == "origin"

    # TRUNCATE already ALWAYS, the rest still 'origin'
    conn.execute("ALTER TABLE chunks ENABLE ALWAYS TRIGGER outboxd_capture_truncate")
    assert capture.capture_mode(conn) == "mixed"

    assert capture.set_capture_mode(conn, "always") == "always"
    # a row trigger off in 'always': replica-role deletes would be missed
    conn.execute("ALTER TABLE chunks DISABLE TRIGGER outboxd_capture_row_delete")
    assert capture.capture_mode(conn) == "mixed"
    assert capture.set_capture_mode(conn, "always") == "always"
    # a statement trigger ALWAYS beside its row twin: replica-role writes captured twice
    conn.execute("ALTER TABLE documents ENABLE ALWAYS TRIGGER outboxd_capture_document_update")
    assert capture.capture_mode(conn) == "mixed"
    # the NOTIFY back to origin: replica-role events would wake nobody
    assert capture.set_capture_mode(conn, "always") == "always"
    conn.execute("ALTER TABLE outboxd.outbox ENABLE TRIGGER outboxd_notify")
    assert capture.capture_mode(conn) == "mixed"

    for mode in ("origin", "always"):
        capture.set_capture_mode(conn, mode)
        conn.execute("ALTER TABLE chunks DISABLE TRIGGER outboxd_capture_update")
        assert capture.capture_mode(conn) == "disabled"
        assert {t["trigger"]: t["enabled"] for t in capture.capture_triggers(conn)}["outboxd_capture_update"] == "disabled"
        assert capture.set_capture_mode(conn, mode) == mode
        conn.execute("ALTER TABLE documents ENABLE REPLICA TRIGGER outboxd_capture_document_update")
        assert capture.capture_mode(conn) == "disabled"
        assert capture.set_capture_mode(conn, mode) == mode
        conn.execute("ALTER TABLE outboxd.outbox DISABLE TRIGGER outboxd_notify")
        assert capture.capture_mode(conn) == "disabled"
        assert capture.set_capture_mode(conn, mode) == mode
        assert outboxd_tgenabled(conn) == (ORIGIN if mode == "origin" else ALWAYS)


def test_enable_trigger_all_is_mixed_and_captures_twice_until_repaired(conn, doc):
    """DISABLE TRIGGER ALL then ENABLE TRIGGER ALL (a hand-made bulk load, pg_restore
    --disable-triggers) sets every trigger to plain ENABLE, the row path too: an
    ordinary insert is then captured twice. capture_mode() says 'mixed';
    set_capture_mode puts it right."""
    doc_id, _ = doc
    capture.set_capture_mode(conn, "always")
    conn.execute("ALTER TABLE chunks DISABLE TRIGGER ALL")
    conn.execute("ALTER TABLE chunks ENABLE TRIGGER ALL")
    assert capture.capture_mode(conn) == "mixed"
    new_id = conn.execute(
        "INSERT INTO chunks (document_id, chunk_index, text) VALUES (%s, 5, 'twice') RETURNING id", (doc_id,)
    ).fetchone()[0]
    assert events(conn) == Counter({(new_id, "insert"): 2})

    conn.execute("DELETE FROM outboxd.outbox")
    assert capture.set_capture_mode(conn, "always") == "always"
    conn.execute("UPDATE chunks SET text = 'once' WHERE id = %s", (new_id,))
    assert events(conn) == Counter({(new_id, "update"): 1})


def test_missing_triggers_are_disabled_and_set_raises_naming_them(conn):
    """A missing outboxd trigger (row or statement) makes 'disabled', shows as
    'missing', and set_capture_mode refuses, naming it, rather than half-switch."""
    with conn.transaction(force_rollback=True):
        conn.execute("DROP TRIGGER outboxd_capture_row_update ON public.chunks")
        assert capture.capture_mode(conn) == "disabled"
        assert {t["trigger"]: t["enabled"] for t in capture.capture_triggers(conn)}["outboxd_capture_row_update"] == "missing"
        with pytest.raises(psycopg.errors.UndefinedObject, match="missing: outboxd_capture_row_update on public.chunks"):
            capture.set_capture_mode(conn, "always")
    with conn.transaction(force_rollback=True):
        for table, name in OUTBOXD_TRIGGERS:
            conn.execute(f"DROP TRIGGER {name} ON {table}")
        assert capture.capture_mode(conn) == "disabled"
        assert {t["enabled"] for t in capture.capture_triggers(conn)} == {"missing"}
        with pytest.raises(psycopg.errors.UndefinedObject, match="outboxd triggers missing"):
            capture.set_capture_mode(conn, "origin")
    assert capture.capture_mode(conn) == "origin"
    assert outboxd_tgenabled(conn) == ORIGIN


def test_back_to_origin_restores_the_blind_spot(dsn, conn, doc):
    """'always' then 'origin': writes under the replica role are missed again."""
    doc_id, ids = doc
    capture.set_capture_mode(conn, "always")
    assert capture.set_capture_mode(conn, "origin") == "origin"
    assert outboxd_tgenabled(conn) == ORIGIN
    with replica_session(dsn) as w:
        write_everything(w, doc_id, ids)
        w.execute("TRUNCATE chunks")
    assert events(conn) == Counter()


@pytest.mark.parametrize("mode", ["replica", "disabled", "ALWAYS", "", "mixed"])
def test_invalid_mode_raises_naming_the_valid_ones(conn, mode):
    """db.capture refuses another mode before any SQL; the SQL function refuses it too
    (NULL included), and nothing changes."""
    with pytest.raises(ValueError, match="origin.*always"):
        capture.set_capture_mode(conn, mode)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="expected 'origin' or 'always'"):
        conn.execute("SELECT outboxd.set_capture_mode(%s)", (mode,))
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="invalid capture mode NULL"):
        conn.execute("SELECT outboxd.set_capture_mode(NULL)")
    assert capture.capture_mode(conn) == "origin"


# --- privileges -----------------------------------------------------------------------------
def test_only_the_owner_or_a_grantee_may_switch(conn, plain_role):
    """Any role may read the mode; switching needs EXECUTE, which PUBLIC lacks. A
    grantee switches through SECURITY DEFINER without owning the tables."""
    conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(plain_role)))
    assert capture.capture_mode(conn) == "origin"
    assert len(capture.capture_triggers(conn)) == len(OUTBOXD_TRIGGERS)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        capture.set_capture_mode(conn, "always")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):  # and plain ALTER TABLE is not theirs either
        conn.execute("ALTER TABLE public.chunks ENABLE REPLICA TRIGGER outboxd_capture_row_insert")
    conn.execute("RESET ROLE")
    assert outboxd_tgenabled(conn) == ORIGIN

    conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION outboxd.set_capture_mode(text) TO {}").format(sql.Identifier(plain_role)))
    conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(plain_role)))
    assert capture.set_capture_mode(conn, "always") == "always"
    conn.execute("RESET ROLE")
    assert outboxd_tgenabled(conn) == ALWAYS


def test_an_owner_without_the_tables_gets_a_clear_error(conn, plain_role):
    """ALTER TABLE ... ENABLE TRIGGER needs table ownership: where the function's owner
    does not own the tables, the switch fails saying so, and nothing changes."""
    conn.execute(sql.SQL("ALTER FUNCTION outboxd.set_capture_mode(text) OWNER TO {}").format(sql.Identifier(plain_role)))
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="must be owner") as err:
        capture.set_capture_mode(conn, "always")
    assert "ownership" in (err.value.diag.message_hint or "")
    assert capture.capture_mode(conn) == "origin"


# --- migration ---------------------------------------------------------------------------------
def test_downgrade_to_0004_and_upgrade_again(empty_dsn, reference_dsn):
    """0005 down drops the row triggers and the functions and puts the six statement
    triggers back to plain ENABLE, leaving exactly the 0004 schema; up again is at
    head in 'origin' mode and switches."""
    migrate.upgrade(reference_dsn, "0004")
    at_0004 = catalog(reference_dsn)

    migrate.upgrade(empty_dsn)
    at_head = catalog(empty_dsn)
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        assert capture.set_capture_mode(c, "always") == "always"
        c.execute("ALTER TABLE public.chunks DISABLE TRIGGER outboxd_capture_update")

    migrate.downgrade(empty_dsn, "0004")
    assert migrate.current_revision(empty_dsn) == "0004"
    assert catalog(empty_dsn) == at_0004
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        assert outboxd_tgenabled(c) == {t: "O" for t in AT_0004}
        assert c.execute(
            "SELECT count(*) FROM pg_proc WHERE proname IN ('set_capture_mode', 'capture_mode', 'capture_triggers', "
            "'capture_chunk_insert_row', 'capture_chunk_update_row', 'capture_chunk_delete_row', "
            "'capture_document_update_row')"
        ).fetchone()[0] == 0

    migrate.upgrade(empty_dsn)
    assert migrate.current_revision(empty_dsn) == migrate.head_revision()
    assert catalog(empty_dsn) == at_head
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        assert capture.capture_mode(c) == "origin"
        assert capture.set_capture_mode(c, "always") == "always"
        doc_id, ids = add_document(c, ["x"])
        c.execute("DELETE FROM outboxd.outbox")
    with replica_session(empty_dsn) as w:
        w.execute("UPDATE chunks SET text = 'y' WHERE id = %s", (ids[0],))
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        assert events(c) == Counter({(ids[0], "update"): 1})


# --- a real logical-replication subscriber -----------------------------------------------------
def start_pgserver(prefix: str, *, wal_level_logical: bool = False):
    """A throwaway pgserver PostgreSQL of its own. wal_level = logical takes a
    restart: started once, ALTER SYSTEM, stopped, started again."""
    pgserver = pytest.importorskip("pgserver", reason="a second PostgreSQL comes from the pgserver wheel")
    pgdata = Path(tempfile.mkdtemp(prefix=prefix))
    server = pgserver.get_server(pgdata, cleanup_mode="stop" if wal_level_logical else "delete")
    if wal_level_logical:
        with psycopg.connect(server.get_uri(), autocommit=True) as c:
            c.execute("ALTER SYSTEM SET wal_level = logical")
        server.cleanup()  # the last handle: stops the server, keeps the data
        server = pgserver.get_server(pgdata, cleanup_mode="delete")
        with psycopg.connect(server.get_uri(), autocommit=True) as c:
            assert c.execute("SHOW wal_level").fetchone()[0] == "logical"
    return server


def stop_pgserver(server) -> None:
    """Stop at once and delete the data: the data is thrown away, so an immediate
    shutdown will do, where pgserver's own cleanup takes seconds. With the data
    folder gone, pgserver's exit handler finds no handle left and does nothing."""
    import pgserver

    try:
        pgserver.pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=server.pgdata, user=server.system_user, timeout=30)
    finally:
        shutil.rmtree(server.pgdata, ignore_errors=True)


@pytest.fixture
def publisher():
    """A second PostgreSQL with wal_level = logical, holding the application's content
    tables (migration 0001: the publisher need not run outboxd) in database 'app'."""
    server = start_pgserver("outboxd-test-pub-", wal_level_logical=True)
    try:
        dsn = create_database(server.get_uri(), "app")
        migrate.upgrade(dsn, "0001")
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("CREATE PUBLICATION outboxd_content FOR TABLE public.sources, public.documents, public.chunks")
        yield dsn
    finally:
        stop_pgserver(server)


@pytest.fixture
def subscriber_server(pg_server):
    """The session's server, which reaches the publisher's socket; an external
    DATABASE_URL server might not, so then a local one of its own."""
    if not os.environ.get("DATABASE_URL"):
        yield pg_server
        return
    server = start_pgserver("outboxd-test-sub-")
    try:
        yield server.get_uri()
    finally:
        stop_pgserver(server)


@pytest.fixture
def subscriber(subscriber_server, publisher):
    """A database migrated to head, in capture mode 'always', whose content comes from
    `publisher` through a logical-replication subscription (dropped at the end, which
    also drops its slot on the publisher)."""
    name = f"outboxd_sub_{uuid.uuid4().hex[:10]}"
    dsn = create_database(subscriber_server, name)
    migrate.upgrade(dsn)
    sub = f"outboxd_sub_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as c:
        assert capture.set_capture_mode(c, "always") == "always"
    try:
        yield dsn, sub
    finally:
        with psycopg.connect(dsn, autocommit=True) as c:
            if c.execute("SELECT 1 FROM pg_subscription WHERE subname = %s", (sub,)).fetchone():
                c.execute(sql.SQL("DROP SUBSCRIPTION {}").format(sql.Identifier(sub)))
        drop_database(subscriber_server, name)


def wait_for(conn: psycopg.Connection, query: str, params=(), timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not conn.execute(query, params).fetchone()[0]:
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for: {query}")
        time.sleep(0.02)


@pytest.mark.slow
def test_always_mode_captures_what_a_subscription_applies(publisher, subscriber):
    """A real publisher/subscriber pair (PostgreSQL logical replication of sources,
    documents and chunks). The subscriber database is in mode 'always': the initial
    table sync and every insert, update (text, payload-only, irrelevant, primary
    key), delete, cascaded delete, document retitle and TRUNCATE the apply worker
    applies is captured exactly once, and each applying transaction sends a NOTIFY
    from the apply worker, which the daemon LISTENs for."""
    sub_dsn, sub = subscriber
    pub = psycopg.connect(publisher, autocommit=True)
    s = psycopg.connect(sub_dsn, autocommit=True)
    listener = psycopg.connect(sub_dsn, autocommit=True)
    try:
        # content that exists before the subscription: the initial sync copies it
        src = add_source(pub)
        doc_id, ids = add_document(pub, ["alpha text", "beta text", "gamma text"], source_id=src, title="Original")
        other_doc, other_ids = add_document(pub, ["other one", "other two"])
        listener.execute("LISTEN outboxd")
        s.execute(sql.SQL("CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION outboxd_content").format(
            sql.Identifier(sub), sql.Literal(publisher)))
        wait_for(s, "SELECT count(*) = 3 AND bool_and(r.srsubstate = 'r') FROM pg_subscription_rel r "
                    "JOIN pg_subscription p ON p.oid = r.srsubid WHERE p.subname = %s", (sub,))
        assert events(s) == Counter((i, "insert") for i in ids + other_ids)
        s.execute("DELETE FROM outboxd.outbox")
        assert wakeups(listener, sub_dsn), "no NOTIFY for the initial sync"

        # each statement its own transaction on the publisher, applied row by row
        new_id = pub.execute(
            "INSERT INTO chunks (document_id, chunk_index, text) VALUES (%s, 3, 'delta text') RETURNING id", (doc_id,)
        ).fetchone()[0]
        pub.execute("UPDATE chunks SET text = 'alpha rewritten' WHERE id = %s", (ids[0],))
        pub.execute("UPDATE chunks SET metadata = '{\"k\": 1}' WHERE id = %s", (ids[1],))
        pub.execute("UPDATE chunks SET created_at = now() - interval '1 day'")  # nothing Qdrant sees
        pub.execute("UPDATE documents SET status = 'completed'")  # nor here
        moved = uuid.uuid4()
        pub.execute("UPDATE chunks SET id = %s WHERE id = %s", (moved, ids[2]))
        pub.execute("DELETE FROM chunks WHERE id = %s", (ids[1],))
        pub.execute("UPDATE documents SET title = 'Retitled' WHERE id = %s", (doc_id,))  # ids[0], new_id, moved
        pub.execute("DELETE FROM sources WHERE id = %s", (src,))  # cascades on the publisher: ids[0], new_id, moved
        _, late_ids = add_document(pub, ["late one", "late two"])
        pub.execute("TRUNCATE chunks")  # other_ids and late_ids are left
        marker = add_source(pub)  # applied last: once it is there, everything before it is
        wait_for(s, "SELECT count(*) = 1 FROM sources WHERE id = %s", (marker,))

        assert events(s) == Counter({
            (new_id, "insert"): 1,
            (ids[0], "update"): 1,
            (ids[1], "payload"): 1,
            (moved, "insert"): 1, (ids[2], "delete"): 1,
            (ids[1], "delete"): 1,
            (ids[0], "payload"): 1, (new_id, "payload"): 1, (moved, "payload"): 1,
            (ids[0], "delete"): 1, (new_id, "delete"): 1, (moved, "delete"): 1,
            **{(i, "insert"): 1 for i in late_ids},
            **{(i, "delete"): 1 for i in other_ids + late_ids},
        })
        assert s.execute("SELECT count(*) FROM chunks").fetchone()[0] == 0

        # one wake-up per publisher transaction that changed what Qdrant sees (the two
        # irrelevant updates and the marker capture nothing), sent by the apply worker
        apply_pid = s.execute(
            "SELECT pid FROM pg_stat_subscription WHERE subname = %s AND relid IS NULL", (sub,)
        ).fetchone()[0]
        got = notifications(listener, sub_dsn)
        assert [(n.channel, n.payload) for n in got] == [("outboxd", "")] * 9
        assert {n.pid for n in got} == {apply_pid}
    finally:
        for c in (pub, s, listener):
            c.close()
