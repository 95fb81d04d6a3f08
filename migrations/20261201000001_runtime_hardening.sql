-- Runtime hardening (issue 13): header reads that no producer can break, attempts that
-- a crash loop cannot reset, completion records for `on_done = "delete"` queues, and
-- idempotency keys that cover a whole batch.

-- An integer header the runtime owns (`free_reads`, `deaths`), read so that no value a
-- producer wrote can fail a statement: anything but a JSON number in 0..=2^31-1 reads
-- as 0. (A cast like `(headers->>'free_reads')::int` on `"x"` fails the whole batched
-- statement it is in, and with it every other job of the batch.) Nested CASEs because
-- PostgreSQL does not promise to evaluate AND from left to right.
CREATE OR REPLACE FUNCTION longshore.header_int(h jsonb, key text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN jsonb_typeof(h -> key) = 'number' THEN
             CASE WHEN (h ->> key)::numeric >= 0 AND (h ->> key)::numeric <= 2147483647
                  THEN floor((h ->> key)::numeric)::integer
                  ELSE 0 END
           ELSE 0 END
$$;

-- The attempt number of a message's latest read: reads minus the reads that spent no
-- attempt (snoozes, releases). A `free_reads` larger than the reads before this one can
-- only be a producer's invention and is capped, so the attempt is at least 1 once read.
CREATE OR REPLACE FUNCTION longshore.attempts(read_ct integer, h jsonb) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT read_ct - least(longshore.header_int(h, 'free_reads'), greatest(read_ct - 1, 0))
$$;

-- Completions on queues whose done messages are deleted (`on_done = "delete"`): a
-- small record, so `GET /v1/jobs/{queue}/{id}` can still answer `done`. Pruned with
-- the archives (the `prune_archives` maintenance task).
CREATE TABLE longshore.completions (
    queue    text        NOT NULL,
    msg_id   bigint      NOT NULL,
    attempts integer     NOT NULL,
    done_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, msg_id)
);
CREATE INDEX completions_done_at_idx ON longshore.completions (done_at);

CREATE TRIGGER longshore_completion_notify AFTER INSERT ON longshore.completions
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION longshore.notify_dead();

-- A batch enqueued under one idempotency key (`POST …/jobs:batch` with an
-- Idempotency-Key, `enqueue_many` with a key) records every id it made, so a retried
-- batch answers the same ids and enqueues nothing. NULL for a single job's key.
ALTER TABLE longshore.idempotency_keys ADD COLUMN msg_ids bigint[];

-- `longshore dlq retry` moves a key to the job it re-sends, found by the old id.
CREATE INDEX idempotency_keys_msg_id_idx ON longshore.idempotency_keys (queue, msg_id);
CREATE INDEX idempotency_keys_msg_ids_idx ON longshore.idempotency_keys USING gin (msg_ids)
    WHERE msg_ids IS NOT NULL;
