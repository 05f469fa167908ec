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
