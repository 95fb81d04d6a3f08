-- Every signature a charge intent ever had (issue 15). A new transaction is signed
-- only after each earlier one is shown dead (expired at a height the status and memo
-- searches were read at or past, and seen by neither), so all of them stay known:
-- the driver checks every one before it acts, and reconciliation can name them.
CREATE TABLE charge_intent_signatures (
    intent_id               uuid NOT NULL REFERENCES charge_intents ON DELETE CASCADE,
    signature               varchar(128) NOT NULL UNIQUE,
    signed_tx               bytea NOT NULL,
    last_valid_block_height bigint NOT NULL,
    -- The slot of the blockhash answer: no transaction using it lands at or before it,
    -- so a history search that reaches back past it has seen every place it could be.
    signed_slot             bigint NOT NULL,
    -- The escrow account the transfer is from (the memo search looks there).
    source                  varchar(64) NOT NULL,
    -- Send attempts (counted before each send). A preflight refusal of the first
    -- attempt proves the transaction never left; after more attempts it does not.
    sends                   integer NOT NULL DEFAULT 0,
    created_at              timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (intent_id, signature)
);

-- Signatures written before this table: their slot is unknown. A slot is never below
-- its block height, so the height the blockhash was issued at is a safe lower bound.
INSERT INTO charge_intent_signatures
    (intent_id, signature, signed_tx, last_valid_block_height, signed_slot, source, sends)
SELECT i.intent_id, i.signature, i.signed_tx, coalesce(i.last_valid_block_height, 0),
       greatest(coalesce(i.last_valid_block_height, 0) - 151, 0),
       coalesce(c.escrow_account, ''),
       -- Maybe sent (the earlier driver left a row `signed` after a send that timed
       -- out): a refusal then waits for proof.
       2
FROM charge_intents i JOIN customers c USING (customer_id)
WHERE i.signature IS NOT NULL AND i.signed_tx IS NOT NULL;

-- A refusal by the chain that waits for proof that no signature of the intent can
-- still land before the intent fails.
ALTER TABLE charge_intents ADD COLUMN rejection text;
-- Send attempts of the current signature, on the intent's own row, so that counting a
-- send and failing on a first refusal serialise on one row lock (a count on another
-- table would let both commit).
ALTER TABLE charge_intents ADD COLUMN sends integer NOT NULL DEFAULT 0;
UPDATE charge_intents SET sends = 2 WHERE state IN ('signed', 'sent');
