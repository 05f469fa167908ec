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
