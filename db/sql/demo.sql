-- The queries of `outboxd demo` (daemon/demo/narrative.py), which writes a
-- sample corpus into its own embedded PostgreSQL and edits it the way an
-- application would, and of loading the shipped corpus (daemon/corpus). db/demo.py
-- runs them. Loaded with queries.sql by db/queries.py; a name is defined once
-- across both files.

-- demo_document_count --
SELECT count(*) AS n FROM public.documents;

-- demo_corpus_counts --
-- What the corpus step reports: documents, chunks and the events the capture
-- triggers queued for them.
SELECT (SELECT count(*) FROM public.documents) AS documents,
       (SELECT count(*) FROM public.chunks) AS chunks,
       (SELECT count(*) FROM outboxd.outbox WHERE status = 'pending') AS pending;

-- demo_progress --
-- Chunks with text, and those of them with an event still pending (the
-- progress bar counts the difference as converged).
SELECT count(*) FILTER (WHERE c.text ~ '\S') AS chunks,
       count(*) FILTER (WHERE c.text ~ '\S' AND EXISTS (
           SELECT 1 FROM outboxd.outbox o WHERE o.chunk_id = c.id AND o.status = 'pending')) AS pending
FROM public.chunks c;

-- demo_documents --
-- Documents with at least one chunk of text, to choose the ones to edit.
SELECT d.id, d.title, d.url, count(c.id) AS chunks
FROM public.documents d
JOIN public.chunks c ON c.document_id = d.id AND c.text ~ '\S'
GROUP BY d.id
ORDER BY d.title DESC, d.id;

-- demo_chunk_to_edit --
-- The document's chunk at chunk_index (or its first chunk, if it has none there).
SELECT id, chunk_index, text
FROM public.chunks
WHERE document_id = %(document_id)s
ORDER BY chunk_index = %(chunk_index)s DESC, chunk_index
LIMIT 1;

-- demo_set_chunk_text --
UPDATE public.chunks SET text = %(text)s WHERE id = %(id)s;

-- demo_set_document_title --
UPDATE public.documents SET title = %(title)s WHERE id = %(id)s;

-- demo_document_chunks --
SELECT id FROM public.chunks WHERE document_id = %(document_id)s AND text ~ '\S' ORDER BY chunk_index;

-- demo_delete_document --
-- Its chunks go with it (ON DELETE CASCADE), and the triggers capture that.
DELETE FROM public.documents WHERE id = %(id)s;

-- corpus_insert_source --
-- The shipped corpus (daemon/corpus), written in one transaction with its
-- documents and chunks, the way an application writes: the capture triggers
-- enqueue every chunk.
INSERT INTO public.sources (source_type, url, status, metadata)
VALUES (%(source_type)s, %(url)s, 'completed', %(metadata)s)
RETURNING id;

-- corpus_insert_document --
INSERT INTO public.documents (source_id, title, url, document_type, metadata, content_hash, total_chunks, status)
VALUES (%(source_id)s, %(title)s, %(url)s, %(document_type)s, %(metadata)s, public.content_sha256(%(content)s),
        %(total_chunks)s, 'completed')
RETURNING id;

-- corpus_insert_chunk --
INSERT INTO public.chunks (document_id, chunk_index, text, token_count, metadata)
VALUES (%(document_id)s, %(chunk_index)s, %(text)s, %(token_count)s, %(metadata)s)
RETURNING id;
