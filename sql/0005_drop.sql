-- Undo revision 0005: token_embedding partitioned by LIST (model_id), then LIST
-- (layer); the foreign keys from evaluations and analyses to model; revision
-- 0001's llens_ensure_layer and llens_drop_model.

CREATE OR REPLACE FUNCTION llens_model_partition_name(p_model_id integer)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT format('token_embedding_m%s', p_model_id)
$$;

DO $$
DECLARE
    r     record;
    owner text;
    mpart text;
BEGIN
    IF (SELECT partstrat FROM pg_partitioned_table
         WHERE partrelid = 'token_embedding'::regclass) = 'l' THEN
        RETURN;  -- already two levels
    END IF;
    ALTER TABLE token_embedding RENAME TO token_embedding_0005;
    ALTER TABLE token_embedding_0005 RENAME CONSTRAINT token_embedding_pkey TO token_embedding_0005_pkey;
    CREATE TABLE token_embedding (
        model_id    integer  NOT NULL,
        layer       integer  NOT NULL,
        sentence_id bigint   NOT NULL,
        position    integer  NOT NULL,
        token_id    integer  NOT NULL,
        char_start  integer,
        char_end    integer,
        prefix_hash bigint   NOT NULL,
        embedding   halfvec  NOT NULL,
        PRIMARY KEY (model_id, layer, sentence_id, position)
    ) PARTITION BY LIST (model_id);
    SELECT pg_get_userbyid(relowner) INTO owner FROM pg_class WHERE oid = 'token_embedding_0005'::regclass;
    EXECUTE format('ALTER TABLE token_embedding OWNER TO %I', owner);
    FOR r IN
        SELECT a.privilege_type AS priv, a.grantee
          FROM pg_class c, aclexplode(c.relacl) a
         WHERE c.oid = 'token_embedding_0005'::regclass AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('GRANT %s ON token_embedding TO %s', r.priv,
                       CASE WHEN r.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(r.grantee)) END);
    END LOOP;
    FOR r IN
        SELECT c.relname AS leaf, b[1]::integer AS m, b[2]::integer AS l
          FROM pg_inherits i
          JOIN pg_class c ON c.oid = i.inhrelid,
               regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \((\d+), (\d+)\)') AS b
         WHERE i.inhparent = 'token_embedding_0005'::regclass
         ORDER BY 2, 3
    LOOP
        mpart := llens_model_partition_name(r.m);
        IF to_regclass(mpart) IS NULL THEN
            EXECUTE format('CREATE TABLE %I PARTITION OF token_embedding FOR VALUES IN (%s) PARTITION BY LIST (layer)',
                           mpart, r.m);
            EXECUTE format('ALTER TABLE %I OWNER TO %I', mpart, owner);
        END IF;
        EXECUTE format('ALTER TABLE token_embedding_0005 DETACH PARTITION %I', r.leaf);
        EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES IN (%s)', mpart, r.leaf, r.l);
    END LOOP;
END;
$$;

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

DROP TABLE IF EXISTS token_embedding_0005;

COMMENT ON TABLE token_embedding IS 'One L2-normalised hidden state per (model, layer, sentence, token position). Partitioned by model, then layer.';
COMMENT ON COLUMN token_embedding.position IS 'Index of the token in the sequence fed to the model (a BOS token, if any, is position 0).';
COMMENT ON COLUMN token_embedding.char_start IS 'Start of the token''s characters in sentence.text (0-based, code points); NULL if unknown.';
COMMENT ON COLUMN token_embedding.prefix_hash IS 'Hash of the token ids up to and including this token: equal prefixes give equal hidden states in a causal LM.';

-- ids of models dropped meanwhile point nowhere: clear them, then the keys hold again
UPDATE eval_run SET model_id = NULL WHERE model_id IS NOT NULL AND model_id NOT IN (SELECT id FROM model);
UPDATE analysis SET model_id = NULL WHERE model_id IS NOT NULL AND model_id NOT IN (SELECT id FROM model);
ALTER TABLE eval_run ADD CONSTRAINT eval_run_model_id_fkey
    FOREIGN KEY (model_id) REFERENCES model (id) ON DELETE SET NULL;
ALTER TABLE analysis ADD CONSTRAINT analysis_model_id_fkey
    FOREIGN KEY (model_id) REFERENCES model (id) ON DELETE SET NULL;

-- revision 0001's definitions
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

CREATE OR REPLACE FUNCTION llens_drop_model(p_model_id integer)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('llens_partition'), p_model_id);
    EXECUTE format('DROP TABLE IF EXISTS %I', llens_model_partition_name(p_model_id));
    DELETE FROM model WHERE id = p_model_id;
END;
$$;

SELECT llens_secure_functions();
