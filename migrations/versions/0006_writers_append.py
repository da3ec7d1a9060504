"""Writers append: no UPDATE on shared rows; the counters a load moves go through owner-run functions.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

A writer could UPDATE every shared table (overwrite embeddings, blank sentences,
rename another member's model, change everyone's default search through
``model_layer.index_params``). Now:

- writers keep INSERT on the data tables (ingest, import) and UPDATE/DELETE only
  where row-level security limits them to their own rows: analyses, evaluations and,
  new here, ingest runs (``ingest_run.created_by``, NULL for runs started before);
- the three counters a load moves on shared rows (``model_layer`` row counts and
  versions, ``token_quota``, ``corpus.sentence_count``) move through owner-run
  functions that can only add: ``llens_add_rows``, ``llens_take_quota``,
  ``llens_add_sentences``;
- ``model_layer.index_params`` changes only as the owner: its own UPDATE
  (calibration) or the owner-run index build/drop, which record the index itself;
- ``llens_writer_grants(role)`` holds a writer group's table privileges, used here
  and by ``llens_setup_team_roles`` for groups created later.

The downgrade gives writers back INSERT and UPDATE on every data table, as 0004 did.
"""

from __future__ import annotations

from latentlens.migrations.sqlfiles import apply_sql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_sql("0006_writers_append.sql")


def downgrade() -> None:
    apply_sql("0006_drop.sql")
