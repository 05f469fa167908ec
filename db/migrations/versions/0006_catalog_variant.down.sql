ALTER TABLE outboxd.collections DROP COLUMN IF EXISTS variant;
