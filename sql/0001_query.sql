-- latentlens query functions and views (revision 0001).

-- Nearest contextual neighbours of one query vector in one (model, layer).
--
--   SELECT * FROM llens_neighbors('HuggingFaceTB/SmolLM2-135M', 8, '[...]'::halfvec, 5);
--
-- Uses the leaf's ANN index when it has one (HNSW: recall depends on
-- hnsw.ef_search, which is raised to at least k; visual tokens, whose best
-- neighbours have cosine ~0.1-0.25, need a much larger ef_search or
-- p_exact => true); with p_exact, or without an index, it scans the leaf
-- exactly. For models wider than 4000 dimensions the index is over the
-- binary quantization and the top max(10k, 200) candidates are re-ranked by
-- exact cosine.
CREATE OR REPLACE FUNCTION llens_neighbors(
    p_model text, p_layer integer, p_query halfvec, p_k integer DEFAULT 10,
    p_exact boolean DEFAULT false)
RETURNS TABLE (
    rank integer, similarity double precision, token text, token_id integer,
    layer integer, sentence_id bigint, sentence text, "position" integer,
    char_start integer, char_end integer)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    mid   integer;
    d     integer;
    kind  text;
    found_layer boolean;
    ef    integer;
    ncand integer;
    inner_sql text;
BEGIN
    SELECT m.id, m.hidden_size INTO mid, d FROM model m WHERE m.name = p_model;
    IF mid IS NULL THEN
        RAISE EXCEPTION 'llens: unknown model "%"', p_model USING ERRCODE = 'no_data_found';
    END IF;
    SELECT true, ml.index_kind INTO found_layer, kind
      FROM model_layer ml WHERE ml.model_id = mid AND ml.layer = p_layer;
    IF found_layer IS NULL THEN
        RAISE EXCEPTION 'llens: model "%" has no layer %', p_model, p_layer
            USING ERRCODE = 'no_data_found';
    END IF;
    IF vector_dims(p_query) <> d THEN
        RAISE EXCEPTION 'llens: query has % dimensions, model "%" has %', vector_dims(p_query), p_model, d
            USING ERRCODE = 'data_exception';
    END IF;
    IF p_k < 1 THEN
        RAISE EXCEPTION 'llens: k must be at least 1' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    ef := coalesce(nullif(current_setting('hnsw.ef_search', true), '')::integer, 40);

    IF p_exact OR kind IS NULL THEN
        -- no cast to halfvec(d): the planner cannot use the index, so this is exact
        inner_sql := format(
            'SELECT e.*, e.embedding <=> $1 AS dist FROM token_embedding e '
            'WHERE e.model_id = %s AND e.layer = %s ORDER BY e.embedding <=> $1 LIMIT $2',
            mid, p_layer);
    ELSIF kind = 'hnsw_halfvec' THEN
        PERFORM set_config('hnsw.ef_search', greatest(ef, p_k)::text, true);
        inner_sql := format(
            'SELECT e.*, e.embedding::halfvec(%1$s) <=> $1::halfvec(%1$s) AS dist FROM token_embedding e '
            'WHERE e.model_id = %2$s AND e.layer = %3$s '
            'ORDER BY e.embedding::halfvec(%1$s) <=> $1::halfvec(%1$s) LIMIT $2',
            d, mid, p_layer);
    ELSE
        ncand := greatest(10 * p_k, 200);
        PERFORM set_config('hnsw.ef_search', greatest(ef, ncand)::text, true);
        inner_sql := format(
            'SELECT c.*, c.embedding <=> $1 AS dist FROM ('
            '  SELECT e.* FROM token_embedding e WHERE e.model_id = %2$s AND e.layer = %3$s '
            '  ORDER BY binary_quantize(e.embedding)::bit(%1$s) <~> binary_quantize($1::halfvec(%1$s)) '
            '  LIMIT %4$s) c '
            'ORDER BY c.embedding <=> $1 LIMIT $2',
            d, mid, p_layer, ncand);
    END IF;

    RETURN QUERY EXECUTE
        'SELECT (row_number() OVER (ORDER BY n.dist))::integer, 1 - n.dist, t.token, n.token_id, '
        '       n.layer, n.sentence_id, s.text, n.position, n.char_start, n.char_end '
        'FROM (' || inner_sql || ') n '
        'JOIN sentence s ON s.id = n.sentence_id '
        'LEFT JOIN token t ON t.model_id = n.model_id AND t.token_id = n.token_id '
        'ORDER BY n.dist'
        USING p_query, p_k;
END;
$$;

-- Every stored embedding with its model, layer, token text and full sentence;
-- marked_sentence shows the token as [[token]] where its span is known.
CREATE OR REPLACE VIEW token_context AS
SELECT e.model_id,
       m.name AS model,
       e.layer,
       e.sentence_id,
       e.position,
       e.token_id,
       t.token,
       e.char_start,
       e.char_end,
       s.corpus_id,
       s.text AS sentence,
       CASE WHEN e.char_start IS NULL THEN s.text
            ELSE left(s.text, e.char_start) || '[['
                 || substr(s.text, e.char_start + 1, e.char_end - e.char_start) || ']]'
                 || substr(s.text, e.char_end + 1)
       END AS marked_sentence,
       e.embedding
  FROM token_embedding e
  JOIN model m ON m.id = e.model_id
  JOIN sentence s ON s.id = e.sentence_id
  LEFT JOIN token t ON t.model_id = e.model_id AND t.token_id = e.token_id;

COMMENT ON VIEW token_context IS 'Each stored embedding joined to its model, token text and sentence (token marked [[like this]]).';
