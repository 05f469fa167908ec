-- "Is an event pending for this chunk?" (backfill's page, reconcile's and the
-- verifier's pending_chunks) is one probe of this index. On (chunk_id) alone,
-- a planner whose statistics predate a large outbox (a backfill fills it in
-- minutes, faster than autovacuum analyzes it) ANDs it with the whole
-- pending-index bitmap for every probe: seconds per page at 200,000 events.
CREATE INDEX outbox_chunk_id_status_idx ON outboxd.outbox (chunk_id, status);
DROP INDEX outboxd.outbox_chunk_id_idx;
