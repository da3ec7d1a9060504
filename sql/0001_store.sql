-- latentlens store functions (revision 0001).
-- Partitions and indexes are named from integer ids only: no user string
-- ever becomes an identifier.

CREATE OR REPLACE FUNCTION llens_leaf_name(p_model_id integer, p_layer integer)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT format('token_embedding_m%s_l%s', p_model_id, p_layer)
$$;

CREATE OR REPLACE FUNCTION llens_model_partition_name(p_model_id integer)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT format('token_embedding_m%s', p_model_id)
$$;

-- Create the model's partition and the (model, layer) leaf if missing, and
-- its model_layer row. Safe to call concurrently.
CREATE OR REPLACE FUNCTION llens_ensure_layer(p_model_id integer, p_layer integer)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    mpart text := llens_model_partition_name(p_model_id);
    leaf  text := llens_leaf_name(p_model_id, p_layer);
    nl    integer;
    d     integer;
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
    IF to_regclass(mpart) IS NULL THEN
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF token_embedding FOR VALUES IN (%s) PARTITION BY LIST (layer)',
            mpart, p_model_id);
    END IF;
    IF to_regclass(leaf) IS NULL THEN
        EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES IN (%s)', leaf, mpart, p_layer);
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

-- Build (or rebuild) the ANN index of one leaf. Hidden sizes up to 4000 get
-- HNSW over halfvec with cosine ops; larger ones (pgvector's halfvec HNSW
-- limit) get HNSW over the binary quantization, re-ranked exactly at query
-- time (see llens_neighbors).
CREATE OR REPLACE FUNCTION llens_build_index(
    p_model_id integer, p_layer integer,
    p_m integer DEFAULT 16, p_ef_construction integer DEFAULT 64)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    d    integer;
    leaf text := llens_leaf_name(p_model_id, p_layer);
    idx  text := llens_leaf_name(p_model_id, p_layer) || '_ann';
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
    -- latentlens marks servers whose pgvector cannot build indexes on this CPU
    -- (a crash there restarts the whole server): refuse instead.
    IF EXISTS (SELECT 1 FROM llens_meta WHERE key = 'ann_index' AND value = 'off') THEN
        RAISE EXCEPTION 'llens: ANN indexes are disabled on this server (llens_meta.ann_index = off)'
            USING ERRCODE = 'feature_not_supported';
    END IF;
    EXECUTE format('DROP INDEX IF EXISTS %I', idx);
    IF d <= 4000 THEN
        kind := 'hnsw_halfvec';
        EXECUTE format(
            'CREATE INDEX %I ON %I USING hnsw ((embedding::halfvec(%s)) halfvec_cosine_ops) '
            'WITH (m = %s, ef_construction = %s)', idx, leaf, d, p_m, p_ef_construction);
    ELSE
        kind := 'hnsw_binary';
        EXECUTE format(
            'CREATE INDEX %I ON %I USING hnsw ((binary_quantize(embedding)::bit(%s)) bit_hamming_ops) '
            'WITH (m = %s, ef_construction = %s)', idx, leaf, d, p_m, p_ef_construction);
    END IF;
    UPDATE model_layer
       SET index_kind = kind,
           index_params = jsonb_build_object('m', p_m, 'ef_construction', p_ef_construction),
           indexed_at = now()
     WHERE model_id = p_model_id AND layer = p_layer;
    RETURN idx;
END;
$$;

CREATE OR REPLACE FUNCTION llens_drop_index(p_model_id integer, p_layer integer)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('DROP INDEX IF EXISTS %I', llens_leaf_name(p_model_id, p_layer) || '_ann');
    UPDATE model_layer SET index_kind = NULL, index_params = NULL, indexed_at = NULL
     WHERE model_id = p_model_id AND layer = p_layer;
END;
$$;

-- Remove a model: its partitions (all layers at once), vocabulary, quotas,
-- runs and the model row.
CREATE OR REPLACE FUNCTION llens_drop_model(p_model_id integer)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('llens_partition'), p_model_id);
    EXECUTE format('DROP TABLE IF EXISTS %I', llens_model_partition_name(p_model_id));
    DELETE FROM model WHERE id = p_model_id;
END;
$$;
