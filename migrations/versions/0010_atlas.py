"""The atlas: visual tokens of an image collection and their neighbours, found by word.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03

``llens atlas build`` runs a VLM over a collection and stores, per image (content hash,
path, size), per patch (box in image pixels) and per visual layer, the visual token
(``atlas_token``, partitioned by RANGE (atlas_id, layer) like ``token_embedding``, a leaf
and an ANN index per (atlas, layer)) and its top-k LatentLens neighbours
(``atlas_neighbour``, indexed by lower(word)). Users call ``llens_atlas_find`` (patches
whose top-k words include a word), ``llens_atlas_nearest`` (nearest visual tokens of a
vector) and the view ``atlas_patch_word``. New tables, and the team's functions
(``llens_writer_grants``, ``llens_secure_functions``) learn them: writers append to an
atlas as they do to the embeddings (0006), their build runs are theirs alone.
"""

from __future__ import annotations

from latentlens.migrations.sqlfiles import apply_sql

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_sql("0010_atlas.sql")


def downgrade() -> None:
    apply_sql("0010_drop.sql")
    # the team functions as 0006 and 0007 left them (both files are idempotent)
    apply_sql("0006_writers_append.sql")
    apply_sql("0007_import_quota.sql")
