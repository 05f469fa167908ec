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
CREATE INDEX outbox_chunk_id_idx ON outboxd.outbox (chunk_id);

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

-- A wake-up, not a message: identical notifications collapse, so a transaction
-- sends one however many events it wrote. The events themselves are in the table.
CREATE FUNCTION outboxd.notify_outbox() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
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
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
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

-- The version a relayed chunk event carries: drawn when the relay reads the
-- chunk's state, so a state read later always has a higher version. Consumers
-- drop an event older than the version a point already reflects.
CREATE SEQUENCE outboxd.event_version AS BIGINT;
