"""Import runs: ``llens import-index`` records a run of kind 'import', like an ingest.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03

An import had no run: ``llens models``, provenance and the web app listed no
corpus for an imported model, and a killed import left a partial model with
nothing saying so. ``ingest_run.kind`` tells the two apart ('ingest' for every
run before this revision); an import's origin (directory, or hub repository and
commit), content hash and rows per layer live in its ``params`` and
``counters``, as an ingest's do. A new column with a constant default is a
catalog change only (no table rewrite); the downgrade drops the import runs
(their rows stay, as before this revision) and the column.

An import's contexts count against the per-token quota afterwards
(``llens_count_quota``, owner-run: since 0006 writers cannot write ``token_quota``
themselves); the downgrade drops it and restores 0006's owner-run list.
"""

from __future__ import annotations

from alembic import op
from latentlens.migrations.sqlfiles import apply_sql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "ALTER TABLE ingest_run ADD COLUMN IF NOT EXISTS kind text NOT NULL DEFAULT 'ingest' "
        "CONSTRAINT ingest_run_kind_check CHECK (kind IN ('ingest', 'import'))"
    )
    op.execute("COMMENT ON COLUMN ingest_run.kind IS 'ingest: llens ingest ran a model over the corpus; "
               "import: llens import-index loaded a pre-built index (params.origin says from where).'")
    apply_sql("0007_import_quota.sql")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS llens_count_quota(integer, integer)")
    apply_sql("0006_writers_append.sql")  # idempotent: brings back 0006's owner-run list
    op.execute("DELETE FROM ingest_run WHERE kind = 'import'")
    op.execute("ALTER TABLE ingest_run DROP COLUMN IF EXISTS kind")
