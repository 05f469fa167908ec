-- Every query the daemon runs, by name. db/queries.py loads this file; a line
-- "-- name --" starts a query. Parameters are psycopg %(named)s placeholders.

-- claim_batch --
-- Take up to batch_size pending events nobody holds (or whose lease ran out),
-- oldest first, lease them to this worker, and read the current state of their
-- chunks, in one short statement (one round trip per batch). The state is read
-- after the events committed (same snapshot), and the acknowledgement verifies
-- it again, so a change made meanwhile is never lost. No state: the chunk is gone.
-- The chunk's version comes from the same snapshot, so it is its state's.
WITH picked AS (
    SELECT id
    FROM outboxd.outbox
    WHERE status = 'pending'
      AND available_at <= now()
      AND (locked_until IS NULL OR locked_until < now())
    ORDER BY id
    LIMIT %(batch_size)s
    FOR UPDATE SKIP LOCKED
),
claimed AS (
    UPDATE outboxd.outbox o
    SET locked_by = %(worker)s,
        locked_until = now() + make_interval(secs => %(lease_seconds)s)
    FROM picked
    WHERE o.id = picked.id
    RETURNING o.id, o.chunk_id, o.op, o.attempts, o.created_at
),
numbered AS (
    SELECT claimed.*, row_number() OVER (PARTITION BY chunk_id ORDER BY id) AS nth
    FROM claimed
)
-- A chunk's state once, on its first event: a chunk edited several times has
-- several events in a claim, and its text need not cross the wire for each.
SELECT c.id, c.chunk_id, c.op, c.attempts, c.created_at, c.nth, v.version,
       s.document_id, s.source_id, s.chunk_index, s.text, s.token_count, s.content_hash,
       s.metadata, s.title, s.url, s.document_type, s.state_hash
FROM numbered c
LEFT JOIN outboxd.chunk_state s ON s.chunk_id = c.chunk_id AND c.nth = 1
LEFT JOIN outboxd.chunk_versions v ON v.chunk_id = c.chunk_id AND c.nth = 1;

-- renew_lease --
-- Keeps a long batch (slow embedding) from being re-claimed by another worker.
UPDATE outboxd.outbox
SET locked_until = now() + make_interval(secs => %(lease_seconds)s)
WHERE id = ANY(%(event_ids)s) AND locked_by = %(worker)s;

-- chunk_states --
-- A row per chunk asked for: its state (all NULL where it is gone) and its
-- version, read in one snapshot.
SELECT c.chunk_id, v.version, s.document_id, s.source_id, s.chunk_index, s.text, s.token_count,
       s.content_hash, s.metadata, s.title, s.url, s.document_type, s.state_hash
FROM unnest(%(chunk_ids)s::uuid[]) AS c(chunk_id)
LEFT JOIN outboxd.chunk_state s ON s.chunk_id = c.chunk_id
LEFT JOIN outboxd.chunk_versions v ON v.chunk_id = c.chunk_id;

-- ack_verified --
-- Acknowledge only where the chunk still has the state that was written to
-- Qdrant (state_hash NULL = the chunk is gone). Every event of such a chunk that
-- this snapshot sees is reflected in that state, so this worker's claims and the
-- unclaimed ones go; claims another worker holds stay, because its write may
-- still land after ours and must be checked by its own ack.
-- Where the chunk changed since it was read (a racing worker, a new write), the
-- claims are released to be applied again; if they are gone (a lease ran out and
-- someone acknowledged them), a fresh event takes their place: a write that may
-- be stale is never left without an event that will correct it.
-- Nothing is acknowledged for a collection the catalog no longer calls live
-- (a reindex retired it): its claims are released for the new model's daemon.
-- A gone chunk whose last events go here has its version forgotten: should its
-- id ever come back, its first event draws a version above every earlier one.
WITH live AS (
    SELECT %(collection)s::text IS NULL OR EXISTS (
        SELECT 1 FROM outboxd.collections WHERE name = %(collection)s AND status = 'live'
    ) AS ok
),
written AS (
    SELECT * FROM unnest(%(chunk_ids)s::uuid[], %(state_hashes)s::text[]) AS w(chunk_id, state_hash)
),
verified AS (
    SELECT w.chunk_id
    FROM written w
    LEFT JOIN outboxd.chunk_state s ON s.chunk_id = w.chunk_id
    WHERE (SELECT ok FROM live)
      AND s.state_hash IS NOT DISTINCT FROM w.state_hash
),
acked AS (
    DELETE FROM outboxd.outbox o
    USING verified v
    WHERE o.chunk_id = v.chunk_id
      AND ((o.locked_by = %(worker)s AND o.id = ANY(%(event_ids)s))
           OR o.locked_until IS NULL
           OR o.locked_until < now())
    RETURNING o.id
),
forgotten AS (
    DELETE FROM outboxd.chunk_versions cv
    USING written w, verified v
    WHERE cv.chunk_id = w.chunk_id AND v.chunk_id = w.chunk_id AND w.state_hash IS NULL
      AND NOT EXISTS (SELECT 1 FROM outboxd.outbox o
                      WHERE o.chunk_id = w.chunk_id AND o.id NOT IN (SELECT id FROM acked))
),
released AS (
    UPDATE outboxd.outbox o
    SET locked_by = NULL, locked_until = NULL
    WHERE o.id = ANY(%(event_ids)s)
      AND o.locked_by = %(worker)s
      AND o.chunk_id NOT IN (SELECT chunk_id FROM verified)
    RETURNING o.chunk_id
),
requeued AS (
    INSERT INTO outboxd.outbox (chunk_id, op)
    SELECT w.chunk_id, 'update'
    FROM written w
    WHERE (SELECT ok FROM live)
      AND w.chunk_id NOT IN (SELECT chunk_id FROM verified)
      AND w.chunk_id NOT IN (SELECT chunk_id FROM released)
    RETURNING id
)
SELECT (SELECT count(*) FROM acked) AS acked,
       (SELECT count(*) FROM released) + (SELECT count(*) FROM requeued) AS released,
       (SELECT ok FROM live) AS live;

-- fail_events --
-- Count a failed attempt: back off exponentially with jitter, or park the event
-- as a dead letter once it has used max_attempts. The curve is the Python policy's
-- (daemon.runtime.backoff.Backoff.window, sql_params): capped base * factor^attempts,
-- of which the jitter share is drawn at random.
UPDATE outboxd.outbox
SET attempts = attempts + 1,
    status = CASE WHEN attempts + 1 >= %(max_attempts)s THEN 'dead' ELSE 'pending' END,
    available_at = now() + make_interval(secs => least(
        %(backoff_max)s::float8,
        %(backoff_base)s::float8 * power(%(backoff_factor)s::float8, least(attempts, 64)))
        * (1 - %(backoff_jitter)s::float8 * random())),
    last_error = %(error)s,
    first_failed_at = coalesce(first_failed_at, now()),
    last_failed_at = now(),
    locked_by = NULL,
    locked_until = NULL
WHERE id = ANY(%(event_ids)s) AND locked_by = %(worker)s
RETURNING id, chunk_id, status, attempts;

-- release_events --
-- Give claims back untouched (shutdown, or an outage that is not the events' fault).
UPDATE outboxd.outbox
SET locked_by = NULL, locked_until = NULL
WHERE id = ANY(%(event_ids)s) AND locked_by = %(worker)s;

-- ping --
-- One round trip: the pool's connection works (readiness, start-up).
SELECT 1 AS ok;

-- schema_revision --
-- The revision outboxd's Alembic recorded (db.migrate.VERSION_TABLE, on the
-- search_path as Alembic finds it); no table: never migrated.
SELECT version_num FROM outboxd_alembic_version;

-- pending_summary --
-- What --drain waits for: pending events (dead letters aside) and when the next
-- one becomes claimable.
SELECT count(*) AS pending,
       min(greatest(available_at, coalesce(locked_until, available_at))) AS next_at,
       now() AS db_now
FROM outboxd.outbox
WHERE status = 'pending';

-- dead_letters --
SELECT id, chunk_id, op, attempts, last_error, first_failed_at, last_failed_at, created_at
FROM outboxd.outbox
WHERE status = 'dead'
ORDER BY id;

-- retry_dead_letters --
-- Back to pending, attempts reset. The selection is explicit: every dead letter
-- (all), these ids (event_ids), or those whose last_error matches error_pattern
-- (a case-insensitive substring: ILIKE, whose wildcards still work).
UPDATE outboxd.outbox
SET status = 'pending', attempts = 0, available_at = now(), last_error = NULL,
    first_failed_at = NULL, last_failed_at = NULL, locked_by = NULL, locked_until = NULL
WHERE status = 'dead'
  AND (%(all)s::boolean
       OR id = ANY(%(event_ids)s::bigint[])
       OR last_error ILIKE '%%' || %(error_pattern)s::text || '%%')
RETURNING id;

-- select_dead_letters --
-- The dead letters a purge would delete (same selection as retry_dead_letters),
-- so the operator confirms a count and exactly those rows go.
SELECT id
FROM outboxd.outbox
WHERE status = 'dead'
  AND (%(all)s::boolean
       OR id = ANY(%(event_ids)s::bigint[])
       OR last_error ILIKE '%%' || %(error_pattern)s::text || '%%')
ORDER BY id;

-- purge_dead_letters --
-- Delete the confirmed dead letters; one retried or healed meanwhile is no
-- longer dead and stays.
DELETE FROM outboxd.outbox
WHERE status = 'dead' AND id = ANY(%(event_ids)s::bigint[])
RETURNING id;

-- status_outbox --
-- The outbox at a glance, measured by the database clock. backlog = pending
-- events (dead letters aside); lag = age of the oldest of them; in_flight =
-- leased right now; backing_off = waiting for a retry delay; expired_leases =
-- claims whose lease ran out unreleased (a worker died or stalled).
SELECT count(*) FILTER (WHERE status = 'pending') AS backlog,
       count(*) FILTER (WHERE status = 'pending' AND available_at <= now()
                          AND (locked_until IS NULL OR locked_until <= now())) AS ready,
       count(*) FILTER (WHERE status = 'pending' AND locked_until > now()) AS in_flight,
       count(*) FILTER (WHERE status = 'pending' AND available_at > now()) AS backing_off,
       count(*) FILTER (WHERE status = 'pending' AND locked_until <= now()) AS expired_leases,
       count(*) FILTER (WHERE status = 'pending' AND attempts > 0) AS failed_before,
       count(*) FILTER (WHERE status = 'dead') AS dead_letters,
       min(created_at) FILTER (WHERE status = 'pending') AS oldest_pending_at,
       coalesce(extract(epoch FROM now() - min(created_at) FILTER (WHERE status = 'pending')), 0)::float8
           AS lag_seconds,
       now() AS db_now
FROM outboxd.outbox;

-- status_leases --
-- Live leases by worker: how many events each holds and when its leases end
-- (a worker renews them while a batch is slow).
SELECT locked_by AS worker,
       count(*) AS events,
       extract(epoch FROM min(locked_until) - now())::float8 AS expires_in_seconds,
       extract(epoch FROM max(locked_until) - now())::float8 AS last_expires_in_seconds
FROM outboxd.outbox
WHERE status = 'pending' AND locked_until > now()
GROUP BY locked_by
ORDER BY locked_by;

-- status_processes --
-- outboxd processes connected to this database now, by worker name: each names
-- its connections outboxd:<worker name> (its LISTEN connection adds :listen; the
-- CLI's are outboxd:cli). application_name is visible to every role.
SELECT substr(application_name, 9) AS worker, count(*) AS connections
FROM pg_stat_activity
WHERE datname = current_database()
  AND application_name LIKE 'outboxd:%%'
  AND application_name NOT LIKE '%%:listen'
  AND application_name NOT IN ('outboxd:cli', 'outboxd:demo')
GROUP BY 1
ORDER BY 1;

-- live_collection --
SELECT name, alias, model_name, dimension, normalized, max_seq_length, fingerprint_id, status, created_at, updated_at, variant, qdrant_uid, qdrant_location
FROM outboxd.collections
WHERE alias = %(alias)s AND status = 'live';

-- register_live_collection --
-- First writer for an alias records its collection as live; a concurrent
-- starter loses on the one-live-per-alias index and reads the winner instead.
INSERT INTO outboxd.collections (name, alias, model_name, dimension, normalized, max_seq_length, fingerprint_id, status, variant, qdrant_uid, qdrant_location)
VALUES (%(name)s, %(alias)s, %(model_name)s, %(dimension)s, %(normalized)s, %(max_seq_length)s, %(fingerprint_id)s, 'live', %(variant)s, %(qdrant_uid)s, %(qdrant_location)s)
ON CONFLICT DO NOTHING;

-- upsert_collection --
INSERT INTO outboxd.collections (name, alias, model_name, dimension, normalized, max_seq_length, fingerprint_id, status, variant, qdrant_uid, qdrant_location)
VALUES (%(name)s, %(alias)s, %(model_name)s, %(dimension)s, %(normalized)s, %(max_seq_length)s, %(fingerprint_id)s, %(status)s, %(variant)s, %(qdrant_uid)s, %(qdrant_location)s)
ON CONFLICT (name) DO UPDATE SET status = EXCLUDED.status, variant = EXCLUDED.variant,
    qdrant_uid = EXCLUDED.qdrant_uid, qdrant_location = EXCLUDED.qdrant_location, updated_at = now()
RETURNING name, alias, model_name, dimension, normalized, max_seq_length, fingerprint_id, status, created_at, updated_at, variant, qdrant_uid, qdrant_location;

-- list_collections --
SELECT name, alias, model_name, dimension, normalized, max_seq_length, fingerprint_id, status, created_at, updated_at, variant, qdrant_uid, qdrant_location
FROM outboxd.collections
WHERE %(alias)s::text IS NULL OR alias = %(alias)s
ORDER BY alias, created_at;

-- retire_live_collection --
-- With make_live_collection, in one transaction: the alias never has two live
-- collections (the unique index checks each row at once, so retire first).
UPDATE outboxd.collections
SET status = 'retired', updated_at = now()
WHERE alias = %(alias)s AND status = 'live'
RETURNING name;

-- make_live_collection --
UPDATE outboxd.collections
SET status = 'live', updated_at = now()
WHERE name = %(name)s AND alias = %(alias)s
RETURNING name;

-- record_collection_home --
-- The Qdrant a collection lives in: its id there (written into its metadata) and
-- where it was seen. A row without an id (older than the id, or a collection made
-- by hand) takes the first one offered, so daemons adopting it at once agree on
-- one; a recreated collection replaces it.
UPDATE outboxd.collections
SET qdrant_uid = CASE WHEN %(replace)s THEN %(qdrant_uid)s ELSE coalesce(qdrant_uid, %(qdrant_uid)s) END,
    qdrant_location = %(qdrant_location)s, updated_at = now()
WHERE name = %(name)s
RETURNING qdrant_uid;

-- delete_collection_record --
DELETE FROM outboxd.collections WHERE name = %(name)s AND status = 'retired' RETURNING name;

-- reconcile_chunks --
-- One keyset page of chunk states in id order (the order Qdrant scrolls points in).
-- The key is a range the index can seek to (>=, then the one equal id left out),
-- never "after IS NULL OR id > after": a prepared statement's generic plan cannot
-- seek on that, and scans from the lowest id for every page.
SELECT chunk_id, document_id, source_id, chunk_index, text, token_count, content_hash,
       metadata, title, url, document_type, state_hash
FROM outboxd.chunk_state
WHERE chunk_id >= coalesce(%(after)s::uuid, '00000000-0000-0000-0000-000000000000')
  AND chunk_id IS DISTINCT FROM %(after)s::uuid
  AND (%(source_id)s::uuid IS NULL OR source_id = %(source_id)s::uuid)
  AND (%(document_id)s::uuid IS NULL OR document_id = %(document_id)s::uuid)
ORDER BY chunk_id
LIMIT %(limit)s;

-- count_chunks --
SELECT count(*) AS n
FROM public.chunks c
JOIN public.documents d ON d.id = c.document_id
WHERE (%(source_id)s::uuid IS NULL OR d.source_id = %(source_id)s::uuid)
  AND (%(document_id)s::uuid IS NULL OR c.document_id = %(document_id)s::uuid);

-- pending_chunks --
-- Which of these chunks have an event waiting: their drift is in flight, not lost.
SELECT DISTINCT chunk_id FROM outboxd.outbox
WHERE chunk_id = ANY(%(chunk_ids)s) AND status = 'pending';

-- enqueue_chunks --
-- Repair goes through the normal path: an event per chunk, applied by the daemon.
-- Given a collection (the verifier's), only while the catalog still calls it live,
-- the question ack_verified asks: a retired collection's drift is no one's to repair.
INSERT INTO outboxd.outbox (chunk_id, op)
SELECT id, 'update' FROM unnest(%(chunk_ids)s::uuid[]) AS ids(id)
WHERE %(collection)s::text IS NULL OR EXISTS (
    SELECT 1 FROM outboxd.collections WHERE name = %(collection)s AND status = 'live'
)
RETURNING id;

-- scan_progress --
SELECT job, last_chunk_id, done, completed_at, started_at, updated_at
FROM outboxd.scan_progress WHERE job = %(job)s;

-- scan_progress_reset --
DELETE FROM outboxd.scan_progress WHERE job = %(job)s;

-- scan_progress_save --
INSERT INTO outboxd.scan_progress (job, last_chunk_id, done)
VALUES (%(job)s, %(last_chunk_id)s, %(done)s)
ON CONFLICT (job) DO UPDATE
SET last_chunk_id = EXCLUDED.last_chunk_id,
    done = outboxd.scan_progress.done + EXCLUDED.done,
    updated_at = now();

-- scan_progress_complete --
INSERT INTO outboxd.scan_progress (job, completed_at) VALUES (%(job)s, now())
ON CONFLICT (job) DO UPDATE SET completed_at = now(), updated_at = now();

-- backfill_page --
-- One page of existing chunks after the checkpoint: enqueue those without a
-- pending event, and move the checkpoint, in one statement (so a crash between
-- pages neither loses nor repeats a page).
WITH page AS (
    SELECT c.id
    FROM public.chunks c
    JOIN public.documents d ON d.id = c.document_id
    WHERE c.id >= coalesce(%(after)s::uuid, '00000000-0000-0000-0000-000000000000')  -- a seekable key (reconcile_chunks)
      AND c.id IS DISTINCT FROM %(after)s::uuid
      AND (%(source_id)s::uuid IS NULL OR d.source_id = %(source_id)s::uuid)
      AND (%(document_id)s::uuid IS NULL OR c.document_id = %(document_id)s::uuid)
    ORDER BY c.id
    LIMIT %(limit)s
),
last AS (
    SELECT id FROM page ORDER BY id DESC LIMIT 1
),
enqueued AS (
    INSERT INTO outboxd.outbox (chunk_id, op)
    SELECT p.id, 'update'
    FROM page p
    WHERE NOT EXISTS (
        SELECT 1 FROM outboxd.outbox o WHERE o.chunk_id = p.id AND o.status = 'pending'
    )
    RETURNING chunk_id
),
checkpoint AS (
    INSERT INTO outboxd.scan_progress (job, last_chunk_id, done)
    SELECT %(job)s, (SELECT id FROM last), (SELECT count(*) FROM page)
    WHERE EXISTS (SELECT 1 FROM page)
    ON CONFLICT (job) DO UPDATE
    SET last_chunk_id = EXCLUDED.last_chunk_id,
        done = outboxd.scan_progress.done + EXCLUDED.done,
        updated_at = now()
)
SELECT (SELECT count(*) FROM page) AS scanned,
       (SELECT id FROM last) AS last_id,
       (SELECT count(*) FROM enqueued) AS enqueued;

-- search_keyword --
-- Hybrid search, keyword side: the best full-text matches of the query
-- (websearch syntax: quoted phrases, or, -exclusion; other words all required)
-- among the chunks that pass the filters. A NULL filter is no filter; metadata
-- matches by containment (every given key has the given value).
SELECT c.id AS chunk_id,
       ts_rank(c.search_vector, websearch_to_tsquery('english', %(query)s)) AS rank
FROM public.chunks c
JOIN public.documents d ON d.id = c.document_id
WHERE c.search_vector @@ websearch_to_tsquery('english', %(query)s)
  AND (%(source_id)s::uuid IS NULL OR d.source_id = %(source_id)s::uuid)
  AND (%(document_id)s::uuid IS NULL OR c.document_id = %(document_id)s::uuid)
  AND (%(document_type)s::text IS NULL OR d.document_type = %(document_type)s::text)
  AND (%(metadata)s::jsonb IS NULL OR c.metadata @> %(metadata)s::jsonb)
ORDER BY rank DESC, c.id
LIMIT %(limit)s;

-- search_hits --
-- Hybrid search, the last word: what PostgreSQL holds now for the fused
-- candidates. A chunk deleted since Qdrant indexed it, emptied, or no longer
-- passing the filters is not returned, and the text is the current one.
SELECT c.id AS chunk_id, c.document_id, d.source_id, d.title, d.url, d.document_type,
       c.chunk_index, c.text
FROM public.chunks c
JOIN public.documents d ON d.id = c.document_id
WHERE c.id = ANY(%(chunk_ids)s::uuid[])
  AND c.text ~ '[^[:space:]]'
  AND (%(source_id)s::uuid IS NULL OR d.source_id = %(source_id)s::uuid)
  AND (%(document_id)s::uuid IS NULL OR c.document_id = %(document_id)s::uuid)
  AND (%(document_type)s::text IS NULL OR d.document_type = %(document_type)s::text)
  AND (%(metadata)s::jsonb IS NULL OR c.metadata @> %(metadata)s::jsonb);

-- relay_versions --
-- A version for a chunk the relay is about to publish that has none in
-- outboxd.chunk_versions (every chunk with an event has one since 0011), drawn
-- after its state was read: a later read always gets a higher version (see 0004).
SELECT c.chunk_id, nextval('outboxd.event_version') AS version
FROM unnest(%(chunk_ids)s::uuid[]) AS c(chunk_id);

-- embedding_budget_open --
-- The endpoint's shared budget, made full on first use (daemon.outbox.shared_budget).
INSERT INTO outboxd.embedding_budget (endpoint, requests, tokens)
VALUES (%(endpoint)s, coalesce(%(request_capacity)s::float8, 0), coalesce(%(token_capacity)s::float8, 0))
ON CONFLICT (endpoint) DO NOTHING;

-- embedding_budget_take --
-- One request's turn from the endpoint's shared bucket, in one statement whose
-- row lock ends with it (never across a request): refill both counts by the
-- time elapsed, up to their capacity; then, when the bucket covers one request
-- and its tokens now or within horizon seconds, take them (a count below zero is
-- a turn reserved ahead; wait_seconds: until the turn), else take nothing and
-- say when to ask again (half a horizon before the turn); now: the clock it took
-- at; turn: when the turn is (what embedding_budget_release is given back). A
-- pause (a 429's Retry-After) holds every turn back until it ends: the bucket's
-- time (updated_at) stands at its end meanwhile. A NULL rate is no limit. A
-- cost over the capacity goes when the bucket is full and leaves it in debt.
-- The arithmetic is daemon.embedding.token_bucket.Bucket.take's, on the server's clock
-- (the same for every daemon; greatest(): never behind the last update).
WITH locked AS (
    SELECT endpoint, requests, tokens, updated_at, paused_until, clock_timestamp() AS now
    FROM outboxd.embedding_budget
    WHERE endpoint = %(endpoint)s
    FOR UPDATE
),
timed AS (
    SELECT l.*, greatest(l.now, l.updated_at) AS at FROM locked l
),
refilled AS (
    SELECT endpoint, now, at,
           CASE WHEN %(request_rate)s::float8 IS NULL THEN requests
                ELSE least(%(request_capacity)s::float8,
                           requests + %(request_rate)s::float8 * extract(epoch FROM at - updated_at)::float8) END
               AS requests,
           CASE WHEN %(token_rate)s::float8 IS NULL THEN tokens
                ELSE least(%(token_capacity)s::float8,
                           tokens + %(token_rate)s::float8 * extract(epoch FROM at - updated_at)::float8) END
               AS tokens,
           extract(epoch FROM at - now)::float8 AS ahead,
           coalesce(paused_until > now, false) AS paused
    FROM timed
),
needed AS (
    SELECT r.*,
           greatest(coalesce(greatest(0, least(1, %(request_capacity)s::float8) - r.requests)
                             / %(request_rate)s::float8, 0),
                    coalesce(greatest(0, least(%(tokens)s::float8, %(token_capacity)s::float8) - r.tokens)
                             / %(token_rate)s::float8, 0)) AS need
    FROM refilled r
),
decided AS (
    SELECT n.*, n.ahead + n.need AS wait FROM needed n
)
UPDATE outboxd.embedding_budget b
SET requests = d.requests - CASE WHEN d.wait <= %(horizon)s::float8 AND %(request_rate)s::float8 IS NOT NULL
                                 THEN 1 ELSE 0 END,
    tokens = d.tokens - CASE WHEN d.wait <= %(horizon)s::float8 AND %(token_rate)s::float8 IS NOT NULL
                             THEN %(tokens)s::float8 ELSE 0 END,
    updated_at = d.at,
    granted = b.granted + (d.wait <= %(horizon)s::float8)::int
FROM decided d
WHERE b.endpoint = d.endpoint
RETURNING d.wait <= %(horizon)s::float8 AS taken,
          CASE WHEN d.wait <= %(horizon)s::float8 THEN d.wait ELSE d.wait - %(horizon)s::float8 / 2 END
              AS wait_seconds,
          d.paused AND d.ahead >= d.need AS paused,
          d.now,
          d.at + make_interval(secs => d.need) AS turn;

-- embedding_budget_pause --
-- A daemon was answered 429: count it, and with a Retry-After hold every
-- daemon's turns back until then (a shorter pause never shortens the one in
-- force). The bucket keeps what it held when the pause began (refilled to now)
-- and gains nothing while it lasts: its time moves to the pause's end, so the
-- turns after it are spaced at the rate (Bucket.pause). now: the clock it paused at.
WITH clock AS (SELECT clock_timestamp() AS now),
paused AS (
    SELECT b.endpoint, c.now,
           greatest(b.paused_until, c.now + make_interval(secs => %(seconds)s::float8)) AS paused_until,
           extract(epoch FROM greatest(c.now, b.updated_at) - b.updated_at)::float8 AS elapsed
    FROM outboxd.embedding_budget b, clock c
    WHERE b.endpoint = %(endpoint)s
    FOR UPDATE OF b
)
UPDATE outboxd.embedding_budget b
SET requests = CASE WHEN %(request_rate)s::float8 IS NULL THEN b.requests
                    ELSE least(%(request_capacity)s::float8, b.requests + %(request_rate)s::float8 * p.elapsed) END,
    tokens = CASE WHEN %(token_rate)s::float8 IS NULL THEN b.tokens
                  ELSE least(%(token_capacity)s::float8, b.tokens + %(token_rate)s::float8 * p.elapsed) END,
    updated_at = greatest(b.updated_at, p.now, p.paused_until),
    paused_until = p.paused_until,
    rate_limited = b.rate_limited + 1
FROM paused p
WHERE b.endpoint = p.endpoint
RETURNING p.now;

-- embedding_budget_release --
-- A turn reserved ahead whose time has come (`turn`, as embedding_budget_take
-- returned it): when a pause began meanwhile and covers it, give it back (its
-- request and tokens, up to the capacity; no longer counted as granted), to be
-- taken again after the pause, spaced from the others. No row: the turn stands.
UPDATE outboxd.embedding_budget
SET requests = CASE WHEN %(request_rate)s::float8 IS NULL THEN requests
                    ELSE least(%(request_capacity)s::float8, requests + 1) END,
    tokens = CASE WHEN %(token_rate)s::float8 IS NULL THEN tokens
                  ELSE least(%(token_capacity)s::float8, tokens + %(tokens)s::float8) END,
    granted = granted - 1
WHERE endpoint = %(endpoint)s AND paused_until > %(turn)s
RETURNING true AS released;

-- embedding_budget_settle --
-- The endpoint counted `tokens` more tokens than were taken for a request
-- (fewer, when negative: given back, up to the capacity).
UPDATE outboxd.embedding_budget
SET tokens = least(%(token_capacity)s::float8, tokens - %(tokens)s::float8)
WHERE endpoint = %(endpoint)s;

-- backlog --
-- What the daemon reports every few seconds (metrics, systemd STATUS=): pending
-- events (dead letters aside) and the age of the oldest, by the database clock.
SELECT count(*) AS pending,
       extract(epoch FROM now() - min(created_at))::float8 AS oldest_age_seconds
FROM outboxd.outbox
WHERE status = 'pending';

-- capture_mode --
-- Which sessions chunk changes are captured in (see db/capture.py): origin,
-- always, mixed or disabled, and the outboxd triggers behind that word, one row
-- each: its level, its state now and its state in each mode (any role may read this).
SELECT outboxd.capture_mode() AS mode,
       coalesce(jsonb_agg(jsonb_build_object('table', t.table_name, 'trigger', t.trigger_name, 'level', t.level,
                                             'enabled', t.enabled, 'origin', t.origin, 'always', t.always)
                          ORDER BY t.table_name, t.trigger_name), '[]'::jsonb) AS triggers
FROM outboxd.capture_triggers() t;

-- set_capture_mode --
-- Every outboxd trigger to its state in mode 'always' or 'origin'; returns the
-- resulting mode. Needs EXECUTE on outboxd.set_capture_mode, which only its
-- owner (the migrating role) has unless granted: not the worker.
SELECT outboxd.set_capture_mode(%(mode)s) AS mode;

-- verify_lease --
-- Take or renew the continuous verifier's lease of a collection, in one statement:
-- taken where this worker holds it already or the holder's lease ran out (it died,
-- stalled or stopped). The row comes back either way, held saying whether this
-- worker holds it now, so every daemon reports the same pass (metrics, status).
WITH taken AS (
    INSERT INTO outboxd.verifier AS v (collection, holder, lease_until)
    VALUES (%(collection)s, %(worker)s, now() + make_interval(secs => %(lease_seconds)s))
    ON CONFLICT (collection) DO UPDATE
    SET holder = EXCLUDED.holder, lease_until = EXCLUDED.lease_until, updated_at = now()
    WHERE v.holder = EXCLUDED.holder OR v.lease_until <= now()
    RETURNING v.*
)
SELECT t.*, true AS held, now() AS db_now FROM taken t
UNION ALL
SELECT v.*, false AS held, now() AS db_now
FROM outboxd.verifier v
WHERE v.collection = %(collection)s AND NOT EXISTS (SELECT 1 FROM taken);

-- verify_checkpoint --
-- The holder records a range it checked: the checkpoint moves to the range's last
-- id, with what the pass has checked and found so far, and the lease is renewed.
-- No row: another daemon took the lease over, and this one stops verifying.
UPDATE outboxd.verifier
SET after_id = %(after)s, pass_checked = %(checked)s, pass_drift = %(drift)s::jsonb,
    lease_until = now() + make_interval(secs => %(lease_seconds)s), updated_at = now()
WHERE collection = %(collection)s AND holder = %(worker)s
RETURNING *, true AS held, now() AS db_now;

-- verify_pass_complete --
-- The holder reached the highest id: the pass is recorded (when, how long, what it
-- checked and found) and the next one starts at the lowest id.
UPDATE outboxd.verifier
SET after_id = NULL, passes = passes + 1, last_pass_completed_at = now(),
    last_pass_seconds = extract(epoch FROM now() - pass_started_at)::float8,
    last_pass_checked = %(checked)s, last_pass_drift = %(drift)s::jsonb,
    pass_started_at = now(), pass_checked = 0, pass_drift = '{}'::jsonb,
    lease_until = now() + make_interval(secs => %(lease_seconds)s), updated_at = now()
WHERE collection = %(collection)s AND holder = %(worker)s
RETURNING *, true AS held, now() AS db_now;

-- verify_release --
-- A holder that stops hands the lease on at once: another daemon need not wait for it to run out.
UPDATE outboxd.verifier
SET lease_until = now(), updated_at = now()
WHERE collection = %(collection)s AND holder = %(worker)s AND lease_until > now();

-- verify_status --
-- The verifier of a collection as `outboxd status` shows it (lease_live: its holder's
-- lease has not run out).
SELECT collection, holder, lease_until, lease_until > now() AS lease_live,
       extract(epoch FROM lease_until - now())::float8 AS lease_expires_in_seconds,
       after_id, pass_started_at, pass_checked, pass_drift, passes, last_pass_completed_at,
       last_pass_seconds, last_pass_checked, last_pass_drift, updated_at, now() AS db_now
FROM outboxd.verifier
WHERE collection = %(collection)s;
