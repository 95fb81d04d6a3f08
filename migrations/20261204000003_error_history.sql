-- Issue 19: a job's page shows every attempt with its error. The runtime kept only the
-- latest error (`last_error`); a failed attempt now also appends to an `errors` header:
-- `[{"attempt", "error", "at"}]`, the newest last, at most 10 kept (a crash-looping job
-- must not grow its row without bound), each error at most 500 characters. Written by
-- the same statements that write `last_error` (a retry, a dead letter, a burial at
-- claim), stamped when the failure happened (clock_timestamp(), hence VOLATILE).
CREATE OR REPLACE FUNCTION longshore.error_history(h jsonb, attempt integer, err text) RETURNS jsonb
LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
    SELECT coalesce(
             (SELECT jsonb_agg(e ORDER BY o)
                FROM (SELECT e, o
                        FROM jsonb_array_elements(
                               CASE WHEN jsonb_typeof(longshore.headers(h) -> 'errors') = 'array'
                                    THEN longshore.headers(h) -> 'errors' ELSE '[]'::jsonb END)
                             WITH ORDINALITY AS x(e, o)
                       ORDER BY o DESC
                       LIMIT 9) y),
             '[]'::jsonb)
           || jsonb_build_array(jsonb_build_object('attempt', attempt, 'error', left(err, 500),
                                                   'at', clock_timestamp()))
$$;
