-- latentlens on a Citus cluster (revision 0009): what a real cluster showed the
-- plan of docs/scaling.md needed. On a server without Citus every function
-- behaves as before.

-- Whether this database has the Citus extension.
CREATE OR REPLACE FUNCTION llens_citus()
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')
$$;

-- Whether Citus manages a table (distributed, reference or Citus local).
-- pg_dist_partition is read through to_regclass: it exists only with Citus.
CREATE OR REPLACE FUNCTION llens_distributed(p_table text)
RETURNS boolean LANGUAGE plpgsql STABLE AS $$
DECLARE
    found boolean;
BEGIN
    IF to_regclass('pg_catalog.pg_dist_partition') IS NULL OR to_regclass(p_table) IS NULL THEN
        RETURN false;
    END IF;
    EXECUTE 'SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition WHERE logicalrelid = $1::regclass)'
        INTO found USING p_table;
    RETURN found;
END;
$$;

CREATE OR REPLACE FUNCTION llens_ensure_layer(p_model_id integer, p_layer integer)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    leaf text := llens_leaf_name(p_model_id, p_layer);
    nl   integer;
    d    integer;
BEGIN
    SELECT num_layers, hidden_size INTO nl, d FROM model WHERE id = p_model_id;
    IF nl IS NULL THEN
        RAISE EXCEPTION 'llens: no model with id %', p_model_id USING ERRCODE = 'no_data_found';
    END IF;
    IF p_layer < 0 OR p_layer > nl THEN
        RAISE EXCEPTION 'llens: layer % is out of range 0..% for model id %', p_layer, nl, p_model_id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- serialise DDL per model: two writers creating the same leaf must not race
    PERFORM pg_advisory_xact_lock(hashtext('llens_partition'), p_model_id);
    IF to_regclass(leaf) IS NULL AND llens_distributed('token_embedding') THEN
        -- Citus refuses SET STORAGE on a distributed table: set it on a plain table,
        -- then attach it (Citus distributes it, co-located, and its shards keep the storage)
        EXECUTE format('CREATE TABLE %I (LIKE token_embedding INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', leaf);
        EXECUTE format('ALTER TABLE %I ALTER COLUMN embedding SET STORAGE %s', leaf,
                       CASE WHEN d <= 4000 THEN 'PLAIN' ELSE 'EXTERNAL' END);
        EXECUTE format('ALTER TABLE token_embedding ATTACH PARTITION %I FOR VALUES FROM (%s, %s) TO (%s, %s)',
                       leaf, p_model_id, p_layer, p_model_id, p_layer + 1);
    ELSIF to_regclass(leaf) IS NULL THEN
        EXECUTE format('CREATE TABLE %I PARTITION OF token_embedding FOR VALUES FROM (%s, %s) TO (%s, %s)',
                       leaf, p_model_id, p_layer, p_model_id, p_layer + 1);
        -- halfvec is 2 bytes a dimension and does not compress: keep it inline
        -- where it fits a page (D <= 4000), else out of line but uncompressed.
        EXECUTE format('ALTER TABLE %I ALTER COLUMN embedding SET STORAGE %s', leaf,
                       CASE WHEN d <= 4000 THEN 'PLAIN' ELSE 'EXTERNAL' END);
    END IF;
    INSERT INTO model_layer (model_id, layer) VALUES (p_model_id, p_layer)
        ON CONFLICT DO NOTHING;
    RETURN leaf;
END;
$$;

CREATE OR REPLACE FUNCTION llens_knn(
    p_model_id integer, p_layer integer, p_query halfvec, p_k integer DEFAULT 10,
    p_exact boolean DEFAULT false, p_ef_search integer DEFAULT NULL)
RETURNS TABLE (sentence_id bigint, "position" integer, token_id integer,
               char_start integer, char_end integer, distance double precision)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    d       integer;
    kind    text;
    found   boolean;
    leaf    text := llens_leaf_name(p_model_id, p_layer);
    old_ef  text;
    old_ls  text;
    old_rs  text;
    dk      boolean := false;  -- diskann settings to restore
    ef      integer;
    needed  integer;
    ncand   integer;
    q       text;
BEGIN
    SELECT true, m.hidden_size, ml.index_kind, (ml.index_params->>'ef_search')::integer
      INTO found, d, kind, needed
      FROM model m JOIN model_layer ml ON ml.model_id = m.id
     WHERE m.id = p_model_id AND ml.layer = p_layer;
    IF found IS NULL OR to_regclass(leaf) IS NULL THEN
        RAISE EXCEPTION 'llens: model id % has no layer %', p_model_id, p_layer
            USING ERRCODE = 'no_data_found';
    END IF;
    IF vector_dims(p_query) <> d THEN
        RAISE EXCEPTION 'llens: query has % dimensions, the model has %', vector_dims(p_query), d
            USING ERRCODE = 'data_exception';
    END IF;
    IF p_k < 1 THEN
        RAISE EXCEPTION 'llens: k must be at least 1' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    old_ef := current_setting('hnsw.ef_search', true);
    ef := greatest(coalesce(p_ef_search, greatest(coalesce(nullif(old_ef, '')::integer, 40), needed)), p_k);
    ncand := greatest(10 * p_k, 200, least(ef, 1000));
    IF p_exact OR kind IS NULL OR NOT llens_ann_enabled() OR to_regclass(leaf || '_ann') IS NULL
       OR (kind = 'hnsw_halfvec' AND p_k > 1000) OR (kind <> 'hnsw_halfvec' AND 10 * p_k > 1000) THEN
        -- no cast to halfvec(d): no index matches, so the leaf is scanned exactly
        q := format('SELECT e.sentence_id, e.position, e.token_id, e.char_start, e.char_end, '
                    '(e.embedding <=> $1)::float8 FROM %I e '
                    'ORDER BY e.embedding <=> $1 LIMIT $2', leaf);
    ELSIF kind = 'hnsw_halfvec' THEN
        q := format('SELECT e.sentence_id, e.position, e.token_id, e.char_start, e.char_end, '
                    '(e.embedding::halfvec(%1$s) <=> $1::halfvec(%1$s))::float8 FROM %2$I e '
                    'ORDER BY e.embedding::halfvec(%1$s) <=> $1::halfvec(%1$s) LIMIT $2', d, leaf);
    ELSIF kind = 'diskann' THEN
        dk := true;
        old_ls := current_setting('diskann.query_search_list_size', true);
        old_rs := current_setting('diskann.query_rescore', true);
        PERFORM set_config('diskann.query_search_list_size', least(ef, 1000)::text, true);
        PERFORM set_config('diskann.query_rescore', '0', true);
        q := format('SELECT c.sentence_id, c.position, c.token_id, c.char_start, c.char_end, '
                    '(c.embedding <=> $1)::float8 FROM ('
                    '  SELECT e.sentence_id, e.position, e.token_id, e.char_start, e.char_end, e.embedding '
                    '  FROM %2$I e '
                    '  ORDER BY e.embedding::vector(%1$s) <=> $1::vector(%1$s) '
                    '  LIMIT %3$s) c '
                    'ORDER BY c.embedding <=> $1 LIMIT $2', d, leaf, ncand);
    ELSE
        ef := greatest(ef, ncand);
        q := format('SELECT c.sentence_id, c.position, c.token_id, c.char_start, c.char_end, '
                    '(c.embedding <=> $1)::float8 FROM ('
                    '  SELECT e.sentence_id, e.position, e.token_id, e.char_start, e.char_end, e.embedding '
                    '  FROM %2$I e '
                    '  ORDER BY binary_quantize(e.embedding)::bit(%1$s) <~> binary_quantize($1::halfvec(%1$s)) '
                    '  LIMIT %3$s) c '
                    'ORDER BY c.embedding <=> $1 LIMIT $2', d, leaf, ncand);
    END IF;
    IF llens_citus() THEN
        -- set_config() stays in the coordinator's session; a SET LOCAL statement
        -- reaches the workers' shard queries with citus.propagate_set_commands
        PERFORM set_config('citus.propagate_set_commands', 'local', true);
        EXECUTE format('SET LOCAL hnsw.ef_search = %s', least(ef, 1000));
        IF dk THEN
            EXECUTE format('SET LOCAL diskann.query_search_list_size = %s', least(ef, 1000));
            EXECUTE 'SET LOCAL diskann.query_rescore = 0';
        END IF;
        RETURN QUERY EXECUTE q USING p_query, p_k;
        IF old_ef IS NOT NULL THEN
            EXECUTE format('SET LOCAL hnsw.ef_search = %L', old_ef);
        END IF;
        IF dk THEN
            EXECUTE format('SET LOCAL diskann.query_search_list_size = %L', coalesce(old_ls, '100'));
            EXECUTE format('SET LOCAL diskann.query_rescore = %L', coalesce(old_rs, '50'));
        END IF;
        RETURN;
    END IF;
    PERFORM set_config('hnsw.ef_search', least(ef, 1000)::text, true);
    RETURN QUERY EXECUTE q USING p_query, p_k;
    IF old_ef IS NOT NULL THEN
        PERFORM set_config('hnsw.ef_search', old_ef, true);
    END IF;
    IF dk THEN
        PERFORM set_config('diskann.query_search_list_size', coalesce(old_ls, '100'), true);
        PERFORM set_config('diskann.query_rescore', coalesce(old_rs, '50'), true);
    END IF;
END;
$$;

-- The distribution of docs/scaling.md, run once on a Citus coordinator right
-- after `llens db upgrade` (`llens db distribute`); running it again does
-- nothing. token_embedding is hash-distributed by sentence_id, the model,
-- vocabulary and corpus tables become reference tables (a copy on every node),
-- and the functions a worker evaluates inside distributed queries are created
-- on every node. Returns what it did, one line per step.
CREATE OR REPLACE FUNCTION llens_distribute(p_shard_count integer DEFAULT 32)
RETURNS SETOF text LANGUAGE plpgsql AS $$
DECLARE
    t        text;
    f        text;
    view_sql text;
    view_acl aclitem[];
    fn_acl   aclitem[];
    view_own text;
    fn_own   text;
    a        record;
BEGIN
    IF NOT llens_citus() THEN
        RAISE EXCEPTION 'llens: this database has no Citus extension (CREATE EXTENSION citus on the coordinator and every worker first)'
            USING ERRCODE = 'feature_not_supported';
    END IF;
    IF p_shard_count < 1 OR p_shard_count > 64000 THEN
        RAISE EXCEPTION 'llens: shard count must be 1..64000' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- one distribution at a time
    PERFORM pg_advisory_xact_lock(hashtext('llens_distribute'));
    -- Citus converts the tables tied by foreign keys to model by dropping and
    -- recreating the views over them, which llens_contexts (it returns the
    -- view's rows) blocks: take both out and put them back, grants included.
    IF EXISTS (SELECT 1 FROM unnest(ARRAY['model', 'model_layer', 'token', 'token_quota', 'corpus', 'sentence']) r(t)
                WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition p
                                   WHERE p.logicalrelid = r.t::regclass AND p.repmodel = 't'))
       AND to_regclass('token_context') IS NOT NULL THEN
        SELECT pg_get_viewdef('token_context'::regclass), c.relacl, pg_get_userbyid(c.relowner)
          INTO view_sql, view_acl, view_own FROM pg_class c WHERE c.oid = 'token_context'::regclass;
        SELECT p.proacl, pg_get_userbyid(p.proowner)
          INTO fn_acl, fn_own FROM pg_proc p WHERE p.oid = 'llens_contexts(text)'::regprocedure;
        DROP FUNCTION llens_contexts(text);
        DROP VIEW token_context;
    END IF;
    FOREACH t IN ARRAY ARRAY['model', 'model_layer', 'token', 'token_quota', 'corpus', 'sentence'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition p
                        WHERE p.logicalrelid = t::regclass AND p.repmodel = 't') THEN
            PERFORM create_reference_table(t);
            RETURN NEXT format('%s: reference table', t);
        END IF;
    END LOOP;
    IF NOT llens_distributed('token_embedding') THEN
        PERFORM create_distributed_table('token_embedding', 'sentence_id', shard_count => p_shard_count);
        RETURN NEXT format('token_embedding: distributed by sentence_id, %s shards', p_shard_count);
    END IF;
    IF view_sql IS NOT NULL THEN
        EXECUTE 'CREATE VIEW token_context AS ' || view_sql;
        EXECUTE format('ALTER VIEW token_context OWNER TO %I', view_own);
        FOR a IN SELECT * FROM aclexplode(view_acl) WHERE grantee <> 'token_context'::regclass::oid LOOP
            EXECUTE format('GRANT %s ON token_context TO %s', a.privilege_type,
                           CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END);
        END LOOP;
        -- Citus does not inline a SQL function over distributed tables, and refuses to
        -- run it with its parameter ("parameterized queries for SQL functions referencing
        -- distributed tables are not supported"); nor may a worker evaluate
        -- llens_model_id() inside a shard query (it reads the reference table model:
        -- "cannot execute a distributed query from a query on a shard"). On Citus it
        -- looks the id up first and runs the query with it.
        CREATE FUNCTION llens_contexts(p_model text)
        RETURNS SETOF token_context LANGUAGE plpgsql STABLE AS $fn$
        BEGIN
            RETURN QUERY EXECUTE format('SELECT * FROM token_context WHERE model_id = %s', llens_model_id(p_model));
        END;
        $fn$;
        EXECUTE format('ALTER FUNCTION llens_contexts(text) OWNER TO %I', fn_own);
        IF fn_acl IS NOT NULL THEN
            EXECUTE 'REVOKE EXECUTE ON FUNCTION llens_contexts(text) FROM PUBLIC';
            FOR a IN SELECT * FROM aclexplode(fn_acl) LOOP
                EXECUTE format('GRANT EXECUTE ON FUNCTION llens_contexts(text) TO %s',
                               CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END);
            END LOOP;
        END IF;
        RETURN NEXT 'token_context, llens_contexts: recreated over the distributed tables (llens_contexts in PL/pgSQL)';
    END IF;
    -- evaluated by workers inside distributed queries (tests/test_citus_ready.py's PUSHDOWN_FUNCTIONS)
    FOREACH f IN ARRAY ARRAY['llens_leaf_name(integer, integer)', 'llens_model_id(text)'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_object o
                        WHERE o.classid = 'pg_proc'::regclass AND o.objid = f::regprocedure) THEN
            PERFORM create_distributed_function(f);
            RETURN NEXT format('%s: created on every node', f);
        END IF;
    END LOOP;
END;
$$;

-- CREATE OR REPLACE reset the owner-run settings of llens_ensure_layer
SELECT llens_secure_functions();
