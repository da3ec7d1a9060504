-- 0007: an import's contexts count against the per-token quota, through an
-- owner-run function (writers have no INSERT/UPDATE on token_quota since 0006).

-- Raise each token's quota use to the contexts it has in one leaf of the model.
-- Rows written without a cap (an import) took no quota; counting them afterwards
-- makes a later ingest's cap include them. The count comes from the stored rows,
-- never from the caller, and only ever raises `used`: a writer can run it on any
-- model without being able to change what is true.
CREATE OR REPLACE FUNCTION llens_count_quota(p_model_id integer, p_layer integer)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO token_quota AS q (model_id, token_id, used)
    SELECT p_model_id, e.token_id, count(*)
      FROM token_embedding e
     WHERE e.model_id = p_model_id AND e.layer = p_layer AND e.token_id >= 0
     GROUP BY e.token_id ORDER BY e.token_id
        ON CONFLICT (model_id, token_id) DO UPDATE SET used = greatest(q.used, EXCLUDED.used);
END;
$$;

-- the owner-run list gains it (see 0006_writers_append.sql)
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
                             'llens_count_quota')
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
                             'llens_writer_grants')
    LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END;
$$;

SELECT llens_secure_functions();
