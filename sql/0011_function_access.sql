-- 0011: which llens functions run as their owner, in a table instead of a list
-- that every migration adding one had to restate (0006, 0007, 0010 each
-- redefined llens_secure_functions with one more name).
--
--   'definer'    runs as its owner (SECURITY DEFINER, search_path pinned) and
--                the writer role may call it: the narrow doors through which
--                writers add rows, count quota, build an index;
--   'owner_only' only the owner (and superusers) may call it.
--
-- A later migration that adds such a function inserts one row here and runs
-- SELECT llens_secure_functions(). Nobody but the owner can write this table:
-- a row here decides what runs with the owner's rights.
CREATE TABLE IF NOT EXISTS llens_function_access (
    proname name PRIMARY KEY,
    access  text NOT NULL CHECK (access IN ('definer', 'owner_only'))
);
COMMENT ON TABLE llens_function_access IS
    'llens functions that run as their owner and writers may call (definer), or that only the owner may call (owner_only); read by llens_secure_functions()';
REVOKE ALL ON llens_function_access FROM PUBLIC;

INSERT INTO llens_function_access (proname, access) VALUES
    ('llens_ensure_layer', 'definer'), ('llens_build_index', 'definer'),
    ('llens_drop_index', 'definer'), ('llens_analyze', 'definer'),
    ('llens_add_rows', 'definer'), ('llens_take_quota', 'definer'),
    ('llens_add_sentences', 'definer'), ('llens_count_quota', 'definer'),
    ('llens_atlas_ensure_layer', 'definer'), ('llens_atlas_build_index', 'definer'),
    ('llens_atlas_add_rows', 'definer'),
    ('llens_drop_model', 'owner_only'), ('llens_setup_team_roles', 'owner_only'),
    ('llens_secure_functions', 'owner_only'), ('llens_writer_grants', 'owner_only'),
    ('llens_atlas_drop', 'owner_only')
ON CONFLICT (proname) DO UPDATE SET access = EXCLUDED.access;

CREATE OR REPLACE FUNCTION llens_secure_functions()
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    f text;
    how text;
    w text := llens_team_role('writer');
    has_writer boolean := EXISTS (SELECT 1 FROM pg_roles WHERE rolname = llens_team_role('writer'));
BEGIN
    FOR f, how IN
        SELECT p.oid::regprocedure::text, a.access
          FROM pg_proc p JOIN llens_function_access a ON a.proname = p.proname
         WHERE p.pronamespace = current_schema()::regnamespace
         ORDER BY 1
    LOOP
        IF how = 'definer' THEN
            EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = %I, pg_temp', f, current_schema());
        END IF;
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
        IF how = 'definer' AND has_writer THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', f, w);
        END IF;
    END LOOP;
END;
$$;

SELECT llens_secure_functions();
