CREATE OR REPLACE FUNCTION outboxd.notify_outbox() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted) THEN
        PERFORM pg_notify('outboxd', '');
    END IF;
    RETURN NULL;
END;
$$;
DROP TABLE IF EXISTS outboxd.chunk_versions;
