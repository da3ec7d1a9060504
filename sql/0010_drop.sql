-- Undo revision 0010: the atlas tables (with every leaf of atlas_token), view and functions.
DROP VIEW IF EXISTS atlas_patch_word;
DROP FUNCTION IF EXISTS llens_atlas_find(text, text, integer, integer, integer, integer);
DROP FUNCTION IF EXISTS llens_atlas_nearest(text, integer, halfvec, integer, boolean);
DROP FUNCTION IF EXISTS llens_atlas_knn(integer, integer, halfvec, integer, boolean, integer);
DROP FUNCTION IF EXISTS llens_atlas_build_index(integer, integer, integer, integer);
DROP FUNCTION IF EXISTS llens_atlas_ensure_layer(integer, integer);
DROP FUNCTION IF EXISTS llens_atlas_drop(integer);
DROP FUNCTION IF EXISTS llens_atlas_id(text);
DROP FUNCTION IF EXISTS llens_atlas_leaf_name(integer, integer);
DROP TABLE IF EXISTS atlas_run;
DROP TABLE IF EXISTS atlas_neighbour;
DROP TABLE IF EXISTS atlas_token;
DROP TABLE IF EXISTS atlas_patch;
DROP TABLE IF EXISTS atlas_image;
DROP TABLE IF EXISTS atlas_layer;
DROP TABLE IF EXISTS atlas;

DROP FUNCTION IF EXISTS llens_atlas_add_rows(integer, integer[], bigint);
-- the team functions: the migration's downgrade re-applies 0006's and 0007's
