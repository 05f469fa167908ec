-- Which Qdrant holds each collection. outboxd writes a random id into a collection's
-- own metadata when it creates it, and keeps the same id here: a process pointed at
-- another Qdrant (a mistyped QDRANT_URL, a staging server) finds the live collection
-- missing there, or a collection of the same name with another id, and refuses to
-- start instead of writing where no reader looks. qdrant_location is where it was
-- last seen (a server URL or a local-mode folder), for the message. Rows made before
-- it existed read NULL and take the id of the collection at the next start.
ALTER TABLE outboxd.collections ADD COLUMN qdrant_uid TEXT, ADD COLUMN qdrant_location TEXT;
