-- Any key, tier or suspension change asks for a vault regeneration soon, whoever made
-- it (an admin tool, the chat API, SQL by hand): a statement-level trigger sends one
-- delayed regenerate_vault job per vault file this database has written (the paths in
-- vault_versions), unless one is already waiting. A burst of changes therefore writes
-- each file once; a rare race that sends two costs one skipped write (the second run
-- finds the content unchanged).
CREATE FUNCTION longshore.request_vault_regeneration() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    p text;
BEGIN
    IF to_regclass('pgmq.q_regenerate_vault') IS NULL THEN
        RETURN NULL;
    END IF;
    FOR p IN SELECT DISTINCT path FROM vault_versions LOOP
        IF NOT EXISTS (SELECT 1 FROM pgmq.q_regenerate_vault
                       WHERE message->>'path' = p AND vt > now() AND read_ct = 0) THEN
            PERFORM pgmq.send('regenerate_vault', jsonb_build_object('path', p), 2);
        END IF;
    END LOOP;
    RETURN NULL;
END $$;

CREATE TRIGGER api_keys_vault AFTER INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION longshore.request_vault_regeneration();
CREATE TRIGGER service_instances_vault
    AFTER INSERT OR DELETE OR UPDATE OF tier, state, is_enabled ON service_instances
    FOR EACH STATEMENT EXECUTE FUNCTION longshore.request_vault_regeneration();
