"""Alembic environment: run against the connection latentlens hands over.

latentlens runs migrations programmatically (`llens db upgrade`), passing an
open SQLAlchemy connection in ``config.attributes["connection"]``. Plain
``alembic -x url=...`` use also works for operators who prefer it.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

config = context.config
connection = config.attributes.get("connection")


def run(conn) -> None:
    context.configure(connection=conn, target_metadata=None, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    run(connection)
else:  # pragma: no cover - operator path
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    engine = create_engine(url)
    with engine.connect() as conn:
        run(conn)
