-- Undo revision 0001's functions and views.
DROP VIEW IF EXISTS token_context;
DROP FUNCTION IF EXISTS llens_neighbors(text, integer, halfvec, integer, boolean);
DROP FUNCTION IF EXISTS llens_drop_model(integer);
DROP FUNCTION IF EXISTS llens_drop_index(integer, integer);
DROP FUNCTION IF EXISTS llens_build_index(integer, integer, integer, integer);
DROP FUNCTION IF EXISTS llens_ensure_layer(integer, integer);
DROP FUNCTION IF EXISTS llens_model_partition_name(integer);
DROP FUNCTION IF EXISTS llens_leaf_name(integer, integer);
