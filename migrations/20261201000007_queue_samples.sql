-- Issue 16: queue gauges are sampled once per interval for the whole fleet, not once per
-- process. Every process that serves /metrics used to count every queue (and its whole
-- archive) every 5 s, so the load grew with the replicas the autoscaler added. Now one
-- process per interval (whichever takes the sampler row first) counts and writes the
-- figures here; every process exports what is here.
CREATE TABLE longshore.queue_samples (
    queue              text PRIMARY KEY,
    visible            bigint NOT NULL,
    in_flight          bigint NOT NULL,
    delayed            bigint NOT NULL,
    oldest_age_seconds double precision NOT NULL,
    dead_letters       bigint NOT NULL,
    sampled_at         timestamptz NOT NULL
);

-- One row: when the fleet last sampled. The process whose UPDATE finds it due counts.
CREATE TABLE longshore.queue_sampler (
    id         boolean PRIMARY KEY DEFAULT true CHECK (id),
    sampled_at timestamptz NOT NULL
);
INSERT INTO longshore.queue_sampler (sampled_at) VALUES ('-infinity');
