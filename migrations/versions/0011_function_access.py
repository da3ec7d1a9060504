"""Owner-run functions listed in a table, not restated by every migration.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03

``llens_secure_functions`` makes the functions writers may call run as their
owner (SECURITY DEFINER, search_path pinned) and keeps the owner's own ones
from PUBLIC. Until now it named them in a list, so 0006, 0007 and 0010 each
redefined it with one name more. ``llens_function_access`` holds that list;
a migration adding such a function inserts a row and calls
``llens_secure_functions()``. Only the owner can write the table (a row there
decides what runs with the owner's rights). The downgrade drops it and
restores 0010's definition.
"""

from __future__ import annotations

from latentlens.migrations.sqlfiles import apply_sql

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_sql("0011_function_access.sql")


def downgrade() -> None:
    apply_sql("0011_drop.sql")
