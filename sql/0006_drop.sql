-- Undo revision 0006: writers get back INSERT and UPDATE on the data tables,
-- the three counting functions go, ingest runs forget who started them.

DROP POLICY IF EXISTS read_all ON ingest_run;
DROP POLICY IF EXISTS insert_own ON ingest_run;
DROP POLICY IF EXISTS change_own ON ingest_run;
ALTER TABLE ingest_run DISABLE ROW LEVEL SECURITY;
ALTER TABLE ingest_run DROP COLUMN IF EXISTS created_by;

DROP FUNCTION IF EXISTS llens_add_rows(integer, integer[], bigint);
DROP FUNCTION IF EXISTS llens_take_quota(integer, integer[], integer[], integer);
DROP FUNCTION IF EXISTS llens_add_sentences(integer, integer);
DROP FUNCTION IF EXISTS llens_writer_grants(text);

-- revision 0004's llens_secure_functions and llens_setup_team_roles, as they were
-- Functions a writer runs that create or change tables the owner owns: they
-- run as the owner (SECURITY DEFINER, with a pinned search_path) and only the
-- writer group may execute them. Called again by any later migration that
-- redefines one of them (CREATE OR REPLACE resets SECURITY DEFINER).
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
           AND p.proname IN ('llens_ensure_layer', 'llens_build_index', 'llens_drop_index', 'llens_analyze')
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
           AND p.proname IN ('llens_drop_model', 'llens_setup_team_roles', 'llens_secure_functions')
    LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END;
$$;

-- Create the two group roles (if missing) and give them their privileges.
-- Needs CREATEROLE; safe to run again (`llens db grant-*` runs it).
CREATE OR REPLACE FUNCTION llens_setup_team_roles()
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    r text := llens_team_role('reader');
    w text := llens_team_role('writer');
    s text := current_schema();
    -- the role whose future tables and sequences the groups get: the owner of
    -- the schema's functions (llens_ensure_layer creates leaves as it), not the
    -- caller, which may be a superuser setting up a database someone else owns
    o text := (SELECT pg_get_userbyid(p.proowner) FROM pg_proc p
                WHERE p.pronamespace = current_schema()::regnamespace
                  AND p.proname = 'llens_ensure_layer' LIMIT 1);
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
        EXECUTE format('CREATE ROLE %I NOLOGIN', r);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = w) THEN
        EXECUTE format('CREATE ROLE %I NOLOGIN', w);
    END IF;
    EXECUTE format('GRANT %I TO %I', r, w);
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO %I', current_database(), r);
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', s, r);
    EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA %I TO %I', s, r);
    EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE %I IN SCHEMA %I GRANT SELECT ON TABLES TO %I',
                   coalesce(o, current_user), s, r);
    EXECUTE format('GRANT INSERT, UPDATE ON model, model_layer, token, corpus, sentence, ingest_run, '
                   'token_quota, token_embedding, eval_run, eval_item, eval_verdict, analysis TO %I', w);
    EXECUTE format('GRANT DELETE ON analysis, eval_run, eval_item, eval_verdict TO %I', w);
    EXECUTE format('GRANT USAGE ON ALL SEQUENCES IN SCHEMA %I TO %I', s, w);
    EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE %I IN SCHEMA %I GRANT USAGE ON SEQUENCES TO %I',
                   coalesce(o, current_user), s, w);
    PERFORM llens_secure_functions();
    INSERT INTO llens_meta (key, value) VALUES ('reader_role', r), ('writer_role', w)
        ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value;
    RETURN r || ',' || w;
END;
$$;

DO $$
DECLARE
    w text := llens_team_role('writer');
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = w) THEN
        EXECUTE format('GRANT INSERT, UPDATE ON model, model_layer, token, corpus, sentence, ingest_run, '
                       'token_quota, token_embedding, eval_run, eval_item, eval_verdict, analysis TO %I', w);
    END IF;
    PERFORM llens_secure_functions();
END;
$$;
