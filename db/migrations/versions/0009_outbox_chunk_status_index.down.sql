CREATE INDEX outbox_chunk_id_idx ON outboxd.outbox (chunk_id);
DROP INDEX outboxd.outbox_chunk_id_status_idx;
