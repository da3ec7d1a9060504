-- latentlens revision 0005: a schema Citus can distribute (docs/scaling.md,
-- checked by tests/test_citus_ready.py).

-- 1. token_embedding: one level of partitions, RANGE (model_id, layer).
-- Citus distributes single-level partitioned tables only. The leaves keep their
-- names (token_embedding_m<model>_l<layer>), keys, indexes, storage and rows;
-- they move from the old two-level parent to the new one.
DO $$
DECLARE
    r     record;
    owner text;
BEGIN
    IF (SELECT partstrat FROM pg_partitioned_table
         WHERE partrelid = 'token_embedding'::regclass) = 'r' THEN
        RETURN;  -- already one level
    END IF;
    ALTER TABLE token_embedding RENAME TO token_embedding_0004;
    ALTER TABLE token_embedding_0004 RENAME CONSTRAINT token_embedding_pkey TO token_embedding_0004_pkey;
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
    ) PARTITION BY RANGE (model_id, layer);
    -- the same owner and privileges as before (grants to the team's groups)
    SELECT pg_get_userbyid(relowner) INTO owner FROM pg_class WHERE oid = 'token_embedding_0004'::regclass;
    EXECUTE format('ALTER TABLE token_embedding OWNER TO %I', owner);
    FOR r IN
        SELECT a.privilege_type AS priv, a.grantee
          FROM pg_class c, aclexplode(c.relacl) a
         WHERE c.oid = 'token_embedding_0004'::regclass AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('GRANT %s ON token_embedding TO %s', r.priv,
                       CASE WHEN r.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(r.grantee)) END);
    END LOOP;
    -- every leaf, with its model and layer from the partition bounds
    FOR r IN
        SELECT mc.relname AS mpart, lc.relname AS leaf,
               (regexp_match(pg_get_expr(mc.relpartbound, mc.oid), '\((\d+)\)'))[1]::integer AS m,
               (regexp_match(pg_get_expr(lc.relpartbound, lc.oid), '\((\d+)\)'))[1]::integer AS l
          FROM pg_inherits mi
          JOIN pg_class mc ON mc.oid = mi.inhrelid
          JOIN pg_inherits li ON li.inhparent = mc.oid
          JOIN pg_class lc ON lc.oid = li.inhrelid
         WHERE mi.inhparent = 'token_embedding_0004'::regclass
         ORDER BY 3, 4
    LOOP
        EXECUTE format('ALTER TABLE %I DETACH PARTITION %I', r.mpart, r.leaf);
        -- PostgreSQL reads the leaf once here to check the bound
        EXECUTE format('ALTER TABLE token_embedding ATTACH PARTITION %I FOR VALUES FROM (%s, %s) TO (%s, %s)',
                       r.leaf, r.m, r.l, r.m, r.l + 1);
    END LOOP;
END;
$$;

-- the view was bound to the old parent: bind it to the new one (same columns)
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

-- the old parent now holds only the empty per-model tables
DROP TABLE IF EXISTS token_embedding_0004;

COMMENT ON TABLE token_embedding IS 'One L2-normalised hidden state per (model, layer, sentence, token position). Partitioned by RANGE (model_id, layer): one leaf per (model, layer).';
COMMENT ON COLUMN token_embedding.position IS 'Index of the token in the sequence fed to the model (a BOS token, if any, is position 0).';
COMMENT ON COLUMN token_embedding.char_start IS 'Start of the token''s characters in sentence.text (0-based, code points); NULL if unknown.';
COMMENT ON COLUMN token_embedding.prefix_hash IS 'Hash of the token ids up to and including this token: equal prefixes give equal hidden states in a causal LM.';

-- Create the (model, layer) leaf if missing, and its model_layer row. Safe to
-- call concurrently.
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

-- 2. no foreign keys from evaluations and analyses to model. Citus would turn
-- every table they tie to model (a reference table) into a Citus local table,
-- and it refuses the subquery in eval_item's and eval_verdict's policies.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT conname, conrelid::regclass AS tbl FROM pg_constraint
         WHERE contype = 'f' AND confrelid = 'model'::regclass
           AND conrelid IN ('eval_run'::regclass, 'analysis'::regclass)
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', r.tbl, r.conname);
    END LOOP;
END;
$$;

-- Remove a model: its leaves, vocabulary, quotas, runs and the model row.
-- Evaluations and saved analyses keep the model's name; their model_id is
-- cleared here, as the foreign keys' ON DELETE SET NULL did before.
CREATE OR REPLACE FUNCTION llens_drop_model(p_model_id integer)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    leaf text;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('llens_partition'), p_model_id);
    FOR leaf IN
        SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'token_embedding'::regclass
           AND c.relname ~ ('^token_embedding_m' || p_model_id || '_l[0-9]+$')
    LOOP
        EXECUTE format('DROP TABLE IF EXISTS %I', leaf);
    END LOOP;
    UPDATE eval_run SET model_id = NULL WHERE model_id = p_model_id;
    UPDATE analysis SET model_id = NULL WHERE model_id = p_model_id;
    DELETE FROM model WHERE id = p_model_id;
END;
$$;

DROP FUNCTION IF EXISTS llens_model_partition_name(integer);

-- CREATE OR REPLACE reset the owner-run settings of the functions above
SELECT llens_secure_functions();
