ALTER TABLE outboxd.collections DROP COLUMN IF EXISTS qdrant_location, DROP COLUMN IF EXISTS qdrant_uid;
