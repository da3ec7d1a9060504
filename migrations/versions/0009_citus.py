"""Citus: what a real cluster showed the plan of docs/scaling.md needed.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03

Run against a Citus 14 coordinator with two workers (bench/citus_cluster.py):

- ``llens_distribute()`` runs the distribution of docs/scaling.md (``llens db
  distribute``): reference tables, ``token_embedding`` by ``sentence_id``, and the
  functions workers evaluate. Citus converts the tables tied to ``model`` by dropping
  and recreating the views over them, which ``llens_contexts`` (it returns the view's
  row type) blocked: "cannot drop view token_context because other objects depend on
  it". It takes both out and puts them back, grants included. Idempotent; one error
  line on a server without Citus.
- ``llens_ensure_layer``: Citus refuses ``ALTER TABLE ... SET STORAGE`` on a
  distributed table ("alter table command is currently unsupported", the first
  ``llens ingest`` failed on it). On a distributed ``token_embedding`` the leaf is made
  as a plain table, given its storage, then attached.
- ``llens_knn``: ``set_config('hnsw.ef_search', ...)`` stays in the coordinator's
  session; on Citus it runs ``SET LOCAL`` with ``citus.propagate_set_commands =
  'local'``, which reaches the shard queries.

On a server without Citus both functions do what they did. ``llens_secure_functions()``
runs again (CREATE OR REPLACE resets SECURITY DEFINER).
"""

from __future__ import annotations

from latentlens.migrations.sqlfiles import apply_sql

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_sql("0009_citus.sql")


def downgrade() -> None:
    apply_sql("0009_drop.sql")
