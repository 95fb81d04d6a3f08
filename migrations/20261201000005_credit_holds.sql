-- Credits held for llm_calls in flight (issue 15 item 12). The pre-check holds the
-- call's worst case under the account's lock, so parallel calls cannot all pass on the
-- same balance; the charge (at the actual cost, which may not take what other calls
-- hold) replaces the hold in the job's completion transaction, and a call that ends
-- without an answer releases it. A hold older than chat.credits.hold_ttl (a job that
-- died holding it) no longer counts and is deleted at the user's next pre-check.
CREATE TABLE credit_holds (
    request_id uuid PRIMARY KEY,
    user_id    uuid NOT NULL REFERENCES credit_accounts,
    credits    integer NOT NULL CHECK (credits > 0),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX credit_holds_user ON credit_holds (user_id, created_at);
