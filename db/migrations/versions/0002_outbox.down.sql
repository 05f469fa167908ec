DROP TRIGGER IF EXISTS outboxd_capture_insert ON public.chunks;
DROP TRIGGER IF EXISTS outboxd_capture_update ON public.chunks;
DROP TRIGGER IF EXISTS outboxd_capture_delete ON public.chunks;
DROP TRIGGER IF EXISTS outboxd_capture_truncate ON public.chunks;
DROP TRIGGER IF EXISTS outboxd_capture_document_update ON public.documents;
DROP SCHEMA IF EXISTS outboxd CASCADE;
