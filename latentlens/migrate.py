"""Run the alembic migrations programmatically (what `llens db upgrade` does)."""

from __future__ import annotations

from importlib.resources import files

import psycopg
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from latentlens.db import first_line, redact, to_sqlalchemy_url
from latentlens.errors import DatabaseUnavailable, LatentLensError


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(files("latentlens.migrations")))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def _engine(url: str) -> sa.Engine:
    return sa.create_engine(to_sqlalchemy_url(url), poolclass=sa.pool.NullPool)


def _run(url: str, fn) -> None:
    engine = _engine(url)
    try:
        with engine.begin() as conn:
            # Serialise concurrent upgrades (two `llens` processes on a new database).
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('latentlens_migrations'))"))
            cfg = _config()
            cfg.attributes["connection"] = conn
            fn(cfg)
    except sa.exc.OperationalError as e:
        orig = getattr(e, "orig", e)
        raise DatabaseUnavailable(f"cannot connect to {redact(url)}: {first_line(orig)}") from e
    except sa.exc.DBAPIError as e:
        orig = getattr(e, "orig", e)
        msg = first_line(orig)
        if isinstance(orig, psycopg.errors.InsufficientPrivilege):
            msg += " (creating the 'vector' extension needs a superuser once: see docker/init.sql)"
        raise LatentLensError(f"migration failed: {msg}") from e
    finally:
        engine.dispose()


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema to ``revision``; a no-op when it is already there."""
    _run(url, lambda cfg: command.upgrade(cfg, revision))


def downgrade(url: str, revision: str) -> None:
    _run(url, lambda cfg: command.downgrade(cfg, revision))


def current_revision(conn: psycopg.Connection) -> str | None:
    """The schema revision of the database behind an open psycopg connection."""
    row = conn.execute("SELECT to_regclass('alembic_version') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return None
    row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    return row[0] if row else None


def current_revision_url(url: str) -> str | None:
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except sa.exc.OperationalError as e:
        orig = getattr(e, "orig", e)
        raise DatabaseUnavailable(f"cannot connect to {redact(url)}: {first_line(orig)}") from e
    finally:
        engine.dispose()
