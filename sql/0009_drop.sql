-- Undo revision 0009: llens_ensure_layer as revision 0005 made it, llens_knn as
-- revision 0008 made it, and no Citus helpers. A distributed database stays
-- distributed (Citus has undistribute_table() for that).

DROP FUNCTION IF EXISTS llens_distribute(integer);

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
    IF to_regclass(leaf) IS NULL THEN
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

DROP FUNCTION IF EXISTS llens_distributed(text);
DROP FUNCTION IF EXISTS llens_citus();

SELECT llens_secure_functions();
