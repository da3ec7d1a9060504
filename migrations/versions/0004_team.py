"""A team on one database: group roles, owner-run functions, saved analyses, row-level security.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26

- Two NOLOGIN group roles per database (reader, writer; ``llens_team_role``),
  created when the migrating role may create roles (else later, by
  ``llens db grant-reader``). Members are LOGIN roles granted one of them.
- ``llens_ensure_layer``, ``llens_build_index``, ``llens_drop_index`` and
  ``llens_analyze`` run as the owner (SECURITY DEFINER, pinned search_path)
  and only writers may execute them: a writer creates partitions and indexes
  of tables it does not own, a reader cannot. ``llens_drop_model`` is the
  owner's alone. A later migration that redefines one of these functions
  must call ``llens_secure_functions()`` again.
- ``analysis``: saved queries and evaluations, with provenance.
- Row-level security on analysis and evaluations: all read, a writer changes
  and deletes only its own.
"""

from __future__ import annotations

from latentlens.migrations.sqlfiles import apply_sql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_sql("0004_team.sql")


def downgrade() -> None:
    apply_sql("0004_drop.sql")
