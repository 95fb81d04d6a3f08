-- LLM calls (../shared/SPEC-CHAT.md): every provider attempt, and the answer of each
-- request, stored before the charge so that a retried job never calls a provider again
-- for an answer it already has.

-- Every provider attempt, failed ones included. Written outside the job's transaction,
-- so attempts of a run that is later retried are kept.
CREATE TABLE llm_attempts (
    id            bigserial PRIMARY KEY,
    request_id    uuid NOT NULL,
    job_id        bigint NOT NULL,
    provider      text NOT NULL,
    model         text NOT NULL,
    status        text NOT NULL CHECK (status IN (
                      'ok',            -- answered
                      'rate_limited',  -- 429
                      'server_error',  -- 5xx
                      'timeout',       -- no first token in time (incl. accepted, then silent)
                      'stalled',       -- the stream stopped between tokens
                      'malformed',     -- an answer that is not the wire format
                      'unavailable',   -- connection refused/reset, TLS, DNS
                      'refused',       -- a 4xx that is the provider's setup (401/403/404…)
                      'rejected'       -- a 4xx that is the request's fault (400/413/422): no fallback
                  )),
    http_status   integer,
    input_tokens  integer,
    output_tokens integer,
    latency_ms    integer NOT NULL CHECK (latency_ms >= 0),
    error         text,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX llm_attempts_request ON llm_attempts (request_id);
CREATE INDEX llm_attempts_created ON llm_attempts (created_at);

-- The answer of a request, stored as soon as a provider answered (before the charge).
CREATE TABLE llm_answers (
    request_id    uuid PRIMARY KEY,
    user_id       uuid NOT NULL,
    provider      text NOT NULL,
    model         text NOT NULL,
    content       text NOT NULL,
    input_tokens  integer NOT NULL CHECK (input_tokens >= 0),
    output_tokens integer NOT NULL CHECK (output_tokens >= 0),
    -- The provider did not report usage: the token counts are estimates.
    usage_estimated boolean NOT NULL DEFAULT false,
    finish_reason text,
    attempt_id    bigint REFERENCES llm_attempts ON DELETE SET NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX llm_answers_created ON llm_answers (created_at);
