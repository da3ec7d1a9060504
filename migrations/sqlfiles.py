"""Apply the SQL files of sql/ from a migration."""

from __future__ import annotations

from importlib.resources import files

from alembic import op


def read_sql(name: str) -> str:
    return files("latentlens.sql").joinpath(name).read_text(encoding="utf-8")


def apply_sql(name: str) -> None:
    # Straight to psycopg with no parameters: '%' in plpgsql format() strings
    # must not be read as placeholders, and a multi-statement string is sent
    # as one simple query, inside alembic's transaction.
    op.get_bind().connection.driver_connection.execute(read_sql(name))
