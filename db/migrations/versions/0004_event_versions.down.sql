DROP SEQUENCE IF EXISTS outboxd.event_version;
