DROP TABLE IF EXISTS public.crawl_jobs;
DROP TABLE IF EXISTS public.chunks;
DROP TABLE IF EXISTS public.documents;
DROP TABLE IF EXISTS public.sources;
DROP FUNCTION IF EXISTS public.chunks_search_vector_update();
DROP FUNCTION IF EXISTS public.documents_search_vector_update();
DROP FUNCTION IF EXISTS public.content_sha256(text);
DROP FUNCTION IF EXISTS public.update_updated_at_column();
