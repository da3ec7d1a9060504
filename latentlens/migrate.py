"""Run the alembic migrations programmatically (what `llens db upgrade` does).

alembic and sqlalchemy are imported only to migrate: every Store.open checks the
schema's revision against the head, and importing them for that was most of
Lens.connect (~0.3-0.7 s on a loaded 2-core machine).
"""

from __future__ import annotations

import re
from importlib.resources import files
from typing import TYPE_CHECKING

import psycopg

from latentlens.db import first_line, redact, to_sqlalchemy_url
from latentlens.errors import DatabaseUnavailable, LatentLensError

if TYPE_CHECKING:
    import sqlalchemy as sa
    from alembic.config import Config

_REVISION = re.compile(r"""^revision\s*(?::\s*str\s*)?=\s*["']([^"']+)["']\s*$""", re.M)
_DOWN = re.compile(r"""^down_revision\s*(?::[^=]*)?=\s*(?:None|["']([^"']+)["'])\s*$""", re.M)


def _config() -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(files("latentlens.migrations")))
    return cfg


def head_revision() -> str:
    """The newest migration: read from the files' ``revision`` / ``down_revision`` lines when
    they form one chain (no alembic import), else as alembic finds it."""
    head = _head_from_files()
    if head is not None:
        return head
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def _head_from_files() -> str | None:
    """The one revision no other names as its down_revision; None where that is not clear
    (merges, branches, a file the patterns don't read): alembic decides then."""
    revs: set[str] = set()
    downs: set[str] = set()
    try:
        for f in (files("latentlens.migrations") / "versions").iterdir():
            if not f.name.endswith(".py") or f.name.startswith("_"):
                continue
            text = f.read_text()
            rev, down = _REVISION.findall(text), _DOWN.search(text)
            if len(rev) != 1 or down is None:
                return None
            revs.add(rev[0])
            if down.group(1):
                downs.add(down.group(1))
    except OSError:
        return None
    heads = revs - downs
    if len(heads) != 1 or not downs <= revs or len(downs) != len(revs) - 1:
        return None
    return heads.pop()


def _engine(url: str) -> sa.Engine:
    import sqlalchemy as sa

    return sa.create_engine(to_sqlalchemy_url(url), poolclass=sa.pool.NullPool)


def _run(url: str, fn) -> None:
    import sqlalchemy as sa

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
    from alembic import command

    _run(url, lambda cfg: command.upgrade(cfg, revision))


def downgrade(url: str, revision: str) -> None:
    from alembic import command

    _run(url, lambda cfg: command.downgrade(cfg, revision))


def current_revision(conn: psycopg.Connection) -> str | None:
    """The schema revision of the database behind an open psycopg connection."""
    row = conn.execute("SELECT to_regclass('alembic_version') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return None
    row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    return row[0] if row else None


def current_revision_url(url: str) -> str | None:
    import sqlalchemy as sa
    from alembic.runtime.migration import MigrationContext

    engine = _engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except sa.exc.OperationalError as e:
        orig = getattr(e, "orig", e)
        raise DatabaseUnavailable(f"cannot connect to {redact(url)}: {first_line(orig)}") from e
    finally:
        engine.dispose()
