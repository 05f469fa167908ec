-- Back to 0004: the row-level capture path and the capture-mode functions gone,
-- and the six 0002 triggers plain ENABLE (origin) triggers again, whatever
-- state they were left in. Done by name rather than by set_capture_mode('origin'),
-- so it works where that would refuse (a row trigger already dropped).
DROP TRIGGER IF EXISTS outboxd_capture_row_insert ON public.chunks;
DROP TRIGGER IF EXISTS outboxd_capture_row_update ON public.chunks;
DROP TRIGGER IF EXISTS outboxd_capture_row_delete ON public.chunks;
DROP TRIGGER IF EXISTS outboxd_capture_row_document_update ON public.documents;
DROP FUNCTION IF EXISTS outboxd.capture_chunk_insert_row();
DROP FUNCTION IF EXISTS outboxd.capture_chunk_update_row();
DROP FUNCTION IF EXISTS outboxd.capture_chunk_delete_row();
DROP FUNCTION IF EXISTS outboxd.capture_document_update_row();
ALTER TABLE public.documents ENABLE TRIGGER outboxd_capture_document_update;
ALTER TABLE public.chunks ENABLE TRIGGER outboxd_capture_insert;
ALTER TABLE public.chunks ENABLE TRIGGER outboxd_capture_update;
ALTER TABLE public.chunks ENABLE TRIGGER outboxd_capture_delete;
ALTER TABLE public.chunks ENABLE TRIGGER outboxd_capture_truncate;
ALTER TABLE outboxd.outbox ENABLE TRIGGER outboxd_notify;
DROP FUNCTION IF EXISTS outboxd.set_capture_mode(text);
DROP FUNCTION IF EXISTS outboxd.capture_mode();
DROP FUNCTION IF EXISTS outboxd.capture_triggers();
