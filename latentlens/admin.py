"""Database administration behind `llens db`: upgrade, status, reset, stop."""

from __future__ import annotations

from typing import Any

from latentlens import db, migrate
from latentlens.config import Settings


def _target(settings: Settings) -> str:
    if settings.embedded:
        return f"the embedded database in {db.EmbeddedServer(settings.data_dir).pgdata}"
    return db.redact(settings.database_url or "")


def describe_target(database_url: str | None) -> str:
    return _target(Settings.resolve(database_url))


def url(database_url: str | None, *, keep_running: bool = False) -> str:
    return db.resolve_url(Settings.resolve(database_url), keep_running=keep_running)


def upgrade(database_url: str | None) -> tuple[str | None, str]:
    """Migrate to head; return (revision before, revision after)."""
    target_url = url(database_url)
    before = migrate.current_revision_url(target_url)
    migrate.upgrade(target_url)
    return before, migrate.head_revision()


def reset(database_url: str | None) -> None:
    target_url = url(database_url)
    if migrate.current_revision_url(target_url) is not None:
        migrate.downgrade(target_url, "base")
    migrate.upgrade(target_url)


def stop_embedded() -> bool:
    settings = Settings.resolve(None)
    return db.EmbeddedServer(settings.data_dir).stop()


def status(database_url: str | None) -> dict[str, Any]:
    """Where the database is and what it holds, as a flat dict."""
    settings = Settings.resolve(database_url)
    target_url = db.resolve_url(settings)
    info: dict[str, Any] = {
        "database": "embedded" if settings.embedded else "server",
        "location": _target(settings),
    }
    head = migrate.head_revision()
    with db.connect(target_url, autocommit=True) as conn:
        row = db.one_row(conn.execute(
            "SELECT split_part(version(), ' ', 2), current_database(), "
            "pg_size_pretty(pg_database_size(current_database())), "
            "(SELECT extversion FROM pg_extension WHERE extname = 'vector')"
        ))
        info["postgresql"], info["dbname"], info["size"], info["pgvector"] = row
        current = migrate.current_revision(conn)
        info["schema_revision"] = current
        info["schema_head"] = head
        info["schema_current"] = current == head
        if current is not None:
            counts = db.one_row(conn.execute(
                "SELECT (SELECT count(*) FROM model), (SELECT count(*) FROM corpus), "
                "(SELECT count(*) FROM sentence), (SELECT coalesce(sum(row_count), 0) FROM model_layer), "
                "(SELECT count(*) FROM ingest_run WHERE status = 'running')"
            ))
            info["models"], info["corpora"], info["sentences"], info["embeddings"], info["running_ingests"] = (
                int(x) for x in counts
            )
        ann = db.one_row(conn.execute("SELECT current_setting(%s, true)", (db.ANN_SETTING,)))[0]
    info["ann_indexes"] = (
        "disabled: this server's pgvector failed latentlens' ANN probe (llens.ann_index = off); "
        "queries use exact search" if ann == "off" else "available"
    )
    return info
