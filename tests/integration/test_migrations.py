"""Alembic migrations on a real PostgreSQL: upgrade reaches head and is
idempotent, downgrade to base leaves nothing behind, the migrated schema is
exactly db/sql/schema.sql, and `outboxd migrate` does the same from the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

import psycopg
import pytest

from db import migrate
from tests.conftest import REPO, create_database, drop_database

SCHEMA_SQL = REPO / "db" / "sql" / "schema.sql"
SYSTEM_SCHEMAS = "('pg_catalog', 'information_schema', 'pg_toast')"
USER_NS = f"n.nspname NOT IN {SYSTEM_SCHEMAS} AND n.nspname NOT LIKE 'pg_temp_%' AND n.nspname NOT LIKE 'pg_toast_temp_%'"
VERSION_TABLE = migrate.VERSION_TABLE

# Each query lists one kind of object in the user schemas; together they are the catalog snapshot.
CATALOG_QUERIES = {
    "schemas": f"""
        SELECT n.nspname, pg_get_userbyid(n.nspowner), n.nspacl::text FROM pg_namespace n WHERE {USER_NS}""",
    "extensions": "SELECT extname, extversion FROM pg_extension",
    "relations": f"""
        SELECT n.nspname, c.relname, c.relkind, c.relpersistence, c.relacl::text
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {USER_NS}""",
    "columns": f"""
        -- the column's place among the live ones, not attnum: a column dropped by a
        -- downgrade and added again by the upgrade comes back last, with a new attnum
        SELECT n.nspname, c.relname,
               row_number() OVER (PARTITION BY a.attrelid ORDER BY a.attnum) AS position,
               a.attname, format_type(a.atttypid, a.atttypmod),
               a.attnotnull, pg_get_expr(d.adbin, d.adrelid), a.attgenerated, a.attidentity, a.attcollation
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE {USER_NS} AND a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'v', 'm', 'p', 'f')""",
    "constraints": f"""
        SELECT n.nspname, c.relname, k.conname, k.contype, pg_get_constraintdef(k.oid, true)
        FROM pg_constraint k
        JOIN pg_class c ON c.oid = k.conrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE {USER_NS}""",
    "indexes": "SELECT schemaname, tablename, indexname, indexdef FROM pg_indexes n "
               "WHERE schemaname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')",
    "triggers": f"""
        SELECT n.nspname, c.relname, t.tgname, t.tgenabled, pg_get_triggerdef(t.oid, true)
        FROM pg_trigger t
        JOIN pg_class c ON c.oid = t.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE {USER_NS} AND NOT t.tgisinternal""",
    "functions": f"""
        SELECT n.nspname, p.proname, pg_get_function_identity_arguments(p.oid), p.prokind,
               CASE WHEN p.prokind IN ('f', 'p') THEN pg_get_functiondef(p.oid) END, p.proacl::text
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE {USER_NS}""",
    "views": f"""
        SELECT n.nspname, c.relname, pg_get_viewdef(c.oid, true)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE {USER_NS} AND c.relkind IN ('v', 'm')""",
    "types": f"""
        SELECT n.nspname, t.typname, t.typtype
        FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE {USER_NS} AND t.typtype IN ('e', 'd', 'r', 'm')""",
    "sequences": """
        SELECT schemaname, sequencename, data_type::text, start_value, increment_by, max_value, cycle
        FROM pg_sequences""",
    "policies": "SELECT schemaname, tablename, policyname, cmd, qual, with_check FROM pg_policies",
}


def _mentions_version_table(row: tuple) -> bool:
    return any(isinstance(v, str) and v.startswith(VERSION_TABLE) for v in row[:3])


def catalog(dsn: str, *, without_version_table: bool = True) -> dict[str, list[tuple]]:
    """A comparable snapshot of everything the database holds outside the system schemas."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        snap = {kind: sorted(conn.execute(sql).fetchall(), key=repr) for kind, sql in CATALOG_QUERIES.items()}
    if without_version_table:
        snap = {kind: [r for r in rows if not _mentions_version_table(r)] for kind, rows in snap.items()}
    return snap


def version_table_objects(dsn: str) -> dict[str, list[tuple]]:
    full = catalog(dsn, without_version_table=False)
    return {kind: [r for r in rows if _mentions_version_table(r)] for kind, rows in full.items() if any(
        _mentions_version_table(r) for r in rows)}


@pytest.fixture
def second_empty_dsn(pg_server):
    """Another new, empty database beside empty_dsn."""
    name = f"outboxd_empty2_{uuid.uuid4().hex[:10]}"
    yield create_database(pg_server, name)
    drop_database(pg_server, name)


# --- programmatic ----------------------------------------------------------------------
def test_upgrade_reaches_head_and_is_idempotent(empty_dsn):
    """upgrade() on an empty database reaches head; a second upgrade() changes nothing."""
    assert migrate.current_revision(empty_dsn) is None
    migrate.upgrade(empty_dsn)
    assert migrate.current_revision(empty_dsn) == migrate.head_revision()
    first = catalog(empty_dsn)
    assert {r[1] for r in first["relations"] if r[2] == "r"} >= {"sources", "documents", "chunks", "crawl_jobs", "outbox"}

    migrate.upgrade(empty_dsn)
    assert migrate.current_revision(empty_dsn) == migrate.head_revision()
    assert catalog(empty_dsn) == first


def test_head_is_the_last_revision():
    """head_revision() names the newest migration file's revision."""
    versions = sorted(p.name for p in (REPO / "db" / "migrations" / "versions").glob("[0-9]*.py"))
    assert migrate.head_revision() == versions[-1].split("_", 1)[0]


def test_downgrade_to_base_removes_everything(empty_dsn, second_empty_dsn):
    """upgrade → downgrade('base') leaves the catalog of an empty database (the version table aside)."""
    pristine = catalog(second_empty_dsn)
    migrate.upgrade(empty_dsn)
    assert catalog(empty_dsn) != pristine

    migrate.downgrade(empty_dsn, "base")
    assert migrate.current_revision(empty_dsn) is None
    assert catalog(empty_dsn) == pristine
    # All that may remain is Alembic's (empty) version table, its primary key and its index.
    leftovers = version_table_objects(empty_dsn)
    assert set(leftovers) <= {"relations", "columns", "constraints", "indexes"}
    assert {r[1] for r in leftovers["relations"]} <= {VERSION_TABLE, f"{VERSION_TABLE}_pkc"}
    with psycopg.connect(empty_dsn) as conn:
        assert conn.execute(f"SELECT count(*) FROM {VERSION_TABLE}").fetchone()[0] == 0


def test_upgrade_downgrade_upgrade_round_trip(empty_dsn, second_empty_dsn):
    """upgrade → downgrade('base') → upgrade rebuilds the same schema, which works."""
    migrate.upgrade(empty_dsn)
    first = catalog(empty_dsn)
    migrate.downgrade(empty_dsn, "base")
    migrate.upgrade(empty_dsn)
    assert migrate.current_revision(empty_dsn) == migrate.head_revision()
    assert catalog(empty_dsn) == first
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        src = conn.execute("INSERT INTO sources (source_type) VALUES ('api') RETURNING id").fetchone()[0]
        doc = conn.execute("INSERT INTO documents (source_id, title) VALUES (%s, 't') RETURNING id", (src,)).fetchone()[0]
        conn.execute("INSERT INTO chunks (document_id, chunk_index, text) VALUES (%s, 0, 'x')", (doc,))
        assert conn.execute("SELECT op FROM outboxd.outbox").fetchall() == [("insert",)]


def test_step_by_step_migrations(empty_dsn):
    """Each revision upgrades and downgrades on its own: 0002 down leaves exactly 0001's schema."""
    migrate.upgrade(empty_dsn, "0001")
    assert migrate.current_revision(empty_dsn) == "0001"
    at_0001 = catalog(empty_dsn)
    assert "outboxd" not in {r[0] for r in at_0001["schemas"]}
    migrate.upgrade(empty_dsn)
    migrate.downgrade(empty_dsn, "0001")
    assert migrate.current_revision(empty_dsn) == "0001"
    assert catalog(empty_dsn) == at_0001


def test_migrations_build_exactly_schema_sql(empty_dsn, second_empty_dsn):
    """The migrated schema equals db/sql/schema.sql applied to a fresh database, object for object."""
    migrate.upgrade(empty_dsn)
    with psycopg.connect(second_empty_dsn, autocommit=True) as conn:
        conn.execute(SCHEMA_SQL.read_text(encoding="utf-8"))
    migrated, reference = catalog(empty_dsn), catalog(second_empty_dsn)
    for kind in CATALOG_QUERIES:
        assert migrated[kind] == reference[kind], f"{kind} differ between the migrations and schema.sql"
    # The snapshot is not vacuous: it sees the objects both should have.
    assert any(r[2] == "outboxd_capture_truncate" for r in migrated["triggers"])
    assert any(r[1] == "chunk_state" for r in migrated["views"])
    assert any(r[1] == "content_sha256" for r in migrated["functions"])


# --- CLI ---------------------------------------------------------------------------------
def outboxd_migrate(dsn: str, cwd, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOXD_")}
    env["DATABASE_URL"] = dsn
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", "migrate", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.slow
def test_cli_migrate_upgrades_idempotently_and_downgrades(empty_dsn, second_empty_dsn, tmp_path):
    """`outboxd migrate` reaches head, is a no-op the second time, and `--downgrade base` removes the schema."""
    pristine = catalog(second_empty_dsn)

    first = outboxd_migrate(empty_dsn, tmp_path)
    assert first.returncode == 0, first.stderr
    assert migrate.current_revision(empty_dsn) == migrate.head_revision()
    at_head = catalog(empty_dsn)

    again = outboxd_migrate(empty_dsn, tmp_path)
    assert again.returncode == 0, again.stderr
    assert catalog(empty_dsn) == at_head

    down = outboxd_migrate(empty_dsn, tmp_path, "--downgrade", "base")
    assert down.returncode == 0, down.stderr
    assert migrate.current_revision(empty_dsn) is None
    assert catalog(empty_dsn) == pristine
    assert list(tmp_path.iterdir()) == []  # with DATABASE_URL set, nothing embedded is started here


def test_concurrent_upgrades_wait_for_each_other(empty_dsn):
    """Two `outboxd migrate` at once (a retried Job, several hosts): the advisory
    lock serialises them; both succeed and the schema is built once."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:
        for future in [pool.submit(migrate.upgrade, empty_dsn) for _ in range(3)]:
            future.result()
    assert migrate.current_revision(empty_dsn) == migrate.head_revision()
