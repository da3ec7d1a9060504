-- latentlens search functions (revision 0002): one k-NN query for SQL users
-- and the library alike, index builds that never block readers, ANN support
-- recorded with the server, and a context lookup that prunes partitions.

-- The model id of a name, or an error naming it. STABLE, so a filter
-- `model_id = llens_model_id('...')` is evaluated once at executor start,
-- where PostgreSQL prunes every other model's partitions (a join on
-- model.name cannot be pruned).
CREATE OR REPLACE FUNCTION llens_model_id(p_model text)
RETURNS integer LANGUAGE plpgsql STABLE AS $$
DECLARE
    mid integer;
BEGIN
    SELECT m.id INTO mid FROM model m WHERE m.name = p_model;
    IF mid IS NULL THEN
        RAISE EXCEPTION 'llens: unknown model "%"', p_model USING ERRCODE = 'no_data_found';
    END IF;
    RETURN mid;
END;
$$;

-- Whether this server may build and scan ANN indexes. The embedded server
-- records a probe's answer as llens.ann_index (ALTER SYSTEM); on a team server
-- it is unset (= on) unless an administrator turns it off.
CREATE OR REPLACE FUNCTION llens_ann_enabled()
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT coalesce(current_setting('llens.ann_index', true), 'on') <> 'off'
$$;

-- The k nearest rows of one leaf to one query, by cosine distance: the one
-- k-NN query of latentlens (llens_neighbors and the Python Store both call it).
--
-- p_exact, a leaf without an index, a server without ANN support, or a k
-- that HNSW cannot serve (hnsw.ef_search is at most 1000) give an exact scan.
-- Otherwise HNSW answers with hnsw.ef_search = p_ef_search, or by default the
-- larger of the session's value and the one the index needs for recall@10
-- >= 0.97 (measured when it was built: model_layer.index_params->>'ef_search'),
-- at least k, for this query only (the caller's setting is restored). Hidden
-- sizes over 4000 are indexed by their binary quantization: max(10k, 200)
-- candidates by Hamming distance, re-ranked by exact cosine.
CREATE OR REPLACE FUNCTION llens_knn(
    p_model_id integer, p_layer integer, p_query halfvec, p_k integer DEFAULT 10,
    p_exact boolean DEFAULT false, p_ef_search integer DEFAULT NULL)
RETURNS TABLE (sentence_id bigint, "position" integer, token_id integer,
               char_start integer, char_end integer, distance double precision)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    d      integer;
    kind   text;
    found  boolean;
    leaf   text := llens_leaf_name(p_model_id, p_layer);
    old_ef text;
    ef     integer;
    needed integer;
    ncand  integer;
    q      text;
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
    ncand := greatest(10 * p_k, 200);
    IF p_exact OR kind IS NULL OR NOT llens_ann_enabled()
       OR (kind = 'hnsw_halfvec' AND p_k > 1000) OR (kind = 'hnsw_binary' AND ncand > 1000) THEN
        -- no cast to halfvec(d): no index matches, so the leaf is scanned exactly
        q := format('SELECT e.sentence_id, e.position, e.token_id, e.char_start, e.char_end, '
                    '(e.embedding <=> $1)::float8 FROM %I e '
                    'ORDER BY e.embedding <=> $1 LIMIT $2', leaf);
    ELSIF kind = 'hnsw_halfvec' THEN
        q := format('SELECT e.sentence_id, e.position, e.token_id, e.char_start, e.char_end, '
                    '(e.embedding::halfvec(%1$s) <=> $1::halfvec(%1$s))::float8 FROM %2$I e '
                    'ORDER BY e.embedding::halfvec(%1$s) <=> $1::halfvec(%1$s) LIMIT $2', d, leaf);
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
END;
$$;

-- Nearest contextual neighbours of one query vector in one (model, layer),
-- with their token and sentence:
--
--   SELECT * FROM llens_neighbors('HuggingFaceTB/SmolLM2-135M', 8, '[...]'::halfvec, 5);
--
-- HNSW where the leaf has an index (raise hnsw.ef_search, or pass
-- p_exact => true, for out-of-distribution queries such as visual tokens:
-- their best neighbours have cosine ~0.1-0.25, where HNSW misses many).
CREATE OR REPLACE FUNCTION llens_neighbors(
    p_model text, p_layer integer, p_query halfvec, p_k integer DEFAULT 10,
    p_exact boolean DEFAULT false)
RETURNS TABLE (
    rank integer, similarity double precision, token text, token_id integer,
    layer integer, sentence_id bigint, sentence text, "position" integer,
    char_start integer, char_end integer)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    mid integer := llens_model_id(p_model);
BEGIN
    IF NOT EXISTS (SELECT 1 FROM model_layer ml WHERE ml.model_id = mid AND ml.layer = p_layer) THEN
        RAISE EXCEPTION 'llens: model "%" has no layer %', p_model, p_layer
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN QUERY EXECUTE format(
        'SELECT (row_number() OVER (ORDER BY n.distance))::integer, 1 - n.distance, t.token, n.token_id, '
        '       %2$s, n.sentence_id, s.text, n.position, n.char_start, n.char_end '
        'FROM llens_knn(%1$s, %2$s, $1, $2, $3) n '
        'JOIN sentence s ON s.id = n.sentence_id '
        'LEFT JOIN token t ON t.model_id = %1$s AND t.token_id = n.token_id '
        'ORDER BY n.distance', mid, p_layer)
    USING p_query, p_k, p_exact;
END;
$$;

-- Every stored context of one model (optionally one layer), with partition
-- pruning: SELECT * FROM llens_contexts('HuggingFaceTB/SmolLM2-135M') WHERE layer = 8.
-- (An inlined SQL function: the filter on llens_model_id() prunes at executor start.)
CREATE OR REPLACE FUNCTION llens_contexts(p_model text)
RETURNS SETOF token_context LANGUAGE sql STABLE AS $$
    SELECT * FROM token_context WHERE model_id = llens_model_id(p_model)
$$;

-- Refresh the planner's statistics of one leaf. latentlens calls it after
-- every load and index build: without statistics the planner estimates one
-- row per leaf and never picks the HNSW index (and autovacuum never analyzes
-- partitioned parents, nor runs when the embedded server is stopped).
CREATE OR REPLACE FUNCTION llens_analyze(p_model_id integer, p_layer integer)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    leaf text := llens_leaf_name(p_model_id, p_layer);
BEGIN
    IF to_regclass(leaf) IS NOT NULL THEN
        EXECUTE format('ANALYZE %I', leaf);
    END IF;
END;
$$;

-- Build (or rebuild) the ANN index of one leaf, without blocking readers:
-- the new index is built under a temporary name (CREATE INDEX takes a SHARE
-- lock: queries go on, writes to this leaf wait), then swapped in with the
-- old one dropped, which holds the leaf's exclusive lock only until commit.
-- Hidden sizes up to 4000 get HNSW over halfvec with cosine ops; larger ones
-- (pgvector's halfvec HNSW limit) HNSW over the binary quantization.
-- The defaults here are latentlens' HNSW defaults.
CREATE OR REPLACE FUNCTION llens_build_index(
    p_model_id integer, p_layer integer,
    p_m integer DEFAULT 16, p_ef_construction integer DEFAULT 64)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    d    integer;
    leaf text := llens_leaf_name(p_model_id, p_layer);
    idx  text := llens_leaf_name(p_model_id, p_layer) || '_ann';
    tmp  text := llens_leaf_name(p_model_id, p_layer) || '_ann_new';
    kind text;
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
    -- one build per leaf at a time (two would deadlock upgrading their locks at the swap)
    PERFORM pg_advisory_xact_lock(hashtext('llens_index'), hashtext(leaf));
    EXECUTE format('DROP INDEX IF EXISTS %I', tmp);
    IF d <= 4000 THEN
        kind := 'hnsw_halfvec';
        EXECUTE format(
            'CREATE INDEX %I ON %I USING hnsw ((embedding::halfvec(%s)) halfvec_cosine_ops) '
            'WITH (m = %s, ef_construction = %s)', tmp, leaf, d, p_m, p_ef_construction);
    ELSE
        kind := 'hnsw_binary';
        EXECUTE format(
            'CREATE INDEX %I ON %I USING hnsw ((binary_quantize(embedding)::bit(%s)) bit_hamming_ops) '
            'WITH (m = %s, ef_construction = %s)', tmp, leaf, d, p_m, p_ef_construction);
    END IF;
    -- statistics before the swap: ANALYZE does not block readers, the swap below does
    -- (its exclusive lock lasts until commit)
    PERFORM llens_analyze(p_model_id, p_layer);
    EXECUTE format('DROP INDEX IF EXISTS %I', idx);
    EXECUTE format('ALTER INDEX %I RENAME TO %I', tmp, idx);
    UPDATE model_layer
       SET index_kind = kind,
           index_params = jsonb_build_object('m', p_m, 'ef_construction', p_ef_construction),
           indexed_at = now()
     WHERE model_id = p_model_id AND layer = p_layer;
    RETURN idx;
END;
$$;

-- Superseded by the server setting llens.ann_index.
DELETE FROM llens_meta WHERE key = 'ann_index';
