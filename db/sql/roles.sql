-- Least-privilege group roles for outboxd, applied by `outboxd roles --apply`
-- (or printed by `outboxd roles` for a DBA to review and run). In the source
-- file the role names are placeholders in braces, which the command fills with
-- psycopg.sql: writer/worker as quoted identifiers, writer_name/worker_name as
-- string literals (--writer NAME / --worker NAME choose them).
-- Safe to run again: roles are created only if missing, GRANT and REVOKE are
-- idempotent. Both roles are NOLOGIN groups: grant them to your login roles.

DO $roles$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = {writer_name}) THEN
        CREATE ROLE {writer} NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object THEN
    NULL;  -- a concurrent run created it first
END
$roles$;

DO $roles$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = {worker_name}) THEN
        CREATE ROLE {worker} NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object THEN
    NULL;
END
$roles$;

-- The application writer: the content tables, and nothing of outboxd. Its chunk
-- and document writes are still captured: the capture triggers are SECURITY
-- DEFINER functions with a pinned search_path, owned by the migrating role.
GRANT USAGE ON SCHEMA public TO {writer};
GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE
    ON public.sources, public.documents, public.chunks, public.crawl_jobs TO {writer};
REVOKE ALL ON ALL TABLES IN SCHEMA outboxd FROM {writer};
REVOKE ALL ON SCHEMA outboxd FROM {writer};

-- The daemon and the operator commands: read the content (chunk_state, count,
-- backfill and search queries), claim, acknowledge, fail, release and requeue
-- outbox events, take turns of the shared embedding budget, keep the collection
-- catalog and scan checkpoints (reindex --drop-retired deletes catalog rows,
-- backfill --restart deletes a checkpoint), and read the schema revision at
-- start. It never modifies content.
GRANT USAGE ON SCHEMA public TO {worker};
GRANT SELECT ON public.sources, public.documents, public.chunks, public.crawl_jobs TO {worker};
REVOKE INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER
    ON public.sources, public.documents, public.chunks, public.crawl_jobs FROM {worker};
GRANT SELECT ON public.outboxd_alembic_version TO {worker};
GRANT USAGE ON SCHEMA outboxd TO {worker};
GRANT SELECT, INSERT, UPDATE, DELETE ON outboxd.outbox TO {worker};
GRANT SELECT ON outboxd.chunk_state TO {worker};
GRANT SELECT, DELETE ON outboxd.chunk_versions TO {worker};  -- a gone chunk's version is forgotten at its ack
GRANT SELECT, INSERT, UPDATE, DELETE ON outboxd.collections, outboxd.scan_progress TO {worker};
GRANT SELECT, INSERT, UPDATE, DELETE ON outboxd.verifier TO {worker};  -- the verifier's lease and checkpoint
GRANT SELECT, INSERT, UPDATE ON outboxd.embedding_budget TO {worker};  -- the shared embedding budget
GRANT USAGE ON SEQUENCE outboxd.event_version TO {worker};  -- the Kafka relay's versions
