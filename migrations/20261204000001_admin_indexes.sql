-- Issue 19: the admin views read windows of time back from now; these keep each read an
-- index range scan however long the ledgers grow.
CREATE INDEX IF NOT EXISTS credits_ledger_charges_created
    ON credits_ledger (created_at) WHERE reason = 'charge';
CREATE INDEX IF NOT EXISTS charge_intents_created ON charge_intents (created_at);
-- A job's page lists what operators did to it.
CREATE INDEX IF NOT EXISTS operator_actions_job_idx
    ON longshore.operator_actions (queue, (detail ->> 'id'));
