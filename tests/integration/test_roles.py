"""`outboxd roles` on a real PostgreSQL: the application writer and the worker
can do their jobs and nothing else, proved with real logins that are members
of the group roles (least privilege)."""
from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from daemon import cli
from daemon.commands import roles
from db import capture
from db.queries import QUERIES_FILE, parse
from tests.support import add_document, assert_converged, drain, outbox_rows

DENIED = psycopg.errors.InsufficientPrivilege


@dataclass
class Roles:
    writer: str
    worker: str
    writer_dsn: str
    worker_dsn: str


def login_dsn(dsn: str, user: str) -> str:
    params = conninfo_to_dict(dsn)
    params.pop("password", None)
    params["user"] = user
    return make_conninfo(**params)


@pytest.fixture
def granted(dsn, conn):
    """Fresh group roles applied to the test database, each with a LOGIN member."""
    suffix = uuid.uuid4().hex[:10]
    writer, worker = f"outboxd_writer_{suffix}", f"outboxd_worker_{suffix}"
    logins = {writer: f"app_login_{suffix}", worker: f"outboxd_login_{suffix}"}
    roles.apply(dsn, writer, worker)
    try:
        for group, login in logins.items():
            conn.execute(
                psycopg.sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
                    psycopg.sql.Identifier(login), psycopg.sql.Identifier(group)
                )
            )
        yield Roles(writer, worker, login_dsn(dsn, logins[writer]), login_dsn(dsn, logins[worker]))
    finally:
        names = [writer, worker, *logins.values()]
        existing = {r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (names,))}
        for name in (*logins.values(), writer, worker):  # members first, then the groups
            if name in existing:
                ident = psycopg.sql.Identifier(name)
                conn.execute(psycopg.sql.SQL("DROP OWNED BY {}").format(ident))
                conn.execute(psycopg.sql.SQL("DROP ROLE {}").format(ident))


def connect_as(dsn: str) -> psycopg.Connection:
    return psycopg.connect(dsn, autocommit=True)


def test_apply_creates_nologin_groups_and_is_idempotent(dsn, conn, granted, capsys, monkeypatch):
    """Applying again through the CLI succeeds, and both roles are NOLOGIN groups."""
    monkeypatch.setenv("DATABASE_URL", dsn)
    monkeypatch.setenv("OUTBOXD_LOG_FORMAT", "text")
    for _ in range(2):
        code = cli.main(["roles", "--apply", "--writer", granted.writer, "--worker", granted.worker])
        assert code == 0
    out = capsys.readouterr().out
    assert f'GRANT "{granted.writer}" TO app_login' in out
    rows = conn.execute(
        "SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname = ANY(%s)", ([granted.writer, granted.worker],)
    ).fetchall()
    assert sorted(rows) == sorted([(granted.writer, False), (granted.worker, False)])


def test_print_is_the_default_and_quotes_the_names(capsys, monkeypatch):
    """Without --apply the command prints the SQL with the chosen names, touching no database."""
    monkeypatch.setenv("DATABASE_URL", "host=/nonexistent")
    assert cli.main(["roles", "--writer", "app_w", "--worker", "app_k"]) == 0
    out = capsys.readouterr().out
    assert 'CREATE ROLE "app_w" NOLOGIN' in out and 'CREATE ROLE "app_k" NOLOGIN' in out
    assert "{" not in out and "GRANT \"app_k\" TO outboxd_login" in out


def test_writer_writes_content_and_its_changes_are_captured(conn, granted):
    """The writer inserts, updates and deletes chunks; the SECURITY DEFINER triggers capture each change."""
    with connect_as(granted.writer_dsn) as w:
        doc_id, ids = add_document(w, ["first text", "second text"])
        w.execute("UPDATE chunks SET text = 'changed text' WHERE id = %s", (ids[0],))
        w.execute("DELETE FROM chunks WHERE id = %s", (ids[1],))
        w.execute("UPDATE documents SET title = 'Renamed' WHERE id = %s", (doc_id,))
        w.execute("UPDATE crawl_jobs SET status = 'running' WHERE false")
    ops = [(r["chunk_id"], r["op"]) for r in outbox_rows(conn)]
    assert ops == [(ids[0], "insert"), (ids[1], "insert"), (ids[0], "update"), (ids[1], "delete"), (ids[0], "payload")]


@pytest.mark.parametrize("statement", [
    "SELECT * FROM outboxd.outbox",
    "INSERT INTO outboxd.outbox (chunk_id, op) VALUES (gen_random_uuid(), 'insert')",
    "UPDATE outboxd.outbox SET attempts = 0",
    "DELETE FROM outboxd.outbox",
    "SELECT * FROM outboxd.chunk_state",
    "SELECT * FROM outboxd.collections",
])
def test_writer_cannot_touch_outboxd(granted, statement):
    """The writer has no privilege on the outboxd schema: the outbox and catalog are out of reach."""
    with connect_as(granted.writer_dsn) as w, pytest.raises(DENIED):
        w.execute(statement)


@pytest.mark.parametrize("statement", [
    "INSERT INTO chunks (document_id, chunk_index, text) VALUES (gen_random_uuid(), 0, 'x')",
    "UPDATE chunks SET text = 'x'",
    "DELETE FROM chunks",
    "TRUNCATE chunks",
    "INSERT INTO documents (source_id, title) VALUES (gen_random_uuid(), 'x')",
    "UPDATE documents SET title = 'x'",
    "DELETE FROM documents",
    "INSERT INTO sources (source_type) VALUES ('api')",
    "UPDATE sources SET status = 'failed'",
    "DELETE FROM sources",
    "DELETE FROM crawl_jobs",
])
def test_worker_cannot_modify_content(conn, granted, statement):
    """The worker reads content but every content write is refused."""
    add_document(conn, ["something to modify"])
    with connect_as(granted.worker_dsn) as k, pytest.raises(DENIED):
        k.execute(statement)


# Values for every parameter the named queries take: each query runs once as the
# worker in a transaction that is rolled back.
PARAMS = dict(
    batch_size=10, worker="w", lease_seconds=5, event_ids=[1], chunk_ids=[uuid.uuid4()], state_hashes=["h"],
    collection="c", max_attempts=3, backoff_max=1.0, backoff_base=0.1, backoff_factor=2.0, backoff_jitter=0.5,
    error="boom", all=False,
    error_pattern="boom", alias="a", name="n", model_name="m", dimension=3, normalized=True,
    max_seq_length=None, fingerprint_id="f", status="building", after=None, source_id=None,
    document_id=None, limit=10, job="j", last_chunk_id=None, done=1, query="chunk", document_type=None,
    metadata=None, mode="origin", variant="{}", checked=0, drift="{}",
    endpoint="http://e/v1/embeddings m", request_rate=1.0, request_capacity=1.0, token_rate=None,
    token_capacity=None, tokens=0, horizon=1.0, seconds=0.5,
    qdrant_uid="u", qdrant_location="http://q:6333", replace=False, turn=datetime.now(timezone.utc),
)
# Named queries for the operator (the migrating role), which the worker must NOT be able to run.
OPERATOR_ONLY = {"set_capture_mode"}


def all_queries() -> dict[str, str]:
    """The daemon's and the operator commands' named queries (not db/sql/demo.sql: the demo
    writes its corpus as an application would, on its own embedded database)."""
    return parse(QUERIES_FILE.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", sorted(set(all_queries()) - OPERATOR_ONLY))
def test_worker_may_run_every_named_query(conn, granted, name):
    """Every statement in db/sql/queries.sql but the operator's is allowed to the worker."""
    add_document(conn, ["a chunk the queries can see"])
    text = all_queries()[name]
    params = {p: PARAMS[p] for p in set(re.findall(r"%\((\w+)\)s", text))}
    with connect_as(granted.worker_dsn) as k, k.transaction(force_rollback=True):
        k.execute(text, params)


def test_worker_may_not_switch_the_capture_mode(conn, granted):
    """Switching the capture triggers is the operator's: the worker is refused, and nothing changes."""
    with connect_as(granted.worker_dsn) as k:
        assert capture.capture_mode(k) == "origin"
        with pytest.raises(DENIED):
            capture.set_capture_mode(k, "always")
    assert capture.capture_mode(conn) == "origin"


async def test_worker_runs_the_daemon_to_convergence(conn, granted, qdrant, collection, embedder, make_settings):
    """The daemon, logged in as the worker, checks the schema revision, claims, applies and acknowledges."""
    with connect_as(granted.writer_dsn) as w:
        _, ids = add_document(w, ["Least privilege is a property of roles.", "The worker never writes content."])
        w.execute("UPDATE chunks SET text = 'Rewritten by the application.' WHERE id = %s", (ids[1],))
    settings = make_settings(database_url=granted.worker_dsn)
    await drain(settings, granted.worker_dsn, embedder, qdrant)
    assert await assert_converged(granted.worker_dsn, qdrant, collection, embedder) == 2
    assert outbox_rows(conn) == []
