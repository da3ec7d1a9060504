-- latentlens revision 0008: pgvectorscale's StreamingDiskANN as a second index
-- kind for layers wider than 4000 dimensions (pgvector's HNSW cannot index
-- halfvec there), beside HNSW over the binary quantization.
--
-- Measured on 4096-d clustered rows (docs/query.md, bench/wide.py): DiskANN
-- (statistical binary quantization: thresholds at each dimension's mean,
-- asymmetric distances) finds the true top-10 where sign-bit HNSW re-ranking
-- 200 candidates misses 7-16% of it, at about twice HNSW's time a query: what
-- HNSW needs to re-rank 400 candidates (recall 0.99); but it builds 16x slower. So llens_build_index still builds binary HNSW by default
-- and the library (Store.build_index) replaces it by DiskANN on a leaf where
-- its recall calibration says it falls short; p_kind asks for either.
-- Both return candidates by their approximate distance; llens_knn re-ranks
-- them by exact cosine over the stored halfvec.

ALTER TABLE model_layer DROP CONSTRAINT IF EXISTS model_layer_index_kind_check;
ALTER TABLE model_layer ADD CONSTRAINT model_layer_index_kind_check
    CHECK (index_kind IN ('hnsw_halfvec', 'hnsw_binary', 'diskann'));

-- pgvectorscale where the server ships it and this role may create it (the
-- embedded server: yes; a team server: a superuser may run
-- CREATE EXTENSION vectorscale later: builds look for it each time).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vectorscale') THEN
        BEGIN
            CREATE EXTENSION IF NOT EXISTS vectorscale;
        EXCEPTION WHEN OTHERS THEN
            RAISE NOTICE 'llens: vectorscale not installed (%): diskann indexes unavailable', SQLERRM;
        END;
    END IF;
END;
$$;

-- As in revision 0002, and: kind 'diskann' (candidates from the DiskANN index
-- by its quantized distance, diskann.query_search_list_size = the ef chosen
-- as for HNSW, pgvectorscale's own re-scoring off: it reads the heap column,
-- which an index over an expression does not have); both wide kinds re-rank
-- max(10k, 200, ef) candidates by exact cosine, so that a larger ef (what
-- calibrate_index raises for recall) also widens the re-rank; and a leaf
-- whose index is gone (an extension dropped with CASCADE) is scanned exactly.
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

-- As in revision 0002, with p_kind: NULL for the default of the layer's width
-- (hnsw_halfvec up to 4000 dimensions, hnsw_binary above), or 'diskann' for a
-- wider layer (refused where pgvectorscale is not installed). DiskANN takes
-- its own build parameters (num_neighbors 50,
-- search_list_size 100, statistical binary quantization of 1 bit a
-- dimension); p_m and p_ef_construction are HNSW's.
DROP FUNCTION IF EXISTS llens_build_index(integer, integer, integer, integer);
CREATE OR REPLACE FUNCTION llens_build_index(
    p_model_id integer, p_layer integer,
    p_m integer DEFAULT 16, p_ef_construction integer DEFAULT 64, p_kind text DEFAULT NULL)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    d      integer;
    leaf   text := llens_leaf_name(p_model_id, p_layer);
    idx    text := llens_leaf_name(p_model_id, p_layer) || '_ann';
    tmp    text := llens_leaf_name(p_model_id, p_layer) || '_ann_new';
    kind   text := p_kind;
    params jsonb;
BEGIN
    SELECT hidden_size INTO d FROM model WHERE id = p_model_id;
    IF d IS NULL THEN
        RAISE EXCEPTION 'llens: no model with id %', p_model_id USING ERRCODE = 'no_data_found';
    END IF;
    IF to_regclass(leaf) IS NULL THEN
        RAISE EXCEPTION 'llens: model id % has no layer %', p_model_id, p_layer
            USING ERRCODE = 'no_data_found';
    END IF;
    -- a server whose pgvector crashed the ANN probe (a crash there restarts
    -- the whole server): refuse instead
    IF NOT llens_ann_enabled() THEN
        RAISE EXCEPTION 'llens: ANN indexes are disabled on this server (llens.ann_index = off)'
            USING ERRCODE = 'feature_not_supported';
    END IF;
    IF p_m < 2 OR p_m > 100 OR p_ef_construction < 4 OR p_ef_construction > 1000 THEN
        RAISE EXCEPTION 'llens: m must be 2..100 and ef_construction 4..1000'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    kind := coalesce(kind, CASE WHEN d <= 4000 THEN 'hnsw_halfvec' ELSE 'hnsw_binary' END);
    IF kind NOT IN ('hnsw_halfvec', 'hnsw_binary', 'diskann') THEN
        RAISE EXCEPTION 'llens: unknown index kind "%" (hnsw_halfvec, hnsw_binary or diskann)', kind
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF (kind = 'hnsw_halfvec') <> (d <= 4000) THEN
        RAISE EXCEPTION 'llens: % indexes are for layers % 4000 dimensions; this model has %', kind,
            CASE WHEN kind = 'hnsw_halfvec' THEN 'of at most' ELSE 'wider than' END, d
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF kind = 'diskann' AND NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vectorscale') THEN
        RAISE EXCEPTION 'llens: diskann indexes need the vectorscale extension, not installed on this server '
            '(CREATE EXTENSION vectorscale, as a superuser)' USING ERRCODE = 'feature_not_supported';
    END IF;
    -- one build per leaf at a time (two would deadlock upgrading their locks at the swap)
    PERFORM pg_advisory_xact_lock(hashtext('llens_index'), hashtext(leaf));
    EXECUTE format('DROP INDEX IF EXISTS %I', tmp);
    params := jsonb_build_object('m', p_m, 'ef_construction', p_ef_construction);
    IF kind = 'hnsw_halfvec' THEN
        EXECUTE format(
            'CREATE INDEX %I ON %I USING hnsw ((embedding::halfvec(%s)) halfvec_cosine_ops) '
            'WITH (m = %s, ef_construction = %s)', tmp, leaf, d, p_m, p_ef_construction);
    ELSIF kind = 'hnsw_binary' THEN
        EXECUTE format(
            'CREATE INDEX %I ON %I USING hnsw ((binary_quantize(embedding)::bit(%s)) bit_hamming_ops) '
            'WITH (m = %s, ef_construction = %s)', tmp, leaf, d, p_m, p_ef_construction);
    ELSE
        EXECUTE format(
            'CREATE INDEX %I ON %I USING diskann ((embedding::vector(%s)) vector_cosine_ops) '
            'WITH (num_neighbors = 50, search_list_size = 100, num_bits_per_dimension = 1)', tmp, leaf, d);
        params := jsonb_build_object('num_neighbors', 50, 'search_list_size', 100, 'num_bits_per_dimension', 1);
    END IF;
    -- statistics before the swap: ANALYZE does not block readers, the swap below does
    -- (its exclusive lock lasts until commit)
    PERFORM llens_analyze(p_model_id, p_layer);
    EXECUTE format('DROP INDEX IF EXISTS %I', idx);
    EXECUTE format('ALTER INDEX %I RENAME TO %I', tmp, idx);
    UPDATE model_layer
       SET index_kind = kind, index_params = params, indexed_at = now()
     WHERE model_id = p_model_id AND layer = p_layer;
    RETURN idx;
END;
$$;

SELECT llens_secure_functions();
