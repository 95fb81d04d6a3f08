-- Effects of the `probe` job kind: one row per job id, written in the job's
-- completion transaction. A duplicate effect would violate the primary key.
CREATE TABLE probe_effects (
    id      bigint PRIMARY KEY,
    attempt integer     NOT NULL,
    done_at timestamptz NOT NULL DEFAULT now()
);
