"""Citus-ready: one level of partitions for embeddings, no foreign keys from evaluations to models.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27

Past one machine latentlens runs on Citus (docs/scaling.md); tests/test_citus_ready.py
reads the catalog and checks the rules Citus enforces for the planned distribution.
Two of them the schema broke:

- Citus distributes a partitioned table only if its partitions are not partitioned
  themselves ("distributing multi-level partitioned tables is not supported"), and it
  refuses a new partition that is. ``token_embedding`` was LIST (model_id), each model's
  table LIST (layer); it is now RANGE (model_id, layer), one leaf per (model, layer),
  with the same names (``token_embedding_m<model>_l<layer>``), keys, indexes, storage
  and rows. The planner prunes as before: ``model_id = m`` keeps that model's leaves,
  ``model_id = m AND layer = l`` one leaf. The upgrade moves each leaf (DETACH, then
  ATTACH, which reads the leaf once to check its bound) under token_embedding's
  exclusive lock: on a filled server it takes about one read of the embeddings.
- Citus turns local tables that foreign keys tie to a reference table (``model``) into
  Citus local tables, and refuses row-level-security policies with subqueries on them.
  ``eval_item``'s and ``eval_verdict``'s policies look up the run's owner with a
  subquery, and ``eval_run.model_id`` / ``analysis.model_id`` tied them to ``model``.
  Those two foreign keys (ON DELETE SET NULL) are dropped; ``llens_drop_model`` clears
  the ids itself, so dropping a model through latentlens behaves as before.

``llens_ensure_layer`` and ``llens_drop_model`` follow the new layout,
``llens_model_partition_name`` goes, and ``llens_secure_functions()`` runs again
(CREATE OR REPLACE resets SECURITY DEFINER). The downgrade restores all of it.
"""

from __future__ import annotations

from latentlens.migrations.sqlfiles import apply_sql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_sql("0005_citus_ready.sql")


def downgrade() -> None:
    apply_sql("0005_drop.sql")
