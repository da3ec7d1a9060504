-- latentlens writers append (revision 0006).
--
-- A writer inserts (ingest, import, evaluate, save) and changes only what its
-- own runs created; it never UPDATEs shared rows: embeddings, sentences,
-- corpora, models, vocabularies, layers, quotas. The three counters an ingest
-- or import must move on shared rows move only through owner-run functions
-- that can only add (row counts and versions of model_layer, token_quota,
-- corpus.sentence_count). model_layer.index_params (everyone's default
-- search) changes only through the owner: its own UPDATE (`llens index
-- calibrate`) or llens_build_index / llens_drop_index, which record the index
-- they built or dropped.

-- 1. ingest runs know who started them; a writer changes only its own
ALTER TABLE ingest_run ADD COLUMN IF NOT EXISTS created_by text;
ALTER TABLE ingest_run ALTER COLUMN created_by SET DEFAULT current_user;
COMMENT ON COLUMN ingest_run.created_by IS 'The role that started the run (NULL: started before revision 0006); only it (or the owner) resumes or finishes it.';
ALTER TABLE ingest_run ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS read_all ON ingest_run;
DROP POLICY IF EXISTS insert_own ON ingest_run;
DROP POLICY IF EXISTS change_own ON ingest_run;
CREATE POLICY read_all ON ingest_run FOR SELECT USING (true);
CREATE POLICY insert_own ON ingest_run FOR INSERT WITH CHECK (created_by = current_user);
CREATE POLICY change_own ON ingest_run FOR UPDATE USING (created_by = current_user)
    WITH CHECK (created_by = current_user);

-- 2. the counters a writer's load moves, through functions that only add

-- N rows were just written to each of these layers: count them and bump the
-- layers' versions (query caches key on them).
CREATE OR REPLACE FUNCTION llens_add_rows(p_model_id integer, p_layers integer[], p_rows bigint)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF p_rows IS NULL OR p_rows < 0 THEN
        RAISE EXCEPTION 'llens: a row count only grows (got %)', p_rows USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE model_layer SET row_count = row_count + p_rows, version = version + 1
     WHERE model_id = p_model_id AND layer = ANY(p_layers);
END;
$$;

-- Grant contexts against the per-token quota (first come, first served, across
-- runs and concurrent writers): for each token, up to p_wanted of them while
-- fewer than p_cap are stored. Rows are locked in token order, so concurrent
-- writers queue on shared tokens instead of deadlocking. Returns what each
-- token got; the caller keeps that many of its rows (in corpus order).
CREATE OR REPLACE FUNCTION llens_take_quota(
    p_model_id integer, p_token_ids integer[], p_wanted integer[], p_cap integer)
RETURNS TABLE (tok integer, granted integer) LANGUAGE plpgsql AS $$
BEGIN
    IF p_cap IS NULL OR p_cap < 1 THEN
        RAISE EXCEPTION 'llens: the quota must be at least 1 (got %)', p_cap USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cardinality(p_token_ids) IS DISTINCT FROM cardinality(p_wanted)
       OR EXISTS (SELECT 1 FROM unnest(p_wanted) w WHERE w IS NULL OR w < 0) THEN
        RAISE EXCEPTION 'llens: one wanted count (>= 0) per token id' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO token_quota (model_id, token_id)
    SELECT p_model_id, t FROM unnest(p_token_ids) AS t ORDER BY t
        ON CONFLICT DO NOTHING;
    PERFORM 1 FROM token_quota q
      WHERE q.model_id = p_model_id AND q.token_id = ANY(p_token_ids)
      ORDER BY q.token_id FOR UPDATE;
    -- a new statement: its snapshot sees what the writers we queued behind committed
    RETURN QUERY
    WITH want AS (
        SELECT u.t, sum(u.w)::integer AS w FROM unnest(p_token_ids, p_wanted) AS u(t, w) GROUP BY u.t),
    g AS (
        SELECT q.token_id AS t, least(want.w, greatest(p_cap - q.used, 0)) AS n
          FROM token_quota q JOIN want ON want.t = q.token_id
         WHERE q.model_id = p_model_id),
    upd AS (
        UPDATE token_quota q SET used = q.used + g.n FROM g
         WHERE q.model_id = p_model_id AND q.token_id = g.t AND g.n > 0
        RETURNING 1)
    SELECT g.t, g.n FROM g;
END;
$$;

-- N sentences were just added to a corpus (counted per chunk: recounting the
-- corpus for every chunk would be quadratic).
CREATE OR REPLACE FUNCTION llens_add_sentences(p_corpus_id integer, p_added integer)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF p_added IS NULL OR p_added < 0 THEN
        RAISE EXCEPTION 'llens: a sentence count only grows (got %)', p_added
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE corpus SET sentence_count = sentence_count + p_added WHERE id = p_corpus_id;
END;
$$;

-- 3. the owner-run list gains the three counters (see 0004_team.sql)
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
                             'llens_add_rows', 'llens_take_quota', 'llens_add_sentences')
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

-- 4. what a writer group gets from now on (groups created later, by `llens db grant-*`)
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
    PERFORM llens_writer_grants(w);
    EXECUTE format('GRANT USAGE ON ALL SEQUENCES IN SCHEMA %I TO %I', s, w);
    EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE %I IN SCHEMA %I GRANT USAGE ON SEQUENCES TO %I',
                   coalesce(o, current_user), s, w);
    PERFORM llens_secure_functions();
    INSERT INTO llens_meta (key, value) VALUES ('reader_role', r), ('writer_role', w)
        ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value;
    RETURN r || ',' || w;
END;
$$;

-- A writer's table privileges: INSERT where it adds rows, UPDATE and DELETE
-- only where row-level security limits it to its own (runs, evaluations,
-- analyses). Everything else on shared rows goes through owner-run functions.
CREATE OR REPLACE FUNCTION llens_writer_grants(p_writer text)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('REVOKE UPDATE ON model, model_layer, token, corpus, sentence, token_quota, '
                   'token_embedding FROM %I', p_writer);
    EXECUTE format('REVOKE INSERT ON model_layer, token_quota FROM %I', p_writer);
    EXECUTE format('GRANT INSERT ON model, token, corpus, sentence, token_embedding, ingest_run, '
                   'eval_run, eval_item, eval_verdict, analysis TO %I', p_writer);
    EXECUTE format('GRANT UPDATE ON ingest_run, eval_run, eval_item, eval_verdict, analysis TO %I', p_writer);
    EXECUTE format('GRANT DELETE ON analysis, eval_run, eval_item, eval_verdict TO %I', p_writer);
END;
$$;
REVOKE EXECUTE ON FUNCTION llens_writer_grants(text) FROM PUBLIC;

-- 5. apply it to this database's writers, if the groups exist already
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = llens_team_role('writer')) THEN
        PERFORM llens_writer_grants(llens_team_role('writer'));
    END IF;
    PERFORM llens_secure_functions();
END;
$$;
