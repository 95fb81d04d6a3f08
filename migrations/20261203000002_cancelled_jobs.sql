-- Issue 19: operators cancel jobs. A cancelled job never runs (again); it is recorded
-- here (a terminal state of its own, apart from the dead letters, which operators
-- re-send) and answers `cancelled` to a job status request. Kept as long as dead
-- letters are (the prune_dead_letters task prunes both).
CREATE TABLE longshore.cancelled_jobs (
    queue        text        NOT NULL,
    msg_id       bigint      NOT NULL,
    message      jsonb,
    headers      jsonb,
    attempts     integer     NOT NULL,
    enqueued_at  timestamptz NOT NULL,
    cancelled_at timestamptz NOT NULL DEFAULT now(),
    cancelled_by text        NOT NULL,
    PRIMARY KEY (queue, msg_id)
);
CREATE INDEX cancelled_jobs_at_idx ON longshore.cancelled_jobs (cancelled_at);

-- `?wait=` long polls end on a cancel as on any other final state.
CREATE TRIGGER longshore_cancelled_notify AFTER INSERT ON longshore.cancelled_jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION longshore.notify_dead();
