-- Issue 20 (groundwork): fleet-wide rate limits, atomic in PostgreSQL. One row per key
-- holds its GCRA "theoretical arrival time" (tat): a take is allowed when, after it,
-- tat - now stays within burst emission intervals; else it answers how long to wait.
-- Every replica asks the same row, under its lock, so N processes together never pass
-- the rate. UNLOGGED: a crash of the server resets the buckets (they refill anyway), and
-- no WAL is written per take.
CREATE UNLOGGED TABLE longshore.rate_limits (
    key text PRIMARY KEY,
    tat timestamptz NOT NULL
);

-- Takes one slot of `key` at one per `interval_s` seconds with `burst` slots of slack.
-- Returns 0 when taken, else the seconds to wait before a take can succeed (nothing is
-- taken then). The clock is read after the row lock is held, so a take that waited for
-- the lock is judged at the time it is decided.
CREATE OR REPLACE FUNCTION longshore.rate_take(p_key text, p_interval_s float8, p_burst integer)
RETURNS float8 LANGUAGE plpgsql AS $$
DECLARE
    t        interval := make_interval(secs => p_interval_s);
    cur      timestamptz;
    now_ts   timestamptz;
    new_tat  timestamptz;
BEGIN
    IF p_interval_s <= 0 OR p_burst < 1 THEN
        RAISE EXCEPTION 'rate_take: interval must be positive and burst at least 1';
    END IF;
    INSERT INTO longshore.rate_limits (key, tat) VALUES (p_key, '-infinity')
        ON CONFLICT (key) DO NOTHING;
    SELECT tat INTO cur FROM longshore.rate_limits WHERE key = p_key FOR UPDATE;
    now_ts  := clock_timestamp();
    new_tat := greatest(cur, now_ts) + t;
    IF new_tat - now_ts > t * p_burst THEN
        RETURN extract(epoch FROM (new_tat - now_ts - t * p_burst));
    END IF;
    UPDATE longshore.rate_limits SET tat = new_tat WHERE key = p_key;
    RETURN 0;
END;
$$;
