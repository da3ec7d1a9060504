"""Search: one k-NN function, non-blocking index builds, server-level ANN support.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26

- ``llens_knn`` is the single k-NN query (``llens_neighbors`` and the Python
  store call it); it restores the caller's ``hnsw.ef_search``.
- ``llens_build_index`` builds under a temporary name and swaps, so readers
  are never blocked, and analyzes the leaf; ``llens_analyze`` for loads.
- ANN support is a server setting (``llens.ann_index``), not a row of one
  database's ``llens_meta``.
- ``llens_model_id`` / ``llens_contexts`` let a context lookup by model name
  prune partitions.
"""

from __future__ import annotations

from latentlens.migrations.sqlfiles import apply_sql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_sql("0002_search.sql")


def downgrade() -> None:
    # 0001's definitions first: its llens_neighbors no longer needs llens_knn
    apply_sql("0001_store.sql")
    apply_sql("0001_query.sql")
    apply_sql("0002_drop.sql")
