-- The version a relayed chunk event carries: drawn when the relay reads the
-- chunk's state, so a state read later always has a higher version. Consumers
-- drop an event older than the version a point already reflects.
CREATE SEQUENCE outboxd.event_version AS BIGINT;
