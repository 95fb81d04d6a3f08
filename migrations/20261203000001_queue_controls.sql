-- Issue 19: operators pause and resume queues, and every operator action is recorded
-- with who did it.
--
-- A paused queue still takes enqueues; no worker claims from it. The claim statement
-- reads this table itself (an uncorrelated subquery, evaluated once per claim: one
-- primary-key probe), so a pause holds fleet-wide from the next claim on, with no
-- cache to go stale. A row stays after a resume (paused = false), with who resumed it.
CREATE TABLE longshore.queue_controls (
    queue      text PRIMARY KEY,
    paused     boolean NOT NULL,
    reason     text,
    changed_by text NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now()
);

-- What operators did, by whom (a token's name, `cli:<user>`), to what.
CREATE TABLE longshore.operator_actions (
    id     bigserial PRIMARY KEY,
    at     timestamptz NOT NULL DEFAULT now(),
    actor  text NOT NULL,
    action text NOT NULL,
    queue  text,
    detail jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX operator_actions_at_idx ON longshore.operator_actions (at);
