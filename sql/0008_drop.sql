-- Undo revision 0008 (then 0002_search.sql restores its llens_knn and
-- llens_build_index): DiskANN indexes go (their layers are left without an
-- index: `llens index build` makes binary-quantized HNSW again). The
-- vectorscale extension stays installed: something else may use it.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT model_id, layer FROM model_layer WHERE index_kind = 'diskann' LOOP
        PERFORM llens_drop_index(r.model_id, r.layer);
    END LOOP;
END;
$$;
ALTER TABLE model_layer DROP CONSTRAINT IF EXISTS model_layer_index_kind_check;
ALTER TABLE model_layer ADD CONSTRAINT model_layer_index_kind_check
    CHECK (index_kind IN ('hnsw_halfvec', 'hnsw_binary'));
DROP FUNCTION IF EXISTS llens_build_index(integer, integer, integer, integer, text);
