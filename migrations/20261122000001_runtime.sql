-- Longshore runtime tables. The queues themselves are pgmq tables (pgmq.q_<kind>,
-- pgmq.a_<kind>), created by `longshore migrate` from the registry of job kinds.
CREATE SCHEMA IF NOT EXISTS longshore;

-- Jobs that can never succeed (Fail, or Retry past max_attempts). Keeps the message,
-- its headers, the attempts spent and the last error so an operator can retry or purge.
CREATE TABLE longshore.dead_letters (
    id          bigserial PRIMARY KEY,
    queue       text        NOT NULL,
    msg_id      bigint      NOT NULL,
    message     jsonb,
    headers     jsonb,
    attempts    integer     NOT NULL,
    last_error  text        NOT NULL,
    enqueued_at timestamptz NOT NULL,
    failed_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (queue, msg_id)
);
CREATE INDEX dead_letters_failed_at_idx ON longshore.dead_letters (failed_at);

-- Idempotency keys: a second enqueue with the same (queue, key) before expires_at
-- returns the first job's id and enqueues nothing. body_hash lets the ingress tell a
-- true repeat from a conflicting reuse of the key.
CREATE TABLE longshore.idempotency_keys (
    queue      text        NOT NULL,
    key        text        NOT NULL,
    msg_id     bigint      NOT NULL,
    body_hash  text,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (queue, key)
);
CREATE INDEX idempotency_keys_expires_at_idx ON longshore.idempotency_keys (expires_at);

-- One NOTIFY per enqueueing statement (not per row), so a 1,000-row batch wakes the
-- fleet once. Works for `pgmq.send` from plain SQL too, since it fires on the table.
CREATE OR REPLACE FUNCTION longshore.notify_enqueue() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('longshore_enqueue', substring(TG_TABLE_NAME from 3));
    RETURN NULL;
END;
$$;

-- Headers as an object whatever a producer sent (SQL NULL, JSON null, a scalar), so the
-- runtime's `headers || {...}` updates never build arrays. Inlined by the planner.
CREATE OR REPLACE FUNCTION longshore.headers(h jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN jsonb_typeof(h) = 'object' THEN h ELSE '{}'::jsonb END
$$;
