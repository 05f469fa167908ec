-- Each chunk's version: a new one, from the event_version sequence, in the same
-- transaction as every outbox event recorded for the chunk (a captured change, a
-- repair, a backfill). The row lock orders it: of two transactions that record
-- events for one chunk, the one that commits later holds the higher version, so
-- a state read together with its version in one snapshot is newer exactly when
-- its version is higher. Every point carries the version of the state it holds,
-- and Qdrant writes it only over an older one: a daemon that wakes from a pause
-- (a GC, a frozen VM) past its lease cannot put an older state back.
-- The sequence is the one the Kafka relay drew its versions from, so versions
-- already on points stay lower than every new one.
CREATE TABLE outboxd.chunk_versions (
    chunk_id UUID PRIMARY KEY,
    version BIGINT NOT NULL
);

-- Every chunk there is, and every chunk an event is waiting for, starts with a
-- version above any the relay drew before (a trigger may have given one already).
INSERT INTO outboxd.chunk_versions (chunk_id, version)
SELECT c.chunk_id, nextval('outboxd.event_version')
FROM (SELECT id AS chunk_id FROM public.chunks UNION SELECT chunk_id FROM outboxd.outbox) c
ON CONFLICT (chunk_id) DO NOTHING;

-- A wake-up, not a message: identical notifications collapse, so a transaction
-- sends one however many events it wrote. The events themselves are in the table.
-- The same statement trigger gives each chunk its new version (in chunk id order,
-- so two transactions lock the rows they share in the same order): one drawn for
-- the statement, so a document's new title gives all its chunks the same version
-- (one payload update in Qdrant serves them all); a row a later commit finds at a
-- higher version (it waited on the row lock) takes a fresh one above it.
CREATE OR REPLACE FUNCTION outboxd.notify_outbox() RETURNS trigger
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
