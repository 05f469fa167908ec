-- Capture mode: which sessions the outboxd triggers capture chunk changes in.
--
-- PostgreSQL fires a trigger according to its pg_trigger.tgenabled and the
-- session's session_replication_role: ENABLE ('origin', 'O') fires in ordinary
-- sessions (role origin or local), ENABLE REPLICA ('replica', 'R') only under
-- the replica role, ENABLE ALWAYS ('always', 'A') in both, DISABLE never.
-- Under the replica role run bulk loads and replays that SET
-- session_replication_role = replica, and a logical-replication subscriber's
-- apply and table-sync workers. The apply worker fires only ROW-level triggers
-- for the INSERT, UPDATE and DELETE it applies (PostgreSQL docs, Logical
-- Replication > Architecture); for a replicated TRUNCATE it fires the TRUNCATE
-- statement triggers; the statements a trigger function runs (the outbox
-- INSERT) are ordinary statements and fire statement triggers.
--
-- So capture has two paths. The statement-level triggers of 0002 (one INSERT
-- into the outbox per statement: cheap for bulk writes) serve ordinary
-- sessions in both modes. The row-level triggers below (one INSERT per row)
-- serve the replica role, and fire only there: they are DISABLED in mode
-- 'origin' and ENABLE REPLICA in mode 'always'. TRUNCATE has no row triggers,
-- so its statement trigger is the only path in both kinds of session: ALWAYS
-- in 'always'. The NOTIFY trigger on the outbox must fire for the outbox rows
-- either path inserts: ALWAYS in 'always'. No session fires both paths, so
-- every change is captured exactly once:
--
--   trigger                                      level      'origin'  'always'
--   chunks    outboxd_capture_insert             statement  origin    origin
--   chunks    outboxd_capture_update             statement  origin    origin
--   chunks    outboxd_capture_delete             statement  origin    origin
--   documents outboxd_capture_document_update    statement  origin    origin
--   chunks    outboxd_capture_truncate           statement  origin    always
--   outbox    outboxd_notify                     statement  origin    always
--   chunks    outboxd_capture_row_insert         row        disabled  replica
--   chunks    outboxd_capture_row_update         row        disabled  replica
--   chunks    outboxd_capture_row_delete         row        disabled  replica
--   documents outboxd_capture_row_document_update row       disabled  replica
--
-- 'origin' (the default): ordinary sessions only; writes under the replica
-- role are missed. 'always': every committed chunk change, whichever session
-- or process made it. Either way ON DELETE CASCADE does not run under the
-- replica role (foreign keys are triggers too): deleting a document there
-- leaves its chunks in place, and nothing is captured because no chunk
-- changed. On a subscriber the publisher's cascaded chunk deletes arrive as
-- chunk deletes of their own and are captured.

-- Row-level capture, one INSERT into the outbox per row and nothing else:
-- a subscriber applies row by row, so this is its cost per applied change.
-- SECURITY DEFINER with a pinned search_path, like the statement functions.
CREATE FUNCTION outboxd.capture_chunk_insert_row() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO outboxd.outbox (chunk_id, op) VALUES (NEW.id, 'insert');
    RETURN NULL;
END;
$$;

-- The trigger's WHEN clause lets only Qdrant-relevant changes through, the
-- rule of capture_chunk_update(); an updated primary key is an insert of the
-- new id and a delete of the old one.
CREATE FUNCTION outboxd.capture_chunk_update_row() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NEW.id = OLD.id THEN
        INSERT INTO outboxd.outbox (chunk_id, op)
        VALUES (NEW.id, CASE WHEN OLD.text IS DISTINCT FROM NEW.text THEN 'update' ELSE 'payload' END);
    ELSE
        INSERT INTO outboxd.outbox (chunk_id, op) VALUES (NEW.id, 'insert'), (OLD.id, 'delete');
    END IF;
    RETURN NULL;
END;
$$;

CREATE FUNCTION outboxd.capture_chunk_delete_row() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO outboxd.outbox (chunk_id, op) VALUES (OLD.id, 'delete');
    RETURN NULL;
END;
$$;

-- The trigger's WHEN clause passes only changes to the document's payload
-- fields; the chunks are found by idx_chunks_document_id.
CREATE FUNCTION outboxd.capture_document_update_row() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO outboxd.outbox (chunk_id, op)
    SELECT c.id, 'payload' FROM public.chunks c WHERE c.document_id = NEW.id;
    RETURN NULL;
END;
$$;

CREATE TRIGGER outboxd_capture_row_insert AFTER INSERT ON public.chunks
    FOR EACH ROW EXECUTE FUNCTION outboxd.capture_chunk_insert_row();
CREATE TRIGGER outboxd_capture_row_update AFTER UPDATE ON public.chunks
    FOR EACH ROW
    WHEN ((OLD.id, OLD.text, OLD.chunk_index, OLD.token_count, OLD.metadata, OLD.document_id)
          IS DISTINCT FROM (NEW.id, NEW.text, NEW.chunk_index, NEW.token_count, NEW.metadata, NEW.document_id))
    EXECUTE FUNCTION outboxd.capture_chunk_update_row();
CREATE TRIGGER outboxd_capture_row_delete AFTER DELETE ON public.chunks
    FOR EACH ROW EXECUTE FUNCTION outboxd.capture_chunk_delete_row();
CREATE TRIGGER outboxd_capture_row_document_update AFTER UPDATE ON public.documents
    FOR EACH ROW
    WHEN ((OLD.title, OLD.url, OLD.document_type, OLD.metadata, OLD.source_id)
          IS DISTINCT FROM (NEW.title, NEW.url, NEW.document_type, NEW.metadata, NEW.source_id))
    EXECUTE FUNCTION outboxd.capture_document_update_row();
-- Mode 'origin': the row path is off.
ALTER TABLE public.chunks DISABLE TRIGGER outboxd_capture_row_insert;
ALTER TABLE public.chunks DISABLE TRIGGER outboxd_capture_row_update;
ALTER TABLE public.chunks DISABLE TRIGGER outboxd_capture_row_delete;
ALTER TABLE public.documents DISABLE TRIGGER outboxd_capture_row_document_update;

-- The outboxd triggers, one row each, in the order of the table above: the
-- table (schema-qualified text, ready for ALTER TABLE), the trigger, its level,
-- its state now (origin, always, replica or disabled, from pg_trigger.tgenabled;
-- 'missing' where it does not exist) and the state it has in each mode.
-- This list is the definition of the modes: capture_mode() and
-- set_capture_mode() read it; the application's own triggers are not in it.
CREATE FUNCTION outboxd.capture_triggers()
RETURNS TABLE (table_name text, trigger_name name, level text, enabled text, origin text, always text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT d.table_name,
           d.trigger_name::name,
           d.level,
           CASE t.tgenabled WHEN 'O' THEN 'origin' WHEN 'A' THEN 'always'
                            WHEN 'R' THEN 'replica' WHEN 'D' THEN 'disabled' ELSE 'missing' END,
           d.origin,
           d.always
    FROM (VALUES
        (1, 'public.chunks', 'outboxd_capture_insert', 'statement', 'origin', 'origin'),
        (2, 'public.chunks', 'outboxd_capture_update', 'statement', 'origin', 'origin'),
        (3, 'public.chunks', 'outboxd_capture_delete', 'statement', 'origin', 'origin'),
        (4, 'public.documents', 'outboxd_capture_document_update', 'statement', 'origin', 'origin'),
        (5, 'public.chunks', 'outboxd_capture_truncate', 'statement', 'origin', 'always'),
        (6, 'outboxd.outbox', 'outboxd_notify', 'statement', 'origin', 'always'),
        (7, 'public.chunks', 'outboxd_capture_row_insert', 'row', 'disabled', 'replica'),
        (8, 'public.chunks', 'outboxd_capture_row_update', 'row', 'disabled', 'replica'),
        (9, 'public.chunks', 'outboxd_capture_row_delete', 'row', 'disabled', 'replica'),
        (10, 'public.documents', 'outboxd_capture_row_document_update', 'row', 'disabled', 'replica')
    ) AS d (ord, table_name, trigger_name, level, origin, always)
    LEFT JOIN pg_trigger t ON t.tgrelid = d.table_name::regclass AND t.tgname = d.trigger_name::name
    ORDER BY d.ord
$$;

-- The capture mode as one word:
--   'origin' / 'always': every outboxd trigger has that mode's state;
--   'disabled': ordinary writes are being missed: a trigger is missing, or a
--     statement-level one (which both modes fire in ordinary sessions) is
--     disabled or fires only under the replica role;
--   'mixed': anything else, e.g. a row trigger disabled in an otherwise
--     'always' setup (replica-role writes missed) or a row trigger set to
--     ENABLE / ENABLE ALWAYS (ordinary writes captured twice), as
--     ALTER TABLE ... ENABLE TRIGGER ALL leaves them.
-- Needs no privilege beyond reading the catalog, so `outboxd status` can run
-- it as the worker.
CREATE FUNCTION outboxd.capture_mode() RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE
               WHEN bool_or(enabled = 'missing')
                 OR bool_or(level = 'statement' AND enabled IN ('disabled', 'replica')) THEN 'disabled'
               WHEN bool_and(enabled = origin) THEN 'origin'
               WHEN bool_and(enabled = always) THEN 'always'
               ELSE 'mixed'
           END
    FROM outboxd.capture_triggers()
$$;

-- Sets every outboxd trigger to its state in `mode` ('origin' or 'always', see
-- capture_triggers()), from whatever state it is in, and returns the resulting
-- capture_mode(). A trigger already in that state is left alone, so a repeated
-- call takes no lock; each ALTER takes a SHARE ROW EXCLUSIVE lock on its table
-- until commit (writers wait; readers do not), content tables first, the
-- outbox last, in the order writers lock them. A missing trigger is an error,
-- raised before anything changes.
-- ALTER TABLE ... ENABLE/DISABLE TRIGGER needs ownership of the table (the
-- TRIGGER privilege that sufficed to create the triggers does not): the
-- function is SECURITY DEFINER, owned by the role that ran the migrations,
-- which owns public.chunks/documents and outboxd.outbox in the normal setup.
-- Where the application's role owns the content tables, run it as that role
-- (or a superuser), or make that role the function's owner. EXECUTE is revoked
-- from PUBLIC: only the owner, or a role it grants EXECUTE to, may switch.
CREATE FUNCTION outboxd.set_capture_mode(mode text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    trg record;
    missing text;
BEGIN
    IF mode IS NULL OR mode NOT IN ('origin', 'always') THEN
        RAISE EXCEPTION 'invalid capture mode %: expected ''origin'' or ''always''',
            coalesce(quote_literal(mode), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT string_agg(format('%s on %s', c.trigger_name, c.table_name), ', ')
    INTO missing
    FROM outboxd.capture_triggers() c
    WHERE c.enabled = 'missing';
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'outboxd triggers missing: %', missing
            USING ERRCODE = 'undefined_object',
                  HINT = 'The migrations create them (0002, 0005): recreate the missing ones as '
                         'db/sql/schema.sql defines them.';
    END IF;
    FOR trg IN
        SELECT c.table_name, c.trigger_name, c.enabled,
               CASE mode WHEN 'always' THEN c.always ELSE c.origin END AS target
        FROM outboxd.capture_triggers() c
        ORDER BY c.table_name = 'outboxd.outbox', c.table_name DESC, c.trigger_name
    LOOP
        CONTINUE WHEN trg.enabled = trg.target;
        BEGIN
            EXECUTE format('ALTER TABLE %s %s TRIGGER %I', trg.table_name,
                           CASE trg.target WHEN 'origin' THEN 'ENABLE' WHEN 'always' THEN 'ENABLE ALWAYS'
                                           WHEN 'replica' THEN 'ENABLE REPLICA' ELSE 'DISABLE' END,
                           trg.trigger_name);
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE EXCEPTION 'cannot set trigger % on % to %: %', trg.trigger_name, trg.table_name, trg.target, SQLERRM
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'ALTER TABLE ... ENABLE TRIGGER needs ownership of the table: run this as the '
                             'table''s owner or a superuser, or make that role the owner of outboxd.set_capture_mode.';
        END;
    END LOOP;
    RETURN outboxd.capture_mode();
END;
$$;
REVOKE EXECUTE ON FUNCTION outboxd.set_capture_mode(text) FROM PUBLIC;
