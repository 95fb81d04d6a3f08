-- The errors history stamps each failure when it happened (clock_timestamp()), not when
-- the transaction that records it began; VOLATILE accordingly.
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
