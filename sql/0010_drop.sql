-- Undo revision 0010: the atlas tables (with every leaf of atlas_token), view and functions.
DROP VIEW IF EXISTS atlas_patch_word;
DROP FUNCTION IF EXISTS llens_atlas_find(text, text, integer, integer, integer, integer);
DROP FUNCTION IF EXISTS llens_atlas_nearest(text, integer, halfvec, integer, boolean);
DROP FUNCTION IF EXISTS llens_atlas_knn(integer, integer, halfvec, integer, boolean, integer);
DROP FUNCTION IF EXISTS llens_atlas_build_index(integer, integer, integer, integer);
DROP FUNCTION IF EXISTS llens_atlas_ensure_layer(integer, integer);
DROP FUNCTION IF EXISTS llens_atlas_drop(integer);
DROP FUNCTION IF EXISTS llens_atlas_id(text);
DROP FUNCTION IF EXISTS llens_atlas_leaf_name(integer, integer);
DROP TABLE IF EXISTS atlas_run;
DROP TABLE IF EXISTS atlas_neighbour;
DROP TABLE IF EXISTS atlas_token;
DROP TABLE IF EXISTS atlas_patch;
DROP TABLE IF EXISTS atlas_image;
DROP TABLE IF EXISTS atlas_layer;
DROP TABLE IF EXISTS atlas;

-- revision 0004's team functions
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

SELECT llens_secure_functions();
