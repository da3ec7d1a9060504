-- Undo revision 0011: the table goes, llens_secure_functions goes back to the
-- list 0010 left it with (a snapshot of 0010_atlas.sql's definition).
DROP TABLE IF EXISTS llens_function_access;

CREATE OR REPLACE FUNCTION llens_secure_functions()
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    f text;
    w text := llens_team_role('writer');
    has_writer boolean := EXISTS (SELECT 1 FROM pg_roles WHERE rolname = llens_team_role('writer'));
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure::text
          FROM pg_proc p
         WHERE p.pronamespace = current_schema()::regnamespace
           AND p.proname IN ('llens_ensure_layer', 'llens_build_index', 'llens_drop_index', 'llens_analyze',
                             'llens_add_rows', 'llens_take_quota', 'llens_add_sentences',
                             'llens_count_quota',
                             'llens_atlas_ensure_layer', 'llens_atlas_build_index', 'llens_atlas_add_rows')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = %I, pg_temp', f, current_schema());
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
        IF has_writer THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', f, w);
        END IF;
    END LOOP;
    FOR f IN
        SELECT p.oid::regprocedure::text
          FROM pg_proc p
         WHERE p.pronamespace = current_schema()::regnamespace
           AND p.proname IN ('llens_drop_model', 'llens_setup_team_roles', 'llens_secure_functions',
                             'llens_writer_grants', 'llens_atlas_drop')
    LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END;
$$;

SELECT llens_secure_functions();
