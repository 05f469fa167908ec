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
