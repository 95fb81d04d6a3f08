-- Chat credits (../shared/SPEC-CHAT.md). The ledger is the truth: balance = Σ delta.
-- An account row exists per user so concurrent charges can be serialised on it (FOR
-- UPDATE) and carries the user's tier.

CREATE TABLE credit_accounts (
    user_id    uuid PRIMARY KEY,
    tier       text NOT NULL DEFAULT 'free' CHECK (tier IN ('free', 'pro', 'enterprise')),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE credits_ledger (
    id         bigserial PRIMARY KEY,
    user_id    uuid NOT NULL REFERENCES credit_accounts,
    delta      integer NOT NULL CHECK (delta <> 0),
    provider   text,
    units      jsonb,
    reason     text NOT NULL CHECK (reason IN ('signup_bonus', 'grant', 'charge', 'refund')),
    request_id uuid,
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK (reason <> 'charge' OR (delta < 0 AND request_id IS NOT NULL)),
    CHECK (reason NOT IN ('signup_bonus', 'grant') OR delta > 0)
);
-- A request is charged once, whatever retries or races happen.
CREATE UNIQUE INDEX credits_ledger_charge_once ON credits_ledger (request_id) WHERE reason = 'charge';
CREATE INDEX credits_ledger_user ON credits_ledger (user_id);
