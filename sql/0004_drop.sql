-- Undo revision 0004 (the group roles themselves are left: they are server-wide
-- and may hold members; `DROP ROLE` them by hand if wanted).
DROP TABLE IF EXISTS analysis;
ALTER TABLE eval_run DISABLE ROW LEVEL SECURITY;
ALTER TABLE eval_item DISABLE ROW LEVEL SECURITY;
ALTER TABLE eval_verdict DISABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS read_all ON eval_run;
DROP POLICY IF EXISTS insert_own ON eval_run;
DROP POLICY IF EXISTS change_own ON eval_run;
DROP POLICY IF EXISTS delete_own ON eval_run;
DROP POLICY IF EXISTS read_all ON eval_item;
DROP POLICY IF EXISTS write_own_run ON eval_item;
DROP POLICY IF EXISTS read_all ON eval_verdict;
DROP POLICY IF EXISTS write_own_run ON eval_verdict;
DO $$
DECLARE f text;
BEGIN
    FOR f IN SELECT p.oid::regprocedure::text FROM pg_proc p
              WHERE p.pronamespace = current_schema()::regnamespace
                AND p.proname IN ('llens_ensure_layer', 'llens_build_index', 'llens_drop_index',
                                  'llens_analyze', 'llens_drop_model')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SECURITY INVOKER RESET search_path', f);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO PUBLIC', f);
    END LOOP;
END;
$$;
DELETE FROM llens_meta WHERE key IN ('reader_role', 'writer_role');
DROP FUNCTION IF EXISTS llens_setup_team_roles();
DROP FUNCTION IF EXISTS llens_secure_functions();
DROP FUNCTION IF EXISTS llens_team_role(text);
