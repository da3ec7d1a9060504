"""Wide layers: pgvectorscale's StreamingDiskANN as an index kind for hidden sizes over 4000.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03

pgvector's HNSW indexes halfvec up to 4000 dimensions; the 4096-d models
(Llama-3.1-8B, Qwen3-VL-8B, Molmo2-8B) get HNSW over ``binary_quantize``.
Measured on 4096-d rows (docs/query.md), DiskANN has the better recall for
its time a query, but builds 16x slower: binary HNSW is still built first,
and Store.build_index replaces it by DiskANN on a leaf where its recall
calibration falls short; ``llens index build --kind`` asks for either.
DiskANN needs the extension (the embedded server ships it; the migration
creates it where it may).

- ``model_layer.index_kind`` also allows ``'diskann'``.
- ``llens_build_index`` takes ``p_kind`` (NULL = the default for the width),
  refusing ``'diskann'`` without the extension or at 4000 dimensions or less.
- ``llens_knn`` answers from a DiskANN index (re-ranked by exact cosine, as
  the binary HNSW is), re-ranks more candidates when ef grows, and scans
  exactly when a leaf's index has gone.

The downgrade drops DiskANN indexes (those layers are left unindexed) and
restores revision 0002's functions.
"""

from __future__ import annotations

from alembic import op
from latentlens.migrations.sqlfiles import apply_sql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_sql("0008_wide_index.sql")


def downgrade() -> None:
    apply_sql("0008_drop.sql")
    apply_sql("0002_search.sql")
    op.execute("SELECT llens_secure_functions()")  # CREATE OR REPLACE reset SECURITY DEFINER
