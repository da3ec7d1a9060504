"""`llens db ...` and the CLI's error contract, through click's runner."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from latentlens.cli.main import COMMANDS, cli


@pytest.fixture
def runner():
    return CliRunner()


def test_help_lists_every_command(runner):
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


def test_startup_is_light():
    import subprocess
    import sys

    code = (
        "import sys; from latentlens.cli.main import cli; import latentlens.store, latentlens.admin; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_upgrade_is_idempotent_and_status_reports(runner, db_url):
    result = runner.invoke(cli, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert "up to date" in result.output
    result = runner.invoke(cli, ["db", "status", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)[0]
    assert info["database"] == "server"
    assert info["schema_current"] is True
    assert info["pgvector"].startswith("0.8")
    assert info["models"] == 0


def test_status_of_an_empty_database_says_upgrade(runner, empty_db_url):
    result = runner.invoke(cli, ["db", "status", "--database-url", empty_db_url])
    assert result.exit_code == 4
    assert "schema_revision" in result.output


def test_reset_asks_then_wipes(runner, db_url, store):
    store.register_model("to-be-reset", hidden_size=8, num_layers=2)
    result = runner.invoke(cli, ["db", "reset"], input="n\n")
    assert result.exit_code == 1 and "Aborted" in result.output
    assert store.list_models()
    store.close()
    result = runner.invoke(cli, ["db", "reset", "--yes"])
    assert result.exit_code == 0, result.output
    from latentlens.store import Store

    with Store.open(db_url) as fresh:
        assert fresh.list_models() == []


def test_unreachable_database_is_one_line(runner, tmp_path):
    url = f"postgresql://u:pw@/x?host={tmp_path}&connect_timeout=2"
    result = runner.invoke(cli, ["db", "status", "--database-url", url])
    assert result.exit_code == 3
    assert result.output.startswith("Error: cannot connect to")
    assert "Traceback" not in result.output
    assert "pw" not in result.output


def test_url_prints_a_connectable_url(runner, db_url):
    result = runner.invoke(cli, ["db", "url"])
    assert result.exit_code == 0
    assert result.output.strip() == db_url


def test_embedded_default_end_to_end(runner, tmp_path, monkeypatch):
    """No URL set: the embedded server starts in the data dir and is reused."""
    monkeypatch.delenv("LLENS_DATABASE_URL", raising=False)
    result = runner.invoke(cli, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["db", "status", "--json"])
    info = json.loads(result.output)[0]
    assert info["database"] == "embedded"
    assert info["schema_current"] is True


def test_docker_compose_is_consistent():
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1] / "docker"
    compose = yaml.safe_load((root / "compose.yaml").read_text())
    db = compose["services"]["db"]
    assert db["image"].startswith("pgvector/pgvector:")
    assert "llens-pgdata" in compose["volumes"]
    assert any(v.startswith("llens-pgdata:/var/lib/postgresql/data") for v in db["volumes"])
    assert db["env_file"] == ".env"
    env_keys = {ln.split("=")[0] for ln in (root / ".env.example").read_text().splitlines() if "=" in ln and not ln.startswith("#")}
    assert "LLENS_DB_PASSWORD" in env_keys
    assert "CREATE EXTENSION IF NOT EXISTS vector" in (root / "init.sql").read_text()
