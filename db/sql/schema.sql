-- The full outboxd schema at head, for reading and for fresh installs by hand.
-- It must equal what the migrations build: tests/integration/test_migrations.py checks.

-- The relational source of truth: sources -> documents -> chunks (+ crawl_jobs),
-- as the seed schema defines it, with the additions of the second design
-- (documents.content_hash/total_chunks/status, chunks.updated_at/content_hash).
-- Needs PostgreSQL 13+ (gen_random_uuid and sha256 are built in).

CREATE OR REPLACE FUNCTION public.update_updated_at_column()
RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at = now();
    RETURN NEW;
END;
$$;

-- convert_to() is only STABLE because encodings could in theory change; for a fixed
-- target (UTF8) the result is a pure function of the input, which a generated column needs.
CREATE OR REPLACE FUNCTION public.content_sha256(input text)
RETURNS text LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN encode(sha256(convert_to(input, 'UTF8')), 'hex');

CREATE TABLE public.sources (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    source_type TEXT NOT NULL CHECK (source_type IN ('upload', 'crawl', 'api')),
    url TEXT,
    status TEXT NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'processing', 'completed', 'failed')),
    metadata JSONB DEFAULT '{}'::jsonb,
    error_message TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX idx_sources_status ON public.sources (status);
CREATE INDEX idx_sources_source_type ON public.sources (source_type);
CREATE INDEX idx_sources_created_at ON public.sources (created_at DESC);
CREATE TRIGGER sources_updated_at BEFORE UPDATE ON public.sources
    FOR EACH ROW EXECUTE FUNCTION public.update_updated_at_column();

CREATE TABLE public.documents (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    source_id UUID NOT NULL REFERENCES public.sources (id) ON DELETE CASCADE,
    title TEXT NOT NULL,
    document_type TEXT,
    url TEXT,
    metadata JSONB DEFAULT '{}'::jsonb,
    content_hash TEXT,
    total_chunks INTEGER NOT NULL DEFAULT 0 CHECK (total_chunks >= 0),
    status TEXT NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'processing', 'completed', 'failed')),
    search_vector TSVECTOR,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX idx_documents_source_id ON public.documents (source_id);
CREATE INDEX idx_documents_search_vector ON public.documents USING GIN (search_vector);
CREATE INDEX idx_documents_document_type ON public.documents (document_type);
CREATE INDEX idx_documents_created_at ON public.documents (created_at DESC);
CREATE INDEX idx_documents_content_hash ON public.documents (content_hash);
CREATE INDEX idx_documents_status ON public.documents (status);

CREATE OR REPLACE FUNCTION public.documents_search_vector_update()
RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.search_vector =
        setweight(to_tsvector('english', coalesce(NEW.title, '')), 'A') ||
        setweight(to_tsvector('english', coalesce(NEW.url, '')), 'B') ||
        setweight(to_tsvector('english', coalesce(NEW.metadata::text, '')), 'C');
    RETURN NEW;
END;
$$;
CREATE TRIGGER documents_search_vector_trigger
    BEFORE INSERT OR UPDATE OF title, url, metadata ON public.documents
    FOR EACH ROW EXECUTE FUNCTION public.documents_search_vector_update();
CREATE TRIGGER documents_updated_at BEFORE UPDATE ON public.documents
    FOR EACH ROW EXECUTE FUNCTION public.update_updated_at_column();

CREATE TABLE public.chunks (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    document_id UUID NOT NULL REFERENCES public.documents (id) ON DELETE CASCADE,
    chunk_index INTEGER NOT NULL,
    text TEXT NOT NULL,
    token_count INTEGER,
    search_vector TSVECTOR,
    metadata JSONB DEFAULT '{}'::jsonb,
    -- Kept by the database: the application cannot write it, so the vector
    -- pipeline can trust it to say whether the text changed.
    content_hash TEXT GENERATED ALWAYS AS (public.content_sha256(text)) STORED,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT unique_document_chunk UNIQUE (document_id, chunk_index)
);
CREATE INDEX idx_chunks_document_id ON public.chunks (document_id);
CREATE INDEX idx_chunks_search_vector ON public.chunks USING GIN (search_vector);
CREATE INDEX idx_chunks_document_id_chunk_index ON public.chunks (document_id, chunk_index);
CREATE INDEX idx_chunks_content_hash ON public.chunks (content_hash);

CREATE OR REPLACE FUNCTION public.chunks_search_vector_update()
RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.search_vector = to_tsvector('english', coalesce(NEW.text, ''));
    RETURN NEW;
END;
$$;
CREATE TRIGGER chunks_search_vector_trigger
    BEFORE INSERT OR UPDATE OF text ON public.chunks
    FOR EACH ROW EXECUTE FUNCTION public.chunks_search_vector_update();
CREATE TRIGGER chunks_updated_at BEFORE UPDATE ON public.chunks
    FOR EACH ROW EXECUTE FUNCTION public.update_updated_at_column();

CREATE TABLE public.crawl_jobs (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    source_id UUID NOT NULL REFERENCES public.sources (id) ON DELETE CASCADE,
    status TEXT NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
    pages_crawled INTEGER NOT NULL DEFAULT 0 CHECK (pages_crawled >= 0),
    pages_total INTEGER CHECK (pages_total >= 0),
    max_pages INTEGER DEFAULT 100 CHECK (max_pages > 0),
    max_depth INTEGER DEFAULT 3 CHECK (max_depth >= 0),
    current_depth INTEGER DEFAULT 0 CHECK (current_depth >= 0),
    error_message TEXT,
    error_count INTEGER DEFAULT 0 CHECK (error_count >= 0),
    metadata JSONB DEFAULT '{}'::jsonb,
    started_at TIMESTAMPTZ,
    completed_at TIMESTAMPTZ,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX idx_crawl_jobs_source_id ON public.crawl_jobs (source_id);
CREATE INDEX idx_crawl_jobs_status ON public.crawl_jobs (status);
CREATE INDEX idx_crawl_jobs_created_at ON public.crawl_jobs (created_at DESC);
CREATE INDEX idx_crawl_jobs_status_pages ON public.crawl_jobs (status, pages_crawled);
CREATE TRIGGER crawl_jobs_updated_at BEFORE UPDATE ON public.crawl_jobs
    FOR EACH ROW EXECUTE FUNCTION public.update_updated_at_column();

-- outboxd's own objects live in their own schema; the application owns public.
CREATE SCHEMA outboxd;

-- One row per captured chunk change. The daemon reads the chunk's current state
-- when it applies an event, so a row only says "chunk X changed"; op is kept for
-- operators and metrics. Rows are deleted once Qdrant confirmed the write.
CREATE TABLE outboxd.outbox (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    chunk_id UUID NOT NULL,
    op TEXT NOT NULL CHECK (op IN ('insert', 'update', 'payload', 'delete')),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    available_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    locked_by TEXT,
    locked_until TIMESTAMPTZ,
    last_error TEXT,
    first_failed_at TIMESTAMPTZ,
    last_failed_at TIMESTAMPTZ
);
CREATE INDEX outbox_pending_idx ON outboxd.outbox (id) WHERE status = 'pending';
-- chunk_id with status: "is an event pending for this chunk?" is one probe,
-- whatever the planner's statistics say about the outbox (migration 0009).
CREATE INDEX outbox_chunk_id_status_idx ON outboxd.outbox (chunk_id, status);

-- The projection of chunk + document + source that reaches Qdrant, with a hash
-- of it: an event is acknowledged only while the chunk still has the state the
-- daemon wrote, which is what makes racing workers safe (invariant 3).
CREATE VIEW outboxd.chunk_state AS
SELECT c.id AS chunk_id,
       c.document_id,
       d.source_id,
       c.chunk_index,
       c.text,
       c.token_count,
       c.content_hash,
       c.metadata,
       d.title,
       d.url,
       d.document_type,
       md5(row(c.content_hash, c.document_id, d.source_id, c.chunk_index, c.token_count,
               c.metadata, d.title, d.url, d.document_type)::text) AS state_hash
FROM public.chunks c
JOIN public.documents d ON d.id = c.document_id;

-- Capture triggers are statement-level with transition tables: one INSERT into
-- the outbox per statement, not per row, which keeps bulk writes cheap. They run
-- as SECURITY DEFINER with a pinned search_path so writers need no outbox grants.
CREATE FUNCTION outboxd.capture_chunk_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO outboxd.outbox (chunk_id, op) SELECT n.id, 'insert' FROM new_rows n;
    RETURN NULL;
END;
$$;

-- Only changes that reach Qdrant are captured; an updated primary key is a
-- delete of the old id and an insert of the new one.
CREATE FUNCTION outboxd.capture_chunk_update() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO outboxd.outbox (chunk_id, op)
    SELECT n.id,
           CASE WHEN o.id IS NULL THEN 'insert'
                WHEN o.text IS DISTINCT FROM n.text THEN 'update'
                ELSE 'payload' END
    FROM new_rows n
    LEFT JOIN old_rows o ON o.id = n.id
    WHERE o.id IS NULL
       OR (o.text, o.chunk_index, o.token_count, o.metadata, o.document_id)
          IS DISTINCT FROM (n.text, n.chunk_index, n.token_count, n.metadata, n.document_id)
    UNION ALL
    SELECT o.id, 'delete'
    FROM old_rows o
    WHERE NOT EXISTS (SELECT 1 FROM new_rows n WHERE n.id = o.id);
    RETURN NULL;
END;
$$;

-- Also fires for the deletes that ON DELETE CASCADE runs from documents and sources.
CREATE FUNCTION outboxd.capture_chunk_delete() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO outboxd.outbox (chunk_id, op) SELECT o.id, 'delete' FROM old_rows o;
    RETURN NULL;
END;
$$;

-- BEFORE TRUNCATE still sees the rows, so each one becomes an ordinary delete event.
CREATE FUNCTION outboxd.capture_chunk_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO outboxd.outbox (chunk_id, op) SELECT c.id, 'delete' FROM public.chunks c;
    RETURN NULL;
END;
$$;

-- Fields of a document that are part of its chunks' payload.
CREATE FUNCTION outboxd.capture_document_update() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO outboxd.outbox (chunk_id, op)
    SELECT c.id, 'payload'
    FROM new_rows n
    JOIN old_rows o ON o.id = n.id
    JOIN public.chunks c ON c.document_id = n.id
    WHERE (o.title, o.url, o.document_type, o.metadata, o.source_id)
          IS DISTINCT FROM (n.title, n.url, n.document_type, n.metadata, n.source_id);
    RETURN NULL;
END;
$$;

-- Each chunk's version: a new one, from the event_version sequence, in the same
-- transaction as every outbox event recorded for the chunk (a captured change, a
-- repair, a backfill). The row lock orders it: of two transactions that record
-- events for one chunk, the one that commits later holds the higher version, so
-- a state read together with its version in one snapshot is newer exactly when
-- its version is higher. Every point carries the version of the state it holds,
-- and Qdrant writes it only over an older one (migration 0011).
CREATE TABLE outboxd.chunk_versions (
    chunk_id UUID PRIMARY KEY,
    version BIGINT NOT NULL
);

-- A wake-up, not a message: identical notifications collapse, so a transaction
-- sends one however many events it wrote. The events themselves are in the table.
-- The same statement trigger gives each chunk its new version (in chunk id order,
-- so two transactions lock the rows they share in the same order): one drawn for
-- the statement, so a document's new title gives all its chunks the same version
-- (one payload update in Qdrant serves them all); a row a later commit finds at a
-- higher version (it waited on the row lock) takes a fresh one above it.
CREATE FUNCTION outboxd.notify_outbox() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    WITH drawn AS MATERIALIZED (SELECT nextval('outboxd.event_version') AS version)
    INSERT INTO outboxd.chunk_versions AS v (chunk_id, version)
    SELECT c.chunk_id, drawn.version
    FROM (SELECT DISTINCT chunk_id FROM inserted ORDER BY chunk_id) c, drawn
    ON CONFLICT (chunk_id) DO UPDATE
    SET version = CASE WHEN EXCLUDED.version > v.version THEN EXCLUDED.version
                       ELSE nextval('outboxd.event_version') END;
    IF EXISTS (SELECT 1 FROM inserted) THEN
        PERFORM pg_notify('outboxd', '');
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER outboxd_capture_insert AFTER INSERT ON public.chunks
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION outboxd.capture_chunk_insert();
CREATE TRIGGER outboxd_capture_update AFTER UPDATE ON public.chunks
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION outboxd.capture_chunk_update();
CREATE TRIGGER outboxd_capture_delete AFTER DELETE ON public.chunks
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION outboxd.capture_chunk_delete();
CREATE TRIGGER outboxd_capture_truncate BEFORE TRUNCATE ON public.chunks
    FOR EACH STATEMENT EXECUTE FUNCTION outboxd.capture_chunk_truncate();
CREATE TRIGGER outboxd_capture_document_update AFTER UPDATE ON public.documents
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION outboxd.capture_document_update();
CREATE TRIGGER outboxd_notify AFTER INSERT ON outboxd.outbox
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION outboxd.notify_outbox();

-- The collections outboxd has built and which model made each, so operators
-- (outboxd status) and reindex know what lives behind the alias readers use.
-- Exactly one collection per alias is 'live': the one the daemon may acknowledge
-- events for. 'building' is a reindex in progress; 'retired' is kept for rollback.
CREATE TABLE outboxd.collections (
    name TEXT PRIMARY KEY,
    alias TEXT NOT NULL,
    model_name TEXT NOT NULL,
    dimension INTEGER NOT NULL CHECK (dimension > 0),
    normalized BOOLEAN NOT NULL,
    max_seq_length INTEGER,
    fingerprint_id TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('building', 'live', 'retired')),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    variant TEXT,  -- the fingerprint's backend variant (NULL: agrees with the reference; 'onnx-int8', ...)
    -- which Qdrant holds it: the id outboxd wrote into the collection's own metadata, and
    -- where it was last seen (a URL or a local-mode folder); a process pointed at another
    -- Qdrant refuses to start instead of writing where no reader looks
    qdrant_uid TEXT,
    qdrant_location TEXT
);
CREATE UNIQUE INDEX collections_one_live_per_alias ON outboxd.collections (alias) WHERE status = 'live';

-- Checkpoints of long keyset scans (backfill, reindex builds), so an interrupted
-- run resumes where it stopped.
CREATE TABLE outboxd.scan_progress (
    job TEXT PRIMARY KEY,
    last_chunk_id UUID,
    done BIGINT NOT NULL DEFAULT 0,
    completed_at TIMESTAMPTZ,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The embedding endpoint's budget, shared by every daemon of this database: one
-- row per endpoint (its URL and model), a token bucket of requests and tokens
-- that each request takes its turn from in one short UPDATE (the named query
-- embedding_budget_take), and the endpoint's last Retry-After, so one worker's
-- 429 pauses them all. UNLOGGED: the row changes with every request, and what a
-- crash loses is a bucket that starts full again, at worst one more 429.
CREATE UNLOGGED TABLE outboxd.embedding_budget (
    endpoint TEXT PRIMARY KEY,
    requests DOUBLE PRECISION NOT NULL,  -- in the bucket as of updated_at; below 0: turns reserved ahead
    tokens DOUBLE PRECISION NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    paused_until TIMESTAMPTZ,  -- a 429's Retry-After: no request is sent before it
    granted BIGINT NOT NULL DEFAULT 0,  -- turns taken
    rate_limited BIGINT NOT NULL DEFAULT 0  -- 429s the daemons were answered
);

-- The version a relayed chunk event carries: drawn when the relay reads the
-- chunk's state, so a state read later always has a higher version. Consumers
-- drop an event older than the version a point already reflects.
CREATE SEQUENCE outboxd.event_version AS BIGINT;

-- Capture mode: which sessions the outboxd triggers capture chunk changes in.
--
-- PostgreSQL fires a trigger according to its pg_trigger.tgenabled and the
-- session's session_replication_role: ENABLE ('origin', 'O') fires in ordinary
-- sessions (role origin or local), ENABLE REPLICA ('replica', 'R') only under
-- the replica role, ENABLE ALWAYS ('always', 'A') in both, DISABLE never.
-- Under the replica role run bulk loads and replays that SET
-- session_replication_role = replica, and a logical-replication subscriber's
-- apply and table-sync workers. The apply worker fires only ROW-level triggers
-- for the INSERT, UPDATE and DELETE it applies (PostgreSQL docs, Logical
-- Replication > Architecture); for a replicated TRUNCATE it fires the TRUNCATE
-- statement triggers; the statements a trigger function runs (the outbox
-- INSERT) are ordinary statements and fire statement triggers.
--
-- So capture has two paths. The statement-level triggers of 0002 (one INSERT
-- into the outbox per statement: cheap for bulk writes) serve ordinary
-- sessions in both modes. The row-level triggers below (one INSERT per row)
-- serve the replica role, and fire only there: they are DISABLED in mode
-- 'origin' and ENABLE REPLICA in mode 'always'. TRUNCATE has no row triggers,
-- so its statement trigger is the only path in both kinds of session: ALWAYS
-- in 'always'. The NOTIFY trigger on the outbox must fire for the outbox rows
-- either path inserts: ALWAYS in 'always'. No session fires both paths, so
-- every change is captured exactly once:
--
--   trigger                                      level      'origin'  'always'
--   chunks    outboxd_capture_insert             statement  origin    origin
--   chunks    outboxd_capture_update             statement  origin    origin
--   chunks    outboxd_capture_delete             statement  origin    origin
--   documents outboxd_capture_document_update    statement  origin    origin
--   chunks    outboxd_capture_truncate           statement  origin    always
--   outbox    outboxd_notify                     statement  origin    always
--   chunks    outboxd_capture_row_insert         row        disabled  replica
--   chunks    outboxd_capture_row_update         row        disabled  replica
--   chunks    outboxd_capture_row_delete         row        disabled  replica
--   documents outboxd_capture_row_document_update row       disabled  replica
--
-- 'origin' (the default): ordinary sessions only; writes under the replica
-- role are missed. 'always': every committed chunk change, whichever session
-- or process made it. Either way ON DELETE CASCADE does not run under the
-- replica role (foreign keys are triggers too): deleting a document there
-- leaves its chunks in place, and nothing is captured because no chunk
-- changed. On a subscriber the publisher's cascaded chunk deletes arrive as
-- chunk deletes of their own and are captured.

-- Row-level capture, one INSERT into the outbox per row and nothing else:
-- a subscriber applies row by row, so this is its cost per applied change.
-- SECURITY DEFINER with a pinned search_path, like the statement functions.
CREATE FUNCTION outboxd.capture_chunk_insert_row() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO outboxd.outbox (chunk_id, op) VALUES (NEW.id, 'insert');
    RETURN NULL;
END;
$$;

-- The trigger's WHEN clause lets only Qdrant-relevant changes through, the
-- rule of capture_chunk_update(); an updated primary key is an insert of the
-- new id and a delete of the old one.
CREATE FUNCTION outboxd.capture_chunk_update_row() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NEW.id = OLD.id THEN
        INSERT INTO outboxd.outbox (chunk_id, op)
        VALUES (NEW.id, CASE WHEN OLD.text IS DISTINCT FROM NEW.text THEN 'update' ELSE 'payload' END);
    ELSE
        INSERT INTO outboxd.outbox (chunk_id, op) VALUES (NEW.id, 'insert'), (OLD.id, 'delete');
    END IF;
    RETURN NULL;
END;
$$;

CREATE FUNCTION outboxd.capture_chunk_delete_row() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO outboxd.outbox (chunk_id, op) VALUES (OLD.id, 'delete');
    RETURN NULL;
END;
$$;

-- The trigger's WHEN clause passes only changes to the document's payload
-- fields; the chunks are found by idx_chunks_document_id.
CREATE FUNCTION outboxd.capture_document_update_row() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO outboxd.outbox (chunk_id, op)
    SELECT c.id, 'payload' FROM public.chunks c WHERE c.document_id = NEW.id;
    RETURN NULL;
END;
$$;

CREATE TRIGGER outboxd_capture_row_insert AFTER INSERT ON public.chunks
    FOR EACH ROW EXECUTE FUNCTION outboxd.capture_chunk_insert_row();
CREATE TRIGGER outboxd_capture_row_update AFTER UPDATE ON public.chunks
    FOR EACH ROW
    WHEN ((OLD.id, OLD.text, OLD.chunk_index, OLD.token_count, OLD.metadata, OLD.document_id)
          IS DISTINCT FROM (NEW.id, NEW.text, NEW.chunk_index, NEW.token_count, NEW.metadata, NEW.document_id))
    EXECUTE FUNCTION outboxd.capture_chunk_update_row();
CREATE TRIGGER outboxd_capture_row_delete AFTER DELETE ON public.chunks
    FOR EACH ROW EXECUTE FUNCTION outboxd.capture_chunk_delete_row();
CREATE TRIGGER outboxd_capture_row_document_update AFTER UPDATE ON public.documents
    FOR EACH ROW
    WHEN ((OLD.title, OLD.url, OLD.document_type, OLD.metadata, OLD.source_id)
          IS DISTINCT FROM (NEW.title, NEW.url, NEW.document_type, NEW.metadata, NEW.source_id))
    EXECUTE FUNCTION outboxd.capture_document_update_row();
-- Mode 'origin': the row path is off.
ALTER TABLE public.chunks DISABLE TRIGGER outboxd_capture_row_insert;
ALTER TABLE public.chunks DISABLE TRIGGER outboxd_capture_row_update;
ALTER TABLE public.chunks DISABLE TRIGGER outboxd_capture_row_delete;
ALTER TABLE public.documents DISABLE TRIGGER outboxd_capture_row_document_update;

-- The outboxd triggers, one row each, in the order of the table above: the
-- table (schema-qualified text, ready for ALTER TABLE), the trigger, its level,
-- its state now (origin, always, replica or disabled, from pg_trigger.tgenabled;
-- 'missing' where it does not exist) and the state it has in each mode.
-- This list is the definition of the modes: capture_mode() and
-- set_capture_mode() read it; the application's own triggers are not in it.
CREATE FUNCTION outboxd.capture_triggers()
RETURNS TABLE (table_name text, trigger_name name, level text, enabled text, origin text, always text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT d.table_name,
           d.trigger_name::name,
           d.level,
           CASE t.tgenabled WHEN 'O' THEN 'origin' WHEN 'A' THEN 'always'
                            WHEN 'R' THEN 'replica' WHEN 'D' THEN 'disabled' ELSE 'missing' END,
           d.origin,
           d.always
    FROM (VALUES
        (1, 'public.chunks', 'outboxd_capture_insert', 'statement', 'origin', 'origin'),
        (2, 'public.chunks', 'outboxd_capture_update', 'statement', 'origin', 'origin'),
        (3, 'public.chunks', 'outboxd_capture_delete', 'statement', 'origin', 'origin'),
        (4, 'public.documents', 'outboxd_capture_document_update', 'statement', 'origin', 'origin'),
        (5, 'public.chunks', 'outboxd_capture_truncate', 'statement', 'origin', 'always'),
        (6, 'outboxd.outbox', 'outboxd_notify', 'statement', 'origin', 'always'),
        (7, 'public.chunks', 'outboxd_capture_row_insert', 'row', 'disabled', 'replica'),
        (8, 'public.chunks', 'outboxd_capture_row_update', 'row', 'disabled', 'replica'),
        (9, 'public.chunks', 'outboxd_capture_row_delete', 'row', 'disabled', 'replica'),
        (10, 'public.documents', 'outboxd_capture_row_document_update', 'row', 'disabled', 'replica')
    ) AS d (ord, table_name, trigger_name, level, origin, always)
    LEFT JOIN pg_trigger t ON t.tgrelid = d.table_name::regclass AND t.tgname = d.trigger_name::name
    ORDER BY d.ord
$$;

-- The capture mode as one word:
--   'origin' / 'always': every outboxd trigger has that mode's state;
--   'disabled': ordinary writes are being missed: a trigger is missing, or a
--     statement-level one (which both modes fire in ordinary sessions) is
--     disabled or fires only under the replica role;
--   'mixed': anything else, e.g. a row trigger disabled in an otherwise
--     'always' setup (replica-role writes missed) or a row trigger set to
--     ENABLE / ENABLE ALWAYS (ordinary writes captured twice), as
--     ALTER TABLE ... ENABLE TRIGGER ALL leaves them.
-- Needs no privilege beyond reading the catalog, so `outboxd status` can run
-- it as the worker.
CREATE FUNCTION outboxd.capture_mode() RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE
               WHEN bool_or(enabled = 'missing')
                 OR bool_or(level = 'statement' AND enabled IN ('disabled', 'replica')) THEN 'disabled'
               WHEN bool_and(enabled = origin) THEN 'origin'
               WHEN bool_and(enabled = always) THEN 'always'
               ELSE 'mixed'
           END
    FROM outboxd.capture_triggers()
$$;

-- Sets every outboxd trigger to its state in `mode` ('origin' or 'always', see
-- capture_triggers()), from whatever state it is in, and returns the resulting
-- capture_mode(). A trigger already in that state is left alone, so a repeated
-- call takes no lock; each ALTER takes a SHARE ROW EXCLUSIVE lock on its table
-- until commit (writers wait; readers do not), content tables first, the
-- outbox last, in the order writers lock them. A missing trigger is an error,
-- raised before anything changes.
-- ALTER TABLE ... ENABLE/DISABLE TRIGGER needs ownership of the table (the
-- TRIGGER privilege that sufficed to create the triggers does not): the
-- function is SECURITY DEFINER, owned by the role that ran the migrations,
-- which owns public.chunks/documents and outboxd.outbox in the normal setup.
-- Where the application's role owns the content tables, run it as that role
-- (or a superuser), or make that role the function's owner. EXECUTE is revoked
-- from PUBLIC: only the owner, or a role it grants EXECUTE to, may switch.
CREATE FUNCTION outboxd.set_capture_mode(mode text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    trg record;
    missing text;
BEGIN
    IF mode IS NULL OR mode NOT IN ('origin', 'always') THEN
        RAISE EXCEPTION 'invalid capture mode %: expected ''origin'' or ''always''',
            coalesce(quote_literal(mode), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT string_agg(format('%s on %s', c.trigger_name, c.table_name), ', ')
    INTO missing
    FROM outboxd.capture_triggers() c
    WHERE c.enabled = 'missing';
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'outboxd triggers missing: %', missing
            USING ERRCODE = 'undefined_object',
                  HINT = 'The migrations create them (0002, 0005): recreate the missing ones as '
                         'db/sql/schema.sql defines them.';
    END IF;
    FOR trg IN
        SELECT c.table_name, c.trigger_name, c.enabled,
               CASE mode WHEN 'always' THEN c.always ELSE c.origin END AS target
        FROM outboxd.capture_triggers() c
        ORDER BY c.table_name = 'outboxd.outbox', c.table_name DESC, c.trigger_name
    LOOP
        CONTINUE WHEN trg.enabled = trg.target;
        BEGIN
            EXECUTE format('ALTER TABLE %s %s TRIGGER %I', trg.table_name,
                           CASE trg.target WHEN 'origin' THEN 'ENABLE' WHEN 'always' THEN 'ENABLE ALWAYS'
                                           WHEN 'replica' THEN 'ENABLE REPLICA' ELSE 'DISABLE' END,
                           trg.trigger_name);
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE EXCEPTION 'cannot set trigger % on % to %: %', trg.trigger_name, trg.table_name, trg.target, SQLERRM
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'ALTER TABLE ... ENABLE TRIGGER needs ownership of the table: run this as the '
                             'table''s owner or a superuser, or make that role the owner of outboxd.set_capture_mode.';
        END;
    END LOOP;
    RETURN outboxd.capture_mode();
END;
$$;
REVOKE EXECUTE ON FUNCTION outboxd.set_capture_mode(text) FROM PUBLIC;

-- The continuous verifier (`outboxd run`): one daemon of the fleet at a time walks
-- the chunk ids and the collection's points in id order and repairs what differs.
-- Which daemon is the row's lease (holder until lease_until, renewed by the holder,
-- taken over by another daemon once it runs out); where it is, its checkpoint
-- (every id up to after_id is checked in the current pass), so a new holder
-- resumes there. A pass that reaches the highest id records itself and starts
-- again at the lowest.
CREATE TABLE outboxd.verifier (
    collection TEXT PRIMARY KEY,  -- the alias the fleet keeps (OUTBOXD_COLLECTION)
    holder TEXT NOT NULL,  -- worker name of the daemon that holds, or last held, the lease
    lease_until TIMESTAMPTZ NOT NULL,
    after_id UUID,  -- checkpoint of the current pass; NULL: it starts at the lowest id
    pass_started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    pass_checked BIGINT NOT NULL DEFAULT 0,  -- chunks checked in the current pass
    pass_drift JSONB NOT NULL DEFAULT '{}'::jsonb,  -- drift found in it, by kind
    passes BIGINT NOT NULL DEFAULT 0,  -- full passes completed
    last_pass_completed_at TIMESTAMPTZ,
    last_pass_seconds DOUBLE PRECISION,
    last_pass_checked BIGINT,
    last_pass_drift JSONB,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
