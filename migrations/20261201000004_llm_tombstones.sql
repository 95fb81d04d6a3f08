-- Every request_id ever answered, and whose it was (issue 15). prune_llm drops answers
-- after their retention but keeps these rows: a replay of a pruned request is refused
-- (its user gets request_expired, anyone else request_id_conflict) instead of calling
-- a provider again for free.
CREATE TABLE llm_requests (
    request_id  uuid PRIMARY KEY,
    user_id     uuid NOT NULL,
    answered_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO llm_requests (request_id, user_id, answered_at)
SELECT request_id, user_id, created_at FROM llm_answers
ON CONFLICT DO NOTHING;

-- Requests charged whose answers are already gone.
INSERT INTO llm_requests (request_id, user_id, answered_at)
SELECT request_id, user_id, created_at FROM credits_ledger
WHERE reason = 'charge' AND request_id IS NOT NULL
ON CONFLICT DO NOTHING;

-- Whose user an account is (issue 14 review): the principal that first spent from it
-- through the ingress (`token:<name>`). Another principal's llm_call for that user_id
-- is refused (`user_forbidden`), so one tenant cannot spend or read another's credits.
-- NULL: not used through the ingress yet (an operator's grant, a CLI or SQL job).
ALTER TABLE credit_accounts ADD COLUMN owner text;
