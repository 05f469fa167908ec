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
