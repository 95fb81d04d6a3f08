-- Charges (../shared/SPEC-BILLING.md, bill_usage and charge_escrow).
--
-- A usage record can gain billable requests after it was billed (late log lines land
-- in an hour that was already charged). Each intent therefore bills a *slice* of a
-- record's billable count: (from_count, to_count]. `billed_count` is the top of the
-- slices taken so far; a slice starts where the previous one ended, so two intents
-- that try to bill the same requests collide on (record_id, from_count).

ALTER TABLE usage_records ADD COLUMN billed_count bigint NOT NULL DEFAULT 0
    CHECK (billed_count >= 0);

ALTER TABLE service_instances ADD COLUMN suspend_details jsonb;
ALTER TABLE service_instances ADD COLUMN suspended_at timestamptz;

CREATE TABLE charge_intents (
    intent_id               uuid PRIMARY KEY,
    customer_id             integer NOT NULL REFERENCES customers,
    service_type            varchar(20) NOT NULL,
    -- What the transfer moves, in USD: the priced usage (and base fee) rounded up to
    -- the cent, at least the minimum charge.
    amount                  numeric(20,8) NOT NULL CHECK (amount > 0),
    -- The exact, unrounded parts.
    usage_amount            numeric(20,8) NOT NULL DEFAULT 0,
    base_fee_amount         numeric(20,8) NOT NULL DEFAULT 0,
    -- The month whose base fee this intent carries (one per service and month).
    base_fee_month          date,
    -- The month the charge counts against (customers.current_month_start at creation).
    billing_month           date NOT NULL,
    -- The usage record range covered (the exact set is in charge_intent_records).
    first_record_id         bigint,
    last_record_id          bigint,
    state                   text NOT NULL DEFAULT 'created'
                            CHECK (state IN ('created', 'signed', 'sent', 'confirmed', 'failed')),
    signature               varchar(128) UNIQUE,
    signed_tx               bytea,
    last_valid_block_height bigint,
    attempts                integer NOT NULL DEFAULT 0,
    last_error              text,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now()
);
-- At most one intent in flight per (customer, service): balance and limit checks see
-- every pending amount, and slices of a record are taken in order.
CREATE UNIQUE INDEX charge_intents_one_in_flight ON charge_intents (customer_id, service_type)
    WHERE state IN ('created', 'signed', 'sent');
-- A base fee is charged once per service and month.
CREATE UNIQUE INDEX charge_intents_base_fee_once ON charge_intents (customer_id, service_type, base_fee_month)
    WHERE base_fee_month IS NOT NULL AND state <> 'failed';
CREATE INDEX charge_intents_state_idx ON charge_intents (state, updated_at)
    WHERE state IN ('created', 'signed', 'sent');

-- The slices of usage each intent bills. A failed intent releases its slices (they
-- become billable again); a released row stays for the record.
CREATE TABLE charge_intent_records (
    intent_id  uuid NOT NULL REFERENCES charge_intents,
    record_id  bigint NOT NULL REFERENCES usage_records,
    from_count bigint NOT NULL CHECK (from_count >= 0),
    to_count   bigint NOT NULL,
    amount     numeric(20,8) NOT NULL,
    released   boolean NOT NULL DEFAULT false,
    PRIMARY KEY (intent_id, record_id),
    CHECK (to_count > from_count)
);
-- The constraint that makes a usage record's requests impossible to bill twice.
CREATE UNIQUE INDEX charge_intent_records_once ON charge_intent_records (record_id, from_count)
    WHERE NOT released;

-- Usage records that still have unbilled requests (the billing cycle's scan).
CREATE INDEX usage_records_unbilled_idx ON usage_records (customer_id, service_type)
    WHERE billable_count > billed_count;
