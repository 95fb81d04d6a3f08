-- Completion notifications for `GET /v1/jobs/{queue}/{id}?wait=`: one NOTIFY per
-- statement that archives or dead-letters jobs (payload: the queue), not per job.
CREATE OR REPLACE FUNCTION longshore.notify_archived() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('longshore_done', substring(TG_TABLE_NAME from 3));
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION longshore.notify_dead() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('longshore_done', q) FROM (SELECT DISTINCT queue AS q FROM new_rows) d;
    RETURN NULL;
END;
$$;

CREATE TRIGGER longshore_dead_notify AFTER INSERT ON longshore.dead_letters
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION longshore.notify_dead();

-- Scheduler: one row per fire, written in the same transaction as its enqueue. The
-- primary key makes every (schedule, fire_at) fire once, whatever number of scheduler
-- replicas race for it.
CREATE TABLE longshore.schedule_fires (
    schedule text        NOT NULL,
    fire_at  timestamptz NOT NULL,
    msg_id   bigint      NOT NULL,
    fired_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schedule, fire_at)
);
