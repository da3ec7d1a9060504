"""Migrations go up, down and up again, and leave the objects users call."""

from __future__ import annotations

import psycopg
import pytest

from latentlens import migrate


def _objects(url: str) -> dict[str, set[str]]:
    with psycopg.connect(url) as conn:
        tables = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        funcs = {r[0] for r in conn.execute(
            "SELECT proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = 'public' AND proname LIKE 'llens_%'")}
        views = {r[0] for r in conn.execute("SELECT viewname FROM pg_views WHERE schemaname = 'public'")}
    return {"tables": tables, "functions": funcs, "views": views}


def test_up_down_up(empty_db_url):
    assert migrate.current_revision_url(empty_db_url) is None
    migrate.upgrade(empty_db_url)
    head = migrate.head_revision()
    assert migrate.current_revision_url(empty_db_url) == head
    objs = _objects(empty_db_url)
    assert {"model", "model_layer", "corpus", "sentence", "ingest_run", "token_embedding", "token"} <= objs["tables"]
    assert {"llens_neighbors", "llens_ensure_layer", "llens_build_index", "llens_drop_model"} <= objs["functions"]
    assert "token_context" in objs["views"]

    migrate.upgrade(empty_db_url)  # idempotent
    assert migrate.current_revision_url(empty_db_url) == head

    migrate.downgrade(empty_db_url, "base")
    objs = _objects(empty_db_url)
    assert objs["functions"] == set()
    assert objs["views"] == set()
    assert objs["tables"] <= {"alembic_version"}

    migrate.upgrade(empty_db_url)
    assert migrate.current_revision_url(empty_db_url) == head


def test_token_embedding_is_partitioned_by_model_and_layer(db_url):
    """One level (Citus distributes no multi-level partitioning): RANGE (model_id, layer)."""
    with psycopg.connect(db_url) as conn:
        strategy, = conn.execute(
            "SELECT partstrat FROM pg_partitioned_table WHERE partrelid = 'token_embedding'::regclass"
        ).fetchone()
        cols = conn.execute(
            "SELECT a.attname FROM pg_partitioned_table p JOIN pg_attribute a "
            "ON a.attrelid = p.partrelid AND a.attnum = ANY(p.partattrs::int2[]) "
            "WHERE p.partrelid = 'token_embedding'::regclass"
        ).fetchall()
    assert strategy == "r"
    assert [c[0] for c in cols] == ["model_id", "layer"]


def test_sql_files_ship_with_the_package():
    from importlib.resources import files

    names = {p.name for p in files("latentlens.sql").iterdir()}
    assert {"0001_store.sql", "0001_query.sql", "0001_drop.sql"} <= names


def test_writers_append_goes_down_and_up(empty_db_url):
    """0006 takes writers' UPDATE on shared rows away; its downgrade gives it back, as 0004 had it."""
    def writer_can(what: str, table: str) -> bool:
        with psycopg.connect(empty_db_url) as conn:
            return conn.execute("SELECT has_table_privilege(llens_team_role('writer'), %s, %s)",
                                (table, what)).fetchone()[0]

    def has(sql: str) -> bool:
        with psycopg.connect(empty_db_url) as conn:
            return bool(conn.execute(sql).fetchone()[0])

    migrate.upgrade(empty_db_url)
    migrate.downgrade(empty_db_url, "0005")
    assert migrate.current_revision_url(empty_db_url) == "0005"
    assert writer_can("UPDATE", "token_embedding") and writer_can("UPDATE", "model")
    assert not has("SELECT to_regprocedure('llens_add_rows(integer, integer[], bigint)') IS NOT NULL")
    assert not has("SELECT count(*) FROM pg_attribute WHERE attrelid = 'ingest_run'::regclass "
                   "AND attname = 'created_by'")
    assert has("SELECT prosecdef FROM pg_proc WHERE proname = 'llens_ensure_layer'"), "0004's owner-run list stays"

    migrate.upgrade(empty_db_url, "0006")
    assert not writer_can("UPDATE", "token_embedding") and not writer_can("UPDATE", "model")
    assert not writer_can("INSERT", "model_layer") and not writer_can("UPDATE", "sentence")
    assert writer_can("INSERT", "sentence") and writer_can("UPDATE", "ingest_run")
    assert has("SELECT to_regprocedure('llens_take_quota(integer, integer[], integer[], integer)') IS NOT NULL")
    assert has("SELECT bool_and(prosecdef) FROM pg_proc WHERE proname IN "
               "('llens_add_rows', 'llens_take_quota', 'llens_add_sentences')"), "owner-run"
    assert has("SELECT relrowsecurity FROM pg_class WHERE oid = 'ingest_run'::regclass")

    migrate.upgrade(empty_db_url)
    assert migrate.current_revision_url(empty_db_url) == migrate.head_revision()


def test_0007_import_runs_down_and_up(empty_db_url):
    """ingest_run.kind: 'ingest' for runs from before 0007; its downgrade drops the import runs
    (their rows stay, as before 0007) and the column, keeping the ingest runs."""
    migrate.downgrade(empty_db_url, "base")  # whatever an earlier test left
    migrate.upgrade(empty_db_url, "0005")
    assert migrate.current_revision_url(empty_db_url) == "0005"
    with psycopg.connect(empty_db_url) as conn:
        conn.execute("INSERT INTO model (name, hidden_size, num_layers) VALUES ('m', 4, 2)")
        conn.execute("INSERT INTO corpus (name, content_hash) VALUES ('c', 'h')")
        conn.execute("INSERT INTO ingest_run (model_id, corpus_id, layers) SELECT m.id, c.id, '{1}' FROM model m, corpus c")
    migrate.upgrade(empty_db_url, "0007")
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT kind FROM ingest_run").fetchall() == [("ingest",)]  # an existing run
        conn.execute("INSERT INTO ingest_run (model_id, corpus_id, layers, kind) "
                     "SELECT model_id, corpus_id, layers, 'import' FROM ingest_run")
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("INSERT INTO ingest_run (model_id, corpus_id, layers, kind) "
                         "SELECT model_id, corpus_id, layers, 'other' FROM ingest_run LIMIT 1")
    migrate.downgrade(empty_db_url, "0005")
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT count(*) FROM ingest_run").fetchone()[0] == 1
        cols = {r[0] for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'ingest_run'")}
    assert "kind" not in cols and "status" in cols
    migrate.upgrade(empty_db_url)
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT kind, count(*) FROM ingest_run GROUP BY 1").fetchall() == [("ingest", 1)]
    migrate.downgrade(empty_db_url, "base")


def test_owner_run_functions_come_from_one_table(empty_db_url):
    """0011: llens_function_access decides which functions run as their owner; every
    SECURITY DEFINER llens function is listed there, writers may call exactly those and
    cannot write the table; the downgrade leaves 0010's grants as they were."""
    def state(conn) -> tuple[set[str], set[str]]:
        rows = conn.execute(
            "SELECT p.proname, p.prosecdef, has_function_privilege(llens_team_role('writer'), p.oid, 'EXECUTE') "
            "FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace AND p.proname LIKE 'llens%'"
        ).fetchall()
        return {r[0] for r in rows if r[1]}, {r[0] for r in rows if r[2]}

    migrate.downgrade(empty_db_url, "base")
    migrate.upgrade(empty_db_url, "0010")
    with psycopg.connect(empty_db_url) as conn:
        before = state(conn)
    migrate.upgrade(empty_db_url)
    with psycopg.connect(empty_db_url) as conn:
        definer, writer_calls = state(conn)
        listed = dict(conn.execute("SELECT proname::text, access FROM llens_function_access").fetchall())
        assert definer == {n for n, a in listed.items() if a == "definer"}, "a SECURITY DEFINER function not in the table"
        assert definer <= writer_calls
        assert not writer_calls & {n for n, a in listed.items() if a == "owner_only"}
        assert "llens_drop_model" in listed and "llens_atlas_add_rows" in definer
        for what in ("INSERT", "UPDATE", "DELETE"):
            assert not conn.execute("SELECT has_table_privilege(llens_team_role('writer'), "
                                    "'llens_function_access', %s)", (what,)).fetchone()[0]
        assert (definer, writer_calls) == before, "0011 changes where the list lives, not what it grants"
    migrate.downgrade(empty_db_url, "0010")
    with psycopg.connect(empty_db_url) as conn:
        assert state(conn) == before
        assert conn.execute("SELECT to_regclass('llens_function_access')").fetchone()[0] is None
    migrate.upgrade(empty_db_url)
    assert migrate.current_revision_url(empty_db_url) == migrate.head_revision()
