DROP TABLE IF EXISTS outboxd.scan_progress;
DROP TABLE IF EXISTS outboxd.collections;
