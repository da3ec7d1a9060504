-- Undo revision 0002: back to revision 0001's functions.
DROP FUNCTION IF EXISTS llens_contexts(text);
DROP FUNCTION IF EXISTS llens_analyze(integer, integer);
DROP FUNCTION IF EXISTS llens_knn(integer, integer, halfvec, integer, boolean, integer);
DROP FUNCTION IF EXISTS llens_ann_enabled();
DROP FUNCTION IF EXISTS llens_model_id(text);
