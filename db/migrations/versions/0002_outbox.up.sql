-- outboxd's own objects live in their own schema; the application owns public.
CREATE SCHEMA outboxd;

-- One row per captured chunk change. The daemon reads the chunk's current state
-- when it applies an event, so a row only says "chunk X changed"; op is kept for
-- operators and metrics. Rows are deleted once Qdrant confirmed the write.
CREATE TABLE outboxd.outbox (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    chunk_id UUID NOT NULL,
    op TEXT NOT NULL CHECK (op IN ('insert', 'update', 'payload', 'delete')),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    available_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    locked_by TEXT,
    locked_until TIMESTAMPTZ,
    last_error TEXT,
    first_failed_at TIMESTAMPTZ,
    last_failed_at TIMESTAMPTZ
);
CREATE INDEX outbox_pending_idx ON outboxd.outbox (id) WHERE status = 'pending';
CREATE INDEX outbox_chunk_id_idx ON outboxd.outbox (chunk_id);

-- The projection of chunk + document + source that reaches Qdrant, with a hash
-- of it: an event is acknowledged only while the chunk still has the state the
-- daemon wrote, which is what makes racing workers safe (invariant 3).
CREATE VIEW outboxd.chunk_state AS
SELECT c.id AS chunk_id,
       c.document_id,
       d.source_id,
       c.chunk_index,
       c.text,
       c.token_count,
       c.content_hash,
       c.metadata,
       d.title,
       d.url,
       d.document_type,
       md5(row(c.content_hash, c.document_id, d.source_id, c.chunk_index, c.token_count,
               c.metadata, d.title, d.url, d.document_type)::text) AS state_hash
FROM public.chunks c
JOIN public.documents d ON d.id = c.document_id;

-- Capture triggers are statement-level with transition tables: one INSERT into
-- the outbox per statement, not per row, which keeps bulk writes cheap. They run
-- as SECURITY DEFINER with a pinned search_path so writers need no outbox grants.
CREATE FUNCTION outboxd.capture_chunk_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO outboxd.outbox (chunk_id, op) SELECT n.id, 'insert' FROM new_rows n;
    RETURN NULL;
END;
$$;

-- Only changes that reach Qdrant are captured; an updated primary key is a
-- delete of the old id and an insert of the new one.
CREATE FUNCTION outboxd.capture_chunk_update() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO outboxd.outbox (chunk_id, op)
    SELECT n.id,
           CASE WHEN o.id IS NULL THEN 'insert'
                WHEN o.text IS DISTINCT FROM n.text THEN 'update'
                ELSE 'payload' END
    FROM new_rows n
    LEFT JOIN old_rows o ON o.id = n.id
    WHERE o.id IS NULL
       OR (o.text, o.chunk_index, o.token_count, o.metadata, o.document_id)
          IS DISTINCT FROM (n.text, n.chunk_index, n.token_count, n.metadata, n.document_id)
    UNION ALL
    SELECT o.id, 'delete'
    FROM old_rows o
    WHERE NOT EXISTS (SELECT 1 FROM new_rows n WHERE n.id = o.id);
    RETURN NULL;
END;
$$;

-- Also fires for the deletes that ON DELETE CASCADE runs from documents and sources.
CREATE FUNCTION outboxd.capture_chunk_delete() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO outboxd.outbox (chunk_id, op) SELECT o.id, 'delete' FROM old_rows o;
    RETURN NULL;
END;
$$;

-- BEFORE TRUNCATE still sees the rows, so each one becomes an ordinary delete event.
CREATE FUNCTION outboxd.capture_chunk_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO outboxd.outbox (chunk_id, op) SELECT c.id, 'delete' FROM public.chunks c;
    RETURN NULL;
END;
$$;

-- Fields of a document that are part of its chunks' payload.
CREATE FUNCTION outboxd.capture_document_update() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO outboxd.outbox (chunk_id, op)
    SELECT c.id, 'payload'
    FROM new_rows n
    JOIN old_rows o ON o.id = n.id
    JOIN public.chunks c ON c.document_id = n.id
    WHERE (o.title, o.url, o.document_type, o.metadata, o.source_id)
          IS DISTINCT FROM (n.title, n.url, n.document_type, n.metadata, n.source_id);
    RETURN NULL;
END;
$$;

-- A wake-up, not a message: identical notifications collapse, so a transaction
-- sends one however many events it wrote. The events themselves are in the table.
CREATE FUNCTION outboxd.notify_outbox() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted) THEN
        PERFORM pg_notify('outboxd', '');
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER outboxd_capture_insert AFTER INSERT ON public.chunks
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION outboxd.capture_chunk_insert();
CREATE TRIGGER outboxd_capture_update AFTER UPDATE ON public.chunks
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION outboxd.capture_chunk_update();
CREATE TRIGGER outboxd_capture_delete AFTER DELETE ON public.chunks
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION outboxd.capture_chunk_delete();
CREATE TRIGGER outboxd_capture_truncate BEFORE TRUNCATE ON public.chunks
    FOR EACH STATEMENT EXECUTE FUNCTION outboxd.capture_chunk_truncate();
CREATE TRIGGER outboxd_capture_document_update AFTER UPDATE ON public.documents
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION outboxd.capture_document_update();
CREATE TRIGGER outboxd_notify AFTER INSERT ON outboxd.outbox
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION outboxd.notify_outbox();
